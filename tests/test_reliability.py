"""Damaged, mismatched and half-written artifacts.

- Corrupt or truncated Parquet, a capture from another model, a neurons file from another run or
  from another pair set, a changed pair set: refused with an error that names the file and the fix.
- kill -9 at a seeded random point of localize and of edit-eval, then a re-run: the artifacts equal
  an uninterrupted run's, and no half-written file is ever where a later stage reads.
  (collect-activations has its own kill test in test_collect.py.)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import kill_when, save_model, tiny_llama, tiny_pairs

from dpnle import evaluate as ev
from dpnle import localize as loc
from dpnle.cli import main
from dpnle.collect import capture_dir, collect_concept, load_stats
from dpnle.edits import build_edit
from dpnle.models import LoadedModel, load_model, model_fingerprint
from dpnle.runs import ArtifactError, Run, parquet_metadata, read_json, read_parquet, write_parquet

TESTS_DIR = Path(__file__).resolve().parent
torch.set_num_threads(1)
CONCEPTS = ("openness", "extraversion", "neuroticism")
LOCALIZE = {"quantile": 0.9, "d_threshold": 0.2, "layers": "all"}


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    text = out.out + out.err
    assert exit_info.value.code == 2 and "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, text
    return lines[0]


def _loaded(seed: int = 0) -> LoadedModel:
    model, tokenizer = tiny_llama(seed=seed)
    return LoadedModel(model, tokenizer, "tiny-llama", "memory", model_fingerprint(model, tokenizer, "tiny-llama"))


def _new_run(root: Path, name: str, loaded) -> Run:
    run = Run.create_or_open(name, loaded.model_id, root=root)
    run.record_model(loaded)
    return run


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """Two runs, each of another (tiny) model, with three captured and localized concepts."""
    root = tmp_path_factory.mktemp("templates")
    made = {}
    for name, seed in (("a", 0), ("b", 1)):
        loaded = _loaded(seed)
        run = _new_run(root, name, loaded)
        for i, concept in enumerate(CONCEPTS):
            collect_concept(run, loaded, concept, pairs=tiny_pairs(6, seed=i, concept=concept), batch_size=6,
                            progress=False)
        loc.localize_all(run, **LOCALIZE)
        made[name] = run.path
    return made


@pytest.fixture
def runs(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("DPNLE_RUNS", str(root))
    return root


def copy_run(templates, runs, name="a") -> Run:
    shutil.copytree(templates[name], runs / name)
    return Run(runs / name)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_a_byte_in_the_middle(path: Path) -> None:
    """Damage the data of the largest column chunk, leaving the footer (and so the schema)
    readable: a reader without page checksums would return wrong numbers without a word."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    chunk = max((meta.row_group(0).column(i) for i in range(meta.num_columns)),
                key=lambda c: c.total_compressed_size)
    data = bytearray(path.read_bytes())
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data[start + 2 * chunk.total_compressed_size // 3] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# corrupt Parquet


@pytest.mark.parametrize("damage", [truncate, flip_a_byte_in_the_middle, lambda p: p.write_bytes(b"")])
def test_corrupt_neurons_file_is_refused_by_export_and_edit_eval(capsys, runs, templates, damage):
    run = copy_run(templates, runs)
    path = run.neurons_path("openness")
    damage(path)
    fix = "dpnle localize --run a --trait openness"
    line = run_cli(["export", runs / "out", "--trait", "openness", "--run", "a"], capsys)
    assert str(path) in line and "corrupt or truncated" in line and fix in line
    assert not (runs / "out").exists()
    with pytest.raises(ArtifactError, match=fix):
        build_edit(run, "openness", "random", direction="down")
    # edit-eval refuses before its validity checks (minutes on a real model).
    config = ev.EvalConfig(methods=["dpnle", "none"], benchmarks=["ipip120"], scorers=["statement"], limit=1)
    with pytest.raises(ArtifactError, match=fix):
        ev.evaluate_concept(run, _loaded(0), "openness", config, log=lambda m: None)
    assert not run.eval_dir.exists()


def test_a_file_that_is_not_a_neurons_file_is_refused(runs, templates):
    run = copy_run(templates, runs)
    write_parquet(run.neurons_path("openness"), pd.DataFrame({"x": [1, 2]}))
    with pytest.raises(ArtifactError, match=r"openness.parquet is not a dpnle neurons file .*'selected'.*localize"):
        build_edit(run, "openness", "dpnle")


@pytest.mark.parametrize("damage", [truncate, flip_a_byte_in_the_middle])
def test_corrupt_statistics_are_refused_by_localize(capsys, runs, templates, damage):
    run = copy_run(templates, runs)
    path = capture_dir(run, "openness") / "stats.parquet"
    damage(path)
    line = run_cli(["localize", "--run", "a", "--trait", "openness", "--layers", "all"], capsys)
    assert str(path) in line and "corrupt or truncated" in line
    assert "dpnle collect-activations --run a --trait openness --site mlp --policy last" in line


def test_statistics_rebuild_from_the_shards_as_the_error_says(runs, templates):
    run = copy_run(templates, runs)
    path = capture_dir(run, "openness") / "stats.parquet"
    before = read_parquet(path)
    truncate(path)
    with pytest.raises(ArtifactError, match="Delete it"):
        load_stats(run, "openness")
    path.unlink()
    loaded = _loaded(0)
    summary = collect_concept(run, loaded, "openness", pairs=tiny_pairs(6, seed=0, concept="openness"),
                              batch_size=6, progress=False)
    assert summary.resumed_from == summary.num_samples
    pd.testing.assert_frame_equal(read_parquet(path), before)


@pytest.mark.parametrize("name", ["shard-00001.parquet", "stats-shard-00001.parquet"])
@pytest.mark.parametrize("damage", [flip_a_byte_in_the_middle, truncate])
def test_a_damaged_shard_is_captured_again_on_resume(tmp_path, name, damage):
    """A shard whose footer reads but a data page does not (or is cut short) is not kept as
    complete: a re-run says so on one line and captures it again, to an undisturbed run's bits."""
    loaded = _loaded(0)
    options = {"pairs": tiny_pairs(6), "batch_size": 2, "shard_size": 4, "progress": False}
    run = _new_run(tmp_path, "r", loaded)
    collect_concept(run, loaded, "openness", **options)
    directory = capture_dir(run, "openness")
    clean = shutil.copytree(directory, tmp_path / "clean")
    damage(directory / name)
    if damage is flip_a_byte_in_the_middle:
        assert parquet_metadata(directory / name)["shard"] == 1  # the footer still reads
    lines = []
    summary = collect_concept(run, loaded, "openness", log=lines.append, **options)
    assert len(lines) == 1 and str(directory / name) in lines[0] and "capturing shard 1 again" in lines[0], lines
    assert summary.resumed_from == summary.num_samples - 4
    for path in sorted(clean.glob("*.parquet")):
        _frames_equal(directory / path.name, path, ignore=())
    # Undamaged now: the next run keeps every shard and says nothing.
    lines.clear()
    assert collect_concept(run, loaded, "openness", log=lines.append, **options).resumed_from == 12
    assert lines == []


def test_a_parquet_file_of_another_kind_as_statistics_is_refused(runs, templates):
    run = copy_run(templates, runs)
    path = capture_dir(run, "openness") / "stats.parquet"
    shutil.copy(run.neurons_path("openness"), path)
    with pytest.raises(ArtifactError, match=r"stats.parquet does not hold a capture's statistics"):
        load_stats(run, "openness")


def test_corrupt_capture_manifest_is_refused(runs, templates):
    run = copy_run(templates, runs)
    manifest = capture_dir(run, "openness") / "manifest.json"
    truncate(manifest)
    with pytest.raises(ArtifactError, match=r"manifest.json is unreadable.*--overwrite"):
        loc.localize_concept(run, "openness", **LOCALIZE)


# ---------------------------------------------------------------------------------------------
# mismatched artifacts


def test_capture_manifest_from_another_model_is_refused_by_localize(capsys, runs, templates):
    run = copy_run(templates, runs)
    manifest_path = capture_dir(run, "openness") / "manifest.json"
    other = read_json(Run(templates["b"]).manifest_path)["model"]["fingerprint"]
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["fingerprint"] = other
    manifest_path.write_text(json.dumps(manifest))
    before = run.neurons_path("openness").read_bytes()
    line = run_cli(["localize", "--run", "a", "--trait", "openness", "--layers", "all"], capsys)
    ours = run.manifest()["model"]["fingerprint"]["digest"]
    assert str(manifest_path) in line and str(run.manifest_path) in line
    assert f"digest {other['digest']}" in line and f"digest {ours}" in line and "--overwrite" in line
    assert run.neurons_path("openness").read_bytes() == before


def test_neurons_file_from_another_run_is_refused(capsys, runs, templates):
    run = copy_run(templates, runs)
    path = run.neurons_path("openness")
    shutil.copy(Run(templates["b"]).neurons_path("openness"), path)
    other = parquet_metadata(path)["model"]["fingerprint"]["digest"]
    for method in ("dpnle", "dpnle-w", "random"):
        with pytest.raises(ArtifactError, match=rf"{other}.*copied from another run.*dpnle localize --run a"):
            build_edit(run, "openness", method)
    line = run_cli(["export", runs / "out", "--trait", "openness", "--run", "a"], capsys)
    assert str(path) in line and "copied from another run" in line
    assert not (runs / "out").exists()


def test_neurons_file_from_another_pair_set_is_refused(runs, templates):
    run = copy_run(templates, runs)
    # The capture is made again from other pairs (--overwrite), the old neurons file stays.
    collect_concept(run, _loaded(0), "openness", pairs=tiny_pairs(6, seed=9, concept="openness"), batch_size=6,
                    overwrite=True, progress=False)
    with pytest.raises(ArtifactError, match=r"openness.parquet was localized from another pair set.*localize"):
        build_edit(run, "openness", "dpnle")
    loc.localize_concept(run, "openness", **LOCALIZE)
    assert build_edit(run, "openness", "dpnle").num_neurons > 0


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("llama"))


