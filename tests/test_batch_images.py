"""`hybrid batch` with images in chat records: OpenAI `image_url` parts with a data URL, and image paths
relative to the input file, are answered; an undecodable image, a `video_url` part and an image sent to a
text-only checkpoint each give an error record naming the message and part, while the other lines of the
job are answered; and a text line answered next to image lines gets the same tokens as when it runs alone
(exact torch expert backend, greedy).
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

import hybrid
from hybrid.apps.batch import run_batch

MAX_CONTEXT = 512
MAX_TOKENS = 4


def _png(w: int, h: int, seed: int) -> bytes:
    import numpy as np
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _chat(rid, content) -> str:
    return json.dumps({"id": rid, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
                       "temperature": 0, "ignore_eos": True})


TEXT_LINE = ("text", "describe nothing in particular")


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return hybrid.LLM(tiny_dir, progress=False, max_context=MAX_CONTEXT, max_batch=4, expert_backend="torch")


def _records(path: Path) -> dict:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_image_records_answered_and_bad_ones_fail_alone(llm, tmp_path):
    assert llm.images is not None, "the tiny k2.6 checkpoint ships a vision tower"
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "cat.png").write_bytes(_png(40, 28, 1))
    lines = [
        _chat(*TEXT_LINE),
        _chat("data-url", [{"type": "image_url", "image_url": {"url": _data_url(_png(30, 50, 2))}},
                           {"type": "text", "text": "what is this?"}]),
        _chat("relative-path", [{"type": "text", "text": "and this?"},
                                {"type": "image_url", "image_url": {"url": "pics/cat.png"}}]),
        _chat("broken", [{"type": "text", "text": "x"},
                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]),
        _chat("video", [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]),
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    counts = run_batch(llm, inp, out, progress=False)
    recs = _records(out)
    assert set(recs) == {"text", "data-url", "relative-path", "broken", "video"}
    assert counts["results"] == 3 and counts["errors"] == 2
    for rid in ("text", "data-url", "relative-path"):
        assert "error" not in recs[rid], recs[rid]
        assert recs[rid]["usage"]["completion_tokens"] == MAX_TOKENS
    # the image lines' prompts hold the expanded placeholders: longer than the text of the question alone
    assert recs["data-url"]["usage"]["prompt_tokens"] > recs["text"]["usage"]["prompt_tokens"]
    assert "messages[0].content[1]" in recs["broken"]["error"]
    assert "messages[0].content[0]" in recs["video"]["error"] and "video" in recs["video"]["error"].lower()

    # the text line, alone, gives the same answer as next to the image lines
    alone_in, alone_out = tmp_path / "alone.jsonl", tmp_path / "alone_out.jsonl"
    alone_in.write_text(_chat(*TEXT_LINE) + "\n")
    run_batch(llm, alone_in, alone_out, progress=False)
    assert _records(alone_out)["text"]["message"] == recs["text"]["message"]


def test_image_to_text_only_checkpoint_is_an_error_record(checkpoint_dir, tmp_path):
    llm = hybrid.LLM(checkpoint_dir("deepseek-v3-fp8"), progress=False, max_context=MAX_CONTEXT, max_batch=2,
                     expert_backend="torch")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(_chat("img", [{"type": "image_url", "image_url": {"url": _data_url(_png(20, 20, 3))}},
                                 {"type": "text", "text": "hi"}]) + "\n" + _chat(*TEXT_LINE) + "\n")
    counts = run_batch(llm, inp, out, progress=False)
    recs = _records(out)
    assert counts == {**counts, "results": 1, "errors": 1}
    assert "messages[0].content[0]" in recs["img"]["error"]
    assert "error" not in recs["text"]
