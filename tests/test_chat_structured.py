"""`llm.chat` takes the OpenAI fields for structured output (issue 13): response_format json_schema gives
an answer that parses and validates (jsonschema) on the tiny random-weight checkpoint, in thinking and
instant modes; tool_choice "required" gives a tool call whose arguments are valid JSON for the tool's
schema; a bad response_format is a ValueError naming it. Default expert backend.
"""
from __future__ import annotations

import json

import jsonschema
import pytest

import hybrid
from hybrid import SamplingParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "n", "kind"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer", "minimum": 0,
                                                                            "maximum": 99},
                         "kind": {"enum": ["a", "b"]}}}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "required": ["city"], "additionalProperties": False,
    "properties": {"city": {"type": "string", "maxLength": 10}}}}}
MAX_TOKENS = 96
USER = [{"role": "user", "content": "Give me a record."}]


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return hybrid.LLM(tiny_dir, progress=False, max_context=1024, max_batch=2)


@pytest.mark.parametrize("thinking", [False, True])
def test_json_schema_answer_validates(llm, thinking):
    rf = {"type": "json_schema", "json_schema": {"name": "rec", "schema": SCHEMA}}
    r = llm.chat(USER, SamplingParams(temperature=0.8, seed=7, max_tokens=MAX_TOKENS), thinking=thinking,
                 response_format=rf, max_reasoning_tokens=8)
    assert r.finish_reason == "stop", r
    jsonschema.validate(json.loads(r.message.content), SCHEMA)


def test_tool_choice_required_gives_valid_arguments(llm):
    r = llm.chat(USER, SamplingParams(temperature=0.8, seed=3, max_tokens=MAX_TOKENS), tools=[TOOL],
                 thinking=False, tool_choice="required")
    assert r.message.tool_calls, r
    call = r.message.tool_calls[0]
    assert call["function"]["name"] == "lookup"
    jsonschema.validate(json.loads(call["function"]["arguments"]), TOOL["function"]["parameters"])


def test_bad_response_format_is_refused(llm):
    with pytest.raises(ValueError, match="response_format"):
        llm.chat(USER, response_format={"type": "yaml"})
