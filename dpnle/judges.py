"""Open-ended evaluation: answer PersonalityBench test questions under an edit, rate the answers.

A judge rates one answer twice, on a 1-5 scale each: how strongly it expresses the trait (or
value), and how fluent it is, following the DPN-LE paper's protocol (two separate rubric
prompts, greedy judge). The rubric wording is dpnle's own.

Judge specs (``parse_judge``):

- ``openai:BASE_URL#MODEL``: any OpenAI-compatible chat-completions endpoint (GPT-4o for paper
  tables, a local vLLM / llama.cpp server otherwise). ``BASE_URL`` is what OpenAI clients call
  the base URL (``https://api.openai.com/v1``, ``http://127.0.0.1:8000/v1``); a URL that already
  ends in ``/chat/completions`` is used as is, one without a ``/v<N>`` path gets ``/v1`` added.
  The key comes from ``DPNLE_JUDGE_API_KEY`` or ``OPENAI_API_KEY`` (may be empty for local
  servers). Standard library HTTP only; bounded retries with exponential backoff on 429, 5xx,
  timeouts and connection errors.
- ``hf:MODEL``: a local Hugging Face model (anything :func:`dpnle.models.load_model` takes). The
  rating is the expected value of its next-token distribution over "1".."5" (every token that
  spells a digit counts toward it), renormalized over the five digits: no parsing, no sampling.
- ``none``: no rating (NaN scores), for runs without a judge.

Every rating is cached in SQLite, keyed by (judge spec, rubric version, trait, question, answer,
condition): a re-run costs nothing. The rubric version is a hash of the prompt templates, so
editing the rubric invalidates old entries by itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpnle.capability import EditLike, generate_texts
from dpnle.concepts import get_concept
from dpnle.pairs import DPNLE_TEMPLATE, render_prompt
from dpnle.paths import cache_dir

# PersonalityBench generation settings of the DPN-LE reference,
# experiments/personality_bench/evaluate.py (argparse defaults: --max_new_tokens 400,
# --repetition_penalty 1.15, --temperature 0 i.e. greedy, --batch_size 8).
PB_MAX_NEW_TOKENS = 400
PB_REPETITION_PENALTY = 1.15
PB_BATCH_SIZE = 8

API_KEY_ENVS = ("DPNLE_JUDGE_API_KEY", "OPENAI_API_KEY")
DIGITS = ("1", "2", "3", "4", "5")

# What a high score looks like, per concept: dpnle's own descriptions (the facets of each Big
# Five domain, and the motivational goal of each Schwartz value).
CONCEPT_MARKERS: dict[str, str] = {
    "openness": "curiosity, imagination, interest in art and beauty, awareness of one's own feelings, "
    "eagerness for new experiences, and enjoyment of ideas and unconventional views",
    "conscientiousness": "confidence in getting things done, orderliness, a sense of duty, striving "
    "for achievement, self-discipline, and thinking before acting",
    "extraversion": "warmth toward others, enjoyment of company, assertiveness, energy and a busy "
    "pace, a taste for excitement, and cheerful, positive emotions",
    "agreeableness": "trust in others, sincerity, generosity and care for others, willingness to "
    "cooperate rather than compete, modesty, and compassion",
    "neuroticism": "worry and nervousness, irritability or anger, sadness and discouragement, "
    "self-consciousness, difficulty resisting urges, and feeling overwhelmed under stress",
    "self_direction": "independent thought and action: choosing one's own goals, creating, exploring",
    "stimulation": "excitement, novelty, and challenge in life",
    "hedonism": "pleasure and sensuous gratification for oneself",
    "achievement": "personal success through demonstrating competence by social standards",
    "power": "social status and prestige, control or dominance over people and resources",
    "security": "safety, harmony, and stability of society, of relationships, and of self",
    "conformity": "restraint of actions and impulses likely to upset others or violate social norms",
    "tradition": "respect for and commitment to the customs and ideas of one's culture or religion",
    "benevolence": "preserving and enhancing the welfare of the people one is close to",
    "universalism": "understanding, tolerance, and protection of the welfare of all people and of nature",
}

TRAIT_RUBRIC = """You are an impartial rater of personality in writing.

