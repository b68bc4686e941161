"""Matched-cost comparisons against np.interp and np.percentile on synthetic summaries."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dpnle import matched
from dpnle.runs import InputError


def _summary(curves: dict[tuple[str, int], list[tuple[float, float, float]]], concept: str = "openness") -> pd.DataFrame:
    """Summary rows: per (method, seed) a sweep of (gamma, kl, delta) on ipip120/statement + neutral/kl."""
    rows = [{"concept": concept, "condition": "none", "method": "none", "direction": "-", "gamma": 0.0, "seed": 0,
             "benchmark": "neutral", "scorer": "kl", "dimension": "neutral", "mean": 0.0, "target": False}]
    for (method, seed), sweep in curves.items():
        for gamma, kl, delta in sweep:
            key = f"{method}-up-g{gamma:g}" + (f"-s{seed}" if method == "random" else "")
            common = {"concept": concept, "condition": key, "method": method, "direction": "up", "gamma": gamma,
                      "seed": seed}
            rows.append({**common, "benchmark": "neutral", "scorer": "kl", "dimension": "neutral", "mean": kl,
                         "target": False})
            rows.append({**common, "benchmark": "ipip120", "scorer": "statement", "dimension": concept,
                         "mean": 3.0 + delta, "delta": delta, "ci_low": delta - 0.1, "ci_high": delta + 0.1,
                         "target": True})
            rows.append({**common, "benchmark": "ipip120", "scorer": "statement", "dimension": "extraversion",
                         "mean": 3.0, "delta": 0.5, "target": False})
    return pd.DataFrame(rows)


def test_methods_are_read_at_the_reference_methods_cost():
    gammas = [0.5, 1.0, 2.0]
    curves = {
        ("dpnle", 0): [(g, 0.1 * g * g, 0.2 * g) for g in gammas],
        ("npti", 0): [(g, 0.4 * g, 0.3 * g) for g in gammas],
    }
    rng = np.random.default_rng(0)
    slopes = rng.uniform(-0.1, 0.1, 25)
    for s, slope in enumerate(slopes):
        curves[("random", s)] = [(g, 0.1 * g * g, slope * g) for g in gammas]
    table = matched.matched_cost(_summary(curves), "ipip120", "statement")
    levels = sorted(0.1 * g * g for g in gammas)
    assert sorted(table["kl"].unique()) == pytest.approx(levels)

    npti = table[table["method"] == "npti"].set_index("kl")["delta"]
    npti_kl = [0.4 * g for g in gammas]
    npti_delta = [0.3 * g for g in gammas]
    for level in levels:
        inside = npti_kl[0] <= level <= npti_kl[-1]
        expected = np.interp(level, npti_kl, npti_delta) if inside else math.nan
        got = npti[np.isclose(npti.index, level)].item()
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)

    dp = table[table["method"] == "dpnle"].set_index("kl")["delta"].to_numpy()
    assert dp == pytest.approx([0.2 * g for g in gammas])

    rnd = table[(table["method"] == "random") & np.isclose(table["kl"], 0.1)].iloc[0]
    at_one = slopes * 1.0  # KL 0.1 is gamma 1 on every random sweep
    assert rnd["n_draws"] == 25
    assert rnd["delta"] == pytest.approx(np.median(at_one))
    assert (rnd["band_low"], rnd["band_high"]) == pytest.approx(tuple(np.percentile(at_one, [2.5, 97.5])))


def test_curve_interpolation_follows_gamma_order_without_extrapolation():
    # First segment in gamma order whose KL range holds the level: 0.1 -> 0.3 holds 0.25.
    assert matched.curve_at([0.1, 0.3, 0.2], [1.0, 3.0, 2.0], 0.25) == pytest.approx(np.interp(0.25, [0.1, 0.3], [1, 3]))
    assert math.isnan(matched.curve_at([0.1, 0.3], [1.0, 3.0], 0.5))
    assert math.isnan(matched.curve_at([0.1, 0.3], [1.0, 3.0], 0.05))
    assert matched.curve_at([0.2], [1.5], 0.2) == 1.5


def test_no_cost_measured_is_an_error_naming_the_benchmark():
    summary = _summary({("dpnle", 0): [(1.0, 0.1, 0.2)]})
    summary = summary[summary["benchmark"] != "neutral"]
    with pytest.raises(InputError, match="--benchmarks including neutral"):
        matched.matched_cost(summary, "ipip120", "statement")
