"""edit-eval on a tiny random model: conditions, resume, paired effects, summary layout."""

import numpy as np
import pandas as pd
import pytest
from helpers import localized_tiny_run
from scipy import stats as sps

from dpnle import evaluate as ev
from dpnle.localize import localize_concept
from dpnle.runs import parquet_metadata


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


def test_per_method_gammas():
    assert ev.parse_gammas("0.8,1") == {"*": (0.8, 1.0)}
    spec = ev.parse_gammas("dpnle=0.8,dpnle-w=0.8,npti=1.4,random=0.8")
    assert spec == {"dpnle": (0.8,), "dpnle-w": (0.8,), "npti": (1.4,), "random": (0.8,)}
    config = ev.EvalConfig(methods=["dpnle", "dpnle-w", "npti", "random", "none"], directions=["up"], gammas=spec,
                           random_draws=1)
    keys = [c.key for c in ev.conditions(config)]
    assert keys == ["dpnle-up-g0.8", "dpnle-w-up-g0.8", "npti-up-g1.4", "random-up-g0.8-s0", "none"]
    # Unnamed values serve the methods not named; a method named twice gets both values.
    mixed = ev.EvalConfig(methods=["dpnle", "npti"], directions=["up"], gammas=ev.parse_gammas("1,npti=1.4,npti=1"))
    assert [c.key for c in ev.conditions(mixed)] == ["dpnle-up-g1", "npti-up-g1.4", "npti-up-g1"]
    assert mixed.gammas_for("dpnle") == (1.0,) and mixed.gammas_for("npti") == (1.4, 1.0)
    # The same config through its dict (as the suites rebuild one) gives the same conditions.
    again = ev.EvalConfig(**{**config.__dict__})
    assert [c.key for c in ev.conditions(again)] == keys
    with pytest.raises(ev.EvalError, match="No edit strength for npti"):
        ev.EvalConfig(methods=["dpnle", "npti"], gammas=ev.parse_gammas("dpnle=0.8"))
    with pytest.raises(ev.EvalError, match="not among the methods"):
        ev.EvalConfig(methods=["dpnle"], gammas=ev.parse_gammas("1,npti=1.4"))
    with pytest.raises(ev.EvalError, match="takes no edit strength"):
        ev.EvalConfig(methods=["dpnle", "prompt"], gammas=ev.parse_gammas("1,prompt=1"))
    with pytest.raises(ev.EvalError, match="not a number"):
        ev.parse_gammas("dpnle=high")
    with pytest.raises(ev.EvalError, match="finite"):
        ev.EvalConfig(methods=["npti"], gammas=ev.parse_gammas("npti=nan"))


def test_npti_mask_is_a_condition_setting():
    with_npti = ev.EvalConfig(methods=["npti", "none"], npti_mask="none")
    assert with_npti.condition_settings()["npti_mask"] == "none"
    assert ev.EvalConfig(methods=["npti"]).condition_settings()["npti_mask"] == "per-call"  # NPTI as published
    # A run without NPTI keeps the settings (and digests) it had before the option existed.
    assert "npti_mask" not in ev.EvalConfig(methods=["dpnle", "none"]).condition_settings()
    with pytest.raises(ev.EvalError, match="Unknown NPTI mask"):
        ev.EvalConfig(methods=["npti"], npti_mask="sometimes")


def test_open_ended_tokens_is_a_condition_setting_only_where_answers_are_generated():
    default = ev.EvalConfig(methods=["none"], benchmarks=["personalitybench"])
    assert "open_ended_tokens" not in default.condition_settings()  # the reference's 400: digests as before
    short = ev.EvalConfig(methods=["none"], benchmarks=["personalitybench"], open_ended_tokens=64)
    assert short.condition_settings()["open_ended_tokens"] == 64
    # A preset without PersonalityBench (make paper-tables passes the option to every preset)
    # keeps its digests.
    assert "open_ended_tokens" not in ev.EvalConfig(methods=["none"], open_ended_tokens=64).condition_settings()
    with pytest.raises(ev.EvalError, match="new tokens per PersonalityBench answer"):
        ev.EvalConfig(methods=["none"], benchmarks=["personalitybench"], open_ended_tokens=0)


def test_open_ended_answers_stop_at_open_ended_tokens(mirror_available, one_thread):
    from types import SimpleNamespace

    from helpers import tiny_llama

    model, tokenizer = tiny_llama()
    loaded = SimpleNamespace(model=model, tokenizer=tokenizer)
    answers = {}
    for tokens in (3, 6):
        config = ev.EvalConfig(methods=["none"], benchmarks=["personalitybench"], open_ended_limit=2,
                               open_ended_tokens=tokens)
        frame = ev._open_ended(loaded, "openness", None, None, config, "none")
        answers[tokens] = frame.loc[frame["scorer"] == "trait", "output"].tolist()
    assert len(answers[3]) == 2
    for short, longer in zip(answers[3], answers[6], strict=True):
        assert short and longer.startswith(short) and len(longer) > len(short)  # greedy: the same answer, cut later
    # The option is the answers' max_new_tokens (the default: the reference's 400).
    from dpnle import datasets
    from dpnle import judges as jd

    questions = [q.text for q in datasets.load_pb_test("openness")[:2]]
    assert answers[6] == jd.generate_answers(model, tokenizer, questions, max_new_tokens=6, batch_size=16)


