"""The Python API without a run directory: prompts -> capture -> statistics -> selection -> Edit
-> generation -> save / load, each step against an independent computation; the lazy top-level
exports; the library's run-model steps (record_model, load_run_model); the one base error."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import HIDDEN, INTERMEDIATE, LAYERS, tiny_llama

import dpnle
from dpnle.collect import Capture, collect
from dpnle.edits import Edit, build_edit, generate_with_edit
from dpnle.errors import DpnleError
from dpnle.models import LoadedModel, model_fingerprint
from dpnle.runs import ArtifactError, InputError, Run, load_run_model, write_parquet
from dpnle.stats import layer_stats


def loaded_tiny(seed: int = 0, **config) -> LoadedModel:
    model, tokenizer = tiny_llama(seed)
    if config:  # another shape: a fresh model from the same config with these fields changed
        from transformers import LlamaForCausalLM

        cfg = model.config
        for key, value in config.items():
            setattr(cfg, key, value)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).float().eval()
    return LoadedModel(model, tokenizer, "tiny-llama", "memory", model_fingerprint(model, tokenizer, "tiny-llama"))


@pytest.fixture(scope="module")
def tiny():
    return loaded_tiny()


# ---------------------------------------------------------------------------------------------
# the README's notebook example, on the tiny model (the README loads SmolLM2 instead)


def notebook_example(loaded: LoadedModel, path) -> dict:
    """The README example, line for line (``loaded`` stands for ``load_model(...)``)."""
    from dpnle import Edit, generate_with_edit, layer_stats, make_pairs, render_prompt, select_dpnle

    model, tok = loaded.model, loaded.tokenizer
    pairs = make_pairs("power", num_pairs=16)  # persona pairs from dpnle's own data: no download
    high = [render_prompt(tok, m) for m in pairs["high_message"]]
    low = [render_prompt(tok, m) for m in pairs["low_message"]]
    cap_high = collect(model, tok, high, site="mlp", policy="last", progress=False)
    cap_low = collect(model, tok, low, site="mlp", policy="last", progress=False)
    stats = layer_stats(cap_high, cap_low, concept="power")
    frame = select_dpnle(stats, layers=[1, 2, 3], quantile=0.9, d_threshold=0.3)
    edit = Edit.from_selection(frame, "dpnle-w", direction="up", gamma=4.0, model=loaded, concept="power")
    prompt = render_prompt(tok, "What matters most to you at work?")
    steered = generate_with_edit(loaded, [prompt], edit, max_new_tokens=12, do_sample=False)
    edit.save(path)
    again = Edit.load(path)
    return dict(cap_high=cap_high, cap_low=cap_low, stats=stats, frame=frame, edit=edit, again=again,
                prompt=prompt, steered=steered)


@pytest.fixture(scope="module")
def example(tiny, tmp_path_factory):
    return notebook_example(tiny, tmp_path_factory.mktemp("edit") / "power-up.safetensors")


def test_capture_holds_each_prompts_row(example):
    high, low = example["cap_high"], example["cap_low"]
    assert isinstance(high, Capture) and high.layers == list(range(LAYERS))
    for cap in (high, low):
        for layer in cap.layers:
            assert cap.activations[layer].shape == (16, INTERMEDIATE)
            assert np.isfinite(cap.activations[layer]).all()


def test_layer_stats_of_a_capture_are_numpy_means_and_variances(example):
    stats, high, low = example["stats"], example["cap_high"], example["cap_low"]
    assert (stats.concept, stats.site, stats.policy, stats.layers) == ("power", "mlp", "last", list(range(LAYERS)))
    for row, layer in enumerate(stats.layers):
        h = high.activations[layer].astype(np.float64)
        lo = low.activations[layer].astype(np.float64)
        assert stats.n_high[row] == 16 and stats.n_low[row] == 16
        np.testing.assert_allclose(stats.mean_high[row], h.mean(axis=0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(stats.mean_low[row], lo.mean(axis=0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(stats.var_high[row], h.var(axis=0, ddof=1), rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(stats.var_low[row], lo.var(axis=0, ddof=1), rtol=1e-10, atol=1e-15)
    assert stats.pos_frac_high is None  # the mlp site at the last token tracks no positive fraction


def test_selection_of_in_memory_stats_is_the_thresholds_on_numpy_values(example):
    frame, high, low = example["frame"], example["cap_high"], example["cap_low"]
    assert set(frame["layer"]) == {1, 2, 3} and len(frame) == 3 * INTERMEDIATE
    for layer in (1, 2, 3):
        h = high.activations[layer].astype(np.float64)
        lo = low.activations[layer].astype(np.float64)
        delta = h.mean(axis=0) - lo.mean(axis=0)
        pooled = (15 * h.var(axis=0, ddof=1) + 15 * lo.var(axis=0, ddof=1)) / 30
        d = delta / np.sqrt(pooled + 1e-8)
        expected = np.flatnonzero((np.abs(delta) > np.quantile(np.abs(delta), 0.9)) & (np.abs(d) > 0.3))
        rows = frame[(frame["layer"] == layer) & frame["selected"]]
        np.testing.assert_array_equal(np.sort(rows["neuron"].to_numpy()), expected)
    assert frame["selected"].sum() > 0


def test_edit_from_selection_holds_the_weighted_deltas_and_the_model(example, tiny):
    frame, edit = example["frame"], example["edit"]
    sel = frame[frame["selected"]]
    assert (edit.method, edit.site, edit.sign, edit.gamma, edit.positions) == ("dpnle-w", "mlp", 1, 4.0, "all")
    assert edit.num_neurons == len(sel)
    for layer, (idx, delta) in edit.vectors.items():
        rows = sel[sel["layer"] == layer].sort_values("neuron")
        np.testing.assert_array_equal(idx.numpy(), rows["neuron"].to_numpy())
        expected = (rows["delta"].to_numpy() * rows["weight"].to_numpy()).astype(np.float32)
        np.testing.assert_array_equal(delta.numpy(), expected)
    fp = tiny.fingerprint
    assert edit.meta["model"] == {k: fp[k] for k in ("id", "digest", "num_layers", "intermediate_size", "hidden_size")}
    assert edit.meta["concept"] == "power" and edit.meta["direction"] == "up"


def _logits(loaded: LoadedModel, prompt: str, edit: Edit | None = None, hook=None) -> torch.Tensor:
    ids = loaded.tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        if edit is not None:
            with edit.apply(loaded):
                return loaded.model(**ids).logits
        handles = [] if hook is None else hook(loaded.model)
        try:
            return loaded.model(**ids).logits
        finally:
            for h in handles:
                h.remove()


def test_the_edit_changes_the_model_as_a_hand_made_hook_does(example, tiny):
    edit, prompt = example["edit"], example["prompt"]

    def by_hand(model):
        handles = []
        for layer, (idx, delta) in edit.vectors.items():
            def pre_hook(_module, args, idx=idx, delta=delta):
                h = args[0].clone()
                h[..., idx] = h[..., idx] + (delta * edit.gamma * edit.sign).to(h.dtype)
                return (h,)

            handles.append(model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(pre_hook))
        return handles

    plain = _logits(tiny, prompt)
    edited = _logits(tiny, prompt, edit)
    assert not torch.equal(plain, edited)
    torch.testing.assert_close(edited, _logits(tiny, prompt, hook=by_hand), rtol=1e-5, atol=1e-6)
    unsteered = generate_with_edit(tiny, [prompt], None, max_new_tokens=12, do_sample=False)
    assert example["steered"].shape == unsteered.shape


def test_a_saved_edit_loads_back_exactly(example, tiny):
    edit, again = example["edit"], example["again"]
    assert (again.method, again.site, again.gamma, again.sign, again.positions, again.keep) == (
        edit.method, edit.site, edit.gamma, edit.sign, edit.positions, edit.keep)
    assert again.meta == edit.meta and again.clamp is None
    assert set(again.vectors) == set(edit.vectors)
    for layer, (idx, delta) in edit.vectors.items():
        assert torch.equal(again.vectors[layer][0], idx) and torch.equal(again.vectors[layer][1], delta)
    # bit-identical hooked logits and generations
    assert torch.equal(_logits(tiny, example["prompt"], edit), _logits(tiny, example["prompt"], again))
    ids = generate_with_edit(tiny, [example["prompt"]], again, max_new_tokens=12, do_sample=False)
    assert torch.equal(ids, example["steered"])


def test_a_loaded_edit_refuses_another_model(example):
    again = example["again"]
    with pytest.raises(InputError, match="was made for model 'tiny-llama'"):
        again.apply(loaded_tiny(seed=1))  # same shape, other weights: another digest
    with pytest.raises(InputError, match="shape differs"):
        again.apply(loaded_tiny(intermediate_size=INTERMEDIATE * 2).model)  # a bare module of another shape


# ---------------------------------------------------------------------------------------------
# statistics from arrays


def test_layer_stats_from_arrays_with_positive_fractions():
    rng = np.random.default_rng(1)
    high = {2: rng.normal(0.3, 1.0, (9, 7)).astype(np.float32), 5: rng.normal(0, 2.0, (9, 7))}
    low = {2: rng.normal(0.0, 1.0, (6, 7)).astype(np.float32), 5: rng.normal(0, 1.0, (6, 7))}
    pos_h = {k: rng.random(v.shape) for k, v in high.items()}
    pos_l = {k: rng.random(v.shape) for k, v in low.items()}
    stats = layer_stats(high, low, concept="power", site="gate", policy="prompt-mean",
                        positive_high=pos_h, positive_low=pos_l, meta={"note": 1})
    assert stats.layers == [2, 5] and stats.meta == {"note": 1} and stats.width == 7
    np.testing.assert_array_equal(stats.n_high, [9, 9])
    np.testing.assert_array_equal(stats.n_low, [6, 6])
    for row, layer in enumerate(stats.layers):
        np.testing.assert_allclose(stats.mean_low[row], np.mean(low[layer].astype(np.float64), axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats.var_high[row], np.var(high[layer].astype(np.float64), axis=0, ddof=1),
                                   rtol=1e-10)
        np.testing.assert_allclose(stats.pos_frac_high[row], pos_h[layer].mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats.pos_frac_low[row], pos_l[layer].mean(axis=0), rtol=1e-12)
    only = layer_stats(high, low, layers=[5])
    assert only.layers == [5] and only.pos_frac_high is None
    torch_stats = layer_stats({k: torch.as_tensor(v) for k, v in high.items()}, low)
    np.testing.assert_allclose(torch_stats.mean_high, stats.mean_high, rtol=1e-12)


def test_layer_stats_refuses_what_gives_no_statistics():
    a = {0: np.zeros((4, 3))}
    with pytest.raises(InputError, match="at least 2 samples"):
        layer_stats(a, {0: np.zeros((1, 3))})
    with pytest.raises(InputError, match=r"layers \[1\] are missing"):
        layer_stats(a, a, layers=[1])
    with pytest.raises(InputError, match="both poles"):
        layer_stats(a, a, positive_high=a)
    with pytest.raises(InputError, match="unit counts"):
        layer_stats(a, {0: np.zeros((4, 5))})
    with pytest.raises(DpnleError):
        layer_stats(a, {1: np.zeros((4, 3))})


# ---------------------------------------------------------------------------------------------
# Edit.from_selection is build_edit's DPN-LE path


@pytest.mark.parametrize(("method", "direction", "mode"), [
    ("dpnle", "up", "both"), ("dpnle-w", "down", "both"), ("dpnle-w", "up", "directional"),
    ("dpnle", "down", "directional"),
])  # fmt: skip
def test_from_selection_equals_build_edit_from_a_run(example, tiny, tmp_path, method, direction, mode):
    frame = example["frame"]
    run = Run.create_or_open("r", tiny.model_id, root=tmp_path)
    run.record_model(tiny)
    write_parquet(run.neurons_path("power"), frame,
                  {"method": "dpnle", "model": tiny.fingerprint, "pairs_digest": "0123"})
    built = build_edit(run, "power", method, direction=direction, gamma=1.5, mode=mode, positions="generated")
    mine = Edit.from_selection(frame, method, direction=direction, gamma=1.5, mode=mode, positions="generated",
                               model=tiny, concept="power")
    assert set(built.vectors) == set(mine.vectors) and built.num_neurons == mine.num_neurons
    for layer, (idx, delta) in built.vectors.items():
        assert torch.equal(mine.vectors[layer][0], idx) and torch.equal(mine.vectors[layer][1], delta)
    assert (built.sign, built.gamma, built.positions) == (mine.sign, mine.gamma, mine.positions)
    assert built.meta["model"] == mine.meta["model"]
    assert built.meta["neurons_per_layer"] == mine.meta["neurons_per_layer"]


def test_from_selection_refuses_bad_arguments_and_empty_selections(example):
    frame = example["frame"]
    with pytest.raises(InputError, match="'dpnle' or 'dpnle-w'"):
        Edit.from_selection(frame, "npti")
    with pytest.raises(InputError, match="Unknown direction"):
        Edit.from_selection(frame, direction="sideways")
    with pytest.raises(InputError, match="Unknown edit mode"):
        Edit.from_selection(frame, mode="some")
    with pytest.raises(InputError, match="no neuron to edit in layers \\[0\\]"):
        Edit.from_selection(frame, layers=[0])
    empty = frame.assign(selected=False, pole=pd.array([None] * len(frame), dtype="string"))
    with pytest.raises(InputError, match="selection gives no neuron to edit"):
        Edit.from_selection(empty)
    bare = Edit.from_selection(frame, model=tiny_llama()[0])
    assert bare.meta["model"] == {"num_layers": LAYERS, "intermediate_size": INTERMEDIATE, "hidden_size": HIDDEN}
    assert Edit.from_selection(frame).meta["model"] == {}


# ---------------------------------------------------------------------------------------------
# saved edits: every field, and refusals


def test_save_load_keeps_clamps_keep_seed_and_full_width_vectors(tmp_path):
    npti = Edit(method="npti", site="gate", vectors={1: ([3, 7, 9], [0.5, -1.25, 2.0]), 3: ([0], [1.0])},
                gamma=0.75, sign=-1, positions="generated", clamp={1: [2, 4], 3: []}, keep=0.9,
                meta={"concept": "openness", "keep_seed": 7, "neurons_per_layer": {1: 3, 3: 1},
                      "model": {"id": "x", "digest": "abc", "num_layers": 4}, "npti_mask": "per-call"})
    caa = Edit(method="caa", site="resid", vectors={2: (None, np.linspace(-1, 1, HIDDEN))}, meta={"caa_layer": 2})
    for edit in (npti, caa):
        path = edit.save(tmp_path / f"{edit.method}.safetensors")
        again = Edit.load(path)
        assert again.summary() == edit.summary() and again.meta == edit.meta
        for layer, (idx, delta) in edit.vectors.items():
            other_idx, other_delta = again.vectors[layer]
            assert (idx is None and other_idx is None) or torch.equal(idx, other_idx)
            assert torch.equal(delta, other_delta)
        assert (edit.clamp is None) == (again.clamp is None)
        for layer, idx in (edit.clamp or {}).items():
            assert torch.equal(idx, again.clamp[layer])
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temporary file left behind


def test_load_refuses_missing_corrupt_foreign_and_newer_files(tmp_path, example):
    from safetensors.torch import save_file

    with pytest.raises(ArtifactError, match="does not exist"):
        Edit.load(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        Edit.load(junk)
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="not a saved dpnle edit"):
        Edit.load(foreign)
    good = example["edit"].save(tmp_path / "good.safetensors")
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as fh:
        metadata, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={**metadata, "format_version": "99"})
    with pytest.raises(ArtifactError, match="Upgrade dpnle"):
        Edit.load(newer)
    damaged = tmp_path / "damaged.safetensors"
    header = json.loads(metadata["edit"])
    header["layers"].append(99)
    save_file(tensors, str(damaged), metadata={**metadata, "edit": json.dumps(header)})
    with pytest.raises(ArtifactError, match="damaged dpnle edit"):
        Edit.load(damaged)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-8])
    with pytest.raises(ArtifactError, match="not a saved dpnle edit"):
        Edit.load(truncated)


# ---------------------------------------------------------------------------------------------
# the library's run-model steps, and the lazy exports


def test_record_model_and_load_run_model(tiny, tmp_path, monkeypatch):
    from dpnle import models

    run = Run.create_or_open("r", tiny.model_id, root=tmp_path)
    with pytest.raises(ArtifactError, match="records no fingerprint for model 'tiny-llama'"):
        load_run_model(run)
    manifest = run.record_model(tiny)
    assert manifest["model"] == {"id": "tiny-llama", "source": "memory", "fingerprint": tiny.fingerprint}
    assert run.manifest()["model"]["fingerprint"]["digest"] == tiny.fingerprint["digest"]
    asked = {}

    def fake_load(model_id, **kwargs):
        asked.update(kwargs, model_id=model_id)
        return tiny

    monkeypatch.setattr(models, "load_model", fake_load)
    assert load_run_model(run, dtype="float32", device="cpu") is tiny
    assert asked["model_id"] == "tiny-llama" and asked["dtype"] == "float32" and asked["device"] == "cpu"
    other = loaded_tiny(seed=1)
    monkeypatch.setattr(models, "load_model", lambda model_id, **kwargs: other)
    with pytest.raises(ArtifactError, match=r"is not the one run r was made with \(digest "):
        load_run_model(run)


def test_import_dpnle_stays_light_and_exports_resolve():
    code = ("import sys, dpnle, dpnle.cli; heavy = [m for m in ('torch', 'numpy', 'pandas', 'transformers') "
            "if m in sys.modules]; assert not heavy, heavy; from dpnle import collect; "
            "assert type(collect).__name__ == 'module'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    for name in dpnle.__all__:
        assert getattr(dpnle, name) is not None
    assert dpnle.Edit is Edit and dpnle.layer_stats is layer_stats and "select_dpnle" in dir(dpnle)
    with pytest.raises(AttributeError):
        dpnle.no_such_name  # noqa: B018


def test_user_errors_share_one_base_and_keep_their_builtin_bases():
    from dpnle.arch import UnsupportedModelError
    from dpnle.capability import CapabilityError
    from dpnle.cli import user_errors
    from dpnle.concepts import UnknownConceptError
    from dpnle.datasets import DatasetError, UnknownDatasetError
    from dpnle.evaluate import EvalError
    from dpnle.judges import JudgeError
    from dpnle.models import ModelLoadError
    from dpnle.pairs import PairsError

    bases = {ArtifactError: RuntimeError, InputError: ValueError, PairsError: ValueError,
             ModelLoadError: RuntimeError, UnsupportedModelError: ValueError, UnknownConceptError: ValueError,
             EvalError: ValueError, DatasetError: RuntimeError, CapabilityError: ValueError,
             JudgeError: RuntimeError, UnknownDatasetError: ValueError}  # fmt: skip
    for cls, builtin in bases.items():
        assert issubclass(cls, DpnleError) and issubclass(cls, builtin), cls
        with pytest.raises(builtin):
            raise cls("x")
    assert DpnleError in user_errors() and FileNotFoundError in user_errors()
    assert not any(issubclass(cls, DpnleError) for cls in (KeyError, OSError))


def test_the_readme_notebook_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's Python API block, verbatim, on the embedded model (no run directory)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"<!-- notebook-example:[^>]*-->\n```python\n(.*?)```", readme, re.S)
    assert match, "README.md lost its notebook example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(match.group(1), "README.md:notebook-example", "exec"), namespace)
    edit, loaded = namespace["edit"], namespace["loaded"]
    assert (tmp_path / "extraversion-up.safetensors").is_file()
    frame = namespace["frame"]
    assert edit.num_neurons == int(frame["selected"].sum()) > 0
    assert edit.meta["model"]["digest"] == loaded.fingerprint["digest"]
    assert capsys.readouterr().out.startswith(f"{edit.num_neurons} neurons:")
    with edit.apply(loaded):  # the loaded edit accepts the model it was made for
        pass
