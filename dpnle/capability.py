"""Capability benchmarks: what an edit costs in general ability.

Six benchmarks, in two families:

- **Log-likelihood multiple choice** (``mmlu``, ``arc``, ``hellaswag``, ``truthfulqa``): each choice
  is scored as a continuation of the prompt by its summed log-probability and by that sum divided
  by the continuation's length in characters (``acc_norm``, as lm-evaluation-harness does). The
  reported metric is ``acc_norm`` for HellaSwag (the standard there) and ``acc`` for the others.
  Prompts are plain text, not the chat template, as is usual for log-likelihood evaluation.
  One forward pass per (item, choice), batched; choices that are a single token (MMLU's answer
  letters) share one forward pass of their prompt.
- **Generation** (``gsm8k``, ``hotpotqa``): batched greedy decoding in the chat template with the
  DPN-LE reference's ``max_new_tokens`` and repetition penalty. GSM8K is scored by exact match of
  the last number in the output; HotpotQA (closed book: this copy ships no context) by the SQuAD
  exact match and token F1.

Two measures that stay informative on a tiny model whose accuracies sit at chance:
:func:`kl_and_perplexity` on a fixed set of neutral paragraphs (``data/neutral_text.txt``).

Edits. Every forward and every ``generate`` call runs inside ``edit.apply(model, prompt_length=P)``
when an edit is given. For generation P is the left-padded prompt width (``input_ids.shape[1]``).
For log-likelihood scoring each row is laid out as ``[left pads | prompt | continuation | right
pads]`` with every prompt ending at column P, so P is exact for every row: the continuation sits
where generated tokens would, and an edit whose position policy is "generated" touches the
continuation (the choice being scored), "prompt" touches only the prompt. The logit that scores a
continuation's first token is read at the last prompt column, so a "generated" edit cannot change
a one-token choice at all (MMLU's letters): use policy "all" for log-likelihood benchmarks.
Neutral texts are scored the same way, as the continuation of the tokenizer's BOS (or of their own
first token when the tokenizer adds none).

Subsets. ``limit=N`` picks N items with ``random.Random(f"dpnle-capability/{name}/{seed}")`` over
the full item list and keeps them in dataset order. The choice depends only on (benchmark, seed,
N), never on the model or the edit, so every condition of a comparison sees the same items.
"""

from __future__ import annotations

import copy
import math
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dpnle.batching import (
    EditLike,
    add_special_tokens_for,
    edit_context,
    forward_accepts,
    input_device,
    left_pad,
    length_sorted_batches,
    pad_token_id,
    positions_from_mask,
    right_pad,
)
from dpnle.datasets import GsmItem, McItem, QaItem
from dpnle.errors import DpnleError
from dpnle.pairs import render_prompt
from dpnle.paths import project_data_dir
from dpnle.progress import subtask

# Generation settings from the DPN-LE reference, src/dpn_le/vllm_general_capability.py
# (BENCHMARK_DEFAULTS, greedy: temperature 0, top_p 1), which
# experiments/general_capability/evaluate_vllm.py runs.
GSM8K_MAX_NEW_TOKENS = 512
GSM8K_REPETITION_PENALTY = 1.1
HOTPOTQA_MAX_NEW_TOKENS = 50
HOTPOTQA_REPETITION_PENALTY = 1.1

# TruthfulQA's file lists the true answer first. Scoring is by continuation, so order does not
# matter except for ties (argmax takes the first): a fixed shuffle keeps a degenerate model from
# scoring 100%. Fixed, not tied to ``seed``, so items are identical across subset seeds.
TRUTHFULQA_SHUFFLE_SEED = 0

MC_BENCHMARKS: tuple[str, ...] = ("mmlu", "arc", "hellaswag", "truthfulqa")
GENERATION_BENCHMARKS: tuple[str, ...] = ("gsm8k", "hotpotqa")
BENCHMARKS: tuple[str, ...] = ("gsm8k", "mmlu", "arc", "hellaswag", "truthfulqa", "hotpotqa")

