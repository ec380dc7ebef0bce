"""Routed experts of one MoE layer on the CPU: INT4 weights in the kernel layout, Numba kernels.

``CPUExperts`` keeps the experts in the layout of ``layout.py`` and runs ``moe_int4.py``:
``set_expert`` at load (nibbles + bf16 scales), ``forward(x, topk_ids, topk_weights)`` -> fp32 [T, D]
torch tensor (synchronous: the runtime calls it from its one expert worker thread, and the kernels
release the GIL), ``dequantized(e)`` (exactly the weights the kernels use, for tests), ``nbytes``.
Checked by tests/test_cpu_kernels.py against ``reference.moe_int4_ref``; speed by tools/bench_experts.py.
"""
import threading

import numba
import numpy as np
import torch

from . import layout
from .moe_int4 import combine_slots, down, down_slots, gate_up, quantize_rows, quantize_rows_serial

# T tokens, K top-k, E experts, D hidden, I intermediate

# numba's default (workqueue) threading layer must not run two parallel regions at once; the runtime
# calls the experts from one worker thread, and this lock keeps two models in one process apart too.
_PARALLEL_REGION = threading.Lock()

# Activation formats: "int8" = one int8 row per 32-group (absmax/127), relative output error
# ~1.2%; "int8x2" = that row plus an int8 row of its residual (~15 bits: ~1e-4) at twice the
# integer work (decode stays memory-bound, prefill halves).
ACT_FORMATS = ("int8", "int8x2")
FEW_SLOTS = 64         # up to this many (token, expert) slots: decode-style down_slots
FEW_TOKENS = 16        # up to this many tokens: quantize x on the worker thread itself
GATE_UP_ROWS = 128     # intermediate rows per gate_up item: 2 contiguous runs of 516 KB at K2.6 size
DOWN_SLOT_ROWS = 256   # rows per down_slots item (one contiguous 74 KB run of an expert)


def _as_np(a, dtype):
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        a = a.float() if dtype == np.float32 else a
        a = a.numpy()
    return np.ascontiguousarray(a, dtype=dtype)


