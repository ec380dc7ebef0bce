"""Structured output and forced tool calls: per-sequence token constraints built on llguidance.

`constraint_for(tokenizer, vocab_size, kind, ...)` returns a fresh `Constraint` (one per sequence,
never shared) that the sampler (hybrid/sampling.py) drives through the agreed interface:

    logits = c.mask(logits)     # before choosing: disallowed tokens at -inf
    c.advance(token)            # after choosing

kinds: "json_object" (any JSON object), "json_schema" (strict: the answer is JSON valid for the schema),
"tool_required" (one or more Kimi tool calls to any of the tools, arguments valid for that tool's
`parameters`), "tool_named" (exactly one call of the named tool). Tool calls use Kimi's format
(hybrid/text/output_parser.py, docs/kimi_k2.md §5):

    <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{JSON}
    <|tool_call_end|><|tool_calls_section_end|>

Thinking mode: the prompt ends inside <think>, and the reasoning is free text; the constraint only
keeps the turn from ending there (EOS is masked; for JSON kinds also the tool-call markers) and starts
at `</think>` (for tool kinds also at
`<|tool_calls_section_begin|>`, which ends reasoning implicitly). `reasoning_budget` (tokens) forces
`</think>` once reached. When the grammar is complete only the end-of-turn token is allowed.

The grammar engine is llguidance, chosen over xgrammar and outlines-core by measurement at K2.6's
163,840-token vocabulary on a 2-core CPU: a mask costs about the same as xgrammar's (~0.1-0.6 ms typical),
a schema compiles in ~2 ms (xgrammar ~60-130 ms, outlines-core 27 s for a nested schema) so no per-schema
cache is needed, Kimi's special tokens are grammar terminals (tool-call markers) without extra work,
and compute_bitmask releases the GIL. advance() starts the next mask on a worker thread, so it is
computed while the model runs the next forward; mask() waits for it.
Checked by tests/test_server_structured.py (direct and through the server).
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

JSON_OPTIONS = {"whitespace_flexible": False}     # compact JSON: no unbounded whitespace runs
MAX_TOOL_CALLS = 8                                # tool_required: at most this many calls in one turn
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hybrid-grammar")
_TOKENIZERS: dict = {}
_LOCK = threading.Lock()


class GrammarError(ValueError):
    """The schema / tools cannot be turned into a grammar (a client error: 400)."""


def _llg():
    try:
        import llguidance
    except ImportError as e:            # pragma: no cover - the dependency is in setup.py
        raise GrammarError("structured output needs the llguidance package (pip install llguidance)") from e
    return llguidance


def llg_tokenizer(tokenizer, vocab_size: int):
    """The llguidance tokenizer for our tiktoken-format tokenizer (cached: ~1 s at 163,840 tokens).
    EOS is <|im_end|> (the end of an assistant turn)."""
    key = (id(tokenizer), vocab_size)
    with _LOCK:
        if key not in _TOKENIZERS:
            llg = _llg()
            eos = tokenizer.im_end_id if tokenizer.im_end_id is not None else tokenizer.eos_id
            _TOKENIZERS[key] = (tokenizer, llg.LLTokenizer.from_tiktoken(
                encoder=tokenizer.mergeable_ranks, special_tokens=tokenizer.special_tokens,
                pattern=tokenizer.pat_str, eos_token=eos, n_vocab=vocab_size))
        return _TOKENIZERS[key][1]


def _schema_grammar(schema: dict) -> str:
    return _llg().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def _call_rule(tool: dict, index: str) -> str:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object"}
    schema = json.dumps({"x-guidance": JSON_OPTIONS, **params})
    return (f'<|tool_call_begin|> {json.dumps("functions." + fn["name"] + ":")} {index} '
            f"<|tool_call_argument_begin|> %json {schema} <|tool_call_end|>")


def tools_grammar(tools: list[dict], name: str | None, first_index: int = 0) -> str:
    """Lark grammar of a tool-call section: one call of `name`, or 1..MAX_TOOL_CALLS calls of any tool.
    The first call's index is `first_index` (Kimi numbers calls across the conversation)."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise GrammarError(f"tool {name!r} is not in tools")
    first = f'"{first_index}"'
    rules = ["first_call: " + " | ".join(_call_rule(t, first) for t in chosen),
             "next_call: " + " | ".join(_call_rule(t, "/[0-9]{1,4}/") for t in chosen)]
    more = "" if name is not None else f" next_call{{0,{MAX_TOOL_CALLS - 1}}}"
    body = f"start: <|tool_calls_section_begin|> first_call{more} <|tool_calls_section_end|>"
    return _llg().LLMatcher.grammar_from_lark("\n".join([body, *rules]))


