"""Prometheus metrics of the server (prometheus_client, one registry per app), served at GET /metrics.

Counters: hybrid_requests_total{endpoint,status}, hybrid_prompt_tokens_total, hybrid_generation_tokens_total,
hybrid_aborted_requests_total, hybrid_request_errors_total (finish_reason "error"), hybrid_engine_steps_total.
Histograms: hybrid_time_to_first_token_seconds, hybrid_inter_token_latency_seconds,
hybrid_e2e_request_latency_seconds. Gauges, read when scraped: hybrid_running_sequences,
hybrid_waiting_sequences, hybrid_kv_cache_usage_ratio (used cache blocks / all), hybrid_cpu_expert_seconds_total
(CPU expert time summed over layers, when the model's overlap_stats are enabled), hybrid_model_ready.
The timing hooks (`RequestTimer`) run in the engine thread, one per request. Checked by
tests/test_server_api.py (parsed with prometheus_client's own text parser).
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20)
E2E_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560)


class _EngineCollector:
    """Gauges read from the engine (and model) at scrape time; `state()` returns the current objects."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        runner, llm = self.state()
        ready = GaugeMetricFamily("hybrid_model_ready", "1 once the model is loaded and serving")
        ready.add_metric([], 1.0 if runner is not None else 0.0)
        yield ready
        if runner is None:
            return
        engine = runner.engine
        running = GaugeMetricFamily("hybrid_running_sequences", "sequences in the running batch")
        running.add_metric([], float(len(getattr(engine, "running", []) or [])))
        yield running
        waiting = GaugeMetricFamily("hybrid_waiting_sequences", "sequences waiting to be scheduled")
        waiting.add_metric([], float(len(getattr(engine, "waiting", []) or [])))
        yield waiting
        usage = cache_usage(engine)
        if usage is not None:
            g = GaugeMetricFamily("hybrid_kv_cache_usage_ratio", "KV cache blocks (or slots) in use / all")
            g.add_metric([], usage)
            yield g
        es = dict(getattr(engine, "stats", None) or {})       # the paged cache's counters (hybrid/engine.py)
        for key, kind, doc in (("preemptions", CounterMetricFamily, "sequences preempted when the cache ran out"),
                               ("prefix_hit_tokens", CounterMetricFamily, "prompt tokens taken from the prefix cache"),
                               ("prefill_tokens", CounterMetricFamily, "prompt tokens prefilled"),
                               ("blocks_total", GaugeMetricFamily, "KV cache blocks in the pool"),
                               ("blocks_used", GaugeMetricFamily, "KV cache blocks held by running sequences"),
                               ("blocks_cached", GaugeMetricFamily, "KV cache blocks kept for prefix reuse")):
            if isinstance(es.get(key), (int, float)):
                m = kind(f"hybrid_{key}", doc)
                m.add_metric([], float(es[key]))
                yield m
        steps = CounterMetricFamily("hybrid_engine_steps", "engine steps (forwards) run")
        steps.add_metric([], float(runner.stats.get("steps", 0)))
        yield steps
        stats = getattr(getattr(llm, "model", None), "overlap_stats", None)
        if stats is not None and getattr(stats, "enabled", False):
            c = CounterMetricFamily("hybrid_cpu_expert_seconds", "CPU expert time summed over MoE layers")
            c.add_metric([], float(sum(stats.cpu.values())))
            yield c


def cache_usage(engine) -> float | None:
    pool = getattr(engine, "pool", None)
    if pool is not None and hasattr(pool, "used_count") and getattr(pool, "num_blocks", 0):
        return pool.used_count() / pool.num_blocks
    slots = getattr(engine, "slots", None)
    n = getattr(engine, "max_batch", 0)
    if slots is not None and n:
        free = getattr(slots, "free", None)
        if isinstance(free, (list, set, dict)):
            return 1.0 - len(free) / n
    return None


class Metrics:
    def __init__(self, state):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hybrid_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("hybrid_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("hybrid_generation_tokens", "generated tokens", registry=r)
        self.aborted = Counter("hybrid_aborted_requests", "requests aborted (client gone or shutdown)", registry=r)
        self.errors = Counter("hybrid_request_errors", "requests that failed inside the engine", registry=r)
        self.ttft = Histogram("hybrid_time_to_first_token_seconds", "time to first token", buckets=TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("hybrid_inter_token_latency_seconds", "time between generated tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("hybrid_e2e_request_latency_seconds", "request latency, added to finished",
                             buckets=E2E_BUCKETS, registry=r)
        r.register(_EngineCollector(state))

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """Per-request timing, fed with each delta in the engine thread."""

    def __init__(self, metrics: Metrics):
        self.m, self.t0 = metrics, time.perf_counter()
        self.last: float | None = None

    def delta(self, d) -> None:
        now = time.perf_counter()
        n = len(d.token_ids)
        if n:
            if self.last is None:
                self.m.ttft.observe(now - self.t0)
                n -= 1
            elif n:
                gap = (now - self.last) / n
                for _ in range(n):
                    self.m.itl.observe(gap)
            self.last = now
            self.m.generation_tokens.inc(len(d.token_ids))
        if d.finish_reason is not None:
            self.m.e2e.observe(now - self.t0)
            self.m.prompt_tokens.inc(len(d.prompt_token_ids))
            if d.finish_reason == "abort":
                self.m.aborted.inc()
            elif d.finish_reason == "error":
                self.m.errors.inc()
