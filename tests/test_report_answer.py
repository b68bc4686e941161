"""The report's first screen (did the edit work, and at what cost) and its matched-cost section,
against numbers recomputed here from the synthetic eval rows with numpy/scipy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats as sps
from test_leakage import TRAITS5, synthetic_rows
from test_report import neutral_rows, new_run, write_eval, write_neurons, write_validity

from dpnle import report
from dpnle.evaluate import Condition

STEERED = ["openness", "extraversion", "neuroticism"]
DRAWS = 40  # BH over 3 concepts: p = 1/41 gives q = 0.037 when two of them reach it
CONDITIONS = [
    *(Condition("dpnle", d, g) for d in ("up", "down") for g in (0.5, 1.0, 2.0)),
    *(Condition("random", d, g, s) for d in ("up", "down") for g in (0.5, 1.0) for s in range(DRAWS)),
    Condition("prompt", "up"), Condition("prompt", "down"),
]


def shift(t: str, cond: Condition, j: str) -> float:
    """Openness moves far beyond every random draw; extraversion sits inside them; neuroticism's
    edit moves against the intended direction."""
    sign = 1.0 if cond.direction == "up" else -1.0
    if cond.method == "random":
        return sign * cond.gamma * 0.01 * (cond.seed - 9.5) if j == t else 0.0
    if cond.method == "prompt":
        return sign * 0.3 if j == t else 0.0
    if j != t:
        return 0.02 * cond.gamma
    return {"openness": sign * 0.5 * cond.gamma, "extraversion": sign * 0.04 * cond.gamma,
            "neuroticism": -sign * 0.5 * cond.gamma}[t]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = new_run("answer", tmp_path_factory.mktemp("runs"))
    for i, concept in enumerate(STEERED):
        write_neurons(run, concept, seed=i)
    rows = pd.concat([synthetic_rows("ipip300-test", "likert", TRAITS5, STEERED, CONDITIONS, shift, n_items=5),
                      neutral_rows(STEERED, CONDITIONS)], ignore_index=True)
    write_eval(run, rows)
    write_validity(run, "ipip300-test", "likert", TRAITS5, [True] * 5, with_columns=True)
    return rows, report.build_report(run)


def _change(rows: pd.DataFrame, concept: str, key: str) -> np.ndarray:
    """Per-item edited minus no-edit scores of the target dimension (items in the same order)."""
    part = rows[(rows["concept"] == concept) & (rows["dimension"] == concept) & (rows["benchmark"] == "ipip300-test")]
    base = part[part["condition"] == "none"].set_index("item_id")["score"]
    edited = part[part["condition"] == key].set_index("item_id")["score"]
    return (edited - base.loc[edited.index]).to_numpy(dtype=float)


def test_answer_table_equals_an_independent_computation(built):
    rows, result = built
    table = pd.read_parquet(result.tables["answer"])
    assert sorted(zip(table["concept"], table["direction"], strict=True)) == sorted(
        (c, d) for c in STEERED for d in ("up", "down"))
    assert (table["gamma"] == 1.0).all() and table["held_out"].all() and (table["method"] == "dpnle").all()
    ps = {}
    for r in table.itertuples():
        diff = _change(rows, r.concept, Condition("dpnle", r.direction, 1.0).key)
        half = sps.t.ppf(0.975, diff.size - 1) * diff.std(ddof=1) / np.sqrt(diff.size)
        assert r.delta == pytest.approx(diff.mean(), abs=1e-9)
        assert (r.ci_low, r.ci_high) == pytest.approx((diff.mean() - half, diff.mean() + half), abs=1e-9)
        assert r.d_z == pytest.approx(diff.mean() / diff.std(ddof=1), rel=1e-9)
        assert r.n_items == diff.size
        draws = np.array([_change(rows, r.concept, Condition("random", r.direction, 1.0, s).key).mean()
                          for s in range(DRAWS)])
        assert r.random_median == pytest.approx(np.median(draws), abs=1e-9)
        assert (r.random_low, r.random_high) == pytest.approx(tuple(np.percentile(draws, [2.5, 97.5])), abs=1e-9)
        p = (1 + np.sum(np.abs(draws) >= abs(diff.mean()))) / (DRAWS + 1)
        assert r.null_n == DRAWS and r.null_p == pytest.approx(p)
        assert r.null_z == pytest.approx((diff.mean() - draws.mean()) / draws.std(ddof=1), rel=1e-9)
        ps[(r.concept, r.direction)] = p
        assert r.prompt_delta == pytest.approx(_change(rows, r.concept, Condition("prompt", r.direction).key).mean())
        assert r.kl == pytest.approx(0.02 * 2.0)  # neutral_rows: 0.02 * (1 + gamma) for an edit
    # BH across the concepts, per direction (the null test's family).
    for direction in ("up", "down"):
        keys = [(c, direction) for c in STEERED]
        q = sps.false_discovery_control([ps[k] for k in keys], method="bh")
        got = table.set_index(["concept", "direction"]).loc[keys, "null_q"].to_numpy()
        np.testing.assert_allclose(got, q)


def test_the_first_screen_answers_before_the_evidence_and_provenance_comes_last(built):
    _, result = built
    md = result.report_md.read_text()
    answer, validity = md.index("## Did it work, and at what cost?"), md.index("## Validity of the instruments")
    provenance = md.index("Run **answer**")
    assert answer < validity < md.index("## Leakage") < provenance
    first = md[answer:validity]
    line = next(x for x in first.splitlines() if x.startswith("- **openness**"))
    assert "beyond the random null (up, down; significant at FDR 0.05" in line
    assert "held-out items" in line and "Cost: KL on neutral text 0.0400, 0.0400." in line
    # Inside the random draws: not distinguishable, said as such.
    line = next(x for x in first.splitlines() if x.startswith("- **extraversion**"))
    assert "not distinguishable from a random edit of the same size" in line
    # BH's floor for a single concept, 3 / 41 = 0.073 > 0.05, is named so a null reading is not over-read.
    assert "with 40 draws and 3 concepts, one concept alone can reach q 0.073 at best" in line
    # Far beyond the draws but against the intended direction: never called a success.
    line = next(x for x in first.splitlines() if x.startswith("- **neuroticism**"))
    assert "beyond the random null but against the intended direction (up, down" in line
    assert "not control of the concept" in line


def test_too_few_draws_are_named_not_read_as_no_effect(tmp_path):
    run = new_run("few", tmp_path)
    write_neurons(run, "openness", seed=0)
    conditions = [Condition("dpnle", "up", 1.0), Condition("random", "up", 1.0, 0)]
    rows = pd.concat([synthetic_rows("ipip120", "likert", TRAITS5, ["openness"], conditions, shift, n_items=4),
                      neutral_rows(["openness"], conditions)], ignore_index=True)
    write_eval(run, rows)
    md = report.build_report(run).report_md.read_text()
    line = next(x for x in md.splitlines() if x.startswith("- **openness**"))
    assert "too few draws for p <= 0.05 (needs --random-draws 20 or more)" in line
    assert "the validity items" in line
    # One gamma per method: no gamma figure, no heading for it.
    assert "Target score against gamma" not in md


def test_matched_cost_section_figure_and_table(built):
    rows, result = built
    md = result.report_md.read_text()
    assert "## Methods at matched cost" in md
    assert (result.path / "figures" / "matched_ipip300_test-likert.png").read_bytes().startswith(b"\x89PNG")
    assert (result.path / "figures" / "gamma_ipip300_test-likert.png").exists()  # a sweep: drawn
    matched = pd.read_parquet(result.tables["matched"])
    # At DPN-LE's own costs its curve passes through its own conditions; the random draws (same
    # KL as DPN-LE at each gamma here) give the percentile band of their changes at that gamma.
    for (concept, direction, gamma) in [("openness", "up", 0.5), ("extraversion", "down", 2.0)]:
        level = 0.02 * (1 + gamma) * 1  # neutral_rows: dpnle's KL
        own = _change(rows, concept, Condition("dpnle", direction, gamma).key).mean()
        row = matched[(matched["concept"] == concept) & (matched["direction"] == direction)
                      & (matched["method"] == "dpnle") & np.isclose(matched["kl"], level)]
        assert row["delta"].item() == pytest.approx(own, abs=1e-9)
    # Random draws sit at twice DPN-LE's KL (neutral_rows), so their sweep (gammas 0.5 and 1)
    # reaches only the DPN-LE levels inside its KL range [0.06, 0.08]: level 0.06 (DPN-LE at
    # gamma 2) is the random sweep's first point (gamma 0.5).
    row = matched[(matched["concept"] == "openness") & (matched["direction"] == "up")
                  & (matched["method"] == "random") & np.isclose(matched["kl"], 0.06)]
    draws = np.array([_change(rows, "openness", Condition("random", "up", 0.5, s).key).mean() for s in range(DRAWS)])
    assert row["n_draws"].item() == DRAWS
    assert (row["band_low"].item(), row["band_high"].item()) == pytest.approx(
        tuple(np.percentile(draws, [2.5, 97.5])), abs=1e-9)
    low = matched[(matched["method"] == "random") & np.isclose(matched["kl"], 0.03)]
    assert low["delta"].isna().all() and (low["n_draws"] == 0).all()  # below the random sweep: no extrapolation


def test_write_run_tables_leaves_what_edit_eval_leaves(tmp_path):
    """The library writes the paper table and summary.md a Python caller gets, as the CLI does."""
    from test_report import make_full_run

    from dpnle import evaluate as ev

    run = make_full_run(tmp_path)
    markdown = ev.write_run_tables(run)
    table = pd.read_parquet(run.eval_dir / "paper_table.parquet")
    assert (run.eval_dir / "summary.md").read_text() == markdown
    assert markdown.startswith("| concept | method | neurons | gamma |")
    assert set(table["concept"]) == {"openness", "extraversion", "neuroticism", "power", "security", "universalism"}
    # make_full_run's IPIP-120 failed its validity check for every trait: said in every such cell.
    cells = table.loc[table["concept"] == "openness", "ipip120/likert up"].dropna()
    assert len(cells) and all(c.endswith(" [invalid]") for c in cells)
    assert not list(run.eval_dir.glob(".summary.md.*"))  # written atomically, no temp left


def _generated_rows(concepts, conditions, items=3) -> pd.DataFrame:
    records = []
    for concept in concepts:
        for cond in [Condition("none"), *conditions]:
            for i in range(items):
                text = f"{concept} {cond.key} answer {i} " + ("x" * 500 if i == 1 else "")
                records.append({"concept": concept, "condition": cond.key, "method": cond.method,
                                "direction": cond.direction, "gamma": float(cond.gamma), "seed": cond.seed,
                                "benchmark": "gsm8k", "scorer": "exact", "item_id": f"q{i}", "dimension": "",
                                "key": np.nan, "prompt": f"question {i}", "output": text, "raw": 1.0, "score": 1.0,
                                "chance": np.nan, "num_neurons": 0 if cond.method in ("none", "prompt") else 40})
    return pd.DataFrame(records)


def test_generated_answers_are_shown_side_by_side(tmp_path):
    run = new_run("samples", tmp_path)
    write_neurons(run, "openness", seed=0)
    conditions = [Condition("dpnle", d, g) for d in ("up", "down") for g in (0.5, 1.0)]
    rows = pd.concat([_generated_rows(["openness"], conditions),
                      synthetic_rows("ipip120", "likert", TRAITS5, ["openness"], conditions, shift, n_items=4)],
                     ignore_index=True)
    write_eval(run, rows)
    result = report.build_report(run)
    samples = pd.read_parquet(result.tables["samples"])
    assert list(samples["item"]) == ["q0", "q1"]  # the first SAMPLE_ITEMS items, in order
    first = samples.iloc[0]
    assert (first["edit"], first["prompt"]) == ("DPN-LE, gamma 1", "question 0")
    assert first["no edit"] == "openness none answer 0 "
    assert first["up"] == f"openness {Condition('dpnle', 'up', 1.0).key} answer 0 "
    assert first["down"] == f"openness {Condition('dpnle', 'down', 1.0).key} answer 0 "
    assert len(samples.iloc[1]["no edit"]) == report.SAMPLE_CHARS and samples.iloc[1]["no edit"].endswith("…")
    assert "## What the edits do to generated text" in result.report_md.read_text()
    # A run without generated text has no such section.
    assert report.answer_samples(rows[rows["benchmark"] != "gsm8k"]).empty
