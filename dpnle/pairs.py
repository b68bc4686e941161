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
search questions can be passed as a file. PersonalityBench's *test* questions are evaluation
data and never enter a pair.

Prompt template: :data:`DPNLE_TEMPLATE` is the reference's ``PERSONALITY_PROMPT_TEMPLATE``
(``src/dpn_le/utils.py`` of github.com/Z1ivan/DPN-LE @3fb5e72): instruction, persona
description, question and ``###Response:`` separated by blank lines. It is the default of the
personalitybench and values recipes (template id :data:`TEMPLATE_ID`). Pair sets made before
it used :data:`LEGACY_TEMPLATE` (single newlines, id ``single-newline``); their messages, hence
their digest, differ, so a capture made from them is refused as made from another pair set.

Pair sampling (``pair_sampling``):

- ``dpnle`` (default): dpnle's own draw (numpy, seeded per concept by ``seed``): the question
  pool cycled in fresh permutations, personas drawn uniformly, no pair repeated.
- ``reference``: the reference's ``build_contrastive_samples``
  (``src/dpn_le/personalitybench.py``), personalitybench recipe only: the trait's first N
  PersonalityBench *search* questions (``NPTI/dataset/search/<Trait>.json``; registry entries
  ``pb-search-<trait>``, not in the offline mirror) in file order, and one
  ``random.Random(pair_seed)`` (42 by default) drawing ``choice`` over the trait's 80 high
  descriptions once per question for all questions, then ``choice`` over the 80 low ones once
  per question; pair k is question k with the k-th high and the k-th low draw. Descriptions are
  in the order of ``description.json``'s lines, question text is used as the file has it
  (unstripped), and pairs may repeat, as in the reference.

A pair set records how it was made in ``frame.attrs["pairs_info"]`` (template, sampling,
seed, question source), which :func:`write_pairs` writes into the pair file's metadata and the
capture copies into its manifest.
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dpnle import vocab
from dpnle.concepts import Concept, get_concept
from dpnle.errors import DpnleError
from dpnle.paths import project_data_dir

DPNLE_TEMPLATE = (
    "You will find a personality description followed by a question below. I want you to fully "
    "immerse yourself in the persona described.\n\n###Personality description: {description}\n\n"
    "###Question: {question}\n\n###Response:"
)
TEMPLATE_ID = "dpn-le-blank-lines"
# The template of pair sets made before TEMPLATE_ID was recorded (kept to name it in messages).
LEGACY_TEMPLATE = DPNLE_TEMPLATE.replace("\n\n", "\n")
LEGACY_TEMPLATE_ID = "single-newline"
PERSONA_STATEMENT_TEMPLATE = 'Is the following statement something you would say?\n"{statement}"'
# NPTI's search prompt (``TEMPLATE`` of NPTI/code/search_neuron.py, RUCAIBox/NPTI @630d2a2), used
# by ``collect-activations --npti-protocol reference``: a leading newline, no space after the
# colons, blank lines between sections and a trailing newline, exactly as the reference has it.
NPTI_TEMPLATE = (
    "\nYou will find a personality description followed by a question below. I want you to forget who you "
    "are and fully immerse yourself in the persona described, adopting not only their perspective but also "
    "their tone and attitude. With this new identity in mind, please respond to the question.\n"
    "Don't overthink your response\u2014just begin writing and let your thoughts flow naturally. Spelling "
    "and grammar are not important here; what's essential is capturing the essence of this personality in "
    "your answer. Try to keep your response under 300 words.\n"
    "###Personality description:{personality}\n\n###Question:{question}\n\n###Response:\n"
)

RECIPES = vocab.PAIR_RECIPES
DEFAULT_NUM_PAIRS = 1000
DEFAULT_SEED = 0
PAIR_SAMPLINGS = vocab.PAIR_SAMPLINGS
DEFAULT_PAIR_SAMPLING: vocab.PairSampling = "dpnle"
REFERENCE_PAIR_SEED = 42  # build_steering_data.py's --seed default

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


