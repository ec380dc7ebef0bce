"""Kimi tiktoken-format BPE tokenizer, read as data (no checkpoint code is executed).

Reads `tiktoken.model` (one `base64(token_bytes) rank` line per ordinary token) and the special
tokens from `tokenizer_config.json`; the pre-tokenizer pattern is the Kimi `pat_str` (docs/kimi_k2.md §5),
kept here because the real checkpoint only has it inside `tokenization_kimi.py`.

BPE is tiktoken's algorithm: a pre-token that is itself a token maps to it directly, otherwise
the adjacent pair with the lowest rank (leftmost on ties) is merged until none is left.
Checked against the `tiktoken` package (test-only dependency) in tests/test_tokenizer.py.

Bad tokenizer files raise TokenizerError (a ValueError) naming the file, the line or entry, and what is
wrong (bad JSON, a bad `base64 rank` line, ranks that are not 0..n-1, a special token without content);
`load_tokenizer(model_dir)` is what LLM calls: None for a folder with no tokenizer files at all (token ids
only), a clear error for a folder whose tokenizer files are incomplete (no tiktoken.model).
"""
from __future__ import annotations

import codecs
import heapq
import json
import os
from pathlib import Path
from typing import Iterable

import regex

from hybrid.text.tokenizer_io import (TOKENIZER_FILES, TokenizerError, _read_json,  # noqa: F401 (re-exported)
                                      load_tiktoken_bpe)

# Kimi pre-tokenizer. `[X&&[^\p{Han}]]` (character-class intersection, needs regex V1 syntax)
# is written in the equivalent lookahead form `(?:(?!\p{Han})[X])`, which also works for
# engines without `&&` (tiktoken's Python constructor, see tests).
_NOT_HAN_UPPER = r"(?:(?!\p{Han})[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}])"
_NOT_HAN_LOWER = r"(?:(?!\p{Han})[\p{Ll}\p{Lm}\p{Lo}\p{M}])"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
PAT_STR_PARTS = [
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?" + _NOT_HAN_UPPER + "*" + _NOT_HAN_LOWER + "+" + _CONTRACTIONS,
    r"[^\r\n\p{L}\p{N}]?" + _NOT_HAN_UPPER + "+" + _NOT_HAN_LOWER + "*" + _CONTRACTIONS,
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
]
PAT_STR = "|".join(PAT_STR_PARTS)

# The same pattern as the checkpoint's tokenization_kimi.py writes it (with `&&`).
PAT_STR_ORIGINAL = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# tokenization_kimi.py chunking (copied from Llama 3's tokenizer): the text is cut into
# <= 400k-char pieces and runs of > 25k consecutive whitespace / non-whitespace chars are split.
MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000

NUM_SPECIAL = 256
# offset from n_ordinary -> name (docs/kimi_k2.md §5); all other offsets are <|reserved_token_{id}|>.
SPECIAL_NAMES = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>", 14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>",
    17: "<|im_middle|>", 18: "<|media_begin|>", 19: "<|media_content|>", 20: "<|media_end|>",
    21: "<|media_pad|>", 22: "<think>", 23: "</think>", 254: "[UNK]", 255: "[PAD]",
}


def default_special_tokens(n_ordinary: int) -> dict[str, int]:
    """Special token name -> id for a vocabulary with `n_ordinary` ordinary tokens."""
    out = {}
    for off in range(NUM_SPECIAL):
        tid = n_ordinary + off
        out[SPECIAL_NAMES.get(off, f"<|reserved_token_{tid}|>")] = tid
    return out


