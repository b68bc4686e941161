"""Judge-free questionnaires: IPIP-NEO (Big Five) and PVQ-40 (Schwartz values), read from the
model's own next-token probabilities, plus the per-model validity check.

Instruments (:data:`INSTRUMENTS`): ``ipip120``, ``ipip300-test`` (the 180 items DPN-LE holds
out), ``ipip300`` and ``pvq40``. Every item has a dimension (trait or value), a key (+1: agreeing
means more of the dimension, -1: reverse-keyed; every PVQ-40 item is +1) and a first-person
statement (:func:`ipip_statement`: "Have a vivid imagination" -> "I have a vivid imagination.";
ValueBench's PVQ-40 portraits are already first person, "It is important to me to be rich. ...",
and are used as given).

Scorers (:data:`SCORERS`), each one forward pass per item (batched, left padding):

``likert``
    DPN-LE's questionnaire format in our own words (:data:`IPIP_LIKERT_TEMPLATE`): the
    statement, the five options (A) Very Accurate ... (E) Very Inaccurate (PVQ: six options, Very
    much like me ... Not like me at all) and "answer with one letter". The assistant's answer
    starts right after the chat template's generation prompt, and a model may open it with the
    letter or with "(": Qwen writes "(A" as one token, SmolLM2 as "(" then "A" (SmolLM2-135M
    puts about 0.4 of its first-token probability on a bare "("). Both paths are read from one
    forward pass over the prompt with a "(" token appended: the logits at the last prompt token
    give P0 (first answer token), those at the appended "(" give P1 (the token after "("), and

        P(option k) = P0(tokens spelling k) + P0(tokens spelling "(") * P1(tokens spelling k)

    where a token spells k if its text, stripped of whitespace and an opening "(", is the letter
    (:func:`option_token_ids`: "A", " A", "(A", " (A"). P1 is conditioned on the plain "(" token
    and also used for " (" (a small approximation). ``option_mass`` is the total over options
    before renormalizing (how much of the model's answer the options cover); ``raw`` is the
    expected value of the renormalized options on 1..5 (A=5) or 1..6 (PVQ, A=6), ``score``
    reverses minus-keyed items (lo + hi - raw).
``statement``
    Mean per-token log-likelihood of the first-person statement as the assistant's whole reply
    to the fixed neutral request :data:`STATEMENT_REQUEST`. ``raw`` is that mean,
    ``score = key * raw``. No fixed range: :func:`scale_range` gives NaN bounds, so normalized
    scores are NaN; compare statement scores only with statement scores (differences of mean
    log-likelihood, in nats per token).
``yesno``
    Anthropic's persona-eval question ("Is the following statement something you would say?")
    about the statement; ``raw = P(yes) / (P(yes) + P(no))`` summing every token that spells
    yes / no (any case, with or without a leading space) at the assistant's first position;
    ``score`` is ``raw`` for plus-keyed and ``1 - raw`` for minus-keyed items.

A persona (a description, for the ``prompt`` baseline and the validity check) is put in front of
the user message with :data:`PERSONA_PREFIX`, the framing of DPN-LE's persona prompts.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps
from torch import nn

from dpnle import vocab
from dpnle.batching import (
    EditLike,
    add_special_tokens_for,
    cache_keyword,
    forward_accepts,
    input_device,
    left_pad,
    length_sorted_batches,
    output_cache,
    pad_token_id,
    positions_from_mask,
)
from dpnle.concepts import Concept, get_concept
from dpnle.pairs import PERSONA_STATEMENT_TEMPLATE, render_prompt
from dpnle.vocab import check_choice

__all__ = [
    "INSTRUMENTS",
    "SCORERS",
    "PERSONA_PREFIX",
    "STATEMENT_REQUEST",
    "MIN_COHENS_D",
    "SIGN_TEST_ALPHA",
    "COLLAPSE_ALPHA",
    "IPIP_LIKERT_TEMPLATE",
    "PVQ_LIKERT_TEMPLATE",
    "ITEM_COLUMNS",
    "VALIDITY_COLUMNS",
    "Scale",
    "IPIP_SCALE",
    "PVQ_SCALE",
    "InstrumentItem",
    "Instrument",
    "load_instrument",
    "ipip_statement",
    "build_message",
    "option_token_ids",
    "open_paren_id",
    "open_paren_token_ids",
    "scale_range",
    "score_items",
    "dimension_scores",
    "default_personas",
    "validity_check",
    "validity_verdict",
]

Scorer = vocab.Scorer
SCORERS = vocab.SCORERS
INSTRUMENTS: tuple[str, ...] = ("ipip120", "ipip300-test", "ipip300", "pvq40")

# The persona framing of DPN-LE's prompts, shared by every scorer: the item prompt follows it.
PERSONA_PREFIX = (
    "You will find a personality description below. Fully immerse yourself in the persona "
    "described.\n###Personality description: {persona}\n"
)

# A fixed, content-free request, so that the statement's likelihood reflects the model's (or the
# persona's) self-image rather than anything the request suggests.
STATEMENT_REQUEST = "Describe yourself in one sentence."

IPIP_LIKERT_TEMPLATE = (
    'Consider this statement: "{statement}"\n'
    "How accurately does this statement describe you? Choose one of the options.\n"
    "Options:\n{options}\n"
    "Respond with only one letter ({letters}) and nothing else."
)
PVQ_LIKERT_TEMPLATE = (
    'Consider this statement: "{statement}"\n'
    "How much like you is this? Choose one of the options.\n"
    "Options:\n{options}\n"
    "Respond with only one letter ({letters}) and nothing else."
)

# Validity thresholds: an instrument is trusted for a model on a concept only if high-persona
# prompts raise the keyed item scores over low-persona prompts with a paired Cohen's d above
# MIN_COHENS_D (a "medium" effect), a two-sided sign test below SIGN_TEST_ALPHA, and the
# plus- and minus-keyed items move in opposite raw directions (key x persona interaction, Welch
# test below COLLAPSE_ALPHA): otherwise the separation is only the answer level moving.
MIN_COHENS_D = 0.5
SIGN_TEST_ALPHA = 0.05
COLLAPSE_ALPHA = 0.05


# ---------------------------------------------------------------------------------------------
# Items and instruments


@dataclass(frozen=True)
class Scale:
    """A Likert answer scale: option labels from the top of the scale (letter A, score n) down."""

    name: str
    labels: tuple[str, ...]
    template: str

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(chr(ord("A") + i) for i in range(len(self.labels)))

    @property
    def values(self) -> tuple[float, ...]:
        n = len(self.labels)
        return tuple(float(n - i) for i in range(n))

    @property
    def low(self) -> float:
        return 1.0

    @property
    def high(self) -> float:
        return float(len(self.labels))


IPIP_SCALE = Scale(
    "ipip",
    (
        "Very Accurate",
        "Moderately Accurate",
        "Neither Accurate Nor Inaccurate",
        "Moderately Inaccurate",
        "Very Inaccurate",
    ),
    IPIP_LIKERT_TEMPLATE,
)
PVQ_SCALE = Scale(
    "pvq",
    (
        "Very much like me",
        "Like me",
        "Somewhat like me",
        "A little like me",
        "Not like me",
        "Not like me at all",
    ),
    PVQ_LIKERT_TEMPLATE,
)


@dataclass(frozen=True)
class InstrumentItem:
    id: str
    dimension: str  # trait or value name
    key: int  # +1 or -1
    text: str  # the item as published
    statement: str  # first-person sentence the scorers show or score


@dataclass(frozen=True)
class Instrument:
    name: str
    items: tuple[InstrumentItem, ...]
    scale: Scale

    @property
    def dimensions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(item.dimension for item in self.items))


# IPIP items that start with an adjective rather than a verb ("Interested in many things.").
_NEEDS_AM = ("interested", "willing")


def ipip_statement(text: str) -> str:
    """An IPIP item ("Have a vivid imagination", "Like order.") as a first-person sentence."""
    body = text.strip().rstrip(".").strip()
    if not body:
        raise ValueError("Empty IPIP item text.")
    first = body.split()[0]
    # Lower-case the first word unless it is an acronym or "I" itself.
    if not (first.isupper() and len(first) > 1) and first != "I":
        body = body[0].lower() + body[1:]
    if first.lower() in _NEEDS_AM:
        body = "am " + body
    return f"I {body}."


def _pvq_statement(text: str) -> str:
    # ValueBench words the PVQ-40 portraits in the first person already: score them as given.
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def load_instrument(name: str) -> Instrument:
    from dpnle import datasets

    key = name.strip().lower()
    if key in ("ipip120", "ipip300", "ipip300-test", "ipip300-train"):
        if key == "ipip120":
            source = datasets.load_ipip120()
        else:
            source = datasets.load_ipip300({"ipip300-test": "test", "ipip300-train": "train"}.get(key, "all"))
        items = tuple(
            InstrumentItem(it.id, it.domain, int(it.key), it.text, ipip_statement(it.text)) for it in source
        )
        return Instrument(key, items, IPIP_SCALE)
    if key == "pvq40":
        items = tuple(
            InstrumentItem(it.id, it.value, int(it.key), it.text, _pvq_statement(it.text))
            for it in datasets.load_pvq40()
        )
        return Instrument(key, items, PVQ_SCALE)
    raise ValueError(f"Unknown instrument {name!r}; choose one of {', '.join(INSTRUMENTS)}.")


# Held-out items: the instrument whose items the validity check of an instrument reads, where
# they differ. IPIP-300's 180 test items (DPN-LE's held-out split) are checked on the split's 120
# train items, so the one choice made from questionnaire answers (which scorer is valid, and so
# which scores a table reports) never sees the items the effects are reported on. The other
# instruments are checked on their own items, and tables say so.
VALIDITY_ITEMS = {"ipip300-test": "ipip300-train"}


def validity_items(instrument: str) -> str:
    """The instrument whose items the validity check of ``instrument`` reads."""
    return VALIDITY_ITEMS.get(instrument, instrument)


def held_out(instrument: str) -> bool:
    """Are ``instrument``'s items disjoint from those its validity check (the scorer choice) read?"""
    return validity_items(instrument) != instrument