class CPUExperts:
    """INT4 experts in the kernel layout, run by the Numba kernels (backend "numba")."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 num_threads: int | None = None, act_format: str = "int8"):
        if act_format not in ACT_FORMATS:
            raise ValueError(f"act_format must be one of {ACT_FORMATS}, got {act_format!r}")
        if hidden_size % layout.GROUP or intermediate_size % layout.GROUP:
            raise ValueError(f"hidden_size ({hidden_size}) and intermediate_size ({intermediate_size}) "
                             f"must be multiples of the group size {layout.GROUP}")
        self.E, self.D, self.I = num_experts, hidden_size, intermediate_size
        # numba cannot use more threads than it started with (NUMBA_NUM_THREADS, default: cores)
        self.num_threads = min(num_threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
        self._loaded = np.zeros(num_experts, bool)
        self.act_format = act_format
        E, D, I = num_experts, hidden_size, intermediate_size
        # np.empty: pages are only touched when an expert is loaded
        self.wg = np.empty((E, *layout.layout_shape(I, D)), np.uint8)  # [E, I/8, D/32, 144]
        self.wu = np.empty((E, *layout.layout_shape(I, D)), np.uint8)
        self.wd = np.empty((E, *layout.layout_shape(D, I)), np.uint8)  # [E, D/8, I/32, 144]
        # exactly the on-disk INT4 + scale bytes: 144 per 8 rows x 32 inputs (layout.py)
        assert self.nbytes == E * 3 * D * I // 32 * 18, (self.nbytes, E * 3 * D * I // 32 * 18)

    @property
    def nbytes(self) -> int:
        return self.wg.nbytes + self.wu.nbytes + self.wd.nbytes

    @property
    def arrays(self) -> dict:
        """The repacked weights (layout.LAYOUT_VERSION), e.g. to save a cache next to the checkpoint."""
        return {"gate": self.wg, "up": self.wu, "down": self.wd}

    @classmethod
    def from_arrays(cls, gate, up, down, num_threads=None, act_format="int8"):
        """Adopt repacked weights without copying, e.g. ``np.load(path, mmap_mode="c")`` of a
        saved ``arrays`` cache (mode "c" or "r+": numba compiles read-only arrays separately).
        Every expert counts as loaded."""
        E, ntile, GD, blk = gate.shape
        assert blk == layout.BLOCK_BYTES and up.shape == gate.shape, (gate.shape, up.shape)
        D, I = GD * layout.GROUP, ntile * layout.TILE
        assert down.shape == (E, *layout.layout_shape(D, I)), (down.shape, (E, *layout.layout_shape(D, I)))
        for a in (gate, up, down):
            assert a.dtype == np.uint8 and a.flags.c_contiguous and a.flags.writeable, \
                "arrays must be C-contiguous, writeable uint8 (np.load(..., mmap_mode='c'))"
        ex = cls.__new__(cls)
        ex.__init__(0, D, I, num_threads, act_format)
        ex.E, ex.wg, ex.wu, ex.wd = E, gate, up, down
        ex._loaded = np.ones(E, bool)
        return ex

    def set_expert(self, e, gate_u, gate_scale, up_u, up_scale, down_u, down_scale):
        """One expert's nibbles (uint8 [N, K], u = q + 8) and bf16 scales -> kernel layout (only copy kept)."""
        assert 0 <= e < self.E, f"expert {e} out of range [0, {self.E})"
        layout.repack(gate_u, gate_scale, self.wg[e])
        layout.repack(up_u, up_scale, self.wu[e])
        layout.repack(down_u, down_scale, self.wd[e])
        self._loaded[e] = True

    def dequantized(self, e):
        """(w_gate [I, D], w_up [I, D], w_down [D, I]) fp32: exactly the weights the kernel uses."""
        return tuple(torch.from_numpy(layout.dequantize_layout(w[e])) for w in (self.wg, self.wu, self.wd))

    def _check_inputs(self, x, topk_ids, topk_weights):
        x = _as_np(x, np.float32)
        ids = _as_np(topk_ids, np.int64)
        wts = _as_np(topk_weights, np.float32)
        assert x.ndim == 2 and x.shape[1] == self.D, f"x must be [T, {self.D}], got {x.shape}"
        assert ids.shape == wts.shape and ids.shape[0] == x.shape[0], \
            f"topk_ids {ids.shape} / topk_weights {wts.shape} do not match x {x.shape}"
        if ids.size and (ids.min() < 0 or ids.max() >= self.E):
            raise ValueError(f"expert ids must be in [0, {self.E}), got [{ids.min()}, {ids.max()}]")
        if ids.size and not self._loaded[ids].all():
            raise ValueError(f"experts {sorted(set(ids[~self._loaded[ids]].tolist()))[:8]} were never loaded")
        return x, ids, wts

    def forward(self, x, topk_ids, topk_weights) -> torch.Tensor:
        """y[t] = sum_k w[t,k] * expert_{ids[t,k]}(x[t]) for x [T, D]: fp32 [T, D]."""
        args = self._check_inputs(x, topk_ids, topk_weights)
        with _PARALLEL_REGION:
            return torch.from_numpy(self._run(*args))

    __call__ = forward

    def _run(self, x, ids, wts):
        numba.set_num_threads(min(self.num_threads, numba.config.NUMBA_NUM_THREADS))
        T, K = ids.shape
        y = np.zeros((T, self.D), np.float32)
        if T == 0 or K == 0:
            return y
        flat, fw = ids.reshape(-1), wts.reshape(-1)
        ftok = np.repeat(np.arange(T, dtype=np.int64), K)
        if not fw.all():  # zero-weight slots (e.g. stand-ins for GPU-resident experts) add nothing
            keep = fw != 0
            flat, fw, ftok = flat[keep], fw[keep], ftok[keep]
            if flat.size == 0:
                return y
        order = np.argsort(flat, kind="stable")  # slots sorted by expert
        slot_tok = ftok[order]
        slot_w = fw[order]
        counts = np.bincount(flat, minlength=self.E)
        estart = np.zeros(self.E + 1, np.int64)
        np.cumsum(counts, out=estart[1:])
        act_e = np.nonzero(counts)[0].astype(np.int64)
        rows = next(r for r in (GATE_UP_ROWS, 64, 32) if self.I % r == 0)
        nchunk = self.I // rows
        item_e = np.repeat(act_e, nchunk)
        item_r0 = np.tile(np.arange(nchunk, dtype=np.int64) * rows, act_e.shape[0])
        S = flat.size
        if S > FEW_SLOTS:
            # prefill: experts differ in token counts; interleave them so that prange's static
            # split gives each thread a similar mix. Decode keeps expert order: each thread then
            # streams long contiguous runs and the software prefetch runs into the next item.
            perm = np.argsort(np.tile(np.arange(nchunk), act_e.shape[0]), kind="stable")
            item_e, item_r0 = item_e[perm], item_r0[perm]

        split = 2 if self.act_format == "int8x2" else 1
        xq = np.empty((split * T, self.D), np.int8)
        xasc = np.empty((split * T, 2 * self.D // 32), np.float32)
        (quantize_rows_serial if T <= FEW_TOKENS else quantize_rows)(x, xq, xasc, split)
        xrow = (split * slot_tok[:, None] + np.arange(split)).reshape(-1)  # activation rows per slot
        hq = np.empty((split * S, self.I), np.int8)
        hasc = np.empty((split * S, 2 * self.I // 32), np.float32)
        gate_up(self.wg, self.wu, xq, xasc, xrow, split, estart, item_e, item_r0, rows, hq, hasc)
        # down is linear: the split rows of h are just more slots (same token, same weight)
        if split == 2:
            slot_tok, slot_w, estart, S = np.repeat(slot_tok, 2), np.repeat(slot_w, 2), 2 * estart, 2 * S
        if S <= FEW_SLOTS:
            rows = next(r for r in (DOWN_SLOT_ROWS, 128, 64, 32) if self.D % r == 0)
            nd = self.D // rows
            d_e = np.repeat(act_e, nd)  # expert order: contiguous runs per thread (see above)
            d_r0 = np.tile(np.arange(nd, dtype=np.int64) * rows, act_e.shape[0])
            out = np.empty((S, self.D), np.float32)
            down_slots(self.wd, hq, hasc, estart, d_e, d_r0, rows, out)
            combine_slots(out, slot_tok, slot_w, y)
        else:
            down(self.wd, hq, hasc, slot_tok, slot_w, act_e, estart, y)
        return y
