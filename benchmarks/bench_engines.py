"""Benchmark: generation on Hugging Face eager ``generate`` against vLLM, unedited and edited.

Same prompts, same DPN-LE-sized edit (0.5% of the MLP neurons of the localized layers, at the
``generated`` positions, as edit-eval's open-ended answers use it), a fixed number of new tokens
per prompt (HF: ``min_new_tokens = max_new_tokens``; vLLM: ``ignore_eos``), so every condition
does the same work:

- ``hf eager``: ``model.generate`` in batches of ``--batch-size`` (left padding), no edit;
- ``hf eager + edit``: :func:`dpnle.edits.generate_with_edit`;
- ``vllm``: :class:`dpnle.engines.VLLMEngine` (eager, no prefix caching, no chunked prefill),
  every prompt submitted at once, vLLM schedules (``max_num_seqs = --batch-size``);
- ``vllm + edit``: the same with the edit installed in the workers.

HF runs first, then its model is freed and vLLM starts (on the CPU the two would compete for
the cores). Each condition runs ``--repeats`` times after one warm-up; the median counts.
Prints new tokens/s and the ratio to ``hf eager``. Targets on a GPU (issue 15): vLLM >= 5x HF
eager at batch 64; the edit costs <= 3% of unedited vLLM throughput.

Run (needs vLLM: ``make setup-vllm``, then ``.venv-vllm/bin/python ...``):
    python benchmarks/bench_engines.py                       # SmolLM2-135M-Instruct, float32, CPU
    python benchmarks/bench_engines.py --gpu                 # random-init Llama-3-8B shape, bf16, CUDA
    python benchmarks/bench_engines.py --prompts 4 --new-tokens 8 --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from typing import Any

import torch
from bench_capture import build, capture_layers, synchronize
from bench_generate import PROMPTS, dpnle_sized_edit

from dpnle.edits import generate_with_edit
from dpnle.pairs import render_prompt


def _timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(torch.device(device))
        start = time.perf_counter()
        fn()
        synchronize(torch.device(device))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="random-init Llama-3-8B shape in bfloat16 on CUDA")
    parser.add_argument("--prompts", type=int, default=None, help="number of prompts (default 16 CPU, 64 GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="HF batch / vLLM max_num_seqs (default 8 CPU, 64 GPU)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per prompt (default 32 CPU, 128 GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", default=None, help="a saved tokenizer folder (default: the embedded model's)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    config, device = ("llama3-8b", "cuda") if args.gpu else ("smollm2", "cpu")
    n_prompts = args.prompts or (64 if args.gpu else 16)
    batch = args.batch_size or (64 if args.gpu else 8)
    new_tokens = args.new_tokens or (128 if args.gpu else 32)

    model, tok, description = build(config, device, args.tokenizer)
    arch_layers = capture_layers(config, model.config.num_hidden_layers)
    edit = dpnle_sized_edit(model, arch_layers, 0.005, "generated", seed=0)
    texts = [render_prompt(tok, PROMPTS[i % len(PROMPTS)]) for i in range(n_prompts)]
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    total_new = n_prompts * new_tokens
    results: dict[str, float] = {}

    tok.padding_side = "left"
    batches = [texts[i : i + batch] for i in range(0, n_prompts, batch)]

    def hf(with_edit):
        for chunk in batches:
            inputs = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            generate_with_edit(model, inputs, edit if with_edit else None, tokenizer=tok, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False)  # fmt: skip

    for name, with_edit in (("hf eager", False), ("hf eager + edit", True)):
        results[name] = total_new / _timed(lambda w=with_edit: hf(w), args.repeats, device)
        print(f"{name:18s} {results[name]:9.1f} new tokens/s", flush=True)

    # vLLM loads a folder: the embedded model's converted one, or the random-init model saved.
    from dpnle.engines import VLLMEngine, VLLMOptions

    folder_ctx = tempfile.TemporaryDirectory(prefix="dpnle-bench-") if args.gpu else None
    if args.gpu:
        model.save_pretrained(folder_ctx.name)
        tok.save_pretrained(folder_ctx.name)
        folder = folder_ctx.name
    else:
        from dpnle.models import resolve_source

        folder = resolve_source("smollm2-135m-instruct")[1]
    model = None  # free the HF copy before vLLM loads its own
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    max_len = max(len(e) for e in encoded) + new_tokens + 8
    engine = VLLMEngine(folder, VLLMOptions(dtype=dtype, max_model_len=max(max_len, 256), max_num_seqs=batch,
                                            gpu_memory_utilization=0.85 if args.gpu else None))  # fmt: skip

    def vllm(with_edit):
        out = engine.generate_ids(encoded, edit=edit if with_edit else None, max_new_tokens=new_tokens)
        assert sum(len(t) for t in out) == total_new

    for name, with_edit in (("vllm", False), ("vllm + edit", True)):
        results[name] = total_new / _timed(lambda w=with_edit: vllm(w), args.repeats, device)
        print(f"{name:18s} {results[name]:9.1f} new tokens/s", flush=True)
    engine.close()
    if folder_ctx is not None:
        folder_ctx.cleanup()

    base = results["hf eager"]
    print(f"\n{description}, {n_prompts} prompts, {new_tokens} new tokens each, batch {batch}, {device}")
    print("| condition | new tokens/s | x hf eager |\n|---|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.1f} | {value / base:.2f} |")
    print(f"edit cost on vLLM: {100 * (1 - results['vllm + edit'] / results['vllm']):.1f}% of unedited throughput")
    report = {"model": description, "device": device, "prompts": n_prompts, "new_tokens": new_tokens,
              "batch": batch, "tokens_per_s": results}  # fmt: skip
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":  # vLLM starts worker processes: nothing runs on import
    main()