Below is a question and the answer someone wrote to it. Rate how strongly the answer expresses \
the {kind} "{title}". A person high in {title} shows {markers}.

Rate only the {kind} that comes through in the answer: its attitudes, feelings and preferences. \
Ignore whether the answer is correct, how long it is, and how well it is written.
1 = not at all, or the opposite of {title}
2 = slightly
3 = moderately
4 = clearly
5 = very strongly, throughout the answer

[Question]
{question}

[Answer]
{answer}
[End of answer]

{ending}"""

FLUENCY_RUBRIC = """You are an impartial rater of writing quality.

Rate the fluency of the answer below: how smoothly and naturally it reads and how clearly it \
conveys its thoughts and feelings. Do not penalize casual language, and do not reward or \
penalize length. Repetition, broken sentences, incoherence and text that trails off lower the \
score.
1 = incoherent or broken
2 = hard to follow
3 = understandable but awkward
4 = fluent with minor flaws
5 = fully fluent and natural

[Answer]
{answer}
[End of answer]

{ending}"""

# An API judge may explain first; a local judge's rating is read off its next token.
API_ENDING = (
    "First give a brief justification of at most 30 words. Then give your rating on the last line "
    'in exactly this form: "Rating: [[N]]", with N from 1 to 5.'
)
LOCAL_ENDING = "Reply with a single digit from 1 to 5 and nothing else."
# A local judge's reply starts with the tokens of this text up to (not including) the digit;
# the rating is read at the digit's position. Taking the tokens from the whole string puts the
# space where the tokenizer puts it: its own token before a bare "3" (SmolLM2, Llama-3, Qwen2),
# or inside a " 3" token. A reply with no prefix at all leaves most of the mass off the digits.
LOCAL_RATING_PROBE = "Rating: 3"

RUBRIC_VERSION = "v1-" + hashlib.sha256(
    "\x00".join([TRAIT_RUBRIC, FLUENCY_RUBRIC, API_ENDING, LOCAL_ENDING, LOCAL_RATING_PROBE,
                 json.dumps(CONCEPT_MARKERS, sort_keys=True)]).encode()
).hexdigest()[:12]

# dpnle's own wording for the open-ended test prompt (same intent as the reference's: answer as
# a person, in your own voice, briefly).
PB_TEST_TEMPLATE = (
    "Answer the question below as yourself, a real person rather than an AI. Say what you honestly "
    "think and feel, in your own words, without overthinking it. Keep it under 300 words.\n\n"
    "Question: {question}"
)


class JudgeError(RuntimeError):
    pass


@dataclass(frozen=True)
class Rating:
    trait_score: float
    fluency: float
    raw: str


def trait_prompt(trait: str, question: str, answer: str, ending: str = API_ENDING) -> str:
    concept = get_concept(trait)
    kind = "personality trait" if concept.kind == "trait" else "personal value"
    return TRAIT_RUBRIC.format(
        kind=kind, title=concept.title, markers=CONCEPT_MARKERS[concept.name],
        question=question.strip(), answer=answer.strip(), ending=ending,
    )


def fluency_prompt(answer: str, ending: str = API_ENDING) -> str:
    return FLUENCY_RUBRIC.format(answer=answer.strip(), ending=ending)


_BRACKETED = re.compile(r"\[\[\s*([1-5](?:\.\d+)?)\s*\]\]")
_LABELLED = re.compile(r"rating\s*[:=]?\s*\**\s*([1-5](?:\.\d+)?)\b", re.IGNORECASE)


def parse_rating(text: str) -> float:
    """The last "[[N]]" in a judge's reply (else the last "Rating: N"); NaN if there is none."""
    for pattern in (_BRACKETED, _LABELLED):
        found = pattern.findall(text)
        if found:
            value = float(found[-1])
            if 1.0 <= value <= 5.0:
                return value
    return float("nan")


# ---------------------------------------------------------------------------------------------
# Cache


