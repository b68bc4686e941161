"""Judges: the OpenAI-compatible client against a real local HTTP server, the cache, the local
expected-value judge, and answer generation."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dpnle import judges as jd
from dpnle.datasets import Question

# ---------------------------------------------------------------------------------------------
# a real chat-completions server on 127.0.0.1


class _Server:
    """A ThreadingHTTPServer on an ephemeral port whose replies come from ``respond``:
    (request number, parsed JSON body) -> (status, JSON payload[, extra headers])."""

    def __init__(self, respond: Callable[[int, dict], tuple[int, dict]]) -> None:
        self.respond = respond
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, **body})
                outer.headers.append(dict(self.headers))
                status, payload, *extra = outer.respond(len(outer.requests), body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in (extra[0] if extra else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def _completion(text: str) -> dict:
    return {
        "id": "cmpl-test",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }


def _rubric_reply(_n: int, body: dict) -> tuple[int, dict]:
    prompt = body["messages"][0]["content"]
    if "fluency" in prompt.lower():
        return 200, _completion("Reads smoothly.\nRating: [[5]]")
    return 200, _completion("Warm and outgoing throughout.\nRating: [[4]]")


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[int, dict], tuple[int, dict]]], _Server]]:
    servers: list[_Server] = []

    def start(respond: Callable[[int, dict], tuple[int, dict]]) -> _Server:
        server = _Server(respond)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _judge(server: _Server, tmp_path, **options) -> jd.OpenAIJudge:
    options.setdefault("backoff_s", 0.001)
    options.setdefault("timeout_s", 5.0)
    judge = jd.parse_judge(f"openai:{server.base_url}#test-model", cache_path=tmp_path / "cache.sqlite", **options)
    assert isinstance(judge, jd.OpenAIJudge)
    return judge


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible judge


def test_openai_judge_rates_and_caches(serve, tmp_path, monkeypatch):
    monkeypatch.delenv("DPNLE_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server = serve(_rubric_reply)
    judge = _judge(server, tmp_path)
    rating = judge.rate("extraversion", "How was your weekend?", "I threw a party for thirty friends!", "up")
    assert (rating.trait_score, rating.fluency) == (4.0, 5.0)
    assert "[[4]]" in json.loads(rating.raw)["trait"]
    assert len(server.requests) == 2
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["model"] == "test-model" and first["temperature"] == 0
    assert "Extraversion" in first["messages"][0]["content"]
    assert server.headers[0]["Authorization"] == "Bearer sk-test"

    # Same key: served from the cache, no request; a new judge on the same file too.
    again = judge.rate("extraversion", "How was your weekend?", "I threw a party for thirty friends!", "up")
    assert again == rating and len(server.requests) == 2
    judge.close()
    reopened = _judge(server, tmp_path)
    assert reopened.rate("extraversion", "How was your weekend?", "I threw a party for thirty friends!", "up") == rating
    assert len(server.requests) == 2
    # Another condition is another key.
    reopened.rate("extraversion", "How was your weekend?", "I threw a party for thirty friends!", "down")
    assert len(server.requests) == 4
    reopened.close()


def test_openai_judge_retries_after_a_server_error(serve, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("DPNLE_JUDGE_API_KEY", raising=False)

    def flaky(n: int, body: dict) -> tuple[int, dict]:
        if n == 1:
            return 500, {"error": {"message": "overloaded"}}
        return _rubric_reply(n, body)

    server = serve(flaky)
    judge = _judge(server, tmp_path)
    rating = judge.rate("openness", "Q?", "A new idea!")
    assert rating.trait_score == 4.0 and rating.fluency == 5.0
    assert len(server.requests) == 3  # 500, then 200 for the trait prompt, then fluency
    # A local server needs no key: no Authorization header is sent.
    assert "Authorization" not in server.headers[0]
    judge.close()


def test_openai_judge_gives_up_after_bounded_retries(serve, tmp_path):
    server = serve(lambda n, body: (503, {"error": "down"}))
    judge = _judge(server, tmp_path, max_retries=2)
    with pytest.raises(jd.JudgeError, match="3 attempts"):
        judge.rate("openness", "Q?", "A.")
    assert len(server.requests) == 3
    judge.close()


def test_openai_judge_does_not_retry_a_client_error(serve, tmp_path):
    server = serve(lambda n, body: (401, {"error": "bad key"}))
    judge = _judge(server, tmp_path)
    with pytest.raises(jd.JudgeError, match="401"):
        judge.rate("openness", "Q?", "A.")
    assert len(server.requests) == 1
    judge.close()


def test_openai_judge_retries_a_refused_connection(tmp_path):
    # A port with nothing listening: bounded retries, then a clear error.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = jd.parse_judge(
        f"openai:http://127.0.0.1:{port}/v1#m", cache_path=tmp_path, backoff_s=0.001, max_retries=1, timeout_s=2
    )
    with pytest.raises(jd.JudgeError, match="2 attempts"):
        judge.rate("openness", "Q?", "A.")
    assert judge.requests_sent == 2
    judge.close()


def test_unparseable_rating_is_nan(serve, tmp_path):
    server = serve(lambda n, body: (200, _completion("I would rather not say.")))
    judge = _judge(server, tmp_path)
    rating = judge.rate("neuroticism", "Q?", "A.")
    assert math.isnan(rating.trait_score) and math.isnan(rating.fluency)
    # NaN survives the cache round trip.
    assert math.isnan(judge.rate("neuroticism", "Q?", "A.").trait_score)
    assert len(server.requests) == 2
    judge.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Good.\nRating: [[3]]", 3.0),
        ("[[2]] at first, but Rating: [[4]]", 4.0),
        ("Rating: 5", 5.0),
        ("Rating: [[9]]", float("nan")),
        ("no score", float("nan")),
    ],
)
def test_parse_rating(text, expected):
    value = jd.parse_rating(text)
    assert (math.isnan(value) and math.isnan(expected)) or value == expected


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/chat/completions"),
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1/chat/completions"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1/chat/completions"),
        ("https://api.example.com/v1/chat/completions", "https://api.example.com/v1/chat/completions"),
    ],
)
def test_chat_completions_url(base, url):
    assert jd.chat_completions_url(base) == url


def test_parse_judge_specs(tmp_path):
    none = jd.parse_judge("none")
    assert isinstance(none, jd.NoJudge) and not none.enabled
    assert math.isnan(none.rate("openness", "q", "a").trait_score)
    judge = jd.parse_judge("openai:https://api.openai.com/v1#gpt-4o", cache_path=tmp_path)
    assert isinstance(judge, jd.OpenAIJudge) and judge.model == "gpt-4o"
    assert judge.url == "https://api.openai.com/v1/chat/completions"
    judge.close()
    for bad in ("openai:https://x/v1", "openai:#m", "openai:ftp://x#m", "gpt4", "hf:"):
        with pytest.raises(jd.JudgeError):
            jd.parse_judge(bad, cache_path=tmp_path)


def test_rubric_covers_traits_and_values():
    prompt = jd.trait_prompt("self_direction", "Q?", "A.")
    assert "personal value" in prompt and "Self Direction" in prompt
    assert "personality trait" in jd.trait_prompt("agreeableness", "Q?", "A.")
    assert "[[N]]" in jd.fluency_prompt("A.")
    assert jd.fluency_prompt("A.", jd.LOCAL_ENDING).endswith(jd.LOCAL_ENDING)


# ---------------------------------------------------------------------------------------------
# secrets: never printed or written; the key only over https or to this machine

SECRET = "s3cr3t-pass"  # in the userinfo or the query string of a judge URL
KEY = "sk-live-123"  # the API key in the environment


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.delenv("DPNLE_JUDGE_API_KEY", raising=False)
    monkeypatch.delenv(jd.ALLOW_HTTP_ENV, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pass@host:8000/v1?key=abc#frag", "http://host:8000/v1"),
        ("https://api.openai.com/v1", "https://api.openai.com/v1"),
        ("https://u:p@[::1]:8/v1/chat/completions?api-key=x", "https://[::1]:8/v1/chat/completions"),
        ("http://u:p@h", "http://h"),
        ("user:pass@host/v1", "host/v1"),  # no scheme: still cut
        ("http://[::1", "http://[::1"),  # malformed: never raises
    ],
)
def test_redact_url(url, shown):
    assert jd.redact_url(url) == shown


@pytest.mark.parametrize(
    ("spec", "shown"),
    [
        ("openai:http://user:pass@host/v1/?key=abc#gpt-4o", "openai:http://host/v1#gpt-4o"),
        ("openai:https://api.openai.com/v1#gpt-4o", "openai:https://api.openai.com/v1#gpt-4o"),
        ("openai:http://u:pass@h/v1", "openai:http://h/v1"),
        ("hf:HuggingFaceTB/SmolLM2-135M-Instruct", "hf:HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("none", "none"),
        ("http://u:pass@h/v1#m", "http://h/v1"),  # "openai:" forgotten: treated as a URL
    ],
)
def test_redact_judge_spec(spec, shown):
    assert jd.redact_judge_spec(spec) == shown


@pytest.mark.parametrize(
    ("url", "allowed", "opted_in"),
    [
        ("https://api.openai.com/v1", True, True),
        ("http://127.0.0.1:8000/v1", True, True),
        ("http://127.8.9.10/v1", True, True),
        ("http://localhost:8000/v1", True, True),
        ("http://[::1]:8000/v1", True, True),
        ("http://judge.example.com/v1", False, True),
        ("http://10.0.0.7:8000/v1", False, True),
        ("http://localhost.example.com/v1", False, True),
        ("ftp://judge.example.com/v1", False, False),
        ("http://[::1", False, False),  # malformed
    ],
)
def test_may_send_key(url, allowed, opted_in, monkeypatch):
    monkeypatch.delenv(jd.ALLOW_HTTP_ENV, raising=False)
    assert jd.may_send_key(url) is allowed
    monkeypatch.setenv(jd.ALLOW_HTTP_ENV, "1")  # the explicit opt-in: plain http to any host
    assert jd.may_send_key(url) is opted_in


def test_key_over_plain_http_is_refused_before_anything(api_key, monkeypatch, tmp_path):
    cache = tmp_path / "cache.sqlite"
    with pytest.raises(jd.JudgeError) as error:
        jd.parse_judge("openai:http://judge.example.com/v1#m", cache_path=cache)
    message = str(error.value)
    assert "https://" in message and f"{jd.ALLOW_HTTP_ENV}=1" in message and "OPENAI_API_KEY" in message
    assert KEY not in message and "\n" not in message
    assert not cache.exists()  # refused before the cache (or anything else) was opened
    with pytest.raises(jd.JudgeError, match="plain http"):
        jd.check_judge_spec("openai:http://judge.example.com/v1#m")
    with pytest.raises(jd.JudgeError, match="plain http"):
        jd.OpenAIJudge("http://judge.example.com/v1", "m", api_key="sk-given", use_cache=False)
    # Accepted (nothing is sent here): https, plain http to this machine, the opt-in, no key at all.
    for spec in ("openai:https://judge.example.com/v1#m", "openai:http://127.0.0.1:9/v1#m",
                 "openai:http://localhost:9/v1#m"):
        assert jd.check_judge_spec(spec) == spec
        jd.parse_judge(spec, use_cache=False)
    monkeypatch.setenv(jd.ALLOW_HTTP_ENV, "1")
    jd.parse_judge("openai:http://judge.example.com/v1#m", use_cache=False)
    monkeypatch.delenv(jd.ALLOW_HTTP_ENV)
    monkeypatch.delenv("OPENAI_API_KEY")
    jd.parse_judge("openai:http://judge.example.com/v1#m", use_cache=False)


def test_credentials_in_the_url_are_refused_and_never_shown(api_key, tmp_path):
    # Bad, unreachable or malformed: no message repeats what came before the host, or the query.
    for spec in (
        f"openai:http://user:{SECRET}@127.0.0.1:1/v1#m",  # nothing listens on port 1
        f"openai:https://user:{SECRET}@judge.example.com/v1#m",
        f"openai:http://user:{SECRET}@judge.example.com/v1",  # no model
        f"openai:ftp://user:{SECRET}@judge.example.com/v1?key={SECRET}#m",
        f"openai:https://judge.example.com/v1?key={SECRET}",
        f"opnai:http://user:{SECRET}@judge.example.com/v1#m",
        f"openai:http://user:{SECRET}@host:port/v1#m",
    ):
        with pytest.raises(jd.JudgeError) as error:
            jd.parse_judge(spec, cache_path=tmp_path)
        assert "pass" not in str(error.value) and SECRET not in str(error.value), str(error.value)
        with pytest.raises(jd.JudgeError) as early:
            jd.check_judge_spec(spec)
        assert "pass" not in str(early.value)
    with pytest.raises(jd.JudgeError, match="DPNLE_JUDGE_API_KEY"):
        jd.check_judge_spec(f"openai:https://user:{SECRET}@judge.example.com/v1#m")


def test_an_unreachable_judge_with_a_query_key_shows_no_secret(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = jd.parse_judge(f"openai:http://127.0.0.1:{port}/v1?key={SECRET}#m", cache_path=tmp_path,
                           backoff_s=0.001, max_retries=1, timeout_s=2)
    assert judge.spec == f"openai:http://127.0.0.1:{port}/v1#m"
    with pytest.raises(jd.JudgeError, match="2 attempts") as error:
        judge.rate("openness", "Q?", "A.")
    assert SECRET not in str(error.value) and f"127.0.0.1:{port}/v1/chat/completions" in str(error.value)
    judge.close()


def test_a_query_key_is_sent_but_not_cached_or_shown(serve, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("DPNLE_JUDGE_API_KEY", raising=False)
    server = serve(_rubric_reply)
    judge = jd.parse_judge(f"openai:{server.base_url}?key={SECRET}#test-model", cache_path=tmp_path / "c.sqlite")
    judge.rate("openness", "Q?", "A.")
    assert server.requests[0]["path"] == f"/v1/chat/completions?key={SECRET}"  # the endpoint gets it
    assert judge.spec == f"openai:{server.base_url}#test-model"  # the cache key and row do not
    judge.close()
    assert SECRET.encode() not in (tmp_path / "c.sqlite").read_bytes()
    # An error reply that echoes the URL is shown without it.
    echo = serve(lambda n, body: (400, {"error": f"bad request to /v1/chat/completions?key={SECRET}"}))
    judge = jd.parse_judge(f"openai:{echo.base_url}?key={SECRET}#m", use_cache=False)
    with pytest.raises(jd.JudgeError, match="400") as error:
        judge.rate("openness", "Q?", "A.")
    assert SECRET not in str(error.value)


def test_a_redirect_is_not_followed(serve, tmp_path, api_key):
    target = f"http://elsewhere.example.com/v1/chat/completions?key={SECRET}"
    server = serve(lambda n, body: (307, {}, {"Location": target}))
    judge = _judge(server, tmp_path)
    with pytest.raises(jd.JudgeError, match="redirects") as error:
        judge.rate("openness", "Q?", "A.")
    assert "elsewhere.example.com" in str(error.value) and SECRET not in str(error.value)
    assert len(server.requests) == 1  # not retried, and the key went nowhere else
    judge.close()


def test_old_cache_rows_are_rekeyed_without_secrets(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://user:{SECRET}@127.0.0.1:{port}/v1/?key={SECRET}"
    old_spec = f"openai:{base.rstrip('/')}#m"  # how dpnle named the judge before redaction
    path = tmp_path / "judge_ratings.sqlite"
    cache = jd.RatingCache(path)
    rating = jd.Rating(4.0, 5.0, "{}")
    key = jd.RatingCache.key(old_spec, jd.RUBRIC_VERSION, "openness", "Q?", "A.", "up")
    cache.put(key, rating, judge=old_spec, rubric=jd.RUBRIC_VERSION, trait="openness", condition="up",
              question="Q?", answer="A.")
    cache.put("other", rating, judge="hf:fake", rubric="r", trait="openness", condition="", question="q",
              answer="a")
    cache.close()
    assert SECRET.encode() in path.read_bytes()

    reopened = jd.RatingCache(path)
    assert len(reopened) == 2 and reopened.get("other") == rating  # other judges' rows untouched
    reopened.close()
    assert SECRET.encode() not in path.read_bytes()
    # The same endpoint, now named without credentials, finds the rating: no request is made.
    judge = jd.OpenAIJudge(f"http://127.0.0.1:{port}/v1/?key={SECRET}", "m", api_key="", cache_path=path)
    assert judge.rate("openness", "Q?", "A.", "up") == rating and judge.requests_sent == 0
    judge.close()


def test_artifacts_and_reports_hold_no_secret(api_key, tmp_path):
    import pandas as pd

    from dpnle import evaluate as ev
    from dpnle import report
    from dpnle.runs import Run, parquet_metadata, write_parquet

    spec = f"openai:https://user:{SECRET}@judge.example.com/v1?key={SECRET}#gpt-4o"
    # edit-eval refuses credentials in the URL when it reads its options, before any model loads.
    with pytest.raises(jd.JudgeError):
        ev.EvalConfig(judge=spec)
    with pytest.raises(jd.JudgeError, match="plain http"):
        ev.EvalConfig(judge="openai:http://judge.example.com/v1#gpt-4o")
    # A query key is accepted, and the settings that go into run.json and the Parquet metadata
    # name the judge by its redacted URL and model.
    config = ev.EvalConfig(judge=f"openai:https://judge.example.com/v1?key={SECRET}#gpt-4o")
    settings = config.condition_settings()
    assert settings["judge"] == "openai:https://judge.example.com/v1#gpt-4o"
    run = Run.create_or_open("secrets", "tiny/model", root=tmp_path)
    run.record_stage("edit-eval", "openness", "done", **settings)
    path = write_parquet(tmp_path / "eval.parquet", pd.DataFrame({"x": [1]}), metadata={"settings": settings})
    assert SECRET not in run.manifest_path.read_text()
    assert SECRET not in json.dumps(parquet_metadata(path))
    # A run.json written before redaction: the report shows the judge redacted.
    run.record_stage("edit-eval", "neuroticism", "done", judge=spec)
    blocks = report._run_section(run, run.manifest())
    text = report.render_markdown(blocks) + report.render_html(blocks, tmp_path, "report")
    assert "judge=openai:https://judge.example.com/v1#gpt-4o" in text
    assert SECRET not in text


# ---------------------------------------------------------------------------------------------
# local (hf) judge


def _digit_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokens plus merged " 1".." 5": each digit has two spellings."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<|end|>": 1}
    vocab.update({ch: 2 + i for i, ch in enumerate(byte_chars)})
    merges = [("Ġ", d) for d in "12345"]
    for d in "12345":
        vocab["Ġ" + d] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|end|>")


class _SetDistribution(torch.nn.Module):
    """Next-token probabilities fixed by hand (same at every position)."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.log(probs.clamp(min=1e-30)))
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, **_: object):
        self.calls += 1
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def test_hf_judge_expected_value(tmp_path):
    tokenizer = _digit_tokenizer()
    ids = jd.digit_token_ids(tokenizer)
    assert all(len(v) == 2 for v in ids.values())  # "3" and " 3"
    probs = torch.zeros(len(tokenizer))
    one, one_spaced = ids["1"]
    probs[one], probs[one_spaced] = 0.05, 0.15  # P(1) = 0.2 over both spellings
    probs[ids["3"][0]] = 0.3
    probs[ids["5"][1]] = 0.2
    probs[tokenizer.convert_tokens_to_ids("x")] = 0.3  # mass off the digits is renormalized away
    model = _SetDistribution(probs)
    judge = jd.HFJudge(model, tokenizer, spec="hf:fake", cache_path=tmp_path)
    # " 3" is one token here, so the reply prefix is "Rating:" and the digit carries the space.
    assert tokenizer.decode(judge.prefix_ids) == "Rating:"
    expected = (1 * 0.2 + 3 * 0.3 + 5 * 0.2) / 0.7
    value, dist = judge.expected_rating("Rate this.")
    assert value == pytest.approx(expected)
    assert dist["mass"] == pytest.approx(0.7)
    rating = judge.rate("openness", "Q?", "A.")
    assert rating.trait_score == pytest.approx(expected) and rating.fluency == pytest.approx(expected)
    calls = model.calls
    assert judge.rate("openness", "Q?", "A.") == rating and model.calls == calls  # cached
    judge.close()


