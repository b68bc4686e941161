"""Beyond one device: data-parallel capture through accelerate (two gloo processes on the CPU)
and models spread over devices with a device_map (layers offloaded to the CPU and the disk)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import INTERMEDIATE, LAYERS, save_model

from dpnle import distributed
from dpnle.cli import _max_memory
from dpnle.collect import collect
from dpnle.edits import Edit, generate_with_edit
from dpnle.models import load_model
from dpnle.runs import InputError, Run, read_parquet_table

torch.set_num_threads(1)

CAPTURE = ["collect-activations", "--value", "power", "--num-pairs", "10", "--shard-size", "4",
           "--batch-size", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("model"))


def dpnle(args, runs: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "DPNLE_RUNS": str(runs), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "dpnle", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def capture_files(runs: Path, run: str) -> Path:
    return runs / run / "activations" / "power" / "mlp-last"


# ---------------------------------------------------------------------------------------------
# data parallel


def test_two_processes_capture_what_one_does(model_dir, tmp_path):
    runs = tmp_path / "runs"
    one = dpnle([*CAPTURE, "--model", model_dir, "--run", "one"], runs)
    assert one.returncode == 0, one.stderr
    two = dpnle([*CAPTURE, "--model", model_dir, "--run", "two", "--num-processes", "2"], runs)
    assert two.returncode == 0, two.stderr
    assert "processes 2" in two.stdout

    single, parallel = capture_files(runs, "one"), capture_files(runs, "two")
    shards = sorted(p.name for p in single.glob("*shard-*.parquet"))
    assert len(shards) == 2 * 5  # 20 samples in shards of 4: activations and statistics partials
    assert shards == sorted(p.name for p in parallel.glob("*shard-*.parquet"))
    # The main process merges every partial in shard order: the statistics are the same bits.
    assert read_parquet_table(parallel / "stats.parquet").equals(read_parquet_table(single / "stats.parquet"))
    for name in shards:
        assert read_parquet_table(parallel / name).equals(read_parquet_table(single / name)), name
    manifest = Run.open(runs / "two").manifest()
    assert manifest["stages"]["collect"]["power"]["status"] == "done"
    from dpnle.runs import read_json

    assert read_json(parallel / "manifest.json")["num_processes"] == 2

    # Lose two shards and the merged statistics, then resume in two processes: the same again.
    for name in ("shard-00001.parquet", "stats-shard-00003.parquet", "stats.parquet"):
        (parallel / name).unlink()
    again = dpnle([*CAPTURE, "--model", model_dir, "--run", "two", "--num-processes", "2"], runs)
    assert again.returncode == 0, again.stderr
    assert read_parquet_table(parallel / "stats.parquet").equals(read_parquet_table(single / "stats.parquet"))
    assert Run.open(runs / "two").manifest()["stages"]["collect"]["power"]["resumed_from"] == 12


def test_a_refusal_on_the_main_process_ends_every_process(model_dir, tmp_path):
    runs = tmp_path / "runs"
    first = dpnle([*CAPTURE, "--model", model_dir, "--run", "r"], runs)
    assert first.returncode == 0, first.stderr
    changed = [*CAPTURE, "--model", model_dir, "--run", "r", "--num-processes", "2"]
    changed[changed.index("--num-pairs") + 1] = "6"  # another pair set
    result = dpnle(changed, runs, timeout=180)  # a hang would time out
    assert result.returncode != 0
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "different pair set" in errors[0] and "--overwrite" in errors[0], result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_process_share_and_option_stripping():
    items = list(range(7))
    shares = [distributed.Workers(rank=r, world=3).share(items) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shares, [])) == items
    argv = ["collect-activations", "--num-processes", "2", "--trait", "openness", "--num-processes=4"]
    assert distributed.strip_option(argv, "--num-processes") == ["collect-activations", "--trait", "openness"]
    command, env = distributed.launch_command(2, ["collect-activations"], cpu=True)
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and command[-3:] == ["-m", "dpnle", "collect-activations"]
    assert env[distributed.CPU_ENV] == "1"
    assert not distributed.launched() or os.environ.get("WORLD_SIZE")


# ---------------------------------------------------------------------------------------------
# device_map


@pytest.fixture(scope="module")
def in_memory_and_offloaded(model_dir, tmp_path_factory):
    reference = load_model(str(model_dir), device="cpu")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    for layer in range(LAYERS):
        device_map[f"model.layers.{layer}"] = "cpu" if layer % 2 == 0 else "disk"
    offloaded = load_model(str(model_dir), device_map=device_map,
                           offload_folder=tmp_path_factory.mktemp("offload"))
    return reference, offloaded


def test_offloaded_model_really_is_offloaded_and_keeps_its_fingerprint(in_memory_and_offloaded):
    reference, offloaded = in_memory_and_offloaded
    meta = {name for name, p in offloaded.model.named_parameters() if p.device.type == "meta"}
    assert any(name.startswith("model.layers.1.") for name in meta)  # the disk layers hold no weights
    assert not any(name.startswith("model.layers.0.") for name in meta)
    # The fingerprint reads the offloaded weights, so a capture made either way matches the other.
    assert offloaded.fingerprint["digest"] == reference.fingerprint["digest"]


@pytest.mark.parametrize(("site", "policy"), [("mlp", "last"), ("gate", "prompt-mean"), ("resid", "last")])
def test_offloaded_capture_equals_in_memory(in_memory_and_offloaded, site, policy):
    reference, offloaded = in_memory_and_offloaded
    prompts = ["The quick brown fox jumps over", "Hi", "a b c d e f g h i j"]
    expected = collect(reference.model, reference.tokenizer, prompts, site=site, policy=policy, batch_size=2,
                       progress=False)
    got = collect(offloaded.model, offloaded.tokenizer, prompts, site=site, policy=policy, batch_size=2,
                  progress=False)
    assert expected.activations.keys() == got.activations.keys()
    for layer, acts in expected.activations.items():
        np.testing.assert_allclose(got.activations[layer], acts, rtol=0, atol=1e-6, err_msg=f"layer {layer}")


def _edit(positions: str) -> Edit:
    g = torch.Generator().manual_seed(1)
    vectors = {}
    for layer in (1, 2):  # layer 1 on the disk, layer 2 in memory
        idx = torch.randperm(INTERMEDIATE, generator=g)[:8].sort().values
        vectors[layer] = (idx, torch.randn(8, generator=g) * 4)
    return Edit(method="test", site="mlp", vectors=vectors, positions=positions)


def test_edit_hooks_follow_offloaded_layers(in_memory_and_offloaded):
    reference, offloaded = in_memory_and_offloaded
    tok = reference.tokenizer
    enc = tok(["The quick brown fox", "Hi there"], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = reference.model(**enc).logits
        with _edit("all").apply(reference.model):
            expected = reference.model(**enc).logits
        with _edit("all").apply(offloaded.model) as handle:
            got = offloaded.model(**enc).logits
            handle.assert_fired()
    assert not torch.allclose(plain, expected, atol=1e-3)  # the edit does something
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    kwargs = {"tokenizer": tok, "max_new_tokens": 6, "do_sample": False}
    prompts = ["The quick brown fox", "Hi there"]
    steered = generate_with_edit(reference.model, prompts, _edit("generated"), **kwargs)
    assert torch.equal(generate_with_edit(offloaded.model, prompts, _edit("generated"), **kwargs), steered)


def test_max_memory_parsing():
    assert _max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    assert _max_memory(None) is None
    with pytest.raises(InputError, match="DEVICE=AMOUNT"):
        _max_memory("70GiB")