class RatingCache:
    """Ratings in a SQLite file; safe to share between threads of one process and between
    processes (SQLite locks the file)."""

    def __init__(self, path: str | Path) -> None:
        target = Path(path).expanduser()
        if target.suffix not in (".sqlite", ".sqlite3", ".db"):
            target = target / "judge_ratings.sqlite"
        target.parent.mkdir(parents=True, exist_ok=True)
        self.path = target
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(target), check_same_thread=False, timeout=30.0)
        with self._lock, self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS ratings (key TEXT PRIMARY KEY, judge TEXT, rubric TEXT, "
                "trait TEXT, condition TEXT, question TEXT, answer TEXT, trait_score REAL, fluency REAL, "
                "raw TEXT, created REAL)"
            )

    @staticmethod
    def key(judge: str, rubric: str, trait: str, question: str, answer: str, condition: str) -> str:
        payload = json.dumps([judge, rubric, trait, question, answer, condition], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> Rating | None:
        with self._lock:
            row = self._db.execute(
                "SELECT trait_score, fluency, raw FROM ratings WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        # SQLite stores NaN as NULL.
        return Rating(_nan(row[0]), _nan(row[1]), row[2])

    def put(self, key: str, rating: Rating, **fields: str) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO ratings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key, fields.get("judge"), fields.get("rubric"), fields.get("trait"),
                    fields.get("condition"), fields.get("question"), fields.get("answer"),
                    _none(rating.trait_score), _none(rating.fluency), rating.raw, time.time(),
                ),
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _none(value: float) -> float | None:
    return None if math.isnan(value) else value


def default_cache_path() -> Path:
    return cache_dir() / "judges" / "judge_ratings.sqlite"


# ---------------------------------------------------------------------------------------------
# Judges


class Judge:
    """Base class: caching around :meth:`_rate`. Subclasses set ``spec`` and implement ``_rate``."""

    spec: str = "none"
    enabled: bool = True

    def __init__(self, spec: str, cache_path: str | Path | None = None, use_cache: bool = True) -> None:
        self.spec = spec
        self.cache: RatingCache | None = None
        if use_cache:
            self.cache = RatingCache(cache_path if cache_path is not None else default_cache_path())

    def rate(self, trait: str, question: str, answer: str, condition: str = "") -> Rating:
        """Trait score and fluency, each 1-5 (NaN when the judge gave no readable rating)."""
        trait = get_concept(trait).name
        if self.cache is None:
            return self._rate(trait, question, answer)
        key = RatingCache.key(self.spec, RUBRIC_VERSION, trait, question, answer, condition)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        rating = self._rate(trait, question, answer)
        self.cache.put(
            key, rating, judge=self.spec, rubric=RUBRIC_VERSION, trait=trait, condition=condition,
            question=question, answer=answer,
        )
        return rating

    def rate_many(
        self, trait: str, questions: Sequence[str], answers: Sequence[str], condition: str = ""
    ) -> list[Rating]:
        if len(questions) != len(answers):
            raise JudgeError("questions and answers differ in length.")
        return [self.rate(trait, q, a, condition) for q, a in zip(questions, answers, strict=True)]

    def _rate(self, trait: str, question: str, answer: str) -> Rating:
        raise NotImplementedError

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


class NoJudge(Judge):
    """``none``: every rating is NaN; nothing is cached."""

    enabled = False

    def __init__(self) -> None:
        super().__init__("none", use_cache=False)

    def _rate(self, trait: str, question: str, answer: str) -> Rating:
        return Rating(float("nan"), float("nan"), "")


def chat_completions_url(base_url: str) -> str:
    url = base_url.strip().rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    path = urllib.parse.urlparse(url).path
    if not re.search(r"/v\d+[a-z0-9]*$", path):
        url += "/v1"
    return url + "/chat/completions"


_RETRY_STATUS = {408, 409, 429}


class OpenAIJudge(Judge):
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint, over urllib."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        max_tokens: int = 256,
        cache_path: str | Path | None = None,
        use_cache: bool = True,
    ) -> None:
        super().__init__(f"openai:{base_url.strip().rstrip('/')}#{model}", cache_path, use_cache)
        self.url = chat_completions_url(base_url)
        self.model = model
        if api_key is None:
            api_key = next((os.environ[e] for e in API_KEY_ENVS if os.environ.get(e)), "")
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_tokens = max_tokens
        self.requests_sent = 0

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff_s * (2**attempt)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        time.sleep(min(delay, self.max_backoff_s))

    def chat(self, prompt: str) -> str:
        """One user message in, the assistant's text out (temperature 0)."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last_error: str = ""
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            self.requests_sent += 1
            retry_after = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                return _message_text(payload)
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace")[:300]
                last_error = f"HTTP {error.code}: {detail}"
                if error.code not in _RETRY_STATUS and error.code < 500:
                    raise JudgeError(f"Judge endpoint {self.url} refused the request ({last_error}).") from None
                retry_after = error.headers.get("Retry-After") if error.headers else None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                last_error = f"{type(error).__name__}: {error}"
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                last_error = f"unreadable response: {error}"
            if attempt < self.max_retries:
                self._wait(attempt, retry_after)
        raise JudgeError(
            f"Judge endpoint {self.url} failed after {self.max_retries + 1} attempts; last error: {last_error}."
        )

    def _rate(self, trait: str, question: str, answer: str) -> Rating:
        trait_text = self.chat(trait_prompt(trait, question, answer))
        fluency_text = self.chat(fluency_prompt(answer))
        raw = json.dumps({"trait": trait_text, "fluency": fluency_text}, ensure_ascii=False)
        return Rating(parse_rating(trait_text), parse_rating(fluency_text), raw)


def _message_text(payload: Any) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"Not a chat-completions response: {json.dumps(payload)[:300]}") from None
    return content or ""


def digit_token_ids(tokenizer: Any) -> dict[str, list[int]]:
    """Every vocabulary entry whose text, stripped of whitespace, is exactly one of "1".."5"
    ("3", " 3", "▁3" ...): a rating can be spelled by any of them."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out: dict[str, list[int]] = {d: [] for d in DIGITS}
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id]).strip()
        if text in out:
            out[text].append(token_id)
    missing = [d for d, ids in out.items() if not ids]
    if missing:
        raise JudgeError(f"The judge's tokenizer has no token spelling {missing}: it cannot rate 1-5.")
    return out


