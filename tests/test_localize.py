"""Stage 2: DPN-LE / NPTI / CAA selection against independent numpy/scipy computations."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from dpnle import localize as loc
from dpnle.stats import LayerStats, layer_stats

# ---------------------------------------------------------------------------------------------
# synthetic data


def raw_samples(seed=0, layers=3, width=400, n_high=60, n_low=50, constant=(), shift=0.6):
    """Raw [n, width] activations per layer and pole; some neurons shifted, some constant."""
    rng = np.random.default_rng(seed)
    high, low = {}, {}
    for layer in range(layers):
        h = rng.normal(0.0, 1.0, (n_high, width))
        lo = rng.normal(0.0, 1.0, (n_low, width))
        moved = rng.choice(width, size=width // 20, replace=False)
        h[:, moved] += rng.choice([-1, 1], size=moved.shape[0]) * shift * (1 + layer)
        for i in constant:
            h[:, i] = 0.5
            lo[:, i] = 0.5
        high[layer], low[layer] = h, lo
    return high, low


def stats_from_samples(high, low, layers=None, concept="openness", site="mlp", policy="last", meta=None):
    """The library's in-memory statistics (dpnle.stats.layer_stats), positive fractions included
    (tests/test_api.py checks layer_stats against numpy means and variances)."""
    return layer_stats(
        high, low, layers=layers, concept=concept, site=site, policy=policy, meta=meta or {},
        positive_high={x: high[x] > 0 for x in high}, positive_low={x: low[x] > 0 for x in low},
    )


def reference_dpnle(high, low, layers, q, tau):
    """Loop-based selection straight from the samples: {(layer, neuron): (pole, d, delta)}."""
    out = {}
    for layer in layers:
        h, lo = high[layer], low[layer]
        n_h, n_l = h.shape[0], lo.shape[0]
        delta = h.mean(axis=0) - lo.mean(axis=0)
        cut = np.quantile(np.abs(delta), q)
        for i in range(h.shape[1]):
            pooled = ((n_h - 1) * np.var(h[:, i], ddof=1) + (n_l - 1) * np.var(lo[:, i], ddof=1)) / (
                n_h + n_l - 2
            )
            d = delta[i] / math.sqrt(pooled + 1e-8)
            if abs(delta[i]) > cut and abs(d) > tau:
                out[(layer, i)] = ("high" if d > 0 else "low", d, delta[i])
    return out


# ---------------------------------------------------------------------------------------------
# DPN-LE


def test_dpnle_matches_loop_reference():
    high, low = raw_samples(constant=(3, 7))
    stats = stats_from_samples(high, low)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = loc.select_dpnle(stats, [0, 1, 2], quantile=0.95, d_threshold=0.3)
    ref = reference_dpnle(high, low, [0, 1, 2], 0.95, 0.3)
    assert len(ref) > 10
    sel = frame[frame["selected"]]
    got = {(int(r.layer), int(r.neuron)): r for r in sel.itertuples(index=False)}
    assert set(got) == set(ref)
    for key, (pole, d, delta) in ref.items():
        assert got[key].pole == pole
        assert got[key].cohens_d == pytest.approx(d, rel=1e-10, abs=1e-12)
        assert got[key].delta == pytest.approx(delta, rel=1e-12, abs=1e-15)
    # every neuron of the chosen layers is listed, unselected ones without pole or weight
    assert len(frame) == 3 * 400
    unsel = frame[~frame["selected"]]
    assert unsel["pole"].isna().all() and unsel["weight"].isna().all()
    assert np.isfinite(frame["cohens_d"]).all()


def test_dpnle_columns_and_dtypes():
    high, low = raw_samples(layers=2, width=50)
    frame = loc.select_dpnle(stats_from_samples(high, low), [1], quantile=0.9, d_threshold=0.1)
    assert tuple(frame.columns) == loc.DPNLE_COLUMNS
    assert frame["layer"].dtype == np.int16 and frame["neuron"].dtype == np.int32
    assert frame["n_high"].dtype == np.int64 and frame["n_low"].dtype == np.int64
    for col in ("mean_high", "mean_low", "var_high", "var_low", "delta", "cohens_d", "weight"):
        assert frame[col].dtype == np.float64
    assert frame["selected"].dtype == bool
    assert set(frame["layer"]) == {1}


def test_cohens_d_constant_neurons_are_zero_without_warnings():
    high, low = raw_samples(layers=1, width=20, constant=range(20))
    stats = stats_from_samples(high, low)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = loc.select_dpnle(stats, [0], quantile=0.5, d_threshold=0.0)
    assert (frame["cohens_d"] == 0).all() and (frame["delta"] == 0).all()
    assert not frame["selected"].any()  # |delta| = 0 is not > the quantile 0


def test_quantile_cut_is_strict_with_ties():
    # 10 neurons: |delta| = 1,1,1,1,1,1,1,1,2,3 -> quantile(0.5) = 1, so only the 2 and 3 pass.
    width = 10
    mean_high = np.array([[1, -1, 1, -1, 1, -1, 1, -1, 2, -3]], dtype=np.float64)
    stats = LayerStats(
        "openness",
        "mlp",
        "last",
        [5],
        n_high=np.array([30]),
        n_low=np.array([30]),
        mean_high=mean_high,
        mean_low=np.zeros((1, width)),
        var_high=np.ones((1, width)),
        var_low=np.ones((1, width)),
    )
    frame = loc.select_dpnle(stats, [5], quantile=0.5, d_threshold=0.5)
    assert np.quantile(np.abs(mean_high[0]), 0.5) == 1.0
    assert frame.loc[frame["selected"], "neuron"].tolist() == [8, 9]
    assert frame.loc[frame["selected"], "pole"].tolist() == ["high", "low"]
    # and |d| must be strictly above tau: d = 2 / sqrt(1 + 1e-8) < 2
    frame = loc.select_dpnle(stats, [5], quantile=0.5, d_threshold=2.0)
    assert frame.loc[frame["selected"], "neuron"].tolist() == [9]


def test_high_low_disjoint_and_deterministic():
    high, low = raw_samples(seed=3)
    stats = stats_from_samples(high, low)
    a = loc.select_dpnle(stats, [0, 1, 2], quantile=0.9, d_threshold=0.2)
    b = loc.select_dpnle(stats, [0, 1, 2], quantile=0.9, d_threshold=0.2)
    pd.testing.assert_frame_equal(a, b)
    sel = a[a["selected"]]
    hi = set(map(tuple, sel.loc[sel["pole"] == "high", ["layer", "neuron"]].to_numpy()))
    lo = set(map(tuple, sel.loc[sel["pole"] == "low", ["layer", "neuron"]].to_numpy()))
    assert hi and lo and not hi & lo
    assert (sel.loc[sel["pole"] == "high", "cohens_d"] > 0).all()
    assert (sel.loc[sel["pole"] == "low", "cohens_d"] < 0).all()


def test_weights_rank_abs_d_per_layer():
    high, low = raw_samples(seed=4, width=600)
    frame = loc.select_dpnle(stats_from_samples(high, low), [0, 1, 2], quantile=0.9, d_threshold=0.2)
    sel = frame[frame["selected"]]
    for _, group in sel.groupby("layer"):
        w = group["weight"].to_numpy()
        assert w.min() == 0.75 and w.max() == 1.0 and len(w) > 2
        ranks = sps.rankdata(np.abs(group["cohens_d"].to_numpy()), method="ordinal") - 1
        np.testing.assert_allclose(w, 0.75 + 0.25 * ranks / (len(w) - 1), rtol=0, atol=1e-15)


def test_rank_weights_ties_single_and_groups():
    w = loc.rank_weights(np.array([0.5, 0.2, 0.5, 0.9]), np.zeros(4, int), np.array([7, 1, 3, 2]))
    # 0.2 rank 0; the tied 0.5s ordered by neuron (3 before 7); 0.9 rank 3
    np.testing.assert_allclose(w, [0.75 + 0.25 * 2 / 3, 0.75, 0.75 + 0.25 / 3, 1.0])
    assert loc.rank_weights(np.array([3.0]), np.array([1])).tolist() == [1.0]
    w = loc.rank_weights(np.array([1.0, 2.0, 5.0]), np.array([0, 1, 1]))
    assert w.tolist() == [1.0, 0.75, 1.0]
    assert loc.rank_weights(np.array([]), np.array([])).shape == (0,)


def test_edit_vectors_from_frame_both_and_directional():
    high, low = raw_samples(seed=5, width=500)
    stats = stats_from_samples(high, low)
    frame = loc.select_dpnle(stats, [0, 1, 2], quantile=0.9, d_threshold=0.2)
    vec = loc.edit_vectors(frame)
    sel = frame[frame["selected"]]
    for pole in ("high", "low"):
        part = sel[sel["pole"] == pole]
        assert sorted(vec[pole]) == sorted(set(part["layer"].astype(int)))
        for layer, (idx, delta) in vec[pole].items():
            assert idx.dtype == np.int64 and delta.dtype == np.float32
            expected = (stats.mean_high[layer] - stats.mean_low[layer])[idx].astype(np.float32)
            np.testing.assert_array_equal(delta, expected)
    weighted = loc.edit_vectors(frame, weighted=True)
    directional = loc.edit_vectors(frame, weighted=True, mode="directional")
    for pole in ("high", "low"):
        for layer, (_idx, delta) in weighted[pole].items():
            part = sel[(sel["layer"] == layer) & (sel["pole"] == pole)].sort_values("neuron")
            np.testing.assert_array_equal(
                delta, (part["delta"] * part["weight"]).to_numpy().astype(np.float32)
            )
            ranks = sps.rankdata(np.abs(part["cohens_d"].to_numpy()), method="ordinal") - 1
            n = len(part)
            w = 0.75 + 0.25 * ranks / (n - 1) if n > 1 else np.ones(1)
            np.testing.assert_allclose(
                directional[pole][layer][1], (part["delta"].to_numpy() * w).astype(np.float32)
            )


# ---------------------------------------------------------------------------------------------
# NPTI


def reference_npti(p_high, p_low, layers, k, tau, per_layer):
    dp = p_high - p_low
    out = {}
    for sign, pole in ((1, "high"), (-1, "low")):
        cand = [(-(sign * dp[r, i]), r, i) for r in range(dp.shape[0]) for i in range(dp.shape[1])]
        if per_layer:
            chosen = []
            for r in range(dp.shape[0]):
                chosen += sorted(c for c in cand if c[1] == r)[:k]
        else:
            chosen = sorted(cand)[:k]
        for _, r, i in chosen:
            if sign * dp[r, i] >= tau and sign * dp[r, i] > 0:
                out[(layers[r], i)] = pole
    return out


@pytest.mark.parametrize("per_layer", [True, False])
def test_npti_top_k_then_threshold(per_layer):
    rng = np.random.default_rng(11)
    layers, width = [2, 3, 4], 60
    p_high = rng.uniform(0, 1, (3, width)).round(2)  # rounding makes ties
    p_low = np.clip(p_high - rng.normal(0, 0.15, (3, width)).round(2), 0, 1)
    z = np.zeros((3, width))
    stats = LayerStats(
        "openness",
        "gate",
        "response-mean",
        layers,
        np.full(3, 10),
        np.full(3, 10),
        z,
        z,
        z,
        z,
        pos_frac_high=p_high,
        pos_frac_low=p_low,
    )
    frame = loc.select_npti(stats, top_k=15, min_delta_p=0.1, per_layer=per_layer)
    ref = reference_npti(p_high, p_low, layers, 15, 0.1, per_layer)
    sel = frame[frame["selected"]]
    got = {(int(r.layer), int(r.neuron)): r.pole for r in sel.itertuples(index=False)}
    assert got == ref and len(ref) > 5
    assert list(frame.columns) == ["layer", "neuron", "p_high", "p_low", "delta_p", "pole", "v95", "selected"]
    assert frame["v95"].isna().all()


def test_npti_v95_from_activations():
    rng = np.random.default_rng(2)
    n, width = 40, 30
    acts = {0: rng.normal(0, 1, (n, width)).astype(np.float32)}
    samples = pd.DataFrame(
        {"sample_id": range(n), "pair_id": np.repeat(range(n // 2), 2), "pole": ["high", "low"] * (n // 2)}
    )
    p_high = np.linspace(0.9, 0.1, width)[None, :]
    p_low = np.full((1, width), 0.5)
    z = np.zeros((1, width))
    stats = LayerStats(
        "openness",
        "gate",
        "response-mean",
        [0],
        np.array([20]),
        np.array([20]),
        z,
        z,
        z,
        z,
        pos_frac_high=p_high,
        pos_frac_low=p_low,
    )
    frame = loc.select_npti(stats, (samples, acts), top_k=5, min_delta_p=0.1)
    sel = frame[frame["selected"]]
    assert set(sel["pole"]) == {"high", "low"}
    for r in sel.itertuples(index=False):
        rows = samples["pole"].to_numpy() == r.pole
        assert r.v95 == pytest.approx(np.percentile(acts[0][rows, r.neuron], 95))
    assert frame.loc[~frame["selected"], "v95"].isna().all()


# ---------------------------------------------------------------------------------------------
# CAA


def test_caa_picks_most_separated_layer():
    rng = np.random.default_rng(0)
    high = {x: rng.normal(0, 1 + x, (50, 16)) for x in range(4)}
    low = {x: rng.normal(0, 1 + x, (50, 16)) for x in range(4)}
    high[2] = high[2] + 2.0  # layer 2: largest shift relative to its spread
    high[3] = high[3] + 2.5  # bigger raw shift, but sd 4
    stats = stats_from_samples(high, low, site="resid")
    frame = loc.select_caa(stats)
    info = frame.attrs["caa"]
    assert info["layer"] == 2
    scores = info["score_per_layer"]
    for x in range(4):
        delta = high[x].mean(0) - low[x].mean(0)
        pooled = (49 * high[x].var(0, ddof=1) + 49 * low[x].var(0, ddof=1)) / 98
        assert scores[str(x)] == pytest.approx(np.linalg.norm(delta) / np.sqrt(pooled.mean() + 1e-8))
    chosen = frame[frame["chosen"]]
    assert chosen["layer"].unique().tolist() == [2] and chosen["unit"].tolist() == list(range(16))
    np.testing.assert_allclose(chosen["delta"], high[2].mean(0) - low[2].mean(0))
    assert loc.select_caa(stats, layer=1).attrs["caa"]["layer"] == 1
    assert loc.select_caa(stats, layer=-1).attrs["caa"]["layer"] == 3


# ---------------------------------------------------------------------------------------------
# overlap


def _fake_selection(keys, poles):
    return pd.DataFrame({"layer": [k[0] for k in keys], "neuron": [k[1] for k in keys], "pole": poles})


def test_overlap_matches_python_sets():
    rng = np.random.default_rng(9)
    sels, refs = {}, {}
    for name in ("openness", "extraversion", "neuroticism"):
        keys = {
            (int(a), int(b)) for a, b in zip(rng.integers(0, 3, 80), rng.integers(0, 40, 80), strict=True)
        }
        poles = {k: str(rng.choice(["high", "low"])) for k in keys}
        refs[name] = poles
        sels[name] = _fake_selection(list(poles), list(poles.values()))
    sels["empty"] = _fake_selection([], [])
    refs["empty"] = {}
    table = loc.overlap_from_selections(sels)
    assert len(table) == 6
    for r in table.itertuples(index=False):
        a, b = set(refs[r.concept_a]), set(refs[r.concept_b])
        assert (r.n_a, r.n_b, r.shared) == (len(a), len(b), len(a & b))
        assert r.jaccard == pytest.approx(len(a & b) / len(a | b))
        assert r.shared_opposite_pole == sum(refs[r.concept_a][k] != refs[r.concept_b][k] for k in a & b)
    matrix = loc.overlap_matrix(table)
    assert matrix.loc["openness", "openness"] == 1.0
    assert matrix.loc["openness", "neuroticism"] == matrix.loc["neuroticism", "openness"]
    assert math.isnan(loc.overlap_from_selections({"a": sels["empty"], "b": sels["empty"]})["jaccard"][0])


# ---------------------------------------------------------------------------------------------
# per-model defaults and the automatic start layer


@pytest.mark.parametrize(
    "model_id, layers, tau, pattern",
    [
        ("meta-llama/Meta-Llama-3-8B-Instruct", "12-31", 0.8, "*llama-3*8b*"),
        ("meta-llama/Llama-3.1-8B-Instruct", "12-31", 0.8, "*llama-3*8b*"),
        ("Qwen/Qwen2.5-7B-Instruct", "14-27", 0.3, "*qwen2.5*7b*"),
        ("/models/qwen2.5-7b-instruct-q4_k_m.gguf", "14-27", 0.3, "*qwen2.5*7b*"),
        ("smollm2-135m-instruct", "11-29", 0.8, "*smollm2-135m*"),
        ("HuggingFaceTB/SmolLM2-360M-Instruct", "auto", 0.8, None),
        ("meta-llama/Llama-3.2-1B-Instruct", "auto", 0.8, None),
    ],
)
def test_model_defaults(model_id, layers, tau, pattern):
    got = loc.model_defaults(model_id)
    assert (got["layers"], got["d_threshold"], got["quantile"], got["pattern"]) == (
        layers,
        tau,
        0.995,
        pattern,
    )


def test_start_layer_rule():
    acc = {0: 0.5, 1: 0.95, 2: 0.7, 3: 0.92, 4: 0.97}
    assert loc.start_layer_rule(acc, 0.9) == (3, "sustained", True)
    assert loc.start_layer_rule({0: 0.95, 1: 0.99}, 0.9) == (0, "sustained", True)
    assert loc.start_layer_rule({0: 0.5, 1: 0.95, 2: 0.6}, 0.9) == (1, "first_crossing", True)
    assert loc.start_layer_rule({0: 0.5, 1: 0.7, 2: 0.6}, 0.9) == (1, "max_accuracy", False)
    # One noisy dip high up does not move the start to the top layers.
    assert loc.start_layer_rule({0: 0.6, 1: 0.92, 2: 0.95, 3: 0.89, 4: 0.93}, 0.9) == (1, "sustained", True)


def test_probe_accuracy_and_pair_split():
    rng = np.random.default_rng(1)
    pairs = np.repeat(np.arange(100), 2)
    is_high = np.tile([True, False], 100)
    train = loc.pair_split(pairs, seed=0)
    assert train.sum() == 100
    for p in range(100):  # both sides of a pair on the same side of the split
        assert train[2 * p] == train[2 * p + 1]
    np.testing.assert_array_equal(train, loc.pair_split(pairs, seed=0))
    noise = rng.normal(0, 1, (200, 50)).astype(np.float32)
    assert 0.3 < loc.probe_accuracy(noise, is_high, train) < 0.7
    separated = noise.copy()
    separated[is_high, :10] += 3.0
    separated[:, 20] = 4.0  # a constant unit must not break standardization
    assert loc.probe_accuracy(separated, is_high, train) == 1.0


# ---------------------------------------------------------------------------------------------
# artifacts


@pytest.fixture
def run(tmp_path):
    from dpnle.runs import Run

    run = Run.create_or_open("r", FINGERPRINT["id"], root=tmp_path)
    run.update_manifest(model={"id": FINGERPRINT["id"], "fingerprint": FINGERPRINT})
    return run


PROVENANCE = {"method": "dpnle", "model": None, "pairs_digest": "0123abcd"}  # model: FINGERPRINT, set below


def test_written_selection_reproduces_edit_vectors(run):
    from dpnle.runs import write_parquet

    high, low = raw_samples(seed=6, width=500)
    stats = stats_from_samples(high, low)
    frame = loc.select_dpnle(stats, [0, 1, 2], quantile=0.9, d_threshold=0.2)
    write_parquet(run.neurons_path("openness"), frame, {**PROVENANCE, "model": FINGERPRINT})
    back = loc.load_selection(run, "openness")
    assert back["selected"].all() and len(back) == int(frame["selected"].sum())
    for weighted in (False, True):
        for mode in ("both", "directional"):
            a = loc.edit_vectors(frame, weighted=weighted, mode=mode)
            b = loc.edit_vectors(back, weighted=weighted, mode=mode)
            assert a.keys() == b.keys()
            for pole in a:
                assert a[pole].keys() == b[pole].keys()
                for layer in a[pole]:
                    np.testing.assert_array_equal(a[pole][layer][0], b[pole][layer][0])
                    np.testing.assert_array_equal(a[pole][layer][1], b[pole][layer][1])
    with pytest.raises(loc.ArtifactError, match="localize"):
        loc.load_selection(run, "extraversion")


# ---------------------------------------------------------------------------------------------
# end to end on a run directory (synthetic capture in dpnle.collect's on-disk format)

FINGERPRINT = {"id": "test/tiny-model", "digest": "abc123", "num_layers": 4, "intermediate_size": 80}


def write_capture(run, concept, site, policy, high, low, pos=None, fingerprint=FINGERPRINT):
    """manifest.json, stats.parquet (one row per (pole, layer): n, mean, m2, pos_frac_sum) and
    one float16 activation shard, as collect_concept leaves them."""
    import json

    import pyarrow as pa

    from dpnle.runs import write_parquet

    layers = sorted(high)
    width = high[layers[0]].shape[1]
    n_h, n_l = high[layers[0]].shape[0], low[layers[0]].shape[0]
    folder = run.activations_dir(concept) / f"{site}-{policy}"
    folder.mkdir(parents=True)

    def lists(rows):
        flat = np.concatenate([np.asarray(r, np.float64) for r in rows])
        return pa.ListArray.from_arrays(
            pa.array(np.arange(len(rows) + 1, dtype=np.int32) * width), pa.array(flat)
        )

    poles, layer_col, ns, means, m2s, pos_sums = [], [], [], [], [], []
    for pole, data in (("high", high), ("low", low)):
        for layer in layers:
            x = data[layer]
            poles.append(pole)
            layer_col.append(layer)
            ns.append(x.shape[0])
            means.append(x.mean(axis=0))
            m2s.append(((x - x.mean(axis=0)) ** 2).sum(axis=0))
            if pos is not None:
                pos_sums.append(pos[pole][layer].sum(axis=0))
    table = pa.table(
        {
            "pole": pa.array(poles, pa.string()),
            "layer": pa.array(layer_col, pa.int16()),
            "n": pa.array(ns, pa.int64()),
            "mean": lists(means),
            "m2": lists(m2s),
            "pos_frac_sum": lists(pos_sums)
            if pos is not None
            else pa.nulls(len(poles), pa.list_(pa.float64())),
        }
    )
    write_parquet(folder / "stats.parquet", table, {"kind": "stats", "concept": concept})
    # samples: pair p = (high sample 2p, low sample 2p + 1)
    n = n_h + n_l
    sample_id = np.arange(n)
    pair_id = sample_id // 2
    pole = np.where(sample_id % 2 == 0, "high", "low")
    acts = np.zeros((n, len(layers), width), dtype=np.float16)
    for j, layer in enumerate(layers):
        acts[0::2, j] = high[layer]
        acts[1::2, j] = low[layer]
    shard = pa.table(
        {
            "sample_id": pa.array(np.repeat(sample_id, len(layers)).astype(np.int64)),
            "pair_id": pa.array(np.repeat(pair_id, len(layers)).astype(np.int64)),
            "pole": pa.array(np.repeat(pole, len(layers)).astype(object), pa.string()),
            "layer": pa.array(np.tile(np.asarray(layers, np.int16), n)),
            "acts": pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1)), width),
        }
    )
    write_parquet(folder / "shard-00000.parquet", shard, {"shard": 0})
    manifest = {
        "kind": "activations",
        "concept": concept,
        "site": site,
        "policy": policy,
        "layers": layers,
        "width": width,
        "model": {"id": fingerprint["id"], "fingerprint": fingerprint},
        "pairs": {"digest": f"pairs-{concept}", "num_pairs": n // 2},
        "shard_size": n,
        "num_samples": n,
        "status": "done",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return acts


def paired_samples(seed, layers=4, width=80, n_pairs=60, separated_from=2, shift=1.5):
    """Equal-size poles; layers >= separated_from carry a strong trait signal on 8 neurons."""
    rng = np.random.default_rng(seed)
    high, low = {}, {}
    for layer in range(layers):
        h = rng.normal(0, 1, (n_pairs, width))
        lo = rng.normal(0, 1, (n_pairs, width))
        if layer >= separated_from:
            h[:, :4] += shift
            h[:, 4:8] -= shift
        high[layer], low[layer] = (
            h.astype(np.float16).astype(np.float64),
            lo.astype(np.float16).astype(np.float64),
        )
    return high, low


@pytest.fixture
def tiny_run(tmp_path):
    from dpnle.runs import Run

    run = Run.create_or_open("tiny", FINGERPRINT["id"], root=tmp_path)
    run.update_manifest(model={"id": FINGERPRINT["id"], "fingerprint": FINGERPRINT})
    return run


def test_localize_concept_auto_layers_end_to_end(tiny_run):
    from dpnle.runs import parquet_metadata, read_parquet

    high, low = paired_samples(0)
    write_capture(tiny_run, "openness", "mlp", "last", high, low)
    result = loc.localize_concept(tiny_run, "openness")  # unknown model: layers auto, tau 0.8, q 0.995
    auto = result.params["auto"]
    assert auto["start_layer"] == 2 and auto["rule"] == "sustained" and auto["reached_threshold"]
    assert float(auto["accuracy_per_layer"]["3"]) >= 0.9 and float(auto["accuracy_per_layer"]["0"]) < 0.9
    assert result.path == tiny_run.neurons_path("openness")
    written = read_parquet(result.path)
    expected = loc.select_dpnle(stats_from_samples(high, low), [2, 3], quantile=0.995, d_threshold=0.8)
    assert list(written.columns) == list(loc.DPNLE_COLUMNS)
    np.testing.assert_array_equal(written["selected"], expected["selected"])
    np.testing.assert_allclose(written["cohens_d"], expected["cohens_d"], rtol=1e-9)
    ref = reference_dpnle(high, low, [2, 3], 0.995, 0.8)
    assert {(int(r.layer), int(r.neuron)) for r in written[written["selected"]].itertuples()} == set(ref)
    meta = parquet_metadata(result.path)
    assert meta["method"] == "dpnle" and meta["parameters"]["d_threshold"] == 0.8
    assert meta["parameters"]["auto"]["rule"] == "sustained"
    assert meta["model"]["fingerprint"]["digest"] == "abc123" and meta["pairs_digest"] == "pairs-openness"
    assert meta["source"].endswith("activations/openness/mlp-last/stats.parquet")
    stage = tiny_run.stage_status("localize", "openness")
    assert stage["status"] == "done" and stage["auto"]["start_layer"] == 2
    # summary: per layer counts; share of all 4 x 80 MLP neurons
    assert result.summary["layer"].tolist() == [2, 3]
    assert result.total_selected == int(written["selected"].sum()) == len(ref)
    assert result.total_share == pytest.approx(len(ref) / (4 * 80))
    assert (result.summary["n_high"] + result.summary["n_low"]).sum() == len(ref)


def test_localize_concept_explicit_parameters_and_readback(tiny_run):
    high, low = paired_samples(1)
    write_capture(tiny_run, "openness", "mlp", "last", high, low)
    result = loc.localize_concept(tiny_run, "openness", quantile=0.9, d_threshold=0.3, layers="1-3")
    assert result.params["layers"] == "1-3" and "auto" not in result.params
    from dpnle.collect import load_stats

    loc_stats = load_stats(tiny_run, "openness")
    stats = stats_from_samples(high, low)
    expected = loc.select_dpnle(stats, [1, 2, 3], quantile=0.9, d_threshold=0.3)
    selection = loc.load_selection(tiny_run, "openness")
    assert len(selection) == int(expected["selected"].sum())
    vectors = loc.edit_vectors(selection)
    for pole in ("high", "low"):
        for layer, (idx, delta) in vectors[pole].items():
            exact = (loc_stats.mean_high[layer] - loc_stats.mean_low[layer])[idx].astype(np.float32)
            np.testing.assert_array_equal(delta, exact)
    # a threshold change re-runs from the same statistics
    again = loc.localize_concept(tiny_run, "openness", quantile=0.9, d_threshold=0.6, layers="1-3")
    assert again.total_selected <= result.total_selected


def test_localize_refuses_a_capture_from_another_model(tiny_run):
    high, low = paired_samples(2)
    write_capture(
        tiny_run, "openness", "mlp", "last", high, low, fingerprint={**FINGERPRINT, "digest": "zzz999"}
    )
    with pytest.raises(loc.ArtifactError, match="zzz999.*abc123"):
        loc.localize_concept(tiny_run, "openness", layers="0-3")


def test_localize_all_writes_overlap(tiny_run):
    from dpnle.runs import read_parquet

    for seed, concept in enumerate(("openness", "extraversion", "neuroticism")):
        high, low = paired_samples(10 + seed, shift=0.6 + 0.1 * seed)
        write_capture(tiny_run, concept, "mlp", "last", high, low)
    results = loc.localize_all(tiny_run, quantile=0.8, d_threshold=0.2, layers="all")
    assert [r.concept for r in results] == ["openness", "extraversion", "neuroticism"]
    table = read_parquet(loc.overlap_path(tiny_run))
    expected = loc.overlap_table(tiny_run, ["openness", "extraversion", "neuroticism"])
    pd.testing.assert_frame_equal(table, expected)
    sets = {
        c: {(int(r.layer), int(r.neuron)): r.pole for r in loc.load_selection(tiny_run, c).itertuples()}
        for c in ("openness", "extraversion", "neuroticism")
    }
    for r in table.itertuples(index=False):
        a, b = sets[r.concept_a], sets[r.concept_b]
        assert r.shared == len(a.keys() & b.keys()) > 0
        assert r.jaccard == pytest.approx(len(a.keys() & b.keys()) / len(a.keys() | b.keys()))
        assert r.shared_opposite_pole == sum(a[k] != b[k] for k in a.keys() & b.keys())


def test_localize_npti_and_caa_end_to_end(tiny_run):
    from dpnle.runs import read_parquet

    rng = np.random.default_rng(5)
    high, low = paired_samples(3)
    pos = {
        "high": {x: (rng.random(high[x].shape) < np.linspace(0.9, 0.1, 80)).astype(np.float64) for x in high},
        "low": {x: (rng.random(low[x].shape) < 0.5).astype(np.float64) for x in low},
    }
    acts = write_capture(tiny_run, "openness", "gate", "response-mean", high, low, pos=pos)
    result = loc.localize_concept(tiny_run, "openness", method="npti", npti_selection="per-layer")
    assert result.path == tiny_run.neurons_path("openness", "npti")
    frame = read_parquet(result.path)
    sel = frame[frame["selected"]]
    assert len(sel) > 0 and set(sel["pole"]) == {"high", "low"}
    assert (sel["delta_p"].abs() >= 0.1).all()
    for r in sel.head(20).itertuples(index=False):
        j = int(r.layer)
        rows = slice(0, None, 2) if r.pole == "high" else slice(1, None, 2)
        assert r.v95 == pytest.approx(np.percentile(acts[rows, j, r.neuron].astype(np.float32), 95))
    assert tiny_run.stage_status("localize", "openness:npti")["status"] == "done"

    high_r, low_r = paired_samples(4, shift=3.0, separated_from=3)
    write_capture(tiny_run, "openness", "resid", "last", high_r, low_r)
    caa = loc.localize_concept(tiny_run, "openness", method="caa")
    assert caa.params["layer"] == 3 and caa.params["rule"].startswith("argmax")
    chosen = loc.load_selection(tiny_run, "openness", "caa")
    assert chosen["layer"].unique().tolist() == [3] and len(chosen) == 80
    assert loc.localize_concept(tiny_run, "openness", method="caa", layer=1).params["layer"] == 1


# ---------------------------------------------------------------------------------------------
# provenance: a missing field is a refusal, never a skipped check


def test_missing_provenance_is_refused(run):
    from dpnle.runs import write_parquet

    high, low = raw_samples(seed=6, width=80)
    frame = loc.select_dpnle(stats_from_samples(high, low), [0, 1, 2], quantile=0.9, d_threshold=0.2)
    path = run.neurons_path("openness")
    write_parquet(path, frame, {"method": "dpnle"})  # metadata stripped of model and pairs
    with pytest.raises(loc.ArtifactError, match="does not say which model"):
        loc.load_selection(run, "openness")
    write_parquet(path, frame, {"method": "dpnle", "model": FINGERPRINT})
    with pytest.raises(loc.ArtifactError, match="does not say which contrastive pairs"):
        loc.load_selection(run, "openness")
    write_parquet(path, frame, {**PROVENANCE, "model": FINGERPRINT})
    assert len(loc.load_selection(run, "openness")) == int(frame["selected"].sum())
    run.update_manifest(model={"id": FINGERPRINT["id"], "fingerprint": {}})  # a run.json without a fingerprint
    with pytest.raises(loc.ArtifactError, match="records no model fingerprint"):
        loc.load_selection(run, "openness")


def test_edit_refuses_a_model_of_another_shape(run):
    """An edit built from a run names the model it was made for; indices that happen to fit a
    model with another layer count or width do not make it an edit of that model."""
    from helpers import INTERMEDIATE, LAYERS, tiny_llama

    from dpnle.edits import build_edit
    from dpnle.runs import write_parquet

    run.update_manifest(model={"id": FINGERPRINT["id"], "fingerprint": {**FINGERPRINT, "intermediate_size": 80,
                                                                        "num_layers": LAYERS}})
    high, low = raw_samples(seed=6, width=INTERMEDIATE)  # indices all fit the tiny model's width
    frame = loc.select_dpnle(stats_from_samples(high, low), [0, 1, 2], quantile=0.9, d_threshold=0.2)
    write_parquet(run.neurons_path("openness"), frame,
                  {**PROVENANCE, "model": run.manifest()["model"]["fingerprint"]})
    edit = build_edit(run, "openness", "dpnle", "up")
    model, _ = tiny_llama()
    with pytest.raises(loc.InputError, match="intermediate_size 80 there, 64 here"):
        edit.apply(model)
    # The same edit, made for this shape, applies.
    edit.meta["model"]["intermediate_size"] = INTERMEDIATE
    with edit.apply(model):
        pass
