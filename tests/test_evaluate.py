"""edit-eval on a tiny random model: conditions, resume, paired effects, summary layout."""

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_llama, tiny_pairs
from scipy import stats as sps

from dpnle import evaluate as ev
from dpnle.collect import collect_concept
from dpnle.localize import localize_concept
from dpnle.models import LoadedModel, model_fingerprint
from dpnle.runs import Run, parquet_metadata


def test_condition_expansion_and_keys():
    config = ev.EvalConfig(methods=["dpnle", "random", "prompt", "none"], gammas=[0.5, 1.0], random_draws=2)
    keys = [c.key for c in ev.conditions(config)]
    assert keys[:4] == ["dpnle-up-g0.5", "dpnle-up-g1", "dpnle-down-g0.5", "dpnle-down-g1"]
    assert "random-down-g1-s1" in keys and "prompt-up" in keys and keys[-1] == "none"
    assert len(keys) == 4 + 8 + 2 + 1


@pytest.mark.parametrize("bad", [{"methods": ["nope"]}, {"gammas": [float("nan")]}, {"benchmarks": ["mmmu"]},
                                 {"directions": ["sideways"]}, {"scorers": ["vibes"]}])
def test_bad_settings_name_the_choices(bad):
    with pytest.raises(ev.EvalError, match="choose|finite"):
        ev.EvalConfig(**bad)


def test_paired_effect_matches_scipy():
    rng = np.random.default_rng(0)
    base = pd.Series(rng.normal(size=30), index=[f"i{k}" for k in range(30)])
    edited = base + rng.normal(0.3, 0.5, size=30)
    edited = edited.drop("i3")  # unmatched items are left out of the pairing
    got = ev.paired_effect(edited, base)
    diff = (edited - base.drop("i3")).to_numpy()
    test = sps.ttest_rel(edited.to_numpy(), base.drop("i3").to_numpy())
    ci = sps.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=sps.sem(diff))
    assert got["n_items"] == 29
    assert got["delta"] == pytest.approx(diff.mean())
    assert got["p"] == pytest.approx(test.pvalue)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(ci)
    assert got["d_z"] == pytest.approx(diff.mean() / diff.std(ddof=1))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mirror_available_module):
    torch.manual_seed(0)
    model, tokenizer = tiny_llama()
    loaded = LoadedModel(model, tokenizer, "tiny-llama", "memory", model_fingerprint(model, tokenizer, "tiny-llama"))
    run = Run.create_or_open("tiny", "tiny-llama", root=tmp_path_factory.mktemp("runs"))
    run.update_manifest(model={"id": "tiny-llama", "fingerprint": loaded.fingerprint})
    collect_concept(run, loaded, "openness", pairs=tiny_pairs(12), batch_size=8, progress=False)
    localize_concept(run, "openness", quantile=0.9, d_threshold=0.2, layers="all")
    return run, loaded


@pytest.fixture(scope="module")
def mirror_available_module():
    import os

    if not os.environ.get("DPNLE_DATA_MIRROR"):
        pytest.skip("needs the dataset mirror (DPNLE_DATA_MIRROR=../shared/datasets)")


