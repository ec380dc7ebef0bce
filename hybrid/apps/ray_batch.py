"""`hybrid batch --ray [ADDRESS]`: the JSONL batch job of hybrid/apps/batch.py, run on a Ray cluster.

    python -m hybrid.apps.ray_batch MODEL_DIR --input in.jsonl --output out.jsonl [--address HOST:6379] [--workers N]

The same input, the same records and the same error records as `hybrid batch` (batch.read_entries /
batch.answered, and the batch module's per-record request preparation and result record), but one
hybrid `LLM` per worker actor. Each actor declares what it needs (CPUs, GPU, and the memory of the
plan, so Ray places one per workstation) and runs its engine in an EngineThread, so the records it
holds decode together (continuous batching). The driver is the one writer: it streams records to the
actors (up to `window` in flight per actor, the next one to whichever actor frees a slot), appends each
result the moment it comes back (flush + fsync) and shows a progress bar (records, records/s, ETA,
per-worker counts).
Exactly once: a rerun skips every id already in the output (batch.answered, which also drops a record
torn by a crash); a worker that dies (process killed, node lost) has its unfinished records put back at
the head of the queue for the other workers, and a replacement actor is started; a record is written
only by the driver and only once. A record whose request fails on `max_attempts` workers gets an error
record. Without Ray installed, only this module fails (with how to install it).
Checked by tests/test_ray_batch.py (local 2-worker cluster: 200 records exactly once, a worker killed
mid-job, a rerun after kill -9 of the driver, outputs equal to the single-machine run).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
import uuid
from collections import Counter, deque
from pathlib import Path

from hybrid.apps import batch
from hybrid.apps.batch import answered, check_paths, error_record, read_entries

INSTALL_HINT = 'Ray is not installed: pip install -e ".[ray]"   (or: pip install "ray[serve]>=2.50,<3")'
LOCAL_OBJECT_STORE_BYTES = 200 * 2**20      # records are small; a local cluster needs little object store


def require_ray():
    """The ray module, or a ValueError saying how to install it (the CLI prints it without a traceback)."""
    try:
        import ray
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None, **init_kwargs):
    """Join the cluster at `address` ("auto": the one `ray start` runs here), or start a local one."""
    ray = require_ray()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False, **init_kwargs)
        else:
            init_kwargs.setdefault("object_store_memory", LOCAL_OBJECT_STORE_BYTES)
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **init_kwargs)
    return ray


def worker_memory_bytes(model_dir, max_context: int = 4096, max_batch: int = 16, gpu: bool = False,
                        expert_backend: str = "auto") -> int:
    """RAM one worker needs by the memory plan (hybrid/plan.py), without its fixed reserve: declared to
    Ray so that two K2.6 workers never land on one workstation."""
    from hybrid import plan
    from hybrid.config import load_config
    config = load_config(model_dir)
    p = plan.make_plan(config, gpu_mem_bytes=(1 << 50) if gpu else 0, ram_bytes=1 << 60,
                       context=min(max_context, config.max_position_embeddings), batch=max_batch,
                       expert_backend=expert_backend)
    return max(p.ram_total_bytes - p.ram_reserve_bytes, 1 << 20)


def worker_resources(ray, model_dir, llm_kwargs: dict, workers: int, num_cpus=None, num_gpus=None,
                     memory=None) -> dict:
    """What one worker (or serve replica) declares to Ray, and its thread count (set in llm_kwargs).
    CPUs: --threads if given, else a whole node (the smallest alive node's CPUs; on a one-node cluster
    its CPUs / workers). GPU: 1 when the device is cuda, or auto on a cluster that has GPUs (Ray hides
    the GPUs from an actor that declares none). Memory: the plan's RAM, capped at the largest node's
    memory resource (a worker that can never be placed would wait forever)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if num_cpus is None:
        num_cpus = llm_kwargs.get("num_threads")
    if num_cpus is None:
        cpus = min((n.get("CPU", 1) for n in nodes), default=1)
        num_cpus = max(cpus // workers, 1) if len(nodes) == 1 else cpus
    if not llm_kwargs.get("num_threads"):
        llm_kwargs["num_threads"] = max(int(num_cpus), 1)
    device = str(llm_kwargs.get("device") or "auto")
    if num_gpus is None:
        num_gpus = 1 if device.startswith("cuda") or (device == "auto" and
                                                      any(n.get("GPU", 0) >= 1 for n in nodes)) else 0
    if memory is None:
        memory = worker_memory_bytes(model_dir, llm_kwargs.get("max_context") or 4096,
                                     llm_kwargs.get("max_batch") or 16, num_gpus > 0,
                                     llm_kwargs.get("expert_backend") or "auto")
        largest = max((n.get("memory", 0) for n in nodes), default=0)
        if largest and memory > largest:
            print(f"note: a worker needs {memory / 1e9:.0f} GB by the plan but the largest Ray node offers "
                  f"{largest / 1e9:.0f} GB of its 'memory' resource: declaring that (start Ray with a smaller "
                  f"--object-store-memory to give the model more)", file=sys.stderr)
            memory = int(largest)
    return {"num_cpus": num_cpus, "num_gpus": num_gpus, "memory": int(memory)}


class BatchWorker:
    """One hybrid LLM on one machine (a Ray actor; async, so the records it holds decode together)."""

    def __init__(self, model_dir: str, llm_kwargs: dict, max_tokens: int | None):
        import hybrid.apps.openai_protocol as protocol
        from hybrid.apps.engine_thread import EngineThread
        from hybrid.llm import LLM
        self.llm = LLM(model_dir, progress=False, **llm_kwargs)
        self.defaults = protocol.generation_defaults(self.llm.model_dir)
        self.max_tokens = max_tokens
        self.runner = EngineThread(self.llm.engine)
        self.runner.start()

    def info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname()}

    async def answer(self, e) -> dict:
        """The result record of one entry, or its error record (bad field, too long a prompt, the
        sequence failed): what batch.run_batch writes for it. A failure of the whole engine raises
        (the driver retries the record on another worker)."""
        from hybrid.apps.engine_thread import EngineError
        got = batch.prepare_entry(self.llm, e, self.defaults, self.max_tokens)
        if got is None:
            return error_record(e)
        prompt, params, args = got
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        try:
            await self.runner.add(prompt, params, lambda item: loop.call_soon_threadsafe(q.put_nowait, item),
                                  media=e.media)
        except ValueError as err:              # the engine's: too long, bad ids (as run_batch words it)
            e.error, e.param = f"line {e.line}: {err}", "messages" if "messages" in e.request else "prompt"
            return error_record(e)
        parts, ids, lps = [], [], [] if params.logprobs is not None else None
        while True:
            item = await q.get()
            if isinstance(item, EngineError):
                raise item
            parts.append(item.text)
            ids += item.token_ids
            if lps is not None:
                lps += getattr(item, "logprobs", None) or []
            if item.finish_reason is not None:
                return batch.result_record(e, args, "".join(parts), ids, item, lps, self.llm.tokenizer)


