"""INT4 (compressed-tensors pack-quantized, group 32) dequantize-and-multiply: y = x . W^T.

W [N, K] is stored as on disk, compressed-tensors pack-quantized (docs/kimi_k2.md §2; the runtime's
definition is hybrid/formats.py, which this package does not import): weight_packed int32 [N, K/8] with
column 8j+i in bits 4i..4i+3 of word j (u = q + 8), weight_scale bf16 [N, K/group];
W[n, k] = bf16(q * scale[n, k // group]). tests/test_gpu_kernels.py checks the reference below against
compressed-tensors' own unpacker. The kernel unpacks a [BLOCK_N, BLOCK_K] tile in registers,
scales it, rounds to bf16 exactly like the reference, and accumulates x . W^T in fp32 — the dense
weight never exists in memory. For routed experts on the GPU (hot experts, long-prefill streaming).
T tokens, K in_features, N out_features. Tests: tests/test_gpu_kernels.py.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def int4_matmul_ref(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                    group: int = 32) -> torch.Tensor:
    """x [T, K] . W^T -> [T, N] in x.dtype (fp32 accumulation), W unpacked and scaled in plain torch."""
    K = x.shape[-1]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=weight_packed.device)
    u = (weight_packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF                 # [N, K/8, 8]
    q = u.reshape(weight_packed.shape[0], -1)[:, :K] - 8                              # [N, K] in [-8, 7]
    s = weight_scale.to(torch.bfloat16).repeat_interleave(group, dim=1)[:, :K]
    w = q.to(torch.bfloat16) * s                                                      # bf16(q * scale)
    return (x.float() @ w.float().to(x.device).T).to(x.dtype)


if triton is not None:
    @triton.jit
    def _round_to_bf16(v):
        """fp32 -> nearest bf16 (ties to even), kept in fp32. Done on the bits because the interpreter's
        fp32->bf16 cast truncates; the product q * scale is exact in fp32, so this is the reference's rounding."""
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _int4_matmul_kernel(X, WP, WS, Y, T, N, K,
                            s_xt, s_xk, s_wpn, s_wsn, s_yt, s_yn,
                            GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr):
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
            wmask = nmask[:, None] & kmask[None, :]
            words = tl.load(WP + offs_n[:, None] * s_wpn + (offs_k // 8)[None, :], mask=wmask, other=0)
            q = ((words >> ((offs_k % 8) * 4)[None, :]) & 0xF) - 8                   # [BN, BK] int32
            s = tl.load(WS + offs_n[:, None] * s_wsn + (offs_k // GROUP)[None, :], mask=wmask, other=0.0)
            w = _round_to_bf16(q.to(tl.float32) * s.to(tl.float32))                  # = bf16(q) * bf16 s
            w = w.to(x.dtype)
            if DOT_F32:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(x, tl.trans(w), input_precision=PREC)
        tl.store(Y + offs_m[:, None] * s_yt + offs_n[None, :] * s_yn, acc.to(Y.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])


def int4_matmul_triton(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                       group: int = 32) -> torch.Tensor:
    T, K = x.shape
    N = weight_packed.shape[0]
    assert K % group == 0 and group % 8 == 0, f"K={K} must be a multiple of the group ({group})"
    assert weight_packed.shape == (N, K // 8) and weight_scale.shape == (N, K // group), \
        f"packed {tuple(weight_packed.shape)} / scale {tuple(weight_scale.shape)} do not match K={K}"
    wp, ws = weight_packed.contiguous(), weight_scale.contiguous()
    from . import interpreting
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    block_m = 16 if T <= 16 else 64
    block_n, block_k = 64, 64
    grid = (triton.cdiv(T, block_m), triton.cdiv(N, block_n))
    _int4_matmul_kernel[grid](x, wp, ws, y, T, N, K, x.stride(0), x.stride(1), wp.stride(0), ws.stride(0),
                              y.stride(0), y.stride(1), GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n,
                              BLOCK_K=block_k, PREC="ieee" if x.dtype == torch.float32 else "tf32",
                              DOT_F32=interpreting())
    return y


def int4_matmul(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                group: int = 32) -> torch.Tensor:
    """x [T, K] times the INT4 weight -> [T, N]: Triton on CUDA / interpreter, reference otherwise."""
    from . import use_triton
    if use_triton(x, weight_packed, weight_scale) and x.shape[-1] % group == 0:
        return int4_matmul_triton(x, weight_packed, weight_scale, group)
    return int4_matmul_ref(x, weight_packed, weight_scale, group)
