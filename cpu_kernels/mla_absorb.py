"""Numba kernels for MLA's absorbed decode on the CPU: kv_b_proj's two halves applied per head, read in place.

MLA decode folds kv_b_proj into the query and the output (DeepSeek-V2 paper, section 2.1.2 "absorb"):
with kv_b_proj's rows grouped as [W_UK (H x nope rows) ; W_UV (H x V rows)], each of R columns,

    absorb_query(w_uk, s_uk, q, out)   q_lat[b, h, r] = sum_d q[b, h, d] * s_uk[h, d] * W_UK[h, d, r]
    absorb_output(w_uv, s_uv, o, out)  y[h, b, v]     = s_uv[h, v] * sum_r W_UV[h, v, r] * o[h, b, r]

w_* are uint16 (bf16 bit patterns) or int8, C-contiguous [H, rows, R]; s_* fp32 [H, rows] (int8) or
[H, 0] (bf16: no scale); q, o fp32 and C-contiguous; everything accumulates in fp32. A decode step reads
these weights once for a handful of tokens, so the kernels are bandwidth-bound, like dense.py's: torch's
bmm over the same bf16 views measured 1.7 GB/s at 1 token and 0.13 GB/s at 16 on a 2-core Zen 2 without
bf16 FMAs (fp32: 15 / 6 GB/s over twice the bytes); tools/bench_dense.py --mla measures these.

The query side runs over W_UK's rows (d) as axpy updates of the R-long accumulators (a row of W_UK is
contiguous in r, and read once for all tokens); the output side is dense.py's row loop per head. Work
split: `prange` over heads. Checked against float64 numpy by tests/test_cpu_dense.py.
"""
import numpy as np
from numba import njit, prange

from cpu_kernels.dense import PREFETCH, _prefetch, _rows, _widen


@njit(inline="always", fastmath=True, nogil=True)
def _axpy(acc, w, c):
    """acc[r] += c * w[r] for r < len(w), with w widened to fp32 (a loop from 0: it vectorizes)."""
    for r in range(w.shape[0]):
        acc[r] += c * _widen(w[r])


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def absorb_query(w, scale, q, out):
    """out [B, H, R] = per head h: q [B, H, D][:, h] . (W [H, D, R][h] * scale[h][:, None])."""
    H, D, R = w.shape
    B = q.shape[0]
    step = w.itemsize * R
    for h in prange(H):
        for b in range(B):
            out[b, h, :] = 0.0
        base = w[h].ctypes.data + PREFETCH
        for d in range(D):
            for j in range(0, step, 64):               # this row's lines, PREFETCH bytes ahead
                _prefetch(base + d * step + j)
            row = w[h, d]
            s = scale[h, d] if scale.shape[1] else np.float32(1.0)
            for b in range(B):
                _axpy(out[b, h], row, q[b, h, d] * s)


@njit(parallel=True, nogil=True, cache=True)
def absorb_output(w, scale, o, out):
    """out [H, B, V] = per head h: o [H, B, R][h] . (W [H, V, R][h] * scale[h][:, None])^T."""
    H, V = w.shape[0], w.shape[1]
    for h in prange(H):
        _rows(w[h], scale[h], o[h], out[h], 0, V)


def reference(w, scale, q, o):
    """float64 numpy yardstick for both kernels: (q_lat [B, H, R], y [H, B, V]) from the same widened W.
    w: (w_uk, w_uv) as above; scale: (s_uk, s_uv) or None; q [B, H, D]; o [H, B, R]."""
    def widen(a):
        if a.dtype == np.uint16:
            return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return a.astype(np.float64)
    w_uk, w_uv = widen(w[0]), widen(w[1])
    if scale is not None:
        w_uk = w_uk * scale[0][:, :, None]
        w_uv = w_uv * scale[1][:, :, None]
    q_lat = np.einsum("bhd,hdr->bhr", q.astype(np.float64), w_uk)
    y = np.einsum("hbr,hvr->hbv", o.astype(np.float64), w_uv)
    return q_lat, y
