import os

import pandas as pd
import pytest

from dpnle.runs import (
    ArtifactError,
    Run,
    RunNotFoundError,
    atomic_path,
    default_run_name,
    latest_run,
    parquet_metadata,
    read_json,
    read_parquet,
    write_json,
    write_parquet,
)


def test_parquet_roundtrip_keeps_provenance(tmp_path):
    frame = pd.DataFrame({"layer": [1, 2], "score": [0.5, -1.0]})
    path = write_parquet(tmp_path / "a.parquet", frame, metadata={"model": "m", "q": 0.995})
    pd.testing.assert_frame_equal(read_parquet(path), frame)
    assert parquet_metadata(path) == {"model": "m", "q": 0.995}
    assert [p.name for p in tmp_path.iterdir()] == ["a.parquet"]


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_parquet_names_the_file_and_the_fix(tmp_path):
    path = write_parquet(tmp_path / "n.parquet", pd.DataFrame({"a": range(1000)}))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"n\.parquet.*corrupt or truncated.*re-run"):
        read_parquet(path)


def test_corrupt_json(tmp_path):
    (tmp_path / "run.json").write_text('{"a": 1')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_json(tmp_path / "run.json")


def test_run_create_open_and_stage_records(tmp_path):
    run = Run.create_or_open(None, "HuggingFaceTB/SmolLM2-135M-Instruct", root=tmp_path)
    assert run.name == "SmolLM2-135M-Instruct"
    run.record_stage("collect", "openness", "done", site="mlp")
    again = Run.open("SmolLM2-135M-Instruct", root=tmp_path)
    assert again.stage_status("collect", "openness")["site"] == "mlp"
    with pytest.raises(ArtifactError, match="was made with model"):
        Run.create_or_open("SmolLM2-135M-Instruct", "other/model", root=tmp_path)


def test_latest_run_and_missing_run(tmp_path):
    with pytest.raises(RunNotFoundError, match="collect-activations"):
        latest_run(root=tmp_path)
    a = Run.create_or_open("a", "m1", root=tmp_path)
    b = Run.create_or_open("b", "m2", root=tmp_path)
    os.utime(a.manifest_path, (1, 1))
    assert latest_run(root=tmp_path).name == "b"
    assert latest_run("m1", root=tmp_path).name == "a"
    with pytest.raises(RunNotFoundError, match="Known runs: a, b|Known runs: b, a"):
        Run.open("c", root=tmp_path)
    write_json(b.manifest_path, b.manifest())


def test_default_run_name():
    assert default_run_name("meta-llama/Meta-Llama-3-8B-Instruct") == "Meta-Llama-3-8B-Instruct"
    assert default_run_name("/x/y/model.Q4.gguf") == "model.Q4"


def test_run_names_stay_under_the_root(tmp_path):
    from dpnle.runs import InputError

    root = tmp_path / "runs"
    for name in ("../x", "a/b", "..", ".", str(tmp_path / "abs")):
        with pytest.raises(InputError, match="is a path, and no run exists there"):
            Run.create_or_open(name, "m", root=root)
        with pytest.raises(InputError, match="is a path, and no run exists there"):
            Run.open(name, root=root)
    assert not (tmp_path / "x").exists() and not (tmp_path / "abs").exists()
    # An existing run directory may be named by its path, anywhere.
    made = Run.create_or_open("r", "m", root=tmp_path / "other")
    assert Run.open(made.path, root=root).path == made.path
    assert Run.create_or_open(str(made.path), "m", root=root).path == made.path


def test_latest_run_with_an_unreadable_run_json(tmp_path):
    a = Run.create_or_open("a", "m1", root=tmp_path)
    b = Run.create_or_open("b", "m1", root=tmp_path)
    os.utime(a.manifest_path, (1, 1))
    a.manifest_path.write_text("{")
    os.utime(a.manifest_path, (1, 1))
    # Older than the run picked: never read.
    assert latest_run(root=tmp_path).name == "b" and latest_run("m1", root=tmp_path).name == "b"
    b.manifest_path.write_text("null")
    # Newer than every readable run: it may be the most recent, so nothing is picked.
    for model in (None, "m1", "m2"):
        with pytest.raises(ArtifactError, match=r"Cannot tell which run is the most recent.*b/run\.json holds null, "
                                                r"not a run record.*pass --run NAME"):
            latest_run(model, root=tmp_path)


def test_runs_root_that_is_a_file(tmp_path):
    from dpnle.runs import InputError, list_runs

    (tmp_path / "runs").write_text("")
    for call in (lambda: list_runs(tmp_path / "runs"), lambda: Run.create_or_open("r", "m", root=tmp_path / "runs")):
        with pytest.raises(InputError, match="is a file, not a folder"):
            call()


def _record_many(path: str, stage: str, count: int, unlocked: bool) -> None:
    import contextlib

    run = Run(path)
    if unlocked:  # the control: the same writes without the lock
        run._manifest_lock = contextlib.nullcontext  # type: ignore[method-assign]
    for k in range(count):
        run.record_stage(stage, f"concept{k}", "done")


def test_parallel_stages_keep_every_record(tmp_path):
    # Two processes recording stages of one run at once (two presets run side by side): with the
    # lock every record survives. (Without it, read-modify-write races lost records in each of 5
    # tries of this same workload: _record_many(..., unlocked=True).)
    import multiprocessing

    run = Run.create_or_open("par", "m", root=tmp_path)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_record_many, args=(str(run.path), stage, 150, False))
               for stage in ("edit-eval@a", "edit-eval@b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    stages = run.manifest()["stages"]
    assert sum(len(stages.get(stage, {})) for stage in ("edit-eval@a", "edit-eval@b")) == 300
