"""The edit engine: hooks against hand computations, position policies with and without the KV
cache, batching, export parity, and the random / NPTI edits built from a run."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import INTERMEDIATE, LAYERS, tiny_gemma3, tiny_gpt2, tiny_llama, tiny_qwen2

from dpnle.arch import UnsupportedModelError, architecture
from dpnle.edits import Edit, bake_edit, build_edit, export_checkpoint, generate_with_edit
from dpnle.runs import ArtifactError, Run, write_parquet

PROMPTS = ["The quick brown fox jumps", "Hi"]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def random_edit(site="mlp", positions="all", layers=(1, 2), scale=3.0, seed=0, width=INTERMEDIATE, **kw) -> Edit:
    g = torch.Generator().manual_seed(seed)
    vectors = {}
    for layer in layers:
        idx = torch.randperm(width, generator=g)[: width // 4].sort().values
        vectors[layer] = (idx, torch.randn(idx.numel(), generator=g) * scale)
    return Edit(method="test", site=site, vectors=vectors, positions=positions, **kw)


def encode(tokenizer, prompts=PROMPTS):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True)


def no_hooks_left(model: torch.nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@torch.no_grad()
def logits(model, enc):
    return model(**enc).logits


# ---------------------------------------------------------------------------------------------
# hooks


def test_apply_remove_restores_logits_exactly(llama):
    model, tok = llama
    enc = encode(tok)
    before = logits(model, enc)
    edit = random_edit()
    with edit.apply(model) as handle:
        during = logits(model, enc)
        handle.assert_fired()
        assert handle.calls == {1: 1, 2: 1}
    assert not torch.equal(before, during)
    assert torch.equal(before, logits(model, enc))
    assert no_hooks_left(model)


def test_no_hooks_left_after_exception(llama):
    model, tok = llama
    for positions in ("all", "generated"):
        with pytest.raises(KeyError), random_edit(positions=positions).apply(model):
            logits(model, encode(tok))
            raise KeyError("boom")
        assert no_hooks_left(model)


def test_manual_remove_and_assert_fired(llama):
    model, _ = llama
    handle = random_edit().apply(model)
    with pytest.raises(RuntimeError, match="never ran"):
        handle.assert_fired()
    handle.remove()
    handle.remove()  # idempotent
    assert no_hooks_left(model)


def capture_mlp(model, layer, enc):
    """(down_proj input [b, s, I], MLP output [b, s, H]) of one layer, read by plain hooks."""
    mlp = architecture(model).layers[layer].mlp
    seen = {}
    h1 = mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0].clone()))
    h2 = mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o.clone()))
    try:
        logits(model, enc)
    finally:
        h1.remove()
        h2.remove()
    return seen["h"], seen["out"]


def test_mlp_edit_equals_hand_computation(llama):
    """down_proj input == act(gate(x)) * up(x); edited MLP output == down(h + gamma * delta)."""
    model, tok = llama
    enc = encode(tok)
    layer = 1
    mlp = architecture(model).layers[layer].mlp
    x_seen = {}
    hook = mlp.register_forward_pre_hook(lambda m, a: x_seen.__setitem__("x", a[0].clone()))
    h, plain_out = capture_mlp(model, layer, enc)
    hook.remove()
    x = x_seen["x"]
    torch.testing.assert_close(h, mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))

    edit = random_edit(layers=(layer,), gamma=0.7, sign=-1)
    idx, delta = edit.vectors[layer]
    expected_h = h.clone()
    expected_h[..., idx] += 0.7 * -1 * delta
    # Only this layer is edited, so its input x is the unedited one.
    with edit.apply(model):
        edited_h, edited_out = capture_mlp(model, layer, enc)
    torch.testing.assert_close(edited_h, expected_h, rtol=0, atol=1e-6)
    torch.testing.assert_close(edited_out, mlp.down_proj(expected_h), rtol=0, atol=1e-6)

    # A delta at the down_proj input is W_down @ delta at its output.
    dense = torch.zeros(INTERMEDIATE).index_add_(0, idx, -0.7 * delta)
    w_down = architecture(model).output_weight(layer)  # [hidden, intermediate]
    torch.testing.assert_close(edited_out - plain_out, (w_down @ dense).expand_as(plain_out), rtol=1e-5, atol=1e-5)


def test_gate_and_resid_sites(llama):
    model, tok = llama
    enc = encode(tok)
    arch = architecture(model)
    act = arch.layers[2].activation
    seen = {}

    def read_gate(module, args, output):
        seen["a"] = output.clone()

    read = act.register_forward_hook(read_gate)
    logits(model, enc)
    read.remove()
    base = seen["a"]
    edit = random_edit(site="gate", layers=(2,), clamp={2: torch.tensor([0, 5, 7])})
    idx, delta = edit.vectors[2]
    with edit.apply(model):
        # Forward hooks run in registration order, so this one sees the edited activation.
        read = act.register_forward_hook(read_gate)
        logits(model, enc)
        read.remove()
    expected = base.clone()
    expected[..., [0, 5, 7]] = expected[..., [0, 5, 7]].clamp_max(0)
    expected[..., idx] += delta
    torch.testing.assert_close(seen["a"], expected, rtol=0, atol=1e-6)

    # resid: the next layer's input is the edited layer's output plus gamma * sign * vector.
    vector = torch.randn(arch.hidden_size)
    resid = Edit("caa", "resid", {1: (None, vector)}, gamma=2.0, sign=-1)
    grab = arch.layers[2].layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("n", a[0].clone()))
    try:
        logits(model, enc)
        plain = seen["n"]
        with resid.apply(model):
            logits(model, enc)
    finally:
        grab.remove()
    torch.testing.assert_close(seen["n"], plain - 2.0 * vector, rtol=0, atol=1e-5)


def test_edit_validation():
    for bad in (math.nan, math.inf, float("-inf")):
        with pytest.raises(ValueError, match="finite"):
            random_edit(gamma=bad)
    with pytest.raises(ValueError, match="position policy"):
        random_edit(positions="late")
    with pytest.raises(ValueError, match="sign"):
        random_edit(sign=2)
    assert random_edit().num_neurons == 2 * (INTERMEDIATE // 4)


def test_edit_from_another_model_is_refused(llama):
    model, _ = llama
    edit = Edit("test", "mlp", {1: (torch.tensor([INTERMEDIATE + 3]), torch.tensor([1.0]))})
    with pytest.raises(ValueError, match="another model"):
        edit.apply(model)
    with pytest.raises(ValueError, match="another model"):
        Edit("test", "mlp", {LAYERS + 1: (torch.tensor([0]), torch.tensor([1.0]))}).apply(model)
    assert no_hooks_left(model)


# ---------------------------------------------------------------------------------------------
# positions, KV cache, batching


def record_modified_positions(model, edit, enc, use_cache, new_tokens=4):
    """Generate under ``edit``; return (ids, {row: sorted absolute positions whose layer-1
    down_proj input differs from the unedited act(gate(x)) * up(x)}), read by hooks of the
    test's own."""
    sites = architecture(model).layers[1]
    mlp = sites.mlp
    modified: dict[int, set[int]] = {row: set() for row in range(enc["input_ids"].shape[0])}
    prompt_len = enc["input_ids"].shape[1]
    state = {"calls": 0, "past": 0}

    def base_pre(module, args, kwargs):
        # Derived from the call count alone, not from any input the model gets: with the cache,
        # call 0 is the prefill and call k >= 1 feeds position prompt_len + k - 1; without it,
        # every call starts again at 0.
        k = state["calls"]
        state["past"] = prompt_len + k - 1 if use_cache and k > 0 else 0
        state["calls"] += 1

    def mlp_pre(module, args):
        state["x"] = args[0]

    def down_pre(module, args):
        x = state["x"]
        unedited = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        changed = (args[0] - unedited).abs().amax(dim=2) > 0  # [rows, seq]
        for row, i in torch.nonzero(changed).tolist():
            modified[row].add(state["past"] + i)

    hooks = [
        model.model.register_forward_pre_hook(base_pre, with_kwargs=True),
        mlp.register_forward_pre_hook(mlp_pre),
    ]
    try:
        with torch.no_grad(), edit.apply(model, prompt_length=enc["input_ids"].shape[1]):
            # Pre-hooks run in registration order: this one sees the edit's output.
            hooks.append(sites.output_projection.register_forward_pre_hook(down_pre))
            ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
                                 pad_token_id=0)  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    return ids, {row: sorted(found) for row, found in modified.items()}


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_position_policies_with_and_without_cache(llama, positions):
    model, tok = llama
    enc = encode(tok)
    prompt_len = enc["input_ids"].shape[1]
    new = 4
    edit = random_edit(positions=positions, layers=(1,), scale=5.0)
    results = {uc: record_modified_positions(model, edit, enc, uc, new) for uc in (True, False)}
    # The last generated token is never fed back, so positions run to prompt_len + new - 2.
    last = prompt_len + new - 1
    expected = {
        "all": list(range(last)),
        "prompt": list(range(prompt_len)),
        "generated": list(range(prompt_len, last)),
    }[positions]
    # Left-padded rows of different prompt lengths: each row is edited at the same padded
    # positions (pads included in the prompt).
    assert len(set(enc["attention_mask"].sum(dim=1).tolist())) > 1
    for use_cache, (_, modified) in results.items():
        for row, found in modified.items():
            assert found == expected, (positions, use_cache, row)
    assert torch.equal(results[True][0], results[False][0])
    assert no_hooks_left(model)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_handle_counts_prompt_and_generated_positions(llama, positions, use_cache):
    """The handle's counts against a hand count of what generate feeds the model: with the
    cache, the prefill (rows x P prompt positions) and one generated position per row per later
    step; without it, every step feeds the whole sequence again."""
    model, tok = llama
    enc = encode(tok)
    rows, width = enc["input_ids"].shape
    new = 4
    edit = random_edit(positions=positions)
    with torch.no_grad(), edit.apply(model, prompt_length=width) as handle:
        out = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             use_cache=use_cache, pad_token_id=0)  # fmt: skip
        handle.assert_fired(new_tokens=out.shape[1] - width, rows=rows)
    steps = range(new)  # forward passes: the prefill, then one per fed-back token
    if use_cache:
        seen = {"prompt": rows * width, "generated": rows * (new - 1)}
    else:
        seen = {"prompt": rows * width * new, "generated": rows * sum(steps)}
    assert handle.positions_seen == seen
    assert handle.positions_edited == {k: n if positions in ("all", k) else 0 for k, n in seen.items()}