# The metric each benchmark reports in ``score``.
METRICS: dict[str, str] = {
    "mmlu": "acc",
    "arc": "acc",
    "hellaswag": "acc_norm",
    "truthfulqa": "acc",
    "gsm8k": "exact_match",
    "hotpotqa": "f1",
}

LETTERS = "ABCDEFGHIJ"

ROW_COLUMNS: list[str] = [
    "benchmark",
    "item_id",
    "prompt",
    "output",
    "reference",
    "score",
    "metric",
    "correct_index",
    "pred_index",
    "chance",
    "acc",
    "acc_norm",
    "exact_match",
    "f1",
    "choice_logprobs",
    "choice_logprobs_norm",
]


class CapabilityError(ValueError, DpnleError):
    pass


# ---------------------------------------------------------------------------------------------
# Answer extraction and scoring


# Thousands separators only in groups of three, so a list "1,2,3" reads as three numbers.
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """'1,450,000' -> '1450000', '18.00' -> '18', '-3.50' -> '-3.5'; non-numbers unchanged."""
    cleaned = text.replace(",", "").strip()
    try:
        value = float(cleaned)
    except ValueError:
        return cleaned
    if not math.isfinite(value):
        return cleaned
    if value.is_integer():
        return str(int(value))
    return repr(value)


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands separators removed, normalized; None if none."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return normalize_number(matches[-1])


