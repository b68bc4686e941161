import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from helpers import TINY_MODELS, kill_when, save_model, tiny_llama, tiny_pairs

from dpnle import collect as collect_mod
from dpnle.arch import UnsupportedModelError, architecture
from dpnle.collect import (
    Capture,
    capture_dir,
    collect,
    collect_concept,
    load_activations,
    load_stats,
)
from dpnle.models import LoadedModel, model_fingerprint
from dpnle.pairs import render_prompt, to_samples
from dpnle.runs import ArtifactError, Run, parquet_metadata, read_parquet_table

TESTS_DIR = Path(__file__).resolve().parent
# Tiny models run fastest on one thread (and a shared machine makes extra threads spin).
torch.set_num_threads(1)
MESSAGES = [
    "hi",
    "Tell me about your weekend plans, in detail please.",
    "ok?",
    "What is the best way to learn a new language as an adult with little time?",
    "Describe a quiet morning.",
    "Why?",
    "List three things you would bring to a desert island and explain each choice briefly.",
]


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in TINY_MODELS.items()}


def _prompts(tokenizer, messages=MESSAGES):
    return [render_prompt(tokenizer, m) for m in messages]


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def _reference_sites(model, input_ids: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """Each site of ``layer`` over every token of one unpadded sequence, from the MLP's input
    by the MLP equations (and the layer's output for resid): [seq, width] each."""
    sites = architecture(model).layers[layer]
    captured = {}
    handles = [
        sites.mlp.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0])),
        sites.layer.register_forward_hook(
            lambda m, args, out: captured.__setitem__("resid", out[0] if isinstance(out, tuple) else out)
        ),
    ]
    try:
        model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    x, mlp = captured["x"][0], sites.mlp
    if hasattr(mlp, "gate_proj"):
        gate = mlp.act_fn(mlp.gate_proj(x))
        neurons = gate * mlp.up_proj(x)
    else:  # GPT-2: no gate, the neurons are act(c_fc(x))
        gate = None
        neurons = mlp.act(mlp.c_fc(x))
    return {"mlp": neurons, "gate": gate, "resid": captured["resid"][0]}


