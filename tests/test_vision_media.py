"""Image input before the model: preprocessing equal to transformers' Kimi-K2.5 image processor, decoding, limits
and errors.
- pixel values and grids of hybrid/media/preprocess.py equal (exactly) a plain restatement of
  Kimi_K25ImageProcessor's steps (tests/vision_reference.py; the processor itself imports torchvision, which
  has no wheel for this torch build) on small, wide, tall, over-the-patch-budget and over-the-side-limit
  images, RGBA / grayscale / palette modes;
- PNG, JPEG, WebP and GIF (first frame) decode from bytes, data URLs, paths and http(s) (a local server);
- errors are ValueErrors naming messages[i].content[j]: undecodable, bad data URL, too many bytes / pixels /
  images, remote fetching off, video parts, images to a text-only checkpoint, prompt ids without media.
"""
import base64
import http.server
import io
import threading

import numpy as np
import pytest
import torch

from vision_reference import reference_navit_resize, reference_pixels
from hybrid.media import (ImageLimits, MediaError, NoVisionTower, TooManyImages, VideoNotSupported, load_image,
                          navit_resize, preprocess, split_media, tokens_for_size)
from hybrid.media.prompt import expand_placeholders

# (W, H): small, odd, wide, tall, over the 16384-patch budget, over the 512-patch side limit, both
SIZES = [(10, 7), (57, 29), (900, 120), (130, 777), (2000, 1900), (7300, 140), (150, 7400), (1, 1)]


def _image(w, h, mode="RGB", seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA" if mode == "RGBA" else "RGB")
    return img if mode in ("RGB", "RGBA") else img.convert(mode)


def _bytes(img, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("w,h", SIZES)
def test_resize_rule_matches_reference(w, h):
    assert navit_resize(h, w) == reference_navit_resize(h, w)


@pytest.mark.parametrize("w,h", SIZES[:6])
def test_pixels_match_reference(w, h):
    img = _image(w, h, seed=w * 7 + h)
    ours = preprocess(img)
    ref, grid = reference_pixels(img)
    assert ours.grid == grid and ours.n_tokens == grid[0] * grid[1] // 4 == tokens_for_size(h, w)
    assert torch.equal(ours.pixel_values, ref)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_modes_match_reference(mode):
    img = _image(45, 33, mode, seed=3)
    assert torch.equal(preprocess(img).pixel_values, reference_pixels(img)[0])


def test_budget_and_side_limits():
    gh, gw = preprocess(_image(2000, 1900)).grid
    assert gh * gw <= 16384 + 2 * (gh + gw)          # scaled to the budget (then padded up to even grids)
    assert max(preprocess(_image(7300, 140)).grid) <= 512 + 1


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_formats_and_sources(fmt, tmp_path):
    img = _image(31, 17, seed=5)
    data = _bytes(img, fmt)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    url = f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode()
    decoded = [load_image(s) for s in (data, url, str(path), path, f"file://{path}")]
    for d in decoded:
        assert d.size == (31, 17)
        assert np.array_equal(np.array(d.convert("RGB")), np.array(decoded[0].convert("RGB")))
    if fmt == "PNG":                                   # lossless: the very pixels
        assert np.array_equal(np.array(decoded[0].convert("RGB")), np.array(img))
    rel = load_image("x." + fmt.lower(), limits=ImageLimits(base_dir=str(tmp_path)))
    assert rel.size == (31, 17)


def test_gif_first_frame():
    from PIL import Image
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = load_image(buf.getvalue())
    assert img.convert("RGB").getpixel((3, 3)) == (255, 0, 0)


@pytest.fixture
def http_server():
    payload = {"/a.png": _bytes(_image(20, 20), "PNG")}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = payload.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_remote_fetch(http_server):
    url = http_server + "/a.png"
    with pytest.raises(MediaError, match="remote image URLs are turned off"):
        load_image(url, "messages[0].content[1]")
    assert load_image(url, limits=ImageLimits(allow_remote=True)).size == (20, 20)
    with pytest.raises(MediaError, match="limit is 100"):
        load_image(url, limits=ImageLimits(allow_remote=True, max_bytes=100))
    with pytest.raises(MediaError, match="cannot fetch"):
        load_image(http_server + "/missing.png", limits=ImageLimits(allow_remote=True))


@pytest.mark.parametrize("source,match", [
    (b"not an image at all", "cannot decode"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:text/plain;base64,aGk=", "not an image"),
    ("/no/such/file.png", "not found"),
    (12345, "must be a data URL"),
])
def test_bad_sources(source, match):
    with pytest.raises(MediaError, match=match) as e:
        load_image(source, "messages[2].content[0]")
    assert str(e.value).startswith("messages[2].content[0]: ") and isinstance(e.value, ValueError)


def test_size_limits():
    data = _bytes(_image(64, 64), "PNG")
    with pytest.raises(MediaError, match="bytes; the limit is 1000"):
        load_image(data, limits=ImageLimits(max_bytes=1000))
    with pytest.raises(MediaError, match="pixels; the limit is 1000"):
        load_image(data, limits=ImageLimits(max_pixels=1000))


def test_parts_split_and_video_refused():
    msgs = [{"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "U"}},
                                         {"type": "image", "image": b"B"}]}]
    stub, sources = split_media(msgs)
    assert sources == [("messages[1].content[1]", "U"), ("messages[1].content[2]", b"B")]
    assert msgs[1]["content"][1]["image_url"]["url"] == "U"        # the caller's list is untouched
    with pytest.raises(VideoNotSupported, match=r"messages\[0\].content\[0\]: video input is not supported yet"):
        split_media([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v.mp4"}}]}])


def test_expand_placeholders():
    ids, starts = expand_placeholders([1, 9, 2, 9, 3], 9, [2, 3])
    assert ids == [1, 9, 9, 2, 9, 9, 9, 3] and starts == [1, 4]
    with pytest.raises(MediaError, match="1 <|media_pad|>"):
        expand_placeholders([1, 9, 2], 9, [2, 3])


def _msg(*parts):
    return [{"role": "user", "content": [{"type": "text", "text": "look"}, *parts]}]


def test_model_level_errors(tiny_dir, checkpoint_dir):
    from hybrid import LLM
    img = {"type": "image", "image": _image(28, 28)}
    text_only = LLM(checkpoint_dir("bf16"), device="cpu", progress=False)
    assert text_only.images is None
    with pytest.raises(NoVisionTower, match=r"messages\[0\].content\[1\]: .*no vision tower"):
        text_only.chat_inputs(_msg(img))
    with pytest.raises(NoVisionTower):
        text_only.score([1, 2], images=[_image(28, 28)])
    llm = LLM(tiny_dir, device="cpu", progress=False, image_limits=ImageLimits(max_images=2))
    with pytest.raises(TooManyImages, match="3 images in one request; the limit is 2"):
        llm.chat_inputs(_msg(img, img, img))
    with pytest.raises(MediaError, match=r"messages\[0\].content\[2\]: cannot decode"):
        llm.chat_inputs(_msg(img, {"type": "image", "image": b"junk"}))
    with pytest.raises(MediaError, match="needs LLM.chat_inputs"):
        llm.chat_prompt_ids(_msg(img))
    with pytest.raises(MediaError, match="placeholder"):
        llm.score([1, 2, 3], images=[_image(28, 28)])
