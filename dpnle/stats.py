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
"""

from __future__ import annotations

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
