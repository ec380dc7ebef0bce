"""Reading Kimi's tokenizer files with errors that name the file, the line or entry, and what is wrong:
`tiktoken.model` (one `base64(token bytes) rank` line per token) and `tokenizer_config.json`.
Used by hybrid/text/tokenizer.py; checked by tests/test_tokenizer.py (one test per kind of bad file).
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from pathlib import Path

class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or malformed; the message names the file and the problem."""


# files that mean "this folder is meant to have a tokenizer"
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "tokenizer.json", "chat_template.jinja")
MAX_TOKENIZER_FILE = 1 << 30        # bytes; the real tiktoken.model is ~2.8 MB


def _regular(path: Path) -> None:
    """TokenizerError unless `path` is a regular file of a sane size (a FIFO would block the read)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise TokenizerError(f"{path}: not a regular file (a directory, FIFO or device)")
    if st.st_size > MAX_TOKENIZER_FILE:
        raise TokenizerError(f"{path}: {st.st_size} bytes is too large for a tokenizer file")


def _read_json(path: Path) -> dict:
    _regular(path)
    try:
        data = json.loads(path.read_bytes())
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: must be a JSON object, got {type(data).__name__}")
    return data


def load_tiktoken_bpe(path: str | Path) -> dict[bytes, int]:
    """tiktoken.model: one `base64(token bytes) rank` line per token; ranks exactly 0..n-1."""
    path = Path(path)
    _regular(path)
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            where = f"{path}: line {lineno}"
            if len(parts) != 2:
                raise TokenizerError(f"{where}: expected 'base64 rank', got {line[:60]!r}")
            try:
                token = base64.b64decode(parts[0], validate=True)
            except (binascii.Error, ValueError) as e:
                raise TokenizerError(f"{where}: {parts[0][:40]!r} is not base64 ({e})") from None
            if not parts[1].isdigit() or len(parts[1]) > 18:
                raise TokenizerError(f"{where}: rank {parts[1][:40]!r} is not a non-negative integer")
            if token in ranks:
                raise TokenizerError(f"{where}: token {token[:40]!r} already has rank {ranks[token]}")
            ranks[token] = int(parts[1])
    if not ranks:
        raise TokenizerError(f"{path}: no tokens (an empty file)")
    if sorted(ranks.values()) != list(range(len(ranks))):
        seen = set(ranks.values())
        dup = len(seen) < len(ranks)
        gap = next((r for r in range(len(ranks)) if r not in seen), None)
        raise TokenizerError(f"{path}: ranks must be exactly 0..{len(ranks) - 1}, one per line: "
                             + ("a rank appears twice" if dup else f"rank {gap} is missing"))
    return ranks
