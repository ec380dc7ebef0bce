"""HTTP-level protection of the server (hybrid/apps/server.py), before any request reaches the engine:

- `ApiKey`: 401 without `Authorization: Bearer KEY` on /v1/*, /tokenize, /detokenize (the scheme is
  case-insensitive, the key compared in constant time); the key may come from HYBRID_API_KEY.
- `read_json(request, limit)`: 413 past `limit` bytes (Content-Length checked before reading, the
  stream counted while reading); nesting deeper than MAX_JSON_DEPTH is refused before json.loads
  (which would raise RecursionError); the parse runs where the caller runs it (off the event loop).
- `error_response`: the OpenAI error body.
Checked by tests/test_server_robust.py.
"""
from __future__ import annotations

import hmac
import json
import os

import numpy as np
from fastapi.responses import JSONResponse

from hybrid.apps.openai_protocol import FieldError

API_KEY_ENV = "HYBRID_API_KEY"
DEFAULT_MAX_BODY_BYTES = 16 * 2 ** 20
MAX_JSON_DEPTH = 64
MEDIA_PARTS = ("image_url", "input_image", "image", "video_url", "video")
PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize")


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body is larger than the server's limit of {limit} bytes")


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def api_key_from_env(api_key: str | None) -> str | None:
    return api_key or os.environ.get(API_KEY_ENV) or None


class ApiKey:
    """Plain ASGI (not BaseHTTPMiddleware, which would hide client disconnects from the handlers)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES):
            got = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = got.strip().partition(b" ")
            ok = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)
            if not ok:
                resp = error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                      kind="authentication_error", code="invalid_api_key")
                return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


async def read_raw(request, limit: int) -> bytes:
    """The body, or BodyTooLarge as soon as it is known to exceed `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


_STRINGS = None


def json_depth(raw: bytes) -> int:
    """Deepest [ / { nesting of a JSON text, strings skipped (vectorized: fine for 16 MB)."""
    global _STRINGS
    if _STRINGS is None:
        import re
        _STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
    if b"[" not in raw and b"{" not in raw:
        return 0
    a = np.frombuffer(_STRINGS.sub(b'""', raw), np.uint8)
    step = (a == ord("[")).astype(np.int32) + (a == ord("{")) - (a == ord("]")) - (a == ord("}"))
    return int(np.cumsum(step).max(initial=0))


def parse_json(raw: bytes) -> dict:
    """The request object; FieldError (400) for bad JSON, too-deep nesting or a non-object."""
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise FieldError(None, f"request JSON nests {depth} levels deep; the limit is {MAX_JSON_DEPTH}")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise FieldError(None, f"request JSON nests too deep (limit {MAX_JSON_DEPTH})") from None
    except ValueError as e:           # also bad UTF-8
        raise FieldError(None, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise FieldError(None, "request body must be a JSON object")
    return body


def text_bytes(obj, limit: int) -> int:
    """UTF-8 bytes of all strings inside obj, counting stops once past `limit` (cheap early 400s).
    Image / media parts are not text and are not counted (hybrid/media checks them)."""
    total, stack = 0, [obj]
    while stack and total <= limit:
        x = stack.pop()
        if isinstance(x, str):
            total += len(x.encode("utf-8", "surrogatepass"))
        elif isinstance(x, dict):
            if x.get("type") in MEDIA_PARTS:
                continue
            stack.extend(x.values())
            stack.extend(x.keys())
        elif isinstance(x, list):
            stack.extend(x)
    return total
