"""Contrastive pairs: the same question, answered once in a high-concept and once in a
low-concept persona.

A pair set is model-independent: it stores the user message of each side (DPN-LE's prompt
template filled in) and an optional response prefix (the " Yes" / " No" of the Anthropic
persona recipe). The capture stage renders the messages with the model's own chat template.

Recipes:

- ``personalitybench`` (traits, the paper's): PersonalityBench's 80 high and 80 low persona
  descriptions per trait, crossed with a question pool.
- ``anthropic-persona`` (traits, CAA-style): one of Anthropic's persona statements, asked as
  "Is the following statement something you would say?", answered with the trait-matching
  answer on the high side and the other answer on the low side.
- ``values`` (the ten Schwartz values): dpnle's own high and low value personas
  (``data/value_personas.json``), crossed with the same question pool.

The question pool is dpnle's own (``data/questions.jsonl``); PersonalityBench's original
search questions can be passed as a file for a paper-exact run. PersonalityBench's *test*
questions are evaluation data and never enter a pair.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dpnle.concepts import Concept, get_concept
from dpnle.paths import project_data_dir

DPNLE_TEMPLATE = (
    "You will find a personality description followed by a question below. I want you to fully "
    "immerse yourself in the persona described.\n###Personality description: {description}\n"
    "###Question: {question}\n###Response:"
)
PERSONA_STATEMENT_TEMPLATE = 'Is the following statement something you would say?\n"{statement}"'

RECIPES = ("personalitybench", "anthropic-persona", "values")
DEFAULT_NUM_PAIRS = 1000
DEFAULT_SEED = 0

PAIR_COLUMNS = [
    "pair_id",
    "concept",
    "recipe",
    "question_id",
    "question",
    "high_description_id",
    "low_description_id",
    "high_message",
    "low_message",
    "high_response_prefix",
    "low_response_prefix",
]


class PairsError(ValueError):
    pass


@dataclass(frozen=True)
class Question:
    id: str
    text: str


def default_recipe(concept: Concept) -> str:
    return "personalitybench" if concept.kind == "trait" else "values"


def load_question_pool(path: str | Path | None = None) -> list[Question]:
    """dpnle's question pool, or a user file of JSON lines with a ``question`` key (e.g.
    PersonalityBench's search questions)."""
    source = Path(path) if path is not None else project_data_dir() / "questions.jsonl"
    if not source.exists():
        raise PairsError(f"Question file {source} does not exist.")
    questions = []
    for lineno, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise PairsError(f"{source}:{lineno} is not a JSON line.") from None
        text = row.get("question")
        if not isinstance(text, str) or not text.strip():
            raise PairsError(f"{source}:{lineno} has no 'question' text.")
        questions.append(Question(str(row.get("id", f"{source.stem}-{lineno}")), text.strip()))
    if not questions:
        raise PairsError(f"{source} holds no questions.")
    return questions


def load_value_personas(path: str | Path | None = None) -> dict[str, dict[str, list[str]]]:
    source = Path(path) if path is not None else project_data_dir() / "value_personas.json"
    data = json.loads(Path(source).read_text(encoding="utf-8"))
    return data["values"]


def _concept_rng(concept: str, recipe: str, seed: int) -> np.random.Generator:
    # A stable per-concept stream: the same (concept, recipe, seed) gives the same pairs on any machine.
    return np.random.default_rng([seed, zlib.crc32(f"{concept}/{recipe}".encode())])


