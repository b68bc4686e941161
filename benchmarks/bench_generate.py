"""Benchmark: batched greedy generation with a DPN-LE-sized edit against no edit and a baked checkpoint.

Same prompts, same batches, a fixed number of new tokens per row (``min_new_tokens`` =
``max_new_tokens``, so every condition produces exactly the same amount of work):

- ``none``: ``model.generate`` with no hooks;
- ``hooked (generated)``: :func:`dpnle.edits.generate_with_edit` with the edit applied to
  generated positions only (the edit-eval default for open-ended answers): hooks plus the
  position mask on every decoding step;
- ``hooked (all)``: the same edit on every position (no mask);
- ``baked``: the all-positions edit folded into the down_proj bias of a copy of the model
  (:func:`dpnle.edits.bake_edit`, what ``dpnle export`` saves): no hooks at all.

The edit is DPN-LE-sized: 0.5% of the MLP neurons of the localized layers (12-31 at 8B, the
model's ``configs/models.yaml`` layers for the embedded model), random units with random
deltas; throughput does not depend on which units. Conditions run interleaved, ``--repeats``
times each after one warm-up round, and the median time counts. Prints new tokens/s and the
ratio of each condition's throughput to ``none`` (targets, issue 7: hooked >= 0.97x, baked 1.0x).

Run:
    python benchmarks/bench_generate.py                                   # embedded model, CPU
    python benchmarks/bench_generate.py --device cuda --config llama3-8b  # random-init 8B, bf16
    python benchmarks/bench_generate.py --config tiny --new-tokens 8      # random-init tiny Llama, smoke test
``--tokenizer DIR`` and ``--json-out FILE`` as in bench_capture.py; benchmarks/gpu_check.sh
drives this script on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_capture import build, capture_layers, peak_memory_gib, synchronize, write_json

from dpnle.arch import architecture, parse_layers
from dpnle.edits import Edit, bake_edit, generate_with_edit
from dpnle.localize import model_defaults

PROMPTS = [
    "Describe your ideal weekend.",
    "How do you usually react when plans change at the last minute?",
    "What do you think about trying food from a country you have never visited?",
    "Tell me about a time you had to work with a difficult colleague.",
    "Would you rather spend an evening at a party or reading at home? Why?",
    "How do you decide what to do when a friend asks for help and you are busy?",
    "What is your opinion on modern art?",
    "How do you keep your desk organized?",
]


def dpnle_sized_edit(model: torch.nn.Module, layers: list[int], fraction: float, positions: str, seed: int) -> Edit:
    arch = architecture(model)
    width = arch.intermediate_size
    per_layer = max(1, round(fraction * width))
    g = torch.Generator().manual_seed(seed)
    vectors = {}
    for layer in layers:
        idx = torch.randperm(width, generator=g)[:per_layer].sort().values
        vectors[layer] = (idx, torch.randn(per_layer, generator=g) * 0.1)
    return Edit(method="dpnle", site="mlp", vectors=vectors, positions=positions)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=("smollm2", "llama3-8b", "tiny"), default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default 8 CPU, 64 CUDA)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (default 32 CPU, 128 CUDA)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.005, help="share of neurons edited per layer")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokenizer", default=None, help="a saved tokenizer folder (default: the embedded model's)")
    parser.add_argument("--json-out", default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch_size = args.batch_size or (64 if cuda else 8)
    new_tokens = args.new_tokens or (128 if cuda else 32)

    build_start = time.perf_counter()
    model, tokenizer, description = build(args.config, args.device, args.tokenizer)
    synchronize(device)
    build_seconds = time.perf_counter() - build_start
    arch = architecture(model)
    if args.config == "smollm2":
        layers = parse_layers(model_defaults("smollm2-135m-instruct")["layers"], arch.num_layers)
    else:
        layers = capture_layers(args.config, arch.num_layers)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True)
               for p in (PROMPTS * (batch_size // len(PROMPTS) + 1))[:batch_size]]
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
              "pad_token_id": tokenizer.pad_token_id}

    edit_generated = dpnle_sized_edit(model, layers, args.fraction, "generated", seed=0)
    edit_all = dpnle_sized_edit(model, layers, args.fraction, "all", seed=0)
    baked = bake_edit(copy.deepcopy(model), edit_all)

    conditions: dict[str, Callable[[], Any]] = {
        "none": lambda: generate_with_edit(model, inputs, None, **kwargs),
        "hooked (generated)": lambda: generate_with_edit(model, inputs, edit_generated, **kwargs),
        "hooked (all)": lambda: generate_with_edit(model, inputs, edit_all, **kwargs),
        "baked": lambda: generate_with_edit(baked, inputs, None, **kwargs),
    }
    # The baked copy must generate what the all-positions hook does (a sanity check, not timed).
    same = torch.equal(conditions["hooked (all)"](), conditions["baked"]())
    times: dict[str, list[float]] = {name: [] for name in conditions}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for name, fn in conditions.items():
            synchronize(device)
            start = time.perf_counter()
            out = fn()
            synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - start)
            assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens
        if round_:  # what a run cut short (a time limit) still leaves behind
            write_json(args.json_out, {"config": args.config, "device": str(device), "batch_size": batch_size,
                                       "new_tokens": new_tokens, "all_seconds": times, "baked_equals_hooked": same,
                                       "rounds_done": round_, "complete": False})

    produced = batch_size * new_tokens
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"model      {description}, {arch.num_layers} layers")
    print(f"device     {device} ({torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads)")
    print(f"edit       {edit_all.num_neurons} neurons ({args.fraction:.1%} of layers {layers[0]}-{layers[-1]})")
    print(f"work       batch {batch_size} x {new_tokens} new tokens, prompt length {inputs['input_ids'].shape[1]}; "
          f"median of {args.repeats}")
    print(f"baked output equals hooked (all): {same}")
    print(f"\n{'':20} {'seconds':>9} {'new tok/s':>10} {'vs none':>8}")
    for name in conditions:
        print(f"{name:20} {median[name]:>9.3f} {produced / median[name]:>10,.1f} {median['none'] / median[name]:>8.3f}x")
    print(f"\npeak memory GiB: {peak_memory_gib(device):.2f} ({'CUDA allocated' if cuda else 'process RSS'})")
    summary = {"config": args.config, "device": str(device), "batch_size": batch_size, "new_tokens": new_tokens,
               "median_seconds": median, "all_seconds": times, "baked_equals_hooked": same}
    print(json.dumps(summary))
    payload = {
        **summary, "model": description,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "num_layers": arch.num_layers, "edited_layers": layers, "edit_neurons": edit_all.num_neurons,
        "fraction": args.fraction, "prompt_length": int(inputs["input_ids"].shape[1]), "repeats": args.repeats,
        "new_tokens_per_call": produced, "build_seconds": build_seconds,
        "peak_memory_gib": peak_memory_gib(device), "complete": True,
    }
    write_json(args.json_out, payload)
    return payload


if __name__ == "__main__":
    main()
