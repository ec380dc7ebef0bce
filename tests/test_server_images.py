"""Images through `hybrid serve`, driven by the official openai client (issue 12): two different images in
the same prompt give different first-token logprobs; an image request sent among concurrent text requests
leaves their answers unchanged; a local file path, a video part and an undecodable image each get a 400
naming the message and part (a client never reads the server's files). Also the template sandbox's bound
(hybrid/text/chat_template.py): a template that multiplies a string by 10**10 fails at once.
"""
from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

import hybrid
from hybrid.apps.server import create_app
from test_server import _Server

MAX_CONTEXT = 512
TEXTS = ["Once upon a time", "The weather today", "Numbers: one two"]
TEMPLATE_BOMB_S = 5.0        # generous: the bounded sandbox refuses before allocating anything


def _data_url(seed: int, w: int = 36, h: int = 30) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_msg(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def server(tiny_dir):
    llm = hybrid.LLM(tiny_dir, progress=False, max_context=MAX_CONTEXT, max_batch=8, expert_backend="torch")
    assert llm.images is not None
    s = _Server(create_app(llm, "tiny"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _first_token_logprobs(client, url: str) -> dict:
    r = client.chat.completions.create(model="tiny", messages=_image_msg(url), max_tokens=1, temperature=0,
                                       logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True})
    top = r.choices[0].logprobs.content[0].top_logprobs
    return {t.token: t.logprob for t in top}


def test_two_images_give_different_first_token_logprobs(client):
    a, b = _first_token_logprobs(client, _data_url(1)), _first_token_logprobs(client, _data_url(2))
    a_again = _first_token_logprobs(client, _data_url(1))
    assert a == pytest.approx(a_again, abs=1e-4)          # the same image: the same answer
    shared = set(a) & set(b)
    assert set(a) != set(b) or any(abs(a[t] - b[t]) > 1e-3 for t in shared)


def _text_answer(client, text: str) -> str:
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], max_tokens=6,
                                       temperature=0, extra_body={"ignore_eos": True,
                                                                  "chat_template_kwargs": {"thinking": False}})
    return r.choices[0].message.content


def test_image_request_among_text_requests_leaves_them_unchanged(client):
    alone = [_text_answer(client, t) for t in TEXTS]
    with ThreadPoolExecutor(4) as pool:
        img = pool.submit(lambda: client.chat.completions.create(
            model="tiny", messages=_image_msg(_data_url(3)), max_tokens=6, temperature=0,
            extra_body={"ignore_eos": True}))
        texts = [pool.submit(_text_answer, client, t) for t in TEXTS]
        together = [f.result() for f in texts]
        assert img.result().usage.completion_tokens == 6
    assert together == alone


@pytest.mark.parametrize("content, where", [
    ([{"type": "image_url", "image_url": {"url": "/etc/hostname"}}], "messages[0].content[0]"),
    ([{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}],
     "messages[0].content[1]"),
    ([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}], "messages[0].content[0]"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}], "messages[0].content[0]"),
])
def test_bad_image_parts_are_400_naming_the_part(server, content, where):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2})
    assert r.status_code == 400, r.text
    assert where in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_template_that_multiplies_a_string_is_refused_at_once():
    from hybrid.text.chat_template import render_chat
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="chat template failed"):
        render_chat("{{ 'a' * 10**10 }}", [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="chat template failed"):
        render_chat("{{ [1, 2] * 10**9 }}", [{"role": "user", "content": "hi"}])
    assert time.perf_counter() - t0 < TEMPLATE_BOMB_S
