"""MLA (multi-head latent attention) with YaRN rope, in the two forms of docs/kimi_k2.md §4.

* plain form (prefill): the latent c_kv of every key is expanded through kv_b_proj into per-head
  k_nope and v, then ordinary causal attention;
* absorbed form (decode): kv_b_proj is folded into the query (W_UK) and the output (W_UV), so the
  attention reads the 576-wide latent (c_kv | k_pe) directly, never per-head keys or values.
Both read and write the latent cache (hybrid/model/kv_cache.py: paged or contiguous, through its
prefill / decode_write / decode). The engine builds each forward's `Step` once (positions, causal
masks, the decode rows' cache rows, block tables and lengths); the layers only index it.
tests/test_model.py checks the plain form against transformers and tests/test_engine.py checks
absorbed decode against recompute; tests/test_paged_cache.py paged against contiguous.

T tokens (all sequences of a step packed together), H heads, R kv_lora_rank, P rope dim.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from hybrid.config import ModelConfig
from hybrid.model.cpu_linear import CPULinear


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def yarn_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rope dims, with YaRN's ramp between extrapolation and interpolation."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    freq_extra = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = config.rope_scaling
    if rs.type != "yarn":
        return freq_extra
    freq_inter = freq_extra / rs.factor

    def corr_dim(rotations: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(rs.beta_fast)), 0)
    high = min(math.ceil(corr_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extra_mask = 1 - ramp
    return freq_inter * (1 - extra_mask) + freq_extra * extra_mask


class Rope:
    """cos/sin tables per position; `apply` uses the reference's interleaved-pair convention."""

    def __init__(self, config: ModelConfig):
        self.inv_freq = yarn_inv_freq(config)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]   # [T, P/2]
        emb = torch.cat([freqs, freqs], dim=-1)                                           # [T, P]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, ..., P] with pairs (x[2j], x[2j+1]); result in the reference's de-interleaved order."""
        shape = x.shape
        x = x.reshape(*shape[:-1], shape[-1] // 2, 2).transpose(-1, -2).reshape(shape)
        half = shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        while cos.dim() < x.dim():                       # broadcast over head dims
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return x * cos + rotated * sin


@dataclass
class Step:
    """The T packed tokens of one forward, one entry per sequence in token order, with every tensor the
    layers need built once here (by the engine, or `Step.single` for a lone prompt), not per layer.
    Two cache addressings: `slots` (contiguous LatentCache: sequence i lives in cache row slots[i]) or,
    when `block_tables` are given, paged (PagedLatentCache: token t of sequence i lives in cache row
    block_tables[i][t // block_size] * block_size + t % block_size)."""
    slots: list[int]           # cache row of each sequence (contiguous cache)
    starts: list[int]          # tokens already in the cache before this step (= position of its first new token)
    lengths: list[int]         # new tokens of each sequence this step (sum = T)
    positions: torch.Tensor    # [T] int64
    masks: list                # per sequence: bool [n, start+n], True above the causal diagonal (None if n == 1)
    decode_rows: torch.Tensor      # [B] rows of the one-token sequences (absorbed decode over the cache)
    decode_slots: torch.Tensor     # [B] their cache rows
    decode_positions: torch.Tensor  # [B] the position each writes in the cache (start)
    decode_lengths: torch.Tensor   # [B] their cache lengths after this step (start + 1)
    decode_max_len: int = 0        # the longest of them (the decode kernel's split, without a device sync)
    block_size: int = 0            # paged only (0: contiguous)
    rows: list | None = None       # paged: per sequence [start+n] cache rows of its tokens 0..start+n-1 (None for decodes)
    decode_block_table: torch.Tensor | None = None  # paged: [B, max blocks] int32 block ids (0-padded)
    decode_cache_rows: torch.Tensor | None = None   # paged: [B] the cache row each decode writes

    @staticmethod
    def build(slots: list[int], starts: list[int], lengths: list[int], device="cpu",
              block_tables: list[list[int]] | None = None, block_size: int = 0) -> "Step":
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)]).to(device)
        masks = []
        for s, n in zip(starts, lengths):
            if n > 1:
                q_pos = torch.arange(s, s + n, device=device)[:, None]
                masks.append(torch.arange(s + n, device=device)[None, :] > q_pos)
            else:
                masks.append(None)
        offsets = list(itertools.accumulate(lengths, initial=0))           # first row of each sequence
        one = [i for i, n in enumerate(lengths) if n == 1]
        as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        step = Step(slots, starts, lengths, positions, masks, as_tensor([offsets[i] for i in one]),
                    as_tensor([slots[i] for i in one]),
                    as_tensor([starts[i] for i in one]), as_tensor([starts[i] + 1 for i in one]),
                    max((starts[i] + 1 for i in one), default=0))
        if block_tables is not None:
            bs = step.block_size = block_size
            rows = []
            for i, (bt, s, n) in enumerate(zip(block_tables, starts, lengths)):
                if n == 1:
                    rows.append(None)
                    continue
                t = torch.arange(s + n)
                rows.append((torch.tensor(bt, dtype=torch.long)[t // bs] * bs + t % bs).to(device))
            step.rows = rows
            width = max((len(block_tables[i]) for i in one), default=1)
            table = [block_tables[i] + [0] * (width - len(block_tables[i])) for i in one]
            step.decode_block_table = torch.tensor(table, dtype=torch.int32).reshape(len(one), width).to(device)
            step.decode_cache_rows = as_tensor([block_tables[i][starts[i] // bs] * bs + starts[i] % bs for i in one])
        return step

    @staticmethod
    def single(n_tokens: int, start: int = 0, slot: int = 0, device="cpu") -> "Step":
        return Step.build([slot], [start], [n_tokens], device)


def regroup_kv_b(w: torch.Tensor, heads: int, nope: int, v_dim: int) -> torch.Tensor:
    """kv_b_proj rows from the checkpoint's per-head interleave (h*(nope+V) + d) to
    [all k_nope rows (h*nope + d) | all v rows (h*V + d)]."""
    w3 = w.view(heads, nope + v_dim, -1)
    return torch.cat([w3[:, :nope].reshape(heads * nope, -1), w3[:, nope:].reshape(heads * v_dim, -1)])


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.h, self.nope, self.rope_dim, self.vd = (c.num_attention_heads, c.qk_nope_head_dim,
                                                     c.qk_rope_head_dim, c.v_head_dim)
        self.r = c.kv_lora_rank
        qk = self.nope + self.rope_dim
        if c.q_lora_rank:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps=1e-6)   # reference builds it without eps: 1e-6
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.h * qk, bias=False)
        else:
            self.q_proj = nn.Linear(c.hidden_size, self.h * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, self.r + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.r, eps=1e-6)
        # rows grouped by the loader (regroup_kv_b): all heads' k_nope rows, then all heads' v rows, so
        # W_UK [H, nope, R] and W_UV [H, V, R] are contiguous views for the absorbed form
        self.kv_b_proj = nn.Linear(self.r, self.h * (self.nope + self.vd), bias=False)
        self.o_proj = nn.Linear(self.h * self.vd, c.hidden_size, bias=False)
        self.scale = c.softmax_scale
        self.triton = None      # the decode kernel's choice, made by the loader for the device (None: per call)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step,
                cache=None, absorb: bool | None = None) -> torch.Tensor:
        """absorb: True/False forces a form; None: plain for prompts, absorbed for 1-token decode steps."""
        T = x.shape[0]
        if hasattr(self, "q_a_proj"):
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(T, self.h, self.nope + self.rope_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)       # [T, H, nope], [T, H, P]
        kv_a = self.kv_a_proj_with_mqa(x)
        c_kv, k_pe = kv_a.split([self.r, self.rope_dim], dim=-1)          # [T, R], [T, P]
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe = Rope.apply(q_pe, cos, sin)
        k_pe = Rope.apply(k_pe, cos, sin)

        o = q_nope.new_empty(T, self.h, self.vd)
        batched_decode = cache is not None and absorb is not False and len(step.decode_rows) > 0
        offset = 0
        for i, (start, n, mask) in enumerate(zip(step.starts, step.lengths, step.masks)):
            tok = slice(offset, offset + n)
            offset += n
            if n == 1 and batched_decode:              # decode: one call below, over the latent cache
                continue
            if cache is None:
                assert start == 0, "without a cache every sequence starts at position 0"
                keys_c, keys_pe = c_kv[tok], k_pe[tok]
            else:                                      # write the new rows, read all start+n keys back
                keys_c, keys_pe = cache.prefill(self.layer_idx, step, i, c_kv[tok], k_pe[tok])
            attend = self._absorbed if absorb else self._plain
            o[tok] = attend(q_nope[tok], q_pe[tok], keys_c, keys_pe, mask)
        if batched_decode:
            rows = step.decode_rows
            cache.decode_write(self.layer_idx, step, c_kv[rows], k_pe[rows])
            o[rows] = self._decode(q_nope[rows], q_pe[rows], cache, step)
        return self.o_proj(o.reshape(T, self.h * self.vd))

    def _w_uk_uv(self, dtype: torch.dtype = torch.float32):
        kvb = self.kv_b_proj      # CPULinear (CPU-only): its weight widened to the model dtype
        w = kvb.dense_weight(dtype=dtype) if isinstance(kvb, CPULinear) else kvb.weight
        split = self.h * self.nope
        return w[:split].view(self.h, self.nope, self.r), w[split:].view(self.h, self.vd, self.r)

    def _decode(self, q_nope, q_pe, cache, step):
        """B one-token sequences in the absorbed form, one call over the latent cache (the cache's
        decode: gpu_kernels.mla_decode / paged_mla_decode, Triton on CUDA, their torch reference elsewhere)."""
        kvb = self.kv_b_proj
        if isinstance(kvb, CPULinear):             # CPU-only: W_UK / W_UV read in place by our kernels
            q_lat = kvb.mla_query(q_nope)                                          # [B, H, R]
            o_lat = cache.decode(self.layer_idx, q_lat, q_pe, step, self.scale, triton=self.triton)
            return kvb.mla_output(o_lat, self.nope, q_nope.dtype)                  # [B, H, V]
        w_uk, w_uv = self._w_uk_uv(q_nope.dtype)
        # batched matmuls over the heads read the contiguous W_UK / W_UV in place
        q_lat = torch.matmul(q_nope.transpose(0, 1), w_uk).transpose(0, 1)       # [B, H, R]
        o_lat = cache.decode(self.layer_idx, q_lat, q_pe, step, self.scale, triton=self.triton)
        o = torch.matmul(w_uv, o_lat.to(q_nope.dtype).permute(1, 2, 0))        # [H, V, B]
        return o.permute(2, 0, 1)                                                  # [B, H, V]

    @staticmethod
    def _causal_softmax(scores: torch.Tensor, mask) -> torch.Tensor:
        """scores [H, n, L] -> probabilities; mask [n, L] (True: a key after the query) or None."""
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(scores.dtype)

    def _plain(self, q_nope, q_pe, keys_c, keys_pe, mask):
        kv = self.kv_b_proj(keys_c)                                          # [L, H*nope + H*V]
        k_nope = kv[:, :self.h * self.nope].view(-1, self.h, self.nope)      # [L, H, nope]
        v = kv[:, self.h * self.nope:].view(-1, self.h, self.vd)             # [L, H, V]
        scores = (torch.einsum("nhd,lhd->hnl", q_nope, k_nope)
                  + torch.einsum("nhp,lp->hnl", q_pe, keys_pe)) * self.scale  # [H, n, L]
        probs = self._causal_softmax(scores, mask)
        return torch.einsum("hnl,lhv->nhv", probs, v)                       # [n, H, V]

    def _absorbed(self, q_nope, q_pe, keys_c, keys_pe, mask):
        w_uk, w_uv = self._w_uk_uv(q_nope.dtype)
        q_lat = torch.einsum("nhd,hdr->nhr", q_nope, w_uk)                  # [n, H, R]
        scores = (torch.einsum("nhr,lr->hnl", q_lat, keys_c)
                  + torch.einsum("nhp,lp->hnl", q_pe, keys_pe)) * self.scale
        probs = self._causal_softmax(scores, mask)
        o_lat = torch.einsum("hnl,lr->nhr", probs, keys_c)                  # [n, H, R]
        return torch.einsum("nhr,hvr->nhv", o_lat, w_uv)                    # [n, H, V]