def load_tokenizer(model_dir: str | Path) -> "Tokenizer | None":
    """The checkpoint's tokenizer; None if the folder has no tokenizer files at all (token ids only).
    A folder with some tokenizer files but no tiktoken.model is an error naming what is missing."""
    model_dir = Path(model_dir)
    present = [n for n in TOKENIZER_FILES if os.path.lexists(model_dir / n)]
    if not present:
        return None
    if "tiktoken.model" not in present:
        hint = (" (tokenizer.json is a Hugging Face fast tokenizer, which this runtime does not read)"
                if "tokenizer.json" in present else "")
        raise TokenizerError(f"{model_dir / 'tiktoken.model'} not found, but the folder has "
                             f"{', '.join(present)}{hint}. A Kimi checkpoint ships its BPE ranks as "
                             "tiktoken.model next to config.json: copy it from the original checkpoint, or "
                             "remove the tokenizer files to run on token ids only")
    return Tokenizer.from_pretrained(model_dir)


def _split_long_runs(s: str, max_run: int) -> list[str]:
    """`_split_whitespaces_or_nonwhitespaces` of tokenization_kimi.py: cut every run of
    str.isspace() / not-isspace chars at run_start + k*max_run."""
    if len(s) <= max_run:
        return [s]
    cuts = []
    run_start = 0
    prev = s[0].isspace()
    # only long texts get here, and plain loops over chars are fast enough (~50 ns/char)
    for i, ch in enumerate(s):
        sp = ch.isspace()
        if sp != prev:
            run_start, prev = i, sp
        elif i - run_start >= max_run and (i - run_start) % max_run == 0:
            cuts.append(i)
    if not cuts:
        return [s]
    bounds = [0] + cuts + [len(s)]
    return [s[a:b] for a, b in zip(bounds, bounds[1:])]


