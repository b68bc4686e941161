"""Leakage measures against independent numpy computations on synthetic eval rows with known shifts."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from dpnle import leakage as lk
from dpnle.evaluate import ROW_COLUMNS, Condition

TRAITS5 = ["openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism"]
# Circumplex order, typed out here rather than imported, so the test checks dpnle's constants too.
CIRCLE = ["self_direction", "stimulation", "hedonism", "achievement", "power",
          "security", "conformity", "tradition", "benevolence", "universalism"]
GROUPS = {
    "self_direction": "open", "stimulation": "open", "hedonism": "open",
    "achievement": "enhance", "power": "enhance",
    "security": "conserve", "conformity": "conserve", "tradition": "conserve",
    "benevolence": "transcend", "universalism": "transcend",
}
RANGE = {("pvq40", "likert"): 5.0, ("ipip120", "likert"): 4.0, ("ipip120", "statement"): 1.0}

ShiftFn = Callable[[str, Condition, str], float]


def synthetic_rows(instrument: str, scorer: str, dims: Sequence[str], steered: Sequence[str],
                   conditions: Sequence[Condition], shift: ShiftFn, n_items: int = 6, seed: int = 0,
                   noise: float = 0.05, num_neurons: int = 40) -> pd.DataFrame:
    """Eval rows in edit-eval's format. Each edited condition moves dimension j of steered
    concept t by exactly ``shift(t, condition, j)`` on average: the per-item noise is centred."""
    rng = np.random.default_rng(seed)
    records = []
    for concept in steered:
        base = {d: rng.uniform(2.0, 4.0, n_items) for d in dims}
        for cond in [Condition("none"), *conditions]:
            for d in dims:
                e = rng.normal(0.0, noise, n_items)
                e -= e.mean()
                delta = 0.0 if cond.method == "none" else shift(concept, cond, d)
                scores = base[d] + (0.0 if cond.method == "none" else delta + e)
                for i in range(n_items):
                    records.append({
                        "concept": concept, "condition": cond.key, "method": cond.method,
                        "direction": cond.direction, "gamma": float(cond.gamma), "seed": int(cond.seed),
                        "benchmark": instrument, "scorer": scorer, "item_id": f"{d[:3]}{i}", "dimension": d,
                        "key": 1.0, "prompt": "", "output": "", "raw": scores[i], "score": scores[i],
                        "chance": np.nan,
                        "num_neurons": 0 if cond.method in ("none", "prompt") else num_neurons,
                    })
    return pd.DataFrame(records, columns=[*ROW_COLUMNS, "num_neurons"])


def value_shift(t: str, cond: Condition, j: str) -> float:
    """A known pattern: the target moves by 0.5 (+-), neighbours by less; one target never moves."""
    sign = 1.0 if cond.direction == "up" else -1.0
    if cond.method == "random":
        return sign * 0.02 * (1 + cond.seed) * (CIRCLE.index(j) % 3)
    k, m = CIRCLE.index(t), CIRCLE.index(j)
    if t == "tradition":  # the target itself does not move; the others do
        return 0.0 if j == t else 0.1 * (m % 2)
    if j == t:
        return sign * 0.5
    return sign * 0.3 * math.cos(2 * math.pi * (m - k) / 10) + 0.01 * m


VALUE_CONDITIONS = [Condition("dpnle", "up", 1.0), Condition("dpnle", "down", 1.0),
                    Condition("random", "up", 1.0, 0), Condition("random", "up", 1.0, 1),
                    Condition("prompt", "up")]


@pytest.fixture(scope="module")
def value_rows() -> pd.DataFrame:
    return synthetic_rows("pvq40", "likert", CIRCLE, CIRCLE, VALUE_CONDITIONS, value_shift)


def expected_L(shift: ShiftFn, cond: Condition, steered: Sequence[str], dims: Sequence[str]) -> np.ndarray:
    return np.array([[shift(t, cond, j) / shift(t, cond, t) for j in dims] for t in steered])


def angular(a: str, b: str) -> float:
    theta = [2 * math.pi * k / 10 for k in range(10)]
    diff = abs(theta[CIRCLE.index(a)] - theta[CIRCLE.index(b)])
    return min(diff, 2 * math.pi - diff) / math.pi


# ---------------------------------------------------------------------------------------------


def test_score_shifts_match_known_shifts_and_t_interval(value_rows):
    shifts = lk.score_shifts(value_rows, "pvq40", "likert")
    up = shifts[shifts["condition"] == "dpnle-up-g1"].set_index(["concept", "dimension"])
    for t in CIRCLE:
        for j in CIRCLE:
            want = value_shift(t, Condition("dpnle", "up", 1.0), j) / RANGE[("pvq40", "likert")]
            assert up.loc[(t, j), "delta"] == pytest.approx(want, abs=1e-12)
    # The interval: paired item differences, t quantile, divided by the range.
    rows = value_rows[(value_rows["concept"] == "power") & (value_rows["dimension"] == "hedonism")]
    e = rows[rows["condition"] == "dpnle-up-g1"]["score"].to_numpy()
    b = rows[rows["condition"] == "none"]["score"].to_numpy()
    diff = e - b
    half = sps.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff)) / 5.0
    assert up.loc[("power", "hedonism"), "ci_low"] == pytest.approx(diff.mean() / 5.0 - half)
    assert up.loc[("power", "hedonism"), "ci_high"] == pytest.approx(diff.mean() / 5.0 + half)
    assert up.loc[("power", "power"), "target"] and not up.loc[("power", "hedonism"), "target"]
    assert set(up["units"]) == {"range"}


def test_random_draws_are_pooled_per_item(value_rows):
    shifts = lk.score_shifts(value_rows, "pvq40", "likert")
    rnd = shifts[shifts["method"] == "random"]
    assert set(rnd["condition"]) == {"random-up-g1"} and set(rnd["n_seeds"]) == {2}
    row = rnd[(rnd["concept"] == "power") & (rnd["dimension"] == "hedonism")].iloc[0]
    draws = [value_shift("power", Condition("random", "up", 1.0, s), "hedonism") for s in (0, 1)]
    assert row["delta"] == pytest.approx(np.mean(draws) / 5.0)
    per_draw = lk.score_shifts(value_rows, "pvq40", "likert", pool_seeds=False)
    assert {"random-up-g1-s0", "random-up-g1-s1"} <= set(per_draw["condition"])


def test_leakage_matrix_nlr_cwl_nglr_match_numpy(value_rows):
    shifts = lk.score_shifts(value_rows, "pvq40", "likert")
    for direction in ("up", "down"):
        cond = Condition("dpnle", direction, 1.0)
        L = lk.leakage_matrix(shifts, "dpnle", direction, 1.0)
        assert list(L.index) == CIRCLE and lk.dimensions(L) == CIRCLE
        moved = [t for t in CIRCLE if t != "tradition"]
        want = expected_L(value_shift, cond, moved, CIRCLE)
        np.testing.assert_allclose(L.loc[moved, CIRCLE].to_numpy(), want, rtol=1e-10, atol=1e-12)
        assert L.loc[moved, "target_moved"].all() and not L.loc["tradition", "target_moved"]

        got_nlr, got_cwl, got_nglr = lk.nlr(L), lk.cwl(L), lk.nglr(L)
        for i, t in enumerate(moved):
            others = [k for k, j in enumerate(CIRCLE) if j != t]
            a = np.abs(want[i, others])
            assert got_nlr[t] == pytest.approx(a.mean())
            w = np.array([angular(t, CIRCLE[k]) for k in others])
            assert got_cwl[t] == pytest.approx((w * a).sum() / w.sum())
            outside = [k for k, j in enumerate(CIRCLE) if GROUPS[j] != GROUPS[t]]
            assert got_nglr[t] == pytest.approx(np.abs(want[i, outside]).mean())


def test_circumplex_distances_are_dpnles():
    from dpnle.concepts import VALUES, circumplex_distance, higher_order_group

    assert list(VALUES) == CIRCLE
    for a in CIRCLE:
        for b in CIRCLE:
            assert circumplex_distance(a, b) == pytest.approx(angular(a, b))
            assert (higher_order_group(a) == higher_order_group(b)) == (GROUPS[a] == GROUPS[b])


def test_zero_target_shift_is_flagged_and_finite(value_rows):
    shifts = lk.score_shifts(value_rows, "pvq40", "likert")
    L = lk.leakage_matrix(shifts, "dpnle", "up", 1.0)
    row = L.loc["tradition", CIRCLE].to_numpy(dtype=float)
    assert np.isfinite(row).all()
    assert not L.loc["tradition", "target_moved"]
    assert L.loc["tradition", "delta_target"] == pytest.approx(0.0, abs=1e-12)
    # Held at +eps: the ratio is Delta_j / eps, large but finite.
    j = "hedonism"
    assert L.loc["tradition", j] == pytest.approx(value_shift("tradition", Condition("dpnle", "up", 1), j)
                                                  / 5.0 / lk.TARGET_EPS)
    for series in (lk.nlr(L), lk.cwl(L), lk.nglr(L)):
        assert np.isfinite(series.to_numpy()).all()


def test_target_inside_noise_is_not_moved():
    # The target moves by a mean of 0.01 with per-item noise 1.0: the interval includes 0.
    def shift(t, cond, j):
        return 0.01 if j == t else 0.2

    rows = synthetic_rows("ipip120", "likert", TRAITS5, ["openness"], [Condition("dpnle", "up", 1.0)], shift,
                          noise=1.0, n_items=8)
    L = lk.leakage_matrix(lk.score_shifts(rows, "ipip120", "likert"), "dpnle", "up")
    assert not L.loc["openness", "target_moved"]
    assert lk.moved(0.2, 0.1, 0.3) and not lk.moved(0.2, -0.1, 0.3) and not lk.moved(0.0005)
    assert lk.moved(-0.2) and not lk.moved(math.nan)


def test_statement_scorer_uses_raw_units_and_ratios_are_scale_free():
    def shift(t, cond, j):
        return {"openness": 2.0, "extraversion": -0.5}.get(j, 0.25) * (1 if cond.direction == "up" else -1)

    conds = [Condition("dpnle", "up", 1.0)]
    stmt = synthetic_rows("ipip120", "statement", TRAITS5, ["openness"], conds, shift)
    lik = synthetic_rows("ipip120", "likert", TRAITS5, ["openness"], conds, shift)
    s_stmt = lk.score_shifts(stmt, "ipip120", "statement")
    s_lik = lk.score_shifts(lik, "ipip120", "likert")
    assert set(s_stmt["units"]) == {"raw"} and set(s_lik["units"]) == {"range"}
    target = s_stmt[s_stmt["target"]].iloc[0]
    assert target["delta"] == pytest.approx(2.0) and target["delta_raw"] == pytest.approx(2.0)
    assert s_lik[s_lik["target"]].iloc[0]["delta"] == pytest.approx(0.5)
    L1 = lk.leakage_matrix(s_stmt, "dpnle", "up")
    L2 = lk.leakage_matrix(s_lik, "dpnle", "up")
    np.testing.assert_allclose(L1[TRAITS5].to_numpy(), L2[TRAITS5].to_numpy())
    assert L1.loc["openness", "extraversion"] == pytest.approx(-0.25)
    # Traits: no circumplex measures.
    assert np.isnan(lk.cwl(L1)["openness"]) and np.isnan(lk.nglr(L1)["openness"])
    assert lk.nlr(L1)["openness"] == pytest.approx((0.125 * 3 + 0.25) / 4)


def test_leakage_table_rows_averages_and_validity(value_rows):
    validity = pd.DataFrame({"instrument": "pvq40", "scorer": "likert", "concept": CIRCLE,
                             "passed": [c != "power" for c in CIRCLE]})
    table = lk.leakage_table(value_rows, validity)
    assert list(table.columns) == lk.TABLE_COLUMNS
    groups = table[["method", "direction", "gamma"]].drop_duplicates()
    assert {tuple(r) for r in groups.itertuples(index=False)} == {
        ("dpnle", "up", 1.0), ("dpnle", "down", 1.0), ("random", "up", 1.0), ("prompt", "up", 0.0)}
    up = table[(table["method"] == "dpnle") & (table["direction"] == "up")].set_index("target")
    L = lk.leakage_matrix(lk.score_shifts(value_rows, "pvq40", "likert"), "dpnle", "up")
    moved = [t for t in CIRCLE if t != "tradition"]
    assert up.loc[lk.AVERAGE, "nlr"] == pytest.approx(lk.nlr(L)[moved].mean())
    assert up.loc[lk.AVERAGE, "cwl"] == pytest.approx(lk.cwl(L)[moved].mean())
    assert up.loc[lk.AVERAGE, "nglr"] == pytest.approx(lk.nglr(L)[moved].mean())
    assert (up.loc[lk.AVERAGE, "n_moved"], up.loc[lk.AVERAGE, "n_targets"]) == (9, 10)
    assert up.loc[lk.AVERAGE, "delta_target"] == pytest.approx(0.5 / 5 * 9 / 10)
    assert up.loc["power", "valid"] == 0.0 and up.loc["security", "valid"] == 1.0
    assert up.loc[lk.AVERAGE, "valid"] == 0.0 and up.loc[lk.AVERAGE, "n_failed"] == 1
    assert up.loc["power", "n_failed"] == 1 and up.loc["security", "n_failed"] == 0
    assert up.loc["power", "num_neurons"] == 40
    assert np.isfinite(table["nlr"].dropna()).all()


def test_prompt_and_random_only_run_without_circumplex_targets():
    rows = synthetic_rows("ipip120", "likert", TRAITS5, ["openness", "neuroticism"],
                          [Condition("prompt", "down")], lambda t, c, j: -0.4 if j == t else 0.1)
    table = lk.leakage_table(rows)
    assert set(table["method"]) == {"prompt"}
    avg = table[table["target"] == lk.AVERAGE].iloc[0]
    assert avg["nlr"] == pytest.approx(0.25) and np.isnan(avg["cwl"]) and np.isnan(avg["valid"])


def test_empty_inputs():
    rows = synthetic_rows("ipip120", "likert", TRAITS5, ["openness"], [], lambda t, c, j: 0.0)
    assert lk.score_shifts(rows, "pvq40", "likert").empty
    assert lk.leakage_table(rows).empty
