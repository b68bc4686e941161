"""Benchmark: activation capture (stage 1) against a bare forward pass and the reference approach.

Over the DPN-LE prompts of one trait (``make_pairs('openness')``, both sides, rendered with
the chat template; ``--traits all`` for the five Big Five traits), timed end to end with the
model already loaded:

- ``bare``: the model body (decoder layers and final norm, no lm_head) over exactly the
  batches dpnle forms (length-sorted, left-padded, same batch size), nothing captured;
- ``dpnle``: :func:`dpnle.collect.collect`, mlp site, last token (layers 12-31 at 8B scale,
  all layers for the small model), float32 results on the host, batch-size probe included;
- ``reference``: the DPN-LE reference code's approach: batches of 8 in the pairs' order,
  tokenizer padding, the full model forward including the lm_head, and a forward pre-hook that
  copies the last token's down_proj input to the host in float32 per layer per batch.

Prints time, tokens/s (non-pad prompt tokens), peak memory, the ratios dpnle/bare and
dpnle/reference in throughput, and MFU on CUDA (2 x decoder-layer parameters x tokens / time
/ peak, peak 989 TFLOP/s for an H100 in dense bf16).

Run:
    python benchmarks/bench_capture.py                                   # embedded model, CPU
    python benchmarks/bench_capture.py --device cuda --config llama3-8b  # random-init 8B, bf16
    python benchmarks/bench_capture.py --config tiny --num-pairs 8       # random-init tiny Llama, smoke test
Needs the PersonalityBench descriptions (``DPNLE_DATA_MIRROR=../shared/datasets`` offline).
``--tokenizer DIR`` reads a saved tokenizer folder instead of converting the embedded model's
GGUF (benchmarks/gpu_check.py --prepare writes one); ``--json-out FILE`` writes the JSON result
after every measurement; ``--reference-prompts N`` times the reference on the first N prompts
only (benchmarks/gpu_check.py extrapolates it by tokens). benchmarks/gpu_check.sh drives this
script on a GPU.
Targets (issue 3): dpnle >= 0.95x the bare forward's throughput; at 8B on one H100, 2,000 prompts
of one trait in <= 8 s (>= 60% MFU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpnle.arch import architecture
from dpnle.batching import left_pad, length_sorted_batches, pad_token_id, positions_from_mask
from dpnle.collect import collect, encode_prompts
from dpnle.concepts import TRAITS
from dpnle.models import load_model, resolve_source
from dpnle.pairs import make_pairs, render_prompt, to_samples

H100_BF16_DENSE_PEAK = 989e12

# meta-llama/Meta-Llama-3-8B-Instruct config.json (the architecture only; weights are random).
LLAMA3_8B_CONFIG: dict[str, Any] = {
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
}

# The same architecture at toy size (GQA 4:1, MLP 3.5x hidden, like Llama-3-8B), for CPU smoke
# tests of the GPU check; its vocabulary and special tokens follow the tokenizer (see build).
TINY_CONFIG: dict[str, Any] = {
    **LLAMA3_8B_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 224,
    "max_position_embeddings": 2048,
    "num_attention_heads": 8,
    "num_hidden_layers": 4,
    "num_key_value_heads": 2,
}
RANDOM_INIT_CONFIGS = {"llama3-8b": LLAMA3_8B_CONFIG, "tiny": TINY_CONFIG}


@dataclass
class Result:
    name: str
    seconds: float
    tokens: int
    peak_memory_gib: float
    batch_size: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def load_tokenizer(tokenizer: str | None = None) -> Any:
    """A saved tokenizer folder, or (None) the embedded model's, converted from its GGUF file."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        _, tokenizer, _ = resolve_source("smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)


