"""Stage 1: capture per-sample activations at one site and token policy, and their statistics.

Two layers of API:

- :func:`collect` (notebook API): prompts in, ``{layer: [n_prompts, width] float32}`` out.
- :func:`collect_concept` (the stage): a concept's contrastive pairs in, a resumable capture
  in ``runs/<run>/activations/<concept>/<site>-<policy>/`` out: float16 Parquet shards, the
  per-shard statistic partials, the merged ``stats.parquet`` and a manifest.

How a batch is captured, and why:

- Prompts are tokenized once, sorted by length (longest first, so an out-of-memory error shows
  on the first batch) and padded on the left, so the last prompt token is position -1 of every
  row and padding waste is small. Position ids come from the attention mask, so a padded row
  sees exactly the positions it would see alone (this matters for absolute position
  embeddings such as GPT-2's).
- A hook on each captured layer reduces the site's [batch, seq, width] tensor to
  [batch, width] on the device (last token, or a masked mean) and writes it into one
  preallocated float32 buffer; nothing of sequence length is kept. The hook of the last needed
  layer raises a private exception that ends the forward pass, so later layers, the final norm
  and the lm_head never run.
- Statistics are computed from these float32 values (per batch and pole, reduced on the device
  in float64, merged on the host with Chan's formula). Only the stored copy is rounded to
  float16, so localization never sees storage rounding.
- The stage assigns samples to shards in order of prompt length, so batches inside a shard are
  nearly free of padding even when a batch is as large as a shard, and a writer thread
  compresses and writes one shard while the device captures the next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from dpnle import runs as runs_io
from dpnle.arch import Architecture, architecture, check_site, register_site_hook
from dpnle.batching import (
    add_special_tokens_for,
    input_device,
    left_pad,
    length_sorted_batches,
    pad_token_id,
    positions_from_mask,
)
from dpnle.concepts import TRAITS
from dpnle.distributed import Workers
from dpnle.pairs import LEGACY_TEMPLATE_ID, npti_message, pairs_digest, pairs_info, render_prompt, to_samples
from dpnle.progress import Progress
from dpnle.stats import NPTI_HIST_BINS, LayerStats, RunningMoments, TokenCounts, stats_from_moments
from dpnle.vocab import (
    MEAN_POLICIES,
    NPTI_PROTOCOLS,
    POLICIES,
    SITES,
    TOKENIZATIONS,
    NptiProtocol,
    Policy,
    Site,
    Tokenization,
    check_choice,
)

try:
    import fcntl
except ImportError:  # Windows: no flock; the writer lock then only warns
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SITES",
    "POLICIES",
    "Capture",
    "CaptureSummary",
    "collect",
    "generate_responses",
    "capture_dir",
    "collect_concept",
    "load_stats",
    "load_activations",
]

CPU_BATCH_SIZE = 16
MAX_AUTO_BATCH_SIZE = 256
POLES = ("high", "low")

# How a response-mean capture makes and reads its responses (--npti-protocol):
# "dpnle": DPN-LE's prompt, greedy max_new_tokens (64), the response text re-tokenized after the
# prompt, reduced over all its tokens. "reference": NPTI's search_neuron.py (RUCAIBox/NPTI
# @630d2a2): NPTI's prompt (pairs.NPTI_TEMPLATE), greedy, 500 new tokens, repetition penalty 1.1,
# the generated ids themselves, reduced over all of them but the last (the tokens NPTI's decode
# steps feed the model; its prefill is not counted), every layer captured by default.
DEFAULT_MAX_NEW_TOKENS = 64
NPTI_REFERENCE_GENERATION = {"max_new_tokens": 500, "repetition_penalty": 1.1, "do_sample": False}


def check_npti_protocol(protocol: NptiProtocol, policy: Policy = "response-mean") -> None:
    check_choice("NPTI protocol", protocol, NPTI_PROTOCOLS, hint="(e.g. --npti-protocol reference)")
    if protocol != "dpnle" and policy != "response-mean":
        raise runs_io.InputError(
            f"--npti-protocol {protocol} sets how responses are generated, so it needs --policy response-mean "
            f"(and --site gate for NPTI), not --policy {policy}."
        )


def resolve_max_new_tokens(max_new_tokens: int | None, protocol: NptiProtocol = "dpnle") -> int:
    """``max_new_tokens``, or its default: 64 (dpnle), 500 (NPTI's reference protocol)."""
    if max_new_tokens is not None:
        return int(max_new_tokens)
    return NPTI_REFERENCE_GENERATION["max_new_tokens"] if protocol == "reference" else DEFAULT_MAX_NEW_TOKENS


def generation_settings(protocol: NptiProtocol, max_new_tokens: int) -> dict[str, Any]:
    """What a response-mean capture records about its responses (manifest and, for the
    reference protocol, the capture key)."""
    if protocol == "reference":
        return {
            "protocol": "reference",
            "template": "npti (pairs.NPTI_TEMPLATE, RUCAIBox/NPTI search_neuron.py TEMPLATE)",
            "max_new_tokens": int(max_new_tokens),
            "repetition_penalty": NPTI_REFERENCE_GENERATION["repetition_penalty"],
            "repetition_penalty_tokens": "prompt and generated tokens, left padding excluded (as vLLM)",
            "do_sample": False,
            "reduced_tokens": "generated token ids, all but the last (NPTI's decode-step inputs); a response "
                              "of one token: that token for the per-sample mean, none for the pooled counts",
        }
    return {
        "protocol": "dpnle",
        "template": "dpnle (the pair's message)",
        "max_new_tokens": int(max_new_tokens),
        "repetition_penalty": None,
        "do_sample": False,
        "reduced_tokens": "response text re-tokenized after the prompt, all its tokens",
    }

MANIFEST_FILE = "manifest.json"
STATS_FILE = "stats.parquet"
PAIRS_FILE = "pairs.parquet"
LOCK_FILE = "writer.lock"


REFERENCE_MAX_LENGTH = 2048  # the reference's max_length (truncation=True); dpnle refuses longer prompts


def check_tokenization(tokenization: Tokenization) -> None:
    check_choice("tokenization", tokenization, TOKENIZATIONS, hint="(e.g. --tokenization reference)")


def check_policy(policy: Policy) -> None:
    check_choice("token policy", policy, POLICIES)


def check_batch_size(batch_size: int | str) -> int | str:
    """``batch_size`` as a positive int, or ``"auto"``; anything else is an :class:`InputError`."""
    if batch_size == "auto":
        return batch_size
    message = f"batch_size must be a positive integer or 'auto', not {batch_size!r}: pass e.g. --batch-size 8."
    if isinstance(batch_size, bool):
        raise runs_io.InputError(message)
    try:
        size = int(batch_size)
    except (TypeError, ValueError):
        raise runs_io.InputError(message) from None
    if size < 1 or (isinstance(batch_size, float) and size != batch_size):
        raise runs_io.InputError(message)
    return size


def check_options(
    site: Site = "mlp", policy: Policy = "last", batch_size: int | str = "auto", shard_size: int = 256,
    max_new_tokens: int = 64, tokenization: Tokenization = "dpnle",
) -> None:
    """Refuse capture options that cannot work, before any model is loaded or file written."""
    check_choice("site", site, SITES, hint="(e.g. --site mlp)")
    check_policy(policy)
    check_tokenization(tokenization)
    check_batch_size(batch_size)
    if int(shard_size) < 1:
        raise runs_io.InputError(f"shard_size must be at least 1, not {shard_size}: pass e.g. --shard-size 256.")
    if policy == "response-mean" and int(max_new_tokens) < 1:
        raise runs_io.InputError(
            f"max_new_tokens must be at least 1 for --policy response-mean, not {max_new_tokens}."
        )


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class Capture:
    """Activations of ``collect``: one [n_prompts, width] float32 array per layer, rows in the
    order of the prompts given."""

    activations: dict[int, np.ndarray]  # layer -> [n_prompts, width] float32
    positive_fraction: dict[int, np.ndarray] | None  # layer -> [n_prompts, width]: gate site, mean policies
    num_tokens: int  # non-pad tokens that went through the model
    site: str = "mlp"
    policy: str = "last"
    layers: list[int] = field(default_factory=list)
    responses: list[str] | None = None  # the responses reduced over (policy response-mean)
    batch_size: int = 0  # prompts per forward pass (resolved from "auto")


@dataclass
class CaptureSummary:
    concept: str
    site: str
    policy: str
    num_samples: int
    num_tokens: int
    seconds: float
    path: Path
    resumed_from: int  # samples already captured (complete shards) when this call started


# ---------------------------------------------------------------------------------------------
# tokenization and batching


@dataclass
class _Encoded:
    """One prompt (plus response, for response-mean) as token ids."""

    ids: list[int]
    reduce_tokens: int  # the mean policies average over the last ``reduce_tokens`` ids
    # The pooled token counts (TokenCounts) count the last ``pool_tokens`` ids (None: reduce_tokens).
    pool_tokens: int | None = None


@dataclass
class _Batch:
    positions: np.ndarray  # [batch] indices into the encoded list
    input_ids: Tensor  # [batch, seq] left-padded
    attention_mask: Tensor  # [batch, seq] 1 for real tokens
    reduce_mask: Tensor | None  # [batch, seq] bool: tokens a mean policy averages over
    num_tokens: int
    pool_mask: Tensor | None = None  # [batch, seq] bool: tokens the pooled counts count (None: reduce_mask)


@dataclass
class _BatchResult:
    positions: np.ndarray  # [batch] indices into the encoded list
    acts: Tensor  # [layers, batch, width] float32 on the model's device
    positive_fraction: Tensor | None  # [layers, batch, width] float32 (gate site, mean policies)
    num_tokens: int


def encode_prompts(tokenizer: Any, prompts: Sequence[str], tokenization: str = "dpnle") -> list[list[int]]:
    """Token ids of the rendered ``prompts``, as capture and generation feed them to the model.

    ``tokenization="dpnle"``: special tokens are added only when the tokenizer has no chat template
    (:func:`dpnle.batching.add_special_tokens_for`: a template writes its own, so Llama-3's prompt
    starts with one BOS). ``"reference"``: the
    reference's ``tokenizer(text)`` with the tokenizer's defaults (special tokens added, so
    Llama-3's prompt starts with two BOS). The reference also passes ``truncation=True,
    max_length=2048``; dpnle refuses a prompt longer than 2048 tokens in this mode instead of
    cutting its end (which would move the captured last token), so every prompt it accepts has
    exactly the reference's ids. A prompt that tokenizes to no tokens is refused.
    """
    check_tokenization(tokenization)
    if tokenization == "reference":
        prompt_ids = tokenizer(list(prompts))["input_ids"]
        too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) > REFERENCE_MAX_LENGTH]
        if too_long:
            first = too_long[0]
            raise runs_io.InputError(
                f"{len(too_long)} prompt(s) are longer than the reference's max_length of {REFERENCE_MAX_LENGTH} "
                f"tokens (prompt {first}: {len(prompt_ids[first])} tokens); the reference would truncate their end "
                "and capture another token, so dpnle refuses them: shorten them, or use --tokenization dpnle."
            )
    else:
        prompt_ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens_for(tokenizer))["input_ids"]
    if any(len(ids) == 0 for ids in prompt_ids):
        empty = next(i for i, ids in enumerate(prompt_ids) if len(ids) == 0)
        raise ValueError(f"Prompt {empty} tokenizes to no tokens; every prompt needs at least one.")
    return [list(ids) for ids in prompt_ids]


