"""Tables and reports are built only from current results: condition files from an earlier
localization, from earlier edit-eval options or without provenance are listed as stale and left
out, and a corrupt current file is an error that keeps the previous report."""

from __future__ import annotations

import pandas as pd
import pytest
from test_report import SETTINGS, make_full_run, write_eval, write_neurons

from dpnle import evaluate as ev
from dpnle.evaluate import Condition
from dpnle.report import build_report
from dpnle.runs import ArtifactError, parquet_metadata, read_parquet, write_parquet


@pytest.fixture
def run(tmp_path):
    return make_full_run(tmp_path / "runs")


def _status(run, concept):
    return {f.key: (f.status, f.reason) for f in ev.condition_files(run, concept)}


def test_all_current_after_a_clean_run(run):
    statuses = _status(run, "extraversion")
    assert statuses and {s for s, _ in statuses.values()} == {"current"}


def test_relocalizing_makes_the_edited_conditions_stale(run):
    write_neurons(run, "extraversion", seed=99)  # another selection: a new neurons digest
    statuses = _status(run, "extraversion")
    for key, (status, reason) in statuses.items():
        if key.startswith(("dpnle", "random")):
            assert status == "stale" and "earlier dpnle localization" in reason, key
        else:  # none and prompt read no neurons file
            assert status == "current", key
    rows = ev.load_eval(run, "extraversion")
    assert set(rows["method"]) == {"none", "prompt"}
    # Other concepts are untouched.
    assert {s for s, _ in _status(run, "openness").values()} == {"current"}
    result = build_report(run)
    text = result.report_md.read_text()
    assert "Stale results (left out)" in text and "extraversion/dpnle-up-g1" in text


def test_a_later_call_with_other_conditions_leaves_the_earlier_ones_out(run):
    # As if `edit-eval --methods dpnle --directions up --gammas 1e30` ran after the full run.
    rows = ev.load_eval(run, "openness")
    extra = rows[rows["condition"] == "dpnle-up-g1"].assign(condition="dpnle-up-g1e+30", gamma=1e30)
    none = rows[rows["condition"] == "none"]
    write_eval(run, pd.concat([extra, none], ignore_index=True))
    statuses = _status(run, "openness")
    assert statuses["dpnle-up-g1e+30"][0] == "current" and statuses["none"][0] == "current"
    assert statuses["dpnle-up-g1"] == ("stale", "not among the conditions of the latest edit-eval of openness")
    table = ev.paper_table(ev.summarize(ev.load_eval(run, "openness")))
    # Only the current gamma: the neutral KL cell is that condition's own, not an average.
    dpnle = table[table["method"] == "dpnle"]
    assert list(dpnle["gamma"]) == ["1e+30"]
    kl = extra[(extra["benchmark"] == "neutral") & (extra["scorer"] == "kl")]["score"].item()
    assert dpnle["neutral kl"].item() == f"up {kl:.3f}"


def test_other_settings_or_missing_provenance_are_stale(run):
    folder = run.eval_dir / "neuroticism"
    path = folder / "dpnle-up-g1.parquet"
    frame = read_parquet(path)
    meta = parquet_metadata(path)
    write_parquet(path, frame, metadata={**meta, "settings_digest": ev.condition_digest({"limit": 2}, "x", None)})
    assert _status(run, "neuroticism")["dpnle-up-g1"] == ("stale", "made with other edit-eval settings than the latest")
    write_parquet(path, frame, metadata={"kind": "eval", "concept": "neuroticism"})  # provenance stripped
    status, reason = _status(run, "neuroticism")["dpnle-up-g1"]
    assert status == "stale" and "names none" in reason
    assert "dpnle-up-g1" not in set(ev.load_eval(run, "neuroticism")["condition"])


def test_a_change_without_a_baseline_is_not_shown_as_a_mean(run):
    rows = ev.load_eval(run, "openness")
    # The no-edit condition recomputed on the neutral texts alone: no questionnaire baseline.
    rows = rows[~((rows["condition"] == "none") & (rows["benchmark"] == "ipip120"))]
    table = ev.paper_table(ev.summarize(rows))
    cells = table.loc[table["method"] == "dpnle", [c for c in table.columns if c.startswith("ipip120")]]
    assert (cells == "no baseline").all().all()


def test_a_corrupt_current_condition_keeps_the_previous_report(run):
    first = build_report(run)
    before = first.report_md.read_bytes()
    path = run.eval_dir / "openness" / "random-up-g1-s0.parquet"
    with open(path, "r+b") as handle:
        handle.truncate(3000)
    with pytest.raises(ArtifactError, match="random-up-g1-s0"):
        build_report(run)
    assert first.report_md.read_bytes() == before
    assert not list(run.path.glob(".report-*"))


def test_a_corrupt_stale_condition_is_listed_not_fatal(run):
    path = run.eval_dir / "openness" / "dpnle-up-g9.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not parquet")
    statuses = _status(run, "openness")
    assert statuses["dpnle-up-g9"][0] == "unreadable"
    text = build_report(run).report_md.read_text()
    assert "openness/dpnle-up-g9 (unreadable)" in text


def test_edit_eval_records_its_conditions_and_settings(run):
    entry = run.stage_status("edit-eval", "openness")
    assert entry["settings"] == SETTINGS and "none" in entry["conditions"]
    assert Condition("dpnle", "up", 1.0).key in entry["conditions"]


def test_a_run_without_a_fingerprint_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from dpnle import models
    from dpnle.cli import main
    from dpnle.runs import Run

    monkeypatch.setenv("DPNLE_RUNS", str(tmp_path / "runs"))
    run = Run.create_or_open("nofp", "tiny/model", root=tmp_path / "runs")
    run.update_manifest(model={"id": "tiny/model"})

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    with pytest.raises(SystemExit) as exit_info:
        main(["edit-eval", "--run", "nofp", "--trait", "openness"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "records no fingerprint for model 'tiny/model'" in " ".join(err.split())
