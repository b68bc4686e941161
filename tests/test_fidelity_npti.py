"""NPTI fidelity: dpnle's reference mode against a transcription of NPTI's own code
(RUCAIBox/NPTI @630d2a2, NPTI/code/search_neuron.py and process_neuron.py).

The ``ref_*`` functions below restate what the reference computes, step by step, in the
reference's own operations (torch.bucketize + scatter_add_ histograms, float32 over_zero /
token_num, a descending sort written out as a list, ``read_and_convert_to_dict``'s loop,
``calculate_quantiles``). One deliberate difference: the reference's ``torch.sort`` is not
stable, so its order among equal deltas is unspecified; the transcription sorts stably
(flattened (layer, neuron) order), which is the tie order dpnle documents.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dpnle import localize as loc
from dpnle.collect import capture_dir, collect_concept, load_stats
from dpnle.pairs import NPTI_TEMPLATE, npti_message, render_prompt, to_samples
from dpnle.runs import ArtifactError, Run
from dpnle.stats import LayerStats, RunningMoments, TokenCounts, npti_bin_edges
from tests.helpers import tiny_llama, tiny_pairs

# ---------------------------------------------------------------------------------------------
# transcription of the reference


def ref_bins() -> torch.Tensor:
    bins = torch.cat([torch.tensor([-float("inf")]), torch.arange(0, 3.01, 0.01)])
    bins[-1] = float("inf")
    return bins


def ref_accumulate(state: dict, activation: torch.Tensor) -> None:
    """search_neuron.py's patched forward for one layer: ``activation`` [tokens, neurons] float32."""
    state["token_num"] += activation.shape[0]
    state["over_zero"] += (activation > 0).sum(dim=0).to(torch.int32)
    bin_indices = (torch.bucketize(activation, ref_bins()) - 1).transpose(0, 1)
    state["histograms"].scatter_add_(1, bin_indices, torch.ones_like(bin_indices, dtype=torch.float32))


def ref_state(width: int) -> dict:
    return {"token_num": 0, "over_zero": torch.zeros(width, dtype=torch.int32),
            "histograms": torch.zeros((width, 301))}


def ref_calculate_quantiles(histogram: torch.Tensor, bins: torch.Tensor, q: float = 0.95) -> float:
    cumsum = torch.cumsum(histogram, dim=-1).float()
    total = cumsum[-1]
    index = torch.searchsorted(cumsum, q * total)
    return bins[index.item()].item()


def ref_sorted_list(prob1: torch.Tensor, prob2: torch.Tensor, histograms: torch.Tensor) -> list[tuple]:
    """process_and_save_differences + the v95 pass: (layer, neuron, diff, p1, v95), sorted."""
    num_cols = prob1.shape[1]
    differences = prob1.view(-1) - prob2.view(-1)
    sorted_differences, order = torch.sort(differences, descending=True, stable=True)
    rows = []
    for idx, diff in zip(order.tolist(), sorted_differences.tolist(), strict=True):
        i, j = idx // num_cols, idx % num_cols
        rows.append((i, j, diff, prob1.view(-1)[idx].item(), ref_calculate_quantiles(histograms[i][j], ref_bins())))
    return rows


def ref_read_and_convert(rows: list[tuple], num_lines: int = 300000, min_required: int = 2000) -> list[tuple]:
    kept, t = [], 0
    for idx in range(num_lines):
        if idx >= len(rows):
            break
        difference = rows[idx][2]
        if idx < min_required or (idx >= min_required and difference >= 0.1):
            kept.append(rows[idx])
            t += 1
        if t >= min_required and difference < 0.1:
            break
    return kept


