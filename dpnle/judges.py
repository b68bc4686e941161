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
  servers) and is sent as a Bearer token only over https, or over plain http to this machine
  (``localhost``, 127.0.0.0/8, ``::1``); plain http elsewhere with a key set is refused unless
  ``DPNLE_JUDGE_ALLOW_HTTP=1``. Credentials in the URL itself (``user:secret@``) are refused:
  put the key in the environment. Redirects are not followed (the key would go along).
  Standard library HTTP only; bounded retries with exponential backoff on 429, 5xx,
  timeouts and connection errors.
- ``hf:MODEL``: a local Hugging Face model (anything :func:`dpnle.models.load_model` takes). The
  rating is the expected value of its next-token distribution over "1".."5" (every token that
  spells a digit counts toward it), renormalized over the five digits: no parsing, no sampling.
- ``none``: no rating (NaN scores), for runs without a judge.

Every rating is cached in SQLite, keyed by (judge spec, rubric version, trait, question, answer,
condition): a re-run costs nothing. The rubric version is a hash of the prompt templates, so
editing the rubric invalidates old entries by itself.

Secrets: whatever names a judge outside the request itself (error messages, the cache's keys
and rows, ``run.json``, Parquet metadata, reports) uses :func:`redact_judge_spec`, which drops
the base URL's userinfo, query string and fragment. A judge's identity is that redacted URL
plus the model name, so rotating a key or a ``?key=`` query keeps results comparable and
cached. Rows a cache file got before this (under a spec with secrets in it) are re-keyed under
the redacted spec when the file is opened.
"""

from __future__ import annotations

import hashlib
import ipaddress
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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpnle.batching import EditLike, add_special_tokens_for, input_device
from dpnle.capability import generate_texts
from dpnle.concepts import get_concept
from dpnle.errors import DpnleError
from dpnle.pairs import DPNLE_TEMPLATE, render_prompt
from dpnle.paths import cache_dir

# PersonalityBench generation settings of the DPN-LE reference,
# experiments/personality_bench/evaluate.py (argparse defaults: --max_new_tokens 400,
# --repetition_penalty 1.15, --temperature 0 i.e. greedy, --batch_size 8).
PB_MAX_NEW_TOKENS = 400
PB_REPETITION_PENALTY = 1.15
PB_BATCH_SIZE = 8

API_KEY_ENVS = ("DPNLE_JUDGE_API_KEY", "OPENAI_API_KEY")
# Set to 1 to send the API key over plain http to a host other than this machine.
ALLOW_HTTP_ENV = "DPNLE_JUDGE_ALLOW_HTTP"
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


class JudgeError(RuntimeError, DpnleError):
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
        self._redact_old_rows()

    def _redact_old_rows(self) -> None:
        """Re-key rows written under a judge spec with secrets in it (before dpnle redacted
        specs) under :func:`redact_judge_spec` of it: the file then holds no secret, and the
        judge that wrote them finds them again. Cheap when there is nothing to do."""
        with self._lock:
            with self._db:
                judges = [row[0] for row in self._db.execute("SELECT DISTINCT judge FROM ratings")]
                dirty = [j for j in judges if j is not None and redact_judge_spec(j) != j]
                for judge in dirty:
                    clean = redact_judge_spec(judge)
                    rows = self._db.execute(
                        "SELECT key, rubric, trait, question, answer, condition FROM ratings WHERE judge = ?",
                        (judge,),
                    ).fetchall()
                    for key, rubric, trait, question, answer, condition in rows:
                        new_key = RatingCache.key(clean, rubric, trait, question, answer, condition)
                        self._db.execute(
                            "UPDATE OR REPLACE ratings SET key = ?, judge = ? WHERE key = ?", (new_key, clean, key)
                        )
            if dirty:
                self._db.execute("VACUUM")  # no copy of the old rows left in free pages

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
    concurrency: int = 1  # ratings requested at once by rate_many (a local model rates one at a time)

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
        self, trait: str, questions: Sequence[str], answers: Sequence[str], condition: str = "",
        on_rated: Callable[[], None] | None = None,
    ) -> list[Rating]:
        """:meth:`rate` for each (question, answer), in order; up to :attr:`concurrency` of them at
        once (threads: an endpoint's requests overlap, the cache is shared). ``on_rated`` is
        called after each rating (from the worker threads)."""
        if len(questions) != len(answers):
            raise JudgeError("questions and answers differ in length.")

        def one(pair: tuple[str, str]) -> Rating:
            rating = self.rate(trait, pair[0], pair[1], condition)
            if on_rated is not None:
                on_rated()
            return rating

        pairs = list(zip(questions, answers, strict=True))
        if self.concurrency <= 1 or len(pairs) <= 1:
            return [one(pair) for pair in pairs]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(pairs)),
                                thread_name_prefix="dpnle-judge") as pool:
            return list(pool.map(one, pairs))

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


def redact_url(url: str) -> str:
    """``url`` without what may hold a secret: the userinfo (``user:secret@``), the query string
    (``?key=...``) and the fragment. Scheme, host, port and path stay, so it still names the
    endpoint. Never raises: a malformed URL is cut the same way (RFC 3986: the authority ends at
    the first ``/``, ``?`` or ``#``; the userinfo is everything in it up to the last ``@``)."""
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    rest = re.split(r"[?#]", rest, maxsplit=1)[0]
    authority, slash, path = rest.partition("/")
    return f"{scheme}{sep}{authority.rpartition('@')[2]}{slash}{path}"


def _openai_spec(base_url: str, model: str) -> str:
    return f"openai:{redact_url(base_url).rstrip('/')}#{model}"


def redact_judge_spec(spec: str) -> str:
    """A judge spec as it may be shown or stored: for ``openai:BASE_URL#MODEL``, the base URL
    through :func:`redact_url` (the model after the last ``#`` stays), which is exactly the
    judge's ``spec``; ``hf:MODEL`` and ``none`` as given; anything else as a URL."""
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    if kind.lower() == "openai":
        base_url, hash_, model = rest.rpartition("#")
        return _openai_spec(base_url, model) if hash_ else f"openai:{redact_url(rest)}"
    if kind.lower() == "hf" or not sep:
        return text
    return redact_url(text)


def may_send_key(url: str) -> bool:
    """Whether an API key may go to ``url``: over https; over plain http only to this machine
    (``localhost``, 127.0.0.0/8, ``::1``), or anywhere when ``DPNLE_JUDGE_ALLOW_HTTP=1``."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        host = (parts.hostname or "").rstrip(".")
    except ValueError:
        return False
    scheme = parts.scheme.lower()
    if scheme == "https":
        return True
    if scheme != "http":
        return False
    if os.environ.get(ALLOW_HTTP_ENV, "").strip().lower() in ("1", "true", "yes"):
        return True
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _env_api_key() -> tuple[str, str]:
    """The API key from the environment and the variable it came from ("" and "" if none)."""
    name = next((e for e in API_KEY_ENVS if os.environ.get(e)), "")
    return (os.environ[name], name) if name else ("", "")


def check_endpoint(base_url: str, api_key: str, key_name: str = "") -> None:
    """Refuse, with a :class:`JudgeError` naming the fix, a base URL that is malformed, carries
    credentials (``user:secret@``), or would take ``api_key`` (read from the environment
    variable ``key_name``, if named) over plain http to another machine (see
    :func:`may_send_key`). Contacts nothing."""
    shown = redact_url(base_url)
    try:
        parts = urllib.parse.urlsplit(base_url.strip())
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as error:
        raise JudgeError(f"Judge URL {shown} is not a valid URL ({error}).") from None
    if "@" in parts.netloc:
        raise JudgeError(
            f"Judge URL {shown} has credentials in it (the part before '@'); dpnle does not send or record "
            f"them. Drop them from the judge spec and put the API key in {API_KEY_ENVS[0]}."
        )
    if api_key and not may_send_key(base_url):
        key = f"the API key in {key_name}" if key_name else "the API key"
        raise JudgeError(
            f"Judge URL {shown} is plain http to another machine: {key} would cross the network "
            f"unencrypted. Use https://, or set {ALLOW_HTTP_ENV}=1 to send it anyway."
        )


def chat_completions_url(base_url: str) -> str:
    """The request URL: the base URL's path with ``/chat/completions`` added (and ``/v1`` before
    it when the path has no ``/v<N>``); its query string kept, its fragment dropped."""
    parts = urllib.parse.urlsplit(base_url.strip())
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        if not re.search(r"/v\d+[a-z0-9]*$", path):
            path += "/v1"
        path += "/chat/completions"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects come back as ``HTTPError`` 3xx: urllib would send the Authorization header on
    to the new location, whatever its host and scheme."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


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
        concurrency: int | None = None,
    ) -> None:
        key_name = ""
        if api_key is None:
            api_key, key_name = _env_api_key()
        check_endpoint(base_url, api_key, key_name)
        super().__init__(_openai_spec(base_url, model), cache_path, use_cache)
        self.url = chat_completions_url(base_url)  # what is requested: may hold a ?key= query
        self.shown_url = redact_url(self.url)  # what messages show
        self.model = model
        self._api_key = api_key
        self._opener = urllib.request.build_opener(_NoRedirects)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_tokens = max_tokens
        self.concurrency = _concurrency(concurrency)
        self.requests_sent = 0
        self._count_lock = threading.Lock()

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff_s * (2**attempt)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        time.sleep(min(delay, self.max_backoff_s))

    def _scrub(self, text: str) -> str:
        """``text`` (an error, a server's reply) with the request URL and its query redacted."""
        text = text.replace(self.url, self.shown_url)
        query = urllib.parse.urlsplit(self.url).query
        return text.replace(query, "[redacted]") if query else text

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
            with self._count_lock:
                self.requests_sent += 1
            retry_after = None
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                return _message_text(payload)
            except urllib.error.HTTPError as error:
                if 300 <= error.code < 400:
                    target = redact_url(error.headers.get("Location", "") if error.headers else "") or "elsewhere"
                    raise JudgeError(
                        f"Judge endpoint {self.shown_url} redirects (HTTP {error.code}) to {target}; dpnle does not "
                        "follow redirects, as the API key would go along. Put the final URL in the judge spec."
                    ) from None
                detail = self._scrub(error.read().decode("utf-8", "replace")[:300])
                last_error = f"HTTP {error.code}: {detail}"
                if error.code not in _RETRY_STATUS and error.code < 500:
                    raise JudgeError(f"Judge endpoint {self.shown_url} refused the request ({last_error}).") from None
                retry_after = error.headers.get("Retry-After") if error.headers else None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                last_error = self._scrub(f"{type(error).__name__}: {error}")
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                last_error = f"unreadable response: {error}"
            if attempt < self.max_retries:
                self._wait(attempt, retry_after)
        raise JudgeError(
            f"Judge endpoint {self.shown_url} failed after {self.max_retries + 1} attempts; last error: {last_error}."
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
        # Token-level concatenation: the prefix's tokens follow the prompt's as generated ones would.
        prompt_ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens_for(self.tokenizer))["input_ids"])
        ids = torch.tensor([prompt_ids + self.prefix_ids])
        device = input_device(self.model)  # the embeddings' device: right under a device map too
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


DEFAULT_CONCURRENCY = 8  # requests in flight to an OpenAI-compatible judge (DPNLE_JUDGE_CONCURRENCY)


def _concurrency(value: int | None) -> int:
    """``value``, else ``DPNLE_JUDGE_CONCURRENCY``, else :data:`DEFAULT_CONCURRENCY`; at least 1."""
    if value is None:
        raw = os.environ.get("DPNLE_JUDGE_CONCURRENCY", "").strip()
        try:
            value = int(raw) if raw else DEFAULT_CONCURRENCY
        except ValueError:
            raise JudgeError(f"DPNLE_JUDGE_CONCURRENCY must be a whole number, not {raw!r}.") from None
    if int(value) < 1:
        raise JudgeError(f"The judge's concurrency must be at least 1, not {value}.")
    return int(value)


_JUDGES: dict[tuple[str, str], Judge] = {}


def judge_for(spec: str, cache_path: str | Path | None = None) -> Judge:
    """The process's judge for ``spec``: made by :func:`parse_judge` on first use and kept, so a
    local judge model loads once per process however many conditions it rates."""
    key = (spec, str(cache_path if cache_path is not None else default_cache_path()))
    if key not in _JUDGES:
        _JUDGES[key] = parse_judge(spec, cache_path)
    return _JUDGES[key]


def parse_judge(spec: str, cache_path: str | Path | None = None, **options: Any) -> Judge:
    """``openai:BASE_URL#MODEL``, ``hf:MODEL`` or ``none`` -> a :class:`Judge`.

    ``cache_path`` is the SQLite file (or a folder to hold ``judge_ratings.sqlite``); default:
    ``<dpnle cache>/judges/judge_ratings.sqlite``. ``options`` go to the judge's constructor
    (e.g. ``timeout_s``, ``max_retries`` for ``openai``; ``dtype``, ``device`` for ``hf``).
    """
    kind, target, model = _split_spec(spec)
    if kind == "none":
        return NoJudge()
    if kind == "openai":
        return OpenAIJudge(target, model, cache_path=cache_path, **options)
    from dpnle.models import load_model

    load_options = {k: options.pop(k) for k in ("dtype", "device") if k in options}
    loaded = load_model(target, fingerprint=False, **load_options)
    return HFJudge(loaded.model, loaded.tokenizer, spec=f"hf:{loaded.model_id}", cache_path=cache_path, **options)


def _split_spec(spec: str) -> tuple[str, str, str]:
    """(``none``, "", ""), (``openai``, BASE_URL, MODEL) or (``hf``, MODEL, ""); a
    :class:`JudgeError` (showing the spec redacted) for anything else."""
    text = spec.strip()
    if text.lower() in ("none", ""):
        return "none", "", ""
    shown = redact_judge_spec(text)
    kind, _, rest = text.partition(":")
    kind = kind.lower()
    if kind == "openai":
        base_url, sep, model = rest.rpartition("#")
        if not sep or not base_url or not model:
            raise JudgeError(f"Judge spec {shown!r}: expected openai:BASE_URL#MODEL.")
        if not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"Judge spec {shown!r}: BASE_URL must start with http:// or https://.")
        return kind, base_url, model
    if kind == "hf":
        if not rest:
            raise JudgeError(f"Judge spec {shown!r}: expected hf:MODEL.")
        return kind, rest, ""
    raise JudgeError(f"Unknown judge spec {shown!r}; use openai:BASE_URL#MODEL, hf:MODEL or none.")