def build_grammar(kind: str, schema: dict | None = None, tools: list[dict] | None = None,
                  tool_name: str | None = None, first_index: int = 0) -> str:
    if kind == "json_object":
        return _schema_grammar({"type": "object"})
    if kind == "json_schema":
        if not isinstance(schema, dict):
            raise GrammarError("json_schema.schema must be a JSON object")
        return _schema_grammar(schema)
    if kind in ("tool_required", "tool_named"):
        if not tools:
            raise GrammarError("forced tool calls need a non-empty 'tools'")
        return tools_grammar(tools, tool_name if kind == "tool_named" else None, first_index)
    raise GrammarError(f"unknown constraint kind {kind!r}")


def _bits_to_bool(bits: bytes, n: int) -> np.ndarray:
    """llguidance's bitmask (bit i of 32-bit word i // 32, little-endian) -> bool [n]."""
    return np.unpackbits(np.frombuffer(bits, np.uint8), bitorder="little")[:n].view(bool)


class Constraint:
    """One sequence's constraint (see the module docstring). Not thread-safe; one sampler drives it."""

    def __init__(self, tokenizer, vocab_size: int, grammar: str, thinking: bool = False,
                 reasoning_budget: int | None = None, overlap: bool = True):
        llg = _llg()
        self.vocab_size = vocab_size
        self.matcher = llg.LLMatcher(llg_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"grammar rejected: {self.matcher.get_error()}")
        self.reasoning = thinking
        self.reasoning_tokens, self.reasoning_budget = 0, reasoning_budget
        self.think_end = tokenizer.think_end_id
        self.section_begin = tokenizer.tool_calls_section_begin_id if "<|tool_calls_section_begin|>" in grammar \
            else None
        self.stop_ids = [t for t in (tokenizer.im_end_id, tokenizer.eos_id) if t is not None]
        # while reasoning: the turn may not end, and a JSON answer may not start a tool-call section
        markers = () if self.section_begin is not None else (
            "<|tool_calls_section_begin|>", "<|tool_call_section_begin|>", "<|tool_call_begin|>")
        self.reasoning_blocked = self.stop_ids + [tokenizer.special_tokens[m] for m in markers
                                                  if m in tokenizer.special_tokens]
        self.overlap = overlap
        self._next = None                       # Future of the next bitmask, or None
        if not self.reasoning:
            self._prefetch()

    # ---- the agreed interface -------------------------------------------------------------
    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] -> a new float32 tensor with the disallowed tokens at -inf. Plain numpy, not torch:
        single-threaded, ~0.1 ms at 163,840 ids (torch's intra-op threads took tens of ms for these
        vector ops on a busy 2-core machine)."""
        n = logits.shape[-1]
        out = logits.detach().to("cpu", torch.float32).numpy().copy()
        if self.reasoning:
            if self.reasoning_budget is not None and self.reasoning_tokens >= self.reasoning_budget:
                keep = out[self.think_end]
                out.fill(-np.inf)
                out[self.think_end] = keep if np.isfinite(keep) else 0.0
            else:
                out[[t for t in self.reasoning_blocked if t < n]] = -np.inf   # the answer must come
            return torch.from_numpy(out)
        allowed = self._take_mask()
        if allowed.shape[0] < n:
            allowed = np.concatenate([allowed, np.zeros(n - allowed.shape[0], dtype=bool)])
        if not allowed.any():
            raise RuntimeError(f"grammar allows no token: {self.matcher.get_error() or 'dead end'}")
        np.putmask(out, ~allowed[:n], -np.inf)
        return torch.from_numpy(out)

    def advance(self, token: int) -> None:
        if self.reasoning:
            self.reasoning_tokens += 1
            if token == self.think_end:
                self.reasoning = False
                self._prefetch()
            elif self.section_begin is not None and token == self.section_begin:
                self.reasoning = False
                self._consume(token)
            return
        self._wait()
        self._consume(token)

    # ---- helpers --------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return not self.reasoning and self.matcher.is_stopped()

    def _consume(self, token: int) -> None:
        if token in self.stop_ids and self.matcher.is_accepting():
            return                              # the end of the turn; the engine stops here
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} breaks the grammar: {self.matcher.get_error()}")
        self._prefetch()

    def _compute(self) -> np.ndarray:
        return _bits_to_bool(self.matcher.compute_bitmask(), self.vocab_size)

    def _prefetch(self) -> None:
        self._next = _POOL.submit(self._compute) if self.overlap else None

    def _wait(self) -> None:
        if self._next is not None:
            try:
                self._next.result()
            except Exception:
                pass

    def _take_mask(self) -> np.ndarray:
        fut, self._next = self._next, None
        return fut.result() if fut is not None else self._compute()


class SpecError(GrammarError):
    """A response_format / tool_choice value that cannot be taken; `param` names the request field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _object(d: dict, name: str, where: str = ""):
    v = d.get(name)
    if v is not None and not isinstance(v, dict):
        raise SpecError(where + name, f"{where + name} must be an object, got {json.dumps(v)[:80]}")
    return v


