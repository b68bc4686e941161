"""NPTI's edit against a transcription of the reference's forward.

The reference (RUCAIBox/NPTI @630d2a2, NPTI/code/answer_question_change_neuron.py) replaces each
Llama MLP's forward: ``a = SiLU(gate(x))``; in decode steps only (a call with at most
``batch_size`` token rows) it clamps the opposite list's neurons to ``min(a, 0)``, draws a fresh
``torch.rand(k) <= 0.9`` over the layer's target neurons, and adds
``v95 * gamma * sigmoid(10 (delta - 0.15))`` to the kept ones (``delta`` the list's own column 2,
``v95`` column 4); then ``down(a * up(x))``. DPN-LE's re-implementation
(Z1ivan/DPN-LE @3fb5e72, src/dpn_le/vllm_general_capability.py, create_npti_neuron_modifier) is the
same without the mask. The transcription below is written from those files, on the tiny Llama,
and dpnle's hooked edit (gate site, positions ``generated``) must give the same generation and
logits for npti_mask ``per-call`` (same generator stream), ``none`` and ``fixed``.
"""

from __future__ import annotations

import json
from types import MethodType

import numpy as np
import pytest
import torch
from helpers import INTERMEDIATE, LAYERS, tiny_llama

from dpnle.arch import architecture
from dpnle.edits import Edit, build_edit, keep_mask_seed
from dpnle.npti_lists import import_npti_lists
from dpnle.runs import Run

PROMPTS = ["The quick brown fox jumps", "Hi there"]
GAMMA = 1.4
NEW_TOKENS = 6
FINGERPRINT = {"id": "tiny-llama", "digest": "feed0123", "num_layers": LAYERS,
               "intermediate_size": INTERMEDIATE, "hidden_size": 32}


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def synthetic_lists(seed: int = 0, layers=(1, 2, 3), per_layer: int = 12) -> tuple[dict, dict]:
    """A (HIGH, reversed) pair in the published format, disjoint per layer, rows in neuron order
    (the order dpnle keeps its targets in, so both sides draw the mask over the same order)."""
    rng = np.random.default_rng(seed)
    high, low = {}, {}
    for layer in layers:
        chosen = rng.choice(INTERMEDIATE, size=2 * per_layer, replace=False)
        for target, neurons in ((high, np.sort(chosen[:per_layer])), (low, np.sort(chosen[per_layer:]))):
            d = rng.uniform(0.1, 0.6, neurons.size)
            p = rng.uniform(0.6, 0.95, neurons.size)
            v95 = rng.uniform(0.5, 3.0, neurons.size)
            target[str(layer)] = [[layer, int(n), float(a), float(b), float(c)]
                                  for n, a, b, c in zip(neurons, d, p, v95, strict=True)]  # fmt: skip
    return high, low


@pytest.fixture
def lists_dir(tmp_path):
    high, low = synthetic_lists()
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "Openness_dict.json").write_text(json.dumps(high))
    (folder / "Openness_reversed_dict.json").write_text(json.dumps(low))
    return folder, high, low


@pytest.fixture
def run(tmp_path, lists_dir):
    run = Run.create_or_open("r", "tiny-llama", root=tmp_path)
    run.update_manifest(model={"id": "tiny-llama", "fingerprint": FINGERPRINT})
    folder = lists_dir[0]
    import_npti_lists(run, "openness", folder / "Openness_dict.json", folder / "Openness_reversed_dict.json")
    return run


# ---------------------------------------------------------------------------------------------
# the reference's forward, transcribed


def _custom_function(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-10 * (x - 0.15)))