def _cycled_permutation(rng: np.random.Generator, pool_size: int, count: int) -> np.ndarray:
    """``count`` indices into a pool: each pass is a fresh permutation, so every item is used
    once before any is used twice."""
    passes = -(-count // pool_size)
    return np.concatenate([rng.permutation(pool_size) for _ in range(passes)])[:count]


def make_pairs(
    concept: str | Concept,
    recipe: str | None = None,
    num_pairs: int = DEFAULT_NUM_PAIRS,
    seed: int = DEFAULT_SEED,
    questions_path: str | Path | None = None,
) -> pd.DataFrame:
    """Build ``num_pairs`` question-matched contrastive pairs for ``concept`` (deterministic in ``seed``)."""
    concept = concept if isinstance(concept, Concept) else get_concept(concept)
    recipe = recipe or default_recipe(concept)
    if recipe not in RECIPES:
        raise PairsError(f"Unknown pair recipe {recipe!r}; choose one of {', '.join(RECIPES)}.")
    if num_pairs < 1:
        raise PairsError("The number of pairs must be at least 1.")
    if recipe in ("personalitybench", "anthropic-persona") and concept.kind != "trait":
        raise PairsError(f"Recipe {recipe!r} covers the Big Five traits only; for {concept.name!r} use 'values'.")
    if recipe == "values" and concept.kind != "value":
        raise PairsError(f"Recipe 'values' covers Schwartz values only; for {concept.name!r} use 'personalitybench'.")
    rng = _concept_rng(concept.name, recipe, seed)

    if recipe == "anthropic-persona":
        rows = _anthropic_pairs(concept, num_pairs, rng)
    else:
        if recipe == "personalitybench":
            from dpnle import datasets

            descriptions = datasets.load_pb_descriptions(concept.name)
            high = [(f"pb-{d.index}", d.text) for d in descriptions if d.pole == "high"]
            low = [(f"pb-{d.index}", d.text) for d in descriptions if d.pole == "low"]
        else:
            personas = load_value_personas()[concept.name]
            high = [(f"{concept.name}-high-{i}", t) for i, t in enumerate(personas["high"])]
            low = [(f"{concept.name}-low-{i}", t) for i, t in enumerate(personas["low"])]
        pool = load_question_pool(questions_path)
        distinct = len({q.text for q in pool}) * len({t for _, t in high}) * len({t for _, t in low})
        if num_pairs > distinct:
            raise PairsError(
                f"Recipe {recipe!r} makes at most {distinct} distinct pairs for {concept.name!r} (questions x high "
                f"x low personas); pass --num-pairs {distinct} or fewer."
            )
        q_idx = _cycled_permutation(rng, len(pool), num_pairs)
        h_idx = rng.integers(0, len(high), size=num_pairs)
        l_idx = rng.integers(0, len(low), size=num_pairs)
        _redraw_duplicates(rng, pool, high, low, q_idx, h_idx, l_idx, recipe, concept.name)
        rows = []
        for k in range(num_pairs):
            q = pool[q_idx[k]]
            (hid, htext), (lid, ltext) = high[h_idx[k]], low[l_idx[k]]
            rows.append(
                {
                    "question_id": q.id,
                    "question": q.text,
                    "high_description_id": hid,
                    "low_description_id": lid,
                    "high_message": DPNLE_TEMPLATE.format(description=htext, question=q.text),
                    "low_message": DPNLE_TEMPLATE.format(description=ltext, question=q.text),
                    "high_response_prefix": "",
                    "low_response_prefix": "",
                }
            )
    frame = pd.DataFrame(rows)
    frame.insert(0, "pair_id", np.arange(len(frame), dtype=np.int64))
    frame.insert(1, "concept", concept.name)
    frame.insert(2, "recipe", recipe)
    return frame[PAIR_COLUMNS]


def _redraw_duplicates(
    rng: np.random.Generator,
    pool: list[Question],
    high: list[tuple[str, str]],
    low: list[tuple[str, str]],
    q_idx: np.ndarray,
    h_idx: np.ndarray,
    l_idx: np.ndarray,
    recipe: str,
    concept: str,
) -> None:
    """Make every pair distinct (in place): a question drawn again may draw the same two personas
    again; such a pair takes personas not yet paired with that question. A draw without such a
    repeat is left as it was, so its pair set (and digest) is the same as before this check."""
    seen: set[tuple[str, str, str]] = set()
    for k in range(len(q_idx)):
        question = pool[q_idx[k]].text
        key = (question, high[h_idx[k]][1], low[l_idx[k]][1])
        if key in seen:
            free = [(h, lo) for h in range(len(high)) for lo in range(len(low))
                    if (question, high[h][1], low[lo][1]) not in seen]
            if not free:
                raise PairsError(
                    f"Recipe {recipe!r} has no persona pair left for the question {question!r} of {concept!r} "
                    f"(it repeats in the question pool); pass fewer --num-pairs, or a question file without repeats."
                )
            h_idx[k], l_idx[k] = free[int(rng.integers(0, len(free)))]
            key = (question, high[h_idx[k]][1], low[l_idx[k]][1])
        seen.add(key)


def _anthropic_pairs(concept: Concept, num_pairs: int, rng: np.random.Generator) -> list[dict]:
    from dpnle import datasets

    statements = datasets.load_anthropic_persona(concept.name)
    if num_pairs > len(statements):
        raise PairsError(
            f"Recipe 'anthropic-persona' has {len(statements)} statements for {concept.name!r}, one pair each; "
            f"pass --num-pairs {len(statements)} or fewer (or the personalitybench recipe for more pairs)."
        )
    order = _cycled_permutation(rng, len(statements), num_pairs)
    rows = []
    for k in range(num_pairs):
        s = statements[order[k]]
        message = PERSONA_STATEMENT_TEMPLATE.format(statement=s.statement)
        rows.append(
            {
                "question_id": f"anthropic-{order[k]}",
                "question": s.statement,
                "high_description_id": "",
                "low_description_id": "",
                "high_message": message,
                "low_message": message,
                "high_response_prefix": s.answer_matching_behavior.strip(),
                "low_response_prefix": s.answer_not_matching_behavior.strip(),
            }
        )
    return rows


def pairs_digest(pairs: pd.DataFrame) -> str:
    """Content hash of a pair set (what a run records to detect a changed pair set)."""
    h = hashlib.sha256()
    for col in PAIR_COLUMNS:
        h.update(col.encode())
        h.update(pd.util.hash_pandas_object(pairs[col].astype(str), index=False).values.tobytes())
    return h.hexdigest()


def to_samples(pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt: sample_id = 2 * pair_id + (0 for high, 1 for low)."""
    high = pd.DataFrame(
        {
            "sample_id": pairs["pair_id"].to_numpy() * 2,
            "pair_id": pairs["pair_id"].to_numpy(),
            "pole": "high",
            "message": pairs["high_message"].to_numpy(),
            "response_prefix": pairs["high_response_prefix"].to_numpy(),
        }
    )
    low = pd.DataFrame(
        {
            "sample_id": pairs["pair_id"].to_numpy() * 2 + 1,
            "pair_id": pairs["pair_id"].to_numpy(),
            "pole": "low",
            "message": pairs["low_message"].to_numpy(),
            "response_prefix": pairs["low_response_prefix"].to_numpy(),
        }
    )
    return pd.concat([high, low]).sort_values("sample_id", kind="stable").reset_index(drop=True)


def render_prompt(tokenizer, message: str, response_prefix: str = "") -> str:
    """The prompt text the model sees: the message in the model's chat template with the
    generation prompt added (plain text if the tokenizer has no template), then the prefix."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = message + "\n"
    return text + response_prefix


def default_pairs_path(concept: str, recipe: str, num_pairs: int, seed: int) -> Path:
    from dpnle.paths import cache_dir

    return cache_dir() / "pairs" / f"{concept}-{recipe}-n{num_pairs}-seed{seed}.parquet"


def write_pairs(pairs: pd.DataFrame, path: str | Path, seed: int, questions_path: str | Path | None) -> Path:
    from dpnle.runs import write_parquet

    meta = {
        "kind": "pairs",
        "concept": str(pairs["concept"].iloc[0]),
        "recipe": str(pairs["recipe"].iloc[0]),
        "num_pairs": int(len(pairs)),
        "seed": seed,
        "questions": str(questions_path) if questions_path else "dpnle:data/questions.jsonl",
        "digest": pairs_digest(pairs),
    }
    return write_parquet(path, pairs, metadata=meta)
