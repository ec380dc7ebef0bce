"""MLA decode attention over the latent cache, absorbed form (docs/kimi_k2.md §4).

Per sequence b (cache row slots[b], lengths[b] cached tokens) and head h:
    score[t] = (q_lat[b,h] . ckv[slot, t] + q_pe[b,h] . kpe[slot, t]) * softmax_scale
    o_lat[b,h] = sum_t softmax(score)[t] * ckv[slot, t]
i.e. MQA with one 576-wide key [c_kv | k_pe] shared by all heads and the 512-wide c_kv as value.
The caller has multiplied q_nope by W_UK and applies W_UV to o_lat.

Triton kernel: one program per (sequence, block of heads, split of the keys) — the heads of a block
share every latent row they read, and splitting long sequences (flash-decoding) keeps the GPU busy at
batch 1; each split writes its partial output and log-sum-exp, combined in torch.
B sequences, H heads, R kv_lora_rank, P rope dim, S cache rows, Lmax cache length.
Tests: tests/test_gpu_kernels.py (interpreter vs reference; reference vs hybrid/model/attention.py).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:   # the torch reference still works
    triton = None

BLOCK_H = 16      # heads per program (tl.dot needs >= 16 rows)
BLOCK_N = 32      # cached tokens per step


def mla_decode_ref(q_lat, q_pe, ckv, kpe, slots, lengths, softmax_scale: float) -> torch.Tensor:
    """q_lat [B,H,R], q_pe [B,H,P], ckv [S,Lmax,R], kpe [S,Lmax,P], slots/lengths [B] -> o_lat [B,H,R] (fp32 math)."""
    B, H, R = q_lat.shape
    out = torch.zeros(B, H, R, dtype=torch.float32, device=q_lat.device)
    for b, (s, n) in enumerate(zip(slots.tolist(), lengths.tolist())):
        if n == 0:
            continue
        kc, kp = ckv[s, :n].float(), kpe[s, :n].float()                       # [n, R], [n, P]
        scores = (q_lat[b].float() @ kc.T + q_pe[b].float() @ kp.T) * softmax_scale   # [H, n]
        out[b] = torch.softmax(scores, dim=-1) @ kc
    return out.to(q_lat.dtype)


if triton is not None:
    @triton.jit
    def _mla_decode_kernel(QL, QP, CKV, KPE, SLOTS, LENS, O, LSE, scale,
                           s_qlb, s_qlh, s_qpb, s_qph, s_cs, s_cl, s_ps, s_pl,
                           s_ob, s_oh, s_os, s_lb, s_lh,
                           H, R, P, split_len,
                           BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                           BLOCK_N: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr):
        b = tl.program_id(0)
        hb = tl.program_id(1)
        sp = tl.program_id(2)
        slot = tl.load(SLOTS + b).to(tl.int64)
        n_keys = tl.load(LENS + b)
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_r = tl.arange(0, BLOCK_R)
        offs_p = tl.arange(0, BLOCK_P)
        hmask, rmask, pmask = offs_h < H, offs_r < R, offs_p < P
        ql = tl.load(QL + b * s_qlb + offs_h[:, None] * s_qlh + offs_r[None, :],
                     mask=hmask[:, None] & rmask[None, :], other=0.0)                 # [BH, BR]
        qp = tl.load(QP + b * s_qpb + offs_h[:, None] * s_qph + offs_p[None, :],
                     mask=hmask[:, None] & pmask[None, :], other=0.0)                 # [BH, BP]
        ckv_row = CKV + slot * s_cs
        kpe_row = KPE + slot * s_ps
        ql = ql.to(CKV.dtype.element_ty)
        qp = qp.to(KPE.dtype.element_ty)
        if DOT_F32:
            ql, qp = ql.to(tl.float32), qp.to(tl.float32)

        lo = sp * split_len
        hi = tl.minimum(lo + split_len, n_keys)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
        for start in range(lo, hi, BLOCK_N):   # every block holds >= 1 valid key, so m_new is finite
            offs_n = start + tl.arange(0, BLOCK_N)
            nmask = offs_n < hi
            kc = tl.load(ckv_row + offs_n[:, None] * s_cl + offs_r[None, :],
                         mask=nmask[:, None] & rmask[None, :], other=0.0)             # [BN, BR]
            kp = tl.load(kpe_row + offs_n[:, None] * s_pl + offs_p[None, :],
                         mask=nmask[:, None] & pmask[None, :], other=0.0)             # [BN, BP]
            if DOT_F32:
                kc, kp = kc.to(tl.float32), kp.to(tl.float32)
            s = tl.dot(ql, tl.trans(kc), input_precision=PREC)
            s += tl.dot(qp, tl.trans(kp), input_precision=PREC)
            s = tl.where(nmask[None, :], s * scale, float("-inf"))                   # [BH, BN]
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p = p.to(CKV.dtype.element_ty).to(kc.dtype)                                # P in the cache dtype
            acc = acc * alpha[:, None] + tl.dot(p, kc, input_precision=PREC)
            m_i = m_new
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(O + b * s_ob + offs_h[:, None] * s_oh + sp * s_os + offs_r[None, :], out,
                 mask=hmask[:, None] & rmask[None, :])
        tl.store(LSE + b * s_lb + offs_h * s_lh + sp, lse, mask=hmask)


def _num_splits(B: int, H: int, max_len: int) -> tuple[int, int]:
    """(splits, keys per split): enough programs to fill a GPU (~128) at small batch, >= 4 blocks a split."""
    hblocks = triton.cdiv(H, BLOCK_H)
    want = max(1, 128 // max(1, B * hblocks))
    split_len = max(4 * BLOCK_N, triton.cdiv(max(max_len, 1), want))
    split_len = triton.cdiv(split_len, BLOCK_N) * BLOCK_N
    return triton.cdiv(max(max_len, 1), split_len), split_len


def mla_decode_triton(q_lat, q_pe, ckv, kpe, slots, lengths, softmax_scale: float,
                      max_len: int | None = None) -> torch.Tensor:
    B, H, R = q_lat.shape
    P = q_pe.shape[-1]
    assert ckv.shape[-1] == R and kpe.shape[-1] == P and q_pe.shape[:2] == (B, H), "shape mismatch"
    assert ckv.stride(-1) == 1 and kpe.stride(-1) == 1, "cache rows must be contiguous"
    q_lat, q_pe = q_lat.contiguous(), q_pe.contiguous()
    if max_len is None:
        max_len = int(lengths.max()) if B else 0
    splits, split_len = _num_splits(B, H, max_len)
    o = torch.empty(B, H, splits, R, dtype=torch.float32, device=q_lat.device)
    lse = torch.empty(B, H, splits, dtype=torch.float32, device=q_lat.device)
    prec = "ieee" if ckv.dtype == torch.float32 else "tf32"
    from . import interpreting
    grid = (B, triton.cdiv(H, BLOCK_H), splits)
    _mla_decode_kernel[grid](
        q_lat, q_pe, ckv, kpe, slots.to(torch.int32), lengths.to(torch.int32), o, lse, float(softmax_scale),
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        ckv.stride(0), ckv.stride(1), kpe.stride(0), kpe.stride(1),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        H, R, P, split_len,
        BLOCK_H=BLOCK_H, BLOCK_R=max(16, triton.next_power_of_2(R)),
        BLOCK_P=max(16, triton.next_power_of_2(P)), BLOCK_N=BLOCK_N, PREC=prec, DOT_F32=interpreting())
    if splits == 1:
        return o[:, :, 0].to(q_lat.dtype)
    # combine the splits: weights exp(lse_s - max lse); an empty split has lse = -inf and weight 0
    top = lse.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lse - top)                                                    # [B, H, splits]
    out = (o * w[..., None]).sum(2) / w.sum(-1, keepdim=True).clamp_min(1e-30)
    return out.to(q_lat.dtype)


def mla_decode(q_lat, q_pe, ckv, kpe, slots, lengths, softmax_scale: float,
               max_len: int | None = None, triton: bool | None = None) -> torch.Tensor:
    """o_lat [B,H,R]: Triton on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise.
    triton: the caller's choice made once at load (gpu_kernels.use_triton_on(device)); None decides here."""
    if triton is None:
        from . import use_triton
        triton = use_triton(q_lat, q_pe, ckv, kpe)
    if triton and ckv.stride(-1) == 1 and kpe.stride(-1) == 1:
        return mla_decode_triton(q_lat, q_pe, ckv, kpe, slots, lengths, softmax_scale, max_len)
    return mla_decode_ref(q_lat, q_pe, ckv, kpe, slots, lengths, softmax_scale)
