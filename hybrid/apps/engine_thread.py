"""One thread owns the Engine (it is not thread-safe): it takes new requests and aborts from a queue
between steps, runs step() while anything is unfinished, and hands each delta to the sink its request
registered (the server's sink moves it onto an asyncio queue with loop.call_soon_threadsafe).
Requests added while others decode join the running batch at the next step (continuous batching).
A sequence the engine finishes with finish_reason "error" (interface item 1: a failure of that sequence
alone) reaches only its own sink; a whole step that raises fails the requests of that step, and the
thread keeps serving. Checked by tests/test_server.py (concurrent requests share steps, disconnects
abort) and tests/test_server_robust.py (one failing request among running streams).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import traceback
import uuid

log = logging.getLogger("hybrid.server")


class EngineError(RuntimeError):
    """The engine failed while running a request; sent to that request's sink instead of a delta."""


class EngineThread:
    def __init__(self, engine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._sinks: dict = {}                   # request id -> callable(delta | EngineError)
        self._thread: threading.Thread | None = None
        # steps: forwards run; max_batch_seen: most sequences that got a token from one step
        self.stats = {"steps": 0, "max_batch_seen": 0, "requests": 0, "finished": 0, "aborted": 0,
                      "errors": 0, "engine_errors": 0}

    # ---- any thread --------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hybrid-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(("stop",))
            self._thread.join(timeout=30)
            self._thread = None

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))

    def load(self) -> dict:
        cache = {k: v for k, v in (getattr(self.engine, "stats", None) or {}).items()
                 if k in ("preemptions", "prefix_hit_tokens", "blocks_total", "blocks_used", "blocks_cached")}
        return {"running": len(self._sinks), "waiting": len(getattr(self.engine, "waiting", []) or []),
                **self.stats, **cache}

    async def add(self, prompt_ids: list[int], params, sink, media=None) -> str:
        """Queue a request; returns its id once the engine accepted it, raises the engine's
        ValueError (empty / too long / bad ids) otherwise. sink(delta) runs in the engine thread."""
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        rid = f"req-{uuid.uuid4().hex[:16]}"

        def reply(err):
            def settle():
                if not accepted.done():
                    accepted.set_exception(err) if err else accepted.set_result(rid)
            loop.call_soon_threadsafe(settle)
        self._inbox.put(("add", list(prompt_ids), params, rid, sink, reply, media))
        try:
            return await accepted
        except asyncio.CancelledError:
            self.abort(rid)               # the caller went away while the request was queued
            raise

    # ---- the engine thread -------------------------------------------------------------
    def _run(self) -> None:
        while True:
            cmds = []
            if not self.engine.has_unfinished():
                cmds.append(self._inbox.get())      # idle: sleep until a request arrives
            while True:
                try:
                    cmds.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for cmd in cmds:
                if cmd[0] == "stop":
                    self._abort_all(EngineError("server shutting down"))
                    return
                self._handle(cmd)
            if self.engine.has_unfinished():
                self._step()

    def _handle(self, cmd) -> None:
        if cmd[0] == "add":
            _, prompt, params, rid, sink, reply, media = cmd
            try:
                if media:                           # images (hybrid/media): engine interface item 4
                    self.engine.add_request(prompt, params, request_id=rid, media=media)
                else:
                    self.engine.add_request(prompt, params, request_id=rid)
            except ValueError as e:
                reply(e)
                return
            self._sinks[rid] = sink
            self.stats["requests"] += 1
            reply(None)
        elif cmd[0] == "abort":
            if cmd[1] in self._sinks:
                self.engine.abort(cmd[1])

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except Exception as e:                      # keep serving: fail these requests, not the server
            log.error("engine step failed:\n%s", traceback.format_exc())
            self.stats["engine_errors"] += 1
            self._abort_all(EngineError(f"engine failed: {type(e).__name__}: {e}"))
            return
        self.stats["steps"] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], sum(1 for d in deltas if d.token_ids))
        for d in deltas:
            sink = self._sinks.get(d.request_id)
            if d.finish_reason is not None:
                self._sinks.pop(d.request_id, None)
                self.stats[{"abort": "aborted", "error": "errors"}.get(d.finish_reason, "finished")] += 1
            if sink is not None:
                self._send(sink, d)

    def _abort_all(self, err: EngineError) -> None:
        for rid, sink in list(self._sinks.items()):
            self.engine.abort(rid)
            self._send(sink, err)
        self._sinks.clear()
        try:
            self.engine.step()                      # drops the aborted requests (no forward runs)
        except Exception:
            log.error("engine cleanup failed:\n%s", traceback.format_exc())

    @staticmethod
    def _send(sink, item) -> None:
        try:
            sink(item)
        except Exception:                           # e.g. the request's event loop is closed
            log.debug("dropped a delta:\n%s", traceback.format_exc())