class PairsError(ValueError, DpnleError):
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
    recipe: vocab.PairRecipe | None = None,
    num_pairs: int = DEFAULT_NUM_PAIRS,
    seed: int = DEFAULT_SEED,
    questions_path: str | Path | None = None,
    pair_sampling: vocab.PairSampling = DEFAULT_PAIR_SAMPLING,
    pair_seed: int | None = None,
) -> pd.DataFrame:
    """Build ``num_pairs`` question-matched contrastive pairs for ``concept`` (deterministic in
    ``seed`` for dpnle's sampling, in ``pair_seed`` for the reference's; see the module docstring).

    ``pair_sampling="reference"`` reproduces the reference's pairs (personalitybench recipe only);
    ``questions_path`` may then name the trait's search file, or a folder holding
    ``<Trait>.json`` (or ``search/<Trait>.json``), instead of the ``pb-search-<trait>`` download.
    ``pair_seed`` (default 42) is the reference's seed; dpnle's sampling takes ``seed`` instead.
    """
    concept = concept if isinstance(concept, Concept) else get_concept(concept)
    recipe = recipe or default_recipe(concept)
    check_pair_sampling(pair_sampling, pair_seed)
    vocab.check_choice("pair recipe", recipe, RECIPES, error=PairsError)
    if num_pairs < 1:
        raise PairsError("The number of pairs must be at least 1.")
    if recipe in ("personalitybench", "anthropic-persona") and concept.kind != "trait":
        raise PairsError(f"Recipe {recipe!r} covers the Big Five traits only; for {concept.name!r} use 'values'.")
    if recipe == "values" and concept.kind != "value":
        raise PairsError(f"Recipe 'values' covers Schwartz values only; for {concept.name!r} use 'personalitybench'.")
    if pair_sampling == "reference":
        if recipe != "personalitybench":
            raise PairsError(
                f"--pair-sampling reference reproduces the reference's personalitybench pairs (Big Five traits); "
                f"recipe {recipe!r} has no reference sampling: drop --pair-sampling or use --recipe personalitybench."
            )
        seed_used = REFERENCE_PAIR_SEED if pair_seed is None else int(pair_seed)
        frame, source = _reference_pairs(concept, num_pairs, seed_used, questions_path)
        return _with_info(frame, recipe, "reference", seed_used, source)
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
        rows = [
            _description_pair_row(pool[q_idx[k]], high[h_idx[k]], low[l_idx[k]]) for k in range(num_pairs)
        ]
    source = None
    if recipe != "anthropic-persona":
        source = str(questions_path) if questions_path else "dpnle:data/questions.jsonl"
    return _with_info(_pair_frame(rows, concept.name, recipe), recipe, "dpnle", seed, source)


def _description_pair_row(question: Question, high: tuple[str, str], low: tuple[str, str]) -> dict[str, Any]:
    """One pair of the description recipes: the question under a high and a low (id, description)."""
    (hid, htext), (lid, ltext) = high, low
    return {
        "question_id": question.id,
        "question": question.text,
        "high_description_id": hid,
        "low_description_id": lid,
        "high_message": DPNLE_TEMPLATE.format(description=htext, question=question.text),
        "low_message": DPNLE_TEMPLATE.format(description=ltext, question=question.text),
        "high_response_prefix": "",
        "low_response_prefix": "",
    }


def _pair_frame(rows: list[dict], concept: str, recipe: str) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame.insert(0, "pair_id", np.arange(len(frame), dtype=np.int64))
    frame.insert(1, "concept", concept)
    frame.insert(2, "recipe", recipe)
    return frame[PAIR_COLUMNS]


def _with_info(frame: pd.DataFrame, recipe: str, sampling: str, seed: int, questions: str | None) -> pd.DataFrame:
    frame = frame.copy()
    frame.attrs["pairs_info"] = {
        "template": None if recipe == "anthropic-persona" else TEMPLATE_ID,
        "pair_sampling": sampling,
        "pair_seed": int(seed),
        "questions": questions,
    }
    return frame


def pairs_info(pairs: pd.DataFrame) -> dict:
    """How ``pairs`` were made (template, sampling, seed, question source): what
    :func:`make_pairs` recorded, or, for a frame that lost it, what the data can still tell."""
    info = dict(pairs.attrs.get("pairs_info") or {})
    if not info:
        info = {"template": None, "pair_sampling": None, "pair_seed": None, "questions": None}
        messages = pairs["high_message"].astype(str) if "high_message" in pairs else pd.Series([], dtype=str)
        if len(messages):
            first = messages.iloc[0]
            if first.startswith(DPNLE_TEMPLATE.split("{description}")[0]):
                info["template"] = TEMPLATE_ID
            elif first.startswith(LEGACY_TEMPLATE.split("{description}")[0]):
                info["template"] = LEGACY_TEMPLATE_ID
    return info


def check_pair_sampling(pair_sampling: vocab.PairSampling, pair_seed: int | None = None) -> None:
    vocab.check_choice("pair sampling", pair_sampling, PAIR_SAMPLINGS, error=PairsError,
                       hint="(e.g. --pair-sampling reference)")
    if pair_seed is not None and pair_sampling != "reference":
        raise PairsError(
            "--pair-seed is the seed of --pair-sampling reference; dpnle's own sampling takes --seed."
        )


