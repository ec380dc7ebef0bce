"""OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models[/{id}], /tokenize,
/detokenize, /metrics (Prometheus), /health, and the chat page at /.

    hybrid serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY | env HYBRID_API_KEY]

`serve(llm_or_loader, ...)` binds the port first and loads the model in a background thread: /health
answers 503 {"status": "loading", ...} until the model is ready, then 200; /v1/* answer 503 meanwhile.
Every request goes to one engine thread (hybrid/apps/engine_thread.py), so concurrent requests share
decode steps. Request parsing, templating, tokenization and grammar building run in a worker pool
(never on the event loop), bounded in time (PREPARE_TIMEOUT_S). Bad input: 400 naming the field;
unknown model: 404; body over the limit: 413; a failing chat template: 500 of type template_error;
a failure of one sequence inside the engine: that request alone gets a 500 (or an error event).
response_format and tool_choice "required" / a named function are enforced by grammar-constrained
decoding (hybrid/text/grammar.py). A client that disconnects aborts its request in the engine.
Checked by tests/test_server.py, tests/test_server_api.py, tests/test_server_robust.py,
tests/test_server_structured.py (a real server on a free port, the official openai client, raw HTTP).
"""
from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

import hybrid.apps.openai_protocol as protocol
from hybrid.apps import http_guards as guards
from hybrid.apps.engine_thread import EngineError, EngineThread
from hybrid.apps.metrics import CONTENT_TYPE, Metrics
from hybrid.apps.openai_protocol import FieldError, TemplateFailure
from hybrid.apps.server_responses import Responder
from hybrid.chat import chat_sampling

PREPARE_TIMEOUT_S = 30.0
CHAT_PAGE = Path(__file__).with_name("chat_page.html")


class ModelNotFound(Exception):
    pass


class NotReady(Exception):
    pass


class _State:
    """The model and engine thread, set once loading finished (at once for an LLM passed in)."""

    def __init__(self):
        self.llm = self.runner = self.defaults = self.error = None
        self.t0, self.progress, self.message = time.time(), None, "starting"
        self.max_token_bytes = 1

    def ready(self, llm) -> None:
        self.defaults = protocol.generation_defaults(llm.model_dir)
        tok = llm.tokenizer
        self.max_token_bytes = max((len(b) for b in tok.mergeable_ranks), default=1) if tok is not None else 1
        if getattr(llm, "images", None) is not None:   # clients send data: / http(s) URLs, never server paths
            llm.images.limits = dataclasses.replace(llm.images.limits, allow_local=False)
        self.llm, self.runner = llm, EngineThread(llm.engine)
        self.runner.start()
        if tok is not None:                      # the grammar tokenizer takes ~2 s at 163,840 tokens: build it now
            threading.Thread(target=_warm_grammar, args=(tok, llm.config.vocab_size), daemon=True).start()


def _warm_grammar(tokenizer, vocab_size: int) -> None:
    try:
        from hybrid.text.grammar import llg_tokenizer
        llg_tokenizer(tokenizer, vocab_size)
    except Exception:                            # structured requests will report it
        pass


