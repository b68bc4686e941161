"""The random-edit null test in ``summarize``: null_n, null_p, null_z, null_q against an
independent numpy/scipy computation on synthetic item scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from dpnle import evaluate as ev

ITEMS = 6
BENCH, SCORER = "ipip120", "likert"


def _records(concept, condition, method, direction, gamma, seed, dimension, scores, benchmark=BENCH, scorer=SCORER):
    return [{"concept": concept, "condition": condition, "method": method, "direction": direction,
             "gamma": float(gamma), "seed": seed, "benchmark": benchmark, "scorer": scorer,
             "item_id": f"i{k}", "dimension": dimension, "score": float(s), "chance": np.nan,
             "num_neurons": 0 if method in ("none", "prompt") else 40} for k, s in enumerate(scores)]


def _base(concept, dimension):
    return np.linspace(2.0, 3.0, ITEMS) + (0.1 if dimension != concept else 0.0)


def build(concepts, dpnle_shift, random_shifts, dims=("openness", "extraversion"), extra_methods=()):
    """No-edit, one DPN-LE condition and one random draw per entry of ``random_shifts`` (each item
    shifted by a constant plus a small per-item wobble), for every concept and dimension."""
    rng = np.random.default_rng(0)
    wobble = rng.normal(0, 0.01, ITEMS)
    rows = []
    for concept in concepts:
        for dim in dims:
            base = _base(concept, dim)
            rows += _records(concept, "none", "none", "-", 0.0, 0, dim, base)
            shift = dpnle_shift[concept] if isinstance(dpnle_shift, dict) else dpnle_shift
            rows += _records(concept, "dpnle-up-g1", "dpnle", "up", 1.0, 0, dim, base + shift + wobble)
            for seed, r in enumerate(random_shifts):
                rows += _records(concept, f"random-up-g1-s{seed}", "random", "up", 1.0, seed, dim,
                                 base + r + wobble * (seed + 1) / 3)
            for method in extra_methods:
                rows += _records(concept, f"{method}-up-g1", method, "up", 1.0, 0, dim, base + 0.5)
    return pd.DataFrame(rows)


def expected(rows, concept, dim, dpnle="dpnle-up-g1"):
    """Deltas, p and z computed here from the item scores, without summarize."""
    part = rows[(rows["concept"] == concept) & (rows["dimension"] == dim)]
    base = part[part["condition"] == "none"].set_index("item_id")["score"]

    def delta(key):
        return float((part[part["condition"] == key].set_index("item_id")["score"] - base).mean())

    d = delta(dpnle)
    keys = sorted(k for k in set(part["condition"]) if k.startswith("random-"))
    r = np.array([delta(k) for k in keys])
    n = len(r)
    p = (1 + np.sum(np.abs(r) >= abs(d))) / (n + 1)
    z = (d - r.mean()) / r.std(ddof=1) if n >= 2 and r.std(ddof=1) > 0 else np.nan
    return d, r, n, p, z


def row(summary, concept, dim, condition="dpnle-up-g1"):
    sel = summary[(summary["concept"] == concept) & (summary["dimension"] == dim)
                  & (summary["condition"] == condition)]
    assert len(sel) == 1
    return sel.iloc[0]


RANDOM9 = [0.05, -0.10, 0.15, -0.20, 0.08, 0.12, -0.03, 0.30, -0.25]


def test_larger_than_every_draw_gives_the_floor_and_matches_numpy():
    concepts = ["openness", "extraversion", "agreeableness"]
    shifts = {"openness": 0.9, "extraversion": -0.5, "agreeableness": 0.135}
    rows = build(concepts, shifts, RANDOM9, dims=concepts)
    summary = ev.summarize(rows)
    ps = {}
    for concept in concepts:
        for dim in concepts:
            d, r, n, p, z = expected(rows, concept, dim)
            got = row(summary, concept, dim)
            assert got["delta"] == pytest.approx(d)
            assert got["null_n"] == n == 9
            assert got["null_p"] == pytest.approx(p)
            assert got["null_z"] == pytest.approx(z)
            if dim == concept:
                ps[concept] = p
            else:
                assert np.isnan(got["null_q"])  # not a target row
    # openness moved more than every draw in both dimensions: the floor 1/(N+1).
    assert row(summary, "openness", "openness")["null_p"] == pytest.approx(1 / 10)
    assert row(summary, "openness", "extraversion")["null_p"] == pytest.approx(1 / 10)
    # BH across the target rows of the family (ipip120, likert, dpnle, up, 1).
    q = sps.false_discovery_control(np.array([ps[c] for c in concepts]), method="bh")
    for concept, value in zip(concepts, q, strict=True):
        assert row(summary, concept, concept)["null_q"] == pytest.approx(value)
    # By hand: p = 0.1, 0.1, 0.5 (4 draws beat 0.135) -> BH q = min(0.1*3/2, 0.5) twice, then 0.5.
    assert [ps[c] for c in concepts] == pytest.approx([0.1, 0.1, 0.5])
    assert list(q) == pytest.approx([0.15, 0.15, 0.5])
    for concept in concepts:
        got = row(summary, concept, concept)
        assert got["null_q"] >= got["null_p"] - 1e-12


@pytest.mark.filterwarnings("ignore:Precision loss occurred")  # constant item differences
def test_ties_count_against_the_edit():
    # Items shifted exactly (no wobble) so |r_i| == |d| is an exact tie.
    rows = []
    base = _base("openness", "openness")
    rows += _records("openness", "none", "none", "-", 0.0, 0, "openness", base)
    rows += _records("openness", "dpnle-up-g1", "dpnle", "up", 1.0, 0, "openness", base + 0.5)
    for seed, r in enumerate([0.5, -0.5, 0.1, 0.2, -0.3, 0.0, 0.4, 0.6, -0.1]):
        rows += _records("openness", f"random-up-g1-s{seed}", "random", "up", 1.0, seed, "openness", base + r)
    rows = pd.DataFrame(rows)
    got = row(ev.summarize(rows), "openness", "openness")
    d, r, n, p, z = expected(rows, "openness", "openness")
    # Exact ties in float arithmetic: the deltas are computed the same way on both sides.
    assert np.sum(np.abs(r) >= abs(d)) == 3  # 0.5, -0.5 (ties) and 0.6
    assert got["null_n"] == 9 and got["null_p"] == pytest.approx(p) == pytest.approx(4 / 10)
    assert got["null_z"] == pytest.approx(z)
    assert got["null_q"] == pytest.approx(p)  # a family of one


def test_one_draw_has_no_z_and_p_at_least_one_half():
    rows = build(["openness"], 0.9, [0.1])
    got = row(ev.summarize(rows), "openness", "openness")
    assert got["null_n"] == 1 and got["null_p"] == pytest.approx(0.5)
    assert np.isnan(got["null_z"])
    assert got["null_q"] == pytest.approx(0.5)


def test_other_methods_and_missing_draws_are_nan():
    rows = build(["openness"], 0.9, RANDOM9, extra_methods=("npti", "caa"))
    summary = ev.summarize(rows)
    others = summary[~summary["method"].isin(ev.NULL_TESTED)]
    assert set(others["method"]) == {"none", "random", "npti", "caa"}
    assert others[["null_n", "null_p", "null_z", "null_q"]].isna().all().all()
    # dpnle-w is tested too; a DPN-LE setting without random draws of its gamma has N = 0.
    w = rows[rows["condition"] == "dpnle-up-g1"].assign(condition="dpnle-w-up-g1", method="dpnle-w")
    g2 = rows[rows["condition"] == "dpnle-up-g1"].assign(condition="dpnle-up-g2", gamma=2.0)
    summary = ev.summarize(pd.concat([rows, w, g2], ignore_index=True))
    got_w = row(summary, "openness", "openness", "dpnle-w-up-g1")
    assert got_w["null_n"] == 9 and got_w["null_p"] == pytest.approx(1 / 10)
    got_g2 = row(summary, "openness", "openness", "dpnle-up-g2")
    assert got_g2["null_n"] == 0 and np.isnan(got_g2["null_p"]) and np.isnan(got_g2["null_q"])


def test_existing_columns_are_unchanged_and_paper_cell_keeps_its_prefix():
    rows = build(["openness"], 0.9, RANDOM9)
    summary = ev.summarize(rows)
    assert list(summary.columns[-4:]) == ["null_n", "null_p", "null_z", "null_q"]
    table = ev.paper_table(summary)
    cell = table.loc[table["method"] == "dpnle", "ipip120/likert up"].item()
    r = row(summary, "openness", "openness")
    prefix = f"{r['delta']:+.3f} ({r['ci_low']:+.3f},{r['ci_high']:+.3f})"
    assert cell == f"{prefix} p_null 0.10 z {r['null_z']:+.2f} q 0.10 (N=9) [unchecked]"
    random_cell = table.loc[table["method"] == "random", "ipip120/likert up"].item()
    assert "p_null" not in random_cell
    assert ev.MIN_NULL_DRAWS == 20