# ---------------------------------------------------------------------------------------------
# answers


def test_generate_answers_tiny_model(one_thread):
    model, tokenizer = tiny_llama()
    questions = [Question("q1", "What do you do on a free afternoon?"), "How do you handle a deadline?"]
    answers = jd.generate_answers(model, tokenizer, questions, max_new_tokens=4, batch_size=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    persona = jd.pb_message("Q?", persona="You love parties.")
    assert "You love parties." in persona and "###Question: Q?" in persona
    assert "Q?" in jd.pb_message("Q?") and "Personality description" not in jd.pb_message("Q?")


def test_reference_generation_constants():
    assert (jd.PB_MAX_NEW_TOKENS, jd.PB_REPETITION_PENALTY, jd.PB_BATCH_SIZE) == (400, 1.15, 8)


def test_rate_many_overlaps_requests_up_to_the_limit_and_keeps_order(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    in_flight, peak, lock = [0], [0], threading.Lock()

    def slow(_n: int, body: dict) -> tuple[int, dict]:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.05)
        with lock:
            in_flight[0] -= 1
        prompt = body["messages"][0]["content"]
        if "fluency" in prompt.lower():
            return 200, _completion("Rating: [[5]]")
        # the trait rating echoes which answer it read, so the order can be checked
        digit = next(d for d in "1234" if f"answer number {d}" in prompt)
        return 200, _completion(f"Rating: [[{digit}]]")

    server = serve(slow)
    judge = _judge(server, tmp_path, concurrency=3)
    answers = [f"This is answer number {d}, draft {k}." for k, d in enumerate("12341234")]
    rated: list[int] = []
    ratings = judge.rate_many("openness", ["Q?"] * 8, answers, "up", on_rated=lambda: rated.append(1))
    assert [r.trait_score for r in ratings] == [1, 2, 3, 4, 1, 2, 3, 4] and all(r.fluency == 5 for r in ratings)
    assert len(rated) == 8 and judge.requests_sent == len(server.requests) == 16
    assert 1 < peak[0] <= 3  # requests overlapped, never more than the limit
    judge.close()


def test_judge_concurrency_from_the_environment(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server = serve(_rubric_reply)
    monkeypatch.setenv("DPNLE_JUDGE_CONCURRENCY", "2")
    assert _judge(server, tmp_path).concurrency == 2
    monkeypatch.delenv("DPNLE_JUDGE_CONCURRENCY")
    assert _judge(server, tmp_path).concurrency == jd.DEFAULT_CONCURRENCY
    for bad in ("0", "many"):
        monkeypatch.setenv("DPNLE_JUDGE_CONCURRENCY", bad)
        with pytest.raises(jd.JudgeError, match="DPNLE_JUDGE_CONCURRENCY|at least 1"):
            _judge(server, tmp_path)
    assert jd.NoJudge().concurrency == 1


def test_judge_for_makes_one_judge_per_spec_and_cache(tmp_path, monkeypatch):
    made: list[str] = []
    real = jd.parse_judge

    def counting(spec, cache_path=None, **options):
        made.append(spec)
        return real(spec, cache_path, **options)

    monkeypatch.setattr(jd, "parse_judge", counting)
    monkeypatch.setattr(jd, "_JUDGES", {})
    first = jd.judge_for("none", tmp_path / "a.sqlite")
    assert jd.judge_for("none", tmp_path / "a.sqlite") is first
    assert jd.judge_for("none", tmp_path / "b.sqlite") is not first
    assert made == ["none", "none"]
