"""The latent KV cache: per layer only the normed latent c_kv (kv_lora_rank) and the roped k_pe
(qk_rope_head_dim) of each token — 576 numbers per token per layer for K2.6, instead of 64 heads of
full keys and values.

* `PagedLatentCache` (what the engine uses): one pool of `num_blocks` blocks of `block_size` tokens
  shared by all sequences; a sequence's block table says which blocks hold its tokens (the rows of a
  forward come with its `Step`, built once by the engine). Optionally 8-bit ("int8" | "fp8": 1 byte per
  value + one fp32 scale per token for the latent and one for the rope part; see
  gpu_kernels/paged_mla_decode.py). Prefill reads back through the same (de)quantization as decode.
* `BlockPool`: which blocks are free, which hold a cached prefix (full blocks keyed by a hash of their
  tokens, media keys and the blocks before them; kept after their sequence ends, evicted least recently
  used), reference counts for blocks shared by several sequences.
* `LatentCache`: the contiguous form (one max_context row per slot), for single-sequence use
  (`Step.single`) and as the reference the paged cache is tested against.
Tests: tests/test_paged_cache.py (paged == contiguous logits, pool bookkeeping, 8-bit error bounds),
tests/test_engine.py.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from gpu_kernels.mla_decode import mla_decode
from gpu_kernels.paged_mla_decode import dequantize_rows, paged_mla_decode, quantize_rows, storage_dtype

from hybrid.config import ModelConfig

KV_CACHE_DTYPES = ("auto", "bf16", "fp8", "int8")


def cache_format(kv_cache_dtype: str, model_dtype: torch.dtype) -> tuple[str | None, torch.dtype]:
    """(8-bit format or None, the dtype of the unquantized cache)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} unknown; choose one of {', '.join(KV_CACHE_DTYPES)}")
    if kv_cache_dtype in ("fp8", "int8"):
        return kv_cache_dtype, model_dtype
    return None, torch.bfloat16 if kv_cache_dtype == "bf16" else model_dtype


