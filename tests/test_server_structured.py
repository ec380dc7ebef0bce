"""Structured output and forced tool calls (hybrid/text/grammar.py through the server) on the tiny
random-weight checkpoint, the hard case: the model never wants to write JSON, so every valid answer is the
grammar's doing.
- response_format json_schema: 50 requests over 12 schemas (nested objects, arrays, enums, numbers,
  booleans, null, anyOf) in instant and thinking mode all parse and validate with `jsonschema`.
- tool_choice "required" and a named function: 50 of 50 answers are Kimi tool calls whose arguments
  validate against that tool's parameters (parsed by the server's own output parser into tool_calls).
- a schema the grammar library rejects is a 400 naming response_format; json_object gives an object.
The schemas bound their strings (maxLength), arrays (maxItems) and number digits (multipleOf): with
random weights an unbounded string or fraction almost never closes within max_tokens (a trained model
closes it; the grammar only keeps every token valid).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
import torch

import hybrid
from hybrid.apps.server import create_app
from hybrid.text.grammar import constraint_for
from test_server import _Server

MAX_TOKENS = 160            # enough for every schema below (their answers are short and bounded)
USER = [{"role": "user", "content": "Answer in JSON."}]
S = {"type": "string", "maxLength": 10}
INT = {"type": "integer", "minimum": -50, "maximum": 500}
NUM = {"type": "number", "minimum": -10, "maximum": 10, "multipleOf": 0.01}   # bounded digits


def obj(props: dict, required=None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


SCHEMAS = [
    obj({"name": S, "age": INT}),
    obj({"x": NUM, "y": NUM}),
    obj({"kind": {"enum": ["cat", "dog", "bird"]}, "legs": {"type": "integer", "enum": [2, 4]}}),
    obj({"tags": {"type": "array", "items": S, "maxItems": 3}}),
    obj({"ok": {"type": "boolean"}, "none": {"type": "null"}}),
    obj({"user": obj({"id": INT, "email": S}), "active": {"type": "boolean"}}),
    obj({"points": {"type": "array", "items": obj({"x": INT, "y": INT}), "minItems": 1, "maxItems": 2}}),
    obj({"value": {"anyOf": [INT, S, {"type": "boolean"}]}}),
    obj({"a": obj({"b": obj({"c": {"enum": ["deep"]}})})}),
    obj({"scores": {"type": "array", "items": NUM, "maxItems": 4}, "label": S}),
    obj({"id": INT, "note": S}, required=["id"]),
    obj({"matrix": {"type": "array", "items": {"type": "array", "items": INT, "maxItems": 2}, "maxItems": 2}}),
]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": obj({"city": S, "unit": {"enum": ["C", "F"]}})}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                      "parameters": obj({"a": INT, "b": INT})}},
    {"type": "function", "function": {"name": "search", "description": "Search the web",
                                      "parameters": obj({"query": S, "limit": {"type": "integer", "minimum": 1,
                                                                              "maximum": 10}},
                                                        required=["query"])}},
]
BY_NAME = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def llm(tiny_dir):                 # the session's tiny checkpoint (tests/conftest.py); read only
    return hybrid.LLM(tiny_dir, progress=False, max_context=512, max_batch=8)


@pytest.fixture(scope="module")
def server(llm):
    s = _Server(create_app(llm, "tiny"))
    yield s
    s.stop()


def _post_all(server, bodies: list[dict]) -> list[dict]:
    def one(body):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, bodies))


def test_json_schema_answers_validate(server):
    bodies = []
    for i in range(50):
        schema = SCHEMAS[i % len(SCHEMAS)]
        thinking = i % 5 == 4                        # every fifth in thinking mode, reasoning cut at 6 tokens
        bodies.append({"messages": USER, "max_tokens": MAX_TOKENS, "seed": i, "temperature": 1.0,
                       "response_format": {"type": "json_schema",
                                           "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}},
                       "chat_template_kwargs": {"thinking": thinking}, "max_reasoning_tokens": 6})
    valid = 0
    for i, r in enumerate(_post_all(server, bodies)):
        msg = r["choices"][0]["message"]
        assert r["choices"][0]["finish_reason"] == "stop", (i, msg)
        jsonschema.validate(json.loads(msg["content"]), SCHEMAS[i % len(SCHEMAS)])
        if i % 5 == 4:
            assert msg["reasoning"] == msg["reasoning_content"] and msg["reasoning"] is not None
        valid += 1
    assert valid == 50


def test_forced_tool_calls_have_valid_arguments(server):
    bodies = []
    for i in range(50):
        choice = "required" if i % 2 else {"type": "function", "function": {"name": TOOLS[i % 3]["function"]["name"]}}
        bodies.append({"messages": USER, "tools": TOOLS, "tool_choice": choice, "max_tokens": MAX_TOKENS,
                       "seed": 100 + i, "chat_template_kwargs": {"thinking": i % 4 == 0}, "max_reasoning_tokens": 4})
    for i, r in enumerate(_post_all(server, bodies)):
        choice = r["choices"][0]
        calls = choice["message"].get("tool_calls")
        assert choice["finish_reason"] == "tool_calls" and calls, (i, choice)
        if i % 2 == 0:
            assert len(calls) == 1 and calls[0]["function"]["name"] == TOOLS[i % 3]["function"]["name"]
        for call in calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), BY_NAME[call["function"]["name"]])


def test_json_object_stream_and_bad_schema(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        bad = http.post("/v1/chat/completions", json={
            "messages": USER, "response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format", bad.text
        assert http.post("/v1/chat/completions", json={"messages": USER, "response_format": {"type": "yaml"}}
                         ).status_code == 400
        text = ""
        with http.stream("POST", "/v1/chat/completions", json={
                "messages": USER, "stream": True, "max_tokens": MAX_TOKENS, "seed": 3,
                "chat_template_kwargs": {"thinking": False},
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[5]}}}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        text += c["delta"].get("content") or ""
        jsonschema.validate(json.loads(text), SCHEMAS[5])


def test_constraint_direct_thinking_budget_and_overlap(llm):
    """The constraint alone with random logits: reasoning is free until the budget forces </think>, then
    only schema-valid tokens; the end-of-turn token comes only once the JSON is complete."""
    tok, vocab = llm.tokenizer, llm.config.vocab_size
    g = torch.Generator().manual_seed(5)
    for overlap in (True, False):
        c = constraint_for(tok, vocab, "json_schema", schema=SCHEMAS[0], thinking=True, reasoning_budget=3)
        c.overlap = overlap
        out = []
        for _ in range(MAX_TOKENS):
            logits = c.mask(torch.randn(vocab, generator=g))
            t = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
            if t == tok.im_end_id:
                break
            out.append(t)
            c.advance(t)
        assert out[3] == tok.think_end_id and tok.im_end_id not in out[:3]
        jsonschema.validate(json.loads(tok.decode(out[4:])), SCHEMAS[0])