def create_app(llm=None, model_name: str = "model", api_key: str | None = None, *, loader=None,
               max_body_bytes: int = guards.DEFAULT_MAX_BODY_BYTES, workers: int = 2) -> FastAPI:
    """`llm`: a loaded hybrid.LLM, or None with `loader`: a callable returning one (called in a thread
    at startup; if it takes an argument, that is a `report(fraction | None, message)` callback)."""
    state = _State()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hybrid-prepare")
    metrics = Metrics(lambda: (state.runner, state.llm))
    api_key = guards.api_key_from_env(api_key)
    created = int(time.time())

    def load():
        def report(fraction=None, message=None):
            state.progress, state.message = fraction, message or state.message
        try:
            state.message = "loading the model"
            got = loader(report) if inspect.signature(loader).parameters else loader()
            state.ready(got)
        except BaseException as e:             # shown by /health; the server stays up to say so
            state.error = f"{type(e).__name__}: {e}"

    @asynccontextmanager
    async def lifespan(app):
        if llm is not None:
            state.ready(llm)
        elif loader is not None:
            threading.Thread(target=load, name="hybrid-load", daemon=True).start()
        yield
        if state.runner is not None:
            state.runner.stop()
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="hybrid", lifespan=lifespan)
    app.state.hybrid, app.state.metrics = state, metrics
    if api_key:
        app.add_middleware(guards.ApiKey, api_key=api_key)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return guards.error_response(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")

    def check_model(body: dict) -> None:
        model = body.get("model")
        if model is not None and model != model_name:
            if not isinstance(model, str):
                raise FieldError("model", "model must be a string")
            raise ModelNotFound(f"The model {model[:200]!r} does not exist; available: {model_name!r}")

    async def off_loop(fn, *args):
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(pool, fn, *args), PREPARE_TIMEOUT_S)

    async def body_of(request: Request) -> dict:
        raw = await guards.read_raw(request, max_body_bytes)
        body = await off_loop(guards.parse_json, raw)
        check_model(body)
        protocol.typed(body, "stream", "bool")
        return body

    def too_long(obj, param: str) -> None:
        limit = state.llm.engine.max_context * state.max_token_bytes
        if guards.text_bytes(obj, limit) > limit:
            raise FieldError(param, f"{param} is longer than the context ({state.llm.engine.max_context} tokens) "
                                    "can hold")

    async def guarded(endpoint: str, handler, request: Request):
        status = 500
        try:
            if state.runner is None:
                raise NotReady()
            resp = await handler(request)
            status = getattr(resp, "status_code", 200)
            return resp
        except FieldError as e:
            status = 400
            return guards.error_response(400, e.message, e.param)
        except ModelNotFound as e:
            status = 404
            return guards.error_response(404, str(e), "model", code="model_not_found")
        except guards.BodyTooLarge as e:
            status = 413
            return guards.error_response(413, str(e), code="request_too_large")
        except NotReady:
            status = 503
            return guards.error_response(503, f"the model is {'failing to load' if state.error else 'loading'}; "
                                              "see /health", kind="service_unavailable", headers={"Retry-After": "5"})
        except TemplateFailure as e:
            return guards.error_response(500, str(e), kind="template_error")
        except asyncio.TimeoutError:
            return guards.error_response(500, f"preparing the prompt took over {PREPARE_TIMEOUT_S:.0f} s "
                                              "(chat template or tokenizer)", kind="template_error")
        except EngineError as e:
            return guards.error_response(500, str(e), kind="server_error", code="engine_error")
        finally:
            metrics.request(endpoint, status)

    def responder() -> Responder:
        return Responder(state.runner, state.llm.tokenizer, model_name, metrics)

    # ---- chat ------------------------------------------------------------------------------
    def prepare_chat(body: dict):
        too_long(body.get("messages"), "messages")
        args = protocol.chat_args(body)
        n = protocol.choices(body)
        params = chat_sampling(protocol.sampling_params(body, state.defaults, thinking=args.thinking,
                                                        logprobs=protocol.chat_logprobs(body)))
        stream_opts = protocol.typed(body, "stream_options", "dict") or {}
        prompt, media = protocol.chat_inputs(state.llm, args)
        return args, n, params, stream_opts, prompt, media, constrained(args.constraint, params, n)

    def constrained(spec, params, n: int) -> list:
        """One SamplingParams per choice: its own seed (seed + i) and its own grammar constraint."""
        out = []
        for i in range(n):
            p = dataclasses.replace(params, seed=params.seed + i) if (params.seed is not None and i) else params
            out.append(protocol.constrain(state.llm, spec, p))
        return out

    async def chat(request: Request):
        body = await body_of(request)
        args, n, params, stream_opts, prompt, media, per_choice = await off_loop(prepare_chat, body)
        r = responder()
        sub = await r.submit([prompt] * n, per_choice, "messages", media)
        extra = {"hybrid_note": "; ".join(args.notes)} if args.notes else {}
        if body.get("stream"):
            return r.chat_stream(sub, args, prompt, stream_opts, extra)
        return await r.chat_full(request, sub, args, prompt, extra)

    # ---- completions --------------------------------------------------------------------
    def prepare_completions(body: dict):
        if body.get("suffix") is not None:
            raise FieldError("suffix", "suffix is not supported")
        if (protocol.typed(body, "best_of", "int") or 1) != 1:
            raise FieldError("best_of", "best_of > 1 is not supported")
        too_long(body.get("prompt"), "prompt")
        echo = bool(protocol.typed(body, "echo", "bool"))
        n = protocol.choices(body)
        params = protocol.sampling_params(body, state.defaults, max_tokens=16,      # OpenAI's default here
                                          logprobs=protocol.completion_logprobs(body))
        prompts = protocol.completion_prompts(state.llm, body)
        stream_opts = protocol.typed(body, "stream_options", "dict") or {}
        tok = state.llm.tokenizer
        texts = [tok.decode(p) if echo and tok is not None else "" for p in prompts]
        return n, params, prompts, texts, stream_opts, constrained(None, params, n)

    async def completions(request: Request):
        body = await body_of(request)
        n, params, prompts, texts, stream_opts, per_choice = await off_loop(prepare_completions, body)
        all_prompts = [p for p in prompts for _ in range(n)]
        all_texts = [t for t in texts for _ in range(n)]
        r = responder()
        sub = await r.submit(all_prompts, per_choice * len(prompts), "prompt")
        if body.get("stream"):
            return r.completion_stream(sub, all_prompts, all_texts, stream_opts)
        return await r.completion_full(request, sub, all_prompts, all_texts)

    # ---- tokenizer ------------------------------------------------------------------------
    def prepare_tokenize(body: dict) -> dict:
        if body.get("messages") is not None:
            too_long(body.get("messages"), "messages")
            ids = protocol.chat_prompt(state.llm, protocol.chat_args(body))
        else:
            too_long(body.get("prompt"), "prompt")
            if not isinstance(body.get("prompt"), str):
                raise FieldError("prompt", "prompt must be a string (or send messages)")
            ids = protocol.completion_prompts(state.llm, body)[0]
        return {"count": len(ids), "max_model_len": state.llm.engine.max_context, "tokens": ids}

    async def tokenize(request: Request):
        return await off_loop(prepare_tokenize, await body_of(request))

    def prepare_detokenize(body: dict) -> dict:
        ids = protocol.typed(body, "tokens", "ids")
        vocab = state.llm.config.vocab_size
        if ids is None or any(not 0 <= t < vocab for t in ids):
            raise FieldError("tokens", f"tokens must be a list of token ids in 0..{vocab - 1}")
        if state.llm.tokenizer is None:
            raise FieldError("tokens", "this checkpoint has no tokenizer")
        return {"prompt": state.llm.tokenizer.decode(ids)}

    async def detokenize(request: Request):
        return await off_loop(prepare_detokenize, await body_of(request))

    # ---- routes ---------------------------------------------------------------------------
    for path, handler, name in (("/v1/chat/completions", chat, "chat"), ("/v1/completions", completions, "completions"),
                                ("/tokenize", tokenize, "tokenize"), ("/detokenize", detokenize, "detokenize")):
        async def route(request: Request, handler=handler, name=name):
            return await guarded(name, handler, request)
        app.add_api_route(path, route, methods=["POST"], name=name)

    def model_card() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "hybrid", "root": model_name}
        if state.llm is not None:
            card["max_model_len"] = state.llm.engine.max_context
        return card

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            return guards.error_response(404, f"The model {model_id[:200]!r} does not exist", "model",
                                         code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health():
        if state.runner is None:
            body = {"status": "failed" if state.error else "loading", "model": model_name,
                    "elapsed_s": round(time.time() - state.t0, 1), "progress": state.progress,
                    "message": state.error or state.message}
            return guards.JSONResponse(body, status_code=503)
        return {"status": "ok", "model": model_name, **state.runner.load()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/")
    async def page():
        if not CHAT_PAGE.is_file():
            return guards.error_response(404, "the chat page (hybrid/apps/chat_page.html) is not installed",
                                         code="not_found")
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    return app


def serve(llm, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_level: str = "info", max_body_bytes: int = guards.DEFAULT_MAX_BODY_BYTES) -> None:
    """Run the server until Ctrl-C (uvicorn; one process, one engine thread). `llm`: a loaded LLM, or a
    callable that loads one; then the port is bound first and the model loads in the background
    (/health: 503 "loading" until ready). api_key None: HYBRID_API_KEY from the environment, if set."""
    import uvicorn
    api_key = guards.api_key_from_env(api_key)
    if callable(llm) and not hasattr(llm, "engine"):
        app = create_app(None, model_name, api_key, loader=llm, max_body_bytes=max_body_bytes)
    else:
        app = create_app(llm, model_name, api_key, max_body_bytes=max_body_bytes)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this port can use it")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
