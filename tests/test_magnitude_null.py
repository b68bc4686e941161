"""The magnitude-only null (edit method ``random-mag``): neurons drawn from those that pass
DPN-LE's |delta| quantile cut alone, edited with their own deltas, and the ``mag_null_*``
columns of the summary, each against an independent numpy / scipy computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from dpnle import evaluate as ev
from dpnle import leakage as lk
from dpnle.edits import build_edit, magnitude_null_selection, selection_vectors
from dpnle.localize import select_dpnle
from dpnle.runs import ArtifactError, Run, write_parquet
from dpnle.stats import LayerStats

LAYERS = [1, 2, 3]
WIDTH = 200
QUANTILE = 0.8
D_THRESHOLD = 1.0
FINGERPRINT = {"id": "tiny-llama", "digest": "feed0123", "num_layers": 4, "intermediate_size": WIDTH,
               "hidden_size": 32}


def hand_stats(seed: int = 0) -> LayerStats:
    """Means and variances where |delta| and |d| rank the neurons differently (the variances
    span two orders of magnitude), so the magnitude passers are a strict superset of DPN-LE's."""
    rng = np.random.default_rng(seed)
    shape = (len(LAYERS), WIDTH)
    mean_low = rng.normal(0, 1, shape)
    mean_high = mean_low + rng.normal(0, 1, shape)
    var = np.exp(rng.uniform(np.log(0.05), np.log(5.0), shape))
    n = np.full(len(LAYERS), 30, dtype=np.int64)
    return LayerStats("openness", "mlp", "response-mean", LAYERS, n, n, mean_high, mean_low, var, var * 1.1)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    out = select_dpnle(hand_stats(), quantile=QUANTILE, d_threshold=D_THRESHOLD)
    # The fixture is only useful if the selection is a strict subset of the magnitude passers.
    assert 0 < out["selected"].sum() < len(out) * (1 - QUANTILE) - len(LAYERS)
    return out


def passers_by_numpy(frame: pd.DataFrame) -> dict[int, dict[int, float]]:
    """Per layer: {neuron: delta} of the neurons with |delta| above the layer's quantile cut."""
    out = {}
    for layer in LAYERS:
        part = frame[frame["layer"] == layer]
        delta = part["delta"].to_numpy(float)
        cut = np.quantile(np.abs(delta), QUANTILE)
        keep = np.abs(delta) > cut
        out[layer] = dict(zip(part["neuron"].to_numpy(int)[keep].tolist(), delta[keep].tolist(), strict=True))
    return out


def dpnle_counts(frame: pd.DataFrame, mode: str, direction: str) -> dict[int, int]:
    """Neurons per layer the DPN-LE edit touches, counted from the frame's poles."""
    sel = frame[frame["selected"]]
    if mode == "directional":
        sel = sel[sel["pole"] == ("high" if direction == "up" else "low")]
    return {int(k): int(v) for k, v in sel.groupby("layer").size().items()}


def drawn(frame, direction, mode, seed, concept="openness"):
    chosen = magnitude_null_selection(frame, QUANTILE, direction, mode=mode, seed=seed, concept=concept)
    return selection_vectors(chosen, direction, mode=mode)


@pytest.mark.parametrize("mode,direction", [("both", "up"), ("both", "down"), ("directional", "up"),
                                            ("directional", "down")])
def test_draws_come_from_the_magnitude_passers_with_dpnle_counts(frame, mode, direction):
    passers = passers_by_numpy(frame)
    counts = dpnle_counts(frame, mode, direction)
    selected = {(int(r.layer), int(r.neuron)) for r in frame[frame["selected"]].itertuples()}
    outside = 0
    for seed in range(8):
        vectors = drawn(frame, direction, mode, seed)
        assert {k: v[0].size for k, v in vectors.items()} == counts
        for layer, (idx, delta) in vectors.items():
            assert np.unique(idx).size == idx.size and np.all(np.diff(idx) > 0)
            assert set(idx.tolist()) <= set(passers[layer])
            # Their own deltas (the DPN-LE rule stores delta = mean_high - mean_low as it is).
            np.testing.assert_allclose(delta, [passers[layer][i] for i in idx.tolist()], rtol=1e-6)
            if mode == "directional":
                assert (delta > 0).all() if direction == "up" else (delta < 0).all()
            outside += sum((layer, i) not in selected for i in idx.tolist())
    assert outside > 0  # the pool is the magnitude passers, not DPN-LE's set


