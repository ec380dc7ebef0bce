"""`hybrid serve --ray --replicas 2` (hybrid/apps/ray_serve.py) on a local Ray cluster started here (2 CPUs,
two replicas of the tiny checkpoint on one node), driven by the official `openai` client: requests are
spread over both replicas (counted by the x-hybrid-replica header), every turn of a conversation goes to
the replica that holds its start, streaming works, and a replica SIGKILLed mid-stream fails only its own
stream while the other stream finishes and the endpoint keeps answering. The affinity key is checked
without Ray. Skipped, with the reason, where Ray is not installed.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from hybrid.apps.ray_serve import REPLICA_HEADER, affinity_key

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")     # Ray Serve's own pydantic fields
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason='ray is not installed (pip install -e ".[ray]")')
LLM_KW = dict(max_batch=4, max_context=1024, num_threads=1, accel_threads=1)
N_SPREAD = 12                  # concurrent requests; the least loaded replica takes each
LONG_TOKENS = 900              # a stream long enough to be killed in the middle (seconds on the tiny model)
CLIENT_TIMEOUT_S = 300


def _msgs(first: str, turns: int = 0) -> list[dict]:
    m = [{"role": "system", "content": "be brief"}, {"role": "user", "content": first}]
    for t in range(turns):
        m += [{"role": "assistant", "content": f"answer {t}"}, {"role": "user", "content": f"follow-up {t}"}]
    return m


def test_affinity_key_is_the_conversation_start():
    import json
    def key(body):
        return affinity_key("/v1/chat/completions", json.dumps(body).encode())
    assert key({"messages": _msgs("a")}) == key({"messages": _msgs("a", turns=3), "max_tokens": 5})
    assert key({"messages": _msgs("a")}) != key({"messages": _msgs("b")})
    assert key({"messages": _msgs("a")}) != key({"messages": _msgs("a"), "tools": [{"type": "function"}]})
    assert key({"prompt": "x" * 600 + "1"}) == key({"prompt": "x" * 600 + "2"})      # a long shared start
    assert affinity_key("/v1/chat/completions", b"{broken") is None
    assert key({"prompt": None}) is None


@pytest.fixture(scope="module")
def endpoint(tiny_dir):
    import ray
    from ray import serve
    from hybrid.apps.ray_serve import start
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        yield start(tiny_dir, port=port, replicas=2, one_per_node=False, **LLM_KW)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def client(endpoint):
    import openai
    return openai.OpenAI(base_url=endpoint, api_key="unused", timeout=CLIENT_TIMEOUT_S, max_retries=0)


@needs_ray
def test_requests_spread_over_both_replicas_and_conversations_stick(endpoint, client):
    name = client.models.list().data[0].id

    def ask(first, turns=0):
        raw = client.chat.completions.with_raw_response.create(model=name, messages=_msgs(first, turns),
                                                               max_tokens=16, extra_body={"ignore_eos": True})
        out = raw.parse()
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 16
        return raw.headers[REPLICA_HEADER]

    with ThreadPoolExecutor(N_SPREAD) as pool:
        served = Counter(pool.map(ask, [f"question {i}" for i in range(N_SPREAD)]))
    assert len(served) == 2 and min(served.values()) >= 2, served             # both replicas took requests
    owner = ask("a long conversation")
    assert [ask("a long conversation", turns=t) for t in range(1, 5)] == [owner] * 4   # affinity


@needs_ray
def test_streaming(client):
    name = client.models.list().data[0].id
    stream = client.chat.completions.create(model=name, messages=_msgs("stream please"), max_tokens=20,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20
    assert len([c for c in chunks if c.choices]) > 3                 # it came in pieces


@needs_ray
def test_a_replica_killed_mid_stream_fails_only_its_own_requests(client):
    import openai
    name = client.models.list().data[0].id
    owners = {}                                     # replica -> a conversation start that it owns
    for i in range(40):
        raw = client.chat.completions.with_raw_response.create(model=name, messages=_msgs(f"kill test {i}"),
                                                               max_tokens=1)
        owners.setdefault(raw.headers[REPLICA_HEADER], f"kill test {i}")
        if len(owners) == 2:
            break
    assert len(owners) == 2, owners
    (victim, v_first), (survivor, s_first) = sorted(owners.items())

    def open_stream(first):
        return client.chat.completions.with_streaming_response.create(
            model=name, messages=_msgs(first, turns=1), max_tokens=LONG_TOKENS, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})

    with open_stream(v_first) as v_resp, open_stream(s_first) as s_resp:
        assert v_resp.headers[REPLICA_HEADER] == victim and s_resp.headers[REPLICA_HEADER] == survivor
        v_chunks, s_chunks = iter(v_resp.parse()), iter(s_resp.parse())
        next(v_chunks)
        next(s_chunks)
        os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)         # HOST:PID
        got, failed = 0, None
        try:
            for c in v_chunks:
                got += 1
                assert not (c.choices and c.choices[0].finish_reason), "the killed replica's stream finished"
        except openai.APIError as e:
            failed = e
        assert failed is not None and "replica" in str(failed.message), failed
        rest = list(s_chunks)                                          # the other stream is untouched
        assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
        assert rest[-1].usage.completion_tokens == LONG_TOKENS                  # all of it
    for i in range(4):                                                 # the endpoint keeps answering
        raw = client.chat.completions.with_raw_response.create(model=name, messages=_msgs(f"after {i}"),
                                                               max_tokens=4)
        assert raw.parse().choices[0].finish_reason in ("length", "stop")