def cache_bytes_per_token(config: ModelConfig, kv_cache_dtype: str = "auto",
                          model_dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one token takes in the cache PER LAYER (times num_hidden_layers for the whole model; the same
    formula as hybrid/plan's kv_bytes_per_token): (kv_lora_rank + qk_rope_head_dim) x 2 bytes (bf16) or
    x 1 byte + 8 bytes of fp32 scales, one for the latent and one for the rope part (fp8 / int8).
    "auto" = model_dtype."""
    width = config.kv_lora_rank + config.qk_rope_head_dim
    fmt, dtype = cache_format(kv_cache_dtype, model_dtype)
    return width + 8 if fmt else width * torch.finfo(dtype).bits // 8


class PagedLatentCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, kv_cache_dtype: str = "auto"):
        L, R, P = config.num_hidden_layers, config.kv_lora_rank, config.qk_rope_head_dim
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.fmt, plain = cache_format(kv_cache_dtype, dtype)
        store = storage_dtype(self.fmt, plain)
        rows = num_blocks * block_size
        self.ckv = torch.zeros(L, rows, R, dtype=store, device=device)      # row = block * block_size + offset
        self.kpe = torch.zeros(L, rows, P, dtype=store, device=device)
        self.ckv_scale = self.kpe_scale = None
        if self.fmt:
            self.ckv_scale = torch.zeros(L, rows, dtype=torch.float32, device=device)
            self.kpe_scale = torch.zeros(L, rows, dtype=torch.float32, device=device)
        self.bytes_per_token = L * cache_bytes_per_token(config, kv_cache_dtype, dtype)   # all layers

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ckv, self.kpe, self.ckv_scale, self.kpe_scale)
                   if t is not None)

    def _store(self, layer: int, rows: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        if self.fmt:
            qc, sc = quantize_rows(c_kv, self.fmt)
            qp, spe = quantize_rows(k_pe, self.fmt)
            self.ckv[layer, rows], self.ckv_scale[layer, rows] = qc, sc
            self.kpe[layer, rows], self.kpe_scale[layer, rows] = qp, spe
        else:
            self.ckv[layer, rows] = c_kv.to(self.ckv.dtype)
            self.kpe[layer, rows] = k_pe.to(self.kpe.dtype)

    def _load(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fmt:
            return (dequantize_rows(self.ckv[layer, rows], self.ckv_scale[layer, rows], self.fmt, self.dtype),
                    dequantize_rows(self.kpe[layer, rows], self.kpe_scale[layer, rows], self.fmt, self.dtype))
        return self.ckv[layer, rows].to(self.dtype), self.kpe[layer, rows].to(self.dtype)

    # ---- what attention calls (hybrid/model/attention.py) ---------------------------------
    def prefill(self, layer: int, step, i: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Sequence i of the step: write its new rows, return all its keys (cached + new) [start+n, R|P]."""
        rows = step.rows[i]
        self._store(layer, rows[step.starts[i]:], c_kv, k_pe)
        return self._load(layer, rows)

    def decode_write(self, layer: int, step, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        self._store(layer, step.decode_cache_rows, c_kv, k_pe)

    def decode(self, layer: int, q_lat, q_pe, step, softmax_scale: float, triton=None) -> torch.Tensor:
        scales = (self.ckv_scale[layer], self.kpe_scale[layer]) if self.fmt else (None, None)
        return paged_mla_decode(q_lat, q_pe, self.ckv[layer], self.kpe[layer], step.decode_block_table,
                                step.decode_lengths, self.block_size, softmax_scale, *scales, fmt=self.fmt,
                                max_len=step.decode_max_len, triton=triton)

    def copy_rows(self, src_block: int, dst_block: int, n: int) -> None:
        """The first n tokens of block src into block dst (every layer): a partial prefix hit."""
        s, d = src_block * self.block_size, dst_block * self.block_size
        for t in (self.ckv, self.kpe, self.ckv_scale, self.kpe_scale):
            if t is not None:
                t[:, d:d + n] = t[:, s:s + n]


def block_hash(parent: bytes, tokens, media_keys=()) -> bytes:
    """Key of a full block: its tokens, the media (image content keys) over them, and its parent's key."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    for key in media_keys:
        h.update(b"\0media:" + str(key).encode())
    return h.digest()


ROOT = b"root"


class BlockPool:
    """Block bookkeeping (pure Python; the tensors are PagedLatentCache's).

    A block is in use (ref > 0), free and holding a cached prefix (in `lru`, evicted oldest first), or
    free and empty (`empty`). Content is registered as `meta[block] = (parent key, tokens, media keys)`:
    full blocks also under `by_hash[key]` (shared by reference), any block (full or partial) under
    `children[parent key]`, from which a new sequence may copy the leading tokens it shares."""

    def __init__(self, num_blocks: int, prefix_caching: bool = True):
        self.num_blocks, self.prefix_caching = num_blocks, prefix_caching
        self.ref = [0] * num_blocks
        self.empty: list[int] = list(range(num_blocks - 1, -1, -1))
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.meta: dict[int, tuple] = {}
        self.key: dict[int, bytes] = {}
        self.by_hash: dict[bytes, int] = {}
        self.children: dict[bytes, set[int]] = {}
        self.pending: dict[bytes, str] = {}       # full-block keys a running prefill is computing -> seq id

    def free_count(self) -> int:
        return len(self.empty) + len(self.lru)

    def used_count(self) -> int:
        return self.num_blocks - self.free_count()

    def cached_count(self) -> int:
        return len(self.meta)

    def allocate(self, n: int) -> list[int]:
        assert n <= self.free_count(), f"{n} blocks asked, {self.free_count()} free"
        out = []
        for _ in range(n):
            if self.empty:
                b = self.empty.pop()
            else:
                b, _ = self.lru.popitem(last=False)         # least recently used cached block
                self._forget(b)
            self.ref[b] = 1
            out.append(b)
        return out

    def acquire(self, block: int) -> None:
        if self.ref[block] == 0:
            self.lru.pop(block, None)
        self.ref[block] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.meta:
                    self.lru[b] = None                       # most recently used end
                else:
                    self.empty.append(b)

    def _forget(self, b: int) -> None:
        parent, _, _ = self.meta.pop(b)
        key = self.key.pop(b, None)
        if key is not None and self.by_hash.get(key) == b:
            del self.by_hash[key]
        kids = self.children.get(parent)
        if kids is not None:
            kids.discard(b)
            if not kids:
                del self.children[parent]

    def register(self, block: int, parent: bytes, tokens: tuple, media_keys: tuple, key: bytes | None) -> None:
        """Record a block's content: key given for a full block (shareable), None for a partial one."""
        if not self.prefix_caching or block in self.meta:
            return
        if key is not None:
            self.pending.pop(key, None)
            if key in self.by_hash:                          # computed twice concurrently: keep the first
                return
            self.by_hash[key] = block
            self.key[block] = key
        self.meta[block] = (parent, tokens, media_keys)
        self.children.setdefault(parent, set()).add(block)

    def longest_prefix(self, keys: list[bytes]) -> list[int]:
        """Blocks of the longest run of leading full-block keys that are cached."""
        out = []
        for k in keys:
            b = self.by_hash.get(k)
            if b is None:
                break
            out.append(b)
        return out

    def best_partial(self, parent: bytes, tokens: list[int], media_of) -> tuple[int, int]:
        """(block, n): the cached block after `parent` sharing the most leading tokens with `tokens`
        (media_of(n) = the media keys over those n tokens must equal the block's: a block with an
        image past the shared tokens is skipped, conservatively), or (-1, 0)."""
        best, best_n = -1, 0
        for b in self.children.get(parent, ()):
            _, toks, media = self.meta[b]
            n = 0
            for a, c in zip(toks, tokens):
                if a != c:
                    break
                n += 1
            if n > best_n and media == media_of(n):
                best, best_n = b, n
        return best, best_n


class LatentCache:
    """Contiguous cache: `num_slots` rows of `max_context` tokens (Step.single / Step.build with slots)."""

    def __init__(self, config: ModelConfig, num_slots: int, max_context: int, dtype: torch.dtype,
                 device: torch.device):
        L, R, P = config.num_hidden_layers, config.kv_lora_rank, config.qk_rope_head_dim
        self.max_context = max_context
        self.ckv = torch.zeros(L, num_slots, max_context, R, dtype=dtype, device=device)
        self.kpe = torch.zeros(L, num_slots, max_context, P, dtype=dtype, device=device)

    @staticmethod
    def bytes_needed(config: ModelConfig, num_slots: int, max_context: int, dtype: torch.dtype) -> int:
        per_token = (config.kv_lora_rank + config.qk_rope_head_dim) * torch.finfo(dtype).bits // 8
        return config.num_hidden_layers * num_slots * max_context * per_token

    @property
    def nbytes(self) -> int:
        return self.ckv.numel() * self.ckv.element_size() + self.kpe.numel() * self.kpe.element_size()

    def write(self, layer: int, slot: int, start: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        end = start + c_kv.shape[0]
        assert end <= self.max_context, f"cache overflow: position {end} > max_context {self.max_context}"
        self.ckv[layer, slot, start:end] = c_kv
        self.kpe[layer, slot, start:end] = k_pe

    def read(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ckv[layer, slot, :length], self.kpe[layer, slot, :length]

    def prefill(self, layer: int, step, i: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        slot, start = step.slots[i], step.starts[i]
        self.write(layer, slot, start, c_kv, k_pe)
        return self.read(layer, slot, start + c_kv.shape[0])

    def decode_write(self, layer: int, step, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        self.ckv[layer, step.decode_slots, step.decode_positions] = c_kv
        self.kpe[layer, step.decode_slots, step.decode_positions] = k_pe

    def decode(self, layer: int, q_lat, q_pe, step, softmax_scale: float, triton=None) -> torch.Tensor:
        return mla_decode(q_lat, q_pe, self.ckv[layer], self.kpe[layer], step.decode_slots, step.decode_lengths,
                          softmax_scale, step.decode_max_len, triton=triton)
