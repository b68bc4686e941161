"""Evaluation suites: several edit-eval protocols of one run, side by side."""

from __future__ import annotations

import pytest

from dpnle import evaluate as ev
from dpnle.runs import InputError, check_suite
from tests.helpers import localized_tiny_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return localized_tiny_run(tmp_path_factory.mktemp("runs"), "suites")


def test_suite_names_are_checked():
    assert check_suite(None) is None and check_suite("") is None
    assert check_suite("paper-capability") == "paper-capability"
    for bad in ("../eval", "a/b", "-x", "x" * 65):
        with pytest.raises(InputError, match="plain name"):
            check_suite(bad)


def test_suites_keep_their_own_current_conditions(tiny_run):
    run, loaded = tiny_run
    main = ev.EvalConfig(methods=["dpnle", "none"], directions=["up"], benchmarks=["ipip120", "neutral"],
                         scorers=["statement"], limit=2, validity_personas=1, batch_size=8)
    logs: list[str] = []
    ev.evaluate_concept(run, loaded, "openness", main, log=logs.append)
    assert any("validity check" in line for line in logs)

    # Another protocol in a suite: other gamma and positions. The validity check is shared.
    suite = run.with_suite("other")
    other = ev.EvalConfig(**{**main.__dict__, "gammas": (2.0,), "mode": "directional"})
    logs.clear()
    result = ev.evaluate_concept(suite, loaded, "openness", other, log=logs.append)
    assert not any("validity check" in line for line in logs)
    assert result.computed == ["dpnle-up-g2", "none"]
    assert suite.eval_dir == run.path / "suites" / "other" / "eval"
    assert suite.report_dir == run.path / "suites" / "other" / "report"
    assert run.suites() == ["other"]

    # Each view reads its own current conditions; neither made the other's stale.
    assert sorted(ev.load_eval(run)["condition"].unique()) == ["dpnle-up-g1", "none"]
    assert sorted(ev.load_eval(suite)["condition"].unique()) == ["dpnle-up-g2", "none"]
    assert all(f.status == "current" for f in ev.condition_files(run))
    assert all(f.status == "current" for f in ev.condition_files(suite))
    manifest = run.manifest()["stages"]
    assert manifest["edit-eval"]["openness"]["settings"]["mode"] == "both"
    assert manifest["edit-eval@other"]["openness"]["settings"]["mode"] == "directional"

    # A suite never evaluated: an error naming the suite's command.
    with pytest.raises(Exception, match="--suite nothing"):
        ev.load_eval(run.with_suite("nothing"))


def _cli(args: list[str]) -> int:
    from dpnle.cli import main

    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_tables_read_one_suite_and_compare_at_matched_cost(tiny_run, capsys):
    run, _ = tiny_run
    assert _cli(["tables", "--run", str(run.path), "--suite", "other", "--kind", "matched"]) == 0
    out = capsys.readouterr().out
    assert "matched cost" in out and "| openness | ipip120 | statement | up |" in out
    assert _cli(["tables", "--run", str(run.path), "--kind", "personality"]) == 0
    assert "dpnle" in capsys.readouterr().out
    assert _cli(["tables", "--run", str(run.path), "--kind", "nonsense"]) == 2
    assert "--kind 'nonsense'" in capsys.readouterr().err


def test_compare_suites_agrees_on_equal_suites_and_flags_a_changed_score(tiny_run, monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    import pandas as pd

    from dpnle.runs import write_parquet

    run, loaded = tiny_run
    spec = importlib.util.spec_from_file_location(
        "compare_suites", Path(__file__).resolve().parents[1] / "scripts" / "compare_suites.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    config = ev.EvalConfig(methods=["none"], benchmarks=["ipip120"], scorers=["statement"], limit=2,
                           validity_personas=1, batch_size=8)
    for name in ("cmp-a", "cmp-b"):
        ev.evaluate_concept(run.with_suite(name), loaded, "openness", config, log=lambda m: None)
    monkeypatch.setenv("DPNLE_RUNS", str(run.path.parent))

    def verdict(*extra: str) -> tuple[int, str]:
        monkeypatch.setattr("sys.argv", ["compare_suites.py", "--run", run.name, "cmp-a", "cmp-b", *extra])
        code = compare.main()
        return code, capsys.readouterr().out

    code, out = verdict()
    assert code == 0 and "suites agree" in out
    code, out = verdict("--concept", "extraversion")  # a concept neither suite scored
    assert code == 1 and "no rows of extraversion" in out
    path = ev.condition_path(run.with_suite("cmp-b"), "openness", ev.Condition("none"))
    frame = pd.read_parquet(path)
    frame.loc[frame.index[0], "score"] += 1.0
    write_parquet(path, frame, metadata=ev.parquet_metadata(path))
    code, out = verdict()
    assert code == 1 and "DIFFERS openness none ipip120" in out and "suites DIFFER" in out
