"""Generated text -> reasoning, answer and OpenAI-style tool calls (docs/kimi_k2.md §5), streaming-safe.

Thinking mode: the generation prompt already ends with `<think>`, so output starts inside the
reasoning (a leading `<think>` is consumed if the model writes one anyway); reasoning ends at
`</think>`, or implicitly where a tool-call section begins. Instant mode (thinking=False): all
text is content (`<think>` / `</think>` stay text, as in vLLM's kimi_k2 reasoning parser).
Tool calls:

    <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>
    {JSON}<|tool_call_end|>...<|tool_calls_section_end|>

(singular `<|tool_call_section_begin|>` / `_end|>` accepted too; whitespace between markers is
ignored). `StreamParser.feed` holds back any tail that could still become a marker, so a
partial marker never reaches the user; malformed output degrades to plain content and nothing
here raises. `<|im_end|>` ends parsing. Checked by tests/test_parsing.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

THINK, THINK_END = "<think>", "</think>"
SECTION_BEGIN = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")
SECTION_END = ("<|tool_calls_section_end|>", "<|tool_call_section_end|>")
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
IM_END = "<|im_end|>"
MARKERS = (THINK, THINK_END, *SECTION_BEGIN, *SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END,
           IM_END)
_MARKER_RE = re.compile("|".join(re.escape(m) for m in sorted(MARKERS, key=len, reverse=True)))
_MAX_MARKER = max(map(len, MARKERS))
_ID_RE = re.compile(r"(?:functions\.)?([\w.\-]+?)(?::(\d+))?")
_MAX_ID_CHARS = 256

REASONING, CONTENT, SECTION, CALL_ID, CALL_ARGS, DONE = range(6)


@dataclass
class Delta:
    """One streaming increment. type: 'reasoning' | 'content' | 'tool_call'. A tool call's
    first delta carries index, id and name (arguments ""), later ones argument fragments."""
    type: str
    text: str = ""
    index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass
class ParsedMessage:
    reasoning_content: str | None
    content: str
    tool_calls: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """As an OpenAI assistant message (also valid chat history for the template)."""
        d = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            d["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            d["tool_calls"] = self.tool_calls
        return d


def _partial_marker_start(buf: str) -> int:
    """Index where a suffix of buf that is a proper prefix of a marker starts, else len(buf).
    Markers contain '<' only at position 0, so only the last '<' can start one."""
    i = buf.rfind("<", max(0, len(buf) - _MAX_MARKER + 1))
    if i >= 0:
        tail = buf[i:]
        if any(m.startswith(tail) and m != tail for m in MARKERS):
            return i
    return len(buf)


class StreamParser:
    """Incremental parser: feed(text_delta) -> list[Delta]; finish() -> list[Delta]."""

    def __init__(self, thinking: bool = True, first_call_index: int = 0):
        self.thinking = thinking
        self.state = REASONING if thinking else CONTENT
        self._buf = ""
        self._saw_reasoning_text = False
        self._id_buf = ""
        self._n_calls = 0
        self._call_args_seen = False
        self._first_call_index = first_call_index
        self._out: list[Delta] = []

    # -------------------------------------------------------------- emission
    def _emit(self, d: Delta) -> None:
        last = self._out[-1] if self._out else None
        if last is not None and last.type == d.type and d.type != "tool_call":
            last.text += d.text
        elif (last is not None and d.type == "tool_call" and last.type == "tool_call"
              and d.id is None and last.index == d.index):
            last.arguments += d.arguments
        else:
            self._out.append(d)

    def _text(self, s: str) -> None:
        if not s:
            return
        st = self.state
        if st == REASONING:
            if s.strip():
                self._saw_reasoning_text = True
            self._emit(Delta("reasoning", text=s))
        elif st == CONTENT:
            self._emit(Delta("content", text=s))
        elif st == SECTION:
            if s.strip():  # junk between calls: keep it, as content
                self._emit(Delta("content", text=s))
        elif st == CALL_ID:
            self._id_buf += s
            if len(self._id_buf) > _MAX_ID_CHARS:
                self._degrade_call_id()
                self.state = CONTENT
        elif st == CALL_ARGS:
            if s.strip():
                self._call_args_seen = True
            self._emit(Delta("tool_call", index=self._n_calls - 1, arguments=s))

    def _degrade_call_id(self) -> None:
        """An unusable call header: show what the model wrote as content."""
        raw, self._id_buf = CALL_BEGIN + self._id_buf, ""
        self._emit(Delta("content", text=raw))

    def _open_call(self) -> bool:
        id_text, self._id_buf = self._id_buf.strip(), ""
        m = _ID_RE.fullmatch(id_text)
        if not m:
            self._id_buf = id_text
            return False
        name = m.group(1)
        idx = self._n_calls
        call_id = id_text if m.group(2) is not None else \
            f"functions.{name}:{self._first_call_index + idx}"
        self._n_calls += 1
        self._call_args_seen = False
        self._emit(Delta("tool_call", index=idx, id=call_id, name=name, arguments=""))
        return True

    def _close_call(self) -> None:
        if not self._call_args_seen:
            self._emit(Delta("tool_call", index=self._n_calls - 1, arguments="{}"))
        self._call_args_seen = True

    # -------------------------------------------------------------- markers
    def _marker(self, mk: str) -> None:
        st = self.state
        if mk == IM_END:
            if st == CALL_ID:
                self._degrade_call_id()
            elif st == CALL_ARGS:
                self._close_call()
            self.state = DONE
            return
        if st == REASONING:
            if mk == THINK and not self._saw_reasoning_text:
                return  # leading <think> written by the model itself
            if mk == THINK_END:
                self.state = CONTENT
            elif mk in SECTION_BEGIN:
                self.state = SECTION
            elif mk == CALL_BEGIN:
                self.state = CALL_ID
            else:
                self._text(mk)
        elif st == CONTENT:
            if mk in SECTION_BEGIN:
                self.state = SECTION
            elif mk == CALL_BEGIN:  # a call without its section marker
                self.state = CALL_ID
            else:
                self._text(mk)
        elif st == SECTION:
            if mk == CALL_BEGIN:
                self.state = CALL_ID
            elif mk in SECTION_END:
                self.state = CONTENT
            elif mk in SECTION_BEGIN:
                pass
            else:
                self._emit(Delta("content", text=mk))
        elif st == CALL_ID:
            if mk == ARG_BEGIN:
                if self._open_call():
                    self.state = CALL_ARGS
                else:
                    self._id_buf += ARG_BEGIN
                    self._degrade_call_id()
                    self.state = CONTENT
            elif mk == CALL_END:
                if self._open_call():
                    self._close_call()
                    self.state = SECTION
                else:
                    self._id_buf += CALL_END
                    self._degrade_call_id()
                    self.state = SECTION
            elif mk == CALL_BEGIN:
                self._degrade_call_id()
            else:
                self._degrade_call_id()
                self.state = CONTENT if mk in SECTION_END else SECTION
                if mk not in SECTION_END and mk not in SECTION_BEGIN:
                    self._emit(Delta("content", text=mk))
        elif st == CALL_ARGS:
            if mk == CALL_END:
                self._close_call()
                self.state = SECTION
            elif mk == CALL_BEGIN:
                self._close_call()
                self.state = CALL_ID
            elif mk in SECTION_END:
                self._close_call()
                self.state = CONTENT
            else:
                self._text(mk)

    # -------------------------------------------------------------- public
    def feed(self, text_delta: str) -> list[Delta]:
        if self.state == DONE or not text_delta:
            return []
        self._buf += text_delta
        buf = self._buf
        pos = 0
        while self.state != DONE:
            m = _MARKER_RE.search(buf, pos)
            if m is None:
                break
            self._text(buf[pos:m.start()])
            self._marker(m.group())
            pos = m.end()
        if self.state == DONE:
            self._buf = ""
        else:
            rest = buf[pos:]
            cut = _partial_marker_start(rest)
            self._text(rest[:cut])
            self._buf = rest[cut:]
        out, self._out = self._out, []
        return out

    def finish(self) -> list[Delta]:
        """End of generation: a held-back tail is plain text after all."""
        if self.state != DONE:
            rest, self._buf = self._buf, ""
            self._text(rest)
            if self.state == CALL_ID:
                self._degrade_call_id()
            elif self.state == CALL_ARGS:
                self._close_call()
            self.state = DONE
        out, self._out = self._out, []
        return out


def accumulate(deltas: list[Delta], thinking: bool) -> ParsedMessage:
    """Fold streamed deltas into the final message."""
    reasoning, content = [], []
    calls: dict[int, dict] = {}
    for d in deltas:
        if d.type == "reasoning":
            reasoning.append(d.text)
        elif d.type == "content":
            content.append(d.text)
        else:
            if d.id is not None:
                calls[d.index] = {"id": d.id, "type": "function",
                                  "function": {"name": d.name, "arguments": ""}}
            calls[d.index]["function"]["arguments"] += d.arguments or ""
    tool_calls = [calls[i] for i in sorted(calls)]
    for tc in tool_calls:
        tc["function"]["arguments"] = tc["function"]["arguments"].strip()
    return ParsedMessage("".join(reasoning) if thinking else None, "".join(content), tool_calls)


def parse_output(text: str, thinking: bool = True, first_call_index: int = 0) -> ParsedMessage:
    """Whole generated text -> ParsedMessage. Never raises."""
    p = StreamParser(thinking, first_call_index)
    deltas = p.feed(text) + p.finish()
    return accumulate(deltas, thinking)


def arguments_json(tool_call: dict):
    """The decoded arguments of a parsed tool call, or None if the model wrote invalid JSON."""
    try:
        return json.loads(tool_call["function"]["arguments"])
    except (ValueError, TypeError, KeyError):
        return None
