"""Chat on top of the engine: messages -> the checkpoint's own template (hybrid/text/chat_template.py) -> generation
-> reasoning / content / tool calls (hybrid/text/output_parser.py). Used by LLM.chat / LLM.chat_stream, the
terminal chat and the server. Image parts (K2.5/K2.6): `chat_inputs` gives the prompt ids with each image's
placeholder expanded and one engine MediaSpan per image (hybrid/media/). Checked by tests/test_engine.py::test_chat_*
and tests/test_vision_model.py.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from hybrid.engine import MediaSpan
from hybrid.media import MediaError, NoVisionTower, expand_placeholders, split_media
from hybrid.media.prompt import check_count
from hybrid.text.chat_template import encode_chat
from hybrid.text.output_parser import Delta, ParsedMessage, StreamParser, accumulate
from hybrid.sampling import SamplingParams


def load_chat_template(model_dir: Path) -> str:
    """chat_template.jinja (K2.5+ layout), else tokenizer_config.json's chat_template."""
    path = Path(model_dir) / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    cfg = Path(model_dir) / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    raise ValueError(f"{model_dir}: no chat template (chat_template.jinja or tokenizer_config.json "
                     "'chat_template'); use generate() with plain prompts")


def chat_sampling(sampling: SamplingParams | None) -> SamplingParams:
    """Chat output keeps the special markers (<think>, tool-call sections) in its text for the parser."""
    return dataclasses.replace(sampling or SamplingParams(), skip_special_tokens=False)


@dataclass
class ChatResult:
    message: ParsedMessage
    finish_reason: str               # "stop" | "length" | "tool_calls" | "abort"
    usage: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


def chat_prompt_ids(llm, messages, tools=None, thinking: bool = True, preserve_thinking: bool = False,
                    **template_kwargs) -> list[int]:
    _, sources = split_media(messages)        # refuses video parts
    if sources:
        where = sources[0][0]
        if getattr(llm, "images", None) is None:
            raise no_vision(llm, where)
        raise MediaError(where, "a prompt with images needs LLM.chat_inputs (prompt ids + the images' MediaSpans); "
                                "prompt ids alone would drop the image")
    return _template_ids(llm, messages, tools, thinking, preserve_thinking, **template_kwargs)


def no_vision(llm, where: str) -> NoVisionTower:
    return NoVisionTower(where, f"this model ({llm.config.model_type}, {llm.model_dir.name}) has no vision tower; "
                                "it cannot take images (K2.5/K2.6 checkpoints can)")


def chat_inputs(llm, messages, tools=None, thinking: bool = True, preserve_thinking: bool = False,
                **template_kwargs) -> tuple[list[int], list[MediaSpan]]:
    """(prompt ids, media): the images' placeholders expanded to their merged-patch counts, and one MediaSpan
    (start row, projected embeddings on the engine device, content key) per image, in prompt order."""
    stubbed, sources = split_media(messages)
    if not sources:
        return _template_ids(llm, messages, tools, thinking, preserve_thinking, **template_kwargs), []
    if getattr(llm, "images", None) is None:
        raise no_vision(llm, sources[0][0])
    check_count(len(sources), llm.images.limits.max_images)
    processed = llm.images.process(sources)
    ids = _template_ids(llm, stubbed, tools, thinking, preserve_thinking, **template_kwargs)
    ids, starts = expand_placeholders(ids, llm.media_pad_id, [p.n_tokens for p in processed], where="messages")
    embeds = llm.images.encode(processed)
    return ids, [MediaSpan(s, e, p.key) for s, e, p in zip(starts, embeds, processed)]


def _template_ids(llm, messages, tools=None, thinking: bool = True, preserve_thinking: bool = False,
                  **template_kwargs) -> list[int]:
    if llm.tokenizer is None:
        raise ValueError(f"{llm.model_dir} has no tokenizer files; chat needs tiktoken.model")
    if getattr(llm, "_chat_template", None) is None:
        llm._chat_template = load_chat_template(llm.model_dir)
    return encode_chat(llm.tokenizer, llm._chat_template, messages, tools=tools, thinking=thinking,
                       preserve_thinking=preserve_thinking, **template_kwargs)


def _usage(prompt: list[int], cached: int, completion: int) -> dict:
    return {"prompt_tokens": len(prompt), "completion_tokens": completion,
            "total_tokens": len(prompt) + completion, "cached_prompt_tokens": cached}


def constrained(llm, sampling: SamplingParams, messages, tools, thinking: bool, response_format=None,
                tool_choice=None, max_reasoning_tokens: int | None = None) -> tuple[SamplingParams, list | None]:
    """(sampling with the grammar constraint of response_format / a forced tool_choice, tools to render).
    The same fields as the OpenAI API: response_format {"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"schema": ...}}; tool_choice "auto" | "none" | "required" | {"type": "function",
    "function": {"name": ...}}. The constraint applies to the answer, after the reasoning (hybrid/text/grammar.py)."""
    from hybrid.text.grammar import constraint_for, openai_spec
    spec, tools = openai_spec(response_format, tool_choice, tools, messages)   # SpecError (a ValueError)
    if spec is None:
        return sampling, tools
    c = constraint_for(llm.tokenizer, llm.config.vocab_size, thinking=thinking,
                       reasoning_budget=max_reasoning_tokens, **spec)
    return dataclasses.replace(sampling, constraint=c), tools


def chat_stream(llm, messages, sampling=None, tools=None, thinking: bool = True, preserve_thinking: bool = False,
                response_format=None, tool_choice=None, max_reasoning_tokens=None,
                **template_kwargs) -> Iterator[Delta | ChatResult]:
    """Yield parsing Deltas (reasoning / content / tool_call) as they come, then one final ChatResult."""
    sampling, tools = constrained(llm, chat_sampling(sampling), messages, tools, thinking, response_format,
                                  tool_choice, max_reasoning_tokens)
    prompt, media = chat_inputs(llm, messages, tools, thinking, preserve_thinking, **template_kwargs)
    parser = StreamParser(thinking=thinking)
    deltas: list[Delta] = []
    token_ids: list[int] = []
    last = None
    for out in llm.stream(prompt, sampling, media=media or None):
        last = out
        token_ids += out.token_ids
        for d in parser.feed(out.text):
            deltas.append(d)
            yield d
    for d in parser.finish():
        deltas.append(d)
        yield d
    message = accumulate(deltas, thinking)
    reason = last.finish_reason if last is not None else "stop"
    if message.tool_calls and reason == "stop":
        reason = "tool_calls"
    cached = last.cached_prompt_tokens if last is not None else 0
    yield ChatResult(message, reason, _usage(prompt, cached, len(token_ids)), last.metrics if last else {},
                     prompt, token_ids)


def chat(llm, messages, sampling=None, tools=None, thinking: bool = True, preserve_thinking: bool = False,
         response_format=None, tool_choice=None, max_reasoning_tokens=None, **template_kwargs) -> ChatResult:
    result = None
    for item in chat_stream(llm, messages, sampling, tools, thinking, preserve_thinking, response_format,
                            tool_choice, max_reasoning_tokens, **template_kwargs):
        if isinstance(item, ChatResult):
            result = item
    return result
