"""No request can hurt another (issue 13), on the tiny checkpoint with the default expert backend:
- each hostile input of the issue sent while 8 streams run: the 8 finish normally (finish_reason
  "length", all their tokens), the hostile request gets a 400 (tiny temperatures are served greedy, 200,
  as vLLM does); deep JSON, template-global kwargs (range, namespace), huge integers, non-finite numbers;
- a sequence that fails inside the engine (its grammar raises) fails alone: 500 / an error event for it,
  the others finish; a failing chat template is a 500 of type template_error, not a fault of `messages`;
- a bounded fuzz of 1,000 bodies: no 5xx, and the server still answers;
- a 40 MB body gets 413 (declared or chunked) while /health keeps answering within a second.
"""
from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import hybrid
import hybrid.text.grammar as grammar
from hybrid.apps.server import create_app
from test_server import _Server

STREAM_TOKENS = 48
HEALTH_WITHIN_S = 1.0      # the bound for /health during a huge upload
FUZZ_BODIES = 1000
USER = [{"role": "user", "content": "Tell me a story"}]
DEEP = "[" * 100_000 + "]" * 100_000
HOSTILE = [  # (body, expected status)
    ({"messages": USER, "temperature": 1e-40, "max_tokens": 2}, 200),
    ({"messages": USER, "temperature": 1e-300, "max_tokens": 2}, 200),
    ({"messages": USER, "temperature": 2 ** 64}, 400),
    ({"messages": USER, "repetition_penalty": 2 ** 64}, 400),
    ({"messages": USER, "repetition_penalty": 1e-300}, 400),
    ({"messages": USER, "top_k": 2 ** 64}, 400),
    ({"messages": USER, "max_tokens": 2 ** 64}, 400),
    ({"messages": USER, "seed": -1}, 400),
    ({"messages": USER, "chat_template_kwargs": {"range": 1}}, 400),
    ({"messages": USER, "chat_template_kwargs": {"namespace": "x"}}, 400),
    ({"messages": USER, "chat_template_kwargs": {"__class__": "x"}}, 400),
    ({"messages": USER, "logprobs": True, "top_logprobs": 10 ** 6}, 400),
    ({"messages": USER, "n": 10 ** 9}, 400),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400),
]
RAW_HOSTILE = ['{"messages": ' + DEEP + "}", '{"temperature": NaN, "messages": []}', '{"temperature": 1e999}',
               "\xff\xfe", '{"messages": [' + '{"role": "user", "content": "x"},' * 3 + "]}"]


@pytest.fixture(scope="module")
def llm(tiny_dir):                 # the session's tiny checkpoint (tests/conftest.py); read only
    return hybrid.LLM(tiny_dir, progress=False, max_context=512, max_batch=10)


@pytest.fixture(scope="module")
def server(llm):
    s = _Server(create_app(llm, "tiny", max_body_bytes=2 * 2 ** 20))
    yield s
    s.stop()


def _stream(url: str, body: dict) -> tuple[str | None, int, list]:
    """(finish_reason, completion tokens, error events) of one streamed chat request."""
    reason, tokens, errors = None, 0, []
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                errors.append(ev["error"])
            for c in ev.get("choices", []):
                reason = c.get("finish_reason") or reason
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    return reason, tokens, errors


def _run_streams(server, n: int) -> list:
    pool = ThreadPoolExecutor(n)
    body = {"messages": USER, "max_tokens": STREAM_TOKENS, "ignore_eos": True, "temperature": 0}
    return pool, [pool.submit(_stream, server.url, body) for _ in range(n)]


def test_hostile_requests_while_8_streams_run(server):
    pool, streams = _run_streams(server, 8)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for body, want in HOSTILE:
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == want, (json.dumps(body)[:120], r.text[:300])
            if want == 400:
                assert r.json()["error"]["type"] == "invalid_request_error"
        for raw in RAW_HOSTILE:
            r = http.post("/v1/chat/completions", content=raw.encode("utf-8", "surrogateescape"),
                          headers={"content-type": "application/json"})
            assert r.status_code == 400, (raw[:60], r.text[:300])
    results = [f.result() for f in streams]
    pool.shutdown()
    assert results == [("length", STREAM_TOKENS, [])] * 8


class _Bomb:
    """A constraint whose mask raises on the third token: that sequence fails inside the engine step."""

    def __init__(self):
        self.n = 0

    def mask(self, logits):
        self.n += 1
        if self.n == 3:
            raise RuntimeError("grammar exploded")
        return logits

    def advance(self, token):
        pass


