"""Small pieces every batched forward pass needs: where inputs go, what pads, what a model accepts."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embeddings' device (with an accelerate device_map the layers may
    sit elsewhere), else the first parameter's, else the CPU."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the pad token, else the end-of-sequence token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first.")
    return int(pad)


def forward_accepts(model: Any, name: str) -> bool:
    """Whether ``model.forward`` takes keyword ``name`` (``logits_to_keep``, ``position_ids``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def cache_keyword(model: Any) -> str:
    """The keyword ``model.forward`` takes its KV cache by: ``cache`` from transformers 5.24 on,
    ``past_key_values`` before (the old name is deprecated there, so use the one declared)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward pass returned, under its declared field name (``cache`` or
    ``past_key_values``); None when there is none."""
    fields = getattr(output, "__dataclass_fields__", {})
    for name in ("cache", "past_key_values"):
        if name in fields:
            return getattr(output, name)
    return None
