"""Numba matrix-vector kernels for dense Linears on the CPU (decode: a few rows), at the read bandwidth.

    linear_bf16(w, x, y)          w uint16 [N, K] (bf16 bit patterns), x fp32 [T, K] -> y fp32 [T, N]
    linear_int8(w, scale, x, y)   w int8 [N, K], scale fp32 [N] (per output channel), same x / y

y[t, n] = sum_k x[t, k] * W[n, k] (int8: times scale[n]), accumulated in fp32. A decode step reads
every weight once, so these are bandwidth-bound: bf16 is widened in registers (bits << 16 reinterpreted
as fp32, exact) and int8 by a sign extension + int->float conversion, then FMAs; LLVM vectorizes the
inner loop to the widest vectors the CPU offers (8 fp32 lanes with AVX2, 16 with AVX-512). With 4 or
more tokens, two weight rows x four tokens go through one pass (_dot2x4: 8 accumulators, each loaded
weight and x element used 2-4 times; x rows of 16 tokens do not fit L1, so sharing their loads between
two rows is what counts): measured on a 2-core Zen 2, 4 / 16 tokens 17.9 / 6.3-7.1 GB/s of bf16 weights
against 14.3 / 3.5-4.1 with one row x four tokens. Work split: `prange` over blocks
of ROWS_PER_ITEM output rows (all threads, GIL released).

Why the 1-D helpers: inside a parfor, indexing the 2-D array element by element was not vectorized
(measured ~10x slower); a row view w[n] passed to a small @njit dot function is.
`linear_ref` (reference.py) is the plain numpy yardstick. Checked by tests/test_cpu_dense.py; speed by
tools/bench_experts.py --dense.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

ROWS_PER_ITEM = 64
# Software prefetch distance in the weight stream, in bytes ahead of the block being read. The dot
# loops go over BLOCK_BYTES (8 cache lines) at a time and prefetch the 8 lines PREFETCH bytes ahead
# before each block, so the prefetches are spread through the stream. Measured on a 2-core Zen 2
# (tools/bench_dense.py): no software prefetch 0.62-0.88 of read bandwidth at 1 row, a burst of a whole
# row's prefetches at the row's start 0.61-0.73, spread at 1 KiB 0.86-0.95.
PREFETCH = 1024
BLOCK_BYTES = 512


@intrinsic
def _prefetch(typingctx, addr):
    """Prefetch the cache line at an integer address (read, keep in all levels)."""
    sig = types.void(types.int64)

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(
            ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)]))
        i32 = ir.IntType(32)
        builder.call(fn, [builder.inttoptr(args[0], i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                          ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", nogil=True)
def _prefetch_block(addr):
    """Prefetch the BLOCK_BYTES at addr (a hint: an address past the array cannot fault)."""
    for j in range(BLOCK_BYTES // 64):
        _prefetch(addr + 64 * j)


@intrinsic
def _f32_from_bits(typingctx, v):
    """Reinterpret an int32's bits as fp32 (LLVM bitcast; vectorizes with the loop around it)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always", fastmath=True, nogil=True)
def _bf16(u):
    return _f32_from_bits(np.int32(u) << 16)


def _widen(v):
    """A weight element as fp32 (the typed versions below: uint16 bf16 bits, or int8)."""


@overload(_widen, inline="always", fastmath=True)
def _widen_typed(v):
    if v == types.uint16:
        return lambda v: _bf16(v)
    if v == types.int8:
        return lambda v: np.float32(v)


# One generic code path: numba compiles it once per weight dtype (uint16 bf16 bits, int8); a block is
# BLOCK_BYTES of weights whatever their size. The inner loops run from 0 over a slice (a loop with another
# start was not vectorized: numba's negative-index wraparound check stays in); they are inlined into the
# blocked loops below.
@njit(inline="always", fastmath=True, nogil=True)
def _part1(w, x0):
    a0 = np.float32(0.0)
    for k in range(w.shape[0]):
        a0 += _widen(w[k]) * x0[k]
    return a0


@njit(inline="always", fastmath=True, nogil=True)
def _part4(w, x0, x1, x2, x3):
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for k in range(w.shape[0]):
        v = _widen(w[k])
        a0 += v * x0[k]
        a1 += v * x1[k]
        a2 += v * x2[k]
        a3 += v * x3[k]
    return a0, a1, a2, a3


@njit(inline="always", fastmath=True, nogil=True)
def _part2x4(w0, w1, x0, x1, x2, x3):
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    for k in range(w0.shape[0]):
        v0 = _widen(w0[k])
        v1 = _widen(w1[k])
        u = x0[k]
        a00 += v0 * u
        a10 += v1 * u
        u = x1[k]
        a01 += v0 * u
        a11 += v1 * u
        u = x2[k]
        a02 += v0 * u
        a12 += v1 * u
        u = x3[k]
        a03 += v0 * u
        a13 += v1 * u
    return a00, a01, a02, a03, a10, a11, a12, a13


@njit(fastmath=True, nogil=True, cache=True)
def _dot1(w, x0):
    B = BLOCK_BYTES // w.itemsize
    K = w.shape[0]
    base = w.ctypes.data + PREFETCH
    a0 = np.float32(0.0)
    kb = 0
    while kb + B <= K:
        _prefetch_block(base + kb * w.itemsize)
        a0 += _part1(w[kb:kb + B], x0[kb:kb + B])
        kb += B
    return a0 + _part1(w[kb:], x0[kb:])