def _encode(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str] | None = None,
    policy: str = "last",
    tokenization: str = "dpnle",
) -> list[_Encoded]:
    """Token ids of the rendered ``prompts`` (:func:`encode_prompts`), plus those of ``responses``
    for response-mean (the tokens it averages over)."""
    prompt_ids = encode_prompts(tokenizer, prompts, tokenization)
    if policy != "response-mean":
        return [_Encoded(list(ids), len(ids)) for ids in prompt_ids]
    if responses is None or len(responses) != len(prompts):
        raise ValueError("Policy response-mean needs one response text per prompt.")
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    encoded = []
    for p_ids, r_ids in zip(prompt_ids, response_ids, strict=True):
        # A model that stops at once answered with EOS alone: average over that token.
        r_ids = list(r_ids) if len(r_ids) else [eos]
        encoded.append(_Encoded(list(p_ids) + r_ids, len(r_ids)))
    return encoded


def _length_sorted(encoded: Sequence[_Encoded], batch_size: int) -> list[np.ndarray]:
    """Batches of ``encoded``, longest first (:func:`dpnle.batching.length_sorted_batches`)."""
    return length_sorted_batches([len(e.ids) for e in encoded], batch_size)


def _pad_left(
    encoded: Sequence[_Encoded], positions: np.ndarray, pad_id: int, device: torch.device, policy: str
) -> _Batch:
    """The rows ``positions`` of ``encoded`` left-padded (:func:`dpnle.batching.left_pad`), with
    the masks of the tokens a mean policy averages over and the pooled counts count."""
    rows = [encoded[i] for i in positions]
    input_ids, attention = left_pad([r.ids for r in rows], pad_id, device)
    seq = input_ids.shape[1]
    reduce = np.zeros((len(rows), seq), dtype=bool) if policy in MEAN_POLICIES else None
    pooled = None
    if reduce is not None and any(r.pool_tokens is not None and r.pool_tokens != r.reduce_tokens for r in rows):
        pooled = np.zeros((len(rows), seq), dtype=bool)
    for row, enc in enumerate(rows):
        if reduce is not None:
            reduce[row, seq - enc.reduce_tokens :] = True
        if pooled is not None:
            count = enc.reduce_tokens if enc.pool_tokens is None else enc.pool_tokens
            if count > 0:
                pooled[row, seq - count :] = True
    return _Batch(
        pool_mask=None if pooled is None else torch.from_numpy(pooled).to(device),
        positions=np.asarray(positions),
        input_ids=input_ids,
        attention_mask=attention,
        reduce_mask=None if reduce is None else torch.from_numpy(reduce).to(device),
        num_tokens=sum(len(r.ids) for r in rows),
    )




def _normalize_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    normalized = []
    for layer in layers:
        idx = int(layer) + num_layers if int(layer) < 0 else int(layer)
        if not 0 <= idx < num_layers:
            raise runs_io.InputError(f"Layer {layer} is out of range: the model has layers 0-{num_layers - 1}.")
        normalized.append(idx)
    if not normalized:
        raise runs_io.InputError("The layer selection is empty; pass None for all layers.")
    return sorted(set(normalized))


# ---------------------------------------------------------------------------------------------
# hooks


class _StopForward(Exception):
    """Raised by the hook of the last captured layer: nothing after it is needed."""


