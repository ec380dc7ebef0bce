"""OpenAI-style request fields -> SamplingParams and chat arguments, with errors that name the field;
ParsedMessage / usage -> OpenAI response pieces. Shared by the server (hybrid/apps/server.py) and batch
jobs (hybrid/apps/batch.py), so a request line means the same in both. Checked by tests/test_server.py
(bad-input cases) and tests/test_batch.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from hybrid.text.chat_template import validate_messages, validate_tools
from hybrid.text.output_parser import ParsedMessage
from hybrid.sampling import SamplingParams


class FieldError(ValueError):
    """A request field is missing or wrong; `param` names it (OpenAI's error.param)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param, self.message = param, message


# field -> kind; kinds are checked by typed()
SAMPLING_FIELDS = {
    "temperature": "number", "top_p": "number", "top_k": "int", "min_p": "number",
    "repetition_penalty": "number", "presence_penalty": "number", "frequency_penalty": "number",
    "seed": "int", "stop": "stop", "stop_token_ids": "ids", "ignore_eos": "bool",
    "max_tokens": "int", "max_completion_tokens": "int", "include_stop_str_in_output": "bool",
    "skip_special_tokens": "bool",
}
# generation_config.json keys a checkpoint may set as its defaults (as vLLM reads them)
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_KIND_NAMES = {"number": "a number", "int": "an integer", "bool": "true or false", "str": "a string",
               "stop": "a string or a list of strings", "ids": "a list of integer token ids",
               "dict": "an object", "list": "a list"}


def typed(body: dict, name: str, kind: str, where: str = ""):
    """body[name] if it has the right JSON type, None if absent or null; FieldError otherwise."""
    v = body.get(name)
    if v is None:
        return None
    ok = {
        "number": isinstance(v, (int, float)) and not isinstance(v, bool),
        "int": isinstance(v, int) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
        "str": isinstance(v, str),
        "stop": isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
        "ids": isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v),
        "dict": isinstance(v, dict),
        "list": isinstance(v, list),
    }[kind]
    if not ok:
        raise FieldError(where + name, f"{where + name} must be {_KIND_NAMES[kind]}, got {json.dumps(v)[:80]}")
    return v


