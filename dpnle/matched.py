"""Methods compared at matched cost, not at matched gamma.

Gamma means different things for DPN-LE (a multiple of a mean difference on ~0.5% of the
neurons), NPTI (a multiple of a 95th percentile on ~5% of them) and CAA (a multiple of a
residual-stream difference), so "more control at the same gamma" says little. Here every edited
condition is placed at its measured cost, the KL divergence of the next-token distribution on
neutral text against the unedited model (edit-eval's ``neutral`` benchmark, scorer ``kl``), and
each method's target change is read off its gamma sweep at common cost levels:

- :func:`cost_points`: per (concept, method, direction, gamma, draw), the target change on one
  questionnaire and scorer, with its interval, and the condition's KL.
- :func:`curve_at`: a method's change at cost ``c``, by linear interpolation along its gamma
  sweep (points in gamma order; the first segment whose KL range holds ``c``). No
  extrapolation: outside the KL range the method covered, the value is NaN.
- :func:`matched_cost`: every method at common levels, by default the KL of the reference
  method's own conditions ("at DPN-LE's cost, how far does each method move the trait?"); the
  random control's draws are interpolated one by one and summarized as a band (2.5th-97.5th
  percentile over draws) around their median.

The DPN-LE paper compares at fixed gamma; dpnle reports both (``tables --kind personality`` at
fixed gamma, ``tables --kind matched`` here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from dpnle import vocab
from dpnle.runs import InputError

COST_BENCHMARK = "neutral"
COST_SCORER = "kl"
# The methods whose conditions set the common cost levels, the first one present (DPN-LE's edits).
REFERENCE_METHODS = vocab.DPNLE_METHODS
BAND = (2.5, 97.5)
# Methods drawn several times (one sweep per seed; the random nulls): summarized as a median and a band.
DRAWN_METHODS = vocab.RANDOM_METHODS

POINT_COLUMNS = ["concept", "method", "direction", "gamma", "seed", "condition", "kl", "delta", "ci_low",
                 "ci_high"]
MATCHED_COLUMNS = ["concept", "benchmark", "scorer", "direction", "kl", "method", "delta", "band_low",
                   "band_high", "n_draws"]


def cost_points(summary: pd.DataFrame, benchmark: str, scorer: str) -> pd.DataFrame:
    """Each edited condition's target change on (``benchmark``, ``scorer``) next to its KL cost."""
    need = {"benchmark", "scorer", "condition", "concept", "method", "mean"}
    if summary.empty or not need <= set(summary.columns):
        return pd.DataFrame(columns=POINT_COLUMNS)
    cost = summary[(summary["benchmark"] == COST_BENCHMARK) & (summary["scorer"] == COST_SCORER)]
    if cost.empty:
        raise InputError("Matched-cost comparisons need each condition's cost: run edit-eval with "
                         "--benchmarks including neutral (KL on neutral text).")
    kl = cost.groupby(["concept", "condition"])["mean"].mean().rename("kl")
    target = summary[(summary["benchmark"] == benchmark) & (summary["scorer"] == scorer) & summary["target"].astype(bool)
                     & ~summary["method"].isin(vocab.HOOKLESS_METHODS)]
    if target.empty:
        return pd.DataFrame(columns=POINT_COLUMNS)
    points = target.merge(kl.reset_index(), on=["concept", "condition"], how="inner")
    points = points.assign(gamma=points["gamma"].astype(float), seed=points["seed"].astype(int))
    return points[POINT_COLUMNS].sort_values(["concept", "method", "direction", "seed", "gamma"]).reset_index(drop=True)


def curve_at(kl: Sequence[float], delta: Sequence[float], level: float) -> float:
    """The change at cost ``level`` along a sweep given in gamma order (see the module docstring)."""
    kl = np.asarray(kl, dtype=float)
    delta = np.asarray(delta, dtype=float)
    ok = np.isfinite(kl) & np.isfinite(delta)
    kl, delta = kl[ok], delta[ok]
    if kl.size == 0 or not math.isfinite(level):
        return math.nan
    for i in range(kl.size):
        if kl[i] == level:
            return float(delta[i])
        if i + 1 < kl.size and min(kl[i], kl[i + 1]) <= level <= max(kl[i], kl[i + 1]):
            t = (level - kl[i]) / (kl[i + 1] - kl[i])
            return float(delta[i] + t * (delta[i + 1] - delta[i]))
    return math.nan


def matched_cost(summary: pd.DataFrame, benchmark: str, scorer: str, levels: Sequence[float] | None = None,
                 reference: str | None = None) -> pd.DataFrame:
    """Every method's target change at common KL levels, per (concept, direction).

    ``levels`` default to the KL values of ``reference``'s conditions (default: dpnle, else
    dpnle-w). Random-control draws (one sweep per seed) give ``band_low`` / ``band_high`` and
    their median as ``delta``; other methods have one sweep and no band.
    """
    points = cost_points(summary, benchmark, scorer)
    if points.empty:
        return pd.DataFrame(columns=MATCHED_COLUMNS)
    records = []
    for (concept, direction), part in points.groupby(["concept", "direction"], sort=False):
        ref = reference or next((m for m in REFERENCE_METHODS if (part["method"] == m).any()), None)
        if levels is not None:
            grid = sorted({float(x) for x in levels})
        elif ref is not None and (part["method"] == ref).any():
            grid = sorted(set(part.loc[part["method"] == ref, "kl"].astype(float)))
        else:
            grid = sorted(set(part["kl"].astype(float)))
        for method, sweep in part.groupby("method", sort=False):
            curves = [g.sort_values("gamma") for _, g in sweep.groupby("seed")]
            for level in grid:
                values = np.array([curve_at(c["kl"], c["delta"], level) for c in curves])
                finite = values[np.isfinite(values)]
                if method in DRAWN_METHODS and finite.size:
                    lo, hi = np.percentile(finite, BAND)
                    mid = float(np.median(finite))
                else:
                    lo = hi = math.nan
                    mid = float(finite.mean()) if finite.size else math.nan
                records.append({"concept": concept, "benchmark": benchmark, "scorer": scorer,
                                "direction": direction, "kl": level, "method": method, "delta": mid,
                                "band_low": float(lo), "band_high": float(hi), "n_draws": int(finite.size)})
    return pd.DataFrame(records, columns=MATCHED_COLUMNS)