def reference_generate(model, tok, neuron_to_change, neuron_to_deactivate, gamma, mask_draw):
    """Greedy generation with every MLP's forward replaced by the reference's.

    ``mask_draw(layer, k)`` returns the keep-mask of one call (the reference: ``torch.rand(k) <=
    0.9``); None: no mask (DPN-LE's re-implementation)."""
    to_change = {k: torch.tensor(v) for k, v in neuron_to_change.items()}
    to_deactivate = {k: torch.tensor(v) for k, v in neuron_to_deactivate.items()}
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    batch_size = enc["input_ids"].shape[0]
    layers = architecture(model).layers
    saved = []

    def factory(idx):
        def llama_forward(self, x):
            gate = torch.nn.SiLU()(self.gate_proj(x))
            up = self.up_proj(x)
            rows = x.shape[0] * x.shape[1]  # vLLM's flattened token rows
            if rows <= batch_size and str(idx) in to_change:
                elements = to_change[str(idx)]
                indices = elements[:, 1].long()
                values = elements[:, 4]
                difference = elements[:, 2]
                mask = mask_draw(idx, len(values)) if mask_draw else torch.ones(len(values), dtype=torch.bool)
                if str(idx) in to_deactivate:
                    indices_to_deactivate = to_deactivate[str(idx)][:, 1].long()
                    gate[..., indices_to_deactivate] = torch.min(gate[..., indices_to_deactivate], torch.tensor(0.0))
                gate[..., indices[mask]] += values[mask] * gamma * _custom_function(difference[mask])
            return self.down_proj(gate * up)

        return llama_forward

    try:
        for i, sites in enumerate(layers):
            saved.append((sites.mlp, sites.mlp.forward))
            sites.mlp.forward = MethodType(factory(i), sites.mlp)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id,
                                 output_scores=True, return_dict_in_generate=True)
    finally:
        for mlp, forward in saved:
            mlp.forward = forward
    return out.sequences, torch.stack(out.scores)


def dpnle_generate(model, tok, edit):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), edit.apply(model, prompt_length=enc["input_ids"].shape[1]) as handle:
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id,
                             output_scores=True, return_dict_in_generate=True)
        handle.assert_fired(new_tokens=NEW_TOKENS, rows=len(PROMPTS))
        draws = handle.mask_draws
    return out.sequences, torch.stack(out.scores), draws


def _check_same(ref, ours):
    ref_ids, ref_scores = ref
    ids, scores = ours[:2]
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-4)
    assert torch.equal(ids, ref_ids)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_per_call_mask_equals_reference(llama, run, lists_dir, direction):
    model, tok = llama
    _, high, low = lists_dir
    change, deactivate = (high, low) if direction == "up" else (low, high)
    edit = build_edit(run, "openness", "npti", direction, gamma=GAMMA, positions="generated", seed=5)
    assert edit.keep == 0.9 and edit.meta["npti_mask"] == "per-call" and edit.meta["keep_seed"] == 5
    # The same stream: one generator per layer, seeded from (seed, concept, layer) as dpnle seeds it.
    generators = {layer: torch.Generator().manual_seed(keep_mask_seed(5, "openness", layer)) for layer in range(LAYERS)}
    drawn = []

    def mask_draw(layer, k):
        mask = torch.rand(k, generator=generators[layer]) <= 0.9
        drawn.append(mask)
        return mask

    ref = reference_generate(model, tok, change, deactivate, GAMMA, mask_draw)
    ours = dpnle_generate(model, tok, edit)
    _check_same(ref, ours)
    # One draw per decode step per layer (the prefill draws none), and masks differ between calls.
    assert ours[2] == {layer: NEW_TOKENS - 1 for layer in (1, 2, 3)}
    assert any(not torch.equal(drawn[0], m) for m in drawn[1:])
    unedited = reference_generate(model, tok, {}, {}, GAMMA, None)
    assert not torch.allclose(unedited[1][1:], ours[1][1:])  # the edit did something


def test_per_call_mask_repeats_and_depends_on_seed(llama, run):
    model, tok = llama
    first = dpnle_generate(model, tok, build_edit(run, "openness", "npti", "up", gamma=GAMMA, positions="generated"))
    again = dpnle_generate(model, tok, build_edit(run, "openness", "npti", "up", gamma=GAMMA, positions="generated"))
    other = dpnle_generate(model, tok, build_edit(run, "openness", "npti", "up", gamma=GAMMA, positions="generated",
                                                  seed=1))
    assert torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