class _SiteRecorder:
    """Hooks on ``site`` of ``layers`` that reduce every batch to [batch, width] on the device.

    Use as a context manager (hooks are removed on exit, whatever happens); call :meth:`run`
    per batch.
    """

    def __init__(self, arch: Architecture, site: str, policy: str, layers: Sequence[int]):
        check_site(site)
        check_policy(policy)
        self.arch = arch
        self.site = site
        self.policy = policy
        self.layers = list(layers)
        self.width = arch.width(site)
        self.track_positive = site == "gate" and policy in MEAN_POLICIES
        for layer in self.layers:
            arch.module_for(site, layer)  # raises for a missing site, before any hook is registered
        self._handles: list[Any] = []
        self._batch: _Batch | None = None
        self._acts: Tensor | None = None  # [layers, batch, width] float32
        self._positive: Tensor | None = None
        self._fired: list[bool] = []
        # NPTI's pooled counts (gate site, response-mean): set by the caller for a run of batches.
        # ``count_groups`` [encoded] holds each prompt's group (0 high, 1 low); ``token_counts``
        # maps (group, slot) to the TokenCounts the pooled tokens of that group and layer go into.
        self.count_groups: np.ndarray | None = None
        self.token_counts: dict[tuple[int, int], TokenCounts] | None = None

    def buffer_elements(self, batch_size: int) -> int:
        """float32 elements the per-batch output buffers take."""
        return (2 if self.track_positive else 1) * len(self.layers) * batch_size * self.width

    def __enter__(self) -> _SiteRecorder:
        try:
            for slot, layer in enumerate(self.layers):
                self._handles.append(register_site_hook(self.arch, self.site, layer, self._recorder(slot)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _recorder(self, slot: int) -> Callable[[Tensor], None]:
        def record(hidden: Tensor) -> None:
            self._record(slot, hidden)

        return record

    def _record(self, slot: int, hidden: Tensor) -> None:
        """Reduce ``hidden`` [batch, seq, width] into the buffer; stop after the last layer."""
        batch, acts = self._batch, self._acts
        if batch is None or acts is None:  # a forward outside run(): not ours to record
            return
        if self.policy == "last":
            acts[slot].copy_(hidden[:, -1, :])  # left padding: the last prompt token is at -1
        else:
            mask = batch.reduce_mask  # [batch, seq]
            assert mask is not None
            counts = mask.sum(dim=1, keepdim=True).to(torch.float32)  # [batch, 1]
            # A select, not a product: padded positions may hold NaN, and NaN * 0 is NaN.
            # The sum accumulates in float32 whatever the model's dtype.
            summed = torch.where(mask[..., None], hidden, hidden.new_zeros(())).sum(dim=1, dtype=torch.float32)
            acts[slot].copy_(summed / counts)
            if self._positive is not None:
                positive = ((hidden > 0) & mask[..., None]).sum(dim=1, dtype=torch.float32)
                self._positive[slot].copy_(positive / counts)
            if self.token_counts is not None and self.count_groups is not None:
                self._count_tokens(slot, hidden, batch.pool_mask if batch.pool_mask is not None else mask)
        self._fired[slot] = True
        if slot == len(self.layers) - 1:
            raise _StopForward

    def _count_tokens(self, slot: int, hidden: Tensor, pool: Tensor) -> None:
        """Pool the tokens of ``pool`` [batch, seq] per group into ``token_counts`` (NPTI's
        over_zero / token_num / histogram), on the device."""
        batch = self._batch
        assert batch is not None and self.token_counts is not None and self.count_groups is not None
        groups = torch.from_numpy(np.asarray(self.count_groups)[batch.positions]).to(pool.device)
        for (group, counted_slot), counts in self.token_counts.items():
            if counted_slot != slot:
                continue
            rows = pool & (groups == group)[:, None]
            if bool(rows.any()):
                counts.update(hidden[rows])

    @torch.inference_mode()
    def run(self, model: nn.Module, batch: _Batch) -> _BatchResult:
        if not self._handles:
            raise RuntimeError("_SiteRecorder.run needs the hooks: use it inside `with recorder:`.")
        device = batch.input_ids.device
        shape = (len(self.layers), batch.input_ids.shape[0], self.width)
        self._acts = torch.empty(shape, dtype=torch.float32, device=device)
        self._positive = torch.empty(shape, dtype=torch.float32, device=device) if self.track_positive else None
        self._fired = [False] * len(self.layers)
        self._batch = batch
        # Positions from the mask: a left-padded row then sees the positions it would see alone.
        position_ids = positions_from_mask(batch.attention_mask)
        try:
            model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
        except _StopForward:
            pass
        finally:
            self._batch = None
        missing = [layer for layer, fired in zip(self.layers, self._fired, strict=True) if not fired]
        if missing:
            raise RuntimeError(
                f"The {self.site} hooks of layers {missing} did not fire during the forward pass of "
                f"{type(model).__name__}: the model does not call the module dpnle.arch found for this site "
                "(a fused or compiled implementation?). Load it without fusion, or report the architecture."
            )
        acts, positive = self._acts, self._positive
        self._acts = self._positive = None
        return _BatchResult(batch.positions, acts, positive, batch.num_tokens)


def _run_batches(
    recorder: _SiteRecorder,
    model: nn.Module,
    encoded: Sequence[_Encoded],
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> Iterator[_BatchResult]:
    for positions in _length_sorted(encoded, batch_size):
        batch = _pad_left(encoded, positions, pad_id, device, recorder.policy)
        yield recorder.run(model, batch)


# ---------------------------------------------------------------------------------------------
# batch size


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _probe_batch_size(
    recorder: _SiteRecorder, model: nn.Module, longest: _Encoded, limit: int, pad_id: int, device: torch.device
) -> int:
    """The largest power of two (<= ``limit``, <= 256) at which a batch of the longest prompt fits.

    Without gradients every layer needs the same transient memory, so the probe runs only up to
    the site of layer 1 (a few percent of a forward pass) while holding as much memory as the
    capture's output buffers will take.
    """
    size = 1 << max(0, int(math.floor(math.log2(max(1, min(limit, MAX_AUTO_BATCH_SIZE))))))
    probe_layer = min(1, recorder.arch.num_layers - 1)
    with _SiteRecorder(recorder.arch, recorder.site, recorder.policy, [probe_layer]) as probe:
        while size >= 1:
            if _fits(probe, model, longest, size, pad_id, device, reserve=recorder.buffer_elements(size)):
                return size
            size //= 2
    raise RuntimeError(
        f"Even a batch of one prompt of {len(longest.ids)} tokens does not fit on {device}: use a device "
        "with more memory, a smaller dtype (--dtype bfloat16), or --device-map auto to spread the model."
    )


def _fits(
    probe: _SiteRecorder,
    model: nn.Module,
    longest: _Encoded,
    size: int,
    pad_id: int,
    device: torch.device,
    reserve: int,
) -> bool:
    try:
        reserved = torch.empty(reserve, dtype=torch.float32, device=device)
        batch = _pad_left([longest] * size, np.arange(size), pad_id, device, probe.policy)
        probe.run(model, batch)
        torch.cuda.synchronize(device)
        del reserved, batch
        return True
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
    # Out here the failed batch and the exception's frames are released, so the cache can shrink.
    torch.cuda.empty_cache()
    return False


def _resolve_batch_size(
    batch_size: int | str,
    recorder: _SiteRecorder,
    model: nn.Module,
    encoded: Sequence[_Encoded],
    pad_id: int,
    device: torch.device,
    extra_tokens: int = 0,
) -> int:
    if batch_size != "auto":
        return int(check_batch_size(batch_size))
    if device.type != "cuda" or not encoded:
        return CPU_BATCH_SIZE
    longest = max(encoded, key=lambda e: len(e.ids))
    if extra_tokens:
        # Responses are not generated yet: probe with room for the longest possible one.
        longest = _Encoded(longest.ids + [pad_id] * extra_tokens, len(longest.ids) + extra_tokens)
    return _probe_batch_size(recorder, model, longest, len(encoded), pad_id, device)


# ---------------------------------------------------------------------------------------------
# notebook API


def _generate_or_none(
    model: nn.Module,
    encoded: Sequence[_Encoded],
    positions: np.ndarray,
    pad_id: int,
    device: torch.device,
    config: Any,
) -> Tensor | None:
    """The new tokens [batch, new] (on the host) of one left-padded batch, or None if it ran
    out of device memory with more than one prompt."""
    batch = _pad_left(encoded, positions, pad_id, device, "last")
    try:
        out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, generation_config=config)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _is_oom(exc) or len(positions) == 1:
            raise
        return None
    return out[:, batch.input_ids.shape[1] :].cpu()


def generate_responses(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int | str = "auto",
    progress: bool = False,
    tokenization: str = "dpnle",
) -> list[str]:
    """Greedy responses to ``prompts`` (special tokens stripped), in the prompts' order
    (``tokenization``: see :func:`encode_prompts`)."""
    from transformers import GenerationConfig

    device = input_device(model)
    pad_id = pad_token_id(tokenizer)
    size = CPU_BATCH_SIZE if batch_size == "auto" else int(batch_size)
    if batch_size == "auto" and device.type == "cuda":
        size = 64  # the KV cache, not the activations, bounds generation; halved on OOM below
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                              eos_token_id=sorted(_eos_ids(model, tokenizer)) or None)
    encoded = _encode(tokenizer, prompts, tokenization=tokenization)
    responses: list[str] = [""] * len(prompts)
    pending = _length_sorted(encoded, size)
    with Progress("generating", len(prompts), enabled=progress) as bar, torch.inference_mode():
        while pending:
            positions = pending.pop(0)
            out = _generate_or_none(model, encoded, positions, pad_id, device, config)
            if out is None:  # out of memory: split the batch in two and go on
                torch.cuda.empty_cache()
                half = len(positions) // 2
                pending[:0] = [positions[:half], positions[half:]]
                continue
            for row, index in enumerate(positions):
                responses[index] = tokenizer.decode(out[row], skip_special_tokens=True)
            bar.advance(len(positions), tokens=sum(len(encoded[i].ids) for i in positions))
    return responses


def _prompt_repetition_penalty(penalty: float, pad_lengths: Tensor):
    """A logits processor applying ``penalty`` the way vLLM does (NPTI generates with vLLM): to
    every token id that occurs in the prompt or the response so far (a positive logit divided by
    it, a negative one multiplied), but never to the left padding of a batch, which vLLM does not
    have. (transformers' own processor would count the pad ids of a shorter prompt as seen.)"""
    from transformers import LogitsProcessor

    class _Penalty(LogitsProcessor):
        def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            real = (positions[None, :] >= pad_lengths.to(input_ids.device)[:, None]).to(torch.int32)
            seen = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
            seen.scatter_add_(1, input_ids.to(scores.device), real.to(scores.device))
            penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
            return torch.where(seen > 0, penalized, scores)

    return _Penalty()


def generate_response_ids(
    model: nn.Module,
    tokenizer: Any,
    encoded: Sequence[_Encoded],
    max_new_tokens: int,
    batch_size: int | str = "auto",
    repetition_penalty: float | None = None,
    progress: bool = False,
) -> list[list[int]]:
    """Greedy responses to the tokenized prompts ``encoded``, as generated token ids: each up to
    and including its first end-of-sequence id, or ``max_new_tokens`` ids (NPTI's reference
    protocol reads these ids themselves, never re-tokenized text). ``repetition_penalty`` is
    applied as vLLM applies it (:func:`_prompt_repetition_penalty`)."""
    from transformers import GenerationConfig, LogitsProcessorList

    device = input_device(model)
    pad_id = pad_token_id(tokenizer)
    size = CPU_BATCH_SIZE if batch_size == "auto" else int(batch_size)
    if batch_size == "auto" and device.type == "cuda":
        size = 64  # the KV cache bounds generation; halved on OOM below
    eos_ids = _eos_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                              eos_token_id=sorted(eos_ids) or None)
    generated: list[list[int]] = [[] for _ in encoded]
    pending = _length_sorted(encoded, size)
    with Progress("generating", len(encoded), enabled=progress) as bar, torch.inference_mode():
        while pending:
            positions = pending.pop(0)
            batch = _pad_left(encoded, positions, pad_id, device, "last")
            processors = LogitsProcessorList()
            if repetition_penalty is not None and repetition_penalty != 1.0:
                pad_lengths = (batch.attention_mask == 0).sum(dim=1)
                processors.append(_prompt_repetition_penalty(float(repetition_penalty), pad_lengths))
            try:
                out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     generation_config=config, logits_processor=processors)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc) or len(positions) == 1:
                    raise
                torch.cuda.empty_cache()
                half = len(positions) // 2
                pending[:0] = [positions[:half], positions[half:]]
                continue
            new = out[:, batch.input_ids.shape[1] :].cpu().tolist()
            for row, index in enumerate(positions):
                ids = new[row]
                end = next((k for k, token in enumerate(ids) if token in eos_ids), None)
                generated[index] = ids if end is None else ids[: end + 1]
            bar.advance(len(positions), tokens=sum(len(encoded[i].ids) for i in positions))
    return generated


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The ids generation stops at: the model's generation config's eos ids, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}


def _encode_generated(prompt: _Encoded, generated: Sequence[int], eos_id: int | None) -> _Encoded:
    """Prompt ids + generated ids for NPTI's reference protocol: the model is fed every generated
    id but the last (the inputs of NPTI's decode steps), and the pooled counts count exactly those.
    A response of one id (the model stopped at once) is fed that id so the per-sample mean has a
    token; it adds nothing to the pooled counts, as in the reference."""
    ids = list(generated) or ([] if eos_id is None else [int(eos_id)])
    if len(ids) >= 2:
        return _Encoded(list(prompt.ids) + ids[:-1], len(ids) - 1, pool_tokens=len(ids) - 1)
    return _Encoded(list(prompt.ids) + ids, len(ids), pool_tokens=0)


