"""OpenAI-style request fields -> SamplingParams and chat arguments, with errors that name the field;
ParsedMessage / usage / logprobs -> OpenAI response pieces. Shared by the server (hybrid/apps/server.py) and
batch jobs (hybrid/apps/batch.py), so a request line means the same in both.

Sampling defaults, for a field the request leaves unset: the checkpoint's generation_config.json wins;
otherwise, for chat, the K2.6 model card's per-mode values (thinking: temperature 1.0, top_p 0.95;
instant: temperature 0.6, top_p 0.95); then SamplingParams' own. Numbers must be finite and within
OpenAI's ranges; a temperature below 1e-5 means greedy (as vLLM). `response_format` and tool_choice
"required" / a named function become a grammar constraint (hybrid/text/grammar.py).
Checked by tests/test_server.py, tests/test_server_api.py, tests/test_server_structured.py, tests/test_batch.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import dataclasses
import math

from hybrid.text.chat_template import validate_messages, validate_tools
from hybrid.text.grammar import SpecError, openai_spec
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
NUMBER_RANGES = {"temperature": (0, 2), "top_p": (0, 1), "min_p": (0, 1), "repetition_penalty": (0, 10),
                 "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}
GREEDY_BELOW = 1e-5            # vLLM's _SAMPLING_EPS: smaller temperatures are greedy
MAX_N = 8                      # most choices per request (`n`)
MAX_TOP_LOGPROBS = 20
MODE_DEFAULTS = {True: {"temperature": 1.0, "top_p": 0.95}, False: {"temperature": 0.6, "top_p": 0.95}}
# names a client may not set through chat_template_kwargs: the template's own variables and Jinja's globals
RESERVED_TEMPLATE_NAMES = frozenset({
    "messages", "tools", "add_generation_prompt", "thinking", "preserve_thinking", "range", "dict", "lipsum",
    "cycler", "joiner", "namespace", "raise_exception", "loop", "self", "super", "varargs", "kwargs", "caller",
    "true", "false", "none", "True", "False", "None", "bos_token", "eos_token", "strftime_now"})
# generation_config.json keys a checkpoint may set as its defaults (as vLLM reads them)
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_KIND_NAMES = {"number": "a finite number", "int": "an integer below 2**63", "bool": "true or false", "str": "a string",
               "stop": "a string or a list of strings", "ids": "a list of integer token ids",
               "dict": "an object", "list": "a list"}


def typed(body: dict, name: str, kind: str, where: str = ""):
    """body[name] if it has the right JSON type, None if absent or null; FieldError otherwise."""
    v = body.get(name)
    if v is None:
        return None
    ok = {
        "number": isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e9 and math.isfinite(v),
        "int": isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2 ** 63,
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


def choices(body: dict) -> int:
    """`n`: 1..MAX_N choices, each its own sequence of the same prompt."""
    n = typed(body, "n", "int")
    if n is not None and not 1 <= n <= MAX_N:
        raise FieldError("n", f"n must be in 1..{MAX_N}, got {n}")
    return n or 1


def sampling_params(body: dict, defaults: dict | None = None, max_tokens: int | None = None,
                    thinking: bool | None = None, logprobs: int | None = None) -> SamplingParams:
    """SamplingParams from the request's OpenAI / vLLM fields; unset fields take `defaults` (the
    checkpoint's generation_config), then the model card's per-mode values (chat: `thinking` not None),
    then SamplingParams' own. max_completion_tokens wins over max_tokens."""
    choices(body)
    kw = dict(MODE_DEFAULTS[thinking]) if thinking is not None else {}
    kw.update(defaults or {})
    for name, kind in SAMPLING_FIELDS.items():
        v = typed(body, name, kind)
        if v is not None:
            lo_hi = NUMBER_RANGES.get(name)
            if lo_hi and not lo_hi[0] <= v <= lo_hi[1]:
                raise FieldError(name, f"{name} must be in [{lo_hi[0]}, {lo_hi[1]}], got {v}")
            kw[name] = v
    if 0 < kw.get("temperature", 1.0) < GREEDY_BELOW:
        kw["temperature"] = 0.0
    source = "max_completion_tokens" if "max_completion_tokens" in kw else "max_tokens"
    kw["max_tokens"] = kw.pop("max_completion_tokens", kw.get("max_tokens", max_tokens))
    seed = kw.get("seed")
    if seed is not None and not 0 <= seed < 2 ** 63:
        raise FieldError("seed", f"seed must be in 0..2**63-1, got {seed}")
    if logprobs is not None:
        if "logprobs" not in {f.name for f in dataclasses.fields(SamplingParams)}:
            raise FieldError("logprobs", "logprobs are not available in this build")
        kw["logprobs"] = logprobs
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        m = re.match(r"SamplingParams\.(\w+) = (.*)", str(e))
        param = m.group(1) if m else None
        if param == "max_tokens":
            param = source
        raise FieldError(param, f"{param} = {m.group(2)}" if m else str(e)) from None