@pytest.mark.parametrize("direction", ["up", "down"])
def test_no_mask_equals_dpnle_le_reimplementation(llama, run, lists_dir, direction):
    model, tok = llama
    _, high, low = lists_dir
    change, deactivate = (high, low) if direction == "up" else (low, high)
    edit = build_edit(run, "openness", "npti", direction, gamma=GAMMA, positions="generated", npti_mask="none")
    assert edit.keep == 1.0
    _check_same(reference_generate(model, tok, change, deactivate, GAMMA, None), dpnle_generate(model, tok, edit))


def test_fixed_subset_equals_reference_on_that_subset(llama, run, lists_dir):
    model, tok = llama
    _, high, low = lists_dir
    edit = build_edit(run, "openness", "npti", "up", gamma=GAMMA, positions="generated", npti_mask="fixed", seed=2)
    assert edit.keep == 1.0
    subset = {}
    for layer, rows in high.items():
        kept = set(edit.vectors[int(layer)][0].tolist())
        assert len(kept) == round(0.9 * len(rows))
        subset[layer] = [r for r in rows if r[1] in kept]
    _check_same(reference_generate(model, tok, subset, low, GAMMA, None), dpnle_generate(model, tok, edit))


# ---------------------------------------------------------------------------------------------
# position policy


def _gate_outputs(model, edit, enc):
    """Layer 1's activation output per forward call of a cached greedy generation under ``edit``."""
    seen = []
    act = architecture(model).layers[1].activation
    with torch.no_grad(), edit.apply(model, prompt_length=enc["input_ids"].shape[1]):
        read = act.register_forward_hook(lambda m, a, o: seen.append(o.clone()))
        try:
            model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
        finally:
            read.remove()
    return seen


def test_generated_policy_leaves_prompt_positions_untouched(llama, run):
    model, tok = llama
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = model(**enc).logits
        unedited = torch.stack(model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False,
                                              pad_token_id=tok.pad_token_id, output_scores=True,
                                              return_dict_in_generate=True).scores)
    for mask in ("per-call", "none", "fixed"):
        edit = build_edit(run, "openness", "npti", "up", gamma=GAMMA, positions="generated", npti_mask=mask)
        with torch.no_grad(), edit.apply(model, prompt_length=enc["input_ids"].shape[1]):
            scored = model(**enc).logits  # a pass over prompt positions only
        assert torch.equal(plain, scored)
        _, scores, _ = dpnle_generate(model, tok, edit)
        assert torch.equal(scores[0], unedited[0])  # the prefill's logits: untouched
        assert not torch.allclose(scores[1:], unedited[1:])  # decode steps: edited


def test_clamp_obeys_the_position_policy(llama):
    """NPTI clamps in decode steps only: a clamp under ``generated`` leaves the prefill alone."""
    model, tok = llama
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    units = torch.arange(0, INTERMEDIATE, 2)
    plain = _gate_outputs(model, Edit("t", "gate", {}, clamp={1: units}, positions="prompt"), enc)
    generated = _gate_outputs(model, Edit("t", "gate", {}, clamp={1: units}, positions="generated"), enc)
    unedited_prefill = _gate_outputs(model, Edit("t", "gate", {2: ([0], [0.0])}), enc)[0]
    assert torch.equal(generated[0], unedited_prefill)  # prefill untouched under "generated"
    assert (plain[0][..., units] <= 0).all() and not torch.equal(plain[0], unedited_prefill)
    for step in generated[1:]:
        assert (step[..., units] <= 0).all()
    assert any((step[..., units] < 0).any() for step in generated[1:])
    assert any((step[..., 1::2] > 0).any() for step in generated[1:])  # only the clamped units


def test_stochastic_edit_refuses_dense_bake_and_export(llama, run, tmp_path):
    from dpnle.edits import bake_edit

    edit = build_edit(run, "openness", "npti", "up")
    assert edit.stochastic and edit.summary()["keep"] == 0.9
    with pytest.raises(ValueError, match="stochastic"):
        edit.dense_vectors(INTERMEDIATE)
    mlp_edit = Edit("x", "mlp", {1: ([1, 2], [0.5, 0.5])}, keep=0.5, meta={"concept": "openness"})
    with pytest.raises(ValueError, match="stochastic"):
        bake_edit(llama[0], mlp_edit)
    with pytest.raises(ValueError, match="keep"):
        Edit("x", "mlp", {1: ([1], [0.5])}, keep=0.0)