def collect(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    site: str = "mlp",
    policy: str = "last",
    layers: Sequence[int] | None = None,
    batch_size: int | str = "auto",
    response_texts: Sequence[str] | None = None,
    progress: bool = True,
    tokenization: str = "dpnle",
) -> Capture:
    """Capture ``site`` activations of ``prompts`` (already rendered text) under ``policy``.

    ``last``: the last prompt token. ``prompt-mean``: the mean over the prompt's tokens.
    ``response-mean``: the mean over the tokens of ``response_texts`` appended after each
    prompt (a teacher-forced pass); when None, greedy responses of up to 64 tokens are
    generated first. Returns float32 arrays with rows in the order of ``prompts``.
    """
    check_site(site)
    check_policy(policy)
    check_tokenization(tokenization)
    arch = architecture(model)
    layer_list = _normalize_layers(layers, arch.num_layers)
    device = input_device(model)
    pad_id = pad_token_id(tokenizer)
    if policy == "response-mean" and response_texts is None:
        response_texts = generate_responses(model, tokenizer, prompts, batch_size=batch_size, progress=progress,
                                            tokenization=tokenization)
    encoded = _encode(tokenizer, prompts, response_texts, policy, tokenization)
    width = arch.width(site)
    activations = {layer: np.empty((len(prompts), width), dtype=np.float32) for layer in layer_list}
    positive: dict[int, np.ndarray] | None = None
    num_tokens = 0
    with _SiteRecorder(arch, site, policy, layer_list) as recorder:
        if recorder.track_positive:
            positive = {layer: np.empty((len(prompts), width), dtype=np.float32) for layer in layer_list}
        size = _resolve_batch_size(batch_size, recorder, model, encoded, pad_id, device)
        with Progress(f"capture {site}/{policy}", len(prompts), enabled=progress) as bar:
            for result in _run_batches(recorder, model, encoded, size, pad_id, device):
                acts = result.acts.cpu().numpy()  # [layers, batch, width]
                fractions = None if result.positive_fraction is None else result.positive_fraction.cpu().numpy()
                for slot, layer in enumerate(layer_list):
                    activations[layer][result.positions] = acts[slot]
                    if positive is not None and fractions is not None:
                        positive[layer][result.positions] = fractions[slot]
                num_tokens += result.num_tokens
                bar.advance(len(result.positions), tokens=result.num_tokens)
    return Capture(
        activations=activations,
        positive_fraction=positive,
        num_tokens=num_tokens,
        site=site,
        policy=policy,
        layers=layer_list,
        responses=None if response_texts is None else list(response_texts),
        batch_size=size,
    )


# ---------------------------------------------------------------------------------------------
# the stage: artifacts


def capture_dir(run: runs_io.Run, concept: str, site: str = "mlp", policy: str = "last") -> Path:
    return run.activations_dir(concept) / f"{site}-{policy}"


def _shard_path(directory: Path, shard: int) -> Path:
    return directory / f"shard-{shard:05d}.parquet"


def _stats_shard_path(directory: Path, shard: int) -> Path:
    return directory / f"stats-shard-{shard:05d}.parquet"


def _collect_command(run: runs_io.Run, concept: str, site: str, policy: str) -> str:
    flag = "--trait" if concept in TRAITS else "--value"
    return f"dpnle collect-activations --run {run.name} {flag} {concept} --site {site} --policy {policy}"


def _key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _describe_key_value(field_name: str, value: Any, manifest: dict[str, Any]) -> str:
    if field_name == "model":
        model_id = manifest.get("model", {}).get("id", "?")
        return f"{model_id} (fingerprint {value})"
    if field_name == "tokenization" and value is None:
        return "'dpnle' (the default)"
    return repr(value)


def _check_key(directory: Path, manifest: dict[str, Any], key: dict[str, Any], new_manifest: dict[str, Any]) -> None:
    old_key = manifest.get("key", {})
    fields = sorted(set(old_key) | set(key))
    differing = [f for f in fields if old_key.get(f) != key.get(f)]
    if not differing:
        return
    details = "; ".join(
        f"{f}: {_describe_key_value(f, old_key.get(f), manifest)} there, "
        f"{_describe_key_value(f, key.get(f), new_manifest)} now"
        for f in differing
    )
    if "npti_protocol" in differing:
        details += (
            "; a response-mean capture made with one --npti-protocol (dpnle: DPN-LE prompt, 64 tokens, re-tokenized "
            "text; reference: NPTI's prompt, 500 tokens, repetition penalty 1.1, generated ids) is never reused for "
            "the other"
        )
    names = {"npti_protocol": "NPTI protocol", "generation": "generation settings"} | {"pairs": "pair set", "policy": "token policy", "layers": "layer list", "shard_size": "shard size",
             "max_new_tokens": "response length", "tokenization": "tokenization"}
    raise runs_io.ArtifactError(
        f"The capture in {directory} was made with a different {', '.join(names.get(f, f) for f in differing)} "
        f"({details}).{_pairs_change(directory, manifest, new_manifest) if 'pairs' in differing else ''} "
        "Pass --overwrite (overwrite=True) to discard it and start over, or use another --run."
    )


def _pairs_change(directory: Path, manifest: dict[str, Any], new_manifest: dict[str, Any]) -> str:
    """Why the pair set differs, where the records tell: another prompt template (captures made
    before dpnle recorded one used the single-newline template), or another pair sampling."""
    old, new = dict(manifest.get("pairs") or {}), dict(new_manifest.get("pairs") or {})
    if "template" not in old and (directory / PAIRS_FILE).exists():
        with contextlib.suppress(Exception):  # an unreadable old pair file only loses the hint
            old.update({k: v for k, v in pairs_info(pd.read_parquet(directory / PAIRS_FILE)).items()
                        if k == "template"})
    notes = []
    if old.get("template") != new.get("template") and (old.get("template") or new.get("template")):
        stale = " (dpnle's earlier default, stale)" if old.get("template") == LEGACY_TEMPLATE_ID else ""
        notes.append(f"prompt template {old.get('template')!r}{stale} there, {new.get('template')!r} now")
    if old.get("pair_sampling", "dpnle") != new.get("pair_sampling", "dpnle") or (
        old.get("pair_seed") is not None and old.get("pair_seed") != new.get("pair_seed")
    ):
        notes.append(
            f"pair sampling {old.get('pair_sampling', 'dpnle')!r} (seed {old.get('pair_seed')}) there, "
            f"{new.get('pair_sampling')!r} (seed {new.get('pair_seed')}) now"
        )
    return f" The pairs differ in how they were made: {'; '.join(notes)}." if notes else ""


def _remove_temp_files(directory: Path) -> None:
    # runs.atomic_path writes ".<name>.<random>.tmp" next to the target; a kill leaves them behind.
    for tmp in directory.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _clear_capture(directory: Path) -> None:
    """Delete everything in a capture directory but its writer lock (--overwrite)."""
    for entry in directory.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


def _command_line() -> str:
    """This process's command line, as the writer lock records it."""
    argv = list(sys.argv) or ["python"]
    if Path(argv[0]).name in ("dpnle", "__main__.py"):
        argv[0] = "dpnle"
    elif argv[0] == "-c":
        argv[0:1] = ["python", "-c"]
    text = shlex.join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


class _WriterLock:
    """One writer per capture directory: an exclusive ``flock`` on its ``writer.lock``, which
    records the holder's pid and command line. The kernel drops the lock when the holder exits
    or is killed, so a crash never leaves a capture locked. The file stays: deleting it would
    let a third writer lock a new file while the second still holds the old one."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, log: Callable[[str], None]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "no flock on this platform")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            pid = holder.get("pid", "?")
            raise runs_io.ArtifactError(
                f"The capture in {self.path.parent} is being written by another process (pid {pid}: "
                f"{holder.get('command', 'command unknown')}, since {holder.get('since', '?')}); two writers "
                f"would mix their shards, so nothing was changed. Wait for it to finish, or stop it (kill {pid}), "
                "then run this command again."
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            log(
                f"warning: {self.path.parent} is on a file system without file locks ({exc.strerror}): nothing "
                "stops a second collect-activations of this capture while this one runs; run one at a time."
            )
            return
        record = {"pid": os.getpid(), "command": _command_line(), "since": runs_io.now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def _lock_holder(fd: int) -> dict[str, Any]:
    """What the holder wrote into the lock file (it writes right after locking: wait a moment)."""
    for _ in range(20):
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads(os.pread(fd, 4096, 0).decode())
            if isinstance(holder, dict):
                return holder
        time.sleep(0.05)
    return {}


def _verify_pages(path: Path) -> None:
    """Read every page of a Parquet file with its checksum verified, keeping none of it."""
    with pq.ParquetFile(path, page_checksum_verification=True) as parquet:
        for _ in parquet.iter_batches(batch_size=4096):
            pass


def _complete_shard(
    directory: Path, shard: int, key_digest: str, log: Callable[[str], None]
) -> dict[str, Any] | None:
    """The metadata of shard ``shard`` if it and its statistics partial are complete: both exist,
    belong to this capture and read back whole, every page's checksum verified (a damaged page
    can sit under an intact footer). None if the shard must be captured (again); a damaged file
    is reported on one line, not kept."""
    paths = (_stats_shard_path(directory, shard), _shard_path(directory, shard))
    if not all(path.exists() for path in paths):
        return None
    meta: dict[str, Any] = {}
    for path in paths:
        try:
            _verify_pages(path)
            meta = runs_io.parquet_metadata(path)
        except PermissionError:
            raise
        except (pa.ArrowException, OSError, runs_io.ArtifactError) as exc:
            reason = " ".join(str(exc).split())
            log(f"warning: {path} is damaged ({reason}); capturing shard {shard} again.")
            return None
        if meta.get("key_digest") != key_digest or meta.get("shard") != shard:
            raise runs_io.ArtifactError(
                f"{path} belongs to another capture (its key differs from {directory / MANIFEST_FILE}). "
                "Pass --overwrite to start over."
            )
    return meta


def _resumed_batch_size(directory: Path, requested: int | str, recorded: dict[int, int]) -> int | None:
    """The batch size this call must capture with: the one the complete shards were captured with
    (a batch's padding changes the activations in the last bits, so a resume with another size would
    give other statistics than an uninterrupted run), else ``requested`` (None for auto: probe)."""
    sizes = sorted(set(recorded.values()))
    if not sizes:
        return None if requested == "auto" else int(requested)
    if len(sizes) > 1:
        raise runs_io.ArtifactError(
            f"The shards in {directory} were captured with different batch sizes ({sizes}), so their statistics "
            "do not match one run's. Pass --overwrite to capture them again."
        )
    if requested != "auto" and int(requested) != sizes[0]:
        raise runs_io.ArtifactError(
            f"The capture in {directory} was begun with batch size {sizes[0]} ({len(recorded)} shard(s) done), not "
            f"{requested}; the statistics depend on the batch size, so it resumes only with the same one: pass "
            f"--batch-size {sizes[0]} (or auto, which reuses it), or --overwrite to start over."
        )
    return sizes[0]


def _moments_table(
    moments: dict[tuple[str, int], RunningMoments], layers: Sequence[int], width: int,
    token_counts: dict[tuple[str, int], TokenCounts] | None = None,
) -> pa.Table:
    """One row per (pole, layer): n, mean, m2 and pos_frac_sum (float64 lists); with
    ``token_counts``, NPTI's pooled counts too (:func:`_with_token_counts`)."""
    poles, layer_col, counts, means, m2s, pos_sums = [], [], [], [], [], []
    for pole in POLES:
        for layer in layers:
            m = moments[pole, layer]
            poles.append(pole)
            layer_col.append(layer)
            counts.append(m.n)
            means.append(m.mean)
            m2s.append(m.m2)
            pos_sums.append(m.positive_fraction_sum)
    has_pos = any(p is not None for p in pos_sums)
    table = pa.table(
        {
            "pole": pa.array(poles, pa.string()),
            "layer": pa.array(layer_col, pa.int16()),
            "n": pa.array(counts, pa.int64()),
            "mean": _float64_lists(means, width),
            "m2": _float64_lists(m2s, width),
            "pos_frac_sum": _float64_lists(pos_sums, width) if has_pos else pa.nulls(len(poles), pa.list_(pa.float64())),
        }
    )
    return table if token_counts is None else _with_token_counts(table, token_counts, layers, width)


