"""The real server (uvicorn on a free port, in a thread) driven by the official openai client and by raw
HTTP: chat (stream and not, thinking on/off, tools), completions, models, bad input -> 400 naming the
field, 401 with --api-key, disconnects abort, concurrent requests share decode steps, `echo` on
/v1/completions puts the prompt's text before the completion.
The server runs the default expert backend (expert_backend="auto"), the one a user gets: every token
comparison here is between two requests to this same server, so no test needs the torch backend.
The tiny model has random weights and never writes a tool call, so the tool tests script the text of
the requests they send (ScriptedEngine); everything else runs the real engine.
"""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

import hybrid
from hybrid.engine import RequestOutput
from hybrid.apps.server import create_app
from hybrid.synthetic import write_checkpoint

MAX_CONTEXT = 512
FAST_BACKENDS = ("numba", "kt")    # what "auto" picks when a fast CPU backend runs; torch would be the fallback
PROMPT = "Once upon a time"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
TOOL_TEXT = ("let me check</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
             '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


class ScriptedEngine:
    """The real engine, except that requests added while `script` is set produce that text (in 7-char
    deltas) instead of the model's; they are still validated by the real add_request."""

    def __init__(self, engine):
        self.engine, self.script = engine, None
        self._scripted: dict[str, tuple] = {}
        self._hidden: set[str] = set()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def add_request(self, prompt, params, request_id=None):
        rid = self.engine.add_request(prompt, params, request_id)
        if self.script is not None:
            self.engine.abort(rid)
            self._hidden.add(rid)
            chunks = [self.script[i:i + 7] for i in range(0, len(self.script), 7)]
            self._scripted[rid] = (list(prompt), chunks)
        return rid

    def has_unfinished(self):
        return self.engine.has_unfinished() or bool(self._scripted)

    def step(self):
        out = [d for d in self.engine.step() if d.request_id not in self._hidden]
        for rid, (prompt, chunks) in list(self._scripted.items()):
            text = chunks.pop(0)
            done = not chunks
            out.append(RequestOutput(rid, prompt, [1], text, "stop" if done else None, 0,
                                     {"completion_tokens": 1} if done else {}))
            if done:
                del self._scripted[rid]
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, app):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("srv") / "tiny", "tiny")
    llm = hybrid.LLM(path, progress=False, max_context=MAX_CONTEXT, max_batch=8)       # the default backend
    assert llm.expert_backend in FAST_BACKENDS, f"auto fell back to {llm.expert_backend!r}"
    llm.engine = ScriptedEngine(llm.engine)
    return llm


@pytest.fixture(scope="module")
def server(llm):
    s = _Server(create_app(llm, "tiny"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _health(server) -> dict:
    return httpx.get(server.url + "/health").json()


def test_chat_non_stream_thinking_and_instant(client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert choice.message.model_extra["reasoning_content"]          # thinking on: output starts in <think>
    assert r.usage.completion_tokens == 6 and r.usage.total_tokens == r.usage.prompt_tokens + 6
    r2 = client.chat.completions.create(model="tiny", messages=USER, max_completion_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True,
                                                    "chat_template_kwargs": {"thinking": False}})
    assert r2.choices[0].message.content and "reasoning_content" not in r2.choices[0].message.model_extra
    assert r2.usage.completion_tokens == 6


def test_chat_stream_with_usage_and_seed(client):
    def run():
        chunks = list(client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=8, temperature=1.0, seed=7, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join((c.choices[0].delta.model_extra.get("reasoning_content") or "")
                       + (c.choices[0].delta.content or "") for c in chunks if c.choices)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices
        return text
    assert run() == run()                       # same seed, same text


def test_completions_prompt_text_ids_stream_stop(client):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    text = r.choices[0].text
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == text
    stop = text[3:6]
    r2 = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                   stop=[stop], extra_body={"ignore_eos": True})
    assert r2.choices[0].finish_reason == "stop" and r2.choices[0].text == text[:text.index(stop)]
    r3 = client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=3, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert r3.usage.prompt_tokens == 4 and r3.usage.completion_tokens == 3 and len(r3.choices) == 1


def test_completions_echo_puts_the_prompt_first(client, llm):
    def complete(prompt, **kw):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True}, **kw)
    plain = complete(PROMPT)
    assert plain.choices[0].text and not plain.choices[0].text.startswith(PROMPT)   # no echo: completion only
    echoed = complete(PROMPT, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text                # the same greedy tokens
    assert (echoed.usage.prompt_tokens, echoed.usage.completion_tokens) == (plain.usage.prompt_tokens, 6)
    chunks = [c.choices[0].text for c in complete(PROMPT, echo=True, stream=True) if c.choices]
    assert chunks[0] == PROMPT and "".join(chunks) == PROMPT + plain.choices[0].text
    assert complete(PROMPT, echo=False).choices[0].text == plain.choices[0].text
    ids = llm.tokenizer.encode(PROMPT)            # a prompt of token ids echoes as its text
    assert complete(ids, echo=True).choices[0].text == PROMPT + plain.choices[0].text


def test_models_and_health(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"]
    assert _health(server)["status"] == "ok"


def test_tools_non_stream_and_stream(client, llm):
    llm.engine.script = TOOL_TEXT
    try:
        r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="auto")
        calls = list(client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, stream=True))
    finally:
        llm.engine.script = None
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.model_extra["reasoning_content"] == "let me check"
    assert msg.tool_calls[0].function.name == "get_weather" and msg.tool_calls[0].id == "functions.get_weather:0"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}
    name, args = None, ""
    for c in calls:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            name = tc.function.name or name
            args += tc.function.arguments or ""
    assert name == "get_weather" and json.loads(args) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in calls if c.choices][-1] == "tool_calls"
    # the answer goes back as history with the tool's result, through the real model
    history = USER + [msg.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "18 C, sunny"}]
    r2 = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4)
    assert r2.choices[0].finish_reason in ("length", "stop")
    # tool_choice none leaves the tools out of the prompt (forced calls: tests/test_server_structured.py)
    with_tools = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=1).usage
    without = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="none",
                                             max_tokens=1).usage
    assert without.prompt_tokens < with_tools.prompt_tokens