class _Output:
    """The one writer: appends a record per line, flushed and fsync'd before it counts as done."""

    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def run_ray_batch(model_dir, input_path, output_path, *, address: str | None = None, workers: int = 2,
                  max_tokens: int | None = None, progress: bool = True, num_cpus: float | None = None,
                  num_gpus: float | None = None, memory: int | None = None, window: int | None = None,
                  max_attempts: int = 3, name: str | None = None, local_cpus: int | None = None,
                  retry_errors: bool = False, **llm_kwargs) -> dict:
    """Answer every input line not yet answered in output_path, on `workers` Ray actors.

    num_cpus / num_gpus / memory: what each worker declares (default: llm_kwargs' num_threads or 1 CPU;
    1 GPU when device is cuda*; the plan's RAM). window: records in flight per worker (default
    2 * max_batch). name: the actors are NAME-w0, NAME-w1, ... in namespace "hybrid" (default random).
    local_cpus: CPUs of the local cluster started when no address is given (default: all).
    retry_errors: lines answered by an error record are redone (as `hybrid batch --retry-errors`).
    llm_kwargs go to hybrid.LLM (max_batch, max_context, expert_backend, num_threads, device, ...).
    Returns counts: results, errors, skipped, retried (error records dropped by retry_errors), resent
    (records sent again after a worker died or failed them), workers_lost, per_worker, records_per_s, tokens_per_s."""
    ray = require_ray()
    input_path, output_path = check_paths(input_path, output_path)
    lock = batch.OutputLock(output_path)             # one writer per output, as `hybrid batch` (OUTPUT.lock)
    out = None
    try:
        retried = batch.drop_error_records(output_path) if retry_errors else 0
        done = answered(output_path)
        todo_all = [e for e in read_entries(input_path) if e.key not in done]
        out = _Output(output_path)
        counts = {"skipped": len(done), "results": 0, "errors": 0, "retried": retried, "resent": 0,
                  "workers_lost": 0, "per_worker": {}, "records_per_s": 0.0, "tokens_per_s": 0.0}
        for e in todo_all:                      # malformed lines / duplicates: the driver answers them
            if e.error is not None:
                out.write(error_record(e))
                counts["errors"] += 1
        todo = deque(e for e in todo_all if e.error is None)
        if todo:
            connect(address, local_cpus)
            _drive(ray, model_dir, todo, out, counts, workers=workers, max_tokens=max_tokens, progress=progress,
                   num_cpus=num_cpus, num_gpus=num_gpus, memory=memory, window=window,
                   max_attempts=max_attempts, name=name or f"hybrid-batch-{uuid.uuid4().hex[:8]}",
                   llm_kwargs=llm_kwargs)
    finally:
        if out is not None:
            out.close()
        lock.release()
    return counts