def test_changed_pair_set_against_an_existing_capture(capsys, runs, llama_dir, mirror_available):
    common = ["collect-activations", "--model", llama_dir, "--trait", "openness", "--run", "r", "--num-pairs", "2",
              "--batch-size", "4"]
    try:
        main([str(a) for a in common + ["--seed", "0"]])
    except SystemExit as exc:  # typer's standalone mode exits 0
        assert exc.code in (0, None)
    capsys.readouterr()
    directory = runs / "r" / "activations" / "openness" / "mlp-last"
    stats = (directory / "stats.parquet").read_bytes()
    line = run_cli(common + ["--seed", "1"], capsys)
    assert str(directory) in line and "different pair set" in line and "--overwrite" in line
    assert (directory / "stats.parquet").read_bytes() == stats


# ---------------------------------------------------------------------------------------------
# kill -9


def _spawn(code: str, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "DPNLE_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _assert_nothing_half_written(folder: Path) -> None:
    """Every artifact where a later stage reads is whole; temporary files may exist (never read)."""
    for path in folder.rglob("*.parquet"):
        read_parquet(path)
    for path in folder.rglob("*.json"):
        read_json(path)


def _frames_equal(a: Path, b: Path, ignore=("source", "sources", "seconds", "run")) -> None:
    pd.testing.assert_frame_equal(read_parquet(a), read_parquet(b), check_exact=True)
    meta_a, meta_b = parquet_metadata(a), parquet_metadata(b)
    for key in ignore:
        meta_a.pop(key, None)
        meta_b.pop(key, None)
    assert meta_a == meta_b


_LOCALIZE_VICTIM = textwrap.dedent(
    """
    import time
    import pyarrow.parquet as pq
    from dpnle import localize
    from dpnle.runs import Run

    real_write = pq.write_table

    def slow_write(*args, **kwargs):  # the temporary file is complete but not yet in place
        real_write(*args, **kwargs)
        time.sleep(0.4)

    pq.write_table = slow_write
    localize.localize_all(Run.open({run!r}), **{params!r})
    """
)


def test_killed_localize_resumes_to_the_same_artifacts(tmp_path, templates):
    rng = random.Random(7)
    killed = Run(shutil.copytree(templates["a"], tmp_path / "killed"))
    shutil.rmtree(killed.path / "neurons")
    killed.update_manifest(stages={"collect": killed.manifest()["stages"]["collect"]})
    # The kill point: ``after`` neurons files in place, then up to one (slowed) write more.
    after, delay = rng.randint(1, len(CONCEPTS)), rng.uniform(0.0, 0.3)
    victim = _spawn(_LOCALIZE_VICTIM.format(run=str(killed.path), params=LOCALIZE), tmp_path)
    neurons = killed.path / "neurons"
    kill_when(victim, lambda: len([p for p in neurons.glob("*.parquet") if p.stem in CONCEPTS]) >= after,
               delay=delay)
    assert not (neurons / "overlap.parquet").exists(), "killed too late: the stage had finished"
    _assert_nothing_half_written(killed.path)

    results = loc.localize_all(Run.open(killed.path), **LOCALIZE)
    assert [r.concept for r in results] == list(CONCEPTS)
    clean = Run(templates["a"])
    for concept in CONCEPTS:
        _frames_equal(killed.neurons_path(concept), clean.neurons_path(concept))
        assert killed.stage_status("localize", concept)["status"] == "done"
    _frames_equal(loc.overlap_path(killed), loc.overlap_path(clean))
    assert not list(killed.path.rglob("*.tmp")), "a re-run leaves no temporary file"


_EVAL_VICTIM = textwrap.dedent(
    """
    import time
    import pyarrow.parquet as pq
    import torch
    from dpnle import evaluate as ev
    from dpnle.models import load_model
    from dpnle.runs import Run

    torch.set_num_threads(1)
    loaded = load_model({model!r}, device="cpu", dtype="float32")
    # Slow it down, so the kill lands mid-condition or mid-write.
    loaded.model.model.layers[0].register_forward_pre_hook(lambda *args: time.sleep(0.1))
    real_write = pq.write_table

    def slow_write(*args, **kwargs):  # the temporary file is complete but not yet in place
        real_write(*args, **kwargs)
        time.sleep(0.3)

    pq.write_table = slow_write
    ev.evaluate_concept(Run.open({run!r}), loaded, "openness", ev.EvalConfig(**{config!r}), log=lambda m: None)
    """
)
EVAL_CONFIG = {"methods": ["dpnle", "random", "none"], "directions": ["up", "down"], "benchmarks": ["neutral"],
               "random_draws": 1, "batch_size": 16}


def test_killed_edit_eval_resumes_to_the_same_conditions(tmp_path, llama_dir):
    rng = random.Random(11)
    loaded = load_model(str(llama_dir), device="cpu", dtype="float32")
    clean = _new_run(tmp_path, "clean", loaded)
    collect_concept(clean, loaded, "openness", pairs=tiny_pairs(6), batch_size=6, progress=False)
    loc.localize_concept(clean, "openness", **LOCALIZE)
    killed = Run(shutil.copytree(clean.path, tmp_path / "killed"))
    config = ev.EvalConfig(**EVAL_CONFIG)
    keys = [c.key for c in ev.conditions(config)]

    # The kill point: ``after`` condition files in place, then a part of the next condition.
    after, delay = rng.randint(1, len(keys) - 2), rng.uniform(0.0, 0.6)
    victim = _spawn(_EVAL_VICTIM.format(model=str(llama_dir), run=str(killed.path), config=EVAL_CONFIG), tmp_path)
    folder = killed.eval_dir / "openness"
    kill_when(victim, lambda: len([p for p in folder.glob("*.parquet") if p.stem in keys]) >= after,
               delay=delay, timeout=120)
    done = sorted(p.stem for p in folder.glob("*.parquet"))
    assert "summary" not in done, "killed too late: the stage had finished"
    _assert_nothing_half_written(killed.path)

    resumed = ev.evaluate_concept(killed, loaded, "openness", config, log=lambda m: None)
    assert sorted(resumed.reused) == done and len(resumed.computed) == len(keys) - len(done)
    reference = ev.evaluate_concept(clean, loaded, "openness", config, log=lambda m: None)
    assert reference.computed == keys
    for key in keys:
        _frames_equal(folder / f"{key}.parquet", clean.eval_dir / "openness" / f"{key}.parquet")
    pd.testing.assert_frame_equal(read_parquet(folder / "summary.parquet"),
                                  read_parquet(clean.eval_dir / "openness" / "summary.parquet"), check_exact=True)
    assert not list(killed.path.rglob("*.tmp")), "a re-run leaves no temporary file"