class Tokenizer:
    """BPE tokenizer over tiktoken ranks plus named special tokens.

    encode(text)            plain text, no special tokens, Kimi long-run chunking
    encode_ordinary(text)   like tiktoken's encode_ordinary (no chunking)
    encode_with_special(text, allowed_special="all")  markers become special tokens
    decode(ids)             bytes joined, UTF-8 with replacement
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int],
                 pat_str: str = PAT_STR, bos_token: str = "[BOS]", eos_token: str = "[EOS]",
                 pad_token: str = "[PAD]", unk_token: str = "[UNK]"):
        self.mergeable_ranks = mergeable_ranks
        self.n_ordinary = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(self.n_ordinary)):
            raise TokenizerError("tiktoken ranks must be exactly 0..n-1")
        self.special_tokens = dict(special_tokens)
        self.vocab_size = max([self.n_ordinary - 1, *self.special_tokens.values()]) + 1
        self._decoder: list[bytes] = [b""] * self.vocab_size
        for b, r in mergeable_ranks.items():
            self._decoder[r] = b
        for name, tid in self.special_tokens.items():
            if not tid >= self.n_ordinary:
                raise TokenizerError(f"special token {name!r} id {tid} collides with the BPE ranks "
                                     f"0..{self.n_ordinary - 1}")
            self._decoder[tid] = name.encode("utf-8")
        self.special_ids = frozenset(self.special_tokens.values())
        self.id_to_special = {v: k for k, v in self.special_tokens.items()}
        self.pat_str = pat_str
        self._pat = regex.compile(pat_str)
        # longest first so a name that is a prefix of another never wins
        names = sorted(self.special_tokens, key=len, reverse=True)
        self._special_pat = regex.compile("|".join(regex.escape(n) for n in names))
        self._cache: dict[str, tuple[int, ...]] = {}

        self.bos_token, self.eos_token, self.pad_token, self.unk_token = \
            bos_token, eos_token, pad_token, unk_token
        self.bos_id = self.special_tokens.get(bos_token)
        self.eos_id = self.special_tokens.get(eos_token)
        self.pad_id = self.special_tokens.get(pad_token)
        self.unk_id = self.special_tokens.get(unk_token)
        g = self.special_tokens.get
        self.im_end_id = g("<|im_end|>")
        self.im_user_id = g("<|im_user|>")
        self.im_assistant_id = g("<|im_assistant|>")
        self.im_system_id = g("<|im_system|>")
        self.im_middle_id = g("<|im_middle|>")
        self.think_id = g("<think>")
        self.think_end_id = g("</think>")
        self.tool_calls_section_begin_id = g("<|tool_calls_section_begin|>")
        self.tool_calls_section_end_id = g("<|tool_calls_section_end|>")
        self.tool_call_begin_id = g("<|tool_call_begin|>")
        self.tool_call_argument_begin_id = g("<|tool_call_argument_begin|>")
        self.tool_call_end_id = g("<|tool_call_end|>")
        self.media_pad_id = g("<|media_pad|>")
        # generation stops on <|im_end|> (generation_config eos) and [EOS]
        self.eos_token_ids = [t for t in (self.im_end_id, self.eos_id) if t is not None]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "Tokenizer":
        model_dir = Path(model_dir)
        model_file = model_dir / "tiktoken.model"
        if not os.path.lexists(model_file):
            raise FileNotFoundError(f"{model_file} not found. HINT: a Kimi checkpoint ships its "
                                    "BPE ranks as tiktoken.model next to config.json")
        ranks = load_tiktoken_bpe(model_file)
        n = len(ranks)
        special = default_special_tokens(n)
        cfg_file = model_dir / "tokenizer_config.json"
        cfg = _read_json(cfg_file) if os.path.lexists(cfg_file) else {}
        added = cfg.get("added_tokens_decoder", {})
        if not isinstance(added, dict):
            raise TokenizerError(f"{cfg_file}: 'added_tokens_decoder' must be an object of id -> token")
        for sid, entry in added.items():
            content = entry.get("content") if isinstance(entry, dict) else entry
            if not isinstance(content, str) or not content:
                raise TokenizerError(f"{cfg_file}: added_tokens_decoder[{sid!r}] has no 'content' string "
                                     f"(got {json.dumps(entry)[:80]})")
            if not sid.isdigit() or len(sid) > 12:
                raise TokenizerError(f"{cfg_file}: added_tokens_decoder key {sid[:40]!r} is not a token id")
            tid = int(sid)
            if tid < n:
                raise TokenizerError(f"{cfg_file}: added token {content!r} id {tid} < {n} "
                                     "ordinary tokens")
            old = [k for k, v in special.items() if v == tid]
            for k in old:
                del special[k]
            special[content] = tid

        def tok(key, default):
            v = cfg.get(key, default)
            v = v.get("content", default) if isinstance(v, dict) else (v or default)
            if not isinstance(v, str):
                raise TokenizerError(f"{cfg_file}: '{key}' must be a string or {{'content': ...}}, "
                                     f"got {json.dumps(v)[:80]}")
            return v
        return cls(ranks, special, bos_token=tok("bos_token", "[BOS]"),
                   eos_token=tok("eos_token", "[EOS]"), pad_token=tok("pad_token", "[PAD]"),
                   unk_token=tok("unk_token", "[UNK]"))

    # ------------------------------------------------------------------ BPE
    def _bpe(self, piece: bytes) -> tuple[int, ...]:
        ranks = self.mergeable_ranks
        r = ranks.get(piece)
        if r is not None:
            return (r,)
        if len(piece) > 48:
            return self._bpe_heap(piece)
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best, best_i = None, -1
            for i in range(len(parts) - 1):
                rk = ranks.get(parts[i] + parts[i + 1])
                if rk is not None and (best is None or rk < best):
                    best, best_i = rk, i
            if best is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        return tuple(ranks[p] for p in parts)

    def _bpe_heap(self, piece: bytes) -> tuple[int, ...]:
        """Same result as the quadratic loop (lowest rank, leftmost first) in O(n log n),
        for long pre-tokens such as 25k-char runs."""
        ranks = self.mergeable_ranks
        n = len(piece)
        nxt = list(range(1, n + 1))      # start -> start of next part (n = end)
        prv = [-1] + list(range(n - 1))  # start -> start of previous part
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            rk = ranks.get(piece[i:i + 2])
            if rk is not None:
                heap.append((rk, i, i + 2))
        heapq.heapify(heap)
        while heap:
            rk, i, end = heapq.heappop(heap)
            j = nxt[i] if alive[i] else -1
            if j < 0 or j >= n or nxt[j] != end:
                continue  # stale: a part of this pair changed since it was pushed
            # merge part j into part i
            alive[j] = False
            nxt[i] = end
            if end < n:
                prv[end] = i
            p = prv[i]
            if p >= 0:
                r2 = ranks.get(piece[p:end])
                if r2 is not None:
                    heapq.heappush(heap, (r2, p, end))
            if end < n:
                e2 = nxt[end]
                r2 = ranks.get(piece[i:e2])
                if r2 is not None:
                    heapq.heappush(heap, (r2, i, e2))
        out = []
        i = 0
        while i < n:
            out.append(ranks[piece[i:nxt[i]]])
            i = nxt[i]
        return tuple(out)

    def _encode_chunk(self, text: str, out: list[int]) -> None:
        cache = self._cache
        for piece in self._pat.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._bpe(piece.encode("utf-8"))
                if len(cache) > 500_000:
                    cache.clear()
                cache[piece] = ids
            out.extend(ids)

    # ------------------------------------------------------------------ public API
    def encode_ordinary(self, text: str) -> list[int]:
        """Plain-text BPE of the whole string (tiktoken's encode_ordinary)."""
        out: list[int] = []
        self._encode_chunk(text, out)
        return out

    def _chunks(self, text: str) -> Iterable[str]:
        for i in range(0, max(len(text), 1), MAX_ENCODE_CHARS):
            yield from _split_long_runs(text[i:i + MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS)

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids; special-token strings in `text` stay ordinary characters.
        Uses the checkpoint tokenizer's chunking of very long runs."""
        out: list[int] = []
        for chunk in self._chunks(text):
            self._encode_chunk(chunk, out)
        return out

    def encode_with_special(self, text: str, allowed_special: str | Iterable[str] = "all"
                            ) -> list[int]:
        """Like encode, but the named special tokens (or all of them) in `text` become their
        ids. Only for text the runtime itself wrote (templates), never for user text."""
        if allowed_special == "all":
            allowed = None
        else:
            allowed = set(allowed_special)
            unknown = allowed - self.special_tokens.keys()
            if unknown:
                raise ValueError(f"unknown special tokens {sorted(unknown)}")
        out: list[int] = []
        for chunk in self._chunks(text):
            start = 0
            for m in self._special_pat.finditer(chunk):
                name = m.group()
                if allowed is not None and name not in allowed:
                    continue
                self._encode_chunk(chunk[start:m.start()], out)
                out.append(self.special_tokens[name])
                start = m.end()
            self._encode_chunk(chunk[start:], out)
        return out

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        dec = self._decoder
        if skip_special_tokens:
            sp = self.special_ids
            return b"".join(dec[i] for i in ids if i not in sp)
        return b"".join(dec[i] for i in ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def id_to_token(self, tid: int) -> bytes:
        return self._decoder[tid]

    def token_to_id(self, token: str | bytes) -> int:
        if isinstance(token, str):
            if token in self.special_tokens:
                return self.special_tokens[token]
            token = token.encode("utf-8")
        return self.mergeable_ranks[token]

    def is_special(self, tid: int) -> bool:
        return tid in self.special_ids

    def incremental_decoder(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size


class IncrementalDecoder:
    """Streaming detokenizer: `add(ids) -> str` returns only complete UTF-8 characters; a
    character split across tokens is held back until its last byte arrives. `finish()` flushes
    (an incomplete tail becomes U+FFFD). Concatenated output == tokenizer.decode(all ids)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, ids: int | Iterable[int]) -> str:
        if isinstance(ids, int):
            ids = (ids,)
        return self._dec.decode(self.tok.decode_bytes(ids, self.skip_special_tokens))

    def finish(self) -> str:
        return self._dec.decode(b"", final=True)
