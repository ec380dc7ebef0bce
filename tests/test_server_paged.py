"""`hybrid serve --max-batch 64` over a KV cache pool far smaller than 64 full contexts (issue 15): 64
concurrent streams, each needing more blocks than its fair share of the pool, all finish with their full
answers; the engine preempts (counted in /metrics and /health) instead of failing any request; and the
prefix cache reports hits in `usage.prompt_tokens_details.cached_tokens` for a repeated prompt.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import hybrid
from hybrid.apps.server import create_app
from test_server import _Server

STREAMS = 64
MAX_CONTEXT = 256
CACHE_TOKENS = 4 * MAX_CONTEXT        # room for 4 full contexts, not 64
MAX_TOKENS = 48
BLOCK = 16


@pytest.fixture(scope="module")
def server(tiny_dir):
    llm = hybrid.LLM(tiny_dir, progress=False, max_context=MAX_CONTEXT, max_batch=STREAMS, cache_tokens=CACHE_TOKENS,
                     block_size=BLOCK)
    s = _Server(create_app(llm, "tiny"))
    yield s
    s.stop()


def _stream(url: str, i: int) -> tuple[int, str | None]:
    """(completion tokens, finish reason) of one streamed request."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    n, reason = 0, None
    for chunk in client.completions.create(model="tiny", prompt=f"story number {i}: " + "once upon a time " * 8,
                                           max_tokens=MAX_TOKENS, temperature=0.7, seed=i, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if chunk.choices:
            reason = chunk.choices[0].finish_reason or reason
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    return n, reason


def _metric(url: str, name: str) -> float:
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name in (name, name + "_total"):
                return s.value
    raise AssertionError(f"{name} not in /metrics")


def test_64_streams_over_a_small_pool_all_finish_with_preemption(server):
    with ThreadPoolExecutor(STREAMS) as pool:
        results = list(pool.map(lambda i: _stream(server.url, i), range(STREAMS)))
    assert all(reason == "length" and n == MAX_TOKENS for n, reason in results), results
    preempted = _metric(server.url, "hybrid_preemptions")
    assert preempted > 0, "64 sequences of ~90 tokens over 1,024 tokens of cache must preempt"
    assert httpx.get(server.url + "/health").json()["preemptions"] == preempted
    assert _metric(server.url, "hybrid_blocks_total") == CACHE_TOKENS // BLOCK


def test_repeated_prompt_reports_cached_tokens(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    prompt = "a long shared system prompt " * 12
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= BLOCK
