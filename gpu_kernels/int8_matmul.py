"""8-bit weight-only matmul for the GPU-resident weights: y = (x . Wq^T) * scale[n].

Wq [N, K] is int8 (symmetric, q in [-127, 127], scale = amax(row) / 127) or float8_e4m3fn
(scale = amax(row) / 448); one fp32 scale per output channel. Weights are quantized once at load
(hybrid/model/int8_linear.py); activations stay in bf16/fp32, so this halves the bytes every decode step
reads from GPU memory. T tokens, K in_features, N out_features. Tests: tests/test_gpu_kernels.py.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}


def quantize_weight_8bit(w: torch.Tensor, fmt: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [N, K] -> (q [N, K] int8 or float8_e4m3fn, fp32 scale [N]) with per-row absmax scales."""
    if fmt not in FORMATS:
        raise ValueError(f"8-bit format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
    dtype, qmax = FORMATS[fmt]
    w32 = w.float()
    scale = (w32.abs().amax(dim=1) / qmax).clamp_min(1e-12)                    # [N]
    scaled = w32 / scale[:, None]
    if fmt == "int8":
        q = scaled.round().clamp(-qmax, qmax).to(dtype)
    else:
        q = scaled.clamp(-qmax, qmax).to(dtype)
    return q, scale


def int8_matmul_ref(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> [..., N] in x.dtype: the 8-bit values widened to x's dtype, then scaled per column."""
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) or x.is_cuda else torch.float32
    y = torch.nn.functional.linear(x.to(compute), weight_q.to(compute))
    return (y * weight_scale.to(compute)).to(x.dtype)


if triton is not None:
    @triton.jit
    def _int8_matmul_kernel(X, WQ, WS, Y, T, N, K, s_xt, s_xk, s_wn, s_wk, s_yt, s_yn,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            PREC: tl.constexpr, DOT_F32: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask, nmask = offs_m < T, offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            x = tl.load(X + offs_m[:, None] * s_xt + offs_k[None, :] * s_xk,
                        mask=mmask[:, None] & kmask[None, :], other=0.0)              # [BM, BK]
            w = tl.load(WQ + offs_n[:, None] * s_wn + offs_k[None, :] * s_wk,
                        mask=nmask[:, None] & kmask[None, :], other=0.0)              # [BN, BK] 8-bit
            w = w.to(tl.float32).to(x.dtype)
            if DOT_F32:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(x, tl.trans(w), input_precision=PREC)
        scale = tl.load(WS + offs_n, mask=nmask, other=0.0)
        y = acc * scale[None, :]
        tl.store(Y + offs_m[:, None] * s_yt + offs_n[None, :] * s_yn, y.to(Y.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])


def int8_matmul_triton(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    T, N = x2.shape[0], weight_q.shape[0]
    assert weight_q.shape == (N, K) and weight_scale.shape == (N,), \
        f"weight {tuple(weight_q.shape)} / scale {tuple(weight_scale.shape)} do not match K={K}"
    from . import interpreting
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    block_m = 16 if T <= 16 else 64
    block_n, block_k = 64, 64
    grid = (triton.cdiv(T, block_m), triton.cdiv(N, block_n))
    _int8_matmul_kernel[grid](x2, weight_q, weight_scale.float().contiguous(), y, T, N, K,
                              x2.stride(0), x2.stride(1), weight_q.stride(0), weight_q.stride(1),
                              y.stride(0), y.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                              PREC="ieee" if x.dtype == torch.float32 else "tf32",
                              DOT_F32=interpreting())
    return y.reshape(*lead, N)


def int8_matmul(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] times the 8-bit weight -> [..., N]: Triton on CUDA / interpreter, reference otherwise."""
    from . import use_triton
    if use_triton(x, weight_q, weight_scale) and x.shape[-1] > 0:
        return int8_matmul_triton(x, weight_q, weight_scale)
    return int8_matmul_ref(x, weight_q, weight_scale)