LONG = "word " * (MAX_CONTEXT + 50)
BAD = [  # (path, raw body, param named in the error)
    ("/v1/chat/completions", "{not json", None),
    ("/v1/chat/completions", "[1, 2]", None),
    ("/v1/chat/completions", json.dumps({"messages": USER, "temperature": "hot"}), "temperature"),
    ("/v1/chat/completions", json.dumps({"messages": USER, "max_tokens": "5"}), "max_tokens"),
    ("/v1/chat/completions", json.dumps({"messages": USER, "max_completion_tokens": 0}), "max_completion_tokens"),
    ("/v1/chat/completions", json.dumps({"messages": USER, "top_p": 2}), "top_p"),
    ("/v1/chat/completions", json.dumps({"messages": USER, "stream": "yes"}), "stream"),
    ("/v1/chat/completions", json.dumps({"messages": USER, "stop": [1]}), "stop"),
    ("/v1/chat/completions", json.dumps({"messages": USER, "n": 99}), "n"),
    ("/v1/chat/completions", json.dumps({"messages": "hi"}), "messages"),
    ("/v1/chat/completions", json.dumps({"model": "tiny"}), "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), "messages[0].role"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": LONG}]}), "messages"),
    ("/v1/chat/completions", json.dumps({"messages": USER, "tools": TOOLS,
                                         "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
     "tool_choice"),
    ("/v1/chat/completions", json.dumps({"messages": USER, "chat_template_kwargs": {"thinking": "no"}}),
     "chat_template_kwargs.thinking"),
    ("/v1/completions", json.dumps({"prompt": list(range(MAX_CONTEXT + 10))}), "prompt"),
    ("/v1/completions", json.dumps({"prompt": [10 ** 9]}), "prompt"),
    ("/v1/completions", json.dumps({"prompt": 42}), "prompt"),
    ("/v1/completions", json.dumps({"prompt": "hi", "seed": "x"}), "seed"),
]


def test_bad_requests_get_400_naming_the_field(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body, param in BAD:
            r = http.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (body[:80], r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == param, (body[:80], err)
            assert err["message"]
        ok = http.post("/v1/completions", json={"prompt": "still alive", "max_tokens": 2})
        assert ok.status_code == 200
    assert _health(server)["running"] == 0


def test_api_key(llm):
    s = _Server(create_app(llm, "tiny", api_key="sekrit"))      # only /v1/models is used: no engine work
    try:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        bad = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(s.url + "/v1/chat/completions", json={"messages": USER}).status_code == 401
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0).models.list()
        assert good.data[0].id == "tiny"
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


def _wait_for(server, pred, timeout=5.0) -> dict:
    deadline = time.time() + timeout
    while True:
        h = _health(server)
        if pred(h) or time.time() > deadline:
            return h
        time.sleep(0.05)


def test_client_disconnect_aborts_generation(server):
    long = {"messages": USER, "max_tokens": MAX_CONTEXT - 40, "ignore_eos": True, "temperature": 0}
    before = _health(server)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
        assert got[0].startswith("data: ")
    h = _wait_for(server, lambda h: h["aborted"] > before["aborted"] and h["running"] == 0)
    assert h["aborted"] == before["aborted"] + 1 and h["running"] == 0 and h["finished"] == before["finished"]
    with pytest.raises(httpx.ReadTimeout):           # non-streaming: the client gives up waiting
        httpx.post(server.url + "/v1/chat/completions", json=long, timeout=0.6)
    h = _wait_for(server, lambda h: h["aborted"] > before["aborted"] + 1 and h["running"] == 0)
    assert h["aborted"] == before["aborted"] + 2 and h["finished"] == before["finished"]


def test_concurrent_requests_share_decode_steps(client, server):
    results = [None] * 4

    def one(i):
        results[i] = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=40,
            extra_body={"ignore_eos": True})
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.usage.completion_tokens == 40 for r in results)
    assert _health(server)["max_batch_seen"] >= 2       # several sequences decoded in one forward