def chat_logprobs(body: dict) -> int | None:
    """Chat: logprobs (bool) + top_logprobs (0..20) -> SamplingParams.logprobs (None: off)."""
    on = typed(body, "logprobs", "bool")
    top = typed(body, "top_logprobs", "int")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise FieldError("top_logprobs", f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top}")
    if top is not None and not on:
        raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
    return (top or 0) if on else None


def completion_logprobs(body: dict) -> int | None:
    """Completions: logprobs is an integer 0..20 (the number of alternatives)."""
    v = typed(body, "logprobs", "int")
    if v is not None and not 0 <= v <= MAX_TOP_LOGPROBS:
        raise FieldError("logprobs", f"logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {v}")
    return v


def _token_str(tokenizer, tid: int) -> tuple[str, list[int]]:
    b = tokenizer.id_to_token(tid) if tokenizer is not None else b""
    return b.decode("utf-8", errors="replace"), list(b)


def logprobs_chat(tokenizer, entries: list) -> list[dict]:
    """RequestOutput.logprobs entries -> OpenAI chat `logprobs.content` items."""
    out = []
    for tid, (lp, top) in entries:
        tok, raw = _token_str(tokenizer, tid)
        alts = []
        for t, l in top:
            s, bb = _token_str(tokenizer, t)
            alts.append({"token": s, "logprob": l, "bytes": bb})
        out.append({"token": tok, "logprob": lp, "bytes": raw, "top_logprobs": alts})
    return out


def logprobs_completion(tokenizer, entries: list, offset: int = 0) -> dict:
    """RequestOutput.logprobs entries -> OpenAI completions `logprobs` (tokens, token_logprobs, ...)."""
    d = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, (lp, top) in entries:
        tok, _ = _token_str(tokenizer, tid)
        d["tokens"].append(tok)
        d["token_logprobs"].append(lp)
        d["top_logprobs"].append({_token_str(tokenizer, t)[0]: l for t, l in top})
        d["text_offset"].append(offset)
        offset += len(tok)
    return d


@dataclass
class ChatArgs:
    messages: list[dict]
    tools: list[dict] | None = None
    thinking: bool = True
    preserve_thinking: bool = False
    template_kwargs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    constraint: dict | None = None       # grammar.constraint_for keyword arguments (kind, schema, tools, ...)


def _value_error_param(e: ValueError, default: str) -> FieldError:
    """chat.py's errors read 'messages[2].role: ...'; the part before ': ' is the field."""
    text = str(e)
    head = text.split(": ", 1)[0]
    return FieldError(head if re.fullmatch(r"[\w.\[\]]+", head) else default, text)


def _developer_as_system(messages):
    """OpenAI's `developer` role is the system prompt of newer clients."""
    if not isinstance(messages, list):
        return messages
    return [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
            for m in messages]