# ---------------------------------------------------------------------------------------------
# hooks and reductions


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_last_token_sites_equal_the_mlp_equations(models, name):
    model, tokenizer = models[name]
    prompts = _prompts(tokenizer)[:3]
    for site in ("mlp", "gate", "resid"):
        if name == "gpt2" and site == "gate":
            with pytest.raises(UnsupportedModelError, match="no gated MLP"):
                collect(model, tokenizer, prompts, site=site, progress=False)
            continue
        capture = collect(model, tokenizer, prompts, site=site, batch_size=2, progress=False)
        for layer in (0, 3):
            for row, prompt in enumerate(prompts):
                expected = _reference_sites(model, _ids(tokenizer, prompt), layer)[site][-1]
                np.testing.assert_allclose(capture.activations[layer][row], expected.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2"])
def test_batched_equals_unbatched_with_left_padding(models, name):
    model, tokenizer = models[name]
    prompts = _prompts(tokenizer)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == len(lengths)  # mixed lengths, so every batch is padded
    batched = collect(model, tokenizer, prompts, batch_size=3, progress=False)
    for row, prompt in enumerate(prompts):
        alone = collect(model, tokenizer, [prompt], batch_size=1, progress=False)
        for layer in range(4):
            np.testing.assert_allclose(batched.activations[layer][row], alone.activations[layer][0], atol=1e-5)
    # The last-token index: a per-prompt forward without any padding.
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            expected = _reference_sites(model, _ids(tokenizer, prompt), 2)["mlp"][-1]
            np.testing.assert_allclose(batched.activations[2][row], expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_prompt_mean_reduces_over_exactly_the_prompt_tokens(models, name):
    model, tokenizer = models[name]
    prompts = _prompts(tokenizer)[:5]
    site = "gate" if name == "llama" else "mlp"
    capture = collect(model, tokenizer, prompts, site=site, policy="prompt-mean", batch_size=4, progress=False)
    assert (capture.positive_fraction is not None) == (site == "gate")
    for row, prompt in enumerate(prompts):
        values = _reference_sites(model, _ids(tokenizer, prompt), 1)[site]
        np.testing.assert_allclose(capture.activations[1][row], values.mean(0).numpy(), atol=1e-5)
        if capture.positive_fraction is not None:
            expected = (values > 0).float().mean(0).numpy()
            np.testing.assert_allclose(capture.positive_fraction[1][row], expected, atol=1e-6)


def test_response_mean_reduces_over_exactly_the_response_tokens(models):
    model, tokenizer = models["qwen2"]
    prompts = _prompts(tokenizer)[:4]
    responses = ["Sure.", "I would rather not say much about it", "", "no"]
    capture = collect(
        model, tokenizer, prompts, site="gate", policy="response-mean", batch_size=3,
        response_texts=responses, progress=False,
    )
    assert capture.responses == responses
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        full = torch.cat([_ids(tokenizer, prompt), torch.tensor([response_ids])], dim=1)
        values = _reference_sites(model, full, 3)["gate"][-len(response_ids) :]
        np.testing.assert_allclose(capture.activations[3][row], values.mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(capture.positive_fraction[3][row], (values > 0).float().mean(0).numpy(), atol=1e-6)


def test_response_mean_generates_greedy_responses_when_none_are_given(models):
    model, tokenizer = models["llama"]
    prompts = _prompts(tokenizer)[:2]
    capture = collect(model, tokenizer, prompts, policy="response-mean", progress=False)
    assert capture.responses is not None and len(capture.responses) == 2
    assert capture.num_tokens > sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)


def test_capture_skips_work_after_the_last_layer_and_removes_its_hooks(models):
    model, tokenizer = models["llama"]
    calls = {"lm_head": 0, "layer3": 0}
    handles = [
        model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1)),
        model.model.layers[3].register_forward_hook(lambda *a: calls.__setitem__("layer3", calls["layer3"] + 1)),
    ]
    try:
        capture = collect(model, tokenizer, _prompts(tokenizer)[:3], layers=[1, 2], progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"lm_head": 0, "layer3": 0}
    assert sorted(capture.activations) == [1, 2] and capture.layers == [1, 2]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_are_removed_when_the_forward_fails(models):
    model, tokenizer = models["llama"]

    def explode(*args):
        raise KeyboardInterrupt

    handle = model.model.layers[0].register_forward_pre_hook(explode)
    try:
        with pytest.raises(KeyboardInterrupt):
            collect(model, tokenizer, _prompts(tokenizer)[:2], progress=False)
    finally:
        handle.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_hook_that_never_fires_is_an_error(models, monkeypatch):
    model, tokenizer = models["llama"]
    real = collect_mod._SiteRecorder._record

    def skip_layer_two(self, slot, hidden):
        if self.layers[slot] != 2:
            real(self, slot, hidden)

    monkeypatch.setattr(collect_mod._SiteRecorder, "_record", skip_layer_two)
    with pytest.raises(RuntimeError, match=r"layers \[2\] did not fire"):
        collect(model, tokenizer, _prompts(tokenizer)[:2], progress=False)