def _drive(ray, model_dir, todo: deque, out: _Output, counts: dict, *, workers, max_tokens, progress, num_cpus,
           num_gpus, memory, window, max_attempts, name, llm_kwargs) -> None:
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
    from tqdm import tqdm
    res = worker_resources(ray, model_dir, llm_kwargs, workers, num_cpus, num_gpus, memory)
    window = window or 2 * (llm_kwargs.get("max_batch") or 16)
    actor_cls, options = ray.remote(BatchWorker), dict(
        **res, scheduling_strategy="SPREAD", max_restarts=0, max_concurrency=max(4 * window, 64), namespace="hybrid")
    model_dir = str(Path(model_dir).resolve())
    actors: dict[int, object] = {}             # worker index -> actor handle (alive or starting)
    ready: dict[object, int] = {}              # info() ref -> worker index, until it starts
    live: set[int] = set()                     # started and answering
    inflight: dict[object, tuple] = {}         # answer() ref -> (entry, worker index)
    load: Counter = Counter()                  # worker index -> records in flight
    per_worker: Counter = Counter()
    attempts: Counter = Counter()
    written: set[str] = set()
    replacements, start_error = workers, None  # at most `workers` replacement actors per job
    next_index = iter(range(1 << 30))

    def start() -> None:
        i = next(next_index)
        actors[i] = actor_cls.options(name=f"{name}-w{i}", **options).remote(model_dir, llm_kwargs, max_tokens)
        ready[actors[i].info.remote()] = i

    def lost(i: int) -> None:
        nonlocal replacements
        if i in actors:
            del actors[i]
            live.discard(i)
            counts["workers_lost"] += 1
            if replacements > 0:
                replacements -= 1
                start()

    for _ in range(workers):
        start()
    total = len(todo)
    bar = tqdm(total=total, desc="ray batch", unit="rec", disable=not progress, dynamic_ncols=True)
    t0, n_tokens = None, 0                     # the clock starts when the first worker is up
    try:
        while todo or inflight:
            for i in sorted(live, key=lambda i: load[i]):       # the freest worker first
                while todo and load[i] < window:
                    e = todo.popleft()
                    inflight[actors[i].answer.remote(e)] = (e, i)
                    load[i] += 1
            if not actors:
                raise RuntimeError(f"every Ray worker died and no replacement is left: {start_error}")
            waiting = list(inflight) + list(ready)
            finished, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            for ref in finished:
                if ref in ready:                        # a worker came up (or failed to)
                    i = ready.pop(ref)
                    try:
                        ray.get(ref)
                        if i in actors:
                            live.add(i)
                            if t0 is None:
                                t0 = time.perf_counter()
                                bar.reset(total=total)
                    except (RayActorError, RayTaskError) as err:
                        start_error = err
                        lost(i)
                    continue
                e, i = inflight.pop(ref)
                load[i] -= 1
                try:
                    rec = ray.get(ref, timeout=60)
                except RayActorError:                   # the worker died: someone else does the record
                    todo.appendleft(e)
                    counts["resent"] += 1
                    lost(i)
                    continue
                except (RayTaskError, GetTimeoutError) as err:     # the request failed on that worker
                    attempts[e.key] += 1
                    if attempts[e.key] < max_attempts:
                        todo.appendleft(e)
                        counts["resent"] += 1
                        continue
                    e.error = f"line {e.line}: failed on {max_attempts} workers: {str(err).splitlines()[-1]}"
                    rec = error_record(e)
                if e.key in written:
                    continue
                out.write(rec)
                written.add(e.key)
                counts["errors" if "error" in rec else "results"] += 1
                n_tokens += rec.get("usage", {}).get("completion_tokens", 0)
                per_worker[f"w{i}"] += 1
                bar.update(1)
                rate = n_tokens / max(time.perf_counter() - (t0 or 0), 1e-9)
                bar.set_postfix_str(" ".join(f"{k}:{v}" for k, v in sorted(per_worker.items())) +
                                    f" | {rate:.0f} tok/s", refresh=False)
    finally:
        bar.close()
        for a in actors.values():              # Ctrl-C / error: what finished is on disk; the rest reruns
            ray.kill(a)
    dt = max(time.perf_counter() - (t0 or time.perf_counter()), 1e-9)
    counts.update(per_worker=dict(per_worker), records_per_s=len(written) / dt, tokens_per_s=n_tokens / dt)