def chat_args(body: dict) -> ChatArgs:
    """messages, tools / tool_choice, response_format and chat_template_kwargs {thinking, ...}."""
    if body.get("messages") is None:
        raise FieldError("messages", "messages is required: a non-empty list of {role, content}")
    try:
        messages = validate_messages(_developer_as_system(body["messages"]))
        tools = validate_tools(body["tools"]) if body.get("tools") is not None else None
    except FieldError:
        raise
    except ValueError as e:
        raise _value_error_param(e, "messages") from None
    try:
        constraint, tools = openai_spec(body.get("response_format"), body.get("tool_choice"), tools, messages)
    except SpecError as e:
        raise FieldError(e.param, str(e)) from None
    notes = []
    kwargs = dict(typed(body, "chat_template_kwargs", "dict") or {})
    thinking = typed(kwargs, "thinking", "bool", "chat_template_kwargs.")
    preserve = typed(kwargs, "preserve_thinking", "bool", "chat_template_kwargs.")
    for k in ("thinking", "preserve_thinking"):
        kwargs.pop(k, None)
    for k in kwargs:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", k) or k in RESERVED_TEMPLATE_NAMES or k.startswith("_"):
            raise FieldError(f"chat_template_kwargs.{k}"[:120],
                             "chat_template_kwargs may not set this name (template variables and Jinja globals "
                             "such as range or namespace are reserved)")
    budget = typed(body, "max_reasoning_tokens", "int")     # hybrid extension: ends reasoning after N tokens
    if budget is not None and budget < 0:
        raise FieldError("max_reasoning_tokens", "max_reasoning_tokens must be >= 0")
    thinking = True if thinking is None else thinking
    if constraint is not None:
        constraint.update(thinking=thinking, reasoning_budget=budget)
    return ChatArgs(messages, tools, thinking, bool(preserve), kwargs, notes, constraint)


def constrain(llm, spec: dict | None, params):
    """params with the grammar constraint of a chat_args spec (hybrid/text/grammar.py); FieldError naming
    tool_choice or response_format when the grammar cannot be built. The server and batch use it."""
    if spec is None:
        return params
    from hybrid.text.grammar import GrammarError, constraint_for
    try:
        c = constraint_for(llm.tokenizer, llm.config.vocab_size, **spec)
    except GrammarError as e:
        raise FieldError("tool_choice" if spec["kind"].startswith("tool") else "response_format", str(e)) from None
    return dataclasses.replace(params, constraint=c)


class TemplateFailure(RuntimeError):
    """The checkpoint's chat template failed (a server-side error: 500, type template_error)."""


MAX_PROMPT_CHARS = 64 * 2 ** 20          # a rendered prompt larger than this is a template fault


def chat_prompt(llm, args: ChatArgs) -> list[int]:
    """Prompt ids for a chat request. Bad messages -> FieldError; a failing template -> TemplateFailure."""
    return chat_inputs(llm, args, images=False)[0]


def chat_inputs(llm, args: ChatArgs, images: bool = True) -> tuple[list[int], list | None]:
    """(prompt ids, media spans or None): images in the messages go through llm.chat_inputs when the
    LLM has it (hybrid/media); errors as chat_prompt's."""
    try:
        if images and hasattr(llm, "chat_inputs"):
            ids, media = llm.chat_inputs(args.messages, args.tools, args.thinking, args.preserve_thinking,
                                         **args.template_kwargs)
        else:
            ids, media = llm.chat_prompt_ids(args.messages, args.tools, args.thinking, args.preserve_thinking,
                                             **args.template_kwargs), None
    except (RecursionError, MemoryError) as e:
        raise TemplateFailure(f"chat template failed: {type(e).__name__}") from None
    except ValueError as e:
        if str(e).startswith("chat template failed"):
            raise TemplateFailure(str(e)) from None
        raise _value_error_param(e, "messages") from None
    except Exception as e:              # jinja2 SecurityError / TypeError ... inside the template
        raise TemplateFailure(f"chat template failed: {type(e).__name__}: {e}") from None
    return ids, (media or None)


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
        d["reasoning_content"] = d["reasoning"] = msg.reasoning_content   # vLLM's new name and the old one
    if msg.tool_calls:
        d["tool_calls"] = msg.tool_calls
    return d


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}
