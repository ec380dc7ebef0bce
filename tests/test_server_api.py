"""API completeness of the server on the tiny checkpoint (default expert backend):
- logprobs / top_logprobs (chat and completions) equal log_softmax of `llm.score` logits for the same tokens;
- `n` choices (distinct with a seed, a stated limit), `reasoning` beside `reasoning_content`, `developer` role;
- GET /v1/models/{id}, 404 for an unknown model, no absolute path in /v1/models; /tokenize and /detokenize;
- Prometheus /metrics parsed by prometheus_client's own parser, counters moving with traffic;
- the sampling defaults rule (request > generation_config.json > model card per mode);
- API key: `bearer` in any case, HYBRID_API_KEY; GET / serves the chat page;
- the port answers before the model is loaded: /health 503 "loading", then 200; an image part reaches the engine.
"""
from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import hybrid
from hybrid.apps import openai_protocol as protocol
from hybrid.apps.server import CHAT_PAGE, create_app
from test_server import _Server

TOL_LOGPROB = 2e-2   # cached batched decode vs one full forward (fp32; int8 activations per row)
USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def llm(tiny_dir):                 # the session's tiny checkpoint (tests/conftest.py); read only
    return hybrid.LLM(tiny_dir, progress=False, max_context=512, max_batch=8)


@pytest.fixture(scope="module")
def server(llm):
    s = _Server(create_app(llm, "tiny"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _reference(llm, prompt: list[int], out: list[int]) -> torch.Tensor:
    """log_softmax of the score logits predicting each generated token [len(out), V]."""
    logits = llm.score(prompt + out)[len(prompt) - 1:len(prompt) - 1 + len(out)]
    return torch.log_softmax(logits.float(), dim=-1)


def test_completion_logprobs_match_score(client, llm):
    prompt = llm.tokenizer.encode("Once upon a time")
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == 5 and len(lp.top_logprobs) == 5
    out = []                                   # the greedy reference, one llm.score forward per token
    for _ in range(5):
        out.append(int(llm.score(prompt + out)[-1].argmax()))
    ref = _reference(llm, prompt, out)
    for k, tid in enumerate(out):
        assert lp.tokens[k] == llm.tokenizer.id_to_token(tid).decode("utf-8", "replace")
        assert abs(lp.token_logprobs[k] - float(ref[k, tid])) < TOL_LOGPROB
        want = sorted(ref[k].topk(3).values.tolist(), reverse=True)
        got = sorted(lp.top_logprobs[k].values(), reverse=True)
        assert len(got) <= 3 and all(abs(g - w) < TOL_LOGPROB for g, w in zip(got, want))


def test_chat_logprobs_n_and_reasoning(client, llm):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    prompt = llm.chat_prompt_ids(USER)
    out = [llm.tokenizer.special_tokens[c.token] if c.token in llm.tokenizer.special_tokens
           else llm.tokenizer.token_to_id(bytes(c.bytes)) for c in content]
    ref = _reference(llm, prompt, out)
    for k, c in enumerate(content):
        assert abs(c.logprob - float(ref[k, out[k]])) < TOL_LOGPROB
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
    msg = r.choices[0].message.model_extra
    assert msg["reasoning"] == msg["reasoning_content"]
    many = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, n=3, seed=1,
                                          extra_body={"ignore_eos": True})
    assert [c.index for c in many.choices] == [0, 1, 2] and many.usage.completion_tokens == 18
    texts = [c.message.model_extra["reasoning_content"] for c in many.choices]
    assert len(set(texts)) > 1                                 # seed + i per choice: not copies
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=USER, n=protocol.MAX_N + 1)
    dev = client.chat.completions.create(model="tiny", max_tokens=2, messages=[
        {"role": "developer", "content": "Be brief."}, *USER])
    assert dev.usage.prompt_tokens == len(llm.chat_prompt_ids([{"role": "system", "content": "Be brief."}, *USER]))


def test_models_tokenize_detokenize(client, server, llm):
    listed = httpx.get(server.url + "/v1/models").json()
    assert str(llm.model_dir) not in json.dumps(listed)
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=USER)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        t = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()
        assert t["tokens"] == llm.tokenizer.encode("Once upon a time") and t["count"] == len(t["tokens"])
        c = http.post("/tokenize", json={"messages": USER}).json()
        assert c["tokens"] == llm.chat_prompt_ids(USER)
        assert http.post("/detokenize", json={"tokens": t["tokens"]}).json()["prompt"] == "Once upon a time"
        assert http.post("/detokenize", json={"tokens": [10 ** 9]}).status_code == 400