def test_one_failing_sequence_fails_alone(server, llm, monkeypatch):
    monkeypatch.setattr(grammar, "constraint_for", lambda *a, **k: _Bomb())
    bomb = {"messages": USER, "max_tokens": 20, "response_format": {"type": "json_object"}}
    pool, streams = _run_streams(server, 4)
    r = httpx.post(server.url + "/v1/chat/completions", json=bomb, timeout=60)
    assert r.status_code == 500 and "grammar exploded" in r.json()["error"]["message"], r.text
    reason, _, errors = _stream(server.url, bomb)
    assert errors and "grammar exploded" in errors[0]["message"]
    assert [f.result() for f in streams] == [("length", STREAM_TOKENS, [])] * 4
    pool.shutdown()
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "after", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_template_failure_is_a_server_error_of_the_template(server, llm):
    saved = llm._chat_template
    llm._chat_template = "{{ raise_exception('this template is broken') }}"
    try:
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER}, timeout=30)
    finally:
        llm._chat_template = saved
    assert r.status_code == 500 and r.json()["error"]["type"] == "template_error", r.text
    assert "broken" in r.json()["error"]["message"]


def _fuzz_body(rng: random.Random) -> tuple[str, bytes]:
    """(path, raw body): a valid request with 1-3 fields set to junk, sometimes truncated, deep or random bytes."""
    if rng.random() < 0.3:
        body = {"prompt": rng.choice(["hi", [1, 2, 3], [[5, 6], "x"], ["a", -1], "<|im_end|>", ""]), "max_tokens": 2}
        for _ in range(rng.randint(1, 2)):
            body[rng.choice(["prompt", "echo", "logprobs", "n", "best_of", "suffix", "stop", "temperature", "seed",
                             "stream_options", "model"])] = rng.choice([None, True, -1, 2, 2 ** 64, 1e308, "", [], {}])
        return "/v1/completions", json.dumps(body).encode()
    return "/v1/chat/completions", _fuzz_chat(rng)


def _fuzz_chat(rng: random.Random) -> bytes:
    junk = [None, True, -1, 0, 2 ** 64, -2 ** 70, 1e308, 1.5, "", "x" * rng.randint(0, 50), "\u0000\ud7ff",
            [], [1, "a"], {}, {"a": {"b": []}}, "<|im_end|>", "{{ 7*7 }}", "namespace", [[[[]]]]]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    fields = ["model", "messages", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "max_tokens",
              "logprobs", "top_logprobs", "tools", "tool_choice", "response_format", "chat_template_kwargs",
              "presence_penalty", "repetition_penalty", "stream_options", "stop_token_ids", "logit_bias"]
    for _ in range(rng.randint(1, 3)):
        f = rng.choice(fields)
        v = rng.choice(junk)
        if f == "messages" and rng.random() < 0.5:
            v = [{"role": rng.choice(["user", "system", "developer", "tool", "assistant", "x", 5]),
                  "content": rng.choice(junk), **({"tool_calls": v} if rng.random() < 0.2 else {})}]
        if f == "chat_template_kwargs" and rng.random() < 0.5:
            v = {rng.choice(["range", "messages", "x", "loop", "", "a b"]): rng.choice(junk)}
        if f == "max_tokens" and (v is None or (isinstance(v, int) and 0 < v < 2 ** 63)):
            v = 3                                        # keep the valid bodies short (2 shared cores)
        body[f] = v
    raw = json.dumps(body)
    kind = rng.random()
    if kind < 0.1:
        cut = rng.randint(0, len(raw))
        raw = raw[:cut]                                  # truncated JSON
    elif kind < 0.15:
        raw = "[" * rng.randint(50, 5000) + raw          # deep
    elif kind < 0.2:
        return bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 64)))
    return raw.encode("utf-8", "surrogatepass")


def test_fuzz_no_5xx(server):
    rng = random.Random(13)
    bodies = [_fuzz_body(rng) for _ in range(FUZZ_BODIES)]

    http = httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=8))

    def send(item) -> int:
        return http.post(item[0], content=item[1], headers={"content-type": "application/json"}).status_code
    with ThreadPoolExecutor(8) as pool, http:
        codes = list(pool.map(send, bodies))
    bad = [(c, b[0], b[1][:160]) for c, b in zip(codes, bodies) if c >= 500]
    assert not bad, bad[:5]
    assert codes.count(200) > 0 and codes.count(400) > 0
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    ok = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_huge_body_413_while_health_answers(server):
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (40 * 2 ** 20) + b'"}]}'
    stop, worst = threading.Event(), []

    def poll():
        while not stop.is_set():
            t = time.perf_counter()
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
            worst.append(time.perf_counter() - t)
            time.sleep(0.02)
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        declared = httpx.post(server.url + "/v1/chat/completions", content=big, timeout=60,
                              headers={"content-type": "application/json"})

        def chunks():
            for i in range(0, len(big), 2 ** 20):
                yield big[i:i + 2 ** 20]
        try:
            chunked = httpx.post(server.url + "/v1/chat/completions", content=chunks(), timeout=60,
                                 headers={"content-type": "application/json"}).status_code
        except httpx.TransportError:     # the server may close the connection while the client still sends
            chunked = 413
    finally:
        stop.set()
        poller.join()
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"
    assert chunked == 413
    assert worst and max(worst) < HEALTH_WITHIN_S, max(worst)