def generation_defaults(model_dir: str | Path) -> dict:
    """The checkpoint's recommended sampling settings from generation_config.json (may be empty)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        cfg = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}
    return {k: cfg[k] for k in GENERATION_DEFAULTS if isinstance(cfg.get(k), (int, float))}


def sampling_params(body: dict, defaults: dict | None = None, max_tokens: int | None = None) -> SamplingParams:
    """SamplingParams from the request's OpenAI / vLLM fields; unset fields take `defaults`
    (the checkpoint's), then SamplingParams' own. max_completion_tokens wins over max_tokens."""
    n = typed(body, "n", "int")
    if n is not None and n != 1:
        raise FieldError("n", f"n = {n} is not supported (only 1); send separate requests instead — "
                              "they are batched together")
    kw = dict(defaults or {})
    for name, kind in SAMPLING_FIELDS.items():
        v = typed(body, name, kind)
        if v is not None:
            kw[name] = v
    source = "max_completion_tokens" if "max_completion_tokens" in kw else "max_tokens"
    kw["max_tokens"] = kw.pop("max_completion_tokens", kw.get("max_tokens", max_tokens))
    seed = kw.get("seed")
    if seed is not None and not 0 <= seed < 2 ** 63:
        raise FieldError("seed", f"seed must be in 0..2**63-1, got {seed}")
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        m = re.match(r"SamplingParams\.(\w+) = (.*)", str(e))
        param = m.group(1) if m else None
        if param == "max_tokens":
            param = source
        raise FieldError(param, f"{param} = {m.group(2)}" if m else str(e)) from None


@dataclass
class ChatArgs:
    messages: list[dict]
    tools: list[dict] | None = None
    thinking: bool = True
    preserve_thinking: bool = False
    template_kwargs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _value_error_param(e: ValueError, default: str) -> FieldError:
    """chat.py's errors read 'messages[2].role: ...'; the part before ': ' is the field."""
    text = str(e)
    head = text.split(": ", 1)[0]
    return FieldError(head if re.fullmatch(r"[\w.\[\]]+", head) else default, text)


def chat_args(body: dict) -> ChatArgs:
    """messages, tools / tool_choice and chat_template_kwargs {thinking, preserve_thinking, ...}."""
    if body.get("messages") is None:
        raise FieldError("messages", "messages is required: a non-empty list of {role, content}")
    try:
        messages = validate_messages(body["messages"])
        tools = validate_tools(body["tools"]) if body.get("tools") is not None else None
    except FieldError:
        raise
    except ValueError as e:
        raise _value_error_param(e, "messages") from None
    notes = []
    choice = body.get("tool_choice")
    if choice is not None:
        named = isinstance(choice, dict) and choice.get("type", "function") == "function" \
            and isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)
        if choice not in ("none", "auto", "required") and not named:
            raise FieldError("tool_choice", "tool_choice must be 'none', 'auto', 'required' or "
                                            "{'type': 'function', 'function': {'name': ...}}")
        if choice == "none":
            tools = None
        elif choice != "auto":
            if not tools:
                raise FieldError("tool_choice", f"tool_choice {json.dumps(choice)} needs a non-empty 'tools'")
            if named:
                name = choice["function"]["name"]
                if name not in [t["function"]["name"] for t in tools]:
                    raise FieldError("tool_choice", f"tool_choice names {name!r}, which is not in tools")
            # no constrained decoding here: the model decides, as with "auto"
            notes.append(f"tool_choice {json.dumps(choice)} is treated as 'auto'")
    kwargs = dict(typed(body, "chat_template_kwargs", "dict") or {})
    thinking = typed(kwargs, "thinking", "bool", "chat_template_kwargs.")
    preserve = typed(kwargs, "preserve_thinking", "bool", "chat_template_kwargs.")
    for k in ("thinking", "preserve_thinking", "tools", "messages", "add_generation_prompt"):
        kwargs.pop(k, None)
    return ChatArgs(messages, tools, True if thinking is None else thinking, bool(preserve), kwargs, notes)


def chat_prompt(llm, args: ChatArgs) -> list[int]:
    """Prompt ids for a chat request; template errors become FieldErrors."""
    try:
        return llm.chat_prompt_ids(args.messages, args.tools, args.thinking, args.preserve_thinking,
                                   **args.template_kwargs)
    except ValueError as e:
        raise _value_error_param(e, "messages") from None


def completion_prompts(llm, body: dict) -> list[list[int]]:
    """`prompt`: a string, a list of token ids, or a list of either (one choice each)."""
    p = body.get("prompt")
    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                                                  for t in p)):
        p = [p]
    if not isinstance(p, list) or not p:
        raise FieldError("prompt", "prompt must be a string, a list of token ids, or a list of those")
    out = []
    for i, one in enumerate(p):
        if isinstance(one, str):
            if llm.tokenizer is None:
                raise FieldError("prompt", "this checkpoint has no tokenizer; send token ids")
            out.append(llm.tokenizer.encode(one))
        elif isinstance(one, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in one):
            out.append(list(one))
        else:
            raise FieldError(f"prompt[{i}]", f"prompt[{i}] must be a string or a list of token ids")
        if not out[-1]:
            raise FieldError("prompt", "prompt is empty")
    return out


def message_dict(msg: ParsedMessage) -> dict:
    """An OpenAI assistant message (content null when the turn is only tool calls)."""
    d = {"role": "assistant", "content": msg.content if (msg.content or not msg.tool_calls) else None}
    if msg.reasoning_content is not None:
        d["reasoning_content"] = msg.reasoning_content
    if msg.tool_calls:
        d["tool_calls"] = msg.tool_calls
    return d


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}
