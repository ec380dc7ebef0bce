"""OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health.

    hybrid serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Every request goes to one engine thread (hybrid/apps/engine_thread.py), so concurrent requests share
decode steps. Bad input gets a 400 with an OpenAI error body whose `param` names the field; a client
that disconnects (streaming or not) aborts its request in the engine. tool_choice: "none" leaves the
tools out of the prompt; "required" and a named function are treated as "auto" (no constrained
decoding); the response says so in an extra `hybrid_note` field.
Checked by tests/test_server.py (real server on a free port, the official openai client, raw HTTP).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

import hybrid.apps.openai_protocol as protocol
from hybrid.chat import chat_sampling
from hybrid.apps.engine_thread import EngineError, EngineThread
from hybrid.text.output_parser import StreamParser, accumulate
from hybrid.apps.openai_protocol import FieldError

DISCONNECT_POLL_S = 0.25


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _ApiKey:
    """401 for /v1/* without 'Authorization: Bearer KEY'. Plain ASGI (not BaseHTTPMiddleware, which
    would hide client disconnects from the handlers)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                resp = error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                      kind="authentication_error", code="invalid_api_key")
                return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(llm, model_name: str, api_key: str | None = None) -> FastAPI:
    runner = EngineThread(llm.engine)
    defaults = protocol.generation_defaults(llm.model_dir)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="hybrid", lifespan=lifespan)
    app.state.runner = runner

    if api_key:
        app.add_middleware(_ApiKey, api_key=api_key)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")

    async def read_body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as e:           # also bad UTF-8
            raise FieldError(None, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise FieldError(None, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise FieldError("model", f"model {model!r} is not served here; available: {model_name!r}")
        for name in ("stream",):
            protocol.typed(body, name, "bool")
        return body

    async def submit(prompts: list[list[int]], params, param: str):
        """Add one request per prompt; deltas arrive on one asyncio queue as (index, delta)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rids = []
        try:
            for i, prompt in enumerate(prompts):
                def sink(item, i=i):
                    loop.call_soon_threadsafe(q.put_nowait, (i, item))
                rids.append(await runner.add(prompt, params, sink))
        except ValueError as e:
            for rid in rids:
                runner.abort(rid)
            raise FieldError(param, str(e)) from None
        return q, rids

    async def collect(request: Request, q: asyncio.Queue, rids: list[str]):
        """Wait for every request to finish; abort them all if the client disconnects."""
        done: dict[int, list] = {i: [] for i in range(len(rids))}
        left, next_poll = len(rids), time.monotonic() + DISCONNECT_POLL_S
        while left:
            if time.monotonic() >= next_poll:   # deltas may never pause, so poll by the clock
                next_poll = time.monotonic() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    for rid in rids:
                        runner.abort(rid)
                    return None
            try:
                i, item = await asyncio.wait_for(q.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue
            if isinstance(item, EngineError):
                raise item
            done[i].append(item)
            left -= item.finish_reason is not None
        return done

    def header(kind: str, rid: str) -> dict:
        return {"id": rid, "object": kind, "created": int(time.time()), "model": model_name}

    async def guarded(handler, request: Request):
        try:
            return await handler(request)
        except FieldError as e:
            return error_response(400, e.message, e.param)
        except EngineError as e:
            return error_response(500, str(e), kind="server_error")

    # ---- chat ------------------------------------------------------------------------------
    async def chat(request: Request):
        body = await read_body(request)
        args = protocol.chat_args(body)
        params = protocol.sampling_params(body, defaults)
        stream_opts = protocol.typed(body, "stream_options", "dict") or {}
        if body.get("logprobs"):
            raise FieldError("logprobs", "logprobs is not supported")
        prompt = protocol.chat_prompt(llm, args)
        q, rids = await submit([prompt], chat_sampling(params), "messages")
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        extra = {"hybrid_note": "; ".join(args.notes)} if args.notes else {}
        if body.get("stream"):
            return StreamingResponse(chat_events(q, rids[0], cid, args, prompt, stream_opts, extra),
                                     media_type="text/event-stream")
        outs = await collect(request, q, rids)
        if outs is None:
            return error_response(499, "client disconnected", kind="cancelled")
        deltas = outs[0]
        text = "".join(d.text for d in deltas)
        parser = StreamParser(args.thinking)
        message = accumulate(parser.feed(text) + parser.finish(), args.thinking)
        last = deltas[-1]
        reason = "tool_calls" if message.tool_calls and last.finish_reason == "stop" else last.finish_reason
        completion = sum(len(d.token_ids) for d in deltas)
        return {**header("chat.completion", cid), **extra,
                "choices": [{"index": 0, "message": protocol.message_dict(message), "finish_reason": reason,
                             "logprobs": None}],
                "usage": protocol.usage(len(prompt), completion, last.cached_prompt_tokens)}

    async def chat_events(q, rid, cid, args, prompt, stream_opts, extra):
        head = {**header("chat.completion.chunk", cid), **extra}
        parser = StreamParser(args.thinking)
        finished, saw_call, completion = False, False, 0
        try:
            yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
            while not finished:
                _, item = await q.get()
                if isinstance(item, EngineError):
                    yield _sse({"error": {"message": str(item), "type": "server_error", "param": None,
                                          "code": None}})
                    finished = True
                    return
                completion += len(item.token_ids)
                finished = item.finish_reason is not None
                parts = parser.feed(item.text) + (parser.finish() if finished else [])
                for d in parts:
                    if d.type == "tool_call":
                        saw_call = True
                        call = {"index": d.index, "function": {"arguments": d.arguments or ""}}
                        if d.id is not None:       # a call's first delta (may carry arguments already)
                            call.update(id=d.id, type="function",
                                        function={"name": d.name, "arguments": d.arguments or ""})
                        delta = {"tool_calls": [call]}
                    else:
                        delta = {"reasoning_content" if d.type == "reasoning" else "content": d.text}
                    yield _sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                if finished:
                    reason = "tool_calls" if saw_call and item.finish_reason == "stop" else item.finish_reason
                    yield _sse({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
                    if stream_opts.get("include_usage"):
                        yield _sse({**head, "choices": [],
                                    "usage": protocol.usage(len(prompt), completion, item.cached_prompt_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            if not finished:                 # the client went away: stop generating for it
                runner.abort(rid)

    # ---- completions --------------------------------------------------------------------
    async def completions(request: Request):
        body = await read_body(request)
        for name in ("logprobs", "suffix"):
            if body.get(name) is not None:
                raise FieldError(name, f"{name} is not supported")
        if (protocol.typed(body, "best_of", "int") or 1) != 1:
            raise FieldError("best_of", "best_of > 1 is not supported")
        echo = bool(protocol.typed(body, "echo", "bool"))
        params = protocol.sampling_params(body, defaults, max_tokens=16)   # OpenAI's default here
        prompts = protocol.completion_prompts(llm, body)
        stream_opts = protocol.typed(body, "stream_options", "dict") or {}
        q, rids = await submit(prompts, params, "prompt")
        cid = f"cmpl-{uuid.uuid4().hex}"

        def prompt_text(i):
            return llm.tokenizer.decode(prompts[i]) if echo and llm.tokenizer is not None else ""
        if body.get("stream"):
            return StreamingResponse(completion_events(q, rids, cid, prompts, prompt_text, stream_opts),
                                     media_type="text/event-stream")
        outs = await collect(request, q, rids)
        if outs is None:
            return error_response(499, "client disconnected", kind="cancelled")
        choices, n_prompt, n_completion, cached = [], 0, 0, 0
        for i, deltas in outs.items():
            choices.append({"index": i, "text": prompt_text(i) + "".join(d.text for d in deltas),
                            "finish_reason": deltas[-1].finish_reason, "logprobs": None})
            n_prompt += len(prompts[i])
            n_completion += sum(len(d.token_ids) for d in deltas)
            cached += deltas[-1].cached_prompt_tokens
        return {**header("text_completion", cid), "choices": choices,
                "usage": protocol.usage(n_prompt, n_completion, cached)}

    async def completion_events(q, rids, cid, prompts, prompt_text, stream_opts):
        head = header("text_completion", cid)
        left, n_completion, cached = set(range(len(rids))), 0, 0
        try:
            for i in sorted(left):
                if prompt_text(i):
                    yield _sse({**head, "choices": [{"index": i, "text": prompt_text(i), "finish_reason": None,
                                                     "logprobs": None}]})
            while left:
                i, item = await q.get()
                if isinstance(item, EngineError):
                    yield _sse({"error": {"message": str(item), "type": "server_error", "param": None,
                                          "code": None}})
                    left.clear()
                    return
                n_completion += len(item.token_ids)
                if item.finish_reason is not None:
                    left.discard(i)
                    cached += item.cached_prompt_tokens
                if item.text or item.finish_reason is not None:
                    yield _sse({**head, "choices": [{"index": i, "text": item.text,
                                                     "finish_reason": item.finish_reason, "logprobs": None}]})
            if stream_opts.get("include_usage"):
                yield _sse({**head, "choices": [],
                            "usage": protocol.usage(sum(map(len, prompts)), n_completion, cached)})
            yield "data: [DONE]\n\n"
        finally:
            for i in left:
                runner.abort(rids[i])

    @app.post("/v1/chat/completions")
    async def chat_route(request: Request):
        return await guarded(chat, request)

    @app.post("/v1/completions")
    async def completions_route(request: Request):
        return await guarded(completions, request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "hybrid", "root": str(llm.model_dir),
                                            "max_model_len": llm.engine.max_context}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **runner.load()}

    return app


def serve(llm, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_level: str = "info") -> None:
    """Run the server until Ctrl-C (uvicorn; one process, one engine thread)."""
    import uvicorn
    app = create_app(llm, model_name, api_key)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this port can use it")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
