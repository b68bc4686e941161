"""Leakage measures: how far an edit aimed at one concept moves the concepts it was not aimed at.

dpnle's definitions (NeVA's own formula is not public; see ../shared/DESIGN.md, "Leakage"):

- Steer concept t. On every dimension j of one instrument and scorer,
  ``Delta_j = mean score_j(edited) - mean score_j(no edit)``, paired by item, divided by the
  scorer's range on that instrument (``instruments.scale_range``). The ``statement`` scorer has
  no fixed range: its shifts stay in raw units, which changes nothing in L below, because every
  j of one (instrument, scorer) shares the units.
- Leakage matrix ``L[t, j] = Delta_j / Delta_t``.
- ``NLR(t)`` = mean over j != t of |L[t, j]|.
- For the ten values: ``CWL(t) = sum_j dist(t, j) |L[t, j]| / sum_j dist(t, j)`` over j != t,
  with ``dist`` the circumplex angular distance / pi; ``NGLR(t)`` = mean |L[t, j]| over the
  values outside t's higher-order group.
- Before any generation: the Jaccard overlap of the selected neuron sets (from localize).

A ratio to a target shift that is indistinguishable from zero means nothing, however large it
is. So every target row carries ``target_moved``: |Delta_t| >= ``TARGET_EPS`` and, where the
interval exists, a 95% interval that excludes 0. L is still computed for the other rows (with the
denominator held at +-TARGET_EPS, so nothing becomes inf), but averages over targets use only
the rows whose target moved, and the report says which ratios are not interpretable.

Everything here is pandas / numpy on the eval rows; no model.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from dpnle import vocab
from dpnle.concepts import ALL_CONCEPTS, VALUES, circumplex_distance, higher_order_group
from dpnle.runs import Run, read_parquet

# Shifts are fractions of the scale's range (or raw statement units): a target that moved by less
# than a thousandth of the range has not moved in any sense a ratio could build on.
TARGET_EPS = 1e-3
CI_LEVEL = 0.95
# Bootstrap intervals of the leakage ratios: resamples of the items, seeded (see bootstrap_ratios).
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 0
# The per-(instrument, scorer, method, direction, gamma) average row of the leakage table.
AVERAGE = "mean"
# Non-dimension columns of a leakage matrix.
MATRIX_META = ("delta_target", "ci_low_target", "ci_high_target", "target_moved")
# The order methods are listed in everywhere (dpnle.vocab.EDIT_METHODS).
METHOD_ORDER = vocab.EDIT_METHODS

SHIFT_COLUMNS = [
    "concept", "condition", "method", "direction", "gamma", "n_seeds", "dimension", "target",
    "mean_base", "mean_edited", "delta_raw", "delta", "ci_low", "ci_high", "n_items", "range", "units",
    "num_neurons",
]
TABLE_COLUMNS = [
    "instrument", "scorer", "method", "direction", "gamma", "target", "delta_target", "ci_low", "ci_high",
    "target_moved", "nlr", "nlr_ci_low", "nlr_ci_high", "cwl", "cwl_ci_low", "cwl_ci_high", "nglr",
    "nglr_ci_low", "nglr_ci_high", "valid", "n_failed", "n_targets", "n_moved", "n_seeds", "num_neurons", "units",
]
RATIOS = ("nlr", "cwl", "nglr")


def concept_order(names: Iterable[str]) -> list[str]:
    """Known concepts in dpnle's order (traits, then values in circumplex order), others after."""
    names = list(dict.fromkeys(str(n) for n in names))
    return [c for c in ALL_CONCEPTS if c in names] + sorted(n for n in names if n not in ALL_CONCEPTS)


def method_order(names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(str(n) for n in names))
    return [m for m in METHOD_ORDER if m in names] + sorted(n for n in names if n not in METHOD_ORDER)


def _pooled_key(condition: str) -> str:
    """A condition key without its random-draw suffix: ``random-up-g1-s0`` -> ``random-up-g1``
    (``random-mag-up-g1-s3`` -> ``random-mag-up-g1``: each null's draws pool on their own)."""
    return re.sub(r"-s\d+$", "", condition)


def _scale_width(instrument: str, scorer: str) -> float:
    from dpnle.instruments import scale_range

    try:
        low, high = scale_range(instrument, scorer)
    except ValueError:  # an instrument dpnle does not know: raw units
        return math.nan
    return float(high - low)


