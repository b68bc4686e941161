import numpy as np
import pytest
import torch

from dpnle.stats import LayerStats, RunningMoments, cohens_d


def _two_pass(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = rows.astype(np.float64)
    mean = rows.mean(axis=0)
    return mean, ((rows - mean) ** 2).sum(axis=0)


def _random_rows(seed: int, n: int = 97, units: int = 13) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # An offset far from zero: the case where a naive sum-of-squares variance loses digits.
    return (rng.normal(size=(n, units)) * rng.uniform(0.1, 3.0, size=units) + 1e3).astype(np.float32)


def test_single_update_equals_two_pass():
    rows = _random_rows(0)
    moments = RunningMoments().update(rows)
    mean, m2 = _two_pass(rows)
    assert moments.n == len(rows)
    np.testing.assert_allclose(moments.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(moments.m2, m2, rtol=1e-10)
    np.testing.assert_allclose(moments.variance(), rows.astype(np.float64).var(axis=0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(moments.variance(ddof=0), rows.astype(np.float64).var(axis=0), rtol=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_streaming_and_merge_equal_single_pass_for_random_chunkings(seed):
    rows = _random_rows(seed)
    rng = np.random.default_rng(100 + seed)
    cuts = np.sort(rng.choice(np.arange(1, len(rows)), size=rng.integers(1, 12), replace=False))
    chunks = np.split(rows, cuts)
    mean, m2 = _two_pass(rows)

    streamed = RunningMoments()
    for chunk in chunks:
        streamed.update(chunk)
    # Merge of independently accumulated partials (as across shards / processes), uneven groups.
    partials = []
    for group in np.array_split(np.arange(len(chunks)), 3):
        partial = RunningMoments(rows.shape[1])
        for i in group:
            partial.update(chunks[i])
        partials.append(partial)
    merged = RunningMoments()
    for partial in partials:
        merged.merge(partial)

    for moments in (streamed, merged):
        assert moments.n == len(rows)
        np.testing.assert_allclose(moments.mean, mean, rtol=1e-13)
        np.testing.assert_allclose(moments.m2, m2, rtol=1e-9)


def test_torch_batches_are_reduced_like_numpy():
    rows = _random_rows(3)
    from_numpy = RunningMoments().update(rows[:40]).update(rows[40:])
    from_torch = RunningMoments().update(torch.from_numpy(rows[:40])).update(torch.from_numpy(rows[40:]))
    np.testing.assert_allclose(from_torch.mean, from_numpy.mean, rtol=1e-15)
    np.testing.assert_allclose(from_torch.m2, from_numpy.m2, rtol=1e-12)


def test_merge_into_empty_is_bit_identical_and_empty_merges_are_no_ops():
    partial = RunningMoments().update(_random_rows(4))
    merged = RunningMoments(partial.units).merge(RunningMoments()).merge(partial).merge(RunningMoments())
    assert merged.n == partial.n
    assert np.array_equal(merged.mean, partial.mean) and np.array_equal(merged.m2, partial.m2)
    assert RunningMoments(5).update(np.zeros((0, 5))).n == 0


def test_positive_fraction_is_the_mean_over_samples():
    rng = np.random.default_rng(5)
    rows = rng.normal(size=(30, 4))
    fractions = rng.uniform(size=(30, 4))
    moments = RunningMoments().update(rows[:10], fractions[:10])
    moments.merge(RunningMoments().update(rows[10:], fractions[10:]))
    np.testing.assert_allclose(moments.positive_fraction, fractions.mean(axis=0), rtol=1e-14)
    assert RunningMoments().update(rows).positive_fraction is None
    with pytest.raises(ValueError, match="positive_fraction"):
        moments.update(rows)
    with pytest.raises(ValueError, match="must match"):
        RunningMoments().update(rows, fractions[:, :2])


def test_serialization_round_trip_is_exact():
    moments = RunningMoments().update(_random_rows(6), np.full((97, 13), 0.5))
    restored = RunningMoments.from_dict(moments.to_dict())
    assert restored.n == moments.n
    for attr in ("mean", "m2", "positive_fraction"):
        assert np.array_equal(getattr(restored, attr), getattr(moments, attr))
    assert RunningMoments.from_dict(RunningMoments().to_dict()).n == 0


def test_variance_is_nan_without_enough_rows():
    moments = RunningMoments().update(np.ones((1, 3)))
    assert np.isnan(moments.variance()).all()
    assert (moments.variance(ddof=0) == 0).all()


def test_cohens_d_matches_the_formula_and_broadcasts_counts_per_layer():
    rng = np.random.default_rng(7)
    mean_h, mean_l = rng.normal(size=(2, 3, 5))
    var_h, var_l = rng.uniform(0.5, 2, size=(2, 3, 5))
    n_h, n_l = np.array([10, 20, 30]), np.array([12, 18, 40])
    d = cohens_d(mean_h, mean_l, var_h, var_l, n_h, n_l)
    for layer in range(3):
        for unit in range(5):
            pooled = ((n_h[layer] - 1) * var_h[layer, unit] + (n_l[layer] - 1) * var_l[layer, unit]) / (
                n_h[layer] + n_l[layer] - 2
            )
            expected = (mean_h[layer, unit] - mean_l[layer, unit]) / np.sqrt(pooled + 1e-8)
            assert d[layer, unit] == pytest.approx(expected, rel=1e-12)
    # Scalar counts and 1-D inputs work too; zero variance is kept finite by eps.
    assert cohens_d(np.array([1.0]), np.array([0.0]), np.zeros(1), np.zeros(1), 5, 5)[0] == pytest.approx(1e4)


def test_cohens_d_matches_samples():
    rng = np.random.default_rng(8)
    high, low = rng.normal(1.0, 1.0, size=(50, 4)), rng.normal(0.0, 2.0, size=(70, 4))
    d = cohens_d(high.mean(0), low.mean(0), high.var(0, ddof=1), low.var(0, ddof=1), 50, 70)
    pooled = np.sqrt((49 * high.var(0, ddof=1) + 69 * low.var(0, ddof=1)) / 118)
    np.testing.assert_allclose(d, (high.mean(0) - low.mean(0)) / pooled, rtol=1e-6)


def test_layer_stats_layer_index():
    zeros = np.zeros((2, 3))
    stats = LayerStats("openness", "mlp", "last", [12, 14], np.array([4, 4]), np.array([4, 4]),
                       zeros, zeros, zeros, zeros)
    assert stats.layer_index(14) == 1 and stats.width == 3
    with pytest.raises(KeyError, match="captured layers: \\[12, 14\\]"):
        stats.layer_index(13)
