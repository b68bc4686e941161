"""GPU evidence in one run: activation capture and steered generation at Llama-3-8B scale.

Drives the two benchmarks as they are, each in its own process with its own time limit, and
gathers what they measured into one JSON file and one log:

1. ``env``: versions, the GPU, and a bf16 matrix-product probe (8192^3, CUDA only) in the
   Python that runs the benchmarks;
2. ``capture``: ``bench_capture.py`` (dpnle's ``collect`` vs the bare model body vs the DPN-LE
   reference approach) over the five traits x 1,000 pairs (10,000 prompts), the reference on
   the first 2,000 prompts only, its time extrapolated by tokens (the JSON says so);
3. ``generate``: ``bench_generate.py`` (no edit, hooked edit at generated positions and at all
   positions, baked edit), batch 64 x 128 new tokens, median of 3.

Models are random-init from the real configs, built on the device (nothing is downloaded), in
bfloat16 on CUDA. The JSON is rewritten after every step, so a failed or cut-short run still
leaves what it measured; the exit status is non-zero when a step failed or ran out of time.
Missed targets are results, not failures: they are listed under ``targets``.

MFU = 2 x decoder-layer parameters x non-pad prompt tokens / seconds / peak, the peak being the
GPU's dense bf16 datasheet figure (``PEAK_BF16_DENSE``, matched on the CUDA device name; null
on the CPU or an unknown GPU). ``mfu_with_attention`` adds the causal attention products,
2 x layers x hidden x sum over prompts of length^2.

Run (from the repository root):
    benchmarks/gpu_check.sh                                   # the GPU check (CUDA: 8B defaults)
    SIZE=tiny DEVICE=cpu benchmarks/gpu_check.sh              # CPU smoke test, tiny Llama
    python benchmarks/gpu_check.py --prepare .gpu_check --wheels   # what the device needs, fetched here
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCHEMA = "dpnle-gpu-check/1"
DEFAULT_ASSETS = REPO / ".gpu_check"
DEFAULT_WHEELS = REPO / ".whl"

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, in FLOP/s, matched as
# substrings of torch.cuda.get_device_name(), most specific first. The SXM H100 reports itself
# as e.g. "NVIDIA H100 80GB HBM3", the SXM H200 as "NVIDIA H200".
PEAK_BF16_DENSE: list[tuple[str, float, str]] = [
    ("H100 PCIe", 756.5e12, "H100 PCIe"),
    ("H100 NVL", 835.5e12, "H100 NVL"),
    ("H200 NVL", 835.5e12, "H200 NVL"),
    ("H100", 989.4e12, "H100 SXM"),
    ("H200", 989.4e12, "H200 SXM"),
    ("A100", 312e12, "A100"),
]

TARGET_PROMPTS = 10_000  # five traits x 1,000 pairs x 2 sides (issue: capture in <= 40 s)
TARGET_TOKENS = 1_760_000  # the issue's estimate of those prompts' tokens at Llama-3-8B
FLOPS_FORMULA = (
    "mfu = 2 * layer_params * tokens / seconds / peak_bf16_dense; layer_params = parameters of the decoder "
    "layers (embeddings, final norm and lm_head excluded), tokens = non-pad prompt tokens. "
    "mfu_with_attention adds 2 * num_layers * hidden_size * sum(prompt_length^2) FLOPs (causal QK^T and AV)."
)

# What the device's image lacks or has too old for dpnle (Python 3.12, torch 2.11, transformers
# 5.17 there): pinned as in requirements.lock. Pure Python, or abi3 / cp312 manylinux builds.
WHEELS = [
    "transformers==5.25.0",
    "huggingface-hub==2.4.0",  # transformers 5.25 needs >= 2.4 (the image has 1.x)
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "httpx2==2.16.2",  # huggingface-hub 2.x imports httpx2 ...
    "httpcore2==2.16.2",  # ... which needs httpcore2 ...
    "truststore==0.10.5",  # ... and truststore
    "regex==2026.11.19",  # transformers checks regex >= 2025.10.22 at import
    "platformdirs==4.14.9",  # dpnle.paths
]
PIP_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]

SIZES: dict[str, dict[str, Any]] = {
    "8b": {"config": "llama3-8b", "traits": "all", "num_pairs": 1000, "reference_prompts": 2000,
           "gen_batch_size": 64, "new_tokens": 128, "repeats": 3, "budget_s": 450},
    "tiny": {"config": "tiny", "traits": "openness", "num_pairs": 8, "reference_prompts": None,
             "gen_batch_size": 4, "new_tokens": 8, "repeats": 1, "budget_s": 150},
}
GENERATE_CONDITIONS = {"none": "none", "hooked (generated)": "hooked_generated", "hooked (all)": "hooked_all",
                       "baked": "baked"}


class Interrupted(Exception):
    """SIGTERM or SIGINT (e.g. gpu_check.sh's timeout): stop, keep what was measured."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Log:
    """Lines to stdout and to the log file (flushed at once: a killed run keeps its log)."""

    def __init__(self, path: Path, append: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
        self._lock = threading.Lock()

    def __call__(self, text: str = "") -> None:
        with self._lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            self._file.write(text + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------------------------------------
# environment (run in a child process: the Python, and the PYTHONPATH, that runs the benchmarks)


def peak_for(device_name: str | None) -> tuple[float | None, str | None]:
    if not device_name:
        return None, None
    for key, flops, label in PEAK_BF16_DENSE:
        if key.lower() in device_name.lower():
            return flops, label
    return None, None


def environment(device: str, matmul: bool) -> dict[str, Any]:
    import platform
    from importlib import metadata

    info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable,
                            "platform": platform.platform(), "pythonpath": os.environ.get("PYTHONPATH", "")}
    versions: dict[str, str | None] = {}
    for name in ("torch", "transformers", "tokenizers", "huggingface-hub", "safetensors", "accelerate", "numpy",
                 "pandas", "pyarrow", "platformdirs"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info["versions"] = versions
    import torch
    import transformers

    import dpnle

    info["versions"]["torch"] = torch.__version__  # the one imported (a build tag included)
    info["versions"]["transformers"] = transformers.__version__
    info["dpnle"] = {"version": dpnle.__version__, "path": str(Path(dpnle.__file__).resolve().parent)}
    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    info["threads"] = torch.get_num_threads()
    info["cpu_count"] = os.cpu_count()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    info["device"] = device
    info["device_name"] = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["capability"] = f"{props.major}.{props.minor}"
        info["multiprocessors"] = props.multi_processor_count
        info["memory_gib"] = props.total_memory / 2**30
        info["cudnn"] = torch.backends.cudnn.version()
    peak, label = peak_for(info["device_name"])
    info["peak_bf16_dense_flops"] = peak
    info["peak_source"] = (f"{label} dense bf16 datasheet figure, matched on {info['device_name']!r}" if peak
                           else "no peak: not a GPU in the table (MFU is null)")
    info["matmul_bf16_tflops"] = None
    if matmul and device.startswith("cuda"):
        # What a plain large bf16 product reaches here: the practical ceiling MFU is read against.
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        info["matmul_bf16_tflops"] = 10 * 2 * n**3 / (time.perf_counter() - start) / 1e12
        del a, b
        torch.cuda.empty_cache()
    return info


def print_versions(device: str) -> None:
    info = environment(device, matmul=False)
    print(f"{'python':16} {info['python']} ({info['executable']})")
    for name, version in info["versions"].items():
        print(f"{name:16} {version}")
    print(f"{'dpnle':16} {info['dpnle']['version']} ({info['dpnle']['path']})")
    gpu = (f"{info['device_name']}, capability {info['capability']}, {info['memory_gib']:.0f} GiB, "
           f"torch CUDA {info['torch_cuda']}" if info["device_name"] else "none (CPU)")
    print(f"{'GPU':16} {gpu}")


# ---------------------------------------------------------------------------------------------
# preparing the carried assets (on a machine with the embedded model and the data)


def prepare(assets: Path, wheels: bool, wheels_dir: Path = DEFAULT_WHEELS) -> None:
    """Write what the device cannot fetch: the embedded model's tokenizer (the random-init
    models use it; its GGUF file is too large to carry), the PersonalityBench descriptions in
    the mirror layout ``DPNLE_DATA_MIRROR`` reads, and optionally the wheels (``.whl/``)."""
    from bench_capture import load_tokenizer

    from dpnle import datasets

    assets.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(None)
    target = assets / "tokenizer"
    if target.exists():
        shutil.rmtree(target)
    tokenizer.save_pretrained(target)
    print(f"tokenizer     {target}")
    for name in ("pb-descriptions",):  # make_pairs' personalitybench recipe; the questions are in data/
        entry = datasets.get_entry(name)
        destination = datasets.mirror_path(entry, assets / "datasets")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(datasets.fetch(name), destination)
        print(f"dataset       {destination}")
    if wheels:
        wheels_dir.mkdir(parents=True, exist_ok=True)
        for spec in WHEELS:
            command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                       "--python-version", "3.12", "--implementation", "cp",
                       *(x for p in PIP_PLATFORMS for x in ("--platform", p)), "-d", str(wheels_dir), spec]
            subprocess.run(command, check=True)
        print(f"wheels        {wheels_dir}: {', '.join(sorted(p.name for p in wheels_dir.glob('*.whl')))}")
    exclude = REPO / ".git" / "info" / "exclude"
    if exclude.parent.is_dir() and assets.is_relative_to(REPO):  # carried folders stay out of git
        lines = exclude.read_text().splitlines() if exclude.exists() else []
        missing = [line for line in ("/.whl/", "/.gpu_check/") if line not in lines]
        if missing:
            with open(exclude, "a", encoding="utf-8") as fh:
                fh.write("".join(line + "\n" for line in missing))
    size = sum(f.stat().st_size for d in (assets, wheels_dir) if d.exists() for f in d.rglob("*") if f.is_file())
    print(f"carried size  {size / 2**20:.1f} MiB (.gpu_check + .whl)")


# ---------------------------------------------------------------------------------------------
# steps


def run_step(name: str, command: list[str], timeout: float, env: dict[str, str], log: Log,
             json_path: Path | None, on_done: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run ``command`` with its output in the log; kill its process group past ``timeout``.

    ``on_done`` gets the step's record (with the JSON the step left, if any) however the step
    ends, an :class:`Interrupted` driver included, so a cut-short run still reports it."""
    record: dict[str, Any] = {"command": " ".join(command), "timeout_seconds": round(timeout, 1),
                              "started_at": now_iso()}
    log(f"\n=== step {name} (limit {timeout:.0f} s): {record['command']}")
    start = time.perf_counter()
    tail: list[str] = []
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            del tail[:-40]
            log(f"  {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = None
    try:
        proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        status = "timed_out"
    except Interrupted:
        status = "killed"
        raise
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        reader.join(timeout=5)
        record["seconds"] = time.perf_counter() - start
        record["returncode"] = proc.returncode
        record["status"] = status or ("ok" if proc.returncode == 0 else "failed")
        if record["status"] != "ok":
            record["output_tail"] = tail[-15:]
        if json_path is not None:
            record["result"] = read_json(json_path)
        log(f"=== step {name}: {record['status']} after {record['seconds']:.1f} s")
        on_done(record)
    return record


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------
# what the numbers say


def summarize_capture(result: dict[str, Any] | None, peak: float | None) -> dict[str, Any] | None:
    if not result or not result.get("results"):
        return None
    runs = {r["name"]: r for r in result["results"]}
    layer_params, num_layers, hidden = result["layer_params"], result["num_layers"], result["hidden_size"]
    out: dict[str, Any] = {
        "model": result.get("model"), "dtype": result.get("dtype"), "traits": result.get("traits"),
        "num_pairs": result.get("num_pairs"), "prompts": result["prompts"], "tokens": result["tokens"],
        "tokens_per_prompt": result["tokens"] / result["prompts"], "layer_params": layer_params,
        "captured_layers": result.get("captured_layers"), "model_build_seconds": result.get("build_seconds"),
        "complete": bool(result.get("complete")),
    }
    for name, run in runs.items():
        is_reference = name == "reference"
        sum_sq = result["reference_sum_sq_tokens"] if is_reference else result["sum_sq_tokens"]
        dense = 2 * layer_params * run["tokens"]
        attention = 2 * num_layers * hidden * sum_sq
        entry = {
            "seconds": run["seconds"], "tokens": run["tokens"], "tokens_per_s": run["tokens"] / run["seconds"],
            "batch_size": run["batch_size"], "peak_memory_gib": run["peak_memory_gib"],
            "tflops": dense / run["seconds"] / 1e12,
            "mfu": dense / run["seconds"] / peak if peak else None,
            "mfu_with_attention": (dense + attention) / run["seconds"] / peak if peak else None,
        }
        if is_reference:
            entry["prompts"] = result["reference_prompts"]
            entry["extrapolated"] = result["reference_prompts"] < result["prompts"]
            entry["seconds_all_prompts"] = run["seconds"] * result["tokens"] / run["tokens"]
            if entry["extrapolated"]:
                entry["extrapolation"] = (f"measured on the first {result['reference_prompts']} of "
                                          f"{result['prompts']} prompts; seconds_all_prompts scales by tokens")
        out[name] = entry
    if "dpnle" in runs:
        dpnle = out["dpnle"]
        out["batch_size"] = dpnle["batch_size"]
        out["seconds_10k_prompts"] = dpnle["seconds"] * TARGET_PROMPTS / result["prompts"]
        out["seconds_1p76m_tokens"] = dpnle["seconds"] * TARGET_TOKENS / dpnle["tokens"]
        out["projection_10k"] = ("measured" if result["prompts"] == TARGET_PROMPTS else
                                 f"scaled linearly from {result['prompts']} prompts")
        if "bare" in runs:
            out["dpnle_over_bare"] = out["bare"]["seconds"] / dpnle["seconds"]
        if "reference" in runs:
            out["dpnle_over_reference"] = dpnle["tokens_per_s"] / out["reference"]["tokens_per_s"]
    return out


def summarize_generate(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if not result:
        return None
    times = result.get("all_seconds") or {}
    if not times.get("none"):
        return None
    produced = result["batch_size"] * result["new_tokens"]
    out: dict[str, Any] = {
        "model": result.get("model"), "dtype": result.get("dtype"), "batch_size": result["batch_size"],
        "new_tokens": result["new_tokens"], "prompt_length": result.get("prompt_length"),
        "edit_neurons": result.get("edit_neurons"), "edited_layers": result.get("edited_layers"),
        "repeats_done": min(len(t) for t in times.values() if t is not None) if times else 0,
        "baked_equals_hooked": result.get("baked_equals_hooked"),
        "peak_memory_gib": result.get("peak_memory_gib"), "model_build_seconds": result.get("build_seconds"),
        "complete": bool(result.get("complete")),
    }
    none = statistics.median(times["none"])
    for condition, key in GENERATE_CONDITIONS.items():
        if times.get(condition):
            median = statistics.median(times[condition])
            out[key] = {"seconds": median, "new_tokens_per_s": produced / median, "vs_none": none / median,
                        "all_seconds": times[condition]}
    return out


def targets(capture: dict[str, Any] | None, generate: dict[str, Any] | None, applies: bool) -> list[dict[str, Any]]:
    """The issue's targets, judged only at Llama-3-8B scale on a GPU (``applies``)."""
    rows = []

    def add(name: str, criterion: str, value: float | None, ok: bool | None) -> None:
        rows.append({"name": name, "criterion": criterion, "value": value, "applies": applies,
                     "pass": (ok if applies and value is not None else None)})

    c = capture or {}
    g = generate or {}
    dpnle = c.get("dpnle") or {}
    value = c.get("seconds_10k_prompts")
    add("capture_10k_prompts_seconds", "<= 40 s (five traits x 1,000 pairs)", value,
        value is not None and value <= 40)
    value = dpnle.get("mfu")
    add("capture_mfu", ">= 0.60 of dense bf16 peak (decoder layers)", value, value is not None and value >= 0.60)
    value = c.get("dpnle_over_bare")
    add("capture_vs_bare", ">= 0.95x a bare forward's throughput", value, value is not None and value >= 0.95)
    value = (g.get("hooked_generated") or {}).get("vs_none")
    add("generate_hooked_generated_vs_none", ">= 0.97x unsteered throughput", value,
        value is not None and value >= 0.97)
    value = (g.get("hooked_all") or {}).get("vs_none")
    add("generate_hooked_all_vs_none", ">= 0.97x unsteered throughput", value, value is not None and value >= 0.97)
    value = (g.get("baked") or {}).get("vs_none")
    add("generate_baked_vs_none", "1.0x unsteered throughput (>= 0.99x)", value, value is not None and value >= 0.99)
    return rows


def summary_table(payload: dict[str, Any]) -> list[str]:
    env = payload.get("environment") or {}
    lines = ["", "=" * 78, f"dpnle GPU check: {payload['status']}  ({payload['size']} on {payload['device']}, "
             f"{payload.get('wall_seconds', 0):.0f} s)"]
    if env:
        lines.append(f"python {env.get('python')}, torch {env['versions'].get('torch')}, transformers "
                     f"{env['versions'].get('transformers')}, device {env.get('device_name') or 'CPU'}"
                     + (f", peak {env['peak_bf16_dense_flops'] / 1e12:.1f} TFLOP/s" if env.get("peak_bf16_dense_flops")
                        else "") + (f", 8192^3 bf16 matmul {env['matmul_bf16_tflops']:.0f} TFLOP/s"
                                    if env.get("matmul_bf16_tflops") else ""))
    for name, step in payload["steps"].items():
        lines.append(f"step {name:9} {step['status']:10} {step.get('seconds', 0):7.1f} s")
    c = payload.get("capture")
    if c:
        lines += ["", f"capture: {c['prompts']} prompts, {c['tokens']:,} tokens ({c['tokens_per_prompt']:.0f}/prompt), "
                  f"{c['model']}",
                  f"{'':10} {'batch':>6} {'seconds':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>7} {'peak GiB':>9}"]
        for name in ("bare", "dpnle", "reference"):
            r = c.get(name)
            if r:
                mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
                note = f"  (first {r['prompts']} prompts)" if r.get("extrapolated") else ""
                lines.append(f"{name:10} {r['batch_size']:>6} {r['seconds']:>9.2f} {r['tokens_per_s']:>11,.0f} "
                             f"{r['tflops']:>8.3g} {mfu:>7} {r['peak_memory_gib']:>9.2f}{note}")
        if "dpnle_over_bare" in c:
            lines.append(f"dpnle / bare {c['dpnle_over_bare']:.3f}x" +
                         (f", dpnle / reference {c['dpnle_over_reference']:.2f}x" if "dpnle_over_reference" in c else ""))
        if "seconds_10k_prompts" in c:
            lines.append(f"dpnle, 10,000 prompts: {c['seconds_10k_prompts']:.1f} s ({c['projection_10k']})")
    g = payload.get("generate")
    if g:
        lines += ["", f"generate: batch {g['batch_size']} x {g['new_tokens']} new tokens, prompt length "
                  f"{g['prompt_length']}, edit of {g['edit_neurons']} neurons, median of {g['repeats_done']}; "
                  f"baked == hooked (all): {g['baked_equals_hooked']}",
                  f"{'':20} {'seconds':>9} {'new tok/s':>10} {'vs none':>8}"]
        for condition, key in GENERATE_CONDITIONS.items():
            r = g.get(key)
            if r:
                lines.append(f"{condition:20} {r['seconds']:>9.3f} {r['new_tokens_per_s']:>10,.1f} {r['vs_none']:>7.3f}x")
    rows = payload.get("targets") or []
    if rows:
        lines += ["", "targets" + ("" if rows[0]["applies"] else " (not judged: only at 8B on a GPU)")]
        for t in rows:
            value = "-" if t["value"] is None else f"{t['value']:.3f}"
            verdict = {True: "PASS", False: "MISS", None: "-"}[t["pass"]]
            lines.append(f"  {t['name']:36} {value:>9}  {t['criterion']:42} {verdict}")
    lines.append("=" * 78)
    return lines


# ---------------------------------------------------------------------------------------------
# the driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("auto", *SIZES), default="auto",
                        help="8b: Llama-3-8B config; tiny: a toy Llama (smoke test); auto: 8b on CUDA, tiny on CPU")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when there is one)")
    parser.add_argument("--out", type=Path, default=HERE / "gpu_check.json", help="the JSON file")
    parser.add_argument("--log", type=Path, default=None, help="the log (default: the JSON's name, .log)")
    parser.add_argument("--log-append", action="store_true", help="append to the log (gpu_check.sh started it)")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock limit of all steps (8b: 450, tiny: 150)")
    parser.add_argument("--tokenizer", default=None,
                        help="saved tokenizer folder (default: .gpu_check/tokenizer if present, else the embedded model's)")
    parser.add_argument("--traits", default=None, help="capture: comma-separated traits or all (8b: all)")
    parser.add_argument("--num-pairs", type=int, default=None, help="capture: pairs per trait (8b: 1000)")
    parser.add_argument("--reference-prompts", type=int, default=None,
                        help="capture: time the reference on the first N prompts (8b: 2000; 0: all)")
    parser.add_argument("--capture-batch-size", default="auto", help="capture: dpnle's batch size (int or auto)")
    parser.add_argument("--gen-batch-size", type=int, default=None, help="generate: prompts per batch (8b: 64)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generate: new tokens per row (8b: 128)")
    parser.add_argument("--repeats", type=int, default=None, help="generate: timed rounds (8b: 3)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch in the benchmarks")
    parser.add_argument("--steps", default="capture,generate", help="which benchmarks to run (env always runs)")
    parser.add_argument("--versions", action="store_true", help="print versions and the GPU, then exit")
    parser.add_argument("--env-json", type=Path, default=None, help=argparse.SUPPRESS)  # the env step's child
    parser.add_argument("--prepare", type=Path, nargs="?", const=DEFAULT_ASSETS, default=None, metavar="DIR",
                        help="write the assets the device needs (tokenizer, data) to DIR (.gpu_check) and exit")
    parser.add_argument("--wheels", action="store_true", help="with --prepare: also download the wheels into .whl/")
    return parser.parse_args(argv)


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in paths:
        paths.append(str(REPO))  # dpnle from this checkout: the device has it installed nowhere
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    mirror = DEFAULT_ASSETS / "datasets"
    if "DPNLE_DATA_MIRROR" not in env and mirror.is_dir():
        env["DPNLE_DATA_MIRROR"] = str(mirror)
    return env


def git_info() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()),
            "changed": status.stdout.splitlines()[:20]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.versions:
        print_versions(args.device)
        return 0
    if args.env_json is not None:
        write_json(args.env_json, environment(args.device, matmul=True))
        return 0
    if args.prepare is not None:
        sys.path.insert(0, str(HERE))
        prepare(args.prepare.resolve(), args.wheels)
        return 0

    started = time.perf_counter()
    out: Path = args.out.resolve()
    log = Log((args.log or out.with_suffix(".log")).resolve(), args.log_append)
    payload: dict[str, Any] = {
        "schema": SCHEMA, "status": "running", "started_at": now_iso(), "argv": sys.argv[1:] if argv is None else argv,
        "size": args.size, "device": args.device, "git": git_info(), "log": str(log.path),
        "flops_formula": FLOPS_FORMULA, "steps": {}, "environment": None, "capture": None, "generate": None,
        "targets": [], "notes": [],
    }
    write_json(out, payload)

    def on_signal(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    env = child_env(args)
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check-"))  # the steps' own JSON, copied into ours
    failed = False
    try:
        budget = args.budget_s or SIZES["tiny" if args.size == "tiny" else "8b"]["budget_s"]
        deadline = started + budget
        log(f"dpnle gpu_check: size {args.size}, device {args.device}, budget {budget:.0f} s, JSON {out}")

        # 1. env: the benchmarks' Python, the GPU, and a matmul probe
        env_json = workdir / "env.json"
        env_json.unlink(missing_ok=True)

        def env_done(record: dict[str, Any]) -> None:
            payload["environment"] = record.pop("result")
            payload["steps"]["env"] = record
            write_json(out, payload)

        step = run_step("env", [sys.executable, str(HERE / "gpu_check.py"), "--env-json", str(env_json),
                                "--device", args.device], min(120.0, 0.25 * budget), env, log, env_json, env_done)
        if step["status"] != "ok" or not payload["environment"]:
            raise RuntimeError("the env step failed: the benchmarks cannot import their packages (see the log)")
        environ = payload["environment"]
        device = environ["device"]
        size = args.size if args.size != "auto" else ("8b" if device.startswith("cuda") else "tiny")
        payload["device"], payload["size"] = device, size
        defaults = SIZES[size]
        peak = environ.get("peak_bf16_dense_flops")
        budget = args.budget_s or defaults["budget_s"]
        deadline = started + budget
        tokenizer = args.tokenizer
        if tokenizer is None and (DEFAULT_ASSETS / "tokenizer").is_dir():
            tokenizer = str(DEFAULT_ASSETS / "tokenizer")
        reference_prompts = defaults["reference_prompts"] if args.reference_prompts is None else args.reference_prompts
        settings = {
            "config": defaults["config"], "budget_seconds": budget, "tokenizer": tokenizer or "embedded (smollm2)",
            "data_mirror": env.get("DPNLE_DATA_MIRROR"),
            "traits": args.traits or defaults["traits"], "num_pairs": args.num_pairs or defaults["num_pairs"],
            "reference_prompts": reference_prompts or None, "capture_batch_size": args.capture_batch_size,
            "gen_batch_size": args.gen_batch_size or defaults["gen_batch_size"],
            "new_tokens": args.new_tokens or defaults["new_tokens"],
            "repeats": args.repeats or defaults["repeats"], "threads": args.threads,
        }
        payload["settings"] = settings
        if size == "8b" and not device.startswith("cuda"):
            payload["notes"].append("8b on the CPU: slow, and no target is judged off a GPU")
        if not peak:
            payload["notes"].append("MFU is null: no dense bf16 peak for this device in PEAK_BF16_DENSE")
        steps = [s.strip() for s in args.steps.split(",") if s.strip()]
        common = ["--config", defaults["config"], "--device", device]
        if tokenizer:
            common += ["--tokenizer", tokenizer]
        if args.threads:
            common += ["--threads", str(args.threads)]

        # 2. capture, leaving the generation step about 30% of the budget
        if "capture" in steps:
            part = workdir / "capture.json"
            part.unlink(missing_ok=True)
            command = [sys.executable, str(HERE / "bench_capture.py"), *common, "--traits", settings["traits"],
                       "--num-pairs", str(settings["num_pairs"]), "--batch-size", str(settings["capture_batch_size"]),
                       "--json-out", str(part)]
            if reference_prompts:
                command += ["--reference-prompts", str(reference_prompts)]

            def capture_done(record: dict[str, Any]) -> None:
                payload["capture"] = summary = summarize_capture(record.get("result"), peak)
                payload["steps"]["capture"] = record
                if summary and summary.get("reference", {}).get("extrapolated"):
                    payload["notes"].append(summary["reference"]["extrapolation"])
                if summary and summary.get("projection_10k") not in (None, "measured"):
                    payload["notes"].append(f"capture time for 10,000 prompts {summary['projection_10k']}")
                write_json(out, payload)

            reserve = 0.3 * budget if "generate" in steps else 0.0
            limit = deadline - time.perf_counter() - reserve - 5
            step = run_step("capture", command, max(10.0, limit), env, log, part, capture_done)
            failed |= step["status"] != "ok"

        # 3. generate, with what is left
        if "generate" in steps:
            part = workdir / "generate.json"
            part.unlink(missing_ok=True)
            command = [sys.executable, str(HERE / "bench_generate.py"), *common,
                       "--batch-size", str(settings["gen_batch_size"]), "--new-tokens", str(settings["new_tokens"]),
                       "--repeats", str(settings["repeats"]), "--json-out", str(part)]

            def generate_done(record: dict[str, Any]) -> None:
                payload["generate"] = summarize_generate(record.get("result"))
                payload["steps"]["generate"] = record
                write_json(out, payload)

            limit = deadline - time.perf_counter() - 5
            step = run_step("generate", command, max(10.0, limit), env, log, part, generate_done)
            failed |= step["status"] != "ok"
        payload["status"] = "failed" if failed else "ok"
        if any(s["status"] == "timed_out" for s in payload["steps"].values()):
            payload["status"] = "timed_out"
    except Interrupted as exc:
        payload["status"] = "killed"
        payload["notes"].append(f"stopped by {exc} (the wrapper's time limit?): what was measured is kept")
    except Exception as exc:  # the JSON must still say what happened
        payload["status"] = "failed"
        payload["notes"].append(f"{type(exc).__name__}: {exc}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        applies = payload["size"] == "8b" and str(payload["device"]).startswith("cuda")
        payload["targets"] = targets(payload["capture"], payload["generate"], applies)
        payload["finished_at"] = now_iso()
        payload["wall_seconds"] = time.perf_counter() - started
        write_json(out, payload)
        shutil.rmtree(workdir, ignore_errors=True)
        for line in summary_table(payload):
            log(line)
        log(f"JSON {out}\nlog  {log.path}")
        log.close()
    return 0 if payload["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