def rating_prefix_ids(tokenizer: Any, digit_ids: dict[str, list[int]]) -> list[int]:
    """The token ids of :data:`LOCAL_RATING_PROBE` before its digit token."""
    ids = list(tokenizer(LOCAL_RATING_PROBE, add_special_tokens=False)["input_ids"])
    digit = LOCAL_RATING_PROBE[-1]
    if not ids or ids[-1] not in digit_ids[digit]:
        raise JudgeError(
            f"The judge's tokenizer does not end {LOCAL_RATING_PROBE!r} with a token that spells {digit!r}."
        )
    return ids[:-1]


class HFJudge(Judge):
    """A local causal LM: the rating is E[d] under its next-token probabilities of the digits."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        spec: str,
        cache_path: str | Path | None = None,
        use_cache: bool = True,
    ) -> None:
        super().__init__(spec, cache_path, use_cache)
        self.model = model
        self.tokenizer = tokenizer
        self.digit_ids = digit_token_ids(tokenizer)
        self.prefix_ids = rating_prefix_ids(tokenizer, self.digit_ids)

    @torch.no_grad()
    def digit_distribution(self, prompt: str) -> dict[str, float]:
        """P(digit) for "1".."5" at the first answer token, renormalized over the five digits,
        plus ``mass``: the unnormalized total (how much the judge wanted to answer with a digit)."""
        text = render_prompt(self.tokenizer, prompt)
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        # Token-level concatenation: the prefix's tokens follow the prompt's as generated ones would.
        prompt_ids = list(self.tokenizer(text, add_special_tokens=not chat)["input_ids"])
        ids = torch.tensor([prompt_ids + self.prefix_ids])
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device)).logits
        probs = torch.softmax(logits[0, -1].float(), dim=-1)
        mass = {d: float(probs[ids_].sum()) for d, ids_ in self.digit_ids.items()}
        total = sum(mass.values())
        if total <= 0.0:
            return {**{d: float("nan") for d in DIGITS}, "mass": 0.0}
        return {**{d: m / total for d, m in mass.items()}, "mass": total}

    def expected_rating(self, prompt: str) -> tuple[float, dict[str, float]]:
        dist = self.digit_distribution(prompt)
        value = sum(int(d) * dist[d] for d in DIGITS)
        return float(value), dist

    def _rate(self, trait: str, question: str, answer: str) -> Rating:
        trait_value, trait_dist = self.expected_rating(trait_prompt(trait, question, answer, LOCAL_ENDING))
        fluency_value, fluency_dist = self.expected_rating(fluency_prompt(answer, LOCAL_ENDING))
        raw = json.dumps({"trait": trait_dist, "fluency": fluency_dist})
        return Rating(trait_value, fluency_value, raw)


def parse_judge(spec: str, cache_path: str | Path | None = None, **options: Any) -> Judge:
    """``openai:BASE_URL#MODEL``, ``hf:MODEL`` or ``none`` -> a :class:`Judge`.

    ``cache_path`` is the SQLite file (or a folder to hold ``judge_ratings.sqlite``); default:
    ``<dpnle cache>/judges/judge_ratings.sqlite``. ``options`` go to the judge's constructor
    (e.g. ``timeout_s``, ``max_retries`` for ``openai``; ``dtype``, ``device`` for ``hf``).
    """
    text = spec.strip()
    if text.lower() in ("none", ""):
        return NoJudge()
    kind, _, rest = text.partition(":")
    kind = kind.lower()
    if kind == "openai":
        base_url, sep, model = rest.rpartition("#")
        if not sep or not base_url or not model:
            raise JudgeError(f"Judge spec {spec!r}: expected openai:BASE_URL#MODEL.")
        if not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"Judge spec {spec!r}: BASE_URL must start with http:// or https://.")
        return OpenAIJudge(base_url, model, cache_path=cache_path, **options)
    if kind == "hf":
        if not rest:
            raise JudgeError(f"Judge spec {spec!r}: expected hf:MODEL.")
        from dpnle.models import load_model

        load_options = {k: options.pop(k) for k in ("dtype", "device") if k in options}
        loaded = load_model(rest, fingerprint=False, **load_options)
        return HFJudge(loaded.model, loaded.tokenizer, spec=f"hf:{loaded.model_id}", cache_path=cache_path, **options)
    raise JudgeError(f"Unknown judge spec {spec!r}; use openai:BASE_URL#MODEL, hf:MODEL or none.")


# ---------------------------------------------------------------------------------------------
# Answers to rate


def pb_message(question: str, persona: str | None = None) -> str:
    """The user message for one test question: the plain test prompt, or DPN-LE's persona prompt
    (the ``prompt`` baseline) when a persona description is given."""
    if persona is not None:
        return DPNLE_TEMPLATE.format(description=persona.strip(), question=question.strip())
    return PB_TEST_TEMPLATE.format(question=question.strip())


def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Any],
    *,
    edit: EditLike | None = None,
    persona: str | None = None,
    max_new_tokens: int = PB_MAX_NEW_TOKENS,
    repetition_penalty: float = PB_REPETITION_PENALTY,
    batch_size: int = PB_BATCH_SIZE,
) -> list[str]:
    """Greedy answers to PersonalityBench test questions (``Question`` objects or strings), in the
    model's chat template, under ``edit`` if given."""
    texts = [q if isinstance(q, str) else q.text for q in questions]
    prompts = [render_prompt(tokenizer, pb_message(t, persona)) for t in texts]
    return generate_texts(
        model, tokenizer, prompts, edit=edit, max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty, batch_size=batch_size,
    )


__all__ = [
    "CONCEPT_MARKERS",
    "PB_BATCH_SIZE",
    "PB_MAX_NEW_TOKENS",
    "PB_REPETITION_PENALTY",
    "RUBRIC_VERSION",
    "HFJudge",
    "Judge",
    "JudgeError",
    "NoJudge",
    "OpenAIJudge",
    "Rating",
    "RatingCache",
    "chat_completions_url",
    "digit_token_ids",
    "fluency_prompt",
    "generate_answers",
    "parse_judge",
    "parse_rating",
    "pb_message",
    "trait_prompt",
]
