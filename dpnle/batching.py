"""Small pieces every batched forward pass needs: where inputs go, what pads, what a model accepts."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn


class EditLike(Protocol):
    """What a forward pass needs from an edit (dpnle.edits.Edit satisfies it): hooks registered
    for the duration of the block. ``prompt_length`` is the padded prompt width P of the batch
    (columns >= P are generated tokens), for edits restricted to prompt or generated positions.
    When the context manager yields an object with ``assert_fired(new_tokens=, rows=)`` (an
    :class:`~dpnle.edits.EditHandle`), generation calls it after every batch."""

    def apply(self, model: Any, prompt_length: int | None = None) -> AbstractContextManager[Any]: ...


def edit_context(edit: EditLike | None, model: Any, prompt_length: int | None) -> AbstractContextManager[Any]:
    """``edit.apply(model, prompt_length=...)``, or a context that does nothing when ``edit`` is None."""
    return nullcontext() if edit is None else edit.apply(model, prompt_length=prompt_length)


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


def add_special_tokens_for(tokenizer: Any) -> bool:
    """The ``add_special_tokens`` to tokenize a prompt rendered by :func:`dpnle.pairs.render_prompt` with.

    A chat template writes its own special tokens (BOS included): adding them again when
    tokenizing the rendered text would double the BOS of Llama-3-style templates. So special
    tokens are added only when the tokenizer has no chat template (the prompt is then plain text).
    """
    return not bool(getattr(tokenizer, "chat_template", None))


def length_sorted_batches(
    lengths: Sequence[int] | Sequence[Sequence[int]], batch_size: int, *, descending: bool = True
) -> list[np.ndarray]:
    """Row indices per batch, with rows of similar length together so that padding is small.

    Longest first by default (an out-of-memory error then shows in the first batch), shortest
    first with ``descending=False``; ties keep input order, so the batches are deterministic.
    ``lengths`` holds one length per row, or one tuple of lengths per row, compared in order
    (e.g. (prompt length, continuation length)). Every batch but the last has ``batch_size`` rows.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1.")
    keys = np.asarray(lengths, dtype=np.int64)
    if keys.ndim == 1:
        keys = keys[:, None]
    if descending:
        keys = -keys
    # np.lexsort is stable and sorts by its last key first: pass the columns last to first.
    order = np.lexsort(keys.T[::-1]) if len(keys) else np.zeros(0, dtype=np.int64)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[i, span] = row
        mask[i, span] = 1
    return torch.from_numpy(input_ids).to(device), torch.from_numpy(mask).to(device)


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id ``rows`` left-padded with ``pad_id`` into one batch: ``(input_ids, attention_mask)``,
    both [batch, longest row] int64 on ``device`` (the mask 1 on real tokens). Every row ends at
    the last column, so the logits at -1 are every row's next-token prediction; pass
    :func:`positions_from_mask` as ``position_ids`` so a padded row sees the positions it would see alone."""
    return _pad(rows, pad_id, device, left=True)


def right_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id ``rows`` right-padded with ``pad_id``: ``(input_ids, attention_mask)`` as in
    :func:`left_pad`, every row starting at column 0."""
    return _pad(rows, pad_id, device, left=False)


def positions_from_mask(mask: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Position ids [batch, seq] from an attention mask [batch, seq]: each real token's index among
    its row's real tokens, plus ``start`` (the length of a cached prefix); padding gets ``start``.

    With these, a row's result does not depend on its padding (needed for absolute-position
    models; RoPE models would tolerate a shift)."""
    return (start + mask.cumsum(dim=-1) - 1).clamp(min=start)
