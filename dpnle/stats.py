"""Streaming per-neuron statistics and Cohen's d.

:class:`RunningMoments` keeps count, mean and M2 (sum of squared deviations) per unit in
float64 and never holds the activations themselves: a batch is reduced to its own mean and M2
(on the device the batch lives on, when it is a tensor) and merged with Chan et al.'s parallel
formula. The merge is exact in real arithmetic, so statistics computed per shard (or per
process) and merged equal one pass over everything; merging the same partials in the same
order gives bit-identical results, which is what makes a resumed capture reproducible.

:class:`LayerStats` is what the capture stage hands to localization: per layer and neuron, the
mean and unbiased variance of each pole, and optionally the fraction of tokens where the unit
is positive (the NPTI baseline's statistic).

:class:`TokenCounts` keeps what NPTI's reference code keeps per neuron instead: the number of
tokens where it is > 0 and the number of tokens, pooled over all tokens of all samples of a pole,
and a 301-bin histogram of its activation (:func:`npti_bin_edges`); :func:`npti_quantile` is the
reference's 95th-percentile read-out of that histogram.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def _batch_moments(batch: Any) -> tuple[int, np.ndarray, np.ndarray]:
    """(rows, mean [units], M2 [units]) of a [rows, units] numpy array or tensor, in float64.

    A tensor is reduced on its own device, so only two [units] vectors cross to the host.
    """
    if isinstance(batch, torch.Tensor):
        rows64 = _float64(batch)
        mean_t = rows64.mean(dim=0)
        m2_t = ((rows64 - mean_t) ** 2).sum(dim=0)
        return int(rows64.shape[0]), mean_t.cpu().numpy(), m2_t.cpu().numpy()
    rows = np.asarray(batch, dtype=np.float64)
    mean = rows.mean(axis=0)
    m2 = ((rows - mean) ** 2).sum(axis=0)
    return int(rows.shape[0]), mean, m2


def _float64(tensor: torch.Tensor) -> torch.Tensor:
    # MPS has no float64: reduce such tensors on the CPU.
    tensor = tensor.detach()
    if tensor.device.type == "mps":
        tensor = tensor.cpu()
    return tensor.to(torch.float64)


def _column_sums(batch: Any) -> np.ndarray:
    if isinstance(batch, torch.Tensor):
        return _float64(batch).sum(dim=0).cpu().numpy()
    return np.asarray(batch, dtype=np.float64).sum(axis=0)


class RunningMoments:
    """Streaming count / mean / M2 per unit over the rows of [batch, units] arrays (float64).

    ``update(batch, positive_fraction=...)`` also accumulates a per-sample positive fraction
    ([batch, units]: the fraction of a sample's tokens where the unit is > 0), reported as its
    mean over samples by :attr:`positive_fraction`.
    """

    def __init__(self, units: int | None = None):
        self._n = 0
        self._mean: np.ndarray | None = None if units is None else np.zeros(units, np.float64)
        self._m2: np.ndarray | None = None if units is None else np.zeros(units, np.float64)
        self._pos_sum: np.ndarray | None = None
        self._tracks_positive: bool | None = None  # fixed by the first non-empty update

    # -- accumulation ---------------------------------------------------------------------------
    def update(self, batch: Any, positive_fraction: Any | None = None) -> RunningMoments:
        """Add the rows of ``batch`` [batch, units] (numpy array or tensor)."""
        if batch.ndim != 2:
            raise ValueError(f"RunningMoments.update expects a [batch, units] array, got shape {tuple(batch.shape)}.")
        if batch.shape[0] == 0:
            return self
        n_b, mean_b, m2_b = _batch_moments(batch)
        pos_b = None
        if positive_fraction is not None:
            if tuple(positive_fraction.shape) != tuple(batch.shape):
                raise ValueError(
                    f"positive_fraction has shape {tuple(positive_fraction.shape)}, but the batch has "
                    f"{tuple(batch.shape)}: they must match."
                )
            pos_b = _column_sums(positive_fraction)
        self._merge_parts(n_b, mean_b, m2_b, pos_b)
        return self

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Fold ``other`` into this accumulator (Chan's parallel formula); returns self."""
        if other._n == 0:
            return self
        assert other._mean is not None and other._m2 is not None
        self._merge_parts(other._n, other._mean, other._m2, other._pos_sum)
        return self

    def _merge_parts(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray, pos_b: np.ndarray | None) -> None:
        tracks = pos_b is not None
        if self._tracks_positive is not None and tracks != self._tracks_positive and n_b > 0:
            raise ValueError(
                "Mixing batches with and without positive_fraction: pass it to every update or to none."
            )
        if self._mean is not None and self._mean.shape != mean_b.shape:
            raise ValueError(f"Unit count changed: {self._mean.shape[0]} before, {mean_b.shape[0]} now.")
        if self._n == 0:
            # Copy, not merge: a partial merged into an empty accumulator must stay bit-identical.
            self._n = n_b
            self._mean = np.array(mean_b, dtype=np.float64, copy=True)
            self._m2 = np.array(m2_b, dtype=np.float64, copy=True)
            self._pos_sum = None if pos_b is None else np.array(pos_b, dtype=np.float64, copy=True)
            self._tracks_positive = tracks
            return
        assert self._mean is not None and self._m2 is not None
        n_a = self._n
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + delta**2 * (n_a * n_b / n)
        if pos_b is not None:
            assert self._pos_sum is not None
            self._pos_sum = self._pos_sum + pos_b
        self._n = n

    # -- results --------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self._n

    @property
    def units(self) -> int | None:
        return None if self._mean is None else int(self._mean.shape[0])

    @property
    def mean(self) -> np.ndarray:
        """[units] float64 (zeros before the first row)."""
        return self._require(self._mean)

    @property
    def m2(self) -> np.ndarray:
        """[units] float64: sum of squared deviations from the mean."""
        return self._require(self._m2)

    def variance(self, ddof: int = 1) -> np.ndarray:
        """[units] float64; NaN when there are no more than ``ddof`` rows."""
        if self._n <= ddof:
            return np.full(self._require(self._m2).shape, np.nan)
        return self._require(self._m2) / (self._n - ddof)

    @property
    def positive_fraction_sum(self) -> np.ndarray | None:
        """[units] float64: the sum over samples of their positive fraction (None if not tracked)."""
        return self._pos_sum

    @property
    def positive_fraction(self) -> np.ndarray | None:
        """[units] float64: the mean over samples of their positive fraction (None if not tracked)."""
        if self._pos_sum is None or self._n == 0:
            return None
        return self._pos_sum / self._n

    def _require(self, value: np.ndarray | None) -> np.ndarray:
        if value is None:
            raise ValueError("RunningMoments has seen no data and was not given a unit count.")
        return value

    # -- serialization --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (count and float64 arrays) that :meth:`from_dict` restores exactly."""
        return {
            "n": self._n,
            "mean": None if self._mean is None else self._mean.copy(),
            "m2": None if self._m2 is None else self._m2.copy(),
            "pos_frac_sum": None if self._pos_sum is None else self._pos_sum.copy(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunningMoments:
        moments = cls()
        moments._n = int(data["n"])
        for attr, key in (("_mean", "mean"), ("_m2", "m2"), ("_pos_sum", "pos_frac_sum")):
            value = data.get(key)
            setattr(moments, attr, None if value is None else np.asarray(value, dtype=np.float64).copy())
        if moments._n > 0:
            moments._tracks_positive = moments._pos_sum is not None
        return moments

    def __repr__(self) -> str:
        return f"RunningMoments(n={self._n}, units={self.units}, positive_fraction={self._pos_sum is not None})"


# ---------------------------------------------------------------------------------------------
# NPTI's pooled token counts (RUCAIBox/NPTI search_neuron.py / process_neuron.py)

NPTI_HIST_BINS = 301
_INT32_MAX = 2**31 - 1
# Rows of [tokens, width] handled at once when binning, so the int64 bin indices stay small.
_HIST_CHUNK_ELEMENTS = 1 << 24


def npti_bin_edges(device: torch.device | str | None = None) -> torch.Tensor:
    """NPTI's 302 histogram boundaries (float32): -inf, then 0, 0.01, ..., 2.99, then +inf.

    Built the way the reference builds them (``torch.arange(0, 3.01, 0.01)`` with -inf put in
    front and its last value, 3.00, replaced by +inf), so the float32 boundaries are the same
    bits. Bin ``j`` holds ``edges[j] < x <= edges[j + 1]``: bin 0 is x <= 0, bin 300 is x > 2.99.
    """
    edges = torch.cat([torch.tensor([-float("inf")]), torch.arange(0, 3.01, 0.01)])
    edges[-1] = float("inf")
    if edges.numel() != NPTI_HIST_BINS + 1:  # pragma: no cover - a change in torch.arange rounding
        raise RuntimeError(f"NPTI's histogram boundaries: expected {NPTI_HIST_BINS + 1}, got {edges.numel()}.")
    return edges if device is None else edges.to(device)


def npti_quantile(hist: np.ndarray, q: float = 0.95) -> np.ndarray:
    """NPTI's ``calculate_quantiles`` over the last axis of ``hist`` [..., 301] (counts).

    The float32 cumulative sum, the first bin whose cumulative count is >= ``q`` x the total
    (``searchsorted``, left side), and that bin's LOWER boundary: -inf for bin 0 (95% of the
    tokens at or below 0, or no tokens at all), 0.0 for bin 1, 0.01 for bin 2, ...
    Returns float64 values of the float32 boundaries, shaped like ``hist`` without its last axis.
    """
    counts = torch.as_tensor(np.asarray(hist)).to(torch.float32)
    if counts.shape[-1] != NPTI_HIST_BINS:
        raise ValueError(f"An NPTI histogram has {NPTI_HIST_BINS} bins, not {counts.shape[-1]}.")
    flat = counts.reshape(-1, NPTI_HIST_BINS)
    cumsum = torch.cumsum(flat, dim=-1)
    threshold = q * cumsum[:, -1:]
    index = torch.searchsorted(cumsum.contiguous(), threshold.contiguous()).squeeze(-1)
    values = npti_bin_edges()[index.clamp(max=NPTI_HIST_BINS)]
    return values.to(torch.float64).numpy().reshape(counts.shape[:-1])


class TokenCounts:
    """Pooled per-token statistics of one (pole, layer), as NPTI accumulates them.

    Over every token given to :meth:`update` ([tokens, units] tensors): ``positive`` counts
    the tokens where a unit is > 0 (NPTI's ``over_zero``), ``tokens`` counts the tokens
    (``token_num``) and ``hist`` [units, 301] counts them in NPTI's bins (:func:`npti_bin_edges`,
    ``torch.bucketize(right=False) - 1``). The firing rate is ``positive / tokens``: pooled over
    tokens, so a long response weighs more than a short one. Counts are exact integers; merging
    partials (shards) is a sum. The accumulators stay on the tensor's device until read.
    """

    def __init__(self, units: int):
        self.units = int(units)
        self.tokens = 0
        self._positive: torch.Tensor | np.ndarray | None = None
        self._hist: torch.Tensor | np.ndarray | None = None
        self._edges: torch.Tensor | None = None

    def update(self, tokens: torch.Tensor) -> TokenCounts:
        """Count the rows of ``tokens`` [tokens, units] (cast to float32, as NPTI does)."""
        if tokens.ndim != 2 or tokens.shape[1] != self.units:
            raise ValueError(f"TokenCounts.update expects [tokens, {self.units}], got {tuple(tokens.shape)}.")
        rows = int(tokens.shape[0])
        if rows == 0:
            return self
        device = tokens.device
        if self._positive is None or isinstance(self._positive, np.ndarray):
            positive = torch.zeros(self.units, dtype=torch.int64, device=device)
            hist = torch.zeros(self.units * NPTI_HIST_BINS, dtype=torch.int32, device=device)
            if self._positive is not None:  # restored from numpy: continue on the device
                positive += torch.as_tensor(self._positive, device=device)
                hist = torch.as_tensor(np.asarray(self._hist).reshape(-1), device=device).to(torch.int64)
            self._positive, self._hist = positive, hist
        assert isinstance(self._hist, torch.Tensor) and isinstance(self._positive, torch.Tensor)
        if self.tokens + rows > _INT32_MAX and self._hist.dtype == torch.int32:
            self._hist = self._hist.to(torch.int64)
        if self._edges is None or self._edges.device != device:
            self._edges = npti_bin_edges(device)
        offsets = torch.arange(self.units, device=device, dtype=torch.int64) * NPTI_HIST_BINS
        step = max(1, _HIST_CHUNK_ELEMENTS // max(1, self.units))
        for start in range(0, rows, step):
            chunk = tokens[start : start + step].detach().to(torch.float32)
            self._positive += (chunk > 0).sum(dim=0)
            bins = torch.bucketize(chunk, self._edges) - 1  # right=False, as NPTI
            flat = (bins + offsets).reshape(-1)
            self._hist += torch.bincount(flat, minlength=self.units * NPTI_HIST_BINS).to(self._hist.dtype)
        self.tokens += rows
        return self

    def merge(self, other: TokenCounts) -> TokenCounts:
        """Add ``other``'s counts (on the host; int32 histograms while the token count fits
        int32, which no bin can then exceed); returns self."""
        if other.units != self.units:
            raise ValueError(f"Unit count changed: {self.units} before, {other.units} now.")
        positive, hist = self.positive, self.hist
        self.tokens += other.tokens
        dtype = np.int32 if self.tokens <= _INT32_MAX else np.int64
        self._positive = positive + other.positive
        self._hist = hist.astype(dtype, copy=False) + other.hist.astype(dtype, copy=False)
        return self

    @property
    def positive(self) -> np.ndarray:
        """[units] int64: tokens with act > 0."""
        if self._positive is None:
            return np.zeros(self.units, np.int64)
        if isinstance(self._positive, torch.Tensor):
            return self._positive.cpu().numpy().astype(np.int64)
        return np.asarray(self._positive, np.int64)

    @property
    def hist(self) -> np.ndarray:
        """[units, 301] counts (int32 while the token count fits int32, else int64)."""
        if self._hist is None:
            return np.zeros((self.units, NPTI_HIST_BINS), np.int32 if self.tokens <= _INT32_MAX else np.int64)
        values = self._hist.cpu().numpy() if isinstance(self._hist, torch.Tensor) else np.asarray(self._hist)
        dtype = np.int32 if self.tokens <= _INT32_MAX else np.int64
        return values.reshape(self.units, NPTI_HIST_BINS).astype(dtype, copy=False)

    @classmethod
    def from_arrays(cls, tokens: int, positive: np.ndarray, hist: np.ndarray) -> TokenCounts:
        counts = cls(int(np.asarray(positive).shape[0]))
        counts.tokens = int(tokens)
        counts._positive = np.asarray(positive, np.int64).copy()
        counts._hist = np.asarray(hist).reshape(counts.units, NPTI_HIST_BINS).copy()
        return counts

    def __repr__(self) -> str:
        return f"TokenCounts(tokens={self.tokens}, units={self.units})"


@dataclass
class LayerStats:
    """Per-layer, per-neuron statistics of one concept's two poles at one site and token policy.

    Arrays are indexed [row, neuron] where row ``r`` is layer ``layers[r]``.
    """

    concept: str
    site: str
    policy: str
    layers: list[int]
    n_high: np.ndarray  # [L] int64
    n_low: np.ndarray  # [L] int64
    mean_high: np.ndarray  # [L, N] float64
    mean_low: np.ndarray  # [L, N] float64
    var_high: np.ndarray  # [L, N] float64, unbiased (ddof=1)
    var_low: np.ndarray  # [L, N] float64, unbiased (ddof=1)
    pos_frac_high: np.ndarray | None = None  # [L, N] float64: mean fraction of tokens > 0
    pos_frac_low: np.ndarray | None = None  # [L, N] float64
    meta: dict[str, Any] = field(default_factory=dict)  # the capture manifest
    # NPTI's pooled token counts (gate site, response-mean; None in captures made before them):
    pos_count_high: np.ndarray | None = None  # [L, N] int64: tokens with act > 0
    pos_count_low: np.ndarray | None = None  # [L, N] int64
    token_count_high: np.ndarray | None = None  # [L] int64: tokens counted
    token_count_low: np.ndarray | None = None  # [L] int64
    hist_high: np.ndarray | None = None  # [L, N, 301] int32/int64: NPTI's histogram (npti_bin_edges)
    hist_low: np.ndarray | None = None  # [L, N, 301]

    @property
    def width(self) -> int:
        return int(self.mean_high.shape[1])

    def layer_index(self, layer: int) -> int:
        """The row of ``layer`` in the arrays."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise KeyError(
                f"Layer {layer} was not captured for {self.concept!r} ({self.site}/{self.policy}); "
                f"captured layers: {self.layers}. Re-run collect-activations with --layers covering it."
            ) from None


def cohens_d(
    mean_high: np.ndarray,
    mean_low: np.ndarray,
    var_high: np.ndarray,
    var_low: np.ndarray,
    n_high: np.ndarray | int,
    n_low: np.ndarray | int,
    eps: float = 1e-8,
) -> np.ndarray:
    """Cohen's d with the pooled unbiased variance, as DPN-LE computes it.

    d = (mean_h - mean_l) / sqrt(((n_h - 1) var_h + (n_l - 1) var_l) / (n_h + n_l - 2) + eps).
    Means and variances are [L, N] (or [N]); counts are per layer [L] (or scalars) and broadcast
    over neurons.
    """
    mean_high = np.asarray(mean_high, dtype=np.float64)
    n_h = np.asarray(n_high, dtype=np.float64)
    n_l = np.asarray(n_low, dtype=np.float64)
    if n_h.ndim == 1 and mean_high.ndim == 2:
        n_h, n_l = n_h[:, None], n_l[:, None]
    pooled = ((n_h - 1) * np.asarray(var_high, np.float64) + (n_l - 1) * np.asarray(var_low, np.float64)) / (
        n_h + n_l - 2
    )
    return (mean_high - np.asarray(mean_low, np.float64)) / np.sqrt(pooled + eps)


# ---------------------------------------------------------------------------------------------
# statistics of in-memory activations (what the capture stage computes, without a run)


def stats_from_moments(
    moments: Mapping[tuple[str, int], RunningMoments],
    *,
    concept: str = "",
    site: str = "mlp",
    policy: str = "last",
    meta: dict[str, Any] | None = None,
) -> LayerStats:
    """:class:`LayerStats` from one :class:`RunningMoments` per (pole, layer), pole "high" or
    "low": the means, unbiased variances, counts and (when tracked) positive fractions. The
    capture stage's :func:`dpnle.collect.load_stats` builds its statistics here too."""
    layers = sorted({int(layer) for _, layer in moments})
    if not layers or any((pole, layer) not in moments for pole in ("high", "low") for layer in layers):
        raise ValueError("stats_from_moments needs the high and the low moments of every layer.")

    def stack(pole: str, value: Any) -> np.ndarray:
        return np.stack([value(moments[pole, layer]) for layer in layers])

    pos_high = pos_low = None
    if moments["high", layers[0]].positive_fraction_sum is not None:
        pos_high = stack("high", lambda m: m.positive_fraction)
        pos_low = stack("low", lambda m: m.positive_fraction)
    return LayerStats(
        concept=concept,
        site=site,
        policy=policy,
        layers=layers,
        n_high=np.array([moments["high", layer].n for layer in layers], dtype=np.int64),
        n_low=np.array([moments["low", layer].n for layer in layers], dtype=np.int64),
        mean_high=stack("high", lambda m: m.mean),
        mean_low=stack("low", lambda m: m.mean),
        var_high=stack("high", lambda m: m.variance(ddof=1)),
        var_low=stack("low", lambda m: m.variance(ddof=1)),
        pos_frac_high=pos_high,
        pos_frac_low=pos_low,
        meta={} if meta is None else meta,
    )


def layer_stats(
    high: Any,
    low: Any,
    *,
    layers: Sequence[int] | None = None,
    concept: str = "",
    site: str | None = None,
    policy: str | None = None,
    positive_high: Mapping[int, Any] | None = None,
    positive_low: Mapping[int, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> LayerStats:
    """Per-layer statistics of the high and low samples of one concept, in memory (no run).

    ``high`` and ``low`` are ``{layer: [samples, units]}`` arrays or tensors, or the
    :class:`dpnle.collect.Capture` of each pole's prompts (then ``site``, ``policy`` and the
    positive fractions come from it). ``positive_high`` / ``positive_low`` (optional, both or
    neither): ``{layer: [samples, units]}`` per-sample fractions of tokens where a unit is > 0
    (the NPTI statistic). ``layers``: the layers to keep (default: every layer both hold).
    Returns what :func:`dpnle.localize.select_dpnle` and the other selections take: means and
    unbiased variances in float64, reduced with :class:`RunningMoments` as the capture stage does.
    """
    from dpnle.runs import InputError

    captures = [pole for pole in (high, low) if hasattr(pole, "activations")]
    if captures:
        if len(captures) != 2:
            raise InputError("layer_stats takes two Captures or two {layer: array} mappings, not one of each.")
        if (high.site, high.policy) != (low.site, low.policy):
            raise InputError(
                f"The high capture is {high.site}/{high.policy}, the low one {low.site}/{low.policy}: capture "
                "both poles at the same site and policy."
            )
        site = high.site if site is None else site
        policy = high.policy if policy is None else policy
        if positive_high is None and positive_low is None:
            positive_high, positive_low = high.positive_fraction, low.positive_fraction
        high, low = high.activations, low.activations
    if (positive_high is None) != (positive_low is None):
        raise InputError("Pass the positive fractions of both poles (positive_high and positive_low), or of neither.")
    both = sorted(set(map(int, high)) & set(map(int, low)))
    chosen = both if layers is None else [int(x) for x in layers]
    missing = [x for x in chosen if x not in both]
    if not chosen or missing:
        raise InputError(
            f"layer_stats needs the high and low activations of every layer asked for; layers {missing or chosen} "
            f"are missing (both poles hold layers {both})."
        )
    moments: dict[tuple[str, int], RunningMoments] = {}
    for pole, acts, positive in (("high", high, positive_high), ("low", low, positive_low)):
        for layer in chosen:
            rows = acts[layer]
            if rows.ndim != 2 or rows.shape[0] < 2:
                raise InputError(
                    f"The {pole} activations of layer {layer} have shape {tuple(rows.shape)}: each pole needs a "
                    "[samples, units] array of at least 2 samples (an unbiased variance needs two)."
                )
            moments[pole, layer] = RunningMoments().update(
                rows, positive_fraction=None if positive is None else positive[layer]
            )
    widths = {moments[key].units for key in moments}
    if len(widths) != 1:
        raise InputError(f"The activations have different unit counts across poles or layers ({sorted(widths)}).")
    return stats_from_moments(moments, concept=concept, site=site or "mlp", policy=policy or "last", meta=meta)