# ---------------------------------------------------------------------------------------------
# shifts


def score_shifts(rows: pd.DataFrame, instrument: str, scorer: str, pool_seeds: bool = True) -> pd.DataFrame:
    """Per (steered concept, condition, dimension): the change of the mean score against the
    same concept's no-edit condition, paired by item, with a 95% t interval over items.

    ``delta`` / ``ci_*`` are divided by the scorer's range on the instrument (``units`` =
    "range"); for ``statement`` they stay in raw units (``units`` = "raw"). ``delta_raw`` is
    always in raw units. With ``pool_seeds`` the random control's draws of one (method,
    direction, gamma) are pooled: each item's score is averaged over the draws first, so the
    interval is over items of the draw-averaged edit (``n_seeds`` says how many).
    """
    paired = _paired_items(rows, instrument, scorer, pool_seeds)
    if paired is None:
        return pd.DataFrame(columns=SHIFT_COLUMNS)
    joined, edited_part, width, units = paired
    scale = width if units == "range" else 1.0
    stats = joined.groupby(["concept", "group", "dimension"], sort=False).agg(
        mean_edited=("edited", "mean"), mean_base=("base", "mean"), delta_raw=("diff", "mean"),
        sd=("diff", "std"), n_items=("diff", "size")).reset_index()
    info = edited_part.groupby(["concept", "group"], sort=False).agg(
        method=("method", "first"), direction=("direction", "first"), gamma=("gamma", "first"),
        n_seeds=("seed", "nunique"), num_neurons=("num_neurons", "mean")).reset_index()
    out = stats.merge(info, on=["concept", "group"], how="left").rename(columns={"group": "condition"})
    n = out["n_items"].to_numpy(dtype=float)
    sd = out["sd"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t_crit = np.where(n > 1, sps.t.ppf(0.5 + CI_LEVEL / 2, np.maximum(n - 1, 1)), np.nan)
        # sd == 0 (every item moved alike) gives a zero-width interval, not "unknown".
        half = t_crit * sd / np.sqrt(n)
    out["delta"] = out["delta_raw"] / scale
    out["ci_low"] = out["delta"] - half / scale
    out["ci_high"] = out["delta"] + half / scale
    out["target"] = out["dimension"] == out["concept"]
    out["gamma"] = out["gamma"].astype(float)
    out["n_seeds"] = out["n_seeds"].astype(int)
    out["n_items"] = out["n_items"].astype(int)
    out["range"] = width
    out["units"] = units
    return out[SHIFT_COLUMNS].reset_index(drop=True)


def _paired_items(rows: pd.DataFrame, instrument: str, scorer: str, pool_seeds: bool = True):
    """The item-level pairs behind :func:`score_shifts`: ``(joined, edited_rows, width, units)``
    with ``joined`` one row per (concept, group, dimension, item): ``edited``, ``base``, ``diff``
    (raw units; ``group`` is the condition key, random draws pooled); None when nothing pairs."""
    part = rows[(rows["benchmark"] == instrument) & (rows["scorer"] == scorer)]
    if part.empty:
        return None
    width = _scale_width(instrument, scorer)
    units = "range" if math.isfinite(width) and width > 0 else "raw"
    part = part.assign(item=part["item_id"].astype(str), score=part["score"].astype(float),
                       seed=part["seed"] if "seed" in part else 0,
                       num_neurons=part["num_neurons"] if "num_neurons" in part else 0)
    part = part.assign(group=part["condition"].map(_pooled_key) if pool_seeds else part["condition"])
    is_base = part["condition"] == "none"
    # Per item first (a pooled random control averages its draws here), then pair with no edit.
    base = (part[is_base].groupby(["concept", "dimension", "item"], sort=False)["score"].mean()
            .rename("base").reset_index())
    edited_part = part[~is_base]
    edited = (edited_part.groupby(["concept", "group", "dimension", "item"], sort=False)["score"].mean()
              .rename("edited").reset_index())
    joined = edited.merge(base, on=["concept", "dimension", "item"], how="inner").dropna(subset=["edited", "base"])
    if joined.empty:
        return None
    joined["diff"] = joined["edited"] - joined["base"]
    return joined, edited_part, width, units


# ---------------------------------------------------------------------------------------------
# the matrix and its summaries


def moved(delta: float, ci_low: float = math.nan, ci_high: float = math.nan, eps: float = TARGET_EPS) -> bool:
    """Did the target move: |delta| >= eps and, where an interval exists, it excludes 0."""
    if not math.isfinite(delta) or abs(delta) < eps:
        return False
    if math.isfinite(ci_low) and math.isfinite(ci_high):
        return bool(ci_low > 0 or ci_high < 0)
    return True


def _guarded(delta_t: float, eps: float) -> float:
    # Hold the denominator away from 0 with the target's sign (+ for an exact 0): the row stays
    # finite, and target_moved=False says not to read it.
    return math.copysign(max(abs(delta_t), eps), delta_t if delta_t != 0 else 1.0)


def select_gamma(shifts: pd.DataFrame, method: str, direction: str, gamma: float | None) -> float | None:
    """The gamma to use for (method, direction): ``gamma`` if given, else the one closest to 1.0
    (DPN-LE's default; ties go to the larger). None when the method has no such rows."""
    part = shifts[(shifts["method"] == method) & (shifts["direction"] == direction)]
    if part.empty:
        return None
    if gamma is not None:
        return float(gamma)
    gammas = sorted({float(g) for g in part["gamma"]}, reverse=True)
    return min(gammas, key=lambda g: abs(g - 1.0))


def leakage_matrix(shifts: pd.DataFrame, method: str, direction: str, gamma: float | None = None,
                   eps: float = TARGET_EPS) -> pd.DataFrame:
    """L[t, j] = Delta_j / Delta_t for one (method, direction, gamma) of one instrument/scorer.

    Rows are the steered concepts, columns the instrument's dimensions, then ``MATRIX_META``:
    the target's shift and interval and ``target_moved``. ``gamma=None`` picks the gamma closest
    to 1.0. A target whose shift is below ``eps`` (or whose interval includes 0) is flagged and
    divided by +-eps instead, so the row is finite; a target its instrument does not measure
    gets a row of NaN.
    """
    chosen = select_gamma(shifts, method, direction, gamma)
    part = shifts[(shifts["method"] == method) & (shifts["direction"] == direction)]
    if chosen is not None:
        part = part[np.isclose(part["gamma"].astype(float), chosen)]
    dims = concept_order(shifts["dimension"])
    targets = concept_order(part["concept"])
    delta = part.pivot_table(index="concept", columns="dimension", values="delta", aggfunc="mean")
    delta = delta.reindex(index=targets, columns=dims)
    out = pd.DataFrame(np.nan, index=pd.Index(targets, name="target"), columns=dims, dtype=float)
    meta = {name: [] for name in MATRIX_META}
    for t in targets:
        trow = part[(part["concept"] == t) & (part["dimension"] == t)]
        d_t = float(trow["delta"].mean()) if len(trow) else math.nan
        lo = float(trow["ci_low"].mean()) if len(trow) else math.nan
        hi = float(trow["ci_high"].mean()) if len(trow) else math.nan
        if math.isfinite(d_t):
            out.loc[t] = delta.loc[t].to_numpy(dtype=float) / _guarded(d_t, eps)
        meta["delta_target"].append(d_t)
        meta["ci_low_target"].append(lo)
        meta["ci_high_target"].append(hi)
        meta["target_moved"].append(moved(d_t, lo, hi, eps))
    for name, values in meta.items():
        out[name] = np.array(values, dtype=bool if name == "target_moved" else float)
    out.attrs.update(method=method, direction=direction, gamma=chosen)
    return out


def dimensions(L: pd.DataFrame) -> list[str]:
    """The dimension columns of a leakage matrix (without the target metadata)."""
    return [c for c in L.columns if c not in MATRIX_META]


def _abs_off_target(L: pd.DataFrame, t: str, keep) -> tuple[list[str], np.ndarray]:
    js = [j for j in dimensions(L) if j != t and keep(j) and math.isfinite(float(L.at[t, j]))]
    return js, np.abs(np.array([float(L.at[t, j]) for j in js], dtype=float))


def nlr(L: pd.DataFrame) -> pd.Series:
    """Normalized leakage ratio: mean over j != t of |L[t, j]|."""
    out = {}
    for t in L.index:
        _, vals = _abs_off_target(L, t, lambda j: True)
        out[t] = float(vals.mean()) if vals.size else math.nan
    return pd.Series(out, name="nlr", dtype=float)


def cwl(L: pd.DataFrame) -> pd.Series:
    """Circumplex-weighted leakage (values only): sum_j dist(t,j)|L| / sum_j dist(t,j), j != t."""
    out = {}
    for t in L.index:
        if t not in VALUES:
            out[t] = math.nan
            continue
        js, vals = _abs_off_target(L, t, lambda j: j in VALUES)
        weights = np.array([circumplex_distance(t, j) for j in js], dtype=float)
        out[t] = float((weights * vals).sum() / weights.sum()) if weights.sum() > 0 else math.nan
    return pd.Series(out, name="cwl", dtype=float)


def nglr(L: pd.DataFrame) -> pd.Series:
    """Non-group leakage ratio (values only): mean |L[t, j]| over values outside t's higher-order group."""
    out = {}
    for t in L.index:
        if t not in VALUES:
            out[t] = math.nan
            continue
        group = higher_order_group(t)
        _, vals = _abs_off_target(L, t, lambda j, g=group: j in VALUES and higher_order_group(j) != g)
        out[t] = float(vals.mean()) if vals.size else math.nan
    return pd.Series(out, name="nglr", dtype=float)


# ---------------------------------------------------------------------------------------------
# bootstrap intervals of the ratios


def item_resamples(n: int, instrument: str, scorer: str, dimension: str, draws: int = BOOTSTRAP_DRAWS,
                   seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``[draws, n]`` item indices drawn with replacement for one dimension of one instrument.

    The stream depends on (seed, instrument, scorer, dimension, n) alone, so every method,
    direction, gamma and steered concept sees the same resampled items: replicate b of NLR for
    DPN-LE and replicate b for the random control are computed on the same items, and the
    difference of two methods' replicates is a paired bootstrap of their difference."""
    key = zlib.crc32(f"{instrument}/{scorer}/{dimension}".encode())
    return np.random.default_rng([int(seed), key, int(n)]).integers(0, n, size=(draws, n))


def bootstrap_ratios(diffs: dict[str, np.ndarray], target: str, instrument: str, scorer: str, scale: float = 1.0,
                     eps: float = TARGET_EPS, draws: int = BOOTSTRAP_DRAWS,
                     seed: int = BOOTSTRAP_SEED) -> dict[str, np.ndarray]:
    """Bootstrap replicates ``{"nlr", "cwl", "nglr": float [draws]}`` of steering ``target``.

    ``diffs[j]`` are the per-item differences (edited - no edit, raw units, items in a fixed
    order) on dimension j. Each replicate resamples each dimension's items with replacement
    (a stratified bootstrap: the dimensions have their own items), recomputes every Delta_j as
    the mean difference / ``scale``, and the ratios exactly as :func:`nlr`, :func:`cwl` and
    :func:`nglr` do (the target's shift held at +-eps). NaN replicates where a ratio is undefined.
    """
    if target not in diffs or len(diffs[target]) == 0:
        return {name: np.full(draws, np.nan) for name in RATIOS}
    means = {}
    for j, values in diffs.items():
        values = np.asarray(values, dtype=float)
        if values.size == 0:
            continue
        means[j] = values[item_resamples(values.size, instrument, scorer, j, draws, seed)].mean(axis=1) / scale
    d_t = means[target]
    denom = np.where(d_t != 0, np.sign(d_t), 1.0) * np.maximum(np.abs(d_t), eps)
    others = [j for j in means if j != target]
    ratio = {j: np.abs(means[j] / denom) for j in others}
    out = {"nlr": np.mean([ratio[j] for j in others], axis=0) if others else np.full(draws, np.nan)}
    if target in VALUES:
        vals = [j for j in others if j in VALUES]
        weights = np.array([circumplex_distance(target, j) for j in vals], dtype=float)
        out["cwl"] = (np.sum([w * ratio[j] for w, j in zip(weights, vals, strict=True)], axis=0) / weights.sum()
                      if weights.sum() > 0 else np.full(draws, np.nan))
        group = higher_order_group(target)
        far = [j for j in vals if higher_order_group(j) != group]
        out["nglr"] = np.mean([ratio[j] for j in far], axis=0) if far else np.full(draws, np.nan)
    else:
        out["cwl"] = out["nglr"] = np.full(draws, np.nan)
    return out


def _interval(replicates: np.ndarray) -> tuple[float, float]:
    """Percentile interval (CI_LEVEL) of bootstrap replicates; NaN when they are not all finite."""
    replicates = np.asarray(replicates, dtype=float)
    if replicates.size == 0 or not np.isfinite(replicates).all():
        return math.nan, math.nan
    lo, hi = np.percentile(replicates, [50 * (1 - CI_LEVEL), 50 * (1 + CI_LEVEL)])
    return float(lo), float(hi)


def _item_diffs(joined: pd.DataFrame, concept: str, group: str) -> dict[str, np.ndarray]:
    """Per dimension, the per-item differences of ``concept`` steered under ``group``, by item id."""
    part = joined[(joined["concept"] == concept) & (joined["group"] == group)]
    return {str(j): g.sort_values("item")["diff"].to_numpy(dtype=float)
            for j, g in part.groupby("dimension", sort=False)}


# ---------------------------------------------------------------------------------------------
# the table


def questionnaire_pairs(rows: pd.DataFrame) -> list[tuple[str, str]]:
    """The (instrument, scorer) pairs in the rows, in dpnle's instrument and scorer order."""
    from dpnle.evaluate import QUESTIONNAIRES, SCORERS

    found = rows.loc[rows["benchmark"].isin(QUESTIONNAIRES), ["benchmark", "scorer"]].drop_duplicates()
    pairs = [(str(b), str(s)) for b, s in found.itertuples(index=False)]
    return sorted(pairs, key=lambda p: (QUESTIONNAIRES.index(p[0]),
                                        SCORERS.index(p[1]) if p[1] in SCORERS else len(SCORERS), p[1]))


def _verdicts(validity: pd.DataFrame | None) -> dict[tuple[str, str, str], bool]:
    if validity is None or validity.empty or not {"instrument", "scorer", "concept", "passed"} <= set(validity):
        return {}
    return {(str(r.instrument), str(r.scorer), str(r.concept)): bool(r.passed)
            for r in validity.itertuples(index=False)}


def _all_valid(flags: Sequence[float]) -> float:
    """1.0 if every flag passed, 0.0 if any failed, NaN if some were never checked."""
    if any(f == 0.0 for f in flags):
        return 0.0
    if flags and all(f == 1.0 for f in flags):
        return 1.0
    return math.nan


def leakage_table(rows: pd.DataFrame, validity: pd.DataFrame | None = None, eps: float = TARGET_EPS,
                  shifts: dict[tuple[str, str], pd.DataFrame] | None = None, draws: int = BOOTSTRAP_DRAWS,
                  seed: int = BOOTSTRAP_SEED) -> pd.DataFrame:
    """Per (instrument, scorer, method, direction, gamma): per target the target shift (95% CI),
    ``target_moved``, NLR (and CWL, NGLR for values), ``valid`` (1.0 / 0.0 / NaN: the
    instrument passed / failed / was not checked for that target on this model); then one
    ``target == "mean"`` row: NLR, CWL and NGLR averaged over the targets that moved (``n_moved``
    of ``n_targets``), the signed target shift averaged over all targets, ``valid`` 0.0 if any
    target failed (``n_failed`` of them).

    Each ratio carries a percentile bootstrap interval over items (``*_ci_low``, ``*_ci_high``;
    ``draws`` replicates from :func:`bootstrap_ratios`); the mean row's interval bootstraps the
    mean over the targets that moved, with the same resampled items for every target and method,
    so two methods' intervals rest on the same replicates.

    ``shifts`` may pass precomputed :func:`score_shifts` per (instrument, scorer).
    """
    verdict = _verdicts(validity)
    records = []
    for instrument, scorer in questionnaire_pairs(rows):
        sh = shifts.get((instrument, scorer)) if shifts is not None else None
        if sh is None:
            sh = score_shifts(rows, instrument, scorer)
        if sh.empty:
            continue
        paired = _paired_items(rows, instrument, scorer)
        joined = paired[0] if paired is not None else None
        scale = float(sh["range"].iloc[0]) if str(sh["units"].iloc[0]) == "range" else 1.0
        combos = sh[sh["method"] != "none"][["method", "direction", "gamma"]].drop_duplicates()
        methods = method_order(sh["method"])
        combos = combos.assign(m_order=combos["method"].map(methods.index),
                               d_order=combos["direction"].map({"up": 0, "down": 1}).fillna(2))
        combos = combos.sort_values(["m_order", "d_order", "gamma"])
        for method, direction, gamma in combos[["method", "direction", "gamma"]].itertuples(index=False):
            L = leakage_matrix(sh, method, direction, float(gamma), eps=eps)
            if L.empty:
                continue
            n_l, c_l, g_l = nlr(L), cwl(L), nglr(L)
            part = sh[(sh["method"] == method) & (sh["direction"] == direction)
                      & np.isclose(sh["gamma"].astype(float), float(gamma))]
            common = {"instrument": instrument, "scorer": scorer, "method": method, "direction": direction,
                      "gamma": float(gamma), "n_seeds": int(part["n_seeds"].max()),
                      "units": str(part["units"].iloc[0])}
            target_records = []
            replicates: dict[str, dict[str, np.ndarray]] = {}
            for t in L.index:
                flag = verdict.get((instrument, scorer, t))
                groups = part.loc[part["concept"] == t, "condition"]
                replicates[t] = bootstrap_ratios(
                    _item_diffs(joined, t, str(groups.iloc[0])) if joined is not None and len(groups) else {},
                    t, instrument, scorer, scale=scale, eps=eps, draws=draws, seed=seed)
                bounds = {f"{name}_ci_{end}": value for name in RATIOS
                          for end, value in zip(("low", "high"), _interval(replicates[t][name]), strict=True)}
                target_records.append({
                    **common, "target": t, "delta_target": L.at[t, "delta_target"],
                    "ci_low": L.at[t, "ci_low_target"], "ci_high": L.at[t, "ci_high_target"],
                    "target_moved": bool(L.at[t, "target_moved"]), "nlr": n_l[t], "cwl": c_l[t],
                    "nglr": g_l[t], **bounds, "valid": math.nan if flag is None else float(flag),
                    "n_failed": int(flag is False),
                    "n_targets": 1, "n_moved": int(bool(L.at[t, "target_moved"])),
                    "num_neurons": float(part.loc[part["concept"] == t, "num_neurons"].mean()),
                })
            records.extend(target_records)
            frame = pd.DataFrame(target_records)
            ok = frame[frame["target_moved"]]
            mean_bounds = {}
            for name in RATIOS:
                reps = [replicates[t][name] for t in ok["target"] if np.isfinite(replicates[t][name]).all()]
                usable = len(reps) == len(ok) and len(reps) > 0
                lo, hi = _interval(np.mean(reps, axis=0)) if usable else (math.nan, math.nan)
                mean_bounds.update({f"{name}_ci_low": lo, f"{name}_ci_high": hi})
            records.append({
                **common, "target": AVERAGE, "delta_target": float(frame["delta_target"].mean()),
                "ci_low": math.nan, "ci_high": math.nan, "target_moved": bool(len(ok)),
                "nlr": float(ok["nlr"].mean()) if len(ok) else math.nan,
                "cwl": float(ok["cwl"].mean()) if ok["cwl"].notna().any() else math.nan,
                "nglr": float(ok["nglr"].mean()) if ok["nglr"].notna().any() else math.nan,
                **mean_bounds, "valid": _all_valid(list(frame["valid"])), "n_failed": int(frame["n_failed"].sum()),
                "n_targets": len(frame), "n_moved": len(ok),
                "num_neurons": float(frame["num_neurons"].mean()),
            })
    return pd.DataFrame(records, columns=TABLE_COLUMNS)


# ---------------------------------------------------------------------------------------------
# before any generation: the overlap of the selected neurons


def localized_concepts(run: Run, method: str = "dpnle") -> list[str]:
    """Concepts with a ``method`` localization in the run, in dpnle's concept order."""
    folder = run.path / "neurons"
    if not folder.is_dir():
        return []
    found = [c for c in ALL_CONCEPTS if run.neurons_path(c, method).exists()]
    return concept_order(found)


def neuron_overlap(run: Run, method: str = "dpnle") -> pd.DataFrame:
    """Jaccard overlap and shared / opposite-pole counts of the concepts' selected neurons.

    Recomputed from the neurons Parquet files (cheap; always matches them), falling back on the
    table localize stored when fewer than two localizations are readable.
    """
    from dpnle import localize as loc

    concepts = localized_concepts(run, method)
    if len(concepts) >= 2:
        return loc.overlap_table(run, concepts, method)
    stored = loc.overlap_path(run, method)
    if stored.exists():
        return read_parquet(stored)
    return pd.DataFrame(columns=["concept_a", "concept_b", "n_a", "n_b", "shared", "shared_opposite_pole",
                                 "jaccard"])