def _with_token_counts(
    table: pa.Table, token_counts: dict[tuple[str, int], TokenCounts], layers: Sequence[int], width: int
) -> pa.Table:
    """``table`` plus NPTI's pooled counts per (pole, layer) row: ``token_count`` (int64),
    ``pos_count`` (list<int64> [width]) and ``hist`` (list<int32|int64> [width * 301], neuron-major)."""
    cells = [token_counts[pole, layer] for pole in POLES for layer in layers]
    hists = [c.hist for c in cells]
    dtype = np.int64 if any(h.dtype == np.int64 for h in hists) else np.int32
    hist_values = np.concatenate([h.astype(dtype, copy=False).reshape(-1) for h in hists])
    pos_values = np.concatenate([c.positive for c in cells])
    offsets = np.arange(len(cells) + 1, dtype=np.int64)
    table = table.append_column("token_count", pa.array([c.tokens for c in cells], pa.int64()))
    table = table.append_column(
        "pos_count", pa.LargeListArray.from_arrays(pa.array(offsets * width), pa.array(pos_values))
    )
    return table.append_column(
        "hist", pa.LargeListArray.from_arrays(pa.array(offsets * width * NPTI_HIST_BINS), pa.array(hist_values))
    )


def _read_token_counts(path: Path, width: int) -> dict[tuple[str, int], TokenCounts] | None:
    """NPTI's pooled counts of a statistics file, or None when it has none (a capture of another
    site or policy, or one made before dpnle kept them)."""
    if "hist" not in pq.read_schema(path).names:
        return None
    table = runs_io.read_parquet_table(path, columns=["pole", "layer", "token_count", "pos_count", "hist"])
    rows = table.num_rows
    pos = table.column("pos_count").combine_chunks().flatten().to_numpy().reshape(rows, width)
    hist = table.column("hist").combine_chunks().flatten().to_numpy().reshape(rows, width, NPTI_HIST_BINS)
    result = {}
    for row, (pole, layer, tokens) in enumerate(
        zip(table.column("pole").to_pylist(), table.column("layer").to_pylist(),
            table.column("token_count").to_pylist(), strict=True)
    ):
        result[pole, int(layer)] = TokenCounts.from_arrays(tokens, pos[row], hist[row])
    return result


def _float64_lists(rows: Sequence[np.ndarray | None], width: int) -> pa.Array:
    """[rows] of [width] float64 vectors as a list<float64> column, without a Python-float detour."""
    values = np.zeros((len(rows), width), dtype=np.float64)
    for i, row in enumerate(rows):
        if row is not None:
            values[i] = row
    offsets = pa.array(np.arange(len(rows) + 1, dtype=np.int32) * width, pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))


def _list_column(table: pa.Table, name: str, width: int) -> np.ndarray | None:
    """A list<float64> column as a [rows, width] array (None when the column is all null)."""
    column = table.column(name).combine_chunks()
    if column.null_count == len(column):
        return None
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float64).reshape(len(column), width)


def _read_moments(path: Path, width: int) -> dict[tuple[str, int], RunningMoments]:
    table = runs_io.read_parquet_table(path)
    if "hist" in table.column_names:  # NPTI's counts are read by _read_token_counts
        table = table.drop_columns(["hist", "pos_count", "token_count"])
    means = _list_column(table, "mean", width)
    m2s = _list_column(table, "m2", width)
    pos = _list_column(table, "pos_frac_sum", width)
    assert means is not None and m2s is not None
    moments = {}
    for row, (pole, layer, n) in enumerate(
        zip(
            table.column("pole").to_pylist(),
            table.column("layer").to_pylist(),
            table.column("n").to_pylist(),
            strict=True,
        )
    ):
        moments[pole, int(layer)] = RunningMoments.from_dict(
            {"n": n, "mean": means[row], "m2": m2s[row], "pos_frac_sum": None if pos is None else pos[row]}
        )
    return moments


def _shard_table(
    samples: pd.DataFrame, layers: Sequence[int], acts16: np.ndarray, pos16: np.ndarray | None,
    responses: Sequence[str] | None,
) -> pa.Table:
    """Rows (sample, layer), sample-major. ``acts16`` is [layers, samples, width] float16."""
    num_layers, num_samples, width = acts16.shape
    flat = np.ascontiguousarray(acts16.transpose(1, 0, 2)).reshape(-1)  # [samples * layers * width]
    columns: dict[str, pa.Array] = {
        "sample_id": pa.array(np.repeat(samples["sample_id"].to_numpy(np.int64), num_layers)),
        "pair_id": pa.array(np.repeat(samples["pair_id"].to_numpy(np.int64), num_layers)),
        "pole": pa.array(np.repeat(samples["pole"].to_numpy(dtype=object), num_layers), pa.string()),
        "layer": pa.array(np.tile(np.asarray(layers, dtype=np.int16), num_samples)),
        "acts": pa.FixedSizeListArray.from_arrays(pa.array(flat), width),
    }
    if pos16 is not None:
        pos_flat = np.ascontiguousarray(pos16.transpose(1, 0, 2)).reshape(-1)
        columns["pos_frac"] = pa.FixedSizeListArray.from_arrays(pa.array(pos_flat), width)
    if responses is not None:
        columns["response"] = pa.array(np.repeat(np.asarray(responses, dtype=object), num_layers), pa.string())
    return pa.table(columns)


# ---------------------------------------------------------------------------------------------
# the stage


def _shard_assignment(encoded: Sequence[_Encoded], shard_size: int) -> list[np.ndarray]:
    """Sample indices per shard: shards take the samples in order of prompt length (longest
    first, ties by sample id), so the batches inside a shard are nearly free of padding, and
    hold them in sample order. Deterministic, so a resumed run rebuilds the same shards."""
    lengths = np.fromiter((len(e.ids) for e in encoded), dtype=np.int64, count=len(encoded))
    order = np.lexsort((np.arange(len(encoded)), -lengths))
    return [np.sort(order[i : i + shard_size]) for i in range(0, len(order), shard_size)]


@dataclass
class _StageContext:
    model: nn.Module
    tokenizer: Any
    recorder: _SiteRecorder
    samples: pd.DataFrame
    prompts: list[str]
    encoded: list[_Encoded]  # the prompts' ids (response-mean adds the responses per shard)
    layers: list[int]
    width: int
    batch_size: int
    max_new_tokens: int
    pad_id: int
    device: torch.device
    directory: Path
    key_digest: str
    tokenization: str = "dpnle"
    npti_protocol: str = "dpnle"  # response-mean: how responses are generated and read (NPTI_PROTOCOLS)
    count_tokens: bool = False  # keep NPTI's pooled counts and histograms (gate site, response-mean)
    engine: Any = None  # a dpnle.engines.VLLMEngine that generates the responses; None: the HF model


def _counting_done(results: Iterator[_BatchResult], recorder: _SiteRecorder) -> Iterator[_BatchResult]:
    """``results``, then (also when the consumer stops early) the recorder's counting switched off."""
    try:
        yield from results
    finally:
        recorder.count_groups = recorder.token_counts = None


def _shard_response_ids(ctx: _StageContext, prompts: Sequence[_Encoded], repetition_penalty: float | None) -> list[list[int]]:
    """Greedy responses (token ids, each up to and including its first end-of-sequence id) to the
    tokenized ``prompts``, from the HF model or, with ``ctx.engine``, from vLLM: the same decoding
    rule on both (greedy, the model's eos ids, the repetition penalty over prompt and response)."""
    if ctx.engine is None:
        return generate_response_ids(ctx.model, ctx.tokenizer, prompts, ctx.max_new_tokens, ctx.batch_size,
                                     repetition_penalty=repetition_penalty, progress=False)
    return ctx.engine.generate_ids([p.ids for p in prompts], max_new_tokens=ctx.max_new_tokens,
                                   repetition_penalty=1.0 if repetition_penalty is None else float(repetition_penalty),
                                   stop_token_ids=sorted(_eos_ids(ctx.model, ctx.tokenizer)))


