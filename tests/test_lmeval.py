"""lm-evaluation-harness tasks under an edit (dpnle.lmeval): local task YAMLs and data
(tests/data/lmeval/) on the tiny Llama, each number against an independent computation.

- multiple choice: each choice's log-likelihood equals a hand-written forward of one unpadded row
  that sums the continuation's log-probabilities, unedited and under an edit applied by a
  hand-written hook on down_proj's input (not dpnle's hooks), at positions all, prompt and
  generated; accuracy is the argmax of those sums; the edited run differs from the unedited one;
- generation: each output equals a hand-written greedy loop (no cache, no padding) cut at the
  task's stop sequence, unedited and under the edit;
- refused before running: a stochastic edit, a position-restricted edit on a rolling task, a task
  without a per-item metric; an edit that changed nothing is an error;
- without lm-eval installed: one line naming the install command (runs in every venv; the rest
  skip where lm-eval is absent).
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import INTERMEDIATE, tiny_llama

from dpnle.edits import Edit
from dpnle.errors import DpnleError
from dpnle.lmeval import INCLUDE_ENV, LmevalError, benchmark_name, parse_benchmark

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "data" / "lmeval"
MC_DOCS = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines() if line.strip()]
GEN_DOCS = [json.loads(line) for line in (TASKS / "tiny_gen.jsonl").read_text().splitlines() if line.strip()]
LETTERS = ["A", "B", "C", "D"]

# Eight units on two layers, strong enough to move every log-likelihood of the tiny model.
VECTORS = {1: ([3, 17, 40, 55], [1.5, -2.0, 1.0, 2.5]), 2: ([5, 9, 33, 60], [-1.0, 2.0, 1.5, -2.5])}
GAMMA = 4.0


@pytest.fixture(autouse=True)
def in_repository(monkeypatch):
    # The task YAMLs name their data relative to the working directory, as lm-eval reads it.
    monkeypatch.chdir(REPO)
    monkeypatch.delenv(INCLUDE_ENV, raising=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for the tiny models


@pytest.fixture(scope="module")
def lmeval():
    return pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def make_edit(positions: str, keep: float = 1.0) -> Edit:
    return Edit(method="dpnle", site="mlp", vectors=VECTORS, gamma=GAMMA, sign=1, positions=positions, keep=keep,
                meta={"concept": "test"})


# ---------------------------------------------------------------------------------------------
# the independent computation


@contextmanager
def hand_edit(model, positions: str | None, prompt_length: int):
    """Add GAMMA * delta to down_proj's input at the policy's positions of a one-row forward that
    starts at position 0 (a hook of its own: dpnle's hooks are what is under test)."""
    if positions is None:
        yield
        return
    handles = []
    for layer, (units, deltas) in VECTORS.items():
        add = torch.zeros(INTERMEDIATE)
        add[torch.tensor(units)] = GAMMA * torch.tensor(deltas)

        def pre_hook(module, args, add=add):
            hidden = args[0]
            where = torch.arange(hidden.shape[1])
            keep = {"all": torch.ones_like(where, dtype=torch.bool), "prompt": where < prompt_length,
                    "generated": where >= prompt_length}[positions]
            return (hidden + add.to(hidden.dtype) * keep[:, None].to(hidden.dtype),)

        handles.append(model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(pre_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's documented split: trailing whitespace of the context joins the continuation; the
    continuation's tokens are the joined text's beyond the context's."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = tokenizer(stripped)["input_ids"]
    whole = tokenizer(stripped + continuation)["input_ids"]
    assert whole[: len(ctx)] == ctx
    return ctx, whole[len(ctx):]


@torch.no_grad()
def hand_loglikelihood(model, tokenizer, context: str, continuation: str, positions: str | None) -> float:
    ctx, cont = split(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    with hand_edit(model, positions, len(ctx)):
        logits = model(input_ids=ids).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(sum(logprobs[len(ctx) - 1 + j, token] for j, token in enumerate(cont)))


@torch.no_grad()
def hand_greedy(model, tokenizer, context: str, positions: str | None, max_new: int = 8, stop: str = "\n") -> str:
    ids = list(tokenizer(context)["input_ids"])
    prompt_length = len(ids)
    new: list[int] = []
    for _ in range(max_new):
        with hand_edit(model, positions, prompt_length):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        token = int(torch.argmax(logits))
        if token == tokenizer.eos_token_id:
            break
        ids.append(token)
        new.append(token)
        if stop in tokenizer.decode(new, skip_special_tokens=True):
            break
    return tokenizer.decode(new, skip_special_tokens=True).split(stop)[0]


def mc_context(doc) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def expected_mc(model, tokenizer, task: str, positions: str | None) -> list[list[float]]:
    if task == "dpnle_tiny_letters":
        return [[hand_loglikelihood(model, tokenizer, mc_context(d), c, positions) for c in LETTERS] for d in MC_DOCS]
    return [[hand_loglikelihood(model, tokenizer, mc_context(d), " " + c, positions) for c in d["choices"]]
            for d in MC_DOCS]


# ---------------------------------------------------------------------------------------------
# without lm-eval, and names (every venv)


def test_missing_lmeval_is_one_line_naming_the_install(monkeypatch, tiny):
    from dpnle import lmeval

    for name in ("lm_eval", "lm_eval.evaluator", "lm_eval.models.huggingface", "lm_eval.tasks"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    model, tokenizer = tiny
    for call in (lambda: lmeval.run_lmeval_task(model, tokenizer, "lmeval:dpnle_tiny_mc", include_path=TASKS),
                 lambda: lmeval.check_benchmark("lmeval:dpnle_tiny_mc", include_path=TASKS)):
        with pytest.raises(LmevalError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and isinstance(info.value, DpnleError) and isinstance(info.value, ValueError)
        assert "pip install 'dpnle[lmeval]'" in message and "make setup-lmeval" in message
        assert "lm-evaluation-harness" in message and "not installed" in message


def test_benchmark_names():
    assert parse_benchmark("lmeval:hellaswag") == ("hellaswag", None)
    assert parse_benchmark(" LMEVAL:arc_easy@acc_norm ") == ("arc_easy", "acc_norm")
    assert benchmark_name("arc_easy", "acc_norm") == "lmeval:arc_easy@acc_norm"
    for bad in ("lmeval:", "lmeval:@acc", "lmeval:two words", "hellaswag", "lmeval:a@b@c"):
        with pytest.raises(LmevalError) as info:
            parse_benchmark(bad)
        assert "\n" not in str(info.value) and "lmeval:" in str(info.value)
    for empty in ("lmeval:foo@", "lmeval:foo@ "):  # the empty metric, before any task lookup
        with pytest.raises(LmevalError, match="empty metric after '@'.*lmeval:foo@acc_norm"):
            parse_benchmark(empty)


# ---------------------------------------------------------------------------------------------
# multiple choice against the hand-written forward


@pytest.mark.parametrize("positions", [None, "all", "prompt", "generated"])
def test_multiple_choice_equals_hand_forward(lmeval, tiny, positions):
    from dpnle.capability import ROW_COLUMNS, summarize
    from dpnle.lmeval import run_lmeval_task

    model, tokenizer = tiny
    edit = None if positions is None else make_edit(positions)
    # batch size 3: batches mix items, choice lengths and (under prompt / generated) context lengths
    frame = run_lmeval_task(model, tokenizer, "lmeval:dpnle_tiny_mc", edit=edit, include_path=TASKS, batch_size=3)
    assert list(frame.columns) == ROW_COLUMNS and len(frame) == len(MC_DOCS)
    assert frame["item_id"].tolist() == [str(i) for i in range(len(MC_DOCS))]
    assert (frame["benchmark"] == "lmeval:dpnle_tiny_mc").all() and (frame["metric"] == "acc").all()
    expected = expected_mc(model, tokenizer, "dpnle_tiny_mc", positions)
    for row, doc, want in zip(frame.itertuples(), MC_DOCS, expected, strict=True):
        assert row.prompt == mc_context(doc)
        np.testing.assert_allclose(row.choice_logprobs, want, rtol=0, atol=2e-4)
        pred = int(np.argmax(want))
        assert row.pred_index == pred and row.correct_index == doc["answer"]
        assert row.output == doc["choices"][pred] and row.reference == doc["choices"][doc["answer"]]
        assert row.score == row.acc == float(pred == doc["answer"])
        assert row.acc_norm == float(int(np.argmax([w / len(c) for w, c in zip(want, doc["choices"], strict=True)]))
                                     == doc["answer"])
        assert row.chance == pytest.approx(1 / len(doc["choices"]))
    record = frame.attrs["lmeval"]
    # dpnle's mean of the per-item scores is lm-eval's own task score
    assert record["results"]["dpnle_tiny_mc"]["acc,none"] == pytest.approx(frame["score"].mean())
    summary = summarize(frame)
    assert summary.loc[0, "benchmark"] == "lmeval:dpnle_tiny_mc" and summary.loc[0, "n"] == len(MC_DOCS)
    assert summary.loc[0, "accuracy"] == pytest.approx(frame["score"].mean())
    assert record["lm_eval"] == lmeval.__version__ and record["tasks"]["dpnle_tiny_mc"]["n_docs"] == len(MC_DOCS)
    assert record["tasks"]["dpnle_tiny_mc"]["output_type"] == "multiple_choice"
    if positions is None:
        assert record["edit"] is None and record["edit_positions"]["model_calls"] == 0
        return
    counts = record["edit_positions"]
    assert counts["policy"] == positions and counts["model_calls"] > 0
    covered = ("prompt", "generated") if positions == "all" else (positions,)
    for kind in ("prompt", "generated"):
        if kind in covered:
            assert counts["positions_edited"][kind] == counts["positions_seen"][kind]
        else:
            assert counts["positions_edited"][kind] == 0
    assert sum(counts["positions_edited"].values()) > 0
    # the edit moved the scores: every item's log-likelihoods differ from the unedited ones
    unedited = expected_mc(model, tokenizer, "dpnle_tiny_mc", None)
    for row, base in zip(frame.itertuples(), unedited, strict=True):
        assert np.max(np.abs(np.asarray(row.choice_logprobs) - np.asarray(base))) > 1e-2


@pytest.mark.parametrize("positions", [None, "all", "prompt"])
def test_one_token_choices_share_a_forward_and_equal_hand_forward(lmeval, tiny, positions):
    from dpnle.lmeval import run_lmeval_task
    from dpnle.models import LoadedModel, model_fingerprint

    model, tokenizer = tiny
    loaded = LoadedModel(model, tokenizer, "tiny-llama", "memory", model_fingerprint(model, tokenizer, "tiny-llama"))
    edit = None if positions is None else make_edit(positions)
    frame = run_lmeval_task(loaded, None, "dpnle_tiny_letters", edit=edit, include_path=TASKS, batch_size=2)
    expected = expected_mc(model, tokenizer, "dpnle_tiny_letters", positions)
    for row, want in zip(frame.itertuples(), expected, strict=True):
        np.testing.assert_allclose(row.choice_logprobs, want, rtol=0, atol=2e-4)
        assert row.output == LETTERS[int(np.argmax(want))] and row.chance == 0.25
    if positions is not None:
        # four choices, one forward: lm-eval's logits cache scored each item in one call
        assert frame.attrs["lmeval"]["edit_positions"]["model_calls"] <= len(MC_DOCS)


def test_generated_policy_that_changes_nothing_is_an_error(lmeval, tiny):
    from dpnle.lmeval import run_lmeval_task

    model, tokenizer = tiny
    # one-token choices are scored from the last prompt position, which "generated" leaves alone
    with pytest.raises(RuntimeError, match="changed no position"):
        run_lmeval_task(model, tokenizer, "dpnle_tiny_letters", edit=make_edit("generated"), include_path=TASKS)


# ---------------------------------------------------------------------------------------------
# generation against the hand-written greedy loop


@pytest.mark.parametrize("positions", [None, "all", "prompt", "generated"])
def test_generation_equals_hand_greedy_loop(lmeval, tiny, positions):
    from dpnle.lmeval import run_lmeval_task

    model, tokenizer = tiny
    edit = None if positions is None else make_edit(positions)
    # both prompts in one left-padded batch (they differ in length)
    frame = run_lmeval_task(model, tokenizer, "lmeval:dpnle_tiny_gen", edit=edit, include_path=TASKS, batch_size=2)
    assert len(frame) == len(GEN_DOCS) and (frame["metric"] == "exact_match").all()
    for row, doc in zip(frame.itertuples(), GEN_DOCS, strict=True):
        context = f"Q: {doc['question']}\nA:"
        assert row.prompt == context and row.reference == doc["answer"]
        assert row.output == hand_greedy(model, tokenizer, context, positions)
        assert row.score == row.exact_match == float(row.output == doc["answer"])
    if positions is not None:
        counts = frame.attrs["lmeval"]["edit_positions"]
        if positions != "generated":
            assert counts["positions_edited"]["prompt"] == counts["positions_seen"]["prompt"] > 0
        if positions != "prompt":
            assert counts["positions_edited"]["generated"] == counts["positions_seen"]["generated"] > 0
        # and the edit changed what the model says
        unedited = [hand_greedy(model, tokenizer, f"Q: {d['question']}\nA:", None) for d in GEN_DOCS]
        assert frame["output"].tolist() != unedited


# ---------------------------------------------------------------------------------------------
# refusals, subsets, settings


def test_edits_that_cannot_apply_exactly_are_refused_before_running(lmeval, tiny, monkeypatch):
    from dpnle import lmeval as module

    model, tokenizer = tiny
    ran = []
    monkeypatch.setattr(module, "make_lm", lambda *a, **k: ran.append(1))
    with pytest.raises(LmevalError, match="fresh random keep mask") as info:
        module.run_lmeval_task(model, tokenizer, "dpnle_tiny_mc", edit=make_edit("all", keep=0.9), include_path=TASKS)
    assert "fixed" in str(info.value) and "\n" not in str(info.value)
    for positions in ("prompt", "generated"):
        with pytest.raises(LmevalError, match="rolling window") as info:
            module.run_lmeval_task(model, tokenizer, "dpnle_tiny_rolling", edit=make_edit(positions),
                                   include_path=TASKS)
        assert "positions 'all'" in str(info.value)
    # at positions "all" the edit could run, but perplexities have no per-item value to report
    with pytest.raises(LmevalError, match="aggregated over the whole corpus"):
        module.run_lmeval_task(model, tokenizer, "dpnle_tiny_rolling", edit=make_edit("all"), include_path=TASKS)
    with pytest.raises(LmevalError, match="has no metric 'f1'"):
        module.run_lmeval_task(model, tokenizer, "dpnle_tiny_mc@f1", include_path=TASKS)
    with pytest.raises(LmevalError, match="does not exist"):
        module.run_lmeval_task(model, tokenizer, "dpnle_tiny_mc", include_path=TASKS / "missing")
    assert ran == []
    # edit-eval's check before any model loads: the same refusals, from its settings
    with pytest.raises(LmevalError, match="rolling window"):
        module.check_benchmark("lmeval:dpnle_tiny_rolling", edit_positions="prompt", include_path=TASKS)
    with pytest.raises(LmevalError, match="fresh random keep mask"):
        module.check_benchmark("lmeval:dpnle_tiny_mc", stochastic=True, include_path=TASKS)


def test_limit_picks_dpnles_seeded_subset_and_the_env_var_finds_local_tasks(lmeval, tiny, monkeypatch):
    from dpnle.capability import select_subset
    from dpnle.lmeval import check_benchmark, run_lmeval_task

    model, tokenizer = tiny
    monkeypatch.setenv(INCLUDE_ENV, str(TASKS))
    full = run_lmeval_task(model, tokenizer, "lmeval:dpnle_tiny_mc@acc_norm")
    assert (full["metric"] == "acc_norm").all() and (full["score"] == full["acc_norm"]).all()
    assert (full["benchmark"] == "lmeval:dpnle_tiny_mc@acc_norm").all()
    for seed in (0, 1):
        part = run_lmeval_task(model, tokenizer, "lmeval:dpnle_tiny_mc@acc_norm", limit=3, seed=seed)
        chosen = select_subset(list(range(len(MC_DOCS))), "lmeval:dpnle_tiny_mc", 3, seed)
        assert part["item_id"].tolist() == [str(i) for i in chosen]
        same = full.set_index("item_id").loc[part["item_id"]]
        for got, want in zip(part["choice_logprobs"], same["choice_logprobs"], strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert part.attrs["lmeval"]["limit"] == 3 and part.attrs["lmeval"]["seed"] == seed
    # what edit-eval stores in a condition's settings is what the run records
    settings = check_benchmark("lmeval:dpnle_tiny_mc@acc_norm")
    for key in ("lm_eval", "task", "metric", "metrics", "tasks"):
        assert settings[key] == full.attrs["lmeval"][key]
    assert settings["tasks"]["dpnle_tiny_mc"]["config_digest"] == full.attrs["lmeval"]["tasks"]["dpnle_tiny_mc"][
        "config_digest"]
    json.dumps(full.attrs["lmeval"])  # plain JSON, ready for parquet metadata


def test_unknown_task_names_the_fix(lmeval):
    from dpnle.lmeval import check_benchmark

    with pytest.raises(LmevalError) as info:
        check_benchmark("lmeval:dpnle_no_such_task", include_path=TASKS)
    assert "Unknown lm-eval task 'dpnle_no_such_task'" in str(info.value) and "\n" not in str(info.value)


def test_a_group_is_one_benchmark_whose_items_name_their_task(lmeval, tiny):
    from dpnle.lmeval import run_lmeval_task

    model, tokenizer = tiny
    edit = make_edit("prompt")
    group = run_lmeval_task(model, tokenizer, "lmeval:dpnle_tiny_group", edit=edit, include_path=TASKS, limit=3)
    assert (group["benchmark"] == "lmeval:dpnle_tiny_group").all() and len(group) == 6
    for task in ("dpnle_tiny_letters", "dpnle_tiny_mc"):
        alone = run_lmeval_task(model, tokenizer, task, edit=edit, include_path=TASKS, limit=3)
        part = group[group["item_id"].str.startswith(f"{task}/")]
        assert part["item_id"].tolist() == [f"{task}/{i}" for i in alone["item_id"]]
        for got, want in zip(part["choice_logprobs"], alone["choice_logprobs"], strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert sorted(group.attrs["lmeval"]["tasks"]) == ["dpnle_tiny_letters", "dpnle_tiny_mc"]


def test_edit_and_random_state_are_as_before_after_the_task(lmeval, tiny):
    import random

    from dpnle.lmeval import run_lmeval_task

    model, tokenizer = tiny
    ids = torch.tensor([tokenizer("Question: what?")["input_ids"]])
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        run_lmeval_task(model, tokenizer, "dpnle_tiny_mc", edit=make_edit("all"), include_path=TASKS, limit=1)
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert not any(layer.mlp.down_proj._forward_pre_hooks for layer in model.model.layers)
    # lm-eval seeds the global generators; dpnle hands them back as they were
    draws = (random.random(), float(np.random.random()), float(torch.rand(1)))
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    assert draws == (random.random(), float(np.random.random()), float(torch.rand(1)))


# ---------------------------------------------------------------------------------------------
# through edit-eval


def test_edit_eval_config_refuses_lmeval_benchmarks_without_lmeval(monkeypatch):
    from dpnle.evaluate import EvalConfig

    for name in ("lm_eval", "lm_eval.evaluator", "lm_eval.models.huggingface", "lm_eval.tasks"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(LmevalError, match=r"pip install 'dpnle\[lmeval\]'"):
        EvalConfig(methods=["none"], benchmarks=["lmeval:dpnle_tiny_mc"], lmeval_include=str(TASKS))


def test_edit_eval_scores_an_lmeval_task_per_condition(lmeval, tmp_path_factory):
    """edit-eval with ``lmeval:<task>``: its rows are the task's per-document scores (the unedited
    ones equal a direct run), its settings are in the condition digest, and the capability table
    has its column."""
    from helpers import localized_tiny_run

    from dpnle import evaluate as ev
    from dpnle.lmeval import run_lmeval_task

    run, loaded = localized_tiny_run(tmp_path_factory.mktemp("runs"), "lmeval")
    bench = "lmeval:dpnle_tiny_mc"
    config = ev.EvalConfig(methods=["dpnle", "none"], directions=["up"], gammas=[4.0], benchmarks=[bench],
                           capability_limit=4, lmeval_include=str(TASKS), batch_size=4)
    settings = config.condition_settings()["lmeval"][bench]
    assert settings["lm_eval"] == lmeval.__version__ and settings["tasks"]
    result = ev.evaluate_concept(run, loaded, "openness", config, log=lambda m: None)
    summary = result.summary
    lm = summary[summary["benchmark"] == bench]
    assert set(lm["method"]) == {"dpnle", "none"}
    direct = run_lmeval_task(loaded, None, bench, limit=4, seed=0, batch_size=4, include_path=TASKS)
    none_file = ev.condition_path(run, "openness", ev.Condition("none"))
    stored = pd.read_parquet(none_file)
    stored = stored[stored["benchmark"] == bench]
    np.testing.assert_array_equal(stored["score"].to_numpy(), direct["score"].to_numpy())
    assert list(stored["item_id"]) == list(direct["item_id"].astype(str))
    table = ev.paper_table(summary, kind="capability")
    assert any(bench in str(c) for c in table.columns), list(table.columns)