def ref_lists(states: dict[str, list[dict]], min_required: int = 2000) -> dict[str, list[tuple]]:
    """process_neuron.py for one trait: states[pole][layer] as ref_accumulate left them."""
    prob = {pole: torch.stack([s["over_zero"] / (s["token_num"] * 1.0) for s in per_layer])
            for pole, per_layer in states.items()}
    hist = {pole: torch.stack([s["histograms"] for s in per_layer]) for pole, per_layer in states.items()}
    return {
        "high": ref_read_and_convert(ref_sorted_list(prob["high"], prob["low"], hist["high"]), min_required=min_required),
        "low": ref_read_and_convert(ref_sorted_list(prob["low"], prob["high"], hist["low"]), min_required=min_required),
    }


# ---------------------------------------------------------------------------------------------
# helpers


def stats_from_counts(counts: dict[tuple[str, int], TokenCounts], layers: list[int], width: int) -> LayerStats:
    z = np.zeros((len(layers), width))
    fields = {}
    for pole in ("high", "low"):
        cells = [counts[pole, layer] for layer in layers]
        fields[f"pos_count_{pole}"] = np.stack([c.positive for c in cells])
        fields[f"token_count_{pole}"] = np.array([c.tokens for c in cells])
        fields[f"hist_{pole}"] = np.stack([c.hist for c in cells])
    return LayerStats("openness", "gate", "response-mean", layers, np.full(len(layers), 5), np.full(len(layers), 5),
                      z, z, z, z, **fields)


def assert_same_selection(frame, ref: dict[str, list[tuple]], layers: list[int]) -> None:
    sel = frame[frame["selected"]]
    got = {(int(r.layer), int(r.neuron)): r for r in sel.itertuples(index=False)}
    want = {(layers[i], j): (pole, diff, p, v95) for pole, rows in ref.items() for i, j, diff, p, v95 in rows}
    assert set(got) == set(want)
    for key, (pole, diff, p, v95) in want.items():
        r = got[key]
        assert r.pole == pole
        assert (r.delta_p if pole == "high" else -r.delta_p) == pytest.approx(diff, abs=1e-7)
        assert (r.p_high if pole == "high" else r.p_low) == pytest.approx(p, abs=1e-7)
        assert r.v95 == pytest.approx(v95, abs=1e-7)


