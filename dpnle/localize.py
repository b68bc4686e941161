"""Stage 2: which neurons carry a concept. DPN-LE selection, the NPTI and CAA baselines'
selection, and the overlap of the selected sets across concepts.

Everything here is statistics over the capture cache written by :mod:`dpnle.collect`
(``activations/<concept>/<site>-<policy>/``): vectorized numpy over ``[layers, neurons]``,
no model, so changing a threshold re-runs in seconds.

DPN-LE, as in the reference code (``prepare_steering.py`` / ``inference.py``), per layer l:

- ``delta = mean_high - mean_low``; Cohen's d with the pooled, unbiased variance (+1e-8);
- keep neuron i if ``|delta_i| > quantile(|delta_l|, q)`` (numpy's default linear
  interpolation, strict) and ``|d_i| > tau`` (strict); ``d > 0`` is HIGH, ``d < 0`` is LOW;
- DPN-LE_w weights ``w = 0.75 + 0.25 * rank(|d|) / (n - 1)``. The reference ranks the neurons
  it is about to edit *in one layer* (``compute_cohens_d_weights`` runs once per layer on that
  layer's edited indices), with ordinal ranks (``argsort().argsort()``). So the stored
  ``weight`` column ranks each layer's selected set, HIGH and LOW together (the "both" edit
  mode, the paper's default); :func:`edit_vectors` re-ranks within a pole for the
  "directional" mode. Ties in |d| are broken by neuron index (stable ordinal ranks, i.e.
  ``scipy.stats.rankdata(method="ordinal")``); a layer with one selected neuron gets 1.0.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dpnle.arch import parse_layers
from dpnle.concepts import ALL_CONCEPTS, cli_flag
from dpnle.paths import project_configs_dir
from dpnle.runs import (
    ArtifactError,
    InputError,
    Run,
    parquet_metadata,
    read_json,
    read_parquet,
    remove_temp_files,
    write_parquet,
)
from dpnle.stats import LayerStats, cohens_d
from dpnle.vocab import (
    LOCALIZATION_METHODS,
    MODES,
    NPTI_SELECTIONS,
    LocalizationMethod,
    Mode,
    NptiSelection,
    check_choice,
)

# The localization methods (defined in dpnle.vocab).
METHODS = LOCALIZATION_METHODS
# (site, policy) of the capture each method reads.
METHOD_CAPTURE: dict[str, tuple[str, str]] = {
    "dpnle": ("mlp", "last"),
    "npti": ("gate", "response-mean"),
    "caa": ("resid", "last"),
}
WEIGHT_MIN, WEIGHT_MAX = 0.75, 1.0

DPNLE_COLUMNS = (
    "layer",
    "neuron",
    "mean_high",
    "mean_low",
    "var_high",
    "var_low",
    "n_high",
    "n_low",
    "delta",
    "cohens_d",
    "selected",
    "pole",
    "weight",
)


# ---------------------------------------------------------------------------------------------
# per-model defaults


def model_defaults(model_id: str, config_path: Path | None = None) -> dict[str, Any]:
    """Localization defaults for ``model_id`` from configs/models.yaml (or ``config_path``).

    Returns ``{"layers", "d_threshold", "quantile", "pattern", "config"}``; ``pattern`` is the
    fnmatch pattern that matched (case-insensitive), or None when the default applied.
    """
    import yaml

    path = Path(config_path) if config_path is not None else project_configs_dir() / "models.yaml"
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ArtifactError(f"The per-model defaults file {path} is missing.") from None
    default = {"layers": "auto", "d_threshold": 0.8, "quantile": 0.995, **(config.get("default") or {})}
    key = str(model_id).lower()
    for entry in config.get("models") or []:
        pattern = str(entry["pattern"])
        if fnmatch.fnmatchcase(key, pattern.lower()):
            values = {k: v for k, v in entry.items() if k != "pattern"}
            return {
                **default,
                **values,
                "layers": str(values.get("layers", default["layers"])),
                "pattern": pattern,
                "config": str(path),
            }
    return {**default, "layers": str(default["layers"]), "pattern": None, "config": str(path)}


# ---------------------------------------------------------------------------------------------
# DPN-LE


def check_parameters(
    method: LocalizationMethod = "dpnle",
    quantile: float | None = None,
    d_threshold: float | None = None,
    top_k: int | None = None,
) -> None:
    """Refuse a method or threshold that cannot select anything meaningful (None: not given)."""
    check_choice("localization method", method, METHODS, hint="(e.g. --method dpnle)")
    if quantile is not None:
        q = float(quantile)
        if not 0.0 < q < 1.0:  # also refuses NaN
            raise InputError(f"quantile must be strictly between 0 and 1, not {quantile}: pass e.g. "
                             "--quantile 0.995 (keep the top 0.5% of |delta| per layer).")
    if d_threshold is not None:
        d = float(d_threshold)
        if not (d >= 0.0 and math.isfinite(d)):
            raise InputError(f"d_threshold must be a finite number >= 0, not {d_threshold}: pass e.g. "
                             "--d-threshold 0.8 (|Cohen's d| above it).")
    if top_k is not None and int(top_k) < 1:
        raise InputError(f"top_k must be at least 1, not {top_k}.")


def _layer_rows(stats: LayerStats, layers: Sequence[int]) -> np.ndarray:
    position = {int(layer): i for i, layer in enumerate(stats.layers)}
    missing = [int(layer) for layer in layers if int(layer) not in position]
    if missing:
        raise ArtifactError(
            f"The {stats.site}-{stats.policy} capture of {stats.concept!r} has no statistics for "
            f"layer(s) {missing}; it holds layers {_ranges(stats.layers)}. Pass --layers within "
            "those, or re-run collect-activations with those layers."
        )
    return np.array([position[int(layer)] for layer in layers], dtype=np.int64)


def _ranges(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    layers = sorted(int(x) for x in layers)
    if not layers:
        return "none"
    parts, start, prev = [], layers[0], layers[0]
    for x in layers[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if x is not None:
            start = prev = x
    return ",".join(parts)


def rank_weights(abs_d: np.ndarray, groups: np.ndarray, neuron: np.ndarray | None = None) -> np.ndarray:
    """DPN-LE_w weights ``0.75 + 0.25 * rank / (n - 1)`` within each group.

    Ordinal ranks of ``abs_d`` (0 = smallest) inside each value of ``groups``; ties broken by
    ``neuron`` (then input order). A group of one gets 1.0.
    """
    abs_d = np.asarray(abs_d, dtype=np.float64)
    groups = np.asarray(groups)
    n = abs_d.shape[0]
    weights = np.empty(n, dtype=np.float64)
    if n == 0:
        return weights
    tiebreak = np.arange(n) if neuron is None else np.asarray(neuron)
    order = np.lexsort((np.arange(n), tiebreak, abs_d, groups))
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    sizes = np.diff(np.r_[starts, n])
    group_start = np.repeat(starts, sizes)
    group_size = np.repeat(sizes, sizes)
    rank = np.arange(n) - group_start
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(
            group_size > 1, WEIGHT_MIN + (WEIGHT_MAX - WEIGHT_MIN) * rank / (group_size - 1), WEIGHT_MAX
        )
    weights[order] = w
    return weights


def select_dpnle(
    stats: LayerStats,
    layers: Sequence[int] | None = None,
    quantile: float = 0.995,
    d_threshold: float = 0.8,
) -> pd.DataFrame:
    """DPN-LE selection over ``layers`` (all captured layers when None).

    One row per (layer, neuron) of the chosen layers, selected or not, so the thresholds can be
    inspected; ``pole`` is null and ``weight`` NaN for unselected neurons.
    """
    check_parameters("dpnle", quantile=quantile, d_threshold=d_threshold)
    layers = list(stats.layers) if layers is None else [int(x) for x in layers]
    rows = _layer_rows(stats, layers)
    mean_high = np.asarray(stats.mean_high, dtype=np.float64)[rows]
    mean_low = np.asarray(stats.mean_low, dtype=np.float64)[rows]
    var_high = np.asarray(stats.var_high, dtype=np.float64)[rows]
    var_low = np.asarray(stats.var_low, dtype=np.float64)[rows]
    n_high = np.asarray(stats.n_high, dtype=np.int64)[rows]
    n_low = np.asarray(stats.n_low, dtype=np.int64)[rows]
    n_layers, width = mean_high.shape

    delta = mean_high - mean_low
    d = cohens_d(mean_high, mean_low, var_high, var_low, n_high, n_low)
    abs_delta = np.abs(delta)
    cut = np.quantile(abs_delta, quantile, axis=1, keepdims=True)
    selected = (abs_delta > cut) & (np.abs(d) > d_threshold)

    layer_col = np.repeat(np.asarray(layers, dtype=np.int16), width)
    neuron_col = np.tile(np.arange(width, dtype=np.int32), n_layers)
    sel = selected.ravel()
    d_flat = d.ravel()
    pole = np.full(sel.shape[0], None, dtype=object)
    pole[sel & (d_flat > 0)] = "high"
    pole[sel & (d_flat < 0)] = "low"
    weight = np.full(sel.shape[0], np.nan)
    idx = np.flatnonzero(sel)
    weight[idx] = rank_weights(np.abs(d_flat[idx]), layer_col[idx], neuron_col[idx])

    return pd.DataFrame(
        {
            "layer": layer_col,
            "neuron": neuron_col,
            "mean_high": mean_high.ravel(),
            "mean_low": mean_low.ravel(),
            "var_high": var_high.ravel(),
            "var_low": var_low.ravel(),
            "n_high": np.repeat(n_high, width),
            "n_low": np.repeat(n_low, width),
            "delta": delta.ravel(),
            "cohens_d": d_flat,
            "selected": sel,
            "pole": pd.array(pole, dtype="string"),
            "weight": weight,
        }
    )


# ---------------------------------------------------------------------------------------------
# automatic start layer


def probe_accuracy(x: np.ndarray, is_high: np.ndarray, train: np.ndarray) -> float:
    """Held-out accuracy of a nearest-class-mean probe; units standardized with train stats."""
    x = np.asarray(x, dtype=np.float32)
    train_x = x[train]
    mu = train_x.mean(axis=0)
    sd = train_x.std(axis=0)
    sd[~(sd > 0)] = 1.0
    z = (x - mu) / sd
    high_centre = z[train & is_high].mean(axis=0)
    low_centre = z[train & ~is_high].mean(axis=0)
    test = ~train
    zt = z[test]
    # nearer to the high centre  <=>  z . (c_h - c_l) > (|c_h|^2 - |c_l|^2) / 2
    direction = (high_centre - low_centre).astype(np.float64)
    offset = 0.5 * (float(high_centre @ high_centre) - float(low_centre @ low_centre))
    predicted_high = zt.astype(np.float64) @ direction > offset
    return float(np.mean(predicted_high == is_high[test]))


def pair_split(pair_ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """A boolean train mask: half the pairs (seeded), both sides of a pair on the same side."""
    pairs = np.unique(np.asarray(pair_ids))
    if pairs.shape[0] < 2:
        raise ArtifactError(
            f"The probe needs at least two contrastive pairs; the capture has {pairs.shape[0]}."
        )
    rng = np.random.default_rng(seed)
    shuffled = pairs[rng.permutation(pairs.shape[0])]
    train_pairs = shuffled[: pairs.shape[0] // 2]
    return np.isin(pair_ids, train_pairs)


def start_layer_rule(accuracy: Mapping[int, float], threshold: float) -> tuple[int, str, bool]:
    """The start layer from per-layer probe accuracies: (layer, rule, reached threshold).

    1. ``sustained``: the first layer that reaches the threshold and from which the mean
       accuracy over it and every later layer stays at or above it (a mean, not a minimum:
       one noisy dip near the top must not push the start to the last layers);
    2. ``first_crossing``: otherwise the first layer that reaches it (later layers fall off);
    3. ``max_accuracy``: otherwise the most separable layer (below threshold; flagged).
    """
    layers = sorted(accuracy)
    acc = np.array([accuracy[layer] for layer in layers])
    ok = acc >= threshold
    tail_mean = np.cumsum(acc[::-1])[::-1] / np.arange(len(acc), 0, -1)
    sustained = np.flatnonzero(ok & (tail_mean >= threshold))
    if sustained.size:
        return layers[int(sustained[0])], "sustained", True
    if ok.any():
        return layers[int(np.argmax(ok))], "first_crossing", True
    return layers[int(np.argmax(acc))], "max_accuracy", False


def auto_start_layer(
    run: Run,
    concept: str,
    site: str = "mlp",
    policy: str = "last",
    threshold: float = 0.9,
    seed: int = 0,
    stats: LayerStats | None = None,
) -> tuple[int, dict[str, Any]]:
    """The first layer from which high and low separate, from the per-sample activations.

    Per layer, a nearest-class-mean probe is fit on half the pairs (seeded split by pair_id;
    every unit standardized with the training half's mean and sd) and scored on the other
    half. See :func:`start_layer_rule` for how the accuracies become a layer. ``stats`` (the
    capture's, if already loaded) only saves reading them again.
    """
    from dpnle import collect

    if stats is None:
        stats = collect.load_stats(run, concept, site=site, policy=policy)
    accuracy: dict[int, float] = {}
    train = is_high = pair_ids = None
    try:
        for samples, chunk in _activation_chunks(run, stats):
            if train is None:
                pair_ids = samples["pair_id"].to_numpy()
                is_high = samples["pole"].astype(str).str.lower().to_numpy() == "high"
                train = pair_split(pair_ids, seed)
            for layer, acts in chunk.items():
                accuracy[layer] = probe_accuracy(acts, is_high, train)
    except ArtifactError as exc:
        raise ArtifactError(
            f"--layers auto needs the per-sample activations of {concept!r} ({site}-{policy}): {exc} "
            "Pass --layers explicitly (e.g. --layers 12-31), or re-run collect-activations."
        ) from None
    start, rule, reached = start_layer_rule(accuracy, threshold)
    info = {
        "rule": rule,
        "description": _AUTO_RULES[rule].format(threshold=threshold),
        "probe": "nearest class mean, units standardized on the training half",
        "threshold": threshold,
        "seed": seed,
        "reached_threshold": reached,
        "train_pairs": int(np.unique(pair_ids[train]).shape[0]),
        "test_pairs": int(np.unique(pair_ids[~train]).shape[0]),
        "accuracy_per_layer": {str(k): round(v, 6) for k, v in accuracy.items()},
        "start_layer": start,
    }
    return start, info


_AUTO_RULES = {
    "sustained": "first layer with held-out probe accuracy >= {threshold} whose mean accuracy over it and all "
                 "later layers stays >= {threshold}",
    "first_crossing": "first layer with held-out probe accuracy >= {threshold} (later layers dip below it)",
    "max_accuracy": "no layer reaches {threshold}: the layer with the highest held-out probe accuracy",
}


# ---------------------------------------------------------------------------------------------
# NPTI


def _top_k(score: np.ndarray, k: int, per_layer: bool) -> np.ndarray:
    """Boolean mask of the k largest ``score`` values (ties: lower layer, then lower neuron)."""
    mask = np.zeros(score.shape, dtype=bool)
    if per_layer:
        kk = min(k, score.shape[1])
        order = np.argsort(-score, axis=1, kind="stable")[:, :kk]
        np.put_along_axis(mask, order, True, axis=1)
    else:
        flat = np.argsort(-score.ravel(), kind="stable")[: min(k, score.size)]
        mask.ravel()[flat] = True
    return mask


DEFAULT_NPTI_SELECTION: NptiSelection = "reference"
NPTI_MAX_LINES = 300_000  # process_neuron.py reads at most this many lines of a sorted list
NPTI_REFERENCE_RULE = (
    "NPTI process_neuron.py: firing rate p = tokens with act > 0 / tokens, pooled over all tokens of a pole "
    "(float32, as the reference divides); HIGH list = p_high - p_low, LOW list = p_low - p_high, each sorted "
    "descending over all chosen layers together (ties: lower layer, then lower neuron); keep the first top_k, "
    "then continue while delta >= min_delta_p, stopping at the first below (at most 300,000 rows read); "
    "v95 = lower edge of the first histogram bin of the neuron's pole whose cumulative count >= 0.95 x total"
)


def _collect_hint(stats: LayerStats) -> str:
    flag = cli_flag(stats.concept)
    return (
        f"dpnle collect-activations {flag} --site gate --policy response-mean --npti-protocol reference "
        "--overwrite"
    )


def _npti_reference_keep(delta: np.ndarray, top_k: int, min_delta: float, max_lines: int = NPTI_MAX_LINES) -> int:
    """How many rows of the descending ``delta`` NPTI's ``read_and_convert_to_dict`` keeps: the
    first ``top_k`` whatever their value, then rows while ``delta >= min_delta``."""
    n = min(int(delta.shape[0]), int(max_lines))
    keep = min(int(top_k), n)
    below = np.flatnonzero(~(np.asarray(delta[keep:n], dtype=np.float64) >= float(min_delta)))
    return n if below.size == 0 else keep + int(below[0])


def _select_npti_reference(
    stats: LayerStats, layers: list[int], rows: np.ndarray, top_k: int, min_delta_p: float
) -> pd.DataFrame:
    """:func:`select_npti` with ``selection="reference"`` (see :data:`NPTI_REFERENCE_RULE`)."""
    from dpnle.stats import npti_quantile

    missing = [name for name in ("pos_count_high", "pos_count_low", "token_count_high", "token_count_low",
                                 "hist_high", "hist_low") if getattr(stats, name) is None]
    if missing:
        raise ArtifactError(
            f"The {stats.site}-{stats.policy} capture of {stats.concept!r} has no pooled token counts or "
            f"histograms ({', '.join(missing)} missing): it was made before dpnle kept them, or at another site "
            f"or policy. NPTI's reference selection needs them: re-capture with `{_collect_hint(stats)}`, or "
            "localize with --npti-selection per-layer (per-sample firing fractions, per-sample v95)."
        )
    tokens = {
        "high": np.asarray(stats.token_count_high, dtype=np.int64)[rows],
        "low": np.asarray(stats.token_count_low, dtype=np.int64)[rows],
    }
    for pole, count in tokens.items():
        if (count <= 0).any():
            empty = [layers[i] for i in np.flatnonzero(count <= 0)]
            raise ArtifactError(
                f"The {pole} pole of the {stats.site}-{stats.policy} capture of {stats.concept!r} counted no token "
                f"at layer(s) {empty} (every response one token long?), so NPTI's firing rate is 0/0 there. "
                f"Re-capture with longer responses (`{_collect_hint(stats)}`)."
            )
    # float32, as the reference divides its int32 over_zero by token_num.
    p32 = {
        pole: np.asarray(getattr(stats, f"pos_count_{pole}"))[rows].astype(np.float32)
        / tokens[pole].astype(np.float32)[:, None]
        for pole in ("high", "low")
    }
    n_layers, width = p32["high"].shape
    flat_index = np.arange(n_layers * width)
    lists: dict[str, np.ndarray] = {}
    for pole, other in (("high", "low"), ("low", "high")):
        diff = (p32[pole] - p32[other]).ravel()  # float32
        order = np.lexsort((flat_index, -diff))  # descending; ties: lower layer, then lower neuron
        keep = _npti_reference_keep(diff[order], top_k, min_delta_p)
        lists[pole] = order[:keep]
    both = np.intersect1d(lists["high"], lists["low"])
    if both.size:
        first = [(layers[i // width], int(i % width)) for i in both[:5]]
        raise ArtifactError(
            f"NPTI's reference selection put {both.size} neuron(s) of {stats.concept!r} in both the HIGH and the "
            f"LOW list (first (layer, neuron): {first}): each list keeps its first {top_k} rows whatever their "
            f"delta, and fewer than {top_k} neurons have a positive delta on one side, so zero-delta neurons fill "
            "both. The reference would edit them both ways; dpnle refuses. Capture more pairs or layers, or pass a "
            "smaller top_k / --npti-selection per-layer."
        )
    pole = np.full(n_layers * width, None, dtype=object)
    v95 = np.full(n_layers * width, np.nan)
    for name, picked in lists.items():
        pole[picked] = name
        hist = np.asarray(getattr(stats, f"hist_{name}"))[rows[picked // width], picked % width]  # [picked, 301]
        v95[picked] = npti_quantile(hist)
    bad = np.flatnonzero(np.isneginf(v95))
    if bad.size:
        first = [(layers[i // width], int(i % width), pole[i]) for i in bad[:5]]
        raise ArtifactError(
            f"NPTI's reference selection of {stats.concept!r} picked {bad.size} neuron(s) whose v95 is -inf (first "
            f"(layer, neuron, pole): {first}): 95% or more of their pole's tokens are <= 0, so the histogram's "
            "first bin (-inf, 0] holds the 95th percentile and its lower edge is -inf; the edit a += gamma * v95 * "
            "... would be -inf. They come from the first top_k rows, kept whatever their delta: capture more pairs, "
            "or pass a smaller top_k / --npti-selection per-layer."
        )
    selected = np.zeros(n_layers * width, dtype=bool)
    selected[lists["high"]] = True
    selected[lists["low"]] = True
    p_high, p_low = p32["high"].astype(np.float64), p32["low"].astype(np.float64)
    return pd.DataFrame(
        {
            "layer": np.repeat(np.asarray(layers, dtype=np.int16), width),
            "neuron": np.tile(np.arange(width, dtype=np.int32), n_layers),
            "p_high": p_high.ravel(),
            "p_low": p_low.ravel(),
            "delta_p": (p32["high"] - p32["low"]).astype(np.float64).ravel(),
            "pole": pd.array(pole, dtype="string"),
            "v95": v95,
            "selected": selected,
        }
    )


def select_npti(
    stats_gate_response: LayerStats,
    activations: tuple[pd.DataFrame, Mapping[int, np.ndarray]] | None = None,
    top_k: int = 2000,
    min_delta_p: float = 0.1,
    per_layer: bool = True,
    layers: Sequence[int] | None = None,
    selection: NptiSelection = "per-layer",
) -> pd.DataFrame:
    """NPTI selection: ``delta_p = P(act > 0 | high) - P(act > 0 | low)`` at the gate site.

    ``selection="reference"``: NPTI's own rule (RUCAIBox/NPTI ``process_neuron.py``;
    :data:`NPTI_REFERENCE_RULE`), from the capture's pooled token counts and histograms
    (``stats.pos_count_*``, ``token_count_*``, ``hist_*``; a capture without them is an
    :class:`ArtifactError` naming the re-capture command): one list per direction over all
    ``layers`` together, the first ``top_k`` rows kept unconditionally, then rows while delta >=
    ``min_delta_p``. ``per_layer`` and ``activations`` are not used. A neuron in both lists, or a
    selected neuron with v95 = -inf, is an error. ``p_high`` / ``p_low`` / ``delta_p`` are then the
    pooled float32 rates (as float64 numbers), and v95 the lower edge of the histogram bin that
    holds the 95th percentile of the neuron's own pole (:func:`dpnle.stats.npti_quantile`).

    ``selection="per-layer"`` (this function's default, dpnle's earlier rule), described next:

    HIGH: the ``top_k`` largest delta_p, LOW: the ``top_k`` largest -delta_p, each then kept
    only where ``|delta_p| >= min_delta_p``. ``per_layer=True`` (default) takes the top k in
    each layer: the NPTI neuron lists that the DPN-LE repository ships for Llama-3-8B
    (data/npti_neuron_results/<Trait>_dict.json, keyed by layer) hold about 21k neurons per
    direction, the "~21k / 22k" of the DPN-LE paper, which a top 2,000 over all layers could
    never give. ``per_layer=False`` ranks over all layers (at most ``top_k`` per direction).

    ``v95`` is the 95th percentile of a HIGH neuron's activation over the high samples (LOW:
    over the low samples), from ``activations`` = ``(samples, {layer: [n_samples, width]})``
    as :func:`dpnle.collect.load_activations` returns (a lazy mapping is fine: each layer is
    read once). Without it, v95 is NaN.
    """
    stats = stats_gate_response
    check_choice("NPTI selection", selection, NPTI_SELECTIONS)
    if selection == "reference":
        chosen = list(stats.layers) if layers is None else [int(x) for x in layers]
        return _select_npti_reference(stats, chosen, _layer_rows(stats, chosen), top_k, min_delta_p)
    if stats.pos_frac_high is None or stats.pos_frac_low is None:
        raise ArtifactError(
            f"The {stats.site}-{stats.policy} capture of {stats.concept!r} has no P(act > 0) "
            "statistics; NPTI needs the gate site captured over response tokens "
            "(collect-activations --site gate --policy response-mean)."
        )
    layers = list(stats.layers) if layers is None else [int(x) for x in layers]
    rows = _layer_rows(stats, layers)
    p_high = np.asarray(stats.pos_frac_high, dtype=np.float64)[rows]
    p_low = np.asarray(stats.pos_frac_low, dtype=np.float64)[rows]
    delta_p = p_high - p_low
    n_layers, width = delta_p.shape
    high = _top_k(delta_p, top_k, per_layer) & (delta_p >= min_delta_p) & (delta_p > 0)
    low = _top_k(-delta_p, top_k, per_layer) & (-delta_p >= min_delta_p) & (delta_p < 0)

    layer_col = np.repeat(np.asarray(layers, dtype=np.int16), width)
    neuron_col = np.tile(np.arange(width, dtype=np.int32), n_layers)
    high_f, low_f = high.ravel(), low.ravel()
    pole = np.full(high_f.shape[0], None, dtype=object)
    pole[high_f] = "high"
    pole[low_f] = "low"
    v95 = np.full(high_f.shape[0], np.nan)
    if activations is not None:
        samples, by_layer = activations
        sample_pole = samples["pole"].astype(str).str.lower().to_numpy()
        for i, layer in enumerate(layers):
            h_idx = np.flatnonzero(high[i])
            l_idx = np.flatnonzero(low[i])
            if h_idx.size == 0 and l_idx.size == 0:
                continue
            acts = np.asarray(by_layer[layer])
            base = i * width
            if h_idx.size:
                v95[base + h_idx] = np.percentile(acts[sample_pole == "high"][:, h_idx], 95, axis=0)
            if l_idx.size:
                v95[base + l_idx] = np.percentile(acts[sample_pole == "low"][:, l_idx], 95, axis=0)
    return pd.DataFrame(
        {
            "layer": layer_col,
            "neuron": neuron_col,
            "p_high": p_high.ravel(),
            "p_low": p_low.ravel(),
            "delta_p": delta_p.ravel(),
            "pole": pd.array(pole, dtype="string"),
            "v95": v95,
            "selected": high_f | low_f,
        }
    )


# ---------------------------------------------------------------------------------------------
# CAA


def caa_layer_scores(stats_resid: LayerStats) -> dict[int, float]:
    """Separation per layer: ``||delta|| / sqrt(mean_i pooled_var_i)``.

    The norm of the mean difference in units of the layer's typical within-class standard
    deviation, so layers are comparable although the residual stream grows with depth.
    """
    s = stats_resid
    delta = np.asarray(s.mean_high, np.float64) - np.asarray(s.mean_low, np.float64)
    n_h = np.asarray(s.n_high, np.float64)[:, None]
    n_l = np.asarray(s.n_low, np.float64)[:, None]
    dof = np.maximum(n_h + n_l - 2.0, 1.0)
    pooled = (
        (n_h - 1) * np.asarray(s.var_high, np.float64) + (n_l - 1) * np.asarray(s.var_low, np.float64)
    ) / dof
    score = np.linalg.norm(delta, axis=1) / np.sqrt(pooled.mean(axis=1) + 1e-8)
    return {int(layer): float(v) for layer, v in zip(s.layers, score, strict=True)}


def select_caa(stats_resid: LayerStats, layer: int | None = None) -> pd.DataFrame:
    """CAA: the residual-stream mean difference (high - low) at one layer.

    The layer is ``layer`` when given, else the one with the largest
    :func:`caa_layer_scores`. Returns one row per (layer, unit) of every captured layer with
    ``chosen`` true on the chosen layer (so a layer sweep needs no re-run);
    ``frame.attrs["caa"]`` holds ``{"layer", "rule", "score_per_layer"}``.
    """
    scores = caa_layer_scores(stats_resid)
    if layer is None:
        chosen = max(scores, key=lambda k: (scores[k], -k))
        rule = "argmax ||delta|| / sqrt(mean pooled variance)"
    else:
        chosen = int(layer)
        if chosen < 0:
            chosen += int(_num_layers(stats_resid) or len(stats_resid.layers))
        if chosen not in scores:
            raise ArtifactError(
                f"Layer {layer} is not in the resid capture of {stats_resid.concept!r} "
                f"(layers {_ranges(stats_resid.layers)})."
            )
        rule = "given"
    delta = np.asarray(stats_resid.mean_high, np.float64) - np.asarray(stats_resid.mean_low, np.float64)
    n_layers, width = delta.shape
    layer_col = np.repeat(np.asarray(stats_resid.layers, dtype=np.int16), width)
    frame = pd.DataFrame(
        {
            "layer": layer_col,
            "unit": np.tile(np.arange(width, dtype=np.int32), n_layers),
            "delta": delta.ravel(),
            "score": np.repeat([scores[int(x)] for x in stats_resid.layers], width),
            "chosen": layer_col == chosen,
        }
    )
    frame.attrs["caa"] = {
        "layer": chosen,
        "rule": rule,
        "score_per_layer": {str(k): v for k, v in scores.items()},
    }
    return frame


# ---------------------------------------------------------------------------------------------
# running it on a run


@dataclass
class LocalizeResult:
    concept: str
    method: str
    path: Path
    summary: pd.DataFrame  # per layer: layer, n_high, n_low, share (caa: layer, score, chosen)
    total_selected: int
    total_share: float  # of the model's MLP neurons over all layers (NaN for caa)
    params: dict[str, Any] = field(default_factory=dict)


def _num_layers(stats: LayerStats) -> int | None:
    model = (stats.meta or {}).get("model") or {}
    value = (
        (model.get("fingerprint") or {}).get("num_layers")
        or model.get("num_layers")
        or (stats.meta or {}).get("num_layers")
    )
    return int(value) if value else None


def _pairs_digest(stats: LayerStats) -> str | None:
    meta = stats.meta or {}
    return (meta.get("pairs") or {}).get("digest") or meta.get("pairs_digest")


def _run_model(run: Run) -> dict[str, Any]:
    return run.manifest().get("model") or {}


def _digest(model: Mapping[str, Any]) -> str | None:
    return model.get("digest") or (model.get("fingerprint") or {}).get("digest")


def _require_run_fingerprint(run: Run, digest: str | None, path: Path) -> None:
    if not digest:
        raise ArtifactError(
            f"Run {run.name} records no model fingerprint in {run.manifest_path}, so {path} cannot be checked "
            f"against the run's model. Run `dpnle collect-activations --run {run.name} ...` with the run's model "
            "(it records the fingerprint), or start a new run."
        )


def check_capture_model(run: Run, stats: LayerStats) -> None:
    """Refuse statistics captured from another model than the run's, or that name none."""
    run_model = _run_model(run)
    capture_model = (stats.meta or {}).get("model") or {}
    ours, theirs = _digest(run_model), _digest(capture_model)
    manifest = _stats_file(run, stats.concept, stats.site, stats.policy).parent / "manifest.json"
    _require_run_fingerprint(run, ours, manifest)
    if not theirs:
        raise ArtifactError(
            f"The {stats.site}-{stats.policy} capture of {stats.concept!r} ({manifest}) does not say which model "
            f"made it. Re-run dpnle collect-activations --run {run.name} {cli_flag(stats.concept)} --overwrite."
        )
    if ours != theirs:
        raise ArtifactError(
            f"The {stats.site}-{stats.policy} capture of {stats.concept!r} ({manifest}) was made with model "
            f"{capture_model.get('id')!r} (digest {theirs}), but run {run.name} records model "
            f"{run_model.get('id')!r} (digest {ours}) in {run.manifest_path}. Re-run collect-activations "
            "for this run with --overwrite, or localize in the run that made the capture."
        )