def test_metrics_parse_and_count(client, server):
    client.completions.create(model="tiny", prompt="Hi", max_tokens=3, extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("hybrid_requests", "hybrid_prompt_tokens", "hybrid_generation_tokens",
                 "hybrid_time_to_first_token_seconds", "hybrid_inter_token_latency_seconds",
                 "hybrid_running_sequences", "hybrid_waiting_sequences", "hybrid_aborted_requests",
                 "hybrid_model_ready"):
        assert name in fams, name
    ok = [s.value for s in fams["hybrid_requests"].samples
          if s.name == "hybrid_requests_total" and s.labels == {"endpoint": "completions", "status": "200"}]
    assert ok and ok[0] >= 1
    gen = [s.value for s in fams["hybrid_generation_tokens"].samples if s.name.endswith("_total")]
    assert gen[0] >= 3
    ttft = [s.value for s in fams["hybrid_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft[0] >= 1


def test_sampling_defaults_rule(tmp_path):
    thinking = protocol.sampling_params({}, {}, thinking=True)
    instant = protocol.sampling_params({}, {}, thinking=False)
    assert (thinking.temperature, thinking.top_p) == (1.0, 0.95) and (instant.temperature, instant.top_p) == (0.6, 0.95)
    ckpt = protocol.sampling_params({}, {"temperature": 0.3}, thinking=True)
    assert (ckpt.temperature, ckpt.top_p) == (0.3, 0.95)                     # generation_config.json wins
    assert protocol.sampling_params({"temperature": 0.9}, {"temperature": 0.3}, thinking=False).temperature == 0.9
    assert protocol.sampling_params({"temperature": 1e-300}).temperature == 0.0     # tiny = greedy (vLLM)
    plain = protocol.sampling_params({})
    assert plain.temperature == hybrid.SamplingParams().temperature          # completions: no mode default


def test_api_key_case_and_env(llm, monkeypatch):
    monkeypatch.setenv("HYBRID_API_KEY", "from-env")
    s = _Server(create_app(llm, "tiny"))
    try:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert httpx.get(s.url + "/v1/models", headers={"Authorization": f"{scheme} from-env"}).status_code == 200
        assert httpx.post(s.url + "/tokenize", json={"prompt": "x"}).status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200
        page = httpx.get(s.url + "/")
        if CHAT_PAGE.is_file():
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        else:
            assert page.status_code == 404 and "chat page" in page.json()["error"]["message"]
    finally:
        s.stop()


def test_port_answers_while_loading(llm):
    gate = threading.Event()
    progress = []

    def loader(report):
        report(0.5, "reading weights")
        progress.append(1)
        gate.wait(30)
        return llm
    s = _Server(create_app(None, "tiny", loader=loader))
    try:
        h = httpx.get(s.url + "/health", timeout=5)
        assert h.status_code == 503 and h.json()["status"] == "loading"
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": USER}, timeout=5)
        assert r.status_code == 503 and r.headers["retry-after"]
        gate.set()
        for _ in range(200):
            h = httpx.get(s.url + "/health", timeout=5)
            if h.status_code == 200:
                break
            threading.Event().wait(0.05)
        assert h.status_code == 200 and h.json()["status"] == "ok"
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                          timeout=30).status_code == 200
    finally:
        s.stop()


def test_image_part_reaches_the_engine(client, llm):
    """An image part (data URL) goes through llm.chat_inputs: its placeholder rows count as prompt tokens."""
    import base64
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (40, 24), (200, 30, 30)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    text = [{"role": "user", "content": "what is this?"}]
    with_image = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                               {"type": "image_url", "image_url": {"url": url}}]}]
    plain = client.chat.completions.create(model="tiny", messages=text, max_tokens=2)
    seen = client.chat.completions.create(model="tiny", messages=with_image, max_tokens=2)
    assert seen.choices[0].finish_reason in ("length", "stop")
    assert seen.usage.prompt_tokens > plain.usage.prompt_tokens
    assert seen.usage.prompt_tokens == len(llm.chat_inputs(with_image)[0])
