"""benchmarks/gpu_check.sh end to end on the CPU with a toy Llama (the GPU run's code path at
toy size), its failure reporting, and the pieces that only matter on a GPU (peak table, targets)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _load_driver():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_driver()


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture
def saved_tokenizer(tmp_path):
    # Byte-level, no download: the run reads it like the device reads .gpu_check/tokenizer.
    folder = tmp_path / "tokenizer"
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)  # conftest's DPNLE_CACHE, DPNLE_DATA_MIRROR and HF_HUB_OFFLINE included
    env.update(PYTHON=sys.executable, SIZE="tiny", DEVICE="cpu", GPU_CHECK_WHEELS="0", TIMEOUT_S="120",
               GPU_CHECK_JSON=str(tmp_path / "out" / "gpu_check.json"))
    return env


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path, saved_tokenizer, mirror_available):
    proc = subprocess.run(["bash", str(SCRIPT), "--tokenizer", str(saved_tokenizer), "--threads", "1"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out" / "gpu_check.json"
    log = tmp_path / "out" / "gpu_check.log"
    payload = json.loads(out.read_text())
    assert log.exists() and "dpnle GPU check: ok" in log.read_text()
    assert "== versions" in log.read_text() and "torch" in log.read_text()
    assert payload["schema"] == gpu_check.SCHEMA
    assert payload["status"] == "ok" and (payload["size"], payload["device"]) == ("tiny", "cpu")
    assert {name: step["status"] for name, step in payload["steps"].items()} == {
        "env": "ok", "capture": "ok", "generate": "ok"}
    env = payload["environment"]
    assert env["device"] == "cpu" and env["peak_bf16_dense_flops"] is None and env["versions"]["torch"]

    capture = payload["capture"]
    assert capture["complete"] and capture["dtype"] == "float32"
    for key in ("prompts", "tokens", "tokens_per_prompt", "layer_params", "batch_size", "seconds_10k_prompts",
                "seconds_1p76m_tokens", "dpnle_over_bare", "dpnle_over_reference"):
        assert _positive(capture[key]), (key, capture[key])
    assert capture["prompts"] == 16  # openness, 8 pairs, both sides
    for name in ("dpnle", "bare", "reference"):
        for key in ("seconds", "tokens", "tokens_per_s", "tflops", "peak_memory_gib", "batch_size"):
            assert _positive(capture[name][key]), (name, key, capture[name][key])
        assert capture[name]["mfu"] is None and capture[name]["mfu_with_attention"] is None  # no GPU peak
    assert capture["dpnle"]["tokens"] == capture["bare"]["tokens"] == capture["tokens"]

    generate = payload["generate"]
    assert generate["complete"] and generate["baked_equals_hooked"] is True
    for key in ("batch_size", "new_tokens", "prompt_length", "edit_neurons", "repeats_done"):
        assert _positive(generate[key]), (key, generate[key])
    for name in ("none", "hooked_generated", "hooked_all", "baked"):
        for key in ("seconds", "new_tokens_per_s", "vs_none"):
            assert _positive(generate[name][key]), (name, key, generate[name][key])
    assert generate["none"]["vs_none"] == 1.0

    assert len(payload["targets"]) == 6
    assert all(t["applies"] is False and t["pass"] is None for t in payload["targets"])
    assert "2 * layer_params * tokens" in payload["flops_formula"]


def test_a_failing_step_exits_nonzero_and_keeps_the_json(tmp_path, saved_tokenizer):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--size", "tiny",
         "--out", str(out), "--steps", "capture", "--traits", "no-such-trait", "--tokenizer", str(saved_tokenizer)],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["status"] == "failed"
    assert payload["steps"]["env"]["status"] == "ok"
    assert payload["steps"]["capture"]["status"] == "failed"
    assert any("no-such-trait" in line for line in payload["steps"]["capture"]["output_tail"])
    assert (tmp_path / "check.log").exists()


def test_peak_table_matches_the_device_names():
    assert gpu_check.peak_for("NVIDIA H200")[0] == 989.4e12
    assert gpu_check.peak_for("NVIDIA H100 80GB HBM3")[0] == 989.4e12
    assert gpu_check.peak_for("NVIDIA H100 PCIe")[0] == 756.5e12
    assert gpu_check.peak_for("NVIDIA H200 NVL")[0] == 835.5e12
    assert gpu_check.peak_for("NVIDIA GeForce RTX 4090") == (None, None)
    assert gpu_check.peak_for(None) == (None, None)


def test_summary_mfu_extrapolation_and_targets_at_8b():
    layer_params = 32 * 218_112_000
    tokens = 1_760_000
    result = {
        "model": "random-init Llama-3-8B-Instruct config (bfloat16)", "dtype": "bfloat16", "traits": ["openness"],
        "num_pairs": 1000, "prompts": 10_000, "tokens": tokens, "sum_sq_tokens": 10_000 * 176**2,
        "num_layers": 32, "hidden_size": 4096, "layer_params": layer_params, "reference_prompts": 2000,
        "reference_tokens": tokens // 5, "reference_sum_sq_tokens": 2000 * 176**2, "complete": True,
        "results": [
            {"name": "dpnle", "seconds": 38.0, "tokens": tokens, "peak_memory_gib": 40.0, "batch_size": 256},
            {"name": "bare", "seconds": 37.0, "tokens": tokens, "peak_memory_gib": 39.0, "batch_size": 256},
            {"name": "reference", "seconds": 20.0, "tokens": tokens // 5, "peak_memory_gib": 20.0, "batch_size": 8},
        ],
    }
    capture = gpu_check.summarize_capture(result, 989.4e12)
    assert capture["dpnle"]["mfu"] == pytest.approx(2 * layer_params * tokens / 38.0 / 989.4e12)
    assert capture["dpnle"]["mfu_with_attention"] > capture["dpnle"]["mfu"]
    assert capture["reference"]["extrapolated"] and capture["reference"]["seconds_all_prompts"] == pytest.approx(100.0)
    assert capture["dpnle_over_reference"] == pytest.approx((tokens / 38.0) / (tokens / 5 / 20.0))
    assert capture["projection_10k"] == "measured" and capture["seconds_10k_prompts"] == pytest.approx(38.0)
    generate = gpu_check.summarize_generate({
        "batch_size": 64, "new_tokens": 128, "complete": True, "baked_equals_hooked": False,
        "all_seconds": {"none": [3.0, 3.1, 2.9], "hooked (generated)": [3.05, 3.1, 3.0],
                        "hooked (all)": [3.02, 3.02, 3.02], "baked": [3.3, 3.3, 3.3]}})
    assert generate["hooked_generated"]["vs_none"] == pytest.approx(3.0 / 3.05)
    verdicts = {t["name"]: t["pass"] for t in gpu_check.targets(capture, generate, applies=True)}
    assert verdicts == {
        "capture_10k_prompts_seconds": True, "capture_mfu": True, "capture_vs_bare": True,
        "generate_hooked_generated_vs_none": True, "generate_hooked_all_vs_none": True,
        "generate_baked_vs_none": False,
    }
    # A partial capture (the run was cut short after dpnle): what exists is summarized.
    partial = dict(result, results=result["results"][:1], prompts=2000, tokens=tokens // 5, complete=False)
    partial["results"] = [dict(result["results"][0], tokens=tokens // 5, seconds=8.0)]
    summary = gpu_check.summarize_capture(partial, 989.4e12)
    assert summary["seconds_10k_prompts"] == pytest.approx(40.0) and "scaled" in summary["projection_10k"]
    assert "dpnle_over_bare" not in summary


@pytest.mark.slow
def test_prepare_writes_what_the_device_needs(tmp_path, mirror_available):
    """--prepare (run here, carried there): the embedded model's tokenizer and the data, offline."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--prepare",
                           str(tmp_path / "assets")], cwd=REPO, env=dict(os.environ), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "assets" / "tokenizer" / "tokenizer.json").exists()
    assert list((tmp_path / "assets" / "datasets").rglob("description.json"))