def synthetic_tokens(seed: int, layers: int, width: int) -> dict[str, list[list[torch.Tensor]]]:
    """Per pole, per sample, per layer [tokens, width] float32 activations; responses of unequal length."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(-0.6, 0.9, (layers, width))
    shift = rng.normal(0, 0.5, (layers, width))
    out = {}
    for pole, sign in (("high", 1), ("low", -1)):
        samples = []
        for _ in range(7):
            n = int(rng.integers(3, 40))
            acts = [torch.from_numpy(rng.normal(centre[x] + sign * shift[x], 1.0, (n, width)).astype(np.float32))
                    for x in range(layers)]
            samples.append(acts)
        out[pole] = samples
    return out


# ---------------------------------------------------------------------------------------------
# tests


def test_bin_edges_and_histogram_match_reference():
    assert torch.equal(npti_bin_edges(), ref_bins())
    rng = np.random.default_rng(0)
    acts = torch.from_numpy(np.concatenate([rng.normal(0.5, 1.2, (500, 9)), np.array([[0.0, 0.01, 2.99, 3.0, 5.0,
                                           -1e-9, 1e-9, 0.005, 0.02]])]).astype(np.float32))
    counts = TokenCounts(9).update(acts[:200]).update(acts[200:])  # two updates = one pass
    state = ref_state(9)
    ref_accumulate(state, acts)
    assert counts.tokens == state["token_num"]
    np.testing.assert_array_equal(counts.positive, state["over_zero"].numpy())
    np.testing.assert_array_equal(counts.hist, state["histograms"].numpy().astype(np.int64))
    # merging partials is a sum
    merged = TokenCounts(9).merge(TokenCounts.from_arrays(200, *_arrays(TokenCounts(9).update(acts[:200]))))
    merged.merge(TokenCounts(9).update(acts[200:]))
    np.testing.assert_array_equal(merged.hist, counts.hist)


def _arrays(counts: TokenCounts):
    return counts.positive, counts.hist


@pytest.mark.parametrize("top_k", [2000, 40])
def test_reference_selection_matches_transcription_on_synthetic_activations(top_k):
    layers, width = [0, 1, 2], 3000
    data = synthetic_tokens(1, len(layers), width)
    counts = {(pole, x): TokenCounts(width) for pole in ("high", "low") for x in layers}
    states = {pole: [ref_state(width) for _ in layers] for pole in ("high", "low")}
    for pole, samples in data.items():
        for sample in samples:
            for x in layers:
                counts[pole, x].update(sample[x])
                ref_accumulate(states[pole][x], sample[x])
    frame = loc.select_npti(stats_from_counts(counts, layers, width), top_k=top_k, min_delta_p=0.1,
                            selection="reference")
    ref = ref_lists(states, min_required=top_k)
    assert len(ref["high"]) > top_k and len(ref["low"]) > top_k  # the >= 0.1 continuation is exercised
    assert_same_selection(frame, ref, layers)
    assert list(frame.columns) == ["layer", "neuron", "p_high", "p_low", "delta_p", "pole", "v95", "selected"]


def test_pooled_rate_differs_from_mean_of_fractions_and_reference_uses_pooled():
    # Neuron 0: high responses of 2 and 60 tokens, low of 30 and 30. Neuron 1 fires on high only.
    def sample(n_pos, n_neg, other):
        col0 = torch.cat([torch.full((n_pos, 1), 1.0), torch.full((n_neg, 1), -1.0)])
        return torch.cat([col0, torch.full((n_pos + n_neg, 1), other)], dim=1)

    high = [sample(2, 0, 1.0), sample(6, 54, 1.0)]
    low = [sample(9, 21, -1.0)] * 2
    pooled_high = 8 / 62
    mean_of_fractions_high = (1.0 + 6 / 60) / 2
    assert abs(pooled_high - mean_of_fractions_high) > 0.4
    counts, moments = {}, {}
    for pole, samples in (("high", high), ("low", low)):
        counts[pole, 0] = TokenCounts(2)
        moments[pole] = RunningMoments(2)
        for s in samples:
            counts[pole, 0].update(s)
            moments[pole].update(s.mean(0, keepdim=True).numpy(), (s > 0).float().mean(0, keepdim=True).numpy())
    stats = stats_from_counts(counts, [0], 2)
    stats.pos_frac_high, stats.pos_frac_low = moments["high"].positive_fraction[None], moments["low"].positive_fraction[None]
    ref = loc.select_npti(stats, top_k=1, selection="reference")
    old = loc.select_npti(stats, top_k=1, selection="per-layer")
    assert ref["p_high"][0] == pytest.approx(pooled_high, abs=1e-7)
    assert old["p_high"][0] == pytest.approx(mean_of_fractions_high)
    # pooled: 8/62 - 0.3 = -0.17, neuron 0 heads the LOW list; mean of fractions: 0.55 - 0.3 > 0, no LOW neuron
    assert ref["pole"].tolist() == ["low", "high"] and ref["selected"].all()
    assert old["selected"].tolist() == [False, True]
    states = {pole: [ref_state(2)] for pole in ("high", "low")}
    for pole, samples in (("high", high), ("low", low)):
        for s in samples:
            ref_accumulate(states[pole][0], s)
    assert_same_selection(ref, ref_lists(states, min_required=1), [0])


def test_neuron_in_both_lists_is_an_error():
    rng = np.random.default_rng(3)
    counts = {(pole, 0): TokenCounts(10).update(torch.from_numpy(rng.normal(0.3, 1, (50, 10)).astype(np.float32)))
              for pole in ("high", "low")}
    with pytest.raises(ArtifactError, match="both the HIGH and the LOW list"):
        loc.select_npti(stats_from_counts(counts, [0], 10), top_k=6, selection="reference")


def test_selected_neuron_with_minus_inf_v95_is_an_error():
    high = torch.full((100, 3), -1.0)
    high[:4, 0] = 0.5  # neuron 0: p_high 0.04 > p_low 0, the largest delta, 96% of its tokens <= 0
    low = torch.full((100, 3), -1.0)
    low[:, 1:] = 0.5  # neurons 1 and 2 fire on low only
    counts = {("high", 0): TokenCounts(3).update(high), ("low", 0): TokenCounts(3).update(low)}
    state = ref_state(3)
    ref_accumulate(state, high)
    assert ref_calculate_quantiles(state["histograms"][0], ref_bins()) == -float("inf")
    with pytest.raises(ArtifactError, match="v95 is -inf"):
        loc.select_npti(stats_from_counts(counts, [0], 3), top_k=1, selection="reference")


def test_old_stats_without_counts_are_refused_with_the_recapture_command():
    z = np.zeros((1, 4))
    stats = LayerStats("openness", "gate", "response-mean", [0], np.array([3]), np.array([3]), z, z, z, z,
                       pos_frac_high=z, pos_frac_low=z)
    with pytest.raises(ArtifactError, match="--npti-protocol reference --overwrite"):
        loc.select_npti(stats, selection="reference")
    assert loc.select_npti(stats, top_k=1, selection="per-layer")["selected"].sum() == 0


def test_npti_message_is_the_reference_template():
    pairs = tiny_pairs(2)
    row = pairs.iloc[0]
    message = npti_message(row["high_message"], row["question"])
    assert message.startswith("\nYou will find") and message.endswith("###Response:\n")
    assert f"###Question:{row['question']}\n\n###Response:\n" in message
    assert message == NPTI_TEMPLATE.format(personality=message.split("description:")[1].split("\n\n###Q")[0],
                                           question=row["question"])


# ---------------------------------------------------------------------------------------------
# through dpnle's collect path, on a tiny random model


class _Loaded:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.model_id = "tiny-llama"
        self.source = "test"
        self.fingerprint = {"digest": "tiny", "num_layers": 4}


def _hand_counts(model, tokenizer, pairs, max_new_tokens: int):
    """Generate each prompt alone (no padding: transformers' own repetition penalty is then
    vLLM's), hook act_fn of every layer over prompt + generated[:-1], accumulate the
    reference's statistics over the positions of generated[:-1]."""
    samples = to_samples(pairs)
    question = dict(zip(pairs["pair_id"], pairs["question"], strict=True))
    layers = range(len(model.model.layers))
    width = model.config.intermediate_size
    states = {pole: [ref_state(width) for _ in layers] for pole in ("high", "low")}
    eos = tokenizer.eos_token_id
    for message, pair_id, pole in zip(samples["message"], samples["pair_id"], samples["pole"], strict=True):
        text = render_prompt(tokenizer, npti_message(message, question[pair_id]))
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, repetition_penalty=1.1, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=eos)
        generated = out[0, ids.shape[1]:].tolist()
        if eos in generated:
            generated = generated[: generated.index(eos) + 1]
        fed = generated[:-1]
        if not fed:
            continue
        captured = {}
        handles = [model.model.layers[x].mlp.act_fn.register_forward_hook(
            lambda m, a, o, x=x, captured=captured: captured.__setitem__(x, o)) for x in layers]
        try:
            with torch.no_grad():
                model(torch.tensor([ids[0].tolist() + fed]), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        for x in layers:
            ref_accumulate(states[pole][x], captured[x][0, -len(fed):].float())
    return states


@pytest.fixture(scope="module")
def reference_capture(tmp_path_factory):
    model, tokenizer = tiny_llama()
    run = Run.create_or_open("r", "tiny-llama", root=tmp_path_factory.mktemp("runs"))
    run.update_manifest(model={"id": "tiny-llama", "fingerprint": {"digest": "tiny", "num_layers": 4}})
    pairs = tiny_pairs(5)
    collect_concept(run, _Loaded(model, tokenizer), "openness", pairs=pairs, site="gate", policy="response-mean",
                    npti_protocol="reference", max_new_tokens=24, batch_size=1, shard_size=4, progress=False)
    return run, model, tokenizer, pairs


def test_capture_counts_equal_hand_computation(reference_capture):
    run, model, tokenizer, pairs = reference_capture
    stats = load_stats(run, "openness", "gate", "response-mean")
    states = _hand_counts(model, tokenizer, pairs, 24)
    for pole in ("high", "low"):
        np.testing.assert_array_equal(getattr(stats, f"token_count_{pole}"), [s["token_num"] for s in states[pole]])
        np.testing.assert_array_equal(getattr(stats, f"pos_count_{pole}"),
                                      np.stack([s["over_zero"].numpy() for s in states[pole]]))
        np.testing.assert_array_equal(getattr(stats, f"hist_{pole}"),
                                      np.stack([s["histograms"].numpy() for s in states[pole]]).astype(np.int64))
    assert stats.token_count_high[0] > 0 and stats.hist_high.shape == (4, 64, 301)
    # and the selection on them equals the transcription's
    frame = loc.select_npti(stats, top_k=20, selection="reference")
    assert_same_selection(frame, ref_lists(states, min_required=20), stats.layers)
    manifest = stats.meta
    assert manifest["npti_protocol"] == "reference" and manifest["key"]["npti_protocol"] == "reference"
    assert manifest["generation"]["max_new_tokens"] == 24 and manifest["generation"]["repetition_penalty"] == 1.1
    assert manifest["layers"] == [0, 1, 2, 3]


def test_capture_is_not_reused_across_protocols(reference_capture):
    run, model, tokenizer, pairs = reference_capture
    with pytest.raises(ArtifactError, match="NPTI protocol"):
        collect_concept(run, _Loaded(model, tokenizer), "openness", pairs=pairs, site="gate",
                        policy="response-mean", max_new_tokens=24, batch_size=1, shard_size=4, progress=False)


def test_batched_generation_equals_unpadded_generation(reference_capture):
    from dpnle.collect import _Encoded, generate_response_ids

    _, model, tokenizer, pairs = reference_capture
    texts = [render_prompt(tokenizer, npti_message(m, q)) for m, q in zip(pairs["high_message"], pairs["question"],
                                                                           strict=True)]
    encoded = [_Encoded(tokenizer(t, add_special_tokens=False)["input_ids"], 0) for t in texts]
    batched = generate_response_ids(model, tokenizer, encoded, 24, batch_size=5, repetition_penalty=1.1)
    for enc, got in zip(encoded, batched, strict=True):
        ids = torch.tensor([enc.ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             repetition_penalty=1.1, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in out:
            out = out[: out.index(tokenizer.eos_token_id) + 1]
        assert got == out


def test_localize_on_capture_without_counts_names_the_recapture(reference_capture, tmp_path):
    run, *_ = reference_capture
    path = capture_dir(run, "openness", "gate", "response-mean") / "stats.parquet"
    table = pq.read_table(path)
    old = tmp_path / "stats.parquet"
    old.write_bytes(path.read_bytes())
    try:
        pq.write_table(table.drop_columns(["hist", "pos_count", "token_count"]).replace_schema_metadata(
            table.schema.metadata), path)
        stats = load_stats(run, "openness", "gate", "response-mean")
        assert stats.hist_high is None and stats.pos_count_low is None and stats.token_count_high is None
        with pytest.raises(ArtifactError, match="collect-activations --trait openness --site gate --policy "
                                                "response-mean --npti-protocol reference"):
            loc.localize_concept(run, "openness", method="npti")
        result = loc.localize_concept(run, "openness", method="npti", npti_selection="per-layer", top_k=3)
        assert result.params["npti_selection"] == "per-layer"
    finally:
        path.write_bytes(old.read_bytes())
    result = loc.localize_concept(run, "openness", method="npti", top_k=20)
    assert result.params["npti_selection"] == "reference" and result.params["npti_protocol"] == "reference"