def test_directional_pool_is_every_passer_of_the_poles_sign(frame):
    # Over many seeds every passer with the right sign gets drawn at least once, none with the other.
    passers = passers_by_numpy(frame)
    for direction, sign in (("up", 1), ("down", -1)):
        seen: dict[int, set] = {layer: set() for layer in LAYERS}
        for seed in range(300):
            for layer, (idx, _) in drawn(frame, direction, "directional", seed).items():
                seen[layer] |= set(idx.tolist())
        for layer in LAYERS:
            if not dpnle_counts(frame, "directional", direction).get(layer):
                continue
            assert seen[layer] == {n for n, d in passers[layer].items() if np.sign(d) == sign}


def test_same_seed_same_draw_other_seeds_differ_and_both_mode_shares_neurons(frame):
    for mode in ("both", "directional"):
        a = drawn(frame, "up", mode, seed=3)
        b = drawn(frame, "up", mode, seed=3)
        c = drawn(frame, "up", mode, seed=4)
        assert a.keys() == b.keys() == c.keys()
        for layer in a:
            np.testing.assert_array_equal(a[layer][0], b[layer][0])
            np.testing.assert_array_equal(a[layer][1], b[layer][1])
        assert any(not np.array_equal(a[k][0], c[k][0]) for k in a)
    # Mode "both": up and down touch the same neurons (the sign is the edit's, not the vector's).
    up, down = drawn(frame, "up", "both", 5), drawn(frame, "down", "both", 5)
    assert all(np.array_equal(up[k][0], down[k][0]) and np.array_equal(up[k][1], down[k][1]) for k in up)
    # The draw depends on the concept too.
    other = drawn(frame, "up", "both", 5, concept="extraversion")
    assert any(not np.array_equal(up[k][0], other[k][0]) for k in up)


def test_a_quantile_that_does_not_reproduce_the_selection_is_refused(frame):
    with pytest.raises(ArtifactError, match="does not reproduce the selection"):
        magnitude_null_selection(frame, 0.999, "up", mode="both", seed=0)


# ---------------------------------------------------------------------------------------------
# built from a run


def write_run(tmp_path, frame: pd.DataFrame, parameters: dict | None) -> Run:
    run = Run.create_or_open("r", "tiny-llama", root=tmp_path)
    run.update_manifest(model={"id": "tiny-llama", "fingerprint": FINGERPRINT})
    meta = {"method": "dpnle", "model": FINGERPRINT, "pairs_digest": "0123abcd"}
    if parameters is not None:
        meta["parameters"] = parameters
    write_parquet(run.neurons_path("openness"), frame, meta)
    return run