def openai_spec(response_format, tool_choice, tools: list[dict] | None,
                messages: list[dict]) -> tuple[dict | None, list[dict] | None]:
    """OpenAI's response_format and tool_choice -> (the constraint_for arguments, None for free text; the
    tools to render: None for tool_choice "none"). The one reading of these fields, for the server, batch
    records and llm.chat; SpecError names the field. A forced call's index follows the calls already made."""
    spec = None
    rf = _object({"response_format": response_format}, "response_format")
    if rf is not None and rf.get("type") not in (None, "text"):
        if rf.get("type") == "json_object":
            spec = {"kind": "json_object"}
        elif rf.get("type") == "json_schema":
            js = _object(rf, "json_schema", "response_format.")
            schema = _object(js or {}, "schema", "response_format.json_schema.")
            if schema is None:
                raise SpecError("response_format.json_schema.schema", "json_schema needs a 'schema' object")
            spec = {"kind": "json_schema", "schema": schema}
        else:
            raise SpecError("response_format.type",
                            "response_format.type must be 'text', 'json_object' or 'json_schema'")
    if tool_choice is None:
        return spec, tools
    named = isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function" \
        and isinstance(tool_choice.get("function"), dict) and isinstance(tool_choice["function"].get("name"), str)
    if tool_choice not in ("none", "auto", "required") and not named:
        raise SpecError("tool_choice", "tool_choice must be 'none', 'auto', 'required' or "
                                       "{'type': 'function', 'function': {'name': ...}}")
    if tool_choice == "none":
        return spec, None
    if tool_choice == "auto":
        return spec, tools
    if not tools:
        raise SpecError("tool_choice", f"tool_choice {json.dumps(tool_choice)} needs a non-empty 'tools'")
    name = tool_choice["function"]["name"] if named else None
    if named and name not in [t["function"]["name"] for t in tools]:
        raise SpecError("tool_choice", f"tool_choice names {name!r}, which is not in tools")
    if spec is not None:
        raise SpecError("response_format", "response_format cannot be combined with a forced tool_choice")
    first = sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")
    return {"kind": "tool_named" if named else "tool_required", "tools": tools, "tool_name": name,
            "first_index": first}, tools


def constraint_for(tokenizer, vocab_size: int, kind: str, schema: dict | None = None,
                   tools: list[dict] | None = None, tool_name: str | None = None, thinking: bool = False,
                   reasoning_budget: int | None = None, first_index: int = 0) -> Constraint:
    """A fresh per-sequence constraint (GrammarError for a schema / tools the grammar cannot express)."""
    grammar = build_grammar(kind, schema, tools, tool_name, first_index)
    return Constraint(tokenizer, vocab_size, grammar, thinking, reasoning_budget)


def validate_spec(tokenizer, vocab_size: int, kind: str, **kw) -> None:
    """Build once to check the request (400 on failure) before any sequence is added."""
    constraint_for(tokenizer, vocab_size, kind, **kw)
