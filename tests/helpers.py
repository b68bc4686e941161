"""Tiny random models and a byte-level tokenizer for tests: no download, built in milliseconds.

Every builder returns ``(model, tokenizer)``: a float32 causal LM in eval mode (hidden 32,
intermediate 64, 4 layers, random weights from a fixed seed) and a tokenizer that pads on the
left, has pad / eos / bos tokens and a small chat template, so that
:func:`dpnle.pairs.render_prompt` and generation work exactly as with a real model.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dpnle.pairs import DPNLE_TEMPLATE, PAIR_COLUMNS

HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 4
HEADS = 4
# Larger than the usual 0.02, so activations are O(1) like a trained model's, not near float16's
# subnormal range.
INIT_RANGE = 0.2

SPECIAL_TOKENS = ("<pad>", "<bos>", "<|end|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, no merges): any text encodes, and decoding
    then encoding a generated response gives back the same ids."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(byte_chars)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<|end|>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    return model.float().eval()


def tiny_llama(seed: int = 0) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=INIT_RANGE, tie_word_embeddings=False, **_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(config)), tokenizer


def tiny_qwen2(seed: int = 0) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer()
    config = Qwen2Config(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=INIT_RANGE, tie_word_embeddings=True, **_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    return _finish(Qwen2ForCausalLM(config)), tokenizer


def tiny_gemma3(seed: int = 0) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = tiny_tokenizer()
    config = Gemma3TextConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HIDDEN // HEADS,
        max_position_embeddings=1024,
        # A window shorter than the test prompts, so sliding-window layers are exercised.
        sliding_window=16, initializer_range=INIT_RANGE, **_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    return _finish(Gemma3ForCausalLM(config)), tokenizer


def tiny_gpt2(seed: int = 0) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    ids = _token_ids(tokenizer)
    config = GPT2Config(
        n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS, n_head=HEADS, n_positions=1024, initializer_range=INIT_RANGE,
        vocab_size=ids["vocab_size"], bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
    )
    torch.manual_seed(seed)
    return _finish(GPT2LMHeadModel(config)), tokenizer


TINY_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3, "gpt2": tiny_gpt2}

_WORDS = (
    "curious imaginative practical routine art ideas travel novel habits books music plans quiet "
    "bold careful open closed strange familiar abstract concrete dream fact"
).split()


def tiny_pairs(num_pairs: int = 6, seed: int = 0, concept: str = "openness") -> pd.DataFrame:
    """A pair set in :func:`dpnle.pairs.make_pairs`'s format with short, varied-length messages
    (no dataset needed)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(num_pairs):
        question = " ".join(rng.choice(_WORDS, size=int(rng.integers(1, 6)))) + "?"
        high = " ".join(rng.choice(_WORDS, size=int(rng.integers(1, 8))))
        low = " ".join(rng.choice(_WORDS, size=int(rng.integers(1, 8))))
        rows.append(
            {
                "pair_id": k,
                "concept": concept,
                "recipe": "personalitybench",
                "question_id": f"q{k}",
                "question": question,
                "high_description_id": f"h{k}",
                "low_description_id": f"l{k}",
                "high_message": DPNLE_TEMPLATE.format(description=high, question=question),
                "low_message": DPNLE_TEMPLATE.format(description=low, question=question),
                "high_response_prefix": "",
                "low_response_prefix": "",
            }
        )
    frame = pd.DataFrame(rows)
    frame["pair_id"] = frame["pair_id"].astype(np.int64)
    return frame[PAIR_COLUMNS]


def save_model(folder: Path, builder: Callable[[], tuple[torch.nn.Module, Any]] = tiny_llama) -> Path:
    """Save ``builder()``'s model and tokenizer into ``folder``, like a downloaded checkpoint."""
    model, tokenizer = builder()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def kill_when(victim: subprocess.Popen, ready: Callable[[], bool], delay: float = 0.0, timeout: float = 90.0) -> None:
    """SIGKILL ``victim`` ``delay`` seconds after ``ready()`` first holds."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if victim.poll() is not None:
                pytest.fail(f"the victim ended before the kill point: {victim.stderr.read()}")
            assert time.monotonic() < deadline, "the kill point never came"
            time.sleep(0.005)
        time.sleep(delay)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


def localized_tiny_run(root: Path, name: str = "tiny") -> tuple[Any, Any]:
    """A run of a tiny Llama (seed 0) with openness captured from 12 pairs and localized (q 0.9,
    d 0.2, all layers): what the end-to-end evaluation tests start from. Skips the test without
    the dataset mirror (evaluation reads its instruments from it)."""
    import os

    from dpnle.collect import collect_concept
    from dpnle.localize import localize_concept
    from dpnle.models import LoadedModel, model_fingerprint
    from dpnle.runs import Run

    if not os.environ.get("DPNLE_DATA_MIRROR"):
        pytest.skip("needs the dataset mirror (DPNLE_DATA_MIRROR=../shared/datasets)")
    torch.manual_seed(0)
    model, tokenizer = tiny_llama()
    loaded = LoadedModel(model, tokenizer, "tiny-llama", "memory", model_fingerprint(model, tokenizer, "tiny-llama"))
    run = Run.create_or_open(name, "tiny-llama", root=root)
    run.record_model(loaded)
    collect_concept(run, loaded, "openness", pairs=tiny_pairs(12), batch_size=8, progress=False)
    localize_concept(run, "openness", quantile=0.9, d_threshold=0.2, layers="all")
    return run, loaded