@pytest.mark.parametrize("mode", ["both", "directional"])
def test_build_edit_uses_the_recorded_quantile_and_the_dpnle_rule(tmp_path, frame, mode):
    run = write_run(tmp_path, frame, {"quantile": QUANTILE, "d_threshold": D_THRESHOLD})
    passers = passers_by_numpy(frame)
    gamma = 1.5
    for direction in ("up", "down"):
        ref = build_edit(run, "openness", "dpnle", direction, gamma=gamma, mode=mode)
        edit = build_edit(run, "openness", "random-mag", direction, gamma=gamma, mode=mode, seed=7)
        assert edit.method == "random-mag" and edit.site == "mlp" and edit.sign == ref.sign
        assert edit.neurons_per_layer() == ref.neurons_per_layer() == dpnle_counts(frame, mode, direction)
        assert edit.meta["quantile"] == QUANTILE and edit.meta["null"] == "magnitude-only"
        dense = edit.dense_vectors(WIDTH)
        sign = 1 if direction == "up" else -1
        for layer, (idx, _) in edit.vectors.items():
            idx = idx.numpy()
            own = np.array([passers[layer][i] for i in idx.tolist()])
            # The change at each drawn neuron is gamma * sign * its own delta; zero elsewhere.
            np.testing.assert_allclose(dense[layer].numpy()[idx], gamma * sign * own, rtol=1e-6)
            assert int((dense[layer] != 0).sum()) == idx.size
        again = build_edit(run, "openness", "random-mag", direction, gamma=gamma, mode=mode, seed=7)
        for layer in edit.vectors:
            assert edit.vectors[layer][0].equal(again.vectors[layer][0])
            assert edit.vectors[layer][1].equal(again.vectors[layer][1])


def test_a_neurons_file_without_its_quantile_is_refused(tmp_path, frame):
    run = write_run(tmp_path, frame, None)
    with pytest.raises(ArtifactError, match="quantile"):
        build_edit(run, "openness", "random-mag", "up")


def test_conditions_and_methods_list_random_mag():
    config = ev.EvalConfig(methods=["dpnle", "random-mag", "none"], directions=["up"], random_draws=3)
    assert [c.key for c in ev.conditions(config)] == [
        "dpnle-up-g1", "random-mag-up-g1-s0", "random-mag-up-g1-s1", "random-mag-up-g1-s2", "none"]
    from dpnle import edits, matched

    assert ev.METHODS == edits.EDIT_METHODS == lk.METHOD_ORDER
    assert ev.RANDOM_METHODS == edits.RANDOM_METHODS == matched.DRAWN_METHODS == ("random", "random-mag")


# ---------------------------------------------------------------------------------------------
# the mag_null columns

ITEMS = 6
BENCH, SCORER = "ipip120", "likert"
RANDOM9 = [0.05, -0.10, 0.15, -0.20, 0.08, 0.12, -0.03, 0.30, -0.25]
MAG7 = [0.40, -0.60, 0.85, 0.20, -0.95, 0.70, 0.55]


def _records(concept, condition, method, direction, gamma, seed, dimension, scores):
    return [{"concept": concept, "condition": condition, "method": method, "direction": direction,
             "gamma": float(gamma), "seed": seed, "benchmark": BENCH, "scorer": SCORER,
             "item_id": f"i{k}", "dimension": dimension, "score": float(s), "chance": np.nan,
             "num_neurons": 0 if method in ("none", "prompt") else 40} for k, s in enumerate(scores)]


def build_rows(concepts, dpnle_shift, random_shifts, mag_shifts, dims):
    rng = np.random.default_rng(1)
    wobble = rng.normal(0, 0.01, ITEMS)
    rows = []
    for concept in concepts:
        for dim in dims:
            base = np.linspace(2.0, 3.0, ITEMS) + (0.1 if dim != concept else 0.0)
            rows += _records(concept, "none", "none", "-", 0.0, 0, dim, base)
            rows += _records(concept, "dpnle-up-g1", "dpnle", "up", 1.0, 0, dim, base + dpnle_shift[concept] + wobble)
            for seed, r in enumerate(random_shifts):
                rows += _records(concept, f"random-up-g1-s{seed}", "random", "up", 1.0, seed, dim,
                                 base + r + wobble * (seed + 1) / 3)
            for seed, r in enumerate(mag_shifts):
                rows += _records(concept, f"random-mag-up-g1-s{seed}", "random-mag", "up", 1.0, seed, dim,
                                 base + r - wobble * (seed + 2) / 5)
    return pd.DataFrame(rows)