def _search_file(concept: Concept, questions_path: str | Path | None) -> tuple[Path, str]:
    """The trait's PersonalityBench search file and how to name it in a record: ``questions_path``
    (a file, or a folder holding ``<Trait>.json`` or ``search/<Trait>.json``), else the cached
    ``pb-search-<trait>`` entry."""
    from dpnle import datasets

    name = f"{concept.name.capitalize()}.json"
    if questions_path is not None:
        given = Path(questions_path).expanduser()
        if given.is_dir():
            for candidate in (given / name, given / "search" / name):
                if candidate.is_file():
                    return candidate, str(candidate)
            raise PairsError(f"{given} holds no {name} (nor search/{name}): pass the folder of PersonalityBench's "
                             "search files, or the trait's file itself.")
        if not given.is_file():
            raise PairsError(f"Search-question file {given} does not exist.")
        return given, str(given)
    try:
        path = datasets.fetch(f"pb-search-{concept.name}")
        entry = datasets.get_entry(f"pb-search-{concept.name}")
        return path, f"{entry.name} ({entry.source}:{entry.path})"
    except datasets.DatasetError as exc:
        entries = [datasets.get_entry(n) for n in datasets.GROUPS["pb-search"]]
        files = ", ".join(e.path.rsplit("/", 1)[-1] for e in entries)
        entry = datasets.get_entry(f"pb-search-{concept.name}")
        reason = " ".join(str(exc).split())
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise PairsError(
            f"--pair-sampling reference needs PersonalityBench's search questions ({entry.owner}/{entry.repo}"
            f"@{entry.commit[:7]} {entry.path.rsplit('/', 1)[0]}/{{{files}}}), which are not in the offline mirror "
            f"and not cached here ({reason}). Run `dpnle data fetch pb-search` on a machine with internet and copy "
            f"its cache ({datasets.datasets_cache_dir()}) here, or pass a local copy: --questions "
            f"PATH/{entry.path.rsplit('/', 1)[-1]} (or the folder holding the five files)."
        ) from None


def _reference_pairs(
    concept: Concept, num_pairs: int, seed: int, questions_path: str | Path | None
) -> tuple[pd.DataFrame, str]:
    """The reference's ``build_contrastive_samples`` as a pair set (see the module docstring)."""
    from dpnle import datasets

    source, label = _search_file(concept, questions_path)
    questions = datasets.load_pb_search(concept.name, path=source, strip=False)[:num_pairs]
    if len(questions) < num_pairs:
        raise PairsError(
            f"{source} holds {len(questions)} search questions for {concept.name!r}; reference sampling takes the "
            f"first --num-pairs of them: pass --num-pairs {len(questions)} or fewer."
        )
    descriptions = datasets.load_pb_descriptions(concept.name, strip=False)
    high = [(f"pb-{d.index}", d.text) for d in descriptions if d.pole == "high"]  # description.json line order
    low = [(f"pb-{d.index}", d.text) for d in descriptions if d.pole == "low"]
    rng = random.Random(seed)
    high_draws = [rng.choice(high) for _ in questions]  # every high draw first, as the reference
    low_draws = [rng.choice(low) for _ in questions]
    rows = [_description_pair_row(q, h, lo) for q, h, lo in zip(questions, high_draws, low_draws, strict=True)]
    return _pair_frame(rows, concept.name, "personalitybench"), label


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


def default_pairs_path(
    concept: str, recipe: str, num_pairs: int, seed: int, pair_sampling: str = DEFAULT_PAIR_SAMPLING
) -> Path:
    """``seed``: the seed of ``pair_sampling`` (``--seed`` for dpnle's, ``--pair-seed`` for the reference's)."""
    from dpnle.paths import cache_dir

    mode = "" if pair_sampling == DEFAULT_PAIR_SAMPLING else f"-{pair_sampling}"
    return cache_dir() / "pairs" / f"{concept}-{recipe}{mode}-n{num_pairs}-seed{seed}.parquet"


def write_pairs(pairs: pd.DataFrame, path: str | Path, seed: int, questions_path: str | Path | None) -> Path:
    """Write ``pairs`` with metadata saying how they were made: the prompt template, the pair
    sampling and its seed (``pair_sampling``, ``pair_seed``) and the question source, as
    :func:`make_pairs` recorded them (:func:`pairs_info`), and their digest."""
    from dpnle.runs import write_parquet

    info = pairs_info(pairs)
    meta = {
        "kind": "pairs",
        "concept": str(pairs["concept"].iloc[0]),
        "recipe": str(pairs["recipe"].iloc[0]),
        "num_pairs": int(len(pairs)),
        "seed": seed,
        "questions": str(questions_path) if questions_path else "dpnle:data/questions.jsonl",
        **{k: v for k, v in info.items() if v is not None or k != "questions"},
        "digest": pairs_digest(pairs),
    }
    return write_parquet(path, pairs, metadata=meta)


def npti_message(message: str, question: str) -> str:
    """The NPTI search prompt (:data:`NPTI_TEMPLATE`) for the persona and question of a pair side.

    ``message`` is the side's DPN-LE message (``high_message`` / ``low_message``, made with
    :data:`DPNLE_TEMPLATE` or its single-newline predecessor) and ``question`` the pair's
    question: the persona description is the text between the template's fixed parts. A message
    of another form (the anthropic-persona recipe has no persona description) is a
    :class:`PairsError`.
    """
    for template in dict.fromkeys((DPNLE_TEMPLATE, DPNLE_TEMPLATE.replace("\n\n", "\n"))):
        head, tail = template.split("{description}")
        tail = tail.format(question=question)
        if message.startswith(head) and message.endswith(tail) and len(message) >= len(head) + len(tail):
            description = message[len(head) : len(message) - len(tail)]
            return NPTI_TEMPLATE.format(personality=description, question=question)
    raise PairsError(
        "The NPTI reference protocol rebuilds each prompt from the pair's persona description and question, "
        f"but this message is not a DPN-LE persona prompt: {message[:80]!r}... Use pairs of the personalitybench "
        "or values recipe (the anthropic-persona recipe has no persona description)."
    )
