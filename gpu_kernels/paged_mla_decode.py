"""MLA decode attention over a PAGED latent cache, absorbed form, optionally with an 8-bit cache.

The cache is one pool of rows per layer: ckv [rows, R], kpe [rows, P] with rows = num_blocks * page.
Sequence b owns the blocks block_table[b, :]; its token t lives in row block_table[b, t // page] * page
+ t % page. Otherwise the math is gpu_kernels/mla_decode.py's (MQA with one 576-wide key [c_kv | k_pe]
shared by all heads, c_kv as the value):
    score[t] = (q_lat[b,h] . ckv[row(t)] + q_pe[b,h] . kpe[row(t)]) * softmax_scale
    o_lat[b,h] = sum_t softmax(score)[t] * ckv[row(t)]

8-bit cache ("int8" | "fp8"): every row stores 1 byte per value and one fp32 scale per row and part
(ckv_scale[rows], kpe_scale[rows]); value = q * scale. int8: scale = absmax/127, round-to-nearest;
fp8 (e4m3, stored as its uint8 bits): scale = absmax/448. A separate scale for the rope part keeps its
(smaller, position-carrying) values from being crushed by the latent's range. Since a scale is one
number per key row, the kernel applies it after the dot products (q . (k*s) = s * (q . k)) and to P
before P @ V, so the 8-bit rows are read as they are.

Triton kernel: one program per (sequence, block of heads, split of the keys), as in mla_decode; every
tile of BLOCK_N keys looks up its block ids in the block table (any page size works). Combine of the
splits is mla_decode's. Without Triton (the CPU), paged_mla_decode_torch runs the batch in one padded gather.
Tests: tests/test_paged_kernels.py (interpreter vs reference; reference vs a
contiguous copy through gpu_kernels.mla_decode_ref; 8-bit round trips).
"""
from __future__ import annotations

import torch

from .mla_decode import BLOCK_H, BLOCK_N, _num_splits

try:
    import triton
    import triton.language as tl
except ImportError:   # the torch reference still works
    triton = None

FP8_MAX = 448.0        # largest finite float8_e4m3fn
INT8_MAX = 127.0
FORMATS = (None, "int8", "fp8")


def storage_dtype(fmt: str | None, dtype: torch.dtype) -> torch.dtype:
    """What a cache of this format stores: int8, the fp8 bits as uint8, or `dtype` itself."""
    return {None: dtype, "int8": torch.int8, "fp8": torch.uint8}[fmt]