def _stats_file(run: Run, concept: str, site: str, policy: str) -> Path:
    from dpnle import collect

    for name in ("stats_path", "capture_dir"):
        fn = getattr(collect, name, None)
        if fn is not None:
            try:
                path = Path(fn(run, concept, site, policy))
            except TypeError:
                continue
            return path if path.suffix == ".parquet" else path / "stats.parquet"
    return run.activations_dir(concept) / f"{site}-{policy}" / "stats.parquet"


ACTIVATION_CHUNK_BYTES = 1 << 30


def _layer_chunks(
    stats: LayerStats, layers: Sequence[int], budget: int = ACTIVATION_CHUNK_BYTES
) -> list[list[int]]:
    """``layers`` in groups whose float32 activations fit ``budget`` bytes.

    collect.load_activations reads every shard whatever layers are asked, so asking for a
    few layers at a time bounds memory while keeping the number of passes small.
    """
    samples = int(
        (stats.meta or {}).get("num_samples") or (int(np.max(stats.n_high)) + int(np.max(stats.n_low)))
    )
    per_layer = max(1, samples * stats.width * 4)
    size = max(1, budget // per_layer)
    layers = list(layers)
    return [layers[i : i + size] for i in range(0, len(layers), size)]


def _activation_chunks(
    run: Run, stats: LayerStats, layers: Sequence[int] | None = None
) -> Iterator[tuple[pd.DataFrame, dict[int, np.ndarray]]]:
    from dpnle import collect

    for chunk in _layer_chunks(stats, stats.layers if layers is None else layers):
        yield collect.load_activations(run, stats.concept, site=stats.site, policy=stats.policy, layers=chunk)


class _ChunkedLayers(Mapping):
    """``{layer: [n_samples, width]}`` read from the capture a chunk of layers at a time."""

    def __init__(
        self, run: Run, stats: LayerStats, layers: Sequence[int], loaded: dict[int, np.ndarray] | None = None
    ):
        self._run, self._stats, self._layers = run, stats, list(layers)
        self._chunks = _layer_chunks(stats, self._layers)
        self._cache: dict[int, np.ndarray] = dict(loaded or {})

    def __getitem__(self, layer: int) -> np.ndarray:
        if layer not in self._cache:
            chunk = next((c for c in self._chunks if layer in c), None)
            if chunk is None:
                raise KeyError(layer)
            self._cache = next(_activation_chunks(self._run, self._stats, chunk))[1]
        return self._cache[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


def _npti_activations(run: Run, stats: LayerStats, layers: Sequence[int]):
    try:
        samples, first = next(_activation_chunks(run, stats, layers))
    except ArtifactError as exc:
        return None, f"no per-sample activations ({exc}); v95 left NaN"
    return (samples, _ChunkedLayers(run, stats, layers, first)), None


def _dpnle_summary(frame: pd.DataFrame, width: int) -> pd.DataFrame:
    sel = frame[frame["selected"]]
    summary = pd.DataFrame({"layer": pd.unique(frame["layer"])})
    counts = sel.groupby(["layer", "pole"], observed=True).size().unstack(fill_value=0)
    for pole in ("high", "low"):
        col = counts[pole] if pole in counts.columns else pd.Series(dtype=np.int64)
        summary[f"n_{pole}"] = summary["layer"].map(col).fillna(0).astype(np.int64)
    summary["share"] = (summary["n_high"] + summary["n_low"]) / width
    return summary


@dataclass
class _Capture:
    """The statistics a localization reads, and what the run and the capture say about the model."""

    stats: LayerStats
    site: str
    policy: str
    path: Path  # the statistics file, recorded as the localization's source
    run_model: dict[str, Any]  # the model run.json records
    model: dict[str, Any]  # the model the capture's manifest records
    num_layers: Any  # the model's layer count (capture, then run.json, then the highest captured layer + 1)
    width: int  # neurons per layer
    defaults: dict[str, Any]  # configs/models.yaml's localization defaults for the model


@dataclass
class _Selection:
    """A method's selection on one capture, before it is written."""

    frame: pd.DataFrame  # the rows neurons/<concept>[.method].parquet holds
    params: dict[str, Any]  # the method's parameters as used (defaults filled in)
    summary: pd.DataFrame  # as LocalizeResult.summary
    total: int
    total_share: float  # NaN for caa


def _read_capture(run: Run, concept: str, method: str) -> _Capture:
    """The capture ``method`` reads for ``concept``; refuses one made with another model than the run's."""
    from dpnle import collect

    site, policy = METHOD_CAPTURE[method]
    stats = collect.load_stats(run, concept, site=site, policy=policy)
    check_capture_model(run, stats)
    run_model = _run_model(run)
    capture_model = (stats.meta or {}).get("model") or {}
    model_id = run_model.get("id") or capture_model.get("id") or ""
    num_layers = (
        _num_layers(stats) or (run_model.get("fingerprint") or {}).get("num_layers") or max(stats.layers) + 1
    )
    width = int(np.asarray(stats.mean_high).shape[1])
    defaults = model_defaults(model_id)
    return _Capture(stats, site, policy, _stats_file(run, concept, site, policy), run_model, capture_model,
                    num_layers, width, defaults)


def _localize_dpnle(
    run: Run,
    concept: str,
    capture: _Capture,
    quantile: float | None,
    d_threshold: float | None,
    layers: str | None,
    auto_threshold: float,
    seed: int,
) -> _Selection:
    """DPN-LE on ``capture``: thresholds and layers default to the model's; ``layers="auto"`` starts
    at :func:`auto_start_layer`."""
    stats, defaults = capture.stats, capture.defaults
    quantile = float(defaults["quantile"] if quantile is None else quantile)
    d_threshold = float(defaults["d_threshold"] if d_threshold is None else d_threshold)
    spec = str(defaults["layers"] if layers is None else layers)
    params: dict[str, Any] = {}
    if spec.strip().lower() == "auto":
        start, auto = auto_start_layer(
            run, concept, site=capture.site, policy=capture.policy, threshold=auto_threshold, seed=seed, stats=stats
        )
        chosen_layers = [x for x in stats.layers if x >= start]
        params["auto"] = auto
    else:
        chosen_layers = _parse_layers(spec, int(capture.num_layers))
    frame = select_dpnle(stats, chosen_layers, quantile=quantile, d_threshold=d_threshold)
    params.update(
        quantile=quantile,
        d_threshold=d_threshold,
        layers_spec=spec,
        layers=_ranges(chosen_layers),
        weights="per layer over HIGH and LOW together; ordinal rank of |d|, ties by neuron",
    )
    total = int(frame["selected"].sum())
    return _Selection(frame, params, _dpnle_summary(frame, capture.width), total,
                      total / (int(capture.num_layers) * capture.width))


def _localize_npti(
    run: Run,
    capture: _Capture,
    layers: str | None,
    top_k: int,
    min_delta_p: float,
    top_k_per_layer: bool,
    npti_selection: str,
) -> _Selection:
    """NPTI's selection on ``capture`` over every captured layer, or ``layers``."""
    stats = capture.stats
    chosen_layers = list(stats.layers) if layers is None else _parse_layers(layers, int(capture.num_layers))
    check_choice("--npti-selection", npti_selection, NPTI_SELECTIONS)
    reference = npti_selection == "reference"
    activations, note = (None, None) if reference else _npti_activations(run, stats, chosen_layers)
    frame = select_npti(
        stats,
        activations,
        top_k=top_k,
        min_delta_p=min_delta_p,
        per_layer=top_k_per_layer,
        layers=chosen_layers,
        selection=npti_selection,
    )
    meta = stats.meta or {}
    params: dict[str, Any] = dict(
        npti_selection=npti_selection,
        top_k=top_k,
        top_k_scope="all chosen layers together (NPTI reference)" if reference
        else ("per layer" if top_k_per_layer else "all layers"),
        min_delta_p=min_delta_p,
        layers=_ranges(chosen_layers),
        firing_rate="pooled over tokens (float32)" if reference else "mean over samples of per-sample fractions",
        v95="lower edge of the 95% bin of the pole's 301-bin histogram (NPTI calculate_quantiles)" if reference
        else ("95th percentile of per-sample activations of the neuron's pole" if note is None else note),
        npti_protocol=meta.get("npti_protocol") or "dpnle",
        capture_generation=meta.get("generation"),
    )
    if reference:
        params.update(rule=NPTI_REFERENCE_RULE, tie_order="lower layer, then lower neuron",
                      max_rows_read=NPTI_MAX_LINES)
    total = int(frame["selected"].sum())
    return _Selection(frame, params, _dpnle_summary(frame, capture.width), total,
                      total / (int(capture.num_layers) * capture.width))


def _localize_caa(capture: _Capture, layer: int | None) -> _Selection:
    """CAA's layer on ``capture``: ``layer``, or the most separable one; the summary scores every layer."""
    frame = select_caa(capture.stats, layer)
    caa = frame.attrs.pop("caa")
    scores = caa["score_per_layer"]
    summary = pd.DataFrame({"layer": [int(k) for k in scores], "score": list(scores.values())}).assign(
        chosen=lambda t: t["layer"] == caa["layer"]
    )
    return _Selection(frame, dict(caa), summary, int(frame["chosen"].sum()), math.nan)


def _localization_metadata(
    concept: str, method: str, capture: _Capture, selection: _Selection, params: dict[str, Any]
) -> dict[str, Any]:
    """The provenance a neurons file carries: parameters, model, pairs and capture it was made from."""
    meta = capture.stats.meta or {}
    return {
        "stage": "localize",
        "concept": concept,
        "method": method,
        "parameters": params,
        "model": capture.model or capture.run_model,
        "pairs_digest": _pairs_digest(capture.stats),
        # How the capture's inputs were made: pair recipe, template, sampling and seed, tokenization.
        "inputs": {**(meta.get("pairs") or {}), "tokenization": meta.get("tokenization")},
        "source": str(capture.path),
        "total_selected": selection.total,
        "total_share": None if math.isnan(selection.total_share) else selection.total_share,
        "model_defaults": {k: v for k, v in capture.defaults.items() if k != "config"},
    }


def _write_localization(run: Run, concept: str, method: str, frame: pd.DataFrame, metadata: dict[str, Any]) -> Path:
    """Write ``neurons/<concept>[.method].parquet`` and record the localize stage in run.json."""
    remove_temp_files(run.neurons_path(concept, method))  # what a killed run left; never read
    path = write_parquet(run.neurons_path(concept, method), frame, metadata)
    run.record_stage(
        "localize",
        concept if method == "dpnle" else f"{concept}:{method}",
        "done",
        method=method,
        path=str(path.relative_to(run.path)),
        total_selected=metadata["total_selected"],
        total_share=metadata["total_share"],
        **metadata["parameters"],
    )
    return path


def localize_concept(
    run: Run,
    concept: str,
    method: str = "dpnle",
    quantile: float | None = None,
    d_threshold: float | None = None,
    layers: str | None = None,
    layer: int | None = None,
    top_k: int = 2000,
    min_delta_p: float = 0.1,
    top_k_per_layer: bool = True,
    auto_threshold: float = 0.9,
    seed: int = 0,
    npti_selection: str = DEFAULT_NPTI_SELECTION,
) -> LocalizeResult:
    """Localize ``concept`` in ``run`` with ``method`` and write ``neurons/<concept>[.method].parquet``.

    ``quantile``, ``d_threshold`` and ``layers`` default to configs/models.yaml for the run's
    model; ``layers="auto"`` starts at :func:`auto_start_layer` and runs to the last layer.
    NPTI uses every captured layer unless ``layers`` is given; CAA picks ``layer`` or the most
    separable one. ``npti_selection``: ``reference`` (default; NPTI's own rule over all chosen
    layers together, from pooled counts and histograms) or ``per-layer`` (dpnle's earlier rule:
    top ``top_k`` per layer, per-sample firing fractions and v95); see :func:`select_npti`.
    """
    check_parameters(method, quantile=quantile, d_threshold=d_threshold, top_k=top_k)
    capture = _read_capture(run, concept, method)
    if method == "dpnle":
        selection = _localize_dpnle(run, concept, capture, quantile, d_threshold, layers, auto_threshold, seed)
    elif method == "npti":
        selection = _localize_npti(run, capture, layers, top_k, min_delta_p, top_k_per_layer, npti_selection)
    else:
        selection = _localize_caa(capture, layer)
    params = {"site": capture.site, "policy": capture.policy, **selection.params}
    metadata = _localization_metadata(concept, method, capture, selection, params)
    path = _write_localization(run, concept, method, selection.frame, metadata)
    return LocalizeResult(concept, method, path, selection.summary, selection.total, selection.total_share, params)


def _parse_layers(spec: str, num_layers: int) -> list[int]:
    try:
        return parse_layers(spec, num_layers)
    except ValueError as exc:
        raise InputError(f"--layers {spec!r}: {exc} Pass e.g. --layers 0-{num_layers - 1}, 2,5 or auto.") from None


def load_selection(run: Run, concept: str, method: LocalizationMethod = "dpnle") -> pd.DataFrame:
    """The selected rows of a localization (CAA: the chosen layer's units).

    Refuses a neurons file that is unreadable, lacks the selection column, or was made from
    another model (or another pair set) than the run's: it would edit the wrong neurons."""
    path = run.neurons_path(concept, method)
    flag = "" if method == "dpnle" else f" --method {method}"
    command = f"dpnle localize --run {run.name} {cli_flag(concept)}{flag}"
    if not path.exists():
        raise ArtifactError(
            f"No {method} localization of {concept!r} in run {run.name} ({path}). Run `{command}` first."
        )
    try:
        meta = parquet_metadata(path)
        frame = read_parquet(path)
    except ArtifactError as exc:
        raise ArtifactError(f"{exc} For a neurons file: delete it and run `{command}` (seconds, no model).") from None
    column = "chosen" if method == "caa" else "selected"
    if column not in frame.columns:
        raise ArtifactError(
            f"{path} is not a {method} neurons file (it has no {column!r} column). Delete it and run `{command}`."
        )
    _check_selection_provenance(run, concept, method, path, meta, command)
    return frame[frame[column].to_numpy(dtype=bool)].reset_index(drop=True)


def _check_selection_provenance(
    run: Run, concept: str, method: str, path: Path, meta: Mapping[str, Any], command: str
) -> None:
    """A neurons file must come from this run's model and from the pairs its capture now holds."""
    run_model = _run_model(run)
    file_model = meta.get("model") or {}
    ours, theirs = _digest(run_model), _digest(file_model)
    # A missing provenance field is a refusal, never a skipped check.
    _require_run_fingerprint(run, ours, path)
    if not theirs:
        raise ArtifactError(
            f"{path} does not say which model it was localized on (its provenance metadata is missing), so it "
            f"cannot be checked against run {run.name}'s model. Delete it and run `{command}`."
        )
    if ours != theirs:
        raise ArtifactError(
            f"{path} was localized on model {file_model.get('id')!r} (digest {theirs}), but run {run.name} "
            f"records model {run_model.get('id')!r} (digest {ours}): it was copied from another run. Delete it "
            f"and run `{command}`, or edit in the run that made it."
        )
    site, policy = METHOD_CAPTURE.get(method, (None, None))
    # Imported lists (dpnle import-npti: NPTI's published neurons) come from no pairs of this run.
    if site is None or (method == "npti" and meta.get("imported") is True):
        return
    if not meta.get("pairs_digest"):
        raise ArtifactError(
            f"{path} does not say which contrastive pairs it was localized from (no pairs digest in its "
            f"metadata). Delete it and run `{command}`."
        )
    manifest_path = _stats_file(run, concept, site, policy).parent / "manifest.json"
    if not manifest_path.exists():
        return
    captured = (read_json(manifest_path).get("pairs") or {}).get("digest")
    if captured and captured != meta["pairs_digest"]:
        raise ArtifactError(
            f"{path} was localized from another pair set than the capture in {manifest_path.parent} now holds "
            f"(pairs digest {str(meta['pairs_digest'])[:12]} there, {str(captured)[:12]} in the capture). "
            f"Run `{command}` again."
        )


def edit_vectors(
    selection: pd.DataFrame, weighted: bool = False, mode: Mode = "both"
) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """The DPN-LE edit from a selection: ``{"high"|"low": {layer: (neuron int64, delta float32)}}``.

    ``weighted`` multiplies delta by the DPN-LE_w weight. ``mode="both"`` uses the stored
    weights (ranked over each layer's HIGH and LOW neurons together, as the reference does when
    it edits both); ``mode="directional"`` re-ranks within each (layer, pole), as the reference
    does when it edits HIGH alone to raise or LOW alone to lower. Neurons are in ascending order.
    """
    check_choice("edit mode", mode, MODES, error=ValueError)
    missing = {"layer", "neuron", "delta", "pole"} - set(selection.columns)
    if missing:
        raise ArtifactError(f"Not a DPN-LE selection: columns {sorted(missing)} are missing.")
    if "selected" in selection.columns:
        selection = selection[selection["selected"].to_numpy(dtype=bool)]
    layer = selection["layer"].to_numpy(dtype=np.int64)
    neuron = selection["neuron"].to_numpy(dtype=np.int64)
    delta = selection["delta"].to_numpy(dtype=np.float64)
    pole = selection["pole"].astype(str).to_numpy()
    if weighted:
        if mode == "both":
            weight = selection["weight"].to_numpy(dtype=np.float64)
        else:
            groups = layer * 2 + (pole == "low")
            weight = rank_weights(np.abs(selection["cohens_d"].to_numpy(dtype=np.float64)), groups, neuron)
        delta = delta * weight
    out: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {"high": {}, "low": {}}
    for name in ("high", "low"):
        mask = pole == name
        for lyr in np.unique(layer[mask]):
            m = mask & (layer == lyr)
            order = np.argsort(neuron[m], kind="stable")
            out[name][int(lyr)] = (neuron[m][order], delta[m][order].astype(np.float32))
    return out


# ---------------------------------------------------------------------------------------------
# across concepts


def _keys(selection: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    unit = "neuron" if "neuron" in selection.columns else "unit"
    keys = selection["layer"].to_numpy(np.int64) * (1 << 32) + selection[unit].to_numpy(np.int64)
    order = np.argsort(keys, kind="stable")
    pole = (
        selection["pole"].astype(str).to_numpy() if "pole" in selection.columns else np.full(keys.shape, "")
    )
    return keys[order], pole[order]


def overlap_from_selections(selections: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Overlap of every unordered pair of concepts' selected (layer, neuron) sets."""
    keyed = {c: _keys(s) for c, s in selections.items()}
    names = list(selections)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ka, pa = keyed[a]
            kb, pb = keyed[b]
            _, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
            shared = int(ia.shape[0])
            union = ka.shape[0] + kb.shape[0] - shared
            rows.append(
                {
                    "concept_a": a,
                    "concept_b": b,
                    "n_a": int(ka.shape[0]),
                    "n_b": int(kb.shape[0]),
                    "shared": shared,
                    "shared_opposite_pole": int(np.sum(pa[ia] != pb[ib])),
                    "jaccard": shared / union if union else math.nan,
                }
            )
    columns = ["concept_a", "concept_b", "n_a", "n_b", "shared", "shared_opposite_pole", "jaccard"]
    return pd.DataFrame(rows, columns=columns)


def overlap_table(run: Run, concepts: Sequence[str], method: str = "dpnle") -> pd.DataFrame:
    """Jaccard and shared / opposite-pole counts of the selected sets, for every pair of concepts."""
    return overlap_from_selections({c: load_selection(run, c, method) for c in concepts})


def overlap_matrix(table: pd.DataFrame, value: str = "jaccard") -> pd.DataFrame:
    """The symmetric concept x concept matrix of one overlap column (diagonal: 1 / n)."""
    names = list(dict.fromkeys([*table["concept_a"], *table["concept_b"]]))
    matrix = pd.DataFrame(np.nan, index=names, columns=names)
    for row in table.itertuples(index=False):
        v = getattr(row, value)
        matrix.loc[row.concept_a, row.concept_b] = v
        matrix.loc[row.concept_b, row.concept_a] = v
    for row in table.itertuples(index=False):
        if value == "jaccard":
            matrix.loc[row.concept_a, row.concept_a] = 1.0 if row.n_a else math.nan
            matrix.loc[row.concept_b, row.concept_b] = 1.0 if row.n_b else math.nan
        elif value == "shared":
            matrix.loc[row.concept_a, row.concept_a] = row.n_a
            matrix.loc[row.concept_b, row.concept_b] = row.n_b
    return matrix


def overlap_path(run: Run, method: str = "dpnle") -> Path:
    suffix = "" if method == "dpnle" else f".{method}"
    return run.path / "neurons" / f"overlap{suffix}.parquet"


def captured_concepts(run: Run, method: str = "dpnle") -> list[str]:
    """Concepts with a capture for ``method``'s site and policy, in dpnle's concept order."""
    site, policy = METHOD_CAPTURE[method]
    root = run.path / "activations"
    if not root.is_dir():
        return []
    found = [p.name for p in root.iterdir() if p.is_dir() and _stats_file(run, p.name, site, policy).exists()]
    known = [c for c in ALL_CONCEPTS if c in found]
    return known + sorted(c for c in found if c not in ALL_CONCEPTS)


def localize_all(run: Run, method: LocalizationMethod = "dpnle", **params: Any) -> list[LocalizeResult]:
    """Localize every captured concept, then write the overlap table (not for CAA)."""
    check_parameters(method, quantile=params.get("quantile"), d_threshold=params.get("d_threshold"))
    concepts = captured_concepts(run, method)
    if not concepts:
        site, policy = METHOD_CAPTURE[method]
        raise ArtifactError(
            f"Run {run.name} has no {site}-{policy} capture under {run.path / 'activations'}. "
            f"Run `dpnle collect-activations --run {run.name} ...` first."
        )
    results = [localize_concept(run, c, method=method, **params) for c in concepts]
    if method != "caa" and len(concepts) > 1:
        selections = {r.concept: load_selection(run, r.concept, method) for r in results}
        table = overlap_from_selections(selections)
        remove_temp_files(overlap_path(run, method))
        write_parquet(
            overlap_path(run, method),
            table,
            {
                "stage": "localize",
                "method": method,
                "concepts": concepts,
                "sources": {r.concept: str(r.path) for r in results},
            },
        )
    return results
