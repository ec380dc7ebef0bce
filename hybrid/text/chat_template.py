"""Chat messages -> prompt text / token ids with the checkpoint's own jinja chat template.

The template runs in a sandboxed jinja2 environment set up like Hugging Face's
`apply_chat_template` (trim_blocks, lstrip_blocks, loopcontrols, the same `tojson`), with the
model card's switches as template variables (`thinking`, `preserve_thinking`). Tools are
deep-sorted by key first, as the checkpoint's tokenizer does; for templates that read
`tools_ts_str` (K2.5/K2.6) it is computed from the tools (hybrid/text/tool_declaration.py) unless the
caller passes it, and left out -- so the template writes the JSON -- where the official encoder
would fail too.

Special tokens come only from the template: before rendering, every special-token string inside
caller-supplied data (contents, names, ids, arguments, tools, extra kwargs) is swapped for a
private-use placeholder character; after rendering, the markers left in the text are the
template's own (-> special ids) and the placeholders are turned back into their characters
(-> ordinary BPE). A user message containing "<|im_end|><|im_system|>" can therefore neither
close its turn nor forge a system turn or a tool call. Checked by tests/test_chat.py.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Iterable

import regex
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hybrid.text.tokenizer import SPECIAL_NAMES
from hybrid.text.tool_declaration import deep_sort_dict, tools_to_typescript

ROLES = ("system", "user", "assistant", "tool")
_DEFAULT_SPECIALS = tuple(SPECIAL_NAMES.values())
_RESERVED = r"<\|reserved_token_\d+\|>"
_PUA_START = 0xF0000  # Supplementary Private Use Area-A: never produced by normal text
_TS_VAR = "tools_ts_str"  # what K2.5/K2.6 templates read the TypeScript tool declaration from


@dataclass(frozen=True)
class Segment:
    text: str
    special: bool  # True: a template marker that is one special token


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # same signature and defaults as transformers' chat-template `tojson`
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message):
    raise TemplateError(message)


MAX_TEMPLATE_OUTPUT = 64 * 2 ** 20      # characters; a 262,144-token K2.6 prompt is ~1-2 MB of text


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, plus: `*` and `**` cannot build huge strings, lists or numbers
    ('a' * 10**10 would allocate 10 GB per request); range() is already bounded by the sandbox."""
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, k in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(k, int) and len(seq) * max(k, 0) > MAX_TEMPLATE_OUTPUT:
                    raise SecurityError(f"template builds a sequence of {len(seq) * k} items")
        if operator == "**" and isinstance(right, int) and abs(right) > 1000:
            raise SecurityError("template exponent too large")
        return super().call_binop(context, operator, left, right)


_ENV = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
_ENV.filters["tojson"] = _tojson
_ENV.globals["raise_exception"] = _raise_exception
_TEMPLATE_CACHE: dict[str, Any] = {}


def _compile(template_text: str):
    t = _TEMPLATE_CACHE.get(template_text)
    if t is None:
        t = _ENV.from_string(template_text)
        if len(_TEMPLATE_CACHE) > 16:
            _TEMPLATE_CACHE.clear()
        _TEMPLATE_CACHE[template_text] = t
    return t


# ---------------------------------------------------------------------- validation
def _err(where: str, msg: str) -> ValueError:
    return ValueError(f"{where}: {msg}")