def test_paper_table_keeps_each_methods_gamma():
    rows = []
    for method, gamma, neurons in (("none", 0.0, 0), ("dpnle", 0.8, 10), ("npti", 1.4, 50)):
        for direction in (("-",) if method == "none" else ("up", "down")):
            rows.append({"concept": "openness", "method": method, "gamma": gamma, "direction": direction,
                         "benchmark": "gsm8k", "scorer": "accuracy", "target": False, "num_neurons": neurons,
                         "mean": 0.5, "delta": -0.1 if method == "npti" else -0.02, "valid": np.nan})
    table = ev.paper_table(pd.DataFrame(rows), kind="capability")
    assert list(table["method"]) == ["dpnle", "npti", "none"]
    assert list(table["gamma"]) == ["0.8", "1.4", ""]
    assert table.loc[table["method"] == "npti", "gsm8k change"].iloc[0] == "up -0.100 / down -0.100"


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
def tiny_run(tmp_path_factory):
    return localized_tiny_run(tmp_path_factory.mktemp("runs"), "tiny")


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


def test_edit_eval_npti_from_published_lists_with_per_method_gammas(tiny_run, tmp_path):
    import json

    from dpnle.npti_lists import import_npti_lists

    run, loaded = tiny_run
    high = {"1": [[1, 3, 0.4, 0.8, 2.0], [1, 9, 0.2, 0.6, 1.0]], "2": [[2, 5, 0.3, 0.7, 1.5]]}
    low = {"1": [[1, 4, 0.3, 0.7, 1.2]], "2": [[2, 6, 0.5, 0.9, 0.8]]}
    paths = []
    for name, lists in (("Openness_dict.json", high), ("Openness_reversed_dict.json", low)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(lists))
    import_npti_lists(run, "openness", *paths, overwrite=True)
    config = ev.EvalConfig(methods=["dpnle", "npti", "none"], directions=["up"], benchmarks=["neutral"],
                           gammas=ev.parse_gammas("dpnle=0.8,npti=1.4"), batch_size=8)
    first = ev.evaluate_concept(run, loaded, "openness", config, log=lambda m: None)
    assert first.computed == ["dpnle-up-g0.8", "npti-up-g1.4", "none"]
    rows = ev.load_eval(run, "openness")
    npti_kl = rows[(rows["condition"] == "npti-up-g1.4") & (rows["scorer"] == "kl")]["score"].item()
    assert npti_kl > 0.0 and rows[rows["condition"] == "npti-up-g1.4"]["num_neurons"].iloc[0] == 3
    # Another NPTI mask is another setting: the conditions are recomputed, not reused.
    other = ev.evaluate_concept(run, loaded, "openness", ev.EvalConfig(**{**config.__dict__, "npti_mask": "none"}),
                                log=lambda m: None)
    assert "npti-up-g1.4" in other.computed
    assert ev.evaluate_concept(run, loaded, "openness", ev.EvalConfig(**{**config.__dict__, "npti_mask": "none"}),
                               log=lambda m: None).computed == []
    table = ev.paper_table(other.summary)
    assert dict(zip(table["method"], table["gamma"], strict=True)) == {"dpnle": "0.8", "npti": "1.4", "none": ""}


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


def test_unedited_capability_runs_once_per_process_and_serves_prompt_conditions(tiny_run, monkeypatch):
    from dpnle import capability

    run, loaded = tiny_run
    calls: list[object] = []
    real = capability.run_benchmark

    def counting(*args, **kwargs):
        calls.append(kwargs.get("edit"))
        return real(*args, **kwargs)

    monkeypatch.setattr(capability, "run_benchmark", counting)
    monkeypatch.setattr(ev, "_UNEDITED", {})
    config = ev.EvalConfig(methods=["none", "prompt", "dpnle"], benchmarks=["arc"], capability_limit=2, batch_size=8)
    none = ev.evaluate_condition(run, loaded, "openness", ev.Condition("none"), config)
    prompt = ev.evaluate_condition(run, loaded, "extraversion", ev.Condition("prompt", "up"), config)
    assert calls == [None]  # the prompt condition and the second concept reused the first run
    columns = ["benchmark", "item_id", "output", "score"]
    pd.testing.assert_frame_equal(none[columns], prompt[columns])
    edited = ev.evaluate_condition(run, loaded, "openness", ev.Condition("dpnle", "up", 4.0), config)
    assert len(calls) == 2 and calls[1] is not None  # an edit is never served from the cache
    fresh = real(loaded.model, loaded.tokenizer, "arc", limit=2, batch_size=8)
    np.testing.assert_array_equal(none["score"].to_numpy(), fresh["score"].to_numpy())
    assert len(edited) == len(none)


def test_relocalizing_recomputes_only_the_edited_conditions(tiny_run):
    run, loaded = tiny_run
    config = ev.EvalConfig(methods=["dpnle", "none"], directions=["up"], benchmarks=["ipip120"],
                           scorers=["statement"], limit=1, validity_personas=1, batch_size=8)
    ev.evaluate_concept(run, loaded, "openness", config, log=lambda m: None)
    localize_concept(run, "openness", quantile=0.8, d_threshold=0.1, layers="all")
    again = ev.evaluate_concept(run, loaded, "openness", config, log=lambda m: None)
    assert again.computed == ["dpnle-up-g1"] and again.reused == ["none"]
