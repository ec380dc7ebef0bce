"""Reasoning / content / tool-call parsing of generated text, whole and streamed."""
import json
import random

import pytest

from hybrid.text.chat_template import render_chat
from hybrid.text.output_parser import MARKERS, StreamParser, accumulate, arguments_json, parse_output
from hybrid.synthetic.tokenizer_files import CHAT_TEMPLATE

CALLS = ("<|tool_calls_section_begin|>\n"
         "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
         "{\"city\": \"Paris\"}<|tool_call_end|>\n"
         "<|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>"
         "{\"tz\": \"Asia/Tokyo\"}<|tool_call_end|>\n"
         "<|tool_calls_section_end|>")

CASES = [
    # (text, thinking, reasoning, content, [(id, name, args)])
    ("Just thinking, no end", True, "Just thinking, no end", "", []),
    ("Reason.</think>Answer.", True, "Reason.", "Answer.", []),
    ("<think>Reason.</think>Answer.", True, "Reason.", "Answer.", []),
    ("Answer only, a < b and <tag> and </think", False, None, "Answer only, a < b and <tag> and </think", []),
    ("<think>x</think>y", False, None, "<think>x</think>y", []),
    ("Hmm.</think>Checking." + CALLS, True, "Hmm.", "Checking.",
     [("functions.get_weather:0", "get_weather", '{"city": "Paris"}'),
      ("functions.get_time:1", "get_time", '{"tz": "Asia/Tokyo"}')]),
    ("Need a tool" + CALLS, True, "Need a tool", "",  # section start ends reasoning implicitly
     [("functions.get_weather:0", "get_weather", '{"city": "Paris"}'),
      ("functions.get_time:1", "get_time", '{"tz": "Asia/Tokyo"}')]),
    ("Sure." + CALLS.replace("tool_calls_section", "tool_call_section"), False, None, "Sure.",
     [("functions.get_weather:0", "get_weather", '{"city": "Paris"}'),
      ("functions.get_time:1", "get_time", '{"tz": "Asia/Tokyo"}')]),
    ("r</think><|tool_calls_section_begin|><|tool_call_begin|>search:3"
     "<|tool_call_argument_begin|>{\"q\":1}<|tool_call_end|><|tool_calls_section_end|>", True,
     "r", "", [("search:3", "search", '{"q":1}')]),
    ("r</think><|tool_calls_section_begin|><|tool_call_begin|>functions.ns.lookup_v2"
     "<|tool_call_argument_begin|><|tool_call_end|>", True,
     "r", "", [("functions.ns.lookup_v2:0", "ns.lookup_v2", "{}")]),
    ("done</think>ok<|im_end|>ignored", True, "done", "ok", []),
]


def _check(msg, reasoning, content, calls):
    assert msg.reasoning_content == reasoning
    assert msg.content == content
    got = [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in msg.tool_calls]
    assert got == calls
    assert all(c["type"] == "function" for c in msg.tool_calls)


@pytest.mark.parametrize("case", CASES)
def test_parse_output(case):
    text, thinking, reasoning, content, calls = case
    _check(parse_output(text, thinking), reasoning, content, calls)


def _stream(text, thinking, sizes, well_formed=True):
    p = StreamParser(thinking)
    deltas, i, k = [], 0, 0
    while i < len(text):
        n = sizes[k % len(sizes)]
        out = p.feed(text[i:i + n])
        for d in out:  # never a marker, or a piece of one, in visible text
            if d.type in ("reasoning", "content"):
                # malformed output may show whole stray markers as text, never pieces
                assert not well_formed or not any(m in d.text for m in MARKERS
                                                  if m.startswith("<|")), d
                assert not d.text.endswith(("<", "<|", "<|tool", "</thi")), d
        deltas += out
        i, k = i + n, k + 1
    return deltas + p.finish()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sizes", [[1], [2], [3, 1, 7], [5, 11], [10_000]])
def test_streaming_matches_whole(case, sizes):
    text, thinking, reasoning, content, calls = case
    _check(accumulate(_stream(text, thinking, sizes), thinking), reasoning, content, calls)


def test_streaming_random_splits():
    text = "Deep thought.</think>Answer." + CALLS
    rng = random.Random(0)
    ref = parse_output(text, True)
    for _ in range(200):
        sizes = [rng.randint(1, 9) for _ in range(8)]
        assert accumulate(_stream(text, True, sizes), True) == ref