def by_hand(rows, concept, dim, method):
    """(d, N, p, z) of the DPN-LE row against the draws of ``method``, from the item scores."""
    part = rows[(rows["concept"] == concept) & (rows["dimension"] == dim)]
    base = part[part["condition"] == "none"].set_index("item_id")["score"]

    def delta(key):
        return float((part[part["condition"] == key].set_index("item_id")["score"] - base).mean())

    d = delta("dpnle-up-g1")
    keys = sorted(set(part.loc[part["method"] == method, "condition"]))
    r = np.array([delta(k) for k in keys])
    n = len(r)
    p = (1 + np.sum(np.abs(r) >= abs(d))) / (n + 1)
    z = (d - r.mean()) / r.std(ddof=1) if n >= 2 and r.std(ddof=1) > 0 else np.nan
    return d, n, p, z


def pick(summary, concept, dim, condition="dpnle-up-g1"):
    sel = summary[(summary["concept"] == concept) & (summary["dimension"] == dim)
                  & (summary["condition"] == condition)]
    assert len(sel) == 1
    return sel.iloc[0]


def test_mag_null_columns_match_numpy_and_scipy():
    concepts = ["openness", "extraversion", "agreeableness"]
    shifts = {"openness": 0.9, "extraversion": -0.5, "agreeableness": 0.135}
    rows = build_rows(concepts, shifts, RANDOM9, MAG7, dims=concepts)
    summary = ev.summarize(rows)
    without = ev.summarize(rows[rows["method"] != "random-mag"])
    mag_ps, null_ps = {}, {}
    for concept in concepts:
        for dim in concepts:
            got = pick(summary, concept, dim)
            d, n, p, z = by_hand(rows, concept, dim, "random-mag")
            assert got["delta"] == pytest.approx(d)
            assert got["mag_null_n"] == n == 7
            assert got["mag_null_p"] == pytest.approx(p)
            assert got["mag_null_z"] == pytest.approx(z)
            _, n0, p0, z0 = by_hand(rows, concept, dim, "random")
            assert got["null_n"] == n0 == 9 and got["null_p"] == pytest.approx(p0) and got["null_z"] == pytest.approx(z0)
            # Adding the magnitude-only draws leaves the random null as it was.
            old = pick(without, concept, dim)
            for column in ("null_n", "null_p", "null_z", "null_q"):
                assert got[column] == pytest.approx(old[column], nan_ok=True)
            assert old["mag_null_n"] == 0 and np.isnan(old[["mag_null_p", "mag_null_z", "mag_null_q"]].astype(float)).all()
            if dim == concept:
                mag_ps[concept], null_ps[concept] = p, p0
            else:
                assert np.isnan(got["mag_null_q"])
    # By hand: openness 0.9 beats 6 of 7 draws (not -0.95) -> p = 2/8; extraversion -0.5 is
    # beaten by 0.55, -0.6, 0.7, 0.85, -0.95 -> p = 6/8; agreeableness 0.135 by all 7 -> p = 1.
    assert [mag_ps[c] for c in concepts] == pytest.approx([2 / 8, 6 / 8, 1.0])
    q = sps.false_discovery_control(np.array([mag_ps[c] for c in concepts]), method="bh")
    for concept, value in zip(concepts, q, strict=True):
        assert pick(summary, concept, concept)["mag_null_q"] == pytest.approx(value)
    # The draws' own rows carry no null columns.
    draws = summary[summary["method"].isin(["random", "random-mag"])]
    assert draws[["null_n", "null_p", "mag_null_n", "mag_null_p", "mag_null_q"]].isna().all().all()