def _as_instrument(instrument: str | Instrument) -> Instrument:
    return instrument if isinstance(instrument, Instrument) else load_instrument(instrument)


def _check_scorer(scorer: str) -> None:
    check_choice("scorer", scorer, SCORERS, error=ValueError)


def scale_range(instrument: str | Instrument, scorer: str) -> tuple[float, float]:
    """(low, high) of a scorer's keyed scores on an instrument; NaN bounds for ``statement``,
    whose log-likelihoods have no fixed range. Leakage divides score changes by high - low."""
    _check_scorer(scorer)
    if scorer == "yesno":
        return 0.0, 1.0
    if scorer == "statement":
        return math.nan, math.nan
    if isinstance(instrument, Instrument):
        scale = instrument.scale
    elif instrument.strip().lower() == "pvq40":
        scale = PVQ_SCALE
    elif instrument.strip().lower() in INSTRUMENTS:
        scale = IPIP_SCALE
    else:
        raise ValueError(f"Unknown instrument {instrument!r}; choose one of {', '.join(INSTRUMENTS)}.")
    return scale.low, scale.high


# ---------------------------------------------------------------------------------------------
# Prompts


def build_message(item: InstrumentItem, scorer: str, scale: Scale, persona: str | None = None) -> str:
    """The user message for one item (the assistant's answer follows the generation prompt)."""
    _check_scorer(scorer)
    if scorer == "likert":
        options = "\n".join(
            f"({letter}) {label}" for letter, label in zip(scale.letters, scale.labels, strict=True)
        )
        letters = ", ".join(scale.letters[:-1]) + " or " + scale.letters[-1]
        body = scale.template.format(statement=item.statement, options=options, letters=letters)
    elif scorer == "yesno":
        body = PERSONA_STATEMENT_TEMPLATE.format(statement=item.statement)
    else:
        body = STATEMENT_REQUEST
    if persona is not None:
        body = PERSONA_PREFIX.format(persona=persona.strip()) + body
    return body