def test_marker_split_across_chunks_is_held_back():
    p = StreamParser(thinking=True)
    assert [d.text for d in p.feed("abc<|tool_ca")] == ["abc"]
    assert p.feed("lls_sec") == []
    out = p.feed("tion_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{\"a")
    assert [(d.type, d.id, d.name, d.arguments) for d in out] == \
        [("tool_call", "functions.f:0", "f", '{"a')]
    out = p.feed("\": 1}<|tool_call_e")
    assert [(d.type, d.index, d.arguments) for d in out] == [("tool_call", 0, '": 1}')]
    assert p.feed("nd|><|tool_calls_section_end|>") == []
    assert p.finish() == []
    # a '<' that turns out not to start a marker is released with the next chunk
    p = StreamParser(thinking=False)
    assert [d.text for d in p.feed("x <")] == ["x "]
    assert [d.text for d in p.feed("|im_e")] == []
    assert [d.text for d in p.feed("xtra y")] == ["<|im_extra y"]
    assert [d.text for d in p.feed("<")] == [] and [d.text for d in p.finish()] == ["<"]


def test_think_end_split_across_chunks():
    p = StreamParser(thinking=True)
    out = p.feed("reasoning</th") + p.feed("ink>answer") + p.finish()
    assert [(d.type, d.text) for d in out] == [("reasoning", "reasoning"), ("content", "answer")]


@pytest.mark.parametrize("text", [
    "r</think>a<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
    "<|tool_call_argument_begin|>{not json<|tool_call_end|><|tool_calls_section_end|>",
    "r</think>a<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
    "<|tool_call_argument_begin|>{\"a\": 1",  # cut off mid-arguments
    "r</think><|tool_call_argument_begin|>{}<|tool_call_end|>b",  # stray markers
    "r</think><|tool_calls_section_begin|><|tool_call_begin|>???<|tool_call_argument_begin|>{}",
    "r</think><|tool_calls_section_begin|><|tool_call_begin|>" + "x" * 400,
    "<|tool_calls_section_end|></think><think><|tool_call_end|>",
    "<|tool_calls_section_begin|>junk<|tool_call_begin|><|tool_call_end|>",
    "",
    "<",
    "<|tool_call_begin",
])
@pytest.mark.parametrize("thinking", [True, False])
def test_malformed_output_never_raises(text, thinking):
    msg = parse_output(text, thinking)
    assert accumulate(_stream(text, thinking, [1], well_formed=False), thinking) == msg
    for tc in msg.tool_calls:
        assert isinstance(tc["function"]["arguments"], str) and tc["function"]["name"]
    # nothing the model wrote is lost except markers and whitespace inside the section
    visible = (msg.reasoning_content or "") + msg.content + \
        "".join(tc["function"]["arguments"] for tc in msg.tool_calls)
    for word in ("not json", "???", "junk", "x" * 400):
        if word in text:
            assert word in visible


def test_malformed_json_keeps_raw_arguments():
    msg = parse_output("</think><|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
                       "<|tool_call_argument_begin|>{bad<|tool_call_end|>", True)
    assert msg.tool_calls[0]["function"]["arguments"] == "{bad"
    assert arguments_json(msg.tool_calls[0]) is None
    good = parse_output("Hmm.</think>" + CALLS, True)
    assert arguments_json(good.tool_calls[0]) == {"city": "Paris"}


def test_unterminated_call_header_degrades_to_text():
    msg = parse_output("a<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0", False)
    assert msg.tool_calls == [] and msg.content == "a<|tool_call_begin|>functions.f:0"


def test_parsed_message_round_trips_through_template():
    msg = parse_output("Plan.</think>Calling." + CALLS, True)
    history = [{"role": "user", "content": "go"}, msg.to_dict()]
    text = render_chat(CHAT_TEMPLATE, history, add_generation_prompt=False)
    body = "<think>Plan.</think>Calling." + CALLS.replace("\n", "") + "<|im_end|>"
    assert text.endswith("<|im_assistant|>assistant<|im_middle|>" + body)
    again = parse_output(text.split("<|im_middle|>")[-1][len("<think>"):], True)
    assert again.tool_calls == msg.tool_calls
    assert json.loads(again.tool_calls[1]["function"]["arguments"]) == {"tz": "Asia/Tokyo"}