def records_per_hour(workstations: int, decode_tok_s: float, prefill_tok_s: float, prompt_tokens: int,
                     completion_tokens: int) -> float:
    """Records per hour of a batch job on N workstations, one worker each: each workstation prefills a
    record's prompt and decodes its answer at its aggregate rates for the batch it runs (the plan's
    predicted_prefill_tok_s / predicted_decode_tok_s: `hybrid plan MODEL_DIR --batch B --hw hw.json`).
    Workers share nothing, so the cluster scales linearly until the driver's writing is the limit
    (thousands of records per second)."""
    seconds = prompt_tokens / prefill_tok_s + completion_tokens / decode_tok_s
    return workstations * 3600.0 / seconds


def plan_records_per_hour(config, hw, workstations: int, prompt_tokens: int, completion_tokens: int, *,
                          batch: int = 16, gpu_mem_bytes: int = 24 * 10**9, gpu_weights: str = "int8") -> dict:
    """records_per_hour from the memory plan's tok/s prediction for `batch` sequences per workstation."""
    from hybrid import plan
    p = plan.make_plan(config, gpu_mem_bytes=gpu_mem_bytes, ram_bytes=1 << 60, batch=batch, hw=hw,
                       context=prompt_tokens + completion_tokens, gpu_weights=gpu_weights,
                       prefill_tokens=prompt_tokens)
    return {"decode_tok_s": p.predicted_decode_tok_s, "prefill_tok_s": p.predicted_prefill_tok_s,
            "records_per_hour": records_per_hour(workstations, p.predicted_decode_tok_s, p.predicted_prefill_tok_s,
                                                 prompt_tokens, completion_tokens)}

def main(argv: list[str] | None = None) -> int:
    """python -m hybrid.apps.ray_batch: the same job as `hybrid batch --ray` (before the CLI flag existed)."""
    ap = argparse.ArgumentParser(prog="python -m hybrid.apps.ray_batch")
    ap.add_argument("model_dir")
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--address", default=None, help="Ray cluster (default: start a local one)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-cpus", type=float, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-context", type=int, default=None, help="default: each worker's plan")
    ap.add_argument("--expert-backend", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--local-cpus", type=int, default=None)
    ap.add_argument("--name", default=None)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        c = run_ray_batch(a.model_dir, a.input, a.output, address=a.address, workers=a.workers,
                          max_tokens=a.max_tokens, progress=not a.no_progress, num_cpus=a.worker_cpus, name=a.name,
                          local_cpus=a.local_cpus, max_batch=a.max_batch, max_context=a.max_context,
                          expert_backend=a.expert_backend, num_threads=a.threads)
    except ValueError as e:
        print(f"hybrid batch --ray: error: {e}", file=sys.stderr)
        return 2
    print(f"batch --ray: {c['results']} results, {c['errors']} error records, {c['skipped']} already done, "
          f"{c['resent']} sent again, {c['workers_lost']} workers lost; {c['records_per_s']:.2f} rec/s, "
          f"{c['tokens_per_s']:.1f} tok/s; per worker {c['per_worker']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
