"""`hybrid serve --ray [ADDRESS] --replicas N`: one OpenAI endpoint in front of N engine replicas (Ray Serve).

    python -m hybrid.apps.ray_serve MODEL_DIR --replicas 2 [--address HOST:6379] [--port 8000]

Each replica (EngineReplica, a Ray Serve deployment declaring the CPUs / GPU / plan RAM one engine
needs, at most one per node unless one_per_node=False) loads one hybrid LLM and runs the
single-machine server's app (hybrid/apps/server.py create_app) in process: the replica is called
with the HTTP request (method, path, headers, body) and streams back the ASGI response (a head, then
body chunks), so every endpoint, error body and streaming format is the single-machine server's.
The gateway (the ingress, no CPUs) forwards each request to a replica chosen by AffinityRouter, a
Ray Serve custom request router (ray.serve.request_router, alpha API of Ray >= 2.46):
  - requests go to the least loaded replica (fewest ongoing requests, Ray's queue-length cache);
  - a chat request whose conversation start (system/tools + first user message) or a completion
    whose first prompt characters were seen before goes to the replica that served it, where the
    prefix cache holds it, unless that replica has `imbalance` more requests in flight than the least
    loaded one (then the least loaded one takes it and becomes the owner).
Every response carries `x-hybrid-replica: HOST:PID`. A replica that dies fails only the requests it
was running: a non-streaming one gets a 503, a stream gets an OpenAI error event and ends; the
others go on, and Ray Serve starts a replacement replica.
Checked by tests/test_ray_serve.py (local cluster, 2 replicas, the openai client).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import socket
import sys
import time
from collections import OrderedDict

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hybrid.apps.ray_batch import INSTALL_HINT, connect, require_ray, worker_resources

PROMPT_PREFIX_CHARS = 512            # a completion prompt's affinity key: its first characters
PROMPT_PREFIX_IDS = 128              # ... or its first token ids
REPLICA_HEADER = "x-hybrid-replica"
HEAD_ATTEMPTS = 3                    # replicas tried for a request that failed before its first byte


def affinity_key(path: str, body: bytes) -> str | None:
    """Hash of what every turn of a conversation starts with; None when the body says nothing usable."""
    try:
        req = json.loads(body)
    except ValueError:
        return None
    if not isinstance(req, dict):
        return None
    msgs = req.get("messages")
    if isinstance(msgs, list) and msgs:
        head = []
        for m in msgs:                     # the system message(s) and the first user turn
            head.append(m)
            if isinstance(m, dict) and m.get("role") == "user":
                break
        start = [head, req.get("tools")]
    elif isinstance(req.get("prompt"), str):
        start = req["prompt"][:PROMPT_PREFIX_CHARS]
    elif isinstance(req.get("prompt"), list) and req["prompt"] and isinstance(req["prompt"][0], int):
        start = req["prompt"][:PROMPT_PREFIX_IDS]
    else:
        return None
    raw = json.dumps([path, start], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _router_class():
    from ray.serve.request_router import FIFOMixin, RequestRouter

    class AffinityRouter(FIFOMixin, RequestRouter):
        """Least loaded replica; a known conversation start goes back to the replica that holds it."""

        def initialize_state(self, imbalance: int = 4, max_keys: int = 100_000, **kwargs):
            self.imbalance, self.max_keys = imbalance, max_keys
            self.owner: OrderedDict = OrderedDict()       # affinity key -> ReplicaID (LRU)

        @staticmethod
        def _key(pending_request):
            return pending_request.kwargs.get("affinity") if pending_request is not None else None

        async def choose_replicas(self, candidate_replicas, pending_request=None):
            if not candidate_replicas:
                return []
            key = self._key(pending_request)
            owner = self.owner.get(key) if key else None
            by_id = {r.replica_id: r for r in candidate_replicas}
            if owner in by_id:
                cache = self.replica_queue_len_cache
                lens = [cache.get(r.replica_id) for r in candidate_replicas]
                known = [n for n in lens if n is not None]
                mine = cache.get(owner)
                if mine is None or not known or mine - min(known) <= self.imbalance:
                    return [[by_id[owner]], candidate_replicas]
            # the base picks the shortest queue among them; shuffled, so ties go anywhere
            return [random.sample(candidate_replicas, len(candidate_replicas))]

        def on_request_routed(self, pending_request, replica_id, result):
            key = self._key(pending_request)
            if key:
                self.owner[key] = replica_id
                self.owner.move_to_end(key)
                while len(self.owner) > self.max_keys:
                    self.owner.popitem(last=False)

        def on_replica_actor_died(self, replica_id):
            super().on_replica_actor_died(replica_id)
            for k in [k for k, v in self.owner.items() if v == replica_id]:
                del self.owner[k]

    AffinityRouter.__module__, AffinityRouter.__qualname__ = __name__, "AffinityRouter"
    return AffinityRouter


def __getattr__(name: str):
    """`AffinityRouter` is built on first use (Ray is optional), importable as hybrid.apps.ray_serve.AffinityRouter."""
    if name == "AffinityRouter":
        globals()[name] = cls = _router_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class EngineReplica:
    """One hybrid LLM behind the single-machine server app, called over a Ray Serve handle."""

    def __init__(self, model_dir: str, llm_kwargs: dict, model_name: str, api_key: str | None):
        from hybrid.apps.server import create_app
        from hybrid.llm import LLM
        self.llm = LLM(model_dir, progress=False, **llm_kwargs)
        self.app = create_app(self.llm, model_name, api_key)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.served = 0
        self._started: asyncio.Future | None = None

    async def _lifespan(self) -> None:
        """Run the app's ASGI lifespan startup once (it starts the engine thread)."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            sent = False

            async def receive():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "lifespan.startup"}
                await asyncio.Event().wait()          # never shut down: the process ends with the replica

            async def send(msg):
                if msg["type"].startswith("lifespan.startup") and not self._started.done():
                    self._started.set_result(msg)
            self._lifespan_task = asyncio.ensure_future(self.app({"type": "lifespan", "asgi": {"version": "3.0"},
                                                                  "state": {}}, receive, send))
        msg = await self._started
        if msg["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"server startup failed: {msg.get('message')}")

    async def check_health(self) -> None:
        """Ray Serve's periodic health check: starts the engine thread early, and a replica whose server
        cannot start is reported unhealthy (Ray Serve replaces it) instead of failing every request."""
        await self._lifespan()

    def whoami(self) -> dict:
        return {"replica": self.name, "pid": os.getpid(), "served": self.served}

    async def call(self, method: str, path: str, query: str, headers: list, body: bytes, affinity=None):
        """Stream the app's response: {'status', 'headers', 'replica'} first, then body chunks (bytes)."""
        await self._lifespan()
        self.served += 1
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body_sent = False

        async def receive():
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(msg):
            if gone.is_set():
                raise OSError("client disconnected")
            await out.put(msg)
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": query.encode(), "client": ("ray-serve", 0), "server": (self.name, 0),
                 "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]}

        async def run():
            try:
                await self.app(scope, receive, send)
            finally:
                await out.put(None)
        task = asyncio.ensure_future(run())
        try:
            while (msg := await out.get()) is not None:
                if msg["type"] == "http.response.start":
                    yield {"status": msg["status"], "replica": self.name,
                           "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in msg["headers"]]}
                elif msg["type"] == "http.response.body":
                    if msg.get("body"):
                        yield bytes(msg["body"])
                    if not msg.get("more_body"):
                        break
        finally:                                    # also when the gateway cancels: abort in the engine
            gone.set()
            try:
                await asyncio.wait_for(task, 5)
            except BaseException:
                task.cancel()


def _gateway_class():
    from ray import serve
    app = FastAPI(title="hybrid (Ray Serve)")

    def failed(err) -> dict:
        return {"error": {"message": f"the replica serving this request failed: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}", "type": "server_error",
                          "param": None, "code": "replica_failed"}}

    @serve.ingress(app)
    class Gateway:
        def __init__(self, engine):
            self.engine = engine.options(stream=True)

        async def forward(self, request, rest):
            body = await request.body()
            path = request.url.path
            key = affinity_key(path, body) if request.method == "POST" else None
            for attempt in range(HEAD_ATTEMPTS):   # nothing reached the client yet: another replica may answer
                gen = self.engine.call.remote(request.method, path, request.url.query,
                                              list(request.headers.items()), body, affinity=key)
                try:
                    head = await gen.__anext__()
                    break
                except Exception as err:           # the replica died before answering
                    last_err = err
            else:
                return JSONResponse(failed(last_err), status_code=503)
            headers = {k: v for k, v in head["headers"] if k.lower() not in ("content-length", "content-type")}
            headers[REPLICA_HEADER] = head["replica"]
            ctype = dict((k.lower(), v) for k, v in head["headers"]).get("content-type", "application/json")
            if not ctype.startswith("text/event-stream"):
                try:
                    content = b"".join([chunk async for chunk in gen])
                except Exception as err:
                    return JSONResponse(failed(err), status_code=503, headers={REPLICA_HEADER: head["replica"]})
                return Response(content, status_code=head["status"], headers=headers, media_type=ctype)

            async def events():
                finished = False
                try:
                    async for chunk in gen:
                        yield chunk
                    finished = True
                except Exception as err:          # mid-stream: an OpenAI error event, then the end
                    finished = True
                    yield f"data: {json.dumps(failed(err))}\n\n".encode()
                finally:
                    if not finished:                # the client went away: stop the replica's work
                        gen.cancel()
            return StreamingResponse(events(), status_code=head["status"], headers=headers, media_type=ctype)

        # real annotation objects (not strings): this class is pickled by value onto the gateway replica
        forward.__annotations__ = {"request": Request, "rest": str}
        forward = app.api_route("/{rest:path}", methods=["GET", "POST"])(forward)

    return Gateway


def build_app(model_dir, *, replicas: int = 2, model_name: str | None = None, api_key: str | None = None,
              num_cpus: float | None = None, num_gpus: float | None = None, memory: int | None = None,
              one_per_node: bool = True, imbalance: int = 4, **llm_kwargs):
    """The Ray Serve application: the gateway bound to N EngineReplica replicas (call after connect():
    the replicas' resources depend on the cluster, see ray_batch.worker_resources)."""
    ray = require_ray()
    from pathlib import Path
    from ray import serve
    from ray.serve.config import RequestRouterConfig
    model_dir = str(Path(model_dir).resolve())
    res = worker_resources(ray, model_dir, llm_kwargs, replicas, num_cpus, num_gpus, memory)
    max_batch = llm_kwargs.get("max_batch") or 16
    engine = serve.deployment(
        EngineReplica, name="hybrid-engine", num_replicas=replicas,
        ray_actor_options=res,
        max_replicas_per_node=1 if one_per_node else None,
        max_ongoing_requests=4 * max_batch,
        request_router_config=RequestRouterConfig(request_router_class=f"{__name__}.AffinityRouter",
                                                  request_router_kwargs={"imbalance": imbalance}),
    ).bind(model_dir, llm_kwargs, model_name or Path(model_dir).name, api_key)
    gateway = serve.deployment(_gateway_class(), name="hybrid-gateway", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    return gateway.bind(engine)


def start(model_dir, *, address: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          local_cpus: int | None = None, **kwargs) -> str:
    """Deploy on the cluster (a local one without address) and return the endpoint's base URL."""
    connect(address, local_cpus)
    from ray import serve
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(model_dir, **kwargs), name="hybrid", route_prefix="/")
    return f"http://{host}:{port}/v1"


def serve_ray(model_dir, **kwargs) -> None:
    """`hybrid serve --ray`: deploy, print the endpoint, serve until Ctrl-C, then take the app down."""
    url = start(model_dir, **kwargs)
    if kwargs.get("host", "127.0.0.1") not in ("127.0.0.1", "localhost", "::1") and not kwargs.get("api_key"):
        print(f"warning: serving on {kwargs['host']} without --api-key: anyone who can reach this port can use it")
    print(f"serving {kwargs.get('replicas', 2)} replicas at {url}  (Ctrl-C stops)", flush=True)
    from ray import serve
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.delete("hybrid")


def main(argv: list[str] | None = None) -> int:
    """python -m hybrid.apps.ray_serve: the same as `hybrid serve --ray` (before the CLI flag existed)."""
    ap = argparse.ArgumentParser(prog="python -m hybrid.apps.ray_serve")
    ap.add_argument("model_dir")
    ap.add_argument("--address", default=None)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("HYBRID_API_KEY"))
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--replica-cpus", type=float, default=None)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-context", type=int, default=None, help="default: each replica's plan")
    ap.add_argument("--local-cpus", type=int, default=None)
    ap.add_argument("--allow-colocated", action="store_true", help="several replicas on one node (tests)")
    a = ap.parse_args(argv)
    try:
        serve_ray(a.model_dir, address=a.address, replicas=a.replicas, host=a.host, port=a.port, api_key=a.api_key,
                  model_name=a.served_model_name, num_cpus=a.replica_cpus, local_cpus=a.local_cpus,
                  one_per_node=not a.allow_colocated, max_batch=a.max_batch, max_context=a.max_context)
    except ValueError as e:
        print(f"hybrid serve --ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = ["INSTALL_HINT", "affinity_key", "build_app", "start", "serve_ray", "EngineReplica"]

if __name__ == "__main__":
    sys.exit(main())