def quantize_rows(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] -> (q [N, D] int8 | uint8 fp8 bits, scale [N] fp32), one scale per row (absmax)."""
    x = x.float()
    top = INT8_MAX if fmt == "int8" else FP8_MAX
    scale = x.abs().amax(-1).clamp_min(1e-30) / top
    y = x / scale[:, None]
    if fmt == "int8":
        return y.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale
    return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    v = q.float() if fmt == "int8" else q.view(torch.float8_e4m3fn).float()
    return (v * scale[:, None]).to(dtype)


def gather_rows(block_table_row: torch.Tensor, n: int, page: int) -> torch.Tensor:
    """Cache rows of tokens 0..n-1 of one sequence (block_table_row [max_blocks])."""
    t = torch.arange(n, device=block_table_row.device)
    return block_table_row.long()[t // page] * page + t % page


def paged_mla_decode_ref(q_lat, q_pe, ckv, kpe, block_table, lengths, page: int, softmax_scale: float,
                         ckv_scale=None, kpe_scale=None, fmt: str | None = None) -> torch.Tensor:
    """q_lat [B,H,R], q_pe [B,H,P], ckv [rows,R], kpe [rows,P], block_table [B,maxb], lengths [B]
    -> o_lat [B,H,R] (fp32 math): gathers each sequence's rows (dequantized), then MQA over them (the math of
    mla_decode_ref, written out here; the tests compare the two)."""
    B = q_lat.shape[0]
    out = torch.zeros(B, *q_lat.shape[1:], dtype=q_lat.dtype, device=q_lat.device)
    for b, n in enumerate(lengths.tolist()):
        if n == 0:
            continue
        rows = gather_rows(block_table[b], n, page)
        kc, kp = ckv[rows], kpe[rows]
        if fmt is not None:
            kc = dequantize_rows(kc, ckv_scale[rows], fmt, torch.float32)
            kp = dequantize_rows(kp, kpe_scale[rows], fmt, torch.float32)
        kc, kp = kc.float(), kp.float()                                             # [n, R], [n, P]
        scores = (q_lat[b].float() @ kc.T + q_pe[b].float() @ kp.T) * softmax_scale   # [H, n]
        out[b] = (torch.softmax(scores, dim=-1) @ kc).to(out.dtype)
    return out


BATCHED_MAX_ROWS = 1 << 20     # B x longest length up to which paged_mla_decode_torch gathers in one go


def paged_mla_decode_torch(q_lat, q_pe, ckv, kpe, block_table, lengths, page: int, softmax_scale: float,
                           ckv_scale=None, kpe_scale=None, fmt: str | None = None) -> torch.Tensor:
    """The same result as paged_mla_decode_ref for the whole batch in a fixed number of torch calls (the
    reference's loop costs ~10 calls per sequence and layer, which dominates a CPU decode step at batch 16):
    each sequence's rows padded to the longest length, masked to -inf before the softmax. Falls back to the
    reference when B x longest exceeds BATCHED_MAX_ROWS (the padded gather would be large)."""
    B = q_lat.shape[0]
    n_max = int(lengths.max()) if B else 0
    if n_max == 0 or B * n_max > BATCHED_MAX_ROWS:
        return paged_mla_decode_ref(q_lat, q_pe, ckv, kpe, block_table, lengths, page, softmax_scale,
                                    ckv_scale, kpe_scale, fmt)
    t = torch.arange(n_max, device=q_lat.device)
    valid = t[None, :] < lengths.to(t.device)[:, None]                                  # [B, n]
    rows = block_table.long()[:, t // page] * page + t % page
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    kc, kp = ckv[rows], kpe[rows]                                                       # [B, n, R], [B, n, P]
    if fmt is not None:
        kc = dequantize_rows(kc.flatten(0, 1), ckv_scale[rows].flatten(), fmt, torch.float32).view(*rows.shape, -1)
        kp = dequantize_rows(kp.flatten(0, 1), kpe_scale[rows].flatten(), fmt, torch.float32).view(*rows.shape, -1)
    kc, kp = kc.float(), kp.float()
    scores = (q_lat.float() @ kc.transpose(1, 2) + q_pe.float() @ kp.transpose(1, 2)) * softmax_scale  # [B, H, n]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)                 # a sequence of length 0: zeros
    return (probs @ kc).to(q_lat.dtype)


if triton is not None:
    @triton.jit
    def _paged_mla_decode_kernel(QL, QP, CKV, KPE, CS, PS, BT, LENS, O, LSE, scale,
                                 s_qlb, s_qlh, s_qpb, s_qph, s_ck, s_pk, s_btb,
                                 s_ob, s_oh, s_os, s_lb, s_lh,
                                 H, R, P, split_len, page,
                                 BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                                 BLOCK_N: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
                                 QUANT: tl.constexpr):
        b = tl.program_id(0)
        hb = tl.program_id(1)
        sp = tl.program_id(2)
        n_keys = tl.load(LENS + b)
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_r = tl.arange(0, BLOCK_R)
        offs_p = tl.arange(0, BLOCK_P)
        hmask, rmask, pmask = offs_h < H, offs_r < R, offs_p < P
        ql = tl.load(QL + b * s_qlb + offs_h[:, None] * s_qlh + offs_r[None, :],
                     mask=hmask[:, None] & rmask[None, :], other=0.0)                 # [BH, BR]
        qp = tl.load(QP + b * s_qpb + offs_h[:, None] * s_qph + offs_p[None, :],
                     mask=hmask[:, None] & pmask[None, :], other=0.0)                 # [BH, BP]
        if QUANT == 0:
            ql = ql.to(CKV.dtype.element_ty)
            qp = qp.to(KPE.dtype.element_ty)
        if DOT_F32:
            ql, qp = ql.to(tl.float32), qp.to(tl.float32)

        lo = sp * split_len
        hi = tl.minimum(lo + split_len, n_keys)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
        for start in range(lo, hi, BLOCK_N):   # every tile holds >= 1 valid key, so m_new is finite
            offs_n = start + tl.arange(0, BLOCK_N)
            nmask = offs_n < hi
            blk = tl.load(BT + b * s_btb + offs_n // page, mask=nmask, other=0).to(tl.int64)
            row = blk * page + (offs_n % page)                                         # [BN] cache rows
            kc = tl.load(CKV + row[:, None] * s_ck + offs_r[None, :],
                         mask=nmask[:, None] & rmask[None, :], other=0)               # [BN, BR]
            kp = tl.load(KPE + row[:, None] * s_pk + offs_p[None, :],
                         mask=nmask[:, None] & pmask[None, :], other=0)               # [BN, BP]
            if QUANT == 1:      # int8 values are exact in bf16 / fp32
                kc, kp = kc.to(tl.float32).to(ql.dtype), kp.to(tl.float32).to(qp.dtype)
            if QUANT == 2:      # fp8 e4m3 bits -> exact in bf16 / fp32
                kc = kc.to(tl.float8e4nv, bitcast=True).to(tl.float32).to(ql.dtype)
                kp = kp.to(tl.float8e4nv, bitcast=True).to(tl.float32).to(qp.dtype)
            if DOT_F32:
                kc, kp = kc.to(tl.float32), kp.to(tl.float32)
            sc = tl.dot(ql, tl.trans(kc), input_precision=PREC)
            sp_ = tl.dot(qp, tl.trans(kp), input_precision=PREC)
            if QUANT != 0:
                cs = tl.load(CS + row, mask=nmask, other=0.0)
                ps = tl.load(PS + row, mask=nmask, other=0.0)
                sc = sc * cs[None, :]
                sp_ = sp_ * ps[None, :]
            s = tl.where(nmask[None, :], (sc + sp_) * scale, float("-inf"))          # [BH, BN]
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if QUANT != 0:
                p = p * cs[None, :]                  # P @ (k * s) = (P * s) @ k
            p = p.to(kc.dtype)
            acc = acc * alpha[:, None] + tl.dot(p, kc, input_precision=PREC)
            m_i = m_new
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(O + b * s_ob + offs_h[:, None] * s_oh + sp * s_os + offs_r[None, :], out,
                 mask=hmask[:, None] & rmask[None, :])
        tl.store(LSE + b * s_lb + offs_h * s_lh + sp, lse, mask=hmask)


def paged_mla_decode_triton(q_lat, q_pe, ckv, kpe, block_table, lengths, page: int, softmax_scale: float,
                            ckv_scale=None, kpe_scale=None, fmt: str | None = None,
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
    from . import interpreting
    quant = FORMATS.index(fmt)
    prec = "ieee" if (ckv.dtype == torch.float32 or (quant and q_lat.dtype == torch.float32)) else "tf32"
    dummy = lengths if quant == 0 else None
    bt = block_table.to(torch.int32)
    grid = (B, triton.cdiv(H, BLOCK_H), splits)
    _paged_mla_decode_kernel[grid](
        q_lat, q_pe, ckv, kpe, ckv_scale if quant else dummy, kpe_scale if quant else dummy, bt,
        lengths.to(torch.int32), o, lse, float(softmax_scale),
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), ckv.stride(0), kpe.stride(0),
        bt.stride(0), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        H, R, P, split_len, page,
        BLOCK_H=BLOCK_H, BLOCK_R=max(16, triton.next_power_of_2(R)),
        BLOCK_P=max(16, triton.next_power_of_2(P)), BLOCK_N=BLOCK_N, PREC=prec, DOT_F32=interpreting(),
        QUANT=quant)
    if splits == 1:
        return o[:, :, 0].to(q_lat.dtype)
    top = lse.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lse - top)                                                    # [B, H, splits]
    out = (o * w[..., None]).sum(2) / w.sum(-1, keepdim=True).clamp_min(1e-30)
    return out.to(q_lat.dtype)


def paged_mla_decode(q_lat, q_pe, ckv, kpe, block_table, lengths, page: int, softmax_scale: float,
                     ckv_scale=None, kpe_scale=None, fmt: str | None = None, max_len: int | None = None,
                     triton: bool | None = None) -> torch.Tensor:
    """o_lat [B,H,R]: Triton on CUDA (or under TRITON_INTERPRET=1), paged_mla_decode_torch otherwise."""
    if triton is None:
        from . import use_triton
        triton = use_triton(q_lat, q_pe, ckv, kpe)
    if triton and fmt == "fp8" and q_lat.is_cuda and torch.cuda.get_device_capability(q_lat.device) < (8, 9):
        triton = False             # Triton converts e4m3 on sm_89+ (Ada, Hopper) only
    if triton and ckv.stride(-1) == 1 and kpe.stride(-1) == 1:
        return paged_mla_decode_triton(q_lat, q_pe, ckv, kpe, block_table, lengths, page, softmax_scale,
                                       ckv_scale, kpe_scale, fmt, max_len)
    return paged_mla_decode_torch(q_lat, q_pe, ckv, kpe, block_table, lengths, page, softmax_scale,
                                  ckv_scale, kpe_scale, fmt)