def build(config: str, device: str, tokenizer: str | None = None) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, description). The random-init models borrow the embedded model's
    tokenizer and chat template (no download; ``tokenizer``: a saved copy of it); its prompt
    lengths are close to Llama-3's for this text. Llama-3-8B is bfloat16 everywhere; the tiny
    model bfloat16 on CUDA, float32 on the CPU."""
    if config == "smollm2":
        loaded = load_model("smollm2-135m-instruct", device=device, fingerprint=False)
        dtype = str(next(loaded.model.parameters()).dtype).replace("torch.", "")
        return loaded.model, loaded.tokenizer, f"SmolLM2-135M-Instruct ({dtype})"
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(tokenizer)
    values = dict(RANDOM_INIT_CONFIGS[config])
    dtype = torch.bfloat16
    if config == "tiny":
        # Token ids beyond the vocabulary would index past the embedding; and generate's
        # min_new_tokens masks the config's EOS id, which must exist.
        values.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # initialize on the device: seconds, not minutes on the CPU
        model = LlamaForCausalLM._from_config(LlamaConfig(**values), dtype=dtype)
    name = "Llama-3-8B-Instruct" if config == "llama3-8b" else "tiny Llama"
    return model.eval(), tok, f"random-init {name} config ({str(dtype).replace('torch.', '')})"


def capture_layers(config: str, num_layers: int) -> list[int]:
    """Layers captured: the localized ones, 12-31 at 8B (from 3/8 of the depth on, so the tiny
    model's 4 layers give 1-3), every layer of the embedded model."""
    if config == "smollm2":
        return list(range(num_layers))
    return list(range(num_layers * 3 // 8, num_layers))


def parse_traits(value: str) -> list[str]:
    traits = list(TRAITS) if value == "all" else [t.strip() for t in value.split(",") if t.strip()]
    unknown = [t for t in traits if t not in TRAITS]
    if unknown or not traits:
        raise SystemExit(f"--traits: {', '.join(unknown) or 'none given'}; choose from {', '.join(TRAITS)} or all")
    return traits


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (a reader never sees half a file)."""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, target)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is the process's peak so far (KiB on Linux): it only ever grows.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(name: str, device: torch.device, tokens: int, fn: Callable[[], int]) -> Result:
    """Time ``fn`` (which returns the batch size it used) from a synchronized start to a
    synchronized end, with the peak memory it reached."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    batch_size = fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    return Result(name, seconds, tokens, peak_memory_gib(device), batch_size)


@torch.inference_mode()
def bare_forward(model: nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int) -> None:
    body = model.base_model  # decoder layers + final norm, no lm_head
    device = next(model.parameters()).device
    encoded = encode_prompts(tokenizer, prompts)
    pad = pad_token_id(tokenizer)
    for positions in length_sorted_batches([len(ids) for ids in encoded], batch_size):
        input_ids, attention_mask = left_pad([encoded[i] for i in positions], pad, device)
        body(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask),
             use_cache=False)


@torch.no_grad()
def reference_capture(model: nn.Module, tokenizer: Any, prompts: Sequence[str], layers: Sequence[int]) -> None:
    """The DPN-LE reference extractor's approach, for comparison (not dpnle code)."""
    arch = architecture(model)
    device = next(model.parameters()).device
    store: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def make_hook(layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            store[layer].append(args[0][:, -1, :].detach().float().cpu())

        return hook

    handles = [arch.layers[layer].output_projection.register_forward_pre_hook(make_hook(layer)) for layer in layers]
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), 8):
            inputs = tokenizer(list(prompts[start : start + 8]), return_tensors="pt", padding=True,
                               add_special_tokens=False).to(device)
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=("smollm2", "llama3-8b", "tiny"), default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--traits", default="openness", help="comma-separated Big Five traits, or all")
    parser.add_argument("--num-pairs", type=int, default=None,
                        help="pairs per trait (2 prompts each); default 100 on CPU, 1000 on CUDA")
    parser.add_argument("--batch-size", default="auto", help="dpnle's batch size (int or auto)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--reference-prompts", type=int, default=None,
                        help="time the reference on the first N prompts only (default: all)")
    parser.add_argument("--tokenizer", default=None, help="a saved tokenizer folder (default: the embedded model's)")
    parser.add_argument("--json-out", default=None, help="write the JSON result here (after every measurement)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    traits = parse_traits(args.traits)
    num_pairs = args.num_pairs or (1000 if device.type == "cuda" else 100)
    build_start = time.perf_counter()
    model, tokenizer, description = build(args.config, args.device, args.tokenizer)
    synchronize(device)
    build_seconds = time.perf_counter() - build_start
    arch = architecture(model)
    layers = capture_layers(args.config, arch.num_layers)
    prompts = []
    for trait in traits:
        samples = to_samples(make_pairs(trait, num_pairs=num_pairs))
        prompts += [render_prompt(tokenizer, m, p) for m, p in zip(samples["message"], samples["response_prefix"],
                                                                    strict=True)]
    lengths = [len(ids) for ids in encode_prompts(tokenizer, prompts)]
    tokens = sum(lengths)
    batch_size: int | str = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    reference_count = min(len(prompts), args.reference_prompts or len(prompts))
    reference_prompts = prompts[:reference_count]
    reference_lengths = lengths[:reference_count]

    layer_params = sum(p.numel() for layer in arch.layers for p in layer.layer.parameters())
    payload: dict[str, Any] = {
        "config": args.config, "model": description, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "traits": traits, "num_pairs": num_pairs, "prompts": len(prompts), "tokens": tokens,
        "sum_sq_tokens": sum(n * n for n in lengths), "max_prompt_tokens": max(lengths),
        "num_layers": arch.num_layers, "hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
        "layer_params": layer_params, "captured_layers": layers, "build_seconds": build_seconds,
        "reference_prompts": reference_count, "reference_tokens": sum(reference_lengths),
        "reference_sum_sq_tokens": sum(n * n for n in reference_lengths), "results": [],
    }
    write_json(args.json_out, payload)

    # One short pass first, so no measurement pays for kernel and allocator start-up.
    collect(model, tokenizer, prompts[:2], layers=layers, batch_size=2, progress=False)

    def run_dpnle() -> int:
        capture = collect(model, tokenizer, prompts, site="mlp", policy="last", layers=layers,
                          batch_size=batch_size, progress=False)
        return capture.batch_size

    def run_bare() -> int:
        bare_forward(model, tokenizer, prompts, dpnle.batch_size)
        return dpnle.batch_size

    def run_reference() -> int:
        reference_capture(model, tokenizer, reference_prompts, layers)
        return 8

    def record(result: Result) -> Result:
        payload["results"].append(asdict(result))
        write_json(args.json_out, payload)
        return result

    dpnle = record(timed("dpnle", device, tokens, run_dpnle))
    bare = record(timed("bare", device, tokens, run_bare))
    results = [bare, dpnle]
    if not args.skip_reference:
        results.append(record(timed("reference", device, payload["reference_tokens"], run_reference)))

    print(f"model      {description}, {arch.num_layers} layers, captured layers {layers[0]}-{layers[-1]}")
    print(f"device     {device} ({payload['device_name']}, {torch.get_num_threads()} threads)")
    print(f"prompts    {len(prompts)} ({', '.join(traits)}; {num_pairs} pairs each), {tokens:,} tokens, "
          f"{tokens / len(prompts):.1f} per prompt" +
          (f"; reference on the first {reference_count}" if reference_count < len(prompts) else ""))
    memory_label = "peak GiB (CUDA allocated)" if device.type == "cuda" else "peak RSS GiB (process)"
    print(f"\n{'':10} {'batch':>6} {'seconds':>9} {'tokens/s':>11} {memory_label:>26}" +
          (f" {'MFU':>7}" if device.type == "cuda" else ""))
    for r in results:
        line = f"{r.name:10} {r.batch_size:>6} {r.seconds:>9.2f} {r.tokens_per_s:>11,.0f} {r.peak_memory_gib:>26.2f}"
        if device.type == "cuda":
            line += f" {2 * layer_params * r.tokens / r.seconds / H100_BF16_DENSE_PEAK:>7.1%}"
        print(line)
    print(f"\ndpnle / bare throughput:      {bare.seconds / dpnle.seconds:.3f}x (target >= 0.95x)")
    if not args.skip_reference:
        reference = results[-1]
        print(f"dpnle / reference throughput: {dpnle.tokens_per_s / reference.tokens_per_s:.2f}x")
    payload["complete"] = True
    write_json(args.json_out, payload)
    print(json.dumps({"config": args.config, "device": str(device), "prompts": len(prompts), "tokens": tokens,
                      "results": [asdict(r) for r in results]}))
    return payload


if __name__ == "__main__":
    main()