def _check_content(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _err(where, f"must be a string or a list of content parts, got "
                          f"{type(content).__name__}")
    for j, part in enumerate(content):
        w = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _err(w, f"content part must be a dict, got {type(part).__name__}")
        kind = part.get("type", "text" if "text" in part else None)
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _err(w + ".text", "text part needs a string 'text'")
        elif kind in ("image", "image_url") or "image" in part or "image_url" in part:
            continue
        elif kind in ("video", "video_url"):
            raise _err(w + ".type", "video input is not supported yet; send images (image_url parts)")
        else:
            raise _err(w + ".type", f"unknown content part type {kind!r}; allowed: "
                                    "'text', 'image', 'image_url'")


def validate_tools(tools: Any) -> list[dict]:
    """Check an OpenAI-style tools list; returns a deep-sorted copy."""
    if not isinstance(tools, list):
        raise _err("tools", f"must be a list, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        w = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _err(w, f"must be a dict, got {type(tool).__name__}")
        if tool.get("type", "function") != "function":
            raise _err(w + ".type", f"unknown tool type {tool.get('type')!r}; allowed: "
                                    "'function'")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _err(w + ".function", "missing or not a dict")
        name = fn.get("name")
        if not isinstance(name, str) or not regex.fullmatch(r"[\w.\-]+", name):
            raise _err(w + ".function.name", f"must be a non-empty identifier "
                                             f"([A-Za-z0-9_.-]), got {name!r}")
        if "description" in fn and not isinstance(fn["description"], str):
            raise _err(w + ".function.description", "must be a string")
        params = fn.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise _err(w + ".function.parameters", "must be a JSON schema object (dict)")
            if params.get("type", "object") != "object":
                raise _err(w + ".function.parameters.type",
                           f"must be 'object', got {params.get('type')!r}")
            props = params.get("properties", {})
            if not isinstance(props, dict):
                raise _err(w + ".function.parameters.properties", "must be a dict")
    return deep_sort_dict(tools)


def validate_messages(messages: Any) -> list[dict]:
    """Check roles and fields; returns copies with tool-call ids filled in as
    `functions.{name}:{idx}` where missing (the form the model was trained on)."""
    if not isinstance(messages, list) or not messages:
        raise _err("messages", "must be a non-empty list of message dicts")
    out = []
    call_idx = 0
    for i, m in enumerate(messages):
        w = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _err(w, f"must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise _err(w + ".role", f"unknown role {role!r}; allowed: {', '.join(ROLES)}")
        m = copy.deepcopy(m)
        if "name" in m and m["name"] is not None and not isinstance(m["name"], str):
            raise _err(w + ".name", "must be a string")
        content = m.get("content")
        tool_calls = m.get("tool_calls") if role == "assistant" else None
        if content is None:
            if not tool_calls:
                raise _err(w + ".content", "missing content" +
                           (" (an assistant message needs content or tool_calls)"
                            if role == "assistant" else ""))
        else:
            _check_content(content, w + ".content")
        if role == "assistant":
            rc = m.get("reasoning_content")
            if rc is not None and not isinstance(rc, str):
                raise _err(w + ".reasoning_content", "must be a string")
            if tool_calls is not None:
                if not isinstance(tool_calls, list):
                    raise _err(w + ".tool_calls", "must be a list")
                for j, tc in enumerate(tool_calls):
                    tw = f"{w}.tool_calls[{j}]"
                    if not isinstance(tc, dict) or not isinstance(tc.get("function"), dict):
                        raise _err(tw + ".function", "missing or not a dict")
                    name = tc["function"].get("name")
                    if not isinstance(name, str) or not name:
                        raise _err(tw + ".function.name", "must be a non-empty string")
                    args = tc["function"].get("arguments", "{}")
                    if not isinstance(args, (str, dict)):
                        raise _err(tw + ".function.arguments", "must be a JSON string or a dict")
                    tc["function"]["arguments"] = args
                    if not tc.get("id"):
                        tc["id"] = f"functions.{name}:{call_idx}"
                    elif not isinstance(tc["id"], str):
                        raise _err(tw + ".id", "must be a string")
                    call_idx += 1
        if role == "tool":
            tcid = m.get("tool_call_id")
            if not isinstance(tcid, str) or not tcid:
                raise _err(w + ".tool_call_id", "a tool message needs the id of the call it "
                                                "answers (e.g. 'functions.get_weather:0')")
        out.append(m)
    return out


# ---------------------------------------------------------------------- rendering
class _Neutralizer:
    """Swaps special-token strings inside caller data for unused private-use characters."""

    def __init__(self, special_tokens: Iterable[str], data: Any, template_text: str):
        names = sorted(set(special_tokens), key=len, reverse=True)
        self.pat = regex.compile("|".join([regex.escape(n) for n in names] + [_RESERVED]))
        used = set()
        self._collect_pua(data, used)
        used.update(c for c in template_text if ord(c) >= _PUA_START)
        self.to_char: dict[str, str] = {}
        self.to_name: dict[str, str] = {}
        self._next = _PUA_START
        self._used = used

    def _collect_pua(self, obj, used):
        if isinstance(obj, str):
            if any(ord(c) >= _PUA_START for c in obj):
                used.update(c for c in obj if ord(c) >= _PUA_START)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                self._collect_pua(k, used)
                self._collect_pua(v, used)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                self._collect_pua(v, used)

    def _char(self, name: str) -> str:
        c = self.to_char.get(name)
        if c is None:
            while chr(self._next) in self._used:
                self._next += 1
            c = chr(self._next)
            self._next += 1
            self.to_char[name] = c
            self.to_name[c] = name
        return c

    def hide(self, obj):
        if isinstance(obj, str):
            return self.pat.sub(lambda m: self._char(m.group()), obj)
        if isinstance(obj, dict):
            return {self.hide(k): self.hide(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.hide(v) for v in obj]
        return obj

    def restore(self, text: str) -> str:
        if not self.to_name:
            return text
        return "".join(self.to_name.get(c, c) for c in text)


def render_chat_segments(template_text: str, messages: list[dict], tools: list | None = None,
                         thinking: bool = True, preserve_thinking: bool = False,
                         add_generation_prompt: bool = True,
                         special_tokens: Iterable[str] | None = None, **kwargs
                         ) -> list[Segment]:
    """Render and split into template markers (special=True) and text (special=False).
    Text segments may contain special-token strings only if the caller's data did."""
    msgs = validate_messages(messages)
    tools = validate_tools(tools) if tools else None
    if tools and _TS_VAR not in kwargs and _TS_VAR in template_text:
        try:
            kwargs[_TS_VAR] = tools_to_typescript(tools)
        except ValueError:
            pass  # the official tokenizer also falls back to the JSON declaration
    specials = list(special_tokens) if special_tokens is not None else list(_DEFAULT_SPECIALS)
    # tools_ts_str is part of `data`, so special-token strings inside it stay plain text too
    data = {"messages": msgs, "tools": tools, **kwargs}
    nz = _Neutralizer(specials, data, template_text)
    ctx = nz.hide(data)
    try:
        text = _compile(template_text).render(
            **ctx, add_generation_prompt=add_generation_prompt, thinking=thinking,
            preserve_thinking=preserve_thinking)
    except TemplateError as e:        # SecurityError included
        raise ValueError(f"chat template failed: {e}") from e
    if len(text) > MAX_TEMPLATE_OUTPUT:
        raise ValueError(f"chat template failed: output of {len(text)} characters (limit {MAX_TEMPLATE_OUTPUT})")
    segs: list[Segment] = []
    start = 0
    for m in nz.pat.finditer(text):
        if m.start() > start:
            segs.append(Segment(nz.restore(text[start:m.start()]), False))
        segs.append(Segment(m.group(), True))
        start = m.end()
    if start < len(text):
        segs.append(Segment(nz.restore(text[start:]), False))
    return segs


def render_chat(template_text: str, messages: list[dict], tools: list | None = None,
                thinking: bool = True, preserve_thinking: bool = False,
                add_generation_prompt: bool = True, **kwargs) -> str:
    """The prompt as text (what transformers' apply_chat_template(tokenize=False) gives)."""
    return "".join(s.text for s in render_chat_segments(
        template_text, messages, tools, thinking, preserve_thinking, add_generation_prompt,
        **kwargs))


def encode_chat(tokenizer, template_text: str, messages: list[dict], tools: list | None = None,
                thinking: bool = True, preserve_thinking: bool = False,
                add_generation_prompt: bool = True, **kwargs) -> list[int]:
    """Prompt token ids: template markers -> special ids, all other text -> plain BPE."""
    segs = render_chat_segments(template_text, messages, tools, thinking, preserve_thinking,
                                add_generation_prompt,
                                special_tokens=tokenizer.special_tokens.keys(), **kwargs)
    ids: list[int] = []
    for s in segs:
        if s.special:
            tid = tokenizer.special_tokens.get(s.text)
            if tid is None:  # a reserved-token name this tokenizer doesn't have
                ids.extend(tokenizer.encode(s.text))
            else:
                ids.append(tid)
        else:
            ids.extend(tokenizer.encode(s.text))
    return ids