def test_paper_cell_shows_both_nulls():
    rows = build_rows(["openness"], {"openness": 0.9}, RANDOM9, MAG7, dims=["openness"])
    summary = ev.summarize(rows)
    table = ev.paper_table(summary)
    r = pick(summary, "openness", "openness")
    cell = table.loc[table["method"] == "dpnle", "ipip120/likert up"].item()
    prefix = f"{r['delta']:+.3f} ({r['ci_low']:+.3f},{r['ci_high']:+.3f})"
    z, z_mag = f"{r['null_z']:+.2f}", f"{r['mag_null_z']:+.2f}"
    assert cell == f"{prefix} p_null 0.10 z {z} q 0.10 (N=9) p_mag 0.25 z {z_mag} q 0.25 (N=7) [unchecked]"
    mag_cell = table.loc[table["method"] == "random-mag", "ipip120/likert up"].item()
    assert "p_null" not in mag_cell and "p_mag" not in mag_cell and "[" in mag_cell  # mean [min..max] of draws
    assert list(table["method"]) == ["dpnle", "random", "random-mag", "none"]
    # Without magnitude-only draws the cell is what it was.
    plain = ev.paper_table(ev.summarize(rows[rows["method"] != "random-mag"]))
    assert plain.loc[plain["method"] == "dpnle", "ipip120/likert up"].item() == \
        f"{prefix} p_null 0.10 z {z} q 0.10 (N=9) [unchecked]"


# ---------------------------------------------------------------------------------------------
# end to end on a tiny model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from helpers import localized_tiny_run

    return localized_tiny_run(tmp_path_factory.mktemp("runs"), "tiny")


def test_edit_eval_with_the_magnitude_null_end_to_end(tiny_run):
    from dpnle.runs import read_parquet

    run, loaded = tiny_run
    neurons = read_parquet(run.neurons_path("openness"))
    # A real selection: the recorded quantile reproduces it, every draw is a magnitude passer.
    for seed in range(3):
        edit = build_edit(run, "openness", "random-mag", "up", seed=seed)
        ref = build_edit(run, "openness", "dpnle", "up")
        assert edit.neurons_per_layer() == ref.neurons_per_layer()
        for layer, (idx, delta) in edit.vectors.items():
            part = neurons[neurons["layer"] == layer].set_index("neuron")
            cut = np.quantile(np.abs(part["delta"].to_numpy(float)), 0.9)
            assert (np.abs(part.loc[idx.numpy(), "delta"].to_numpy()) > cut).all()
            np.testing.assert_allclose(delta.numpy(), part.loc[idx.numpy(), "delta"].to_numpy(), rtol=1e-6)

    config = ev.EvalConfig(methods=["dpnle", "random-mag", "none"], directions=["up"], benchmarks=["ipip120"],
                           scorers=["statement"], limit=1, random_draws=3, validity_personas=1, batch_size=8,
                           valid_scorers_only=False)
    result = ev.evaluate_concept(run, loaded, "openness", config, log=lambda m: None)
    assert result.computed == ["dpnle-up-g1", "random-mag-up-g1-s0", "random-mag-up-g1-s1",
                               "random-mag-up-g1-s2", "none"]
    summary = result.summary
    rows = ev.load_eval(run, "openness")
    assert set(rows.loc[rows["method"] == "random-mag", "num_neurons"]) == {ref.num_neurons}
    target = summary[(summary["method"] == "dpnle") & summary["target"]].iloc[0]
    draws = summary[(summary["method"] == "random-mag") & summary["target"]]["delta"].to_numpy(float)
    assert target["mag_null_n"] == 3 and target["null_n"] == 0 and np.isnan(target["null_p"])
    assert target["mag_null_p"] == pytest.approx((1 + np.sum(np.abs(draws) >= abs(target["delta"]))) / 4)
    assert target["mag_null_q"] == pytest.approx(target["mag_null_p"])  # a family of one
    # The leakage shifts pool the draws of the magnitude-only null like the random control's.
    shifts = lk.score_shifts(rows, "ipip120", "statement")
    pooled = shifts[shifts["method"] == "random-mag"]
    assert set(pooled["condition"]) == {"random-mag-up-g1"} and set(pooled["n_seeds"]) == {3}
    # Resuming reuses every condition, the draws included (the same seed gives the same neurons).
    again = ev.evaluate_concept(run, loaded, "openness", config, log=lambda m: None)
    assert again.computed == [] and len(again.reused) == 5