@njit(fastmath=True, nogil=True, cache=True)
def _dot4(w, x0, x1, x2, x3):
    B = BLOCK_BYTES // w.itemsize
    K = w.shape[0]
    base = w.ctypes.data + PREFETCH
    a0 = a1 = a2 = a3 = np.float32(0.0)
    kb = 0
    while kb + B <= K:
        _prefetch_block(base + kb * w.itemsize)
        b0, b1, b2, b3 = _part4(w[kb:kb + B], x0[kb:kb + B], x1[kb:kb + B], x2[kb:kb + B], x3[kb:kb + B])
        a0 += b0
        a1 += b1
        a2 += b2
        a3 += b3
        kb += B
    b0, b1, b2, b3 = _part4(w[kb:], x0[kb:], x1[kb:], x2[kb:], x3[kb:])
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@njit(fastmath=True, nogil=True, cache=True)
def _dot2x4(w0, w1, x0, x1, x2, x3):
    """Two weight rows x four token rows: each weight and each x element loaded once for 2-4 products."""
    B = BLOCK_BYTES // w0.itemsize
    K = w0.shape[0]
    p0, p1 = w0.ctypes.data + PREFETCH, w1.ctypes.data + PREFETCH
    acc = np.zeros(8, np.float32)
    kb = 0
    while kb + B <= K:
        _prefetch_block(p0 + kb * w0.itemsize)
        _prefetch_block(p1 + kb * w0.itemsize)
        r = _part2x4(w0[kb:kb + B], w1[kb:kb + B], x0[kb:kb + B], x1[kb:kb + B], x2[kb:kb + B], x3[kb:kb + B])
        for i in range(8):
            acc[i] += r[i]
        kb += B
    r = _part2x4(w0[kb:], w1[kb:], x0[kb:], x1[kb:], x2[kb:], x3[kb:])
    for i in range(8):
        acc[i] += r[i]
    return acc


@njit(inline="always", nogil=True)
def _out(a, scale, n):
    """A row's sum as stored: times scale[n] where there is a scale (int8), as it is (bf16: scale empty)."""
    return a * scale[n] if scale.shape[0] else a


@njit(nogil=True, cache=True)
def _rows(w, scale, x, y, n0, n1):
    """Output rows n0..n1: pairs of weight rows x groups of four tokens through _dot2x4 (T >= 4), the
    rest row by row (_dot4 / _dot1: one token, as in batch-1 decode, reads each row once)."""
    T = x.shape[0]
    n = n0
    if T >= 4:
        while n + 2 <= n1:
            t = 0
            while t + 4 <= T:
                a = _dot2x4(w[n], w[n + 1], x[t], x[t + 1], x[t + 2], x[t + 3])
                for i in range(4):
                    y[t + i, n] = _out(a[i], scale, n)
                    y[t + i, n + 1] = _out(a[4 + i], scale, n + 1)
                t += 4
            while t < T:
                y[t, n] = _out(_dot1(w[n], x[t]), scale, n)
                y[t, n + 1] = _out(_dot1(w[n + 1], x[t]), scale, n + 1)
                t += 1
            n += 2
    for n in range(n, n1):
        wr = w[n]
        t = 0
        while t + 4 <= T:
            a = _dot4(wr, x[t], x[t + 1], x[t + 2], x[t + 3])
            for i in range(4):
                y[t + i, n] = _out(a[i], scale, n)
            t += 4
        while t < T:
            y[t, n] = _out(_dot1(wr, x[t]), scale, n)
            t += 1


@njit(parallel=True, nogil=True, cache=True)
def _linear(w, scale, x, y):
    N = w.shape[0]
    for it in prange((N + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM):
        _rows(w, scale, x, y, it * ROWS_PER_ITEM, min(N, (it + 1) * ROWS_PER_ITEM))


_NO_SCALE = np.zeros(0, np.float32)


def linear_bf16(w, x, y):
    """y [T, N] = x [T, K] . bf16(w [N, K])^T (w: uint16 bit patterns, C-contiguous)."""
    _linear(w, _NO_SCALE, x, y)


def linear_int8(w, scale, x, y):
    """y [T, N] = (x [T, K] . w [N, K]^T) * scale [N] (w int8, C-contiguous)."""
    _linear(w, scale, x, y)


@njit(parallel=True, cache=True)
def _touch(a):
    for i in prange(a.shape[0]):
        a[i] += 1


def threading_layer() -> str:
    """numba's threading layer ("omp", "tbb" or "workqueue"; the last cannot run parallel kernels from two
    threads at once), after one tiny parallel call so that numba has chosen it."""
    import numba
    _touch(np.zeros(4))
    return numba.threading_layer()


def linear(w: np.ndarray, x: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Checked entry point: x fp32 [T, K]; w uint16 (bf16 bits) or int8 [N, K] (+ scale fp32 [N])."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"shapes do not match: x {x.shape}, w {w.shape}")
    if not w.flags.c_contiguous:
        raise ValueError("w must be C-contiguous")
    y = np.empty((x.shape[0], w.shape[0]), np.float32)
    if w.dtype == np.uint16:
        linear_bf16(w, x, y)
    elif w.dtype == np.int8:
        if scale is None or scale.shape != (w.shape[0],):
            raise ValueError("int8 weights need a per-output-channel fp32 scale [N]")
        linear_int8(w, np.ascontiguousarray(scale, dtype=np.float32), x, y)
    else:
        raise ValueError(f"weight dtype {w.dtype} not supported (uint16 bf16 bits or int8)")
    return y