def check_judge_spec(spec: str) -> str:
    """Everything :func:`parse_judge` would refuse in ``spec`` before it contacts or loads
    anything (syntax, credentials in the URL, the API key over plain http), raised now as a
    :class:`JudgeError`; for a command to call before it loads its model. Returns the judge's
    identity for artifacts: :func:`redact_judge_spec` of ``spec``."""
    kind, target, _ = _split_spec(spec)
    if kind == "openai":
        check_endpoint(target, *_env_api_key())
    return redact_judge_spec(spec)


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
    engine: Any = None,
) -> list[str]:
    """Greedy answers to PersonalityBench test questions (``Question`` objects or strings), in the
    model's chat template, under ``edit`` if given (generated on ``engine`` when given, a
    :class:`dpnle.engines.VLLMEngine`)."""
    texts = [q if isinstance(q, str) else q.text for q in questions]
    prompts = [render_prompt(tokenizer, pb_message(t, persona)) for t in texts]
    return generate_texts(
        model, tokenizer, prompts, edit=edit, max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty, batch_size=batch_size, engine=engine, label="PersonalityBench answers",
    )


__all__ = [
    "CONCEPT_MARKERS",
    "DEFAULT_CONCURRENCY",
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
    "check_endpoint",
    "check_judge_spec",
    "digit_token_ids",
    "fluency_prompt",
    "generate_answers",
    "judge_for",
    "may_send_key",
    "parse_judge",
    "parse_rating",
    "pb_message",
    "redact_judge_spec",
    "redact_url",
    "trait_prompt",
]
