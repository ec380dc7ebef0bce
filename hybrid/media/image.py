"""Image sources -> decoded Pillow images, with limits and clear errors.

Accepted sources: a PIL image; bytes; a data URL (`data:image/png;base64,...`); a local path (str or
Path, `file://` URLs too; relative paths against `base_dir`); an http(s) URL, fetched only when
`allow_remote` is on, within `max_bytes` and `timeout` seconds. Formats: PNG, JPEG, WebP, GIF (the
first frame); decoded files get their EXIF orientation applied (transformers' `load_image` does the same).
Every problem is a MediaError (a ValueError) whose message starts with `where` (e.g.
"messages[1].content[0]"), so the server can answer 400 naming the part. Checked by
tests/test_vision_media.py.
"""
from __future__ import annotations

import base64
import binascii
import io
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


class MediaError(ValueError):
    """A bad image (or media part); the message names where it came from."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


class VideoNotSupported(MediaError):
    pass


class TooManyImages(MediaError):
    pass


class NoVisionTower(MediaError):
    pass


@dataclass(frozen=True)
class ImageLimits:
    """Limits on what a request may send. Larger images than the patch budget are resized (as the
    reference processor does), not refused; these bound decoding work and memory."""
    max_bytes: int = 20 * 2**20           # encoded size (file, data URL payload, download)
    max_pixels: int = 64 * 2**20          # decoded width x height (Pillow's bomb guard is ~179 M)
    max_images: int = 16                  # per request
    allow_remote: bool = False            # fetch http(s) URLs
    timeout: float = 10.0                 # seconds for a whole download
    base_dir: str | None = None           # relative paths resolve here (batch files); None: the cwd
    allow_local: bool = True              # read local paths / file:// URLs (off in the server: a client
                                          # must not read the server's files)


def _decode(data: bytes, where: str, limits: ImageLimits):
    from PIL import Image, UnidentifiedImageError
    if len(data) > limits.max_bytes:
        raise MediaError(where, f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = img.size
        if w * h > limits.max_pixels:
            raise MediaError(where, f"image is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels}")
        img.seek(0)                     # GIF / animated WebP: the first frame
        img.load()
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(where, f"cannot decode the image ({e.__class__.__name__}: {e}); "
                                f"supported formats: {', '.join(FORMATS)}") from None
    if w < 1 or h < 1:
        raise MediaError(where, f"image has no pixels ({w}x{h})")
    from PIL import ImageOps
    return ImageOps.exif_transpose(img)     # camera orientation applied, as transformers' load_image does


def _data_url(url: str, where: str, limits: ImageLimits) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep:
        raise MediaError(where, "malformed data URL (no ',')")
    if not head.startswith("data:image/"):
        raise MediaError(where, f"data URL media type {head[5:].split(';')[0]!r} is not an image")
    if len(payload) > limits.max_bytes * 4 // 3 + 4:
        raise MediaError(where, f"data URL payload is {len(payload)} characters; the image limit is "
                                f"{limits.max_bytes} bytes")
    if head.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(where, f"data URL is not valid base64 ({e})") from None
    return urllib.parse.unquote_to_bytes(payload)


def _fetch(url: str, where: str, limits: ImageLimits) -> bytes:
    if not limits.allow_remote:
        raise MediaError(where, "remote image URLs are turned off here; send the image as a data URL "
                                "(or enable remote fetching)")
    deadline = time.monotonic() + limits.timeout
    req = urllib.request.Request(url, headers={"User-Agent": "hybrid-image-fetch"})
    try:
        with urllib.request.urlopen(req, timeout=limits.timeout) as r:
            n = r.headers.get("Content-Length")
            if n is not None and n.isdigit() and int(n) > limits.max_bytes:
                raise MediaError(where, f"{url}: {n} bytes; the limit is {limits.max_bytes}")
            chunks, got = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise MediaError(where, f"{url}: download took longer than {limits.timeout:g} s")
                chunk = r.read(65536)
                if not chunk:
                    break
                got += len(chunk)
                if got > limits.max_bytes:
                    raise MediaError(where, f"{url}: more than {limits.max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except MediaError:
        raise
    except Exception as e:   # URLError, HTTPError, timeouts, bad URLs
        raise MediaError(where, f"cannot fetch {url}: {e}") from None


def load_image(source, where: str = "image", limits: ImageLimits | None = None):
    """A decoded PIL image from any accepted source (see the module docstring)."""
    limits = limits or ImageLimits()
    try:
        from PIL import Image
    except ImportError:
        raise MediaError(where, "images need Pillow (pip install 'pillow>=10')") from None
    if isinstance(source, Image.Image):
        w, h = source.size
        if w * h > limits.max_pixels:
            raise MediaError(where, f"image is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels}")
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), where, limits)
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str) or not source:
        raise MediaError(where, f"an image must be a data URL, a path, an http(s) URL, bytes or a PIL image; "
                                f"got {type(source).__name__}")
    low = source[:16].lower()
    if low.startswith("data:"):
        return _decode(_data_url(source, where, limits), where, limits)
    if low.startswith(("http://", "https://")):
        return _decode(_fetch(source, where, limits), where, limits)
    if not limits.allow_local:
        raise MediaError(where, "only data: URLs" + (" and http(s) URLs" if limits.allow_remote else "")
                                + " are accepted here, not local file paths")
    path = Path(urllib.parse.unquote(source[7:])) if low.startswith("file://") else Path(source)
    if not path.is_absolute() and limits.base_dir:
        path = Path(limits.base_dir) / path
    if not path.is_file():
        raise MediaError(where, f"image file {str(path)[:200]!r} not found")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise MediaError(where, f"image file is {size} bytes; the limit is {limits.max_bytes}")
    return _decode(path.read_bytes(), where, limits)