def test_edit_eval_end_to_end_resumes_and_summarizes(tiny_run):
    run, loaded = tiny_run
    config = ev.EvalConfig(methods=["dpnle", "random", "prompt", "none"], directions=["up", "down"],
                           benchmarks=["ipip120", "neutral"], scorers=["statement"], limit=2, random_draws=1,
                           validity_personas=1, batch_size=8)
    logs: list[str] = []
    first = ev.evaluate_concept(run, loaded, "openness", config, log=logs.append)
    assert first.computed == [c.key for c in ev.conditions(config)] and not first.reused
    assert any("validity check" in line for line in logs)
    rows = ev.load_eval(run, "openness")
    # Every condition scores every trait (leakage needs the off-target dimensions).
    questionnaire = rows[rows["benchmark"] == "ipip120"]
    assert set(questionnaire["dimension"]) == {"openness", "conscientiousness", "extraversion", "agreeableness",
                                               "neuroticism"}
    assert questionnaire.groupby("condition").size().eq(10).all()
    none_kl = rows[(rows["condition"] == "none") & (rows["scorer"] == "kl")]["score"].item()
    edit_kl = rows[(rows["condition"] == "dpnle-up-g1") & (rows["scorer"] == "kl")]["score"].item()
    assert none_kl == 0.0 and edit_kl > 0.0
    assert rows[rows["condition"] == "dpnle-up-g1"]["num_neurons"].iloc[0] > 0

    # The summary's change equals the item-wise mean difference against no edit, computed here.
    summary = first.summary
    target = summary[(summary["condition"] == "dpnle-up-g1") & summary["target"]]
    edited = questionnaire[(questionnaire["condition"] == "dpnle-up-g1") & (questionnaire["dimension"] == "openness")]
    base = questionnaire[(questionnaire["condition"] == "none") & (questionnaire["dimension"] == "openness")]
    expected = edited.set_index("item_id")["score"] - base.set_index("item_id")["score"]
    assert target["delta"].item() == pytest.approx(expected.mean())
    assert target["valid"].item() in (0.0, 1.0)

    # A second run reuses everything; changing a setting recomputes.
    again = ev.evaluate_concept(run, loaded, "openness", config, log=logs.append)
    assert again.computed == [] and len(again.reused) == len(first.computed)
    stamp = parquet_metadata(ev.condition_path(run, "openness", ev.Condition("none")))["settings_digest"]
    changed = ev.EvalConfig(**{**config.__dict__, "limit": 1})
    third = ev.evaluate_concept(run, loaded, "openness", changed, log=logs.append)
    assert len(third.computed) == len(first.computed)
    assert parquet_metadata(ev.condition_path(run, "openness", ev.Condition("none")))["settings_digest"] != stamp

    table = ev.paper_table(third.summary)
    assert list(table["method"]) == ["dpnle", "random", "prompt", "none"]
    assert "| concept | method | neurons |" in ev.to_markdown(table)


def test_unedited_scores_are_computed_once_per_process(tiny_run, monkeypatch):
    from dpnle import instruments

    run, loaded = tiny_run
    calls: list[tuple] = []
    real = instruments.score_items

    def counting(*args, **kwargs):
        calls.append((kwargs.get("persona"), kwargs.get("edit")))
        return real(*args, **kwargs)

    monkeypatch.setattr(instruments, "score_items", counting)
    monkeypatch.setattr(ev, "_UNEDITED", {})
    config = ev.EvalConfig(methods=["none"], benchmarks=["ipip120"], scorers=["statement"], limit=2, batch_size=8)
    first = ev.evaluate_condition(run, loaded, "openness", ev.Condition("none"), config)
    second = ev.evaluate_condition(run, loaded, "extraversion", ev.Condition("none"), config)
    assert len(calls) == 1  # the second concept's no-edit scores came from the first
    columns = [c for c in first.columns if c != "concept"]
    pd.testing.assert_frame_equal(first[columns], second[columns])
    fresh = real(loaded.model, loaded.tokenizer, "ipip120", "statement", batch_size=8, limit=2)
    np.testing.assert_array_equal(first["score"].to_numpy(), fresh["score"].to_numpy())


def test_relocalizing_recomputes_only_the_edited_conditions(tiny_run):
    run, loaded = tiny_run
    config = ev.EvalConfig(methods=["dpnle", "none"], directions=["up"], benchmarks=["ipip120"],
                           scorers=["statement"], limit=1, validity_personas=1, batch_size=8)
    ev.evaluate_concept(run, loaded, "openness", config, log=lambda m: None)
    localize_concept(run, "openness", quantile=0.8, d_threshold=0.1, layers="all")
    again = ev.evaluate_concept(run, loaded, "openness", config, log=lambda m: None)
    assert again.computed == ["dpnle-up-g1"] and again.reused == ["none"]