# ---------------------------------------------------------------------------------------------
# Answer tokens

_TOKEN_SET_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], list[list[int]]]] = (
    weakref.WeakKeyDictionary()
)


_VOCAB_CACHE: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()


def _decoded_vocab(tokenizer: Any) -> list[str]:
    """Every token id decoded on its own (what the model would print if it emitted just that)."""
    with contextlib.suppress(TypeError, KeyError):
        return _VOCAB_CACHE[tokenizer]
    texts = tokenizer.batch_decode(
        [[i] for i in range(len(tokenizer))], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    with contextlib.suppress(TypeError):
        _VOCAB_CACHE[tokenizer] = texts
    return texts


def _token_sets(
    tokenizer: Any, answers: Sequence[str], *, case_sensitive: bool, strip_paren: bool
) -> list[list[int]]:
    key = (tuple(answers), case_sensitive, strip_paren)
    try:
        cache = _TOKEN_SET_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: compute without caching
        cache = {}
    if key in cache:
        return cache[key]

    def norm(text: str) -> str:
        s = text.strip()
        if strip_paren and s.startswith("("):
            s = s[1:].strip()
        return s if case_sensitive else s.casefold()

    wanted = {norm(a): k for k, a in enumerate(answers)}
    sets: list[list[int]] = [[] for _ in answers]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, text in enumerate(_decoded_vocab(tokenizer)):
        slot = wanted.get(norm(text))
        if slot is not None and token_id not in special:
            sets[slot].append(token_id)
    missing = [a for a, ids in zip(answers, sets, strict=True) if not ids]
    if missing:
        raise ValueError(f"The tokenizer has no token that spells {missing}: it cannot give these answers.")
    cache[key] = sets
    return sets


def option_token_ids(
    tokenizer: Any, answers: Sequence[str], *, case_sensitive: bool = True
) -> list[list[int]]:
    """For each answer ("A", "B", ... or "Yes", "No"), every token id whose decoded text, stripped
    of whitespace and an opening "(", spells it: e.g. "A", " A", "(A", " (A".

    Letters are matched case-sensitively (a lower-case "a" is an article, not an answer); yes / no
    are matched with ``case_sensitive=False``. Cached per tokenizer.
    """
    return _token_sets(tokenizer, answers, case_sensitive=case_sensitive, strip_paren=True)


def open_paren_token_ids(tokenizer: Any) -> list[int]:
    """Every token that is an opening parenthesis alone ("(", " (")."""
    return _token_sets(tokenizer, ("(",), case_sensitive=True, strip_paren=False)[0]


def open_paren_id(tokenizer: Any) -> int | None:
    """The id of the single token "(" (None if "(" does not encode to one token)."""
    ids = tokenizer("(", add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


# ---------------------------------------------------------------------------------------------
# Forward passes





def _last_logits(
    model: nn.Module, rows: Sequence[Sequence[int]], pad_id: int, keep: int, share_prefix: bool = False
) -> torch.Tensor:
    """Left-pad ``rows`` into one batch, run the model, return the logits of the last ``keep``
    positions, [batch, keep, vocab] float32 (left padding puts every row's end at -1).

    With ``share_prefix``, the tokens every row starts with (the chat template, the instruction,
    a persona) run once and their KV cache serves the whole batch (see :func:`_shared_prefix_logits`).
    """
    if share_prefix:
        shared = _shared_prefix_logits(model, rows, pad_id, keep)
        if shared is not None:
            return shared
    input_ids, mask = left_pad(rows, pad_id, input_device(model))
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
    # Positions from the mask, so a padded row sees the positions it would see alone.
    if forward_accepts(model, "position_ids"):
        kwargs["position_ids"] = positions_from_mask(mask)
    if forward_accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    # Only the last positions are needed: skip the lm_head on the rest where the model allows.
    if forward_accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    return logits[:, -keep:, :].float()


MIN_SHARED_PREFIX = 8  # tokens: below this a second forward pass costs more than it saves
_NO_SHARED_PREFIX: weakref.WeakSet = weakref.WeakSet()  # models whose cache cannot serve a batch


def _common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    length = min(len(r) for r in rows)
    for row in rows[1:]:
        n = 0
        while n < length and row[n] == first[n]:
            n += 1
        length = n
    return length


def _expandable_cache(cache: Any) -> bool:
    """A DynamicCache of full-attention layers, which can be repeated along the batch."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return (
        isinstance(cache, DynamicCache)
        and hasattr(cache, "batch_repeat_interleave")
        and all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))
    )


def _shared_prefix_logits(
    model: nn.Module, rows: Sequence[Sequence[int]], pad_id: int, keep: int
) -> torch.Tensor | None:
    """:func:`_last_logits` in two passes: the common prefix of ``rows`` once (batch 1, KV cache
    kept), then every row's remainder, left-padded, attending to that cache. The attention mask
    zeroes the padding between prefix and remainder and positions continue from the prefix, so
    each row sees exactly what it sees in one pass. None when it does not apply (too short a
    common prefix, a model without a plain dynamic cache): the caller runs the one-pass forward.
    """
    if (len(rows) < 2 or model in _NO_SHARED_PREFIX
            or not (forward_accepts(model, "position_ids") and forward_accepts(model, "use_cache"))):
        return None
    # The last ``keep`` positions of every row must lie in its remainder.
    prefix = min(_common_prefix_length(rows), min(len(r) for r in rows) - keep)
    if prefix < MIN_SHARED_PREFIX:
        return None
    device = input_device(model)
    head = torch.tensor([list(rows[0][:prefix])], dtype=torch.long, device=device)
    kwargs: dict[str, Any] = {"input_ids": head, "use_cache": True}
    if forward_accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    cache = output_cache(model(**kwargs))
    if not _expandable_cache(cache):
        with contextlib.suppress(TypeError):  # remember, so later batches skip the probe
            _NO_SHARED_PREFIX.add(model)
        return None
    cache.batch_repeat_interleave(len(rows))
    input_ids, tail_mask = left_pad([r[prefix:] for r in rows], pad_id, device)
    mask = torch.cat([torch.ones((len(rows), prefix), dtype=torch.long, device=device), tail_mask], dim=1)
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "position_ids": positions_from_mask(tail_mask, start=prefix),
        cache_keyword(model): cache,
        "use_cache": True,
    }
    if forward_accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    out = model(**kwargs)
    return out.logits[:, -keep:, :].float()


def _encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens_for(tokenizer))["input_ids"]
    return [list(x) for x in ids]


def _batches(
    lengths: Sequence[int], batch_size: int, groups: Sequence[int] | None = None
) -> Iterator[np.ndarray]:
    """Row indices per batch, longest first, so padding waste is small and an out-of-memory
    error shows at once. With ``groups`` (e.g. the persona of each row), no batch crosses a
    group, so every batch keeps its group's common prompt prefix for sharing."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if groups is None:
        parts = [np.arange(len(lengths))]
    else:
        labels = np.asarray(groups)
        parts = [np.flatnonzero(labels == g) for g in dict.fromkeys(labels.tolist())]
    for part in parts:
        for batch in length_sorted_batches(lengths[part], batch_size):
            yield part[batch]


@dataclass
class _Scored:
    raw: np.ndarray
    option_probs: list[list[float] | None]
    option_mass: np.ndarray
    n_tokens: np.ndarray


def _score_choice(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answer_sets: list[list[int]],
    batch_size: int,
    paren_path: bool,
    share_prefix: bool = False,
    groups: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Renormalized answer probabilities [n, options] and the answers' total mass [n].

    With ``paren_path``, a "(" token is appended to every prompt and answers that open with a
    separate "(" token are counted too (see the module docstring)."""
    encoded = _encode_prompts(tokenizer, prompts)
    pad = pad_token_id(tokenizer)
    paren = open_paren_id(tokenizer) if paren_path else None
    open_ids = open_paren_token_ids(tokenizer) if paren is not None else []
    if paren is not None:
        encoded = [e + [paren] for e in encoded]
    probs = np.zeros((len(prompts), len(answer_sets)), dtype=np.float64)
    mass = np.zeros(len(prompts), dtype=np.float64)
    for idx in _batches([len(e) for e in encoded], batch_size, groups):
        keep = 2 if paren is not None else 1
        logits = _last_logits(model, [encoded[i] for i in idx], pad, keep=keep, share_prefix=share_prefix)
        p0 = torch.softmax(logits[:, 0, :], dim=-1).double()
        per_option = torch.stack([p0[:, ids].sum(dim=-1) for ids in answer_sets], dim=-1)
        if paren is not None:
            p1 = torch.softmax(logits[:, 1, :], dim=-1).double()
            after_paren = torch.stack([p1[:, ids].sum(dim=-1) for ids in answer_sets], dim=-1)
            per_option = per_option + p0[:, open_ids].sum(dim=-1, keepdim=True) * after_paren
        per_option = per_option.cpu().numpy()
        total = per_option.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            probs[idx] = per_option / total[:, None]
        mass[idx] = total
    return probs, mass


def _score_statements(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], statements: Sequence[str], batch_size: int,
    share_prefix: bool = False, groups: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean log-probability per statement token after each prompt, and the token counts."""
    prompt_ids = _encode_prompts(tokenizer, prompts)
    # The statement is tokenized on its own, so its tokens (and their count) do not depend on the
    # prompt, and prompt + statement is exactly what the assistant turn would hold.
    stmt_ids = [list(x) for x in tokenizer(list(statements), add_special_tokens=False)["input_ids"]]
    if any(len(s) == 0 for s in stmt_ids):
        raise ValueError("A statement tokenizes to no tokens.")
    rows = [p + s for p, s in zip(prompt_ids, stmt_ids, strict=True)]
    pad = pad_token_id(tokenizer)
    means = np.zeros(len(prompts), dtype=np.float64)
    for idx in _batches([len(r) for r in rows], batch_size, groups):
        lens = [len(stmt_ids[i]) for i in idx]
        m = max(lens)
        # Logits at positions -(m+1) .. -2 predict the last m tokens of every (left-padded) row.
        logits = _last_logits(model, [rows[i] for i in idx], pad, keep=m + 1, share_prefix=share_prefix)[:, :-1, :]
        logp = torch.log_softmax(logits, dim=-1)
        targets = torch.full((len(idx), m), 0, dtype=torch.long)
        valid = torch.zeros((len(idx), m), dtype=torch.bool)
        for j, i in enumerate(idx):
            targets[j, m - lens[j] :] = torch.tensor(stmt_ids[i], dtype=torch.long)
            valid[j, m - lens[j] :] = True
        targets, valid = targets.to(logp.device), valid.to(logp.device)
        token_logp = logp.gather(-1, targets[..., None])[..., 0].double().masked_fill(~valid, 0.0)
        means[idx] = (token_logp.sum(dim=1) / valid.sum(dim=1)).cpu().numpy()
    return means, np.array([len(s) for s in stmt_ids], dtype=np.int64)


def _score_raw(
    model: nn.Module,
    tokenizer: Any,
    instrument: Instrument,
    items: Sequence[InstrumentItem],
    scorer: str,
    personas: Sequence[str | None],
    batch_size: int,
    edit: EditLike | None,
) -> _Scored:
    """Raw scores of every (persona, item) combination, persona-major, in one batched pass."""
    combos = [(persona, item) for persona in personas for item in items]
    prompts = [
        render_prompt(tokenizer, build_message(item, scorer, instrument.scale, persona))
        for persona, item in combos
    ]
    context = edit.apply(model) if edit is not None else contextlib.nullcontext()
    # A shared prompt prefix runs once per batch, unless the edit depends on positions: a second
    # forward pass over a cache would count as generated tokens to a prompt- or generated-only edit.
    share = getattr(edit, "positions", "all") == "all"
    # Several personas (the validity check): batches stay within one persona, whose prompt prefix
    # then runs once per batch.
    groups = [k for k, _ in enumerate(personas) for _ in items] if share and len(personas) > 1 else None
    n = len(combos)
    with torch.inference_mode(), context:
        if scorer == "likert":
            sets = option_token_ids(tokenizer, instrument.scale.letters, case_sensitive=True)
            probs, mass = _score_choice(model, tokenizer, prompts, sets, batch_size, paren_path=True,
                                        share_prefix=share, groups=groups)
            raw = probs @ np.asarray(instrument.scale.values)
            return _Scored(raw, [list(map(float, p)) for p in probs], mass, np.zeros(n, dtype=np.int64))
        if scorer == "yesno":
            sets = option_token_ids(tokenizer, ("Yes", "No"), case_sensitive=False)
            probs, mass = _score_choice(model, tokenizer, prompts, sets, batch_size, paren_path=False,
                                        share_prefix=share, groups=groups)
            return _Scored(
                probs[:, 0].copy(), [list(map(float, p)) for p in probs], mass, np.zeros(n, dtype=np.int64)
            )
        means, counts = _score_statements(
            model, tokenizer, prompts, [item.statement for _, item in combos], batch_size, share_prefix=share,
            groups=groups,
        )
        return _Scored(means, [None] * n, np.full(n, np.nan), counts)


def _keyed(raw: np.ndarray, keys: np.ndarray, scorer: str, low: float, high: float) -> np.ndarray:
    if scorer == "statement":
        return keys * raw
    # Bounded scales: a minus-keyed answer is mirrored within the scale (6 - x on 1..5, 1 - p).
    return np.where(keys > 0, raw, low + high - raw)


def _select(
    instrument: Instrument, dimensions: Sequence[str] | None, limit: int | None
) -> list[InstrumentItem]:
    wanted = instrument.dimensions if dimensions is None else tuple(get_concept(d).name for d in dimensions)
    unknown = [d for d in wanted if d not in instrument.dimensions]
    if unknown:
        raise ValueError(
            f"{instrument.name} has no items for {unknown}; its dimensions are {', '.join(instrument.dimensions)}."
        )
    chosen: list[InstrumentItem] = []
    for dim in wanted:
        of_dim = [item for item in instrument.items if item.dimension == dim]
        chosen.extend(of_dim if limit is None else of_dim[:limit])
    # Keep inventory order, whatever order the dimensions were asked in.
    position = {item.id: k for k, item in enumerate(instrument.items)}
    return sorted(chosen, key=lambda item: position[item.id])


def _select_balanced(instrument: Instrument, dimension: str, limit: int | None) -> list[InstrumentItem]:
    """The first ``limit`` items of a dimension, half minus-keyed where the inventory has enough
    (inventory order within each key): the acquiescence check needs both keys, and the first
    items in inventory order can all be plus-keyed (IPIP-NEO-120 extraversion: 12 of them)."""
    of_dim = _select(instrument, [dimension], None)
    if limit is None or limit >= len(of_dim):
        return of_dim
    minus = [item for item in of_dim if item.key < 0]
    plus = [item for item in of_dim if item.key > 0]
    n_minus = min(len(minus), limit // 2)
    n_plus = min(len(plus), limit - n_minus)
    n_minus = min(len(minus), limit - n_plus)
    chosen = {item.id for item in minus[:n_minus] + plus[:n_plus]}
    return [item for item in of_dim if item.id in chosen]


# ---------------------------------------------------------------------------------------------
# Public scoring API

ITEM_COLUMNS = [
    "instrument",
    "scorer",
    "item_id",
    "dimension",
    "key",
    "raw",
    "score",
    "option_probs",
    "option_mass",
    "n_tokens",
    "scale_min",
    "scale_max",
]


def score_items(
    model: nn.Module,
    tokenizer: Any,
    instrument: str | Instrument,
    scorer: str,
    *,
    persona: str | None = None,
    edit: EditLike | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    dimensions: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Score each item of ``instrument`` with ``scorer``: one row per item, in inventory order.

    ``limit`` keeps the first ``limit`` items *of each dimension* (every dimension stays scored,
    which leakage needs); ``dimensions`` restricts to some traits / values. Columns:
    :data:`ITEM_COLUMNS` (``raw`` unkeyed, ``score`` keyed; ``option_probs`` the renormalized
    option probabilities, A first, for ``likert`` and [yes, no] for ``yesno``; ``option_mass``
    their total before renormalizing; ``n_tokens`` the statement's token count).
    """
    _check_scorer(scorer)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1.")
    inst = _as_instrument(instrument)
    items = _select(inst, dimensions, limit)
    scored = _score_raw(model, tokenizer, inst, items, scorer, [persona], batch_size, edit)
    low, high = scale_range(inst, scorer)
    keys = np.array([item.key for item in items], dtype=np.float64)
    frame = pd.DataFrame(
        {
            "instrument": inst.name,
            "scorer": scorer,
            "item_id": [item.id for item in items],
            "dimension": [item.dimension for item in items],
            "key": np.array([item.key for item in items], dtype=np.int64),
            "raw": scored.raw,
            "score": _keyed(scored.raw, keys, scorer, low, high),
            "option_probs": scored.option_probs,
            "option_mass": scored.option_mass,
            "n_tokens": scored.n_tokens,
            "scale_min": low,
            "scale_max": high,
        }
    )
    return frame[ITEM_COLUMNS]


def dimension_scores(items_df: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Per dimension (and per ``by`` columns, e.g. a condition): mean keyed score, its standard
    error, n, the mean raw score, and the mean normalized to [0, 1] by the scale's range
    (``(x - low) / (high - low)``: (x - 1) / 4 for IPIP likert, x for yesno, NaN for statement)."""
    keys = [*by, "instrument", "scorer", "dimension"]
    rows = []
    for group, sub in items_df.groupby(keys, sort=False):
        n = len(sub)
        mean = float(sub["score"].mean())
        se = float(sub["score"].std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        low, high = float(sub["scale_min"].iloc[0]), float(sub["scale_max"].iloc[0])
        rows.append(
            {
                **dict(zip(keys, group, strict=True)),
                "mean": mean,
                "se": se,
                "n": n,
                "raw_mean": float(sub["raw"].mean()),
                "normalized": (mean - low) / (high - low),
            }
        )
    return pd.DataFrame(rows, columns=[*keys, "mean", "se", "n", "raw_mean", "normalized"])


# ---------------------------------------------------------------------------------------------
# Validity


def default_personas(concepts: Sequence[str | Concept]) -> dict[str, tuple[list[str], list[str]]]:
    """High and low persona descriptions per concept: PersonalityBench's for traits, dpnle's
    ``data/value_personas.json`` for values."""
    from dpnle import datasets
    from dpnle.pairs import load_value_personas

    out: dict[str, tuple[list[str], list[str]]] = {}
    value_personas: dict[str, dict[str, list[str]]] | None = None
    for c in concepts:
        concept = c if isinstance(c, Concept) else get_concept(c)
        if concept.kind == "trait":
            descriptions = datasets.load_pb_descriptions(concept.name)
            out[concept.name] = (
                [d.text for d in descriptions if d.pole == "high"],
                [d.text for d in descriptions if d.pole == "low"],
            )
        else:
            value_personas = value_personas if value_personas is not None else load_value_personas()
            entry = value_personas[concept.name]
            out[concept.name] = (list(entry["high"]), list(entry["low"]))
    return out


def min_sign_test_p(n: int) -> float:
    """The smallest two-sided sign-test p-value ``n`` paired differences can give (all on one side).

    With ``n`` items per concept below 6, the check's sign test cannot reach p < 0.05 whatever
    the model does: PVQ-40 has 3-6 items per value."""
    return 1.0 if n < 1 else min(1.0, 2.0 * 0.5**n)


def _paired_d(diff: np.ndarray) -> float:
    mean = float(diff.mean())
    sd = float(diff.std(ddof=1)) if len(diff) > 1 else math.nan
    if sd == 0.0:
        # Every item moved by the same amount: infinitely consistent if it moved at all.
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / sd


def _welch(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or len(b) < 2:
        return math.nan
    # Constant groups (a model that ignores the prompt) give NaN here, with a precision warning.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = sps.ttest_ind(a, b, equal_var=False).pvalue
    return float(p)


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else math.nan


VALIDITY_COLUMNS = [
    "instrument",
    "scorer",
    "concept",
    "n_items",
    "n_plus",
    "n_minus",
    "n_personas",
    "mean_high",
    "mean_low",
    "separation",
    "separation_normalized",
    "cohens_d",
    "n_up",
    "n_down",
    "sign_p",
    "raw_plus_high",
    "raw_minus_high",
    "gap_high",
    "gap_high_p",
    "raw_plus_low",
    "raw_minus_low",
    "gap_low",
    "gap_low_p",
    "shift_plus",
    "shift_minus",
    "key_interaction",
    "key_interaction_p",
    "collapse_testable",
    "collapse",
    "passed",
]


def validity_check(
    model: nn.Module,
    tokenizer: Any,
    instrument: str | Instrument,
    scorer: str,
    concepts: Sequence[str | Concept],
    personas: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None,
    *,
    n_personas: int = 4,
    batch_size: int = 16,
    limit: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Does the instrument respond to persona prompts on this model? One row per concept.

    Each of the concept's items (with ``limit``: that many, half of them minus-keyed where the
    inventory has enough, each key in inventory order) is scored under the first
    ``n_personas`` high and low persona descriptions; scores are averaged per item and pole.

    - Separation: per item d_i = keyed(high) - keyed(low). ``cohens_d`` = mean(d) / sd(d) (the
      paired d), ``sign_p`` a two-sided sign test of the d_i (zeros dropped), ``separation`` the
      mean d_i (``separation_normalized``: divided by the scale's range).
    - Acquiescence: under each pole the raw (unreversed) means of plus- and minus-keyed items,
      their gap and a Welch test (``gap_*``). A model that follows the persona moves plus- and
      minus-keyed raw answers in opposite directions; one that answers by level moves them
      together. ``shift_plus`` / ``shift_minus`` are the mean raw high - low changes,
      ``key_interaction`` = shift_plus - shift_minus and ``key_interaction_p`` a Welch test of
      the per-item raw changes of plus- against minus-keyed items. ``collapse`` is True unless
      the interaction is positive with p < COLLAPSE_ALPHA. Without minus-keyed items (PVQ-40)
      it cannot be tested: ``collapse_testable`` is False, ``collapse`` False, and a level-only
      response can then pass; say so wherever PVQ validity is reported.
    - ``passed``: cohens_d > MIN_COHENS_D and sign_p < SIGN_TEST_ALPHA and not collapse.
    """
    _check_scorer(scorer)
    if n_personas < 1:
        raise ValueError("n_personas must be at least 1.")
    inst = _as_instrument(instrument)
    names = [(c if isinstance(c, Concept) else get_concept(c)).name for c in concepts]
    personas = personas if personas is not None else default_personas(names)
    low_bound, high_bound = scale_range(inst, scorer)
    rows = []
    for concept in names:
        if concept not in personas:
            raise ValueError(f"No personas given for {concept!r}.")
        high_p, low_p = (list(p)[:n_personas] for p in personas[concept])
        if not high_p or not low_p:
            raise ValueError(f"{concept!r} needs at least one high and one low persona.")
        items = _select_balanced(inst, concept, limit)
        if progress is not None:
            progress(
                f"{inst.name}/{scorer}/{concept}: {len(items)} items x {len(high_p) + len(low_p)} personas"
            )
        # Scoring: raw scores [personas, items], the high personas' rows first.
        scored = _score_raw(model, tokenizer, inst, items, scorer, [*high_p, *low_p], batch_size, None)
        raw = scored.raw.reshape(len(high_p) + len(low_p), len(items))
        keys = np.array([item.key for item in items], dtype=np.float64)
        verdict = validity_verdict(raw, keys, len(high_p), scorer, low_bound, high_bound)
        rows.append({"instrument": inst.name, "scorer": scorer, "concept": concept, **verdict})
    return pd.DataFrame(rows, columns=VALIDITY_COLUMNS)


def validity_verdict(
    raw: np.ndarray, keys: np.ndarray, n_high: int, scorer: str, low: float, high: float
) -> dict[str, Any]:
    """The statistics and verdict of :func:`validity_check` for one concept, from its scores alone.

    ``raw``: raw (unkeyed) item scores [personas, items], the first ``n_high`` rows under high
    personas and the rest under low ones; ``keys``: each item's key (+1 / -1); ``low`` / ``high``:
    the scale's range (:func:`scale_range`). Returns the columns of :data:`VALIDITY_COLUMNS` from
    ``n_items`` on, as :func:`validity_check` documents them.
    """
    raw = np.asarray(raw, dtype=np.float64)
    keys = np.asarray(keys, dtype=np.float64)
    if raw.ndim != 2 or raw.shape[1] != len(keys) or not 0 < n_high < raw.shape[0]:
        raise ValueError("raw must be [personas, items] with at least one high and one low persona row.")
    keyed = _keyed(raw, keys[None, :], scorer, low, high)
    raw_high, raw_low = raw[:n_high].mean(axis=0), raw[n_high:].mean(axis=0)
    keyed_high, keyed_low = keyed[:n_high].mean(axis=0), keyed[n_high:].mean(axis=0)

    diff = keyed_high - keyed_low
    n_up, n_down = int((diff > 0).sum()), int((diff < 0).sum())
    sign_p = float(sps.binomtest(n_up, n_up + n_down, 0.5).pvalue) if n_up + n_down else 1.0
    d = _paired_d(diff)

    plus, minus = keys > 0, keys < 0
    shift = raw_high - raw_low
    testable = bool(plus.sum() >= 2 and minus.sum() >= 2)
    interaction = _mean(shift[plus]) - _mean(shift[minus])
    interaction_p = _welch(shift[plus], shift[minus])
    if testable:
        if math.isnan(interaction_p):  # no variance at all: the keys made no difference
            interaction_p = 1.0 if interaction == 0 else 0.0
        collapse = not (interaction > 0 and interaction_p < COLLAPSE_ALPHA)
    else:
        collapse = False
    width = high - low
    return {
        "n_items": len(keys),
        "n_plus": int(plus.sum()),
        "n_minus": int(minus.sum()),
        "n_personas": n_high,
        "mean_high": float(keyed_high.mean()),
        "mean_low": float(keyed_low.mean()),
        "separation": float(diff.mean()),
        "separation_normalized": float(diff.mean()) / width,
        "cohens_d": d,
        "n_up": n_up,
        "n_down": n_down,
        "sign_p": sign_p,
        "raw_plus_high": _mean(raw_high[plus]),
        "raw_minus_high": _mean(raw_high[minus]),
        "gap_high": abs(_mean(raw_high[plus]) - _mean(raw_high[minus])),
        "gap_high_p": _welch(raw_high[plus], raw_high[minus]),
        "raw_plus_low": _mean(raw_low[plus]),
        "raw_minus_low": _mean(raw_low[minus]),
        "gap_low": abs(_mean(raw_low[plus]) - _mean(raw_low[minus])),
        "gap_low_p": _welch(raw_low[plus], raw_low[minus]),
        "shift_plus": _mean(shift[plus]),
        "shift_minus": _mean(shift[minus]),
        "key_interaction": interaction,
        "key_interaction_p": interaction_p,
        "collapse_testable": testable,
        "collapse": bool(collapse),
        "passed": bool(d > MIN_COHENS_D and sign_p < SIGN_TEST_ALPHA and not collapse),
    }