def _capture_shard(ctx: _StageContext, shard: int, rows: np.ndarray, bar: Progress) -> Callable[[], None]:
    """Capture the samples ``rows`` [shard samples] as shard ``shard``; return the function that
    writes its statistics partial, then its activations (run it on the writer thread)."""
    shard_samples = ctx.samples.iloc[rows]
    policy = ctx.recorder.policy
    responses: list[str] | None = None
    if policy == "response-mean" and ctx.npti_protocol == "reference":
        prompt_ids = [ctx.encoded[i] for i in rows]
        generated = _shard_response_ids(ctx, prompt_ids, NPTI_REFERENCE_GENERATION["repetition_penalty"])
        encoded = [_encode_generated(p, g, ctx.tokenizer.eos_token_id) for p, g in zip(prompt_ids, generated, strict=True)]
        responses = [ctx.tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    elif policy == "response-mean":
        shard_prompts = [ctx.prompts[i] for i in rows]
        if ctx.engine is None:
            responses = generate_responses(
                ctx.model, ctx.tokenizer, shard_prompts, ctx.max_new_tokens, ctx.batch_size, progress=False,
                tokenization=ctx.tokenization,
            )
        else:
            generated = _shard_response_ids(ctx, [ctx.encoded[i] for i in rows], None)
            responses = [ctx.tokenizer.decode(g, skip_special_tokens=True) for g in generated]
        encoded = _encode(ctx.tokenizer, shard_prompts, responses, policy, ctx.tokenization)
    else:
        encoded = [ctx.encoded[i] for i in rows]
    acts16 = np.empty((len(ctx.layers), len(rows), ctx.width), dtype=np.float16)  # [layers, samples, width]
    pos16 = np.empty_like(acts16) if ctx.recorder.track_positive else None
    moments = {(pole, layer): RunningMoments(ctx.width) for pole in POLES for layer in ctx.layers}
    is_high = shard_samples["pole"].to_numpy() == "high"
    counts: dict[tuple[str, int], TokenCounts] | None = None
    if ctx.count_tokens:
        # NPTI's pooled counts: group 0 = high, 1 = low (POLES order), one TokenCounts per layer.
        counts = {(pole, layer): TokenCounts(ctx.width) for pole in POLES for layer in ctx.layers}
        ctx.recorder.count_groups = np.where(is_high, 0, 1)
        ctx.recorder.token_counts = {
            (POLES.index(pole), ctx.layers.index(layer)): c for (pole, layer), c in counts.items()
        }
    tokens = 0
    batch_results = _run_batches(ctx.recorder, ctx.model, encoded, ctx.batch_size, ctx.pad_id, ctx.device)
    for result in _counting_done(batch_results, ctx.recorder):
        high = torch.from_numpy(is_high[result.positions]).to(result.acts.device)
        for slot, layer in enumerate(ctx.layers):
            acts = result.acts[slot]  # [batch, width] float32: statistics before float16 rounding
            fractions = None if result.positive_fraction is None else result.positive_fraction[slot]
            for pole, pole_rows in (("high", high), ("low", ~high)):
                if bool(pole_rows.any()):
                    moments[pole, layer].update(acts[pole_rows], None if fractions is None else fractions[pole_rows])
        acts16[:, result.positions] = result.acts.to(torch.float16).cpu().numpy()
        if pos16 is not None and result.positive_fraction is not None:
            pos16[:, result.positions] = result.positive_fraction.to(torch.float16).cpu().numpy()
        tokens += result.num_tokens
        bar.advance(len(result.positions), tokens=result.num_tokens)

    meta = {
        "kind": "activations-shard",
        "shard": shard,
        "num_samples": len(rows),
        "sample_ids": shard_samples["sample_id"].astype(int).tolist(),
        "key_digest": ctx.key_digest,
        "batch_size": ctx.batch_size,  # a resume must use the same (see _resumed_batch_size)
        "num_tokens": tokens,
        "layers": ctx.layers,
        "width": ctx.width,
    }

    def write() -> None:
        # The partial first: a shard file on disk then always has its statistics next to it.
        runs_io.write_parquet(
            _stats_shard_path(ctx.directory, shard),
            _moments_table(moments, ctx.layers, ctx.width, counts),
            metadata={**meta, "kind": "stats-shard"},
        )
        runs_io.write_parquet(
            _shard_path(ctx.directory, shard),
            _shard_table(shard_samples, ctx.layers, acts16, pos16, responses),
            metadata=meta,
        )

    return write


def _model_dtype(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


@dataclass
class _CapturePlan:
    """One capture, decided before anything is written: its samples and their token ids, the
    shards they fall into, the key a resume must match, and the manifest that records it all."""

    directory: Path
    arch: Architecture
    layers: list[int]
    width: int
    samples: pd.DataFrame
    prompts: list[str]
    encoded: list[_Encoded]
    shards: list[np.ndarray]
    key: dict[str, Any]
    key_digest: str
    manifest: dict[str, Any]
    max_new_tokens: int
    count_tokens: bool  # NPTI's pooled counts and histograms (gate site, response-mean)

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_FILE

    def write_manifest(self) -> None:
        runs_io.write_json(self.manifest_path, self.manifest)


def _capture_samples(pairs: pd.DataFrame, concept: str, npti_protocol: str) -> pd.DataFrame:
    """One row per (pair, pole); under NPTI's reference protocol the message is NPTI's prompt
    around the side's persona description and the pair's question."""
    samples = to_samples(pairs)
    if samples.empty:
        raise runs_io.InputError(
            f"The pair set for {concept!r} is empty; make pairs with `dpnle data pairs` first."
        )
    if npti_protocol != "reference":
        return samples
    if (samples["response_prefix"].astype(str) != "").any():
        raise runs_io.InputError(
            "--npti-protocol reference generates from NPTI's persona prompt, which has no response prefix; "
            "use pairs of the personalitybench or values recipe."
        )
    question_of = dict(zip(pairs["pair_id"].to_numpy().tolist(), pairs["question"].astype(str), strict=True))
    return samples.assign(message=[
        npti_message(str(m), question_of[int(p)]) for m, p in zip(samples["message"], samples["pair_id"], strict=True)
    ])


def _capture_key(
    fingerprint: dict[str, Any], pairs: pd.DataFrame, site: str, policy: str, layers: list[int], shard_size: int,
    max_new_tokens: int, npti_protocol: str, tokenization: str,
) -> dict[str, Any]:
    """Everything a captured shard depends on: a resume continues only a capture with this key."""
    key: dict[str, Any] = {
        "model": fingerprint.get("digest"),
        "pairs": pairs_digest(pairs),
        "site": site,
        "policy": policy,
        "layers": layers,
        "shard_size": shard_size,
    }
    if policy == "response-mean":
        key["max_new_tokens"] = max_new_tokens
        if npti_protocol != "dpnle":  # absent for the default, so captures made before the option stay valid
            key["npti_protocol"] = npti_protocol
            key["generation"] = generation_settings(npti_protocol, max_new_tokens)
    if tokenization != "dpnle":  # absent for the default, so captures made before the option stay valid
        key["tokenization"] = tokenization
    return key


def _plan_capture(
    run: runs_io.Run, loaded: Any, concept: str, pairs: pd.DataFrame, *, site: str, policy: str,
    layers: Sequence[int] | None, batch_size: int | str, shard_size: int, max_new_tokens: int | None,
    npti_protocol: str, tokenization: str, engine: Any = None,
) -> _CapturePlan:
    """Check the options against the model, encode the prompts and write down (in memory) the key
    and manifest of the capture; nothing on disk changes."""
    check_npti_protocol(npti_protocol, policy)
    if engine is not None and policy != "response-mean":
        raise runs_io.InputError(
            f"An engine generates responses, and --policy {policy} generates none: drop --engine, or capture "
            "--policy response-mean."
        )
    max_new_tokens = resolve_max_new_tokens(max_new_tokens, npti_protocol)
    check_options(site, policy, batch_size, shard_size, max_new_tokens, tokenization)
    model, tokenizer = loaded.model, loaded.tokenizer
    arch = architecture(model)
    layer_list = _normalize_layers(layers, arch.num_layers)
    width = arch.width(site)
    arch.module_for(site, layer_list[0])  # fail now, not after writing a manifest, if the site is missing
    fingerprint = loaded.fingerprint
    if not fingerprint:
        from dpnle.models import model_fingerprint

        fingerprint = model_fingerprint(model, tokenizer, loaded.model_id)
    samples = _capture_samples(pairs, concept, npti_protocol)
    count_tokens = site == "gate" and policy == "response-mean"
    key = _capture_key(fingerprint, pairs, site, policy, layer_list, shard_size, max_new_tokens, npti_protocol,
                       tokenization)
    if engine is not None:  # absent for HF generate, so captures made before engines existed stay valid
        key["engine"] = engine.settings()
    key_digest = _key_digest(key)
    responses = policy == "response-mean"
    manifest: dict[str, Any] = {
        "kind": "activations",
        "concept": concept,
        "site": site,
        "policy": policy,
        "layers": layer_list,
        "width": width,
        "model": {"id": loaded.model_id, "fingerprint": fingerprint},
        "pairs": {
            "digest": key["pairs"],
            "num_pairs": int(len(pairs)),
            "recipe": str(pairs["recipe"].iloc[0]) if "recipe" in pairs else None,
            **pairs_info(pairs),  # template, pair_sampling, pair_seed, questions
        },
        "tokenization": tokenization,
        "dtype": _model_dtype(model),
        "batch_size": batch_size,
        "shard_size": shard_size,
        "shard_order": "by prompt length, longest first; samples in sample order within a shard",
        "num_samples": int(len(samples)),
        "max_new_tokens": max_new_tokens if responses else None,
        "npti_protocol": npti_protocol if responses else None,
        "generation": generation_settings(npti_protocol, max_new_tokens) if responses else None,
        "engine": engine.settings() if engine is not None else ({"engine": "hf"} if responses else None),
        "token_counts": (
            "NPTI's pooled counts per (pole, layer): token_count, pos_count (act > 0), hist (301 bins: "
            "-inf, 0, 0.01, ..., 2.99, +inf; bucketize right=False minus 1) over the reduced tokens"
        ) if count_tokens else None,
        "key": key,
        "key_digest": key_digest,
        "versions": runs_io.software_versions(),
        "created": runs_io.now(),
        "status": "running",
    }
    prompts = [
        render_prompt(tokenizer, message, prefix)
        for message, prefix in zip(samples["message"], samples["response_prefix"], strict=True)
    ]
    encoded = _encode(tokenizer, prompts, tokenization=tokenization)
    return _CapturePlan(
        directory=capture_dir(run, concept, site, policy), arch=arch, layers=layer_list, width=width,
        samples=samples, prompts=prompts, encoded=encoded, shards=_shard_assignment(encoded, shard_size), key=key,
        key_digest=key_digest, manifest=manifest, max_new_tokens=max_new_tokens, count_tokens=count_tokens,
    )


def _prepare_directory(
    plan: _CapturePlan, pairs: pd.DataFrame, lock: _WriterLock, *, overwrite: bool, batch_size: int | str,
    log: Callable[[str], None],
) -> tuple[list[int], int | None]:
    """Lock, check and set up the capture directory; return the shards to capture and the batch
    size to capture them with (None: probe). The lock stays held unless this raises."""
    directory = plan.directory
    lock.acquire(log)  # before anything in the directory changes
    try:
        legacy_size = None
        if overwrite:
            _clear_capture(directory)
        if plan.manifest_path.exists():
            existing = runs_io.read_json(plan.manifest_path)
            _check_key(directory, existing, plan.key, plan.manifest)
            plan.manifest["created"] = existing.get("created", plan.manifest["created"])
            legacy_size = existing.get("batch_size")  # for shards written before shards recorded theirs
        elif any(directory.glob("*shard-*.parquet")):
            raise runs_io.ArtifactError(
                f"{directory} holds shards but no {MANIFEST_FILE}, so they cannot be checked against this "
                "capture. Pass --overwrite to discard them and start over."
            )
        _remove_temp_files(directory)
        todo, recorded = [], {}
        for shard in range(len(plan.shards)):
            meta = _complete_shard(directory, shard, plan.key_digest, log)
            if meta is None:
                todo.append(shard)
            elif isinstance(size := meta.get("batch_size", legacy_size), int):
                recorded[shard] = size
        size = _resumed_batch_size(directory, batch_size, recorded)
        plan.manifest["batch_size"] = batch_size if size is None else size
        plan.write_manifest()
        if not (directory / PAIRS_FILE).exists():
            runs_io.write_parquet(
                directory / PAIRS_FILE, pairs,
                metadata={"kind": "pairs", "digest": plan.key["pairs"], **pairs_info(pairs)},
            )
        return todo, size
    except BaseException:
        lock.release()
        raise


def _agreed_batch_size(
    plan: _CapturePlan, recorder: _SiteRecorder, model: nn.Module, mine: Sequence[int], pad_id: int,
    device: torch.device, workers: Workers,
) -> int:
    """"auto" with nothing captured yet: the main process probes for every process (its share
    starts with the longest missing shard); the manifest and every shard record the size, and a
    resume reuses it."""

    def probe() -> int:
        probe_set = [plan.encoded[i] for s in mine for i in plan.shards[s]]
        extra = plan.max_new_tokens if recorder.policy == "response-mean" else 0
        return _resolve_batch_size("auto", recorder, model, probe_set, pad_id, device, extra_tokens=extra)

    size = workers.from_main(workers.main_first(probe if workers.is_main else lambda: None))
    plan.manifest["batch_size"] = size
    if workers.is_main:
        plan.write_manifest()
    return size


def _capture_shards(
    plan: _CapturePlan, loaded: Any, mine: Sequence[int], fixed_size: int | None, *, site: str, policy: str,
    npti_protocol: str, tokenization: str, workers: Workers, progress: Callable[[], Progress], engine: Any = None,
) -> None:
    """Capture this process's shards ``mine``, each written (statistics partial, then
    activations) by a writer thread while the device captures the next one; ``progress`` makes
    the bar (opened once the batch size is known)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    device = input_device(model)
    pad_id = pad_token_id(tokenizer)
    with _SiteRecorder(plan.arch, site, policy, plan.layers) as recorder:
        size = fixed_size
        if size is None:
            size = _agreed_batch_size(plan, recorder, model, mine, pad_id, device, workers)
        if not mine:
            return
        ctx = _StageContext(
            model=model, tokenizer=tokenizer, recorder=recorder, samples=plan.samples, prompts=plan.prompts,
            encoded=plan.encoded, layers=plan.layers, width=plan.width, batch_size=size,
            max_new_tokens=plan.max_new_tokens, pad_id=pad_id, device=device, directory=plan.directory,
            key_digest=plan.key_digest, tokenization=tokenization, npti_protocol=npti_protocol,
            count_tokens=plan.count_tokens, engine=engine,
        )
        # At most one write is pending, so host memory holds two shards at most; leaving the
        # block waits for the last write.
        pending: Future[None] | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpnle-shard-writer") as writer, progress() as bar:
            for shard in mine:
                write = _capture_shard(ctx, shard, plan.shards[shard], bar)
                if pending is not None:
                    pending.result()
                pending = writer.submit(write)
            if pending is not None:
                pending.result()


def _merge_shards(plan: _CapturePlan, concept: str) -> int:
    """Merge every shard's partial statistics, in shard order, into ``stats.parquet``; return
    the number of tokens captured."""
    width, layers = plan.width, plan.layers
    num_tokens = 0
    total = {(pole, layer): RunningMoments(width) for pole in POLES for layer in layers}
    total_counts: dict[tuple[str, int], TokenCounts] | None = (
        {(pole, layer): TokenCounts(width) for pole in POLES for layer in layers} if plan.count_tokens else None
    )
    # Shard order, always: the same partials merged in the same order give the same bits.
    for shard in range(len(plan.shards)):
        num_tokens += int(runs_io.parquet_metadata(_shard_path(plan.directory, shard)).get("num_tokens", 0))
        stats_path = _stats_shard_path(plan.directory, shard)
        for cell, partial in _read_moments(stats_path, width).items():
            total[cell].merge(partial)
        # NPTI's pooled counts: summed over shards; absent if any shard lacks them (one captured
        # before dpnle kept them), so that no statistic covers only part of the samples.
        if total_counts is not None:
            shard_counts = _read_token_counts(stats_path, width)
            if shard_counts is None:
                total_counts = None
                plan.manifest["token_counts"] = None
            else:
                for cell, partial_counts in shard_counts.items():
                    total_counts[cell].merge(partial_counts)
    runs_io.write_parquet(
        plan.directory / STATS_FILE,
        _moments_table(total, layers, width, total_counts),
        metadata={"kind": "stats", "concept": concept, "key_digest": plan.key_digest, "num_shards": len(plan.shards)},
    )
    return num_tokens


def collect_concept(
    run: runs_io.Run,
    loaded: Any,
    concept: str,
    *,
    pairs: pd.DataFrame,
    site: str = "mlp",
    policy: str = "last",
    layers: Sequence[int] | None = None,
    batch_size: int | str = "auto",
    shard_size: int = 256,
    overwrite: bool = False,
    max_new_tokens: int | None = None,
    npti_protocol: str = "dpnle",
    progress: bool = True,
    workers: Workers | None = None,
    log: Callable[[str], None] | None = None,
    tokenization: str = "dpnle",
    engine: Any = None,
) -> CaptureSummary:
    """Capture ``concept``'s pairs into ``capture_dir(run, concept, site, policy)``, continuing
    a capture that was interrupted.

    Writes ``manifest.json``, ``pairs.parquet``, per shard ``stats-shard-NNNNN.parquet`` (the
    shard's float64 moments per (pole, layer)) and ``shard-NNNNN.parquet`` (float16
    activations, one row per (sample, layer)), and finally ``stats.parquet``: the shard
    partials merged in shard order, so a resumed capture's statistics equal a clean one's bit
    for bit. A shard holds ``shard_size`` samples of similar prompt length (see
    :func:`_shard_assignment`); ``load_activations`` returns them in sample order.

    One writer at a time: the main process holds ``writer.lock`` (an OS file lock, dropped when
    it exits) from before it changes anything in the directory (``overwrite``'s deletion
    included) until the statistics are merged; a second writer is refused. A resume keeps only
    shards that read back whole (every page's checksum verified), and captures with the batch
    size of the shards it keeps ("auto" reuses it; another size is refused), so its statistics
    equal an uninterrupted run's. ``log`` gets one-line notices (default: stderr).

    Data parallel: under ``accelerate launch`` (``workers`` with ``world > 1``) the main process
    checks and prepares the directory, every process captures every ``world``-th missing shard
    on its own device, and the main process merges all partials in shard order, so the
    statistics equal a one-process capture's bit for bit.

    ``tokenization`` (see :func:`_encode`) is recorded in the manifest and, when not dpnle's
    default, in the capture key, so a capture begun in one mode is never resumed in the other.
    The manifest's ``pairs`` also records how the pairs were made (prompt template, pair sampling
    and its seed, question source; :func:`dpnle.pairs.pairs_info`).

    ``engine`` (a :class:`dpnle.engines.VLLMEngine`, ``policy="response-mean"`` only) generates the
    responses on vLLM, as NPTI's own code does; the activations are still read by the HF model in
    a teacher-forced pass. The engine is in the capture key: a capture begun on one engine is never
    resumed on the other. One process only (vLLM splits a model over GPUs itself).
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    start = time.perf_counter()
    workers = workers or Workers()
    if engine is not None and workers.distributed:
        raise runs_io.InputError("A capture whose responses vLLM generates runs in one process: drop --num-processes "
                                 "(vLLM splits a model over GPUs with --tensor-parallel-size).")
    plan = _plan_capture(
        run, loaded, concept, pairs, site=site, policy=policy, layers=layers, batch_size=batch_size,
        shard_size=shard_size, max_new_tokens=max_new_tokens, npti_protocol=npti_protocol, tokenization=tokenization,
        engine=engine,
    )
    shards = plan.shards
    lock = _WriterLock(plan.directory)

    def prepare() -> tuple[list[int], int | None]:
        return _prepare_directory(plan, pairs, lock, overwrite=overwrite, batch_size=batch_size, log=log)

    # The main process alone touches the directory before the capture; its errors reach every process.
    prepared = workers.main_first(prepare if workers.is_main else lambda: None)
    stage_params = {"site": site, "policy": policy, "layers": plan.layers, "path": str(plan.directory)}
    try:
        todo, fixed_size = workers.from_main(prepared)
        resumed_from = sum(len(shards[s]) for s in range(len(shards)) if s not in set(todo))
        mine = workers.share(todo)
        if workers.is_main:
            run.record_stage("collect", concept, "running", **stage_params)
        if todo:
            label = f"{concept} {site}/{policy}"
            if workers.distributed:
                label += f" [process {workers.rank + 1}/{workers.world}]"
            total = sum(len(shards[s]) for s in mine) if workers.distributed else len(plan.samples)

            def bar() -> Progress:
                # One process: resumed samples count toward the bar at once, not toward the rates.
                return Progress(label, total, enabled=progress and workers.is_main,
                                done=0 if workers.distributed else resumed_from)

            _capture_shards(plan, loaded, mine, fixed_size, site=site, policy=policy, npti_protocol=npti_protocol,
                            tokenization=tokenization, workers=workers, progress=bar, engine=engine)
        workers.barrier()  # every shard is on disk
        if not workers.is_main:
            captured = sum(len(shards[s]) for s in mine)
            return CaptureSummary(concept, site, policy, captured, 0, time.perf_counter() - start, plan.directory,
                                  resumed_from)
        num_tokens = _merge_shards(plan, concept)
        plan.manifest.update(status="done", finished=runs_io.now(), num_tokens=num_tokens, num_processes=workers.world)
        plan.write_manifest()
    except BaseException as exc:
        if workers.is_main:
            run.record_stage("collect", concept, "failed", error=f"{type(exc).__name__}: {exc}", **stage_params)
        raise
    finally:
        lock.release()
    seconds = time.perf_counter() - start
    run.record_stage(
        "collect", concept, "done", num_samples=int(len(plan.samples)), num_tokens=num_tokens,
        seconds=round(seconds, 3), resumed_from=resumed_from, **stage_params,
    )
    return CaptureSummary(concept, site, policy, int(len(plan.samples)), num_tokens, seconds, plan.directory,
                          resumed_from)


# ---------------------------------------------------------------------------------------------
# readers


def load_stats(run: runs_io.Run, concept: str, site: str = "mlp", policy: str = "last") -> LayerStats:
    """The merged statistics of a capture: means, unbiased variances and counts per pole."""
    directory = capture_dir(run, concept, site, policy)
    path = directory / STATS_FILE
    if not path.exists():
        raise runs_io.ArtifactError(
            f"No activation statistics for {concept!r} ({site}/{policy}) in run {run.name}: {path} is missing. "
            f"Run `{_collect_command(run, concept, site, policy)}` first."
        )
    fix = (
        f"Delete it and run `{_collect_command(run, concept, site, policy)}` (with the run's --model and "
        "options): complete shards are kept and the statistics rebuilt from them."
    )
    try:
        manifest = runs_io.read_json(directory / MANIFEST_FILE)
        width = int(manifest["width"])
    except (runs_io.ArtifactError, KeyError, TypeError, ValueError) as exc:
        raise runs_io.ArtifactError(
            f"The capture manifest {directory / MANIFEST_FILE} is unreadable or incomplete ({exc}). "
            f"Re-run `{_collect_command(run, concept, site, policy)} --overwrite`."
        ) from None
    try:
        moments = _read_moments(path, width)
    except runs_io.ArtifactError as exc:
        raise runs_io.ArtifactError(f"{exc} For statistics: {fix}") from None
    except (KeyError, ValueError, TypeError, AssertionError, pa.ArrowException) as exc:
        raise runs_io.ArtifactError(
            f"{path} does not hold a capture's statistics ({type(exc).__name__}: {exc}). {fix}"
        ) from None
    layers = sorted({layer for _, layer in moments})
    if not layers or any((pole, layer) not in moments for pole in POLES for layer in layers):
        raise runs_io.ArtifactError(f"{path} lacks the high or low statistics of some layer. {fix}")
    stats = stats_from_moments(moments, concept=concept, site=site, policy=policy, meta=manifest)
    return dataclasses.replace(stats, **_token_count_fields(path, width, layers, fix))


def _token_count_fields(path: Path, width: int, layers: Sequence[int], fix: str) -> dict[str, Any]:
    """LayerStats' NPTI fields (pos_count_*, token_count_*, hist_*) from a statistics file; none
    (the fields stay None) when it holds no pooled counts."""
    try:
        counts = _read_token_counts(path, width)
    except (KeyError, ValueError, TypeError, pa.ArrowException) as exc:
        raise runs_io.ArtifactError(
            f"{path} holds unreadable NPTI token counts ({type(exc).__name__}: {exc}). {fix}"
        ) from None
    if counts is None:
        return {}
    if any((pole, layer) not in counts for pole in POLES for layer in layers):
        raise runs_io.ArtifactError(f"{path} lacks the NPTI token counts of some layer. {fix}")
    fields: dict[str, Any] = {}
    for pole in POLES:
        cells = [counts[pole, layer] for layer in layers]
        fields[f"pos_count_{pole}"] = np.stack([c.positive for c in cells])
        fields[f"token_count_{pole}"] = np.array([c.tokens for c in cells], dtype=np.int64)
        fields[f"hist_{pole}"] = np.stack([c.hist for c in cells])
    return fields


def load_activations(
    run: runs_io.Run,
    concept: str,
    site: str = "mlp",
    policy: str = "last",
    layers: Sequence[int] | None = None,
) -> tuple[pd.DataFrame, dict[int, np.ndarray]]:
    """The stored per-sample activations: a samples table (sample_id, pair_id, pole) sorted by
    sample_id, and per layer a [n_samples, width] float32 array (from the float16 shards)."""
    directory = capture_dir(run, concept, site, policy)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.exists():
        raise runs_io.ArtifactError(
            f"No activations for {concept!r} ({site}/{policy}) in run {run.name}: {directory} holds no capture. "
            f"Run `{_collect_command(run, concept, site, policy)}` first."
        )
    manifest = runs_io.read_json(manifest_path)
    if manifest.get("status") != "done":
        raise runs_io.ArtifactError(
            f"The capture in {directory} is incomplete (status {manifest.get('status')!r}). "
            f"Run `{_collect_command(run, concept, site, policy)}` again to finish it."
        )
    width = int(manifest["width"])
    captured = list(manifest["layers"])
    num_layers = manifest.get("model", {}).get("fingerprint", {}).get("num_layers") or max(captured) + 1
    wanted = captured if layers is None else _normalize_layers(layers, int(num_layers))
    missing = sorted(set(wanted) - set(captured))
    if missing:
        raise runs_io.ArtifactError(
            f"Layers {missing} were not captured for {concept!r} ({site}/{policy}); captured: {captured}."
        )
    num_shards = -(-int(manifest["num_samples"]) // int(manifest["shard_size"]))
    columns = ["sample_id", "pair_id", "pole", "layer", "acts"]
    table = pa.concat_tables(
        # Keep only the wanted layers before anything is converted.
        runs_io.read_parquet_table(_shard_path(directory, s), columns=columns).filter(
            pc.is_in(pc.field("layer"), pa.array(wanted, pa.int16()))
        )
        for s in range(num_shards)
    )
    layer_col = table.column("layer").to_numpy()
    sample_ids = table.column("sample_id").to_numpy()
    acts = table.column("acts").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    first = layer_col == wanted[0]
    order = np.argsort(sample_ids[first], kind="stable")
    samples = pd.DataFrame(
        {
            "sample_id": sample_ids[first][order],
            "pair_id": table.column("pair_id").to_numpy()[first][order],
            "pole": np.asarray(table.column("pole").to_pylist(), dtype=object)[first][order],
        }
    )
    per_layer: dict[int, np.ndarray] = {}
    for layer in wanted:
        rows = layer_col == layer
        layer_order = np.argsort(sample_ids[rows], kind="stable")
        if not np.array_equal(sample_ids[rows][layer_order], samples["sample_id"].to_numpy()):
            raise runs_io.ArtifactError(
                f"The shards in {directory} do not hold layer {layer} for every sample; they are damaged. "
                f"Re-run `{_collect_command(run, concept, site, policy)} --overwrite`."
            )
        per_layer[layer] = acts[rows][layer_order].astype(np.float32)
    return samples, per_layer
