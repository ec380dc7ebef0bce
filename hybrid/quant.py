"""Weight formats of the checkpoints, as plain torch functions (the definitions, not fast kernels).

INT4 is compressed-tensors `pack-quantized` (KIMI_K2_SPEC.md §2.3): signed q in [-8, 7] stored as
u = q + 8, eight nibbles per int32 along the input dimension, column 8j+i in bits 4i..4i+3 of
word j; one bf16 scale per row and group of `group` inputs; W = bf16(q * scale).
FP8 is DeepSeek-V3's block format: float8_e4m3fn weights, one fp32 `weight_scale_inv` per
128x128 block; W = w * scale_inv[block].
Checked by tests/test_quant.py against the compressed-tensors package's own packer.
"""
from __future__ import annotations

import torch


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [N, ceil(K/8)] -> int8 q [N, K] in [-8, 7]."""
    words = packed.to(torch.int32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    u = (words.unsqueeze(-1) >> shifts) & 0xF                     # [N, K/8, 8], logical after the mask
    return (u.reshape(words.shape[0], -1)[:, :in_features] - 8).to(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 q [N, K] in [-8, 7] -> int32 [N, ceil(K/8)], K zero-padded (u = 0) to a multiple of 8."""
    n, k = q.shape
    assert int(q.min()) >= -8 and int(q.max()) <= 7, "int4 values must lie in [-8, 7]"
    u = (q.to(torch.int64) + 8)
    pad = (-k) % 8
    if pad:
        u = torch.cat([u, torch.zeros(n, pad, dtype=torch.int64)], dim=1)
    u = u.view(n, -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (u << shifts).sum(-1)                                   # < 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, in_features: int, group: int = 32,
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The reference dequantization: bf16(q) * bf16 scale, rounded to bf16, then cast to `dtype`."""
    q = unpack_int4(packed, in_features)
    s = scale.to(torch.bfloat16).repeat_interleave(group, dim=1)[:, :in_features]
    return (q.to(torch.bfloat16) * s).to(dtype)


def quantize_int4(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest per group: returns (q int8 [N,K], packed int32, scale bf16 [N, K/group])."""
    n, k = w.shape
    assert k % group == 0, f"in_features {k} must be a multiple of the group {group}"
    wg = w.float().view(n, k // group, group)
    amax = wg.abs().amax(-1)
    scale = (amax / 7.5).clamp(min=torch.finfo(torch.float32).eps).to(torch.bfloat16)
    q = torch.round(wg / scale.float().unsqueeze(-1)).clamp(-8, 7).to(torch.int8).view(n, k)
    return q, pack_int4(q), scale


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple = (128, 128),
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """float8_e4m3fn [N, K] and fp32 scale_inv [ceil(N/bn), ceil(K/bk)] -> dense [N, K]."""
    n, k = weight.shape
    bn, bk = block
    s = scale_inv.float().repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    return (weight.float() * s).to(dtype)


def quantize_fp8_block(w: torch.Tensor, block: tuple = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [N, K] -> (float8_e4m3fn [N, K], fp32 scale_inv per block) with amax/448 scales."""
    n, k = w.shape
    bn, bk = block
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.zeros(nb * bn, kb * bk)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / 448.0
    q = (blocks / scale_inv[:, None, :, None]).view(nb * bn, kb * bk)[:n, :k]
    return q.to(torch.float8_e4m3fn), scale_inv.float()
