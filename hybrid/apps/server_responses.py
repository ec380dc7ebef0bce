"""The response side of the server (hybrid/apps/server.py): submit one request per choice to the engine
thread, then build the OpenAI answer, whole or streamed (SSE), for chat (reasoning / content / tool
calls through output_parser, `reasoning` and `reasoning_content` both) and completions, with `n`
choices and logprobs. A choice the engine finished with finish_reason "error" turns the whole answer
into a 500 (or an error event in the stream) for this client only. Disconnects abort every choice.
Checked by tests/test_server.py, tests/test_server_api.py, tests/test_server_robust.py.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi.responses import StreamingResponse

import hybrid.apps.openai_protocol as protocol
from hybrid.apps.engine_thread import EngineError
from hybrid.apps.http_guards import error_response
from hybrid.apps.openai_protocol import FieldError
from hybrid.text.output_parser import StreamParser, accumulate

DISCONNECT_POLL_S = 0.25


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error_event(message: str) -> str:
    return _sse({"error": {"message": message, "type": "server_error", "param": None, "code": "engine_error"}})


def _failed(item) -> str | None:
    """The error message if this delta (or EngineError) ends its request in failure."""
    if isinstance(item, EngineError):
        return str(item)
    if item.finish_reason == "error":
        return f"generation failed: {getattr(item, 'error', None) or 'unknown error'}"
    return None


def _entries(item) -> list:
    lp = getattr(item, "logprobs", None)
    return list(zip(item.token_ids, lp)) if lp else []


class Submission:
    def __init__(self, q: asyncio.Queue, rids: list[str]):
        self.q, self.rids = q, rids


class Responder:
    def __init__(self, runner, tokenizer, model_name: str, metrics):
        self.runner, self.tok, self.model_name, self.metrics = runner, tokenizer, model_name, metrics

    def header(self, kind: str, rid: str) -> dict:
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.model_name}

    async def submit(self, prompts: list[list[int]], params: list, param: str, media=None) -> Submission:
        """One engine request per prompt (params[i] for prompt i, the same media spans for all);
        deltas arrive as (index, delta)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rids = []
        try:
            for i, prompt in enumerate(prompts):
                timer = self.metrics.timer()

                def sink(item, i=i, timer=timer):
                    if not isinstance(item, EngineError):
                        timer.delta(item)
                    loop.call_soon_threadsafe(q.put_nowait, (i, item))
                rids.append(await self.runner.add(prompt, params[i], sink, media))
        except ValueError as e:
            for rid in rids:
                self.runner.abort(rid)
            raise FieldError(param, str(e)) from None
        return Submission(q, rids)

    async def collect(self, request, sub: Submission):
        """Every choice's deltas; None if the client disconnected (all aborted); EngineError on failure."""
        done: dict[int, list] = {i: [] for i in range(len(sub.rids))}
        left, next_poll = len(sub.rids), time.monotonic() + DISCONNECT_POLL_S
        try:
            while left:
                if time.monotonic() >= next_poll:   # deltas may never pause, so poll by the clock
                    next_poll = time.monotonic() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        return None
                try:
                    i, item = await asyncio.wait_for(sub.q.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    continue
                message = _failed(item)
                if message:
                    raise EngineError(message)
                done[i].append(item)
                left -= item.finish_reason is not None
            return done
        finally:
            for i, rid in enumerate(sub.rids):
                if not done[i] or done[i][-1].finish_reason is None:
                    self.runner.abort(rid)

    # ---- chat ----------------------------------------------------------------------------
    async def chat_full(self, request, sub, args, prompt, extra):
        outs = await self.collect(request, sub)
        if outs is None:
            return error_response(499, "client disconnected", kind="cancelled")
        choices, completion = [], 0
        for i, deltas in outs.items():
            parser = StreamParser(args.thinking)
            message = accumulate(parser.feed("".join(d.text for d in deltas)) + parser.finish(), args.thinking)
            last = deltas[-1]
            reason = "tool_calls" if message.tool_calls and last.finish_reason == "stop" else last.finish_reason
            entries = [e for d in deltas for e in _entries(d)]
            lp = {"content": protocol.logprobs_chat(self.tok, entries)} if entries else None
            choices.append({"index": i, "message": protocol.message_dict(message), "finish_reason": reason,
                            "logprobs": lp})
            completion += sum(len(d.token_ids) for d in deltas)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        return {**self.header("chat.completion", cid), **extra, "choices": choices,
                "usage": protocol.usage(len(prompt), completion, outs[0][-1].cached_prompt_tokens)}

    def chat_stream(self, sub, args, prompt, stream_opts, extra):
        return StreamingResponse(self._chat_events(sub, args, prompt, stream_opts, extra),
                                 media_type="text/event-stream")

    async def _chat_events(self, sub, args, prompt, stream_opts, extra):
        head = {**self.header("chat.completion.chunk", f"chatcmpl-{uuid.uuid4().hex}"), **extra}
        n = len(sub.rids)
        parsers = [StreamParser(args.thinking) for _ in range(n)]
        left, saw_call, completion, cached = set(range(n)), [False] * n, 0, 0

        def chunk(i, delta, reason=None, logprobs=None):
            c = {"index": i, "delta": delta, "finish_reason": reason}
            if logprobs is not None:
                c["logprobs"] = logprobs
            return _sse({**head, "choices": [c]})
        try:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            while left:
                i, item = await sub.q.get()
                message = _failed(item)
                if message:
                    yield _error_event(message)
                    return
                completion += len(item.token_ids)
                finished = item.finish_reason is not None
                entries = _entries(item)
                if entries:
                    yield chunk(i, {}, logprobs={"content": protocol.logprobs_chat(self.tok, entries)})
                for d in parsers[i].feed(item.text) + (parsers[i].finish() if finished else []):
                    if d.type == "tool_call":
                        saw_call[i] = True
                        call = {"index": d.index, "function": {"arguments": d.arguments or ""}}
                        if d.id is not None:       # a call's first delta (may carry arguments already)
                            call.update(id=d.id, type="function",
                                        function={"name": d.name, "arguments": d.arguments or ""})
                        delta = {"tool_calls": [call]}
                    elif d.type == "reasoning":
                        delta = {"reasoning_content": d.text, "reasoning": d.text}
                    else:
                        delta = {"content": d.text}
                    yield chunk(i, delta)
                if finished:
                    left.discard(i)
                    cached = item.cached_prompt_tokens
                    reason = "tool_calls" if saw_call[i] and item.finish_reason == "stop" else item.finish_reason
                    yield chunk(i, {}, reason)
            if stream_opts.get("include_usage"):
                yield _sse({**head, "choices": [], "usage": protocol.usage(len(prompt), completion, cached)})
            yield "data: [DONE]\n\n"
        finally:
            for i in left:                 # the client went away or a choice failed: stop the rest
                self.runner.abort(sub.rids[i])

    # ---- completions --------------------------------------------------------------------
    async def completion_full(self, request, sub, prompts, texts):
        outs = await self.collect(request, sub)
        if outs is None:
            return error_response(499, "client disconnected", kind="cancelled")
        choices, n_prompt, n_completion, cached = [], 0, 0, 0
        for i, deltas in outs.items():
            entries = [e for d in deltas for e in _entries(d)]
            lp = protocol.logprobs_completion(self.tok, entries, len(texts[i])) if entries else None
            choices.append({"index": i, "text": texts[i] + "".join(d.text for d in deltas),
                            "finish_reason": deltas[-1].finish_reason, "logprobs": lp})
            n_prompt += len(prompts[i])
            n_completion += sum(len(d.token_ids) for d in deltas)
            cached += deltas[-1].cached_prompt_tokens
        return {**self.header("text_completion", f"cmpl-{uuid.uuid4().hex}"), "choices": choices,
                "usage": protocol.usage(n_prompt, n_completion, cached)}

    def completion_stream(self, sub, prompts, texts, stream_opts):
        return StreamingResponse(self._completion_events(sub, prompts, texts, stream_opts),
                                 media_type="text/event-stream")

    async def _completion_events(self, sub, prompts, texts, stream_opts):
        head = self.header("text_completion", f"cmpl-{uuid.uuid4().hex}")
        left, n_completion, cached = set(range(len(sub.rids))), 0, 0
        offsets = [len(t) for t in texts]
        try:
            for i in sorted(left):
                if texts[i]:
                    yield _sse({**head, "choices": [{"index": i, "text": texts[i], "finish_reason": None,
                                                     "logprobs": None}]})
            while left:
                i, item = await sub.q.get()
                message = _failed(item)
                if message:
                    yield _error_event(message)
                    return
                n_completion += len(item.token_ids)
                if item.finish_reason is not None:
                    left.discard(i)
                    cached += item.cached_prompt_tokens
                entries = _entries(item)
                lp = protocol.logprobs_completion(self.tok, entries, offsets[i]) if entries else None
                offsets[i] += len(item.text)
                if item.text or item.finish_reason is not None or entries:
                    yield _sse({**head, "choices": [{"index": i, "text": item.text,
                                                     "finish_reason": item.finish_reason, "logprobs": lp}]})
            if stream_opts.get("include_usage"):
                yield _sse({**head, "choices": [],
                            "usage": protocol.usage(sum(map(len, prompts)), n_completion, cached)})
            yield "data: [DONE]\n\n"
        finally:
            for i in left:
                self.runner.abort(sub.rids[i])