def test_collect_validates_its_arguments(models):
    model, tokenizer = models["llama"]
    with pytest.raises(ValueError, match="Unknown token policy"):
        collect(model, tokenizer, ["x"], policy="first", progress=False)
    with pytest.raises(ValueError, match="Unknown site"):
        collect(model, tokenizer, ["x"], site="attn", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        collect(model, tokenizer, ["x"], layers=[4], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        collect(model, tokenizer, ["x"], batch_size="big", progress=False)
    assert isinstance(collect(model, tokenizer, ["x"], layers=[-1], progress=False), Capture)


def test_auto_batch_size_is_16_on_cpu_and_halves_until_it_fits_on_cuda(models, monkeypatch):
    model, tokenizer = models["llama"]
    arch = architecture(model)
    encoded = collect_mod._encode(tokenizer, _prompts(tokenizer))
    cpu = torch.device("cpu")
    with collect_mod._SiteRecorder(arch, "mlp", "last", [0, 1, 2]) as recorder:
        assert collect_mod._resolve_batch_size("auto", recorder, model, encoded, 0, cpu) == 16
        assert collect_mod._resolve_batch_size(5, recorder, model, encoded, 0, cpu) == 5
        tried = []

        def fits(probe, model, longest, size, pad_id, device, reserve):
            tried.append((size, len(longest.ids), probe.layers, reserve))
            return size <= 2

        monkeypatch.setattr(collect_mod, "_fits", fits)
        size = collect_mod._probe_batch_size(recorder, model, max(encoded, key=lambda e: len(e.ids)), 7, 0, cpu)
    longest = max(len(e.ids) for e in encoded)
    # From the largest power of two <= the number of prompts, on the longest prompt, through layer 1,
    # holding room for the real buffers (3 layers x batch x 64 neurons).
    assert size == 2
    assert tried == [(4, longest, [1], 3 * 4 * 64), (2, longest, [1], 3 * 2 * 64)]


# ---------------------------------------------------------------------------------------------
# the stage


def _loaded(model, tokenizer, model_id="tiny-llama") -> LoadedModel:
    return LoadedModel(model, tokenizer, model_id, "memory", model_fingerprint(model, tokenizer, model_id))


def _run(tmp_path: Path, name: str = "r") -> Run:
    return Run.create_or_open(name, "tiny-llama", root=tmp_path)


def test_stage_writes_shards_stats_and_manifest(models, tmp_path):
    model, tokenizer = models["llama"]
    run, pairs = _run(tmp_path), tiny_pairs(7)
    summary = collect_concept(run, _loaded(model, tokenizer), "openness", pairs=pairs, batch_size=4,
                              shard_size=4, progress=False)
    directory = capture_dir(run, "openness")
    assert summary.path == directory and summary.num_samples == 14 and summary.resumed_from == 0
    assert sorted(p.name for p in directory.iterdir()) == [
        "manifest.json", "pairs.parquet",
        "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet", "shard-00003.parquet",
        "stats-shard-00000.parquet", "stats-shard-00001.parquet", "stats-shard-00002.parquet",
        "stats-shard-00003.parquet", "stats.parquet", "writer.lock",
    ]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["batch_size"] == 4 and manifest["width"] == 64
    assert manifest["layers"] == [0, 1, 2, 3] and manifest["dtype"] == "float32"
    assert manifest["model"]["fingerprint"]["digest"] and manifest["pairs"]["digest"]
    assert manifest["num_tokens"] == summary.num_tokens > 0
    assert run.stage_status("collect", "openness")["status"] == "done"

    shard = read_parquet_table(directory / "shard-00001.parquet")
    assert shard.schema.field("acts").type == pa.list_(pa.float16(), 64)
    assert shard.column_names == ["sample_id", "pair_id", "pole", "layer", "acts"]
    assert shard.num_rows == 4 * 4  # 4 samples, one row per (sample, layer)
    assert shard.column("layer").to_pylist()[:5] == [0, 1, 2, 3, 0]
    meta = parquet_metadata(directory / "shard-00001.parquet")
    assert meta["shard"] == 1 and meta["key_digest"] == manifest["key_digest"]
    assert meta["sample_ids"] == sorted(set(shard.column("sample_id").to_pylist()))

    # The shards partition the samples by prompt length, longest first, each in sample order.
    samples = to_samples(pairs)
    lengths = {int(i): len(tokenizer(render_prompt(tokenizer, m), add_special_tokens=False)["input_ids"])
               for i, m in zip(samples["sample_id"], samples["message"], strict=True)}
    shard_ids = [parquet_metadata(directory / f"shard-{k:05d}.parquet")["sample_ids"] for k in range(4)]
    assert [len(ids) for ids in shard_ids] == [4, 4, 4, 2]
    assert sorted(i for ids in shard_ids for i in ids) == list(range(14))
    assert all(ids == sorted(ids) for ids in shard_ids)
    for earlier, later in zip(shard_ids, shard_ids[1:], strict=False):
        assert min(lengths[i] for i in earlier) >= max(lengths[i] for i in later)

    stats = read_parquet_table(directory / "stats.parquet")
    assert stats.column_names == ["pole", "layer", "n", "mean", "m2", "pos_frac_sum"]
    assert stats.column("n").to_pylist() == [7] * 8

    table, per_layer = load_activations(run, "openness", layers=[-1, 1])
    assert sorted(per_layer) == [1, 3] and per_layer[3].shape == (14, 64) and per_layer[3].dtype == np.float32
    assert table["sample_id"].tolist() == list(range(14)) and table["pole"].tolist()[:2] == ["high", "low"]


def test_streaming_stats_equal_two_pass_over_the_activations(models, tmp_path):
    model, tokenizer = models["gemma3"]
    run, pairs = _run(tmp_path), tiny_pairs(9, seed=3)
    collect_concept(run, _loaded(model, tokenizer), "openness", pairs=pairs, site="gate", policy="prompt-mean",
                    layers=[1, 3], batch_size=3, shard_size=5, progress=False)
    stats = load_stats(run, "openness", "gate", "prompt-mean")
    samples = to_samples(pairs)
    prompts = [render_prompt(tokenizer, m) for m in samples["message"]]
    capture = collect(model, tokenizer, prompts, site="gate", policy="prompt-mean", layers=[1, 3],
                      batch_size=3, progress=False)
    stored_samples, stored = load_activations(run, "openness", "gate", "prompt-mean")
    assert stored_samples["sample_id"].tolist() == samples["sample_id"].tolist()
    assert stored_samples["pole"].tolist() == samples["pole"].tolist()
    assert stats.layers == [1, 3] and stats.meta["status"] == "done"
    high = (samples["pole"] == "high").to_numpy()
    for row, layer in enumerate(stats.layers):
        float32 = capture.activations[layer].astype(np.float64)
        float16 = stored[layer].astype(np.float64)
        assert stored[layer].dtype == np.float32
        np.testing.assert_allclose(float16, float32, rtol=1e-3, atol=1e-3)  # float16 storage
        for mask, mean, var, n, pos in (
            (high, stats.mean_high, stats.var_high, stats.n_high, stats.pos_frac_high),
            (~high, stats.mean_low, stats.var_low, stats.n_low, stats.pos_frac_low),
        ):
            assert n[row] == mask.sum() == 9
            np.testing.assert_allclose(mean[row], float32[mask].mean(0), atol=1e-6)
            np.testing.assert_allclose(var[row], float32[mask].var(0, ddof=1), atol=1e-6)
            np.testing.assert_allclose(mean[row], float16[mask].mean(0), atol=2e-3)
            np.testing.assert_allclose(var[row], float16[mask].var(0, ddof=1), rtol=1e-2, atol=1e-3)
            np.testing.assert_allclose(pos[row], capture.positive_fraction[layer][mask].mean(0), atol=1e-6)


def test_resume_skips_complete_shards_and_gives_identical_stats(models, tmp_path):
    model, tokenizer = models["llama"]
    loaded, pairs = _loaded(model, tokenizer), tiny_pairs(6)
    clean = _run(tmp_path, "clean")
    collect_concept(clean, loaded, "openness", pairs=pairs, batch_size=2, shard_size=4, progress=False)

    resumed = _run(tmp_path, "resumed")
    collect_concept(resumed, loaded, "openness", pairs=pairs, batch_size=2, shard_size=4, progress=False)
    directory = capture_dir(resumed, "openness")
    # What a kill leaves: the last shard gone, the stats not merged, a temp file, status running.
    for name in ("shard-00002.parquet", "stats-shard-00002.parquet", "stats.parquet"):
        (directory / name).unlink()
    (directory / ".shard-00002.parquet.abc123.tmp").write_bytes(b"partial")
    summary = collect_concept(resumed, loaded, "openness", pairs=pairs, batch_size=2, shard_size=4, progress=False)
    assert summary.resumed_from == 8 and summary.num_samples == 12
    assert not list(directory.glob("*.tmp"))
    a = read_parquet_table(capture_dir(clean, "openness") / "stats.parquet")
    b = read_parquet_table(directory / "stats.parquet")
    assert a.drop_columns([]).equals(b)
    assert summary.num_tokens == json.loads((capture_dir(clean, "openness") / "manifest.json").read_text())["num_tokens"]


def _drop_last_shard(directory: Path, shard: int) -> None:
    """What a kill leaves: one shard and the merged statistics gone."""
    for name in (f"shard-{shard:05d}.parquet", f"stats-shard-{shard:05d}.parquet", "stats.parquet"):
        (directory / name).unlink()


def test_a_resume_with_another_batch_size_is_refused(models, tmp_path):
    model, tokenizer = models["llama"]
    loaded, pairs = _loaded(model, tokenizer), tiny_pairs(6)
    clean = _run(tmp_path, "clean")
    collect_concept(clean, loaded, "openness", pairs=pairs, batch_size=2, shard_size=4, progress=False)
    resumed = _run(tmp_path, "resumed")
    collect_concept(resumed, loaded, "openness", pairs=pairs, batch_size=2, shard_size=4, progress=False)
    directory = capture_dir(resumed, "openness")
    assert parquet_metadata(directory / "shard-00000.parquet")["batch_size"] == 2
    _drop_last_shard(directory, 2)
    before = sorted(p.name for p in directory.iterdir())
    with pytest.raises(ArtifactError, match=r"begun with batch size 2 .*not 3.*pass --batch-size 2 .*--overwrite"):
        collect_concept(resumed, loaded, "openness", pairs=pairs, batch_size=3, shard_size=4, progress=False)
    assert sorted(p.name for p in directory.iterdir()) == before
    # auto reuses the recorded size, so the statistics are an uninterrupted run's.
    summary = collect_concept(resumed, loaded, "openness", pairs=pairs, batch_size="auto", shard_size=4,
                              progress=False)
    assert summary.resumed_from == 8
    assert json.loads((directory / "manifest.json").read_text())["batch_size"] == 2
    assert parquet_metadata(directory / "shard-00002.parquet")["batch_size"] == 2
    clean_stats = read_parquet_table(capture_dir(clean, "openness") / "stats.parquet")
    assert read_parquet_table(directory / "stats.parquet").equals(clean_stats)


def test_auto_batch_size_is_recorded_and_reused_on_resume(models, tmp_path, monkeypatch):
    model, tokenizer = models["llama"]
    loaded, pairs = _loaded(model, tokenizer), tiny_pairs(6)
    monkeypatch.setattr(collect_mod, "CPU_BATCH_SIZE", 3)  # what "auto" picks on this machine
    run = _run(tmp_path)
    collect_concept(run, loaded, "openness", pairs=pairs, batch_size="auto", shard_size=4, progress=False)
    directory = capture_dir(run, "openness")
    assert json.loads((directory / "manifest.json").read_text())["batch_size"] == 3
    first = read_parquet_table(directory / "stats.parquet")
    _drop_last_shard(directory, 1)
    monkeypatch.setattr(collect_mod, "CPU_BATCH_SIZE", 16)  # another machine would pick another size
    collect_concept(run, loaded, "openness", pairs=pairs, batch_size="auto", shard_size=4, progress=False)
    assert parquet_metadata(directory / "shard-00001.parquet")["batch_size"] == 3
    assert json.loads((directory / "manifest.json").read_text())["batch_size"] == 3
    assert read_parquet_table(directory / "stats.parquet").equals(first)


def test_a_held_writer_lock_refuses_before_anything_changes(models, tmp_path):
    import fcntl

    model, tokenizer = models["llama"]
    run, loaded = _run(tmp_path), _loaded(model, tokenizer)
    collect_concept(run, loaded, "openness", pairs=tiny_pairs(3), batch_size=4, shard_size=4, progress=False)
    directory = capture_dir(run, "openness")
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.name != "writer.lock"}
    with open(directory / "writer.lock", "r+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.truncate()
        holder.write(json.dumps({"pid": 4242, "command": "dpnle collect-activations --run r", "since": "now"}))
        holder.flush()
        with pytest.raises(ArtifactError, match=r"being written by another process \(pid 4242: dpnle "
                                                r"collect-activations --run r.*kill 4242"):
            collect_concept(run, loaded, "openness", pairs=tiny_pairs(2), batch_size=4, shard_size=4,
                            overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.name != "writer.lock"} == before
    # Released (as the kernel does when the holder exits): the overwrite goes through.
    summary = collect_concept(run, loaded, "openness", pairs=tiny_pairs(2), batch_size=4, shard_size=4,
                              overwrite=True, progress=False)
    assert summary.num_samples == 4 and (directory / "writer.lock").exists()
    record = json.loads((directory / "writer.lock").read_text())
    assert record["pid"] == os.getpid()


def test_mismatched_capture_is_refused_and_overwrite_starts_over(models, tmp_path):
    model, tokenizer = models["llama"]
    run, loaded = _run(tmp_path), _loaded(model, tokenizer)
    collect_concept(run, loaded, "openness", pairs=tiny_pairs(3), batch_size=4, shard_size=4, progress=False)
    with pytest.raises(ArtifactError, match=r"different pair set .*--overwrite"):
        collect_concept(run, loaded, "openness", pairs=tiny_pairs(3, seed=1), shard_size=4, progress=False)
    other_model, other_tokenizer = tiny_llama(seed=1)
    with pytest.raises(ArtifactError, match=r"different model \(model: tiny-llama \(fingerprint \w+\) there"):
        collect_concept(run, _loaded(other_model, other_tokenizer), "openness", pairs=tiny_pairs(3),
                        shard_size=4, progress=False)
    with pytest.raises(ArtifactError, match=r"different layer list.*\[0, 1, 2, 3\] there, \[2\] now"):
        collect_concept(run, loaded, "openness", pairs=tiny_pairs(3), layers=[2], shard_size=4, progress=False)
    # Another site or policy is another capture, not a conflict.
    collect_concept(run, loaded, "openness", pairs=tiny_pairs(3), site="resid", shard_size=4, progress=False)

    summary = collect_concept(run, loaded, "openness", pairs=tiny_pairs(3, seed=1), layers=[2], shard_size=4,
                              overwrite=True, progress=False)
    assert summary.resumed_from == 0
    stats = load_stats(run, "openness")
    assert stats.layers == [2] and stats.meta["pairs"]["digest"] != ""
    stored = pd.read_parquet(capture_dir(run, "openness") / "pairs.parquet")
    assert stored["question"].tolist() == tiny_pairs(3, seed=1)["question"].tolist()


def test_missing_artifacts_say_which_command_to_run(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(ArtifactError, match=r"dpnle collect-activations --run r --trait openness --site mlp"):
        load_stats(run, "openness")
    with pytest.raises(ArtifactError, match=r"--value power --site gate --policy response-mean"):
        load_activations(run, "power", site="gate", policy="response-mean")


def test_response_mean_stage_stores_responses_and_positive_fractions(models, tmp_path):
    model, tokenizer = models["qwen2"]
    run = _run(tmp_path)
    collect_concept(run, _loaded(model, tokenizer), "openness", pairs=tiny_pairs(2), site="gate",
                    policy="response-mean", max_new_tokens=4, batch_size=4, shard_size=4, progress=False)
    directory = capture_dir(run, "openness", "gate", "response-mean")
    shard = read_parquet_table(directory / "shard-00000.parquet")
    assert {"pos_frac", "response"} <= set(shard.column_names)
    stats = load_stats(run, "openness", "gate", "response-mean")
    assert stats.pos_frac_high.shape == (4, 64) and ((stats.pos_frac_high >= 0) & (stats.pos_frac_high <= 1)).all()


# ---------------------------------------------------------------------------------------------
# kill -9


_VICTIM = textwrap.dedent(
    """
    import sys, time
    import torch
    sys.path.insert(0, {tests!r})
    from helpers import tiny_pairs
    from dpnle.collect import collect_concept
    from dpnle.models import load_model
    from dpnle.runs import Run

    torch.set_num_threads(1)
    loaded = load_model({model!r}, device="cpu")
    # Slow it down, so the kill lands mid-run.
    loaded.model.model.layers[0].register_forward_pre_hook(lambda *args: time.sleep({sleep}))
    run = Run.create_or_open({name!r}, loaded.model_id, root=__import__("pathlib").Path({root!r}))
    collect_concept(run, loaded, "openness", pairs=tiny_pairs({num_pairs}), batch_size={batch},
                    shard_size={shard}, progress=False)
    """
)


def _spawn_capture(tmp_path: Path, model_dir: Path, name: str, num_pairs: int, batch: int, shard: int,
                   sleep: float) -> subprocess.Popen:
    code = _VICTIM.format(tests=str(TESTS_DIR), model=str(model_dir), root=str(tmp_path), num_pairs=num_pairs,
                          name=name, batch=batch, shard=shard, sleep=sleep)
    env = {**os.environ, "DPNLE_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_killed_capture_resumes_to_the_same_statistics(tmp_path):
    from dpnle.models import load_model

    model_dir = save_model(tmp_path / "model")
    num_pairs = 8
    victim = _spawn_capture(tmp_path, model_dir, "killed", num_pairs, batch=2, shard=2, sleep=0.3)
    directory = tmp_path / "killed" / "activations" / "openness" / "mlp-last"
    kill_when(victim, lambda: (directory / "shard-00000.parquet").exists(), timeout=120)
    assert not (directory / "stats.parquet").exists(), "killed too late: the capture had finished"
    # The dead writer's lock file stays, its lock went with it: the restart below takes it.
    assert json.loads((directory / "writer.lock").read_text())["pid"] == victim.pid

    # The same model, loaded the same way, in this process (one thread, like the victim).
    loaded = load_model(str(model_dir), device="cpu")
    pairs = tiny_pairs(num_pairs)
    clean_run = Run.create_or_open("clean", loaded.model_id, root=tmp_path)
    clean = collect_concept(clean_run, loaded, "openness", pairs=pairs, batch_size=2, shard_size=2, progress=False)
    restarted = collect_concept(Run.open(tmp_path / "killed"), loaded, "openness", pairs=pairs, batch_size=2,
                                shard_size=2, progress=False)
    assert restarted.resumed_from >= 2 and restarted.num_tokens == clean.num_tokens

    clean_dir = capture_dir(clean_run, "openness")
    assert read_parquet_table(directory / "stats.parquet").equals(read_parquet_table(clean_dir / "stats.parquet"))
    for shard in sorted(clean_dir.glob("shard-*.parquet")):
        assert read_parquet_table(directory / shard.name).equals(read_parquet_table(shard))
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    """The issue's repro: a 12-pair capture runs, a 4-pair --overwrite of it starts. The second is
    refused before it changes anything; the first ends as an undisturbed run would."""
    import time

    from dpnle.models import load_model

    model_dir = save_model(tmp_path / "model")
    loaded = load_model(str(model_dir), device="cpu")
    first = _spawn_capture(tmp_path, model_dir, "c", 12, batch=4, shard=4, sleep=0.5)
    directory = tmp_path / "c" / "activations" / "openness" / "mlp-last"
    try:
        deadline = time.monotonic() + 120
        while not (directory / "stats-shard-00000.parquet").exists():
            assert first.poll() is None, f"the first writer ended early: {first.stderr.read()}"
            assert time.monotonic() < deadline, "the first writer never wrote a shard"
            time.sleep(0.005)
        with pytest.raises(ArtifactError) as refused:
            collect_concept(Run.open(tmp_path / "c"), loaded, "openness", pairs=tiny_pairs(4), batch_size=4,
                            shard_size=4, overwrite=True, progress=False)
        assert first.poll() is None, "the first writer had finished: nothing was tested"
        message = str(refused.value)
        assert f"pid {first.pid}: python -c" in message and f"kill {first.pid}" in message, message
        assert first.wait(timeout=120) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    clean_run = Run.create_or_open("clean", loaded.model_id, root=tmp_path)
    collect_concept(clean_run, loaded, "openness", pairs=tiny_pairs(12), batch_size=4, shard_size=4, progress=False)
    clean_dir = capture_dir(clean_run, "openness")
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["pairs"]["num_pairs"] == 12
    assert read_parquet_table(directory / "pairs.parquet").num_rows == 12
    assert read_parquet_table(directory / "stats.parquet").equals(read_parquet_table(clean_dir / "stats.parquet"))
    assert sorted(p.name for p in directory.glob("*shard-*")) == sorted(p.name for p in clean_dir.glob("*shard-*"))
    for shard in clean_dir.glob("*shard-*.parquet"):
        assert read_parquet_table(directory / shard.name).equals(read_parquet_table(shard)), shard.name
    assert Run.open(tmp_path / "c").stage_status("collect", "openness")["status"] == "done"


# ---------------------------------------------------------------------------------------------
# the real model


@pytest.mark.slow
def test_end_to_end_on_the_embedded_model(tmp_path):
    from dpnle.models import ModelLoadError, load_model
    from dpnle.stats import cohens_d

    try:
        loaded = load_model("smollm2-135m-instruct", device="cpu")
    except ModelLoadError as exc:
        pytest.skip(f"embedded model not available: {exc}")
    run = Run.create_or_open("e2e", loaded.model_id, root=tmp_path)
    pairs = tiny_pairs(8)
    summary = collect_concept(run, loaded, "openness", pairs=pairs, layers=list(range(10, 30)), batch_size=8,
                              shard_size=8, progress=False)
    assert summary.num_samples == 16 and summary.num_tokens > 16 * 50
    stats = load_stats(run, "openness")
    assert stats.mean_high.shape == (20, 1536) and (stats.n_high == 8).all()
    d = cohens_d(stats.mean_high, stats.mean_low, stats.var_high, stats.var_low, stats.n_high, stats.n_low)
    assert np.isfinite(d).all() and np.abs(d).max() > 0.5

    samples = to_samples(pairs)
    prompts = [render_prompt(loaded.tokenizer, m) for m in samples["message"][:5]]
    batched = collect(loaded.model, loaded.tokenizer, prompts, layers=[10, 29], batch_size=5, progress=False)
    for row, prompt in enumerate(prompts):
        alone = collect(loaded.model, loaded.tokenizer, [prompt], layers=[10, 29], batch_size=1, progress=False)
        for layer in (10, 29):
            np.testing.assert_allclose(batched.activations[layer][row], alone.activations[layer][0],
                                       atol=1e-4, rtol=1e-4)
    _, stored = load_activations(run, "openness", layers=[29])
    np.testing.assert_allclose(stored[29][:5], batched.activations[29], rtol=2e-3, atol=2e-2)
