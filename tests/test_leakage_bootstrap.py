"""Bootstrap intervals of the leakage ratios, against scipy.stats.bootstrap and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from dpnle import leakage as lk
from dpnle.evaluate import Condition
from tests.test_leakage import CIRCLE, GROUPS, TRAITS5, synthetic_rows


def _nlr_by_hand(target_diffs: np.ndarray, other_diffs: list[np.ndarray], eps: float = lk.TARGET_EPS) -> float:
    d_t = float(np.mean(target_diffs))
    denom = np.copysign(max(abs(d_t), eps), d_t if d_t != 0 else 1.0)
    return float(np.mean([abs(np.mean(d) / denom) for d in other_diffs]))


def test_nlr_interval_agrees_with_scipy_bootstrap():
    rng = np.random.default_rng(3)
    diffs = {"openness": rng.normal(0.4, 0.3, 40)}
    for j, mu in zip(TRAITS5[1:], (0.05, -0.1, 0.02, 0.15), strict=True):
        diffs[j] = rng.normal(mu, 0.3, 40)
    reps = lk.bootstrap_ratios(diffs, "openness", "ipip120", "likert", draws=6000)
    ours = lk._interval(reps["nlr"])

    order = ["openness", *TRAITS5[1:]]

    def statistic(*samples, axis=-1):
        d_t = np.mean(samples[0], axis=axis)
        denom = np.where(d_t != 0, np.sign(d_t), 1.0) * np.maximum(np.abs(d_t), lk.TARGET_EPS)
        return np.mean([np.abs(np.mean(s, axis=axis) / denom) for s in samples[1:]], axis=0)

    ref = sps.bootstrap(tuple(diffs[j] for j in order), statistic, vectorized=True, paired=False,
                        n_resamples=6000, method="percentile", confidence_level=0.95, random_state=1)
    width = ref.confidence_interval.high - ref.confidence_interval.low
    # Two Monte Carlo draws of the same interval: equal up to resampling noise.
    assert ours[0] == pytest.approx(ref.confidence_interval.low, abs=0.08 * width)
    assert ours[1] == pytest.approx(ref.confidence_interval.high, abs=0.08 * width)
    point = _nlr_by_hand(diffs["openness"], [diffs[j] for j in order[1:]])
    assert ours[0] < point < ours[1]


def test_same_items_for_every_method_and_target():
    a = lk.item_resamples(12, "ipip120", "likert", "extraversion", draws=50)
    b = lk.item_resamples(12, "ipip120", "likert", "extraversion", draws=50)
    c = lk.item_resamples(12, "ipip120", "likert", "openness", draws=50)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() < 12


def test_leakage_table_intervals_match_the_replicates_by_hand():
    conds = [Condition("dpnle", "up", 1.0), Condition("random", "up", 1.0, 0)]

    def shift(t, cond, j):
        if cond.method == "random":
            return 0.3 if j == t else 0.2
        return 0.5 if j == t else 0.05

    rows = synthetic_rows("ipip120", "likert", TRAITS5, TRAITS5[:2], conds, shift, n_items=10, noise=0.2)
    table = lk.leakage_table(rows, draws=500)
    row = table[(table["method"] == "dpnle") & (table["target"] == "openness")].iloc[0]
    assert row["nlr_ci_low"] <= row["nlr"] <= row["nlr_ci_high"]

    # The same interval from the raw rows, computed here.
    part = rows[rows["concept"] == "openness"]
    base = part[part["condition"] == "none"].set_index(["dimension", "item_id"])["score"]
    edit = part[part["condition"] == "dpnle-up-g1"].set_index(["dimension", "item_id"])["score"]
    diff = (edit - base).reset_index()
    per_dim = {j: g.sort_values("item_id")["score"].to_numpy() for j, g in diff.groupby("dimension")}
    reps = []
    idx = {j: lk.item_resamples(len(v), "ipip120", "likert", j, draws=500) for j, v in per_dim.items()}
    for b in range(500):
        t = per_dim["openness"][idx["openness"][b]] / 4.0
        others = [per_dim[j][idx[j][b]] / 4.0 for j in TRAITS5[1:]]
        reps.append(_nlr_by_hand(t, others))
    lo, hi = np.percentile(reps, [2.5, 97.5])
    assert (row["nlr_ci_low"], row["nlr_ci_high"]) == pytest.approx((lo, hi))

    # The mean row bootstraps the mean over moved targets with shared replicates.
    mean = table[(table["method"] == "dpnle") & (table["target"] == lk.AVERAGE)].iloc[0]
    assert mean["nlr_ci_low"] <= mean["nlr"] <= mean["nlr_ci_high"]
    # DPN-LE leaks less than the random edit here, and the intervals say so.
    rnd = table[(table["method"] == "random") & (table["target"] == lk.AVERAGE)].iloc[0]
    assert mean["nlr_ci_high"] < rnd["nlr_ci_low"]


def test_constant_differences_give_a_zero_width_interval():
    diffs = {"openness": np.full(8, 0.5), **{j: np.full(8, 0.1) for j in TRAITS5[1:]}}
    reps = lk.bootstrap_ratios(diffs, "openness", "ipip120", "likert", draws=200)
    lo, hi = lk._interval(reps["nlr"])
    assert lo == pytest.approx(0.2) and hi == pytest.approx(0.2)
    assert np.isnan(reps["cwl"]).all()  # circumplex measures are for values only


def test_value_ratios_have_intervals():
    rng = np.random.default_rng(0)
    diffs = {v: rng.normal(0.6 if v == "power" else 0.1, 0.2, 12) for v in CIRCLE}
    reps = lk.bootstrap_ratios(diffs, "power", "pvq40", "likert", draws=300)
    assert np.isfinite(reps["cwl"]).all() and np.isfinite(reps["nglr"]).all()
    # Replicate 0 of NGLR by hand: values outside power's higher-order group.
    idx = {v: lk.item_resamples(12, "pvq40", "likert", v, draws=300)[0] for v in CIRCLE}
    d_t = diffs["power"][idx["power"]].mean()
    far = [v for v in CIRCLE if GROUPS[v] != GROUPS["power"]]
    expected = np.mean([abs(diffs[v][idx[v]].mean() / d_t) for v in far])
    assert reps["nglr"][0] == pytest.approx(expected)