def test_edit_that_did_not_fire_during_generate_is_an_error(llama, monkeypatch):
    """If the decoder stack's inputs stopped revealing positions (as a renamed cache keyword
    once did), a generated-only edit would silently do nothing: generate_with_edit and the
    benchmarks' generation raise instead, naming the edit, its policy and the counts."""
    import dpnle.edits as edits
    from dpnle.capability import generate_texts

    model, tok = llama
    monkeypatch.setattr(edits, "_first_positions", lambda inputs, seq_len: torch.tensor([0]))
    edit = random_edit(positions="generated")
    with pytest.raises(RuntimeError, match=r"test edit \(positions='generated'.*saw \d+ prompt and 0 generated"):
        generate_with_edit(model, PROMPTS, edit, tokenizer=tok, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with pytest.raises(RuntimeError, match="did not fire"):
        generate_texts(model, tok, PROMPTS, edit=edit, max_new_tokens=3, repetition_penalty=1.0)
    assert no_hooks_left(model)
    # The same call with positions read normally passes the check.
    monkeypatch.undo()
    generate_texts(model, tok, PROMPTS, edit=edit, max_new_tokens=3, repetition_penalty=1.0)


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_positions_from_the_cache_alone(llama, positions):
    """A caller that passes only a cache (no mask, no position ids): the continuation's logits
    under the edit equal those of one full forward pass under the same edit."""
    from dpnle.batching import cache_keyword, output_cache

    model, tok = llama
    ids = tok(["The quick brown fox jumps over"], return_tensors="pt")["input_ids"]
    split = 5
    edit = random_edit(positions=positions, scale=5.0)
    with torch.no_grad():
        with edit.apply(model, prompt_length=split):
            full = model(input_ids=ids).logits
        with edit.apply(model, prompt_length=split):
            head = model(input_ids=ids[:, :split], use_cache=True)
            tail = model(input_ids=ids[:, split:], use_cache=True, **{cache_keyword(model): output_cache(head)}).logits
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(tail, full[:, split:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, plain)


@pytest.mark.parametrize(("builder", "positions"), [(tiny_gemma3, "generated"), (tiny_gpt2, "prompt")])
def test_cache_on_equals_off_other_architectures(builder, positions):
    """Gemma3 (sliding-window cache layers) and GPT-2 (transformer.h, Conv1D)."""
    model, tok = builder()
    edit = random_edit(positions=positions, scale=5.0)
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    on, off = (generate_with_edit(model, PROMPTS, edit, tokenizer=tok, use_cache=uc, **kwargs) for uc in (True, False))
    assert torch.equal(on, off)
    assert not torch.equal(on, generate_with_edit(model, PROMPTS, None, tokenizer=tok, **kwargs))
    assert no_hooks_left(model)


def test_generated_policy_never_touches_a_scoring_pass(llama):
    model, tok = llama
    enc = encode(tok)
    before = logits(model, enc)
    with random_edit(positions="generated").apply(model) as handle:
        assert torch.equal(logits(model, enc), before)
        assert handle.prompt_length == enc["input_ids"].shape[1]
    with random_edit(positions="generated").apply(model, prompt_length=3):
        edited = logits(model, enc)
    # Causal: positions before the first edited one are unchanged, every later one changes.
    assert torch.equal(edited[:, :3], before[:, :3])
    assert not torch.isclose(edited[:, 3:], before[:, 3:]).all(dim=-1).any()


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_batched_generation_equals_per_prompt(llama, positions):
    model, tok = llama
    edit = random_edit(positions=positions, scale=5.0)
    kwargs = {"max_new_tokens": 5, "do_sample": False}
    batched = generate_with_edit(model, PROMPTS, edit, tokenizer=tok, **kwargs)
    width = batched.shape[1]
    for row, prompt in enumerate(PROMPTS):
        single = generate_with_edit(model, [prompt], edit, tokenizer=tok, **kwargs)
        assert torch.equal(batched[row, -5:], single[0, -5:])
        assert single.shape[1] <= width
    plain = generate_with_edit(model, PROMPTS, None, tokenizer=tok, **kwargs)
    assert not torch.equal(plain, batched)
    assert no_hooks_left(model)


def test_right_padding_is_refused(llama):
    model, tok = llama
    tok.padding_side = "right"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    tok.padding_side = "left"
    with pytest.raises(ValueError, match="left"):
        generate_with_edit(model, enc, random_edit(), max_new_tokens=2)


# ---------------------------------------------------------------------------------------------
# export


def test_bake_equals_hooked_and_export_loads_with_plain_transformers(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = llama
    enc = encode(tok)
    edit = random_edit(gamma=1.5, sign=-1, layers=(0, 2))
    edit.meta.update(concept="openness", direction="down")
    with edit.apply(model):
        hooked = logits(model, enc)
    before = logits(model, enc)

    out = export_checkpoint(model, tok, edit, tmp_path / "baked")
    assert torch.equal(logits(model, enc), before)  # the source model is untouched
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.mlp_bias is True
    torch.testing.assert_close(logits(reloaded, enc), hooked, rtol=0, atol=1e-4)
    biases = {n: p for n, p in reloaded.named_parameters() if n.endswith("bias")}
    assert len(biases) == 3 * LAYERS
    edited_down = {f"model.layers.{k}.mlp.down_proj.bias" for k in edit.layers}
    assert all(not p.any() for n, p in biases.items() if n not in edited_down)
    assert all(biases[n].abs().sum() > 0 for n in edited_down)
    info = json.loads((out / "dpnle_edit.json").read_text())
    assert info["concept"] == "openness" and info["direction"] == "down" and info["gamma"] == 1.5
    assert info["neurons"] == edit.num_neurons and info["source_model"]["fingerprint"]

    baked = bake_edit(tiny_llama()[0], edit)  # in memory: same logits
    torch.testing.assert_close(logits(baked, enc), hooked, rtol=0, atol=1e-4)


def test_export_native_bias_gpt2_and_unsupported_qwen2(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_gpt2()
    enc = encode(tok)
    edit = random_edit(layers=(1,))
    with edit.apply(model):
        hooked = logits(model, enc)
    out = export_checkpoint(model, tok, edit, tmp_path / "gpt2")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(reloaded, enc), hooked, rtol=0, atol=1e-4)

    qwen, qtok = tiny_qwen2()
    with pytest.raises(UnsupportedModelError, match="Qwen2ForCausalLM.*Supported"):
        export_checkpoint(qwen, qtok, random_edit(), tmp_path / "qwen")
    assert not (tmp_path / "qwen").exists()


def test_export_refuses_position_policies_and_other_sites(llama, tmp_path):
    model, tok = llama
    with pytest.raises(ValueError, match="every position"):
        export_checkpoint(model, tok, random_edit(positions="generated"), tmp_path / "x")
    with pytest.raises(ValueError, match="mlp-site"):
        export_checkpoint(model, tok, random_edit(site="gate"), tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# edits built from a run


def write_dpnle_selection(run: Run, concept="openness", seed=0, layers=(1, 2), width=INTERMEDIATE) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for layer in layers:
        delta = rng.normal(0, 1, width)
        d = rng.normal(0, 1, width)
        selected = np.zeros(width, dtype=bool)
        selected[rng.choice(width, size=10, replace=False)] = True
        for n in range(width):
            rows.append((layer, n, delta[n], d[n], selected[n]))
    frame = pd.DataFrame(rows, columns=["layer", "neuron", "delta", "cohens_d", "selected"])
    frame["layer"] = frame["layer"].astype(np.int16)
    frame["neuron"] = frame["neuron"].astype(np.int32)
    # Poles follow the sign of d, and delta agrees in sign with d, as in a real selection.
    frame["delta"] = np.abs(frame["delta"]) * np.sign(frame["cohens_d"])
    frame["pole"] = pd.array(np.where(frame["selected"], np.where(frame["cohens_d"] > 0, "high", "low"), None),
                             dtype="string")  # fmt: skip
    from dpnle.localize import rank_weights

    weight = np.full(len(frame), np.nan)
    sel = frame["selected"].to_numpy()
    weight[sel] = rank_weights(np.abs(frame["cohens_d"][sel]), frame["layer"][sel], frame["neuron"][sel])
    frame["weight"] = weight
    write_parquet(run.neurons_path(concept), frame, {"method": "dpnle", **PROVENANCE})
    return frame


@pytest.fixture
def run(tmp_path):
    run = Run.create_or_open("r", "tiny-llama", root=tmp_path)
    run.update_manifest(model={"id": "tiny-llama", "fingerprint": TINY_FINGERPRINT})
    return run


# What a real run records (dpnle.models.model_fingerprint), for the tiny Llama's shape; every
# neurons file names the model and the pairs it was localized from.
TINY_FINGERPRINT = {"id": "tiny-llama", "digest": "feed0123", "num_layers": LAYERS,
                    "intermediate_size": INTERMEDIATE, "hidden_size": 32}
PROVENANCE = {"model": TINY_FINGERPRINT, "pairs_digest": "0123abcd"}


def per_layer(edit: Edit) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    return {k: (idx.numpy(), delta.numpy()) for k, (idx, delta) in edit.vectors.items()}


def test_dpnle_edit_modes(run):
    frame = write_dpnle_selection(run)
    sel = frame[frame["selected"]]
    up = build_edit(run, "openness", "dpnle", "up")
    down = build_edit(run, "openness", "dpnle", "down")
    assert up.sign == 1 and down.sign == -1 and up.site == "mlp" and up.num_neurons == len(sel)
    for layer, (idx, delta) in per_layer(up).items():
        rows = sel[sel["layer"] == layer].sort_values("neuron")
        np.testing.assert_array_equal(idx, rows["neuron"])
        np.testing.assert_allclose(delta, rows["delta"], rtol=1e-6)
    high = build_edit(run, "openness", "dpnle", "up", mode="directional")
    low = build_edit(run, "openness", "dpnle", "down", mode="directional")
    assert high.num_neurons == int((sel["pole"] == "high").sum())
    assert low.num_neurons == int((sel["pole"] == "low").sum())
    # Directional down: LOW neurons (delta < 0) with sign -1, i.e. pushed up.
    assert all((d < 0).all() for _, d in per_layer(low).values()) and low.sign == -1
    weighted = build_edit(run, "openness", "dpnle-w", "up")
    for layer, (_, delta) in per_layer(weighted).items():
        plain = per_layer(up)[layer][1]
        ratio = delta / plain
        assert ((ratio >= 0.75 - 1e-6) & (ratio <= 1 + 1e-6)).all()
    assert build_edit(run, "openness", "prompt") is None and build_edit(run, "openness", "none") is None
    with pytest.raises(ValueError, match="dpnle, dpnle-w"):
        build_edit(run, "openness", "magic")
    with pytest.raises(ValueError, match="finite"):
        build_edit(run, "openness", "dpnle", gamma=math.nan)
    with pytest.raises(ArtifactError, match="dpnle localize --run r --trait extraversion"):
        build_edit(run, "extraversion", "dpnle")
    with pytest.raises(ArtifactError, match="--method npti"):
        build_edit(run, "openness", "npti")
    only = build_edit(run, "openness", "dpnle", layers=[2])
    assert only.layers == [2]


def test_random_control_matches_dpnle_set(run):
    frame = write_dpnle_selection(run)
    selected = {(int(r.layer), int(r.neuron)) for r in frame[frame["selected"]].itertuples()}
    for mode, direction in (("both", "up"), ("directional", "down")):
        target = per_layer(build_edit(run, "openness", "dpnle", direction, mode=mode))
        rand = per_layer(build_edit(run, "openness", "random", direction, mode=mode, seed=1))
        assert set(rand) == set(target)
        for layer, (idx, delta) in rand.items():
            t_idx, t_delta = target[layer]
            assert idx.size == t_idx.size == np.unique(idx).size
            assert not ({(layer, int(i)) for i in idx} & selected)
            np.testing.assert_array_equal(np.sort(np.abs(delta)), np.sort(np.abs(t_delta)))
        again = per_layer(build_edit(run, "openness", "random", direction, mode=mode, seed=1))
        other = per_layer(build_edit(run, "openness", "random", direction, mode=mode, seed=2))
        for layer in rand:
            np.testing.assert_array_equal(rand[layer][0], again[layer][0])
            np.testing.assert_array_equal(rand[layer][1], again[layer][1])
        assert any(not np.array_equal(rand[k][0], other[k][0]) or not np.array_equal(rand[k][1], other[k][1])
                   for k in rand)  # fmt: skip
    signs = np.concatenate([np.sign(d) for _, d in rand.values()])
    assert set(signs) == {-1.0, 1.0}
    # Mode "both": the down control is the up control negated, like the DPN-LE edits.
    up = per_layer(build_edit(run, "openness", "random", "up", seed=1))
    down = build_edit(run, "openness", "random", "down", seed=1)
    assert down.sign == -1 and all(np.array_equal(up[k][1], v[1]) for k, v in per_layer(down).items())


def write_npti_selection(run: Run, concept="openness", seed=0, layers=(1, 2), width=INTERMEDIATE):
    rng = np.random.default_rng(seed)
    parts = []
    for layer in layers:
        dp = rng.uniform(-0.5, 0.5, width)
        pole = np.where(dp >= 0.1, "high", np.where(dp <= -0.1, "low", None))
        parts.append(pd.DataFrame({
            "layer": np.full(width, layer, np.int16), "neuron": np.arange(width, dtype=np.int32),
            "p_high": 0.5 + dp / 2, "p_low": 0.5 - dp / 2, "delta_p": dp,
            "pole": pd.array(pole, dtype="string"), "v95": rng.uniform(0.5, 2.0, width), "selected": pole != None,  # noqa: E711
        }))  # fmt: skip
    frame = pd.concat(parts, ignore_index=True)
    write_parquet(run.neurons_path(concept, "npti"), frame, {"method": "npti", **PROVENANCE})
    return frame


def test_npti_edit_mask_formula_and_clamp(run, llama):
    frame = write_npti_selection(run)
    up = build_edit(run, "openness", "npti", "up", seed=3, npti_mask="fixed")
    assert up.site == "gate" and up.keep == 1.0 and up.meta["npti_mask"] == "fixed"
    assert per_layer(up).keys() == per_layer(build_edit(run, "openness", "npti", "up", seed=3,
                                                        npti_mask="fixed")).keys()
    for layer, (idx, delta) in per_layer(up).items():
        rows = frame[(frame["layer"] == layer) & (frame["pole"] == "high")].set_index("neuron")
        assert idx.size == round(0.9 * len(rows)) and set(idx) <= set(rows.index)
        expected = rows.loc[idx, "v95"] / (1 + np.exp(-10 * (rows.loc[idx, "delta_p"].abs() - 0.15)))
        np.testing.assert_allclose(delta, expected, rtol=1e-6)
        lows = frame[(frame["layer"] == layer) & (frame["pole"] == "low")]["neuron"]
        np.testing.assert_array_equal(up.clamp[layer].numpy(), np.sort(lows))
        same = per_layer(build_edit(run, "openness", "npti", "up", seed=3, npti_mask="fixed"))[layer][0]
        np.testing.assert_array_equal(idx, same)
    other = per_layer(build_edit(run, "openness", "npti", "up", seed=4, npti_mask="fixed"))
    assert any(not np.array_equal(other[k][0], per_layer(up)[k][0]) for k in other)
    # "none" and the default "per-call" keep every target in the vectors; per-call is stochastic.
    every = build_edit(run, "openness", "npti", "up", seed=3, npti_mask="none")
    per_call = build_edit(run, "openness", "npti", "up", seed=3)
    assert every.keep == 1.0 and per_call.keep == 0.9 and per_call.meta["keep_seed"] == 3
    assert per_call.summary()["keep"] == 0.9 and per_call.summary()["npti_mask"] == "per-call"
    for layer, (idx, _) in per_layer(every).items():
        highs = frame[(frame["layer"] == layer) & (frame["pole"] == "high")]["neuron"]
        np.testing.assert_array_equal(idx, np.sort(highs))
        np.testing.assert_array_equal(per_layer(per_call)[layer][0], idx)
    with pytest.raises(ValueError, match="stochastic"):
        per_call.dense_vectors(INTERMEDIATE)
    with pytest.raises(ValueError, match="Unknown NPTI mask"):
        build_edit(run, "openness", "npti", "up", npti_mask="sometimes")
    down = build_edit(run, "openness", "npti", "down")
    # Down: LOW targets, stored toward the concept (negative) with sign -1: a net increase.
    assert down.sign == -1 and all((d < 0).all() for _, d in per_layer(down).values())

    model, tok = llama
    arch = architecture(model)
    seen = {}
    with up.apply(model):
        reads = [arch.layers[k].activation.register_forward_hook(
            lambda m, a, o, k=k: seen.__setitem__(k, o.clone())) for k in up.layers]  # fmt: skip
        try:
            logits(model, encode(tok))
        finally:
            for r in reads:
                r.remove()
    for layer in up.layers:
        assert (seen[layer][..., up.clamp[layer]] <= 0).all()
    assert no_hooks_left(model)


def test_caa_edit(run):
    hidden = 32
    frame = pd.DataFrame({
        "layer": np.repeat(np.array([1, 2], np.int16), hidden), "unit": np.tile(np.arange(hidden, dtype=np.int32), 2),
        "delta": np.arange(2 * hidden, dtype=np.float64), "score": 1.0, "chosen": np.repeat([False, True], hidden),
    })  # fmt: skip
    write_parquet(run.neurons_path("openness", "caa"), frame, {"method": "caa", **PROVENANCE})
    edit = build_edit(run, "openness", "caa", "down", gamma=0.5, positions="prompt")
    assert edit.site == "resid" and edit.layers == [2] and edit.sign == -1
    idx, delta = edit.vectors[2]
    assert idx is None
    np.testing.assert_array_equal(delta.numpy(), np.arange(hidden, 2 * hidden, dtype=np.float32))


def test_generate_with_edit_encodes_rendered_text_with_one_bos():
    """Text goes in as every other pass encodes a rendered prompt: a tokenizer that adds BOS
    does not add a second one after the chat template's, and rows are left-padded."""
    from tokenizers import processors

    from dpnle.pairs import render_prompt

    model, tok = tiny_llama()
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    prompts = [render_prompt(tok, "hi"), render_prompt(tok, "a longer question here?")]
    assert tok(prompts[0])["input_ids"][:2] == [bos, bos]  # the tokenizer's default would double it
    seen = {}
    real = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    model.generate = spy
    generate_with_edit(model, prompts, None, tokenizer=tok, max_new_tokens=2, do_sample=False)
    ids, mask = seen["input_ids"], seen["attention_mask"]
    for row, prompt in enumerate(prompts):
        real_ids = ids[row][mask[row].bool()].tolist()
        assert real_ids == tok(prompt, add_special_tokens=False)["input_ids"] and real_ids.count(bos) == 1
    assert bool(mask[:, -1].all()) and not bool(mask[0, 0])  # left padding