def gsm8k_correct(output: str, answer: str) -> bool:
    predicted = extract_last_number(output)
    return predicted is not None and predicted == normalize_number(answer)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalization: lower case, drop punctuation, drop articles, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def token_f1(prediction: str, truth: str) -> float:
    """SQuAD token F1 (multiset overlap of normalized tokens)."""
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    overlap = sum((Counter(pred) & Counter(gold)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred)
    recall = overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


# "Answer:", "A:", "The answer is", "The final answer to this question is:" ...
_ANSWER_PREFIX = re.compile(
    r"^(?:a:|(?:the\s+)?(?:final\s+|short\s+)?answer(?:\s+to\s+(?:this|the)\s+question)?\s*(?:is\b|:))\s*:?\s*",
    re.IGNORECASE,
)


def extract_short_answer(output: str) -> str:
    """The answer part of a closed-book reply: the first non-empty line without a leading
    "Answer:"-style prefix or a trailing full stop. Chatty models often write a full sentence
    on that line; F1 then credits the overlap, EM does not."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    answer = _ANSWER_PREFIX.sub("", lines[0], count=1)
    return answer.strip().rstrip(".").strip()


# ---------------------------------------------------------------------------------------------
# Log-likelihood scoring


@dataclass(frozen=True)
class Continuation:
    """A prompt and a continuation to score, as token ids (the prompt must not be empty)."""

    prompt_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]


def encode_continuation(tokenizer: Any, context: str, continuation: str) -> Continuation:
    """Token ids of ``context`` and of ``continuation`` as it is tokenized after the context.

    Encoding the joined text and splitting it at the context's length keeps the tokenization
    the model would see (a leading space merges into the continuation's first token); if the
    joined encoding does not start with the context's (a merge across the boundary), the
    continuation is encoded on its own.
    """
    ctx = list(tokenizer(context, add_special_tokens=True)["input_ids"])
    whole = list(tokenizer(context + continuation, add_special_tokens=True)["input_ids"])
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        cont = whole[len(ctx) :]
    else:
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    if not ctx:
        raise CapabilityError("The prompt encodes to no tokens: nothing to condition the continuation on.")
    if not cont:
        raise CapabilityError(f"The continuation {continuation!r} encodes to no tokens.")
    return Continuation(tuple(ctx), tuple(cont))


@dataclass
class _Layout:
    input_ids: torch.Tensor  # [B, P + C]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    continuation_mask: torch.Tensor  # [B, C] which continuation slots hold real tokens
    continuation_ids: torch.Tensor  # [B, C] (pad id where masked)
    prompt_length: int  # P



def _layout(batch: Sequence[Continuation], pad_id: int, device: torch.device) -> _Layout:
    """``[left pads | prompt | continuation | right pads]``: every prompt ends at column P."""
    prompt_ids, prompt_mask = left_pad([r.prompt_ids for r in batch], pad_id, device)
    continuation_ids, continuation_mask = right_pad([r.continuation_ids for r in batch], pad_id, device)
    mask = torch.cat([prompt_mask, continuation_mask], dim=1)
    return _Layout(
        input_ids=torch.cat([prompt_ids, continuation_ids], dim=1),
        attention_mask=mask,
        # Positions count real tokens only, so a row's result does not depend on its padding.
        position_ids=positions_from_mask(mask),
        continuation_mask=continuation_mask.bool(),
        continuation_ids=continuation_ids,
        prompt_length=prompt_ids.shape[1],
    )



def _last_logits(model: Any, layout: _Layout, keep: int) -> torch.Tensor:
    """Float logits of the last ``keep`` columns: [B, keep, V]."""
    kwargs: dict[str, Any] = {
        "input_ids": layout.input_ids,
        "attention_mask": layout.attention_mask,
        "position_ids": layout.position_ids,
        "use_cache": False,
    }
    # Skip the vocabulary projection on the columns nobody reads (most of a long prompt).
    trimmed = forward_accepts(model, "logits_to_keep")
    if trimmed:
        kwargs["logits_to_keep"] = keep
    logits = model(**kwargs).logits
    if not trimmed:
        logits = logits[:, -keep:]
    return logits.float()


def _continuation_logits(model: Any, layout: _Layout) -> torch.Tensor:
    """Logits at the positions that predict the continuation slots: [B, C, V]."""
    width_c = layout.continuation_ids.shape[1]
    # Column P-1+j predicts continuation token j; the very last column predicts nothing.
    return _last_logits(model, layout, width_c + 1)[:, :width_c]


def _length_batches(requests: Sequence[Continuation], size: int) -> list[np.ndarray]:
    """Batches of ``requests``, shortest (prompt, then continuation) first; ties keep input order."""
    lengths = [(len(r.prompt_ids), len(r.continuation_ids)) for r in requests]
    return length_sorted_batches(lengths, size, descending=False)


@torch.no_grad()
def continuation_logprobs(
    model: Any,
    tokenizer: Any,
    requests: Sequence[Continuation],
    *,
    edit: EditLike | None = None,
    batch_size: int = 8,
) -> list[float]:
    """Summed log-probability of each request's continuation given its prompt."""
    if batch_size < 1:
        raise CapabilityError("batch_size must be at least 1.")
    device = input_device(model)
    pad_id = pad_token_id(tokenizer)
    out = [0.0] * len(requests)
    # A one-token continuation needs only its prompt's next-token distribution, so choices that
    # share a prompt (MMLU's answer letters) cost one forward pass instead of one each. Exact:
    # the continuation's own column never feeds the logit that scores it, and the prompt keeps
    # its columns, so a position-restricted edit sees the same positions.
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    longer: list[Continuation] = []
    longer_index: list[int] = []
    for i, request in enumerate(requests):
        if len(request.continuation_ids) == 1:
            by_prompt.setdefault(request.prompt_ids, []).append(i)
        else:
            longer.append(request)
            longer_index.append(i)
    prompts = [Continuation(p, ()) for p in by_prompt]
    for index in _length_batches(prompts, batch_size):
        layout = _layout([prompts[k] for k in index], pad_id, device)
        with edit_context(edit, model, layout.prompt_length):
            logits = _last_logits(model, layout, 1)[:, -1]
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, k in enumerate(index):
            for i in by_prompt[prompts[k].prompt_ids]:
                out[i] = float(logprobs[row, requests[i].continuation_ids[0]])
    for index in _length_batches(longer, batch_size):
        layout = _layout([longer[i] for i in index], pad_id, device)
        with edit_context(edit, model, layout.prompt_length):
            logits = _continuation_logits(model, layout)
        logprobs = torch.log_softmax(logits, dim=-1)
        picked = logprobs.gather(-1, layout.continuation_ids.unsqueeze(-1)).squeeze(-1)
        sums = (picked * layout.continuation_mask).sum(-1)
        for row, i in enumerate(index):
            out[longer_index[i]] = float(sums[row])
    return out


# ---------------------------------------------------------------------------------------------
# Multiple-choice prompts


def _mmlu_subject(subject: str | None) -> str:
    return (subject or "general knowledge").replace("_", " ")


def mc_prompt(benchmark: str, item: McItem) -> tuple[str, list[str]]:
    """(context, continuations) for one multiple-choice item."""
    if benchmark == "mmlu":
        # MMLU is scored on the answer letter (the standard zero-shot format); the choices are
        # shown in the prompt.
        lines = [f"The following is a multiple choice question about {_mmlu_subject(item.subject)}.", ""]
        lines.append(item.question.strip())
        lines.extend(f"{LETTERS[k]}. {choice}" for k, choice in enumerate(item.choices))
        lines.append("Answer:")
        return "\n".join(lines), [f" {LETTERS[k]}" for k in range(len(item.choices))]
    if benchmark == "arc":
        return f"Question: {item.question.strip()}\nAnswer:", [f" {c}" for c in item.choices]
    if benchmark == "hellaswag":
        # The loader's question is already "<activity>: <context>", the endings continue it.
        return item.question.strip(), [f" {c}" for c in item.choices]
    if benchmark == "truthfulqa":
        return f"Q: {item.question.strip()}\nA:", [f" {c}" for c in item.choices]
    raise CapabilityError(f"{benchmark!r} is not a multiple-choice benchmark ({', '.join(MC_BENCHMARKS)}).")


def _empty_row(benchmark: str, item_id: str, prompt: str) -> dict[str, Any]:
    return {
        "benchmark": benchmark,
        "item_id": item_id,
        "prompt": prompt,
        "output": "",
        "reference": "",
        "score": float("nan"),
        "metric": METRICS[benchmark],
        "correct_index": -1,
        "pred_index": -1,
        "chance": 0.0,
        "acc": float("nan"),
        "acc_norm": float("nan"),
        "exact_match": float("nan"),
        "f1": float("nan"),
        "choice_logprobs": [],
        "choice_logprobs_norm": [],
    }


def _argmax(values: Sequence[float]) -> int:
    # First maximum on ties, as numpy does; stated so the tie rule is not an accident.
    return int(np.argmax(np.asarray(values)))


def score_multiple_choice(
    model: Any,
    tokenizer: Any,
    benchmark: str,
    items: Sequence[McItem],
    *,
    edit: EditLike | None = None,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """One row per item: choice log-likelihoods, acc, acc_norm and the benchmark's score."""
    requests: list[Continuation] = []
    spans: list[tuple[int, int]] = []
    prompts: list[str] = []
    conts: list[list[str]] = []
    for item in items:
        context, continuations = mc_prompt(benchmark, item)
        start = len(requests)
        requests.extend(encode_continuation(tokenizer, context, c) for c in continuations)
        spans.append((start, len(requests)))
        prompts.append(context)
        conts.append(continuations)
    logprobs = continuation_logprobs(model, tokenizer, requests, edit=edit, batch_size=batch_size)
    metric = METRICS[benchmark]
    rows = []
    for item, (start, stop), context, continuations in zip(items, spans, prompts, conts, strict=True):
        sums = logprobs[start:stop]
        # acc_norm divides by the continuation's character length (lm-evaluation-harness's choice),
        # which does not depend on the tokenizer.
        norms = [s / max(1, len(c)) for s, c in zip(sums, continuations, strict=True)]
        pred_acc, pred_norm = _argmax(sums), _argmax(norms)
        pred = pred_norm if metric == "acc_norm" else pred_acc
        row = _empty_row(benchmark, item.id, context)
        row.update(
            output=LETTERS[pred],
            reference=LETTERS[item.answer_index],
            correct_index=item.answer_index,
            pred_index=pred,
            chance=1.0 / len(item.choices),
            acc=float(pred_acc == item.answer_index),
            acc_norm=float(pred_norm == item.answer_index),
            choice_logprobs=[float(s) for s in sums],
            choice_logprobs_norm=[float(s) for s in norms],
        )
        row["score"] = row[metric]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Generation


def _encode_rendered(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens_for(tokenizer))["input_ids"])


def _greedy_config(model: Any, tokenizer: Any, max_new_tokens: int, repetition_penalty: float) -> Any:
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    # Greedy, as the reference (temperature 0): clear any sampling defaults the checkpoint ships.
    config.do_sample = False
    config.num_beams = 1
    config.temperature = None
    config.top_p = None
    config.top_k = None
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.repetition_penalty = repetition_penalty
    config.pad_token_id = pad_token_id(tokenizer)
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    return config


@torch.no_grad()
def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    edit: EditLike | None = None,
    max_new_tokens: int,
    repetition_penalty: float,
    batch_size: int = 8,
    engine: Any = None,
    label: str = "answers",
) -> list[str]:
    """Batched greedy generation from already-rendered prompts (left padding); returns the new
    text of each prompt, special tokens removed, stripped. ``engine`` (a
    :class:`dpnle.engines.VLLMEngine`) generates instead of ``model.generate``, with the same
    token ids, greedy settings, stopping rule and edit. Under an open progress bar, ``label``
    names the line that counts the answers (:func:`dpnle.progress.subtask`)."""
    if batch_size < 1:
        raise CapabilityError("batch_size must be at least 1.")
    encoded = [_encode_rendered(tokenizer, p) for p in prompts]
    config = _greedy_config(model, tokenizer, max_new_tokens, repetition_penalty)
    # Shortest first; ties keep input order. (The vLLM engine replays these batches for an edit
    # whose per-call random mask follows the forward calls.)
    batches = length_sorted_batches([len(e) for e in encoded], batch_size, descending=False)
    with subtask(f"{label} (up to {max_new_tokens} tokens)", len(prompts)) as advance:
        if engine is not None:
            outputs = engine.generate_texts(tokenizer, encoded, edit=edit, config=config, batches=batches)
            advance(len(outputs))
            return outputs
        device = input_device(model)
        pad_id = pad_token_id(tokenizer)
        outputs = [""] * len(prompts)
        for index in batches:
            ids, mask = left_pad([encoded[i] for i in index], pad_id, device)
            width = ids.shape[1]
            with edit_context(edit, model, ids.shape[1]) as handle:
                generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                if hasattr(handle, "assert_fired"):
                    # An edit that should have changed this batch's generation and did not is an error.
                    handle.assert_fired(new_tokens=int(generated.shape[1] - width), rows=len(index))
            texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for row, i in enumerate(index):
                outputs[i] = texts[row].strip()
            advance(len(index))
    return outputs


GSM8K_INSTRUCTION = (
    "Solve this math word problem. Reason step by step, then state the final answer as a single "
    "number on the last line.\n\nProblem: {question}"
)
HOTPOTQA_INSTRUCTION = (
    "Answer the question from your own knowledge. Reply with the answer only: a name, a date, a "
    "number, a short phrase, or yes / no.\n\nQuestion: {question}"
)


def score_gsm8k(
    model: Any,
    tokenizer: Any,
    items: Sequence[GsmItem],
    *,
    edit: EditLike | None = None,
    batch_size: int = 8,
    max_new_tokens: int = GSM8K_MAX_NEW_TOKENS,
    engine: Any = None,
) -> list[dict[str, Any]]:
    prompts = [render_prompt(tokenizer, GSM8K_INSTRUCTION.format(question=item.question)) for item in items]
    outputs = generate_texts(
        model, tokenizer, prompts, edit=edit, max_new_tokens=max_new_tokens,
        repetition_penalty=GSM8K_REPETITION_PENALTY, batch_size=batch_size, engine=engine, label="GSM8K answers",
    )
    rows = []
    for item, prompt, output in zip(items, prompts, outputs, strict=True):
        correct = float(gsm8k_correct(output, item.answer))
        row = _empty_row("gsm8k", item.id, prompt)
        row.update(output=output, reference=item.answer, score=correct, exact_match=correct)
        rows.append(row)
    return rows


def score_hotpotqa(
    model: Any,
    tokenizer: Any,
    items: Sequence[QaItem],
    *,
    edit: EditLike | None = None,
    batch_size: int = 8,
    max_new_tokens: int = HOTPOTQA_MAX_NEW_TOKENS,
    engine: Any = None,
) -> list[dict[str, Any]]:
    prompts = [render_prompt(tokenizer, HOTPOTQA_INSTRUCTION.format(question=item.question)) for item in items]
    outputs = generate_texts(
        model, tokenizer, prompts, edit=edit, max_new_tokens=max_new_tokens,
        repetition_penalty=HOTPOTQA_REPETITION_PENALTY, batch_size=batch_size, engine=engine,
        label="HotpotQA answers",
    )
    rows = []
    for item, prompt, output in zip(items, prompts, outputs, strict=True):
        answer = extract_short_answer(output)
        row = _empty_row("hotpotqa", item.id, prompt)
        f1 = token_f1(answer, item.answer)
        row.update(output=output, reference=item.answer, exact_match=exact_match(answer, item.answer), f1=f1, score=f1)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Benchmarks


def load_items(name: str) -> list[Any]:
    """The full item list of a benchmark (from the pinned datasets)."""
    from dpnle import datasets

    loaders: dict[str, Callable[[], list[Any]]] = {
        "gsm8k": datasets.load_gsm8k,
        "mmlu": datasets.load_mmlu,
        "arc": datasets.load_arc_challenge,
        "hellaswag": datasets.load_hellaswag,
        "truthfulqa": lambda: datasets.load_truthfulqa_mc1(shuffle_seed=TRUTHFULQA_SHUFFLE_SEED),
        "hotpotqa": datasets.load_hotpotqa,
    }
    return loaders[_check_name(name)]()


def _check_name(name: str) -> str:
    key = name.strip().lower()
    if key not in BENCHMARKS:
        raise CapabilityError(f"Unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}.")
    return key


def select_subset(items: Sequence[Any], name: str, limit: int | None, seed: int = 0) -> list[Any]:
    """A seeded random subset of ``limit`` items in dataset order (all items if limit is None)."""
    if limit is not None and limit < 1:  # checked first: a negative limit never means "all items"
        raise CapabilityError(f"limit must be at least 1 (None for all items), not {limit}.")
    if limit is None or limit >= len(items):
        return list(items)
    # A string seed is hashed deterministically by random.Random (independent of PYTHONHASHSEED).
    rng = random.Random(f"dpnle-capability/{name}/{seed}")
    chosen = sorted(rng.sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def run_benchmark(
    model: Any,
    tokenizer: Any,
    name: str,
    *,
    edit: EditLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    items: Sequence[Any] | None = None,
    max_new_tokens: int | None = None,
    engine: Any = None,
) -> pd.DataFrame:
    """Score one benchmark; one row per item (columns: :data:`ROW_COLUMNS`).

    ``engine`` (a :class:`dpnle.engines.VLLMEngine`) generates for GSM8K and HotpotQA; the
    log-likelihood benchmarks always run on ``model``.

    ``items`` replaces the dataset (custom or test items); ``limit`` and ``seed`` pick the subset
    as described in the module docstring. ``max_new_tokens`` overrides the reference's value for
    the generation benchmarks (for quick runs; results are then not comparable to the paper).
    """
    key = _check_name(name)
    pool = list(items) if items is not None else load_items(key)
    chosen = select_subset(pool, key, limit, seed)
    if key in MC_BENCHMARKS:
        rows = score_multiple_choice(model, tokenizer, key, chosen, edit=edit, batch_size=batch_size)
    elif key == "gsm8k":
        rows = score_gsm8k(
            model, tokenizer, chosen, edit=edit, batch_size=batch_size,
            max_new_tokens=max_new_tokens or GSM8K_MAX_NEW_TOKENS, engine=engine,
        )
    else:
        rows = score_hotpotqa(
            model, tokenizer, chosen, edit=edit, batch_size=batch_size,
            max_new_tokens=max_new_tokens or HOTPOTQA_MAX_NEW_TOKENS, engine=engine,
        )
    frame = pd.DataFrame(rows, columns=ROW_COLUMNS)
    for column in ("correct_index", "pred_index"):
        frame[column] = frame[column].astype(np.int64)
    return frame


def summarize(df: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Per benchmark (and per ``by`` columns, e.g. method, direction, gamma): the reported metric's
    mean (``accuracy``), its standard error (sample sd / sqrt(n)), n, and the mean chance level;
    also acc, acc_norm, exact_match and f1 where they apply."""
    keys = [*by, "benchmark"]
    rows = []
    for group, part in df.groupby(keys, sort=True, dropna=False):
        values = part["score"].astype(float).dropna()
        n = int(len(values))
        stderr = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        record = dict(zip(keys, group if isinstance(group, tuple) else (group,), strict=True))
        record.update(
            metric=str(part["metric"].iloc[0]),
            n=n,
            accuracy=float(values.mean()) if n else float("nan"),
            stderr=stderr,
            chance=float(part["chance"].astype(float).mean()),
        )
        for extra in ("acc", "acc_norm", "exact_match", "f1"):
            column = part[extra].astype(float) if extra in part else pd.Series(dtype=float)
            record[extra] = float(column.mean()) if column.notna().any() else float("nan")
        rows.append(record)
    columns = [*keys, "metric", "n", "accuracy", "stderr", "chance", "acc", "acc_norm", "exact_match", "f1"]
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------------------------
# KL divergence and perplexity on neutral text


def neutral_texts_path() -> Path:
    return project_data_dir() / "neutral_text.txt"


def load_neutral_texts(path: str | Path | None = None) -> list[str]:
    source = Path(path) if path is not None else neutral_texts_path()
    texts = [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise CapabilityError(f"{source} holds no text.")
    return texts


def _text_request(tokenizer: Any, text: str) -> Continuation:
    """A text as the continuation of what the tokenizer puts before any text (a BOS), or of its
    own first token when it puts nothing there."""
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
    body = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not prefix:
        prefix, body = body[:1], body[1:]
    if not body:
        raise CapabilityError(f"Text too short to score: {text!r}.")
    return Continuation(tuple(prefix), tuple(body))


@dataclass
class NeutralReference:
    """The unedited model's next-token log-probabilities on the neutral texts, batch by batch.

    Every condition of an evaluation compares against the same unedited pass; computing it once
    per process saves one forward pass over the corpus per edited condition."""

    corpus_digest: str
    batch_size: int
    log_probs: list[torch.Tensor]  # per batch: [batch, continuation, vocab] float32


def _corpus_digest(corpus: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\x00".join(corpus).encode()).hexdigest()


@torch.no_grad()
def neutral_reference(
    model: Any,
    tokenizer: Any,
    *,
    texts: Sequence[str] | None = None,
    batch_size: int = 8,
    max_bytes: int = 1 << 30,
) -> NeutralReference | None:
    """The unedited pass of :func:`kl_and_perplexity`, kept in memory; None when it would take
    more than ``max_bytes`` (then every call recomputes it)."""
    corpus, requests, layouts = _neutral_layouts(model, tokenizer, texts, batch_size)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    tokens = sum(len(r.continuation_ids) for r in requests)
    if tokens * vocab * 4 > max_bytes:
        return None
    kept = [torch.log_softmax(_continuation_logits(model, layout), dim=-1) for layout in layouts]
    return NeutralReference(_corpus_digest(corpus), batch_size, kept)


def _neutral_layouts(
    model: Any, tokenizer: Any, texts: Sequence[str] | None, batch_size: int
) -> tuple[list[str], list[Continuation], Iterator[_Layout]]:
    """The neutral corpus (``texts`` or the bundled set), its requests, and its batches laid out
    on the model's device, in the fixed order both the reference and the edited pass use."""
    corpus = list(texts) if texts is not None else load_neutral_texts()
    requests = [_text_request(tokenizer, t) for t in corpus]
    device = input_device(model)
    pad_id = pad_token_id(tokenizer)
    layouts = (_layout([requests[i] for i in index], pad_id, device)
               for index in _length_batches(requests, batch_size))
    return corpus, requests, layouts


@torch.no_grad()
def kl_and_perplexity(
    model: Any,
    tokenizer: Any,
    *,
    edit: EditLike | None = None,
    texts: Sequence[str] | None = None,
    batch_size: int = 8,
    reference: NeutralReference | None = None,
) -> dict[str, float]:
    """Token-averaged KL(unedited || edited) of the next-token distributions over the neutral
    texts, and the perplexity of both models on them.

    Returns ``kl`` (nats per token), ``perplexity`` (edited; equals the unedited one when
    ``edit`` is None), ``perplexity_unedited``, ``nll`` / ``nll_unedited`` (mean nats per token),
    ``n_tokens`` and ``n_texts``. Without an edit the second pass is skipped and KL is 0 exactly.
    ``reference`` (from :func:`neutral_reference`, same texts and batch size) replaces the
    unedited pass.
    """
    corpus, _, layouts = _neutral_layouts(model, tokenizer, texts, batch_size)
    if reference is not None and (reference.corpus_digest != _corpus_digest(corpus)
                                  or reference.batch_size != batch_size):
        raise ValueError("The neutral reference was computed on other texts or another batch size.")
    kl_sum = nll_base = nll_edit = 0.0
    count = 0
    for number, layout in enumerate(layouts):
        if reference is not None:
            base = reference.log_probs[number]
        else:
            base = torch.log_softmax(_continuation_logits(model, layout), dim=-1)
        if edit is None:
            edited = base
        else:
            with edit.apply(model, prompt_length=layout.prompt_length):
                edited = torch.log_softmax(_continuation_logits(model, layout), dim=-1)
        mask = layout.continuation_mask
        target = layout.continuation_ids.unsqueeze(-1)
        kl = (base.exp() * (base - edited)).sum(-1).clamp(min=0.0)
        kl_sum += float((kl * mask).sum())
        nll_base -= float((base.gather(-1, target).squeeze(-1) * mask).sum())
        nll_edit -= float((edited.gather(-1, target).squeeze(-1) * mask).sum())
        count += int(mask.sum())
    return {
        "kl": kl_sum / count,
        "perplexity": math.exp(nll_edit / count),
        "perplexity_unedited": math.exp(nll_base / count),
        "nll": nll_edit / count,
        "nll_unedited": nll_base / count,
        "n_tokens": float(count),
        "n_texts": float(len(corpus)),
    }


__all__ = [
    "NeutralReference",
    "BENCHMARKS",
    "GENERATION_BENCHMARKS",
    "GSM8K_MAX_NEW_TOKENS",
    "GSM8K_REPETITION_PENALTY",
    "HOTPOTQA_MAX_NEW_TOKENS",
    "HOTPOTQA_REPETITION_PENALTY",
    "MC_BENCHMARKS",
    "METRICS",
    "CapabilityError",
    "Continuation",
    "EditLike",
    "continuation_logprobs",
    "edit_context",
    "encode_continuation",
    "exact_match",
    "extract_last_number",
    "extract_short_answer",
    "generate_texts",
    "gsm8k_correct",
    "kl_and_perplexity",
    "neutral_reference",
    "load_items",
    "load_neutral_texts",
    "mc_prompt",
    "normalize_answer",
    "normalize_number",
    "run_benchmark",
    "score_multiple_choice",
    "select_subset",
    "summarize",
    "token_f1",
]
