"""Routed experts of one MoE layer on the CPU, behind a submit/wait interface.

``CPUExperts`` (backend "numba") keeps the experts in the INT4 kernel layout of ``layout.py`` and
runs ``moe_int4.py``; ``RefExperts`` (backend "ref") keeps dequantized fp32 weights and runs
``reference.moe_int4_ref``. Both: ``load_expert``/``load_expert_dense`` at load,
``submit(x, topk_ids, topk_weights)`` (returns at once), ``wait()`` -> fp32 [T, D] torch tensor,
``forward`` = submit + wait, ``dequantized(e)``, ``nbytes``.
Checked by tests/test_cpu_kernels.py; speed by tools/bench_experts.py.
"""
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

from . import layout
from .moe_int4 import combine_slots, down, down_slots, gate_up, quantize_rows, quantize_rows_serial
from .reference import dequantize_ref, moe_int4_ref

# T tokens, K top-k, E experts, D hidden, I intermediate

# One worker thread for all layers' CPU work: numba's default (workqueue) threading layer must not
# run two parallel regions at once, and the model runs its MoE layers one after the other anyway.
_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-experts")

# Activation formats: "int8" = one int8 row per 32-group (absmax/127), relative output error
# ~1.2% (TOL_INT8); "int8x2" = that row plus an int8 row of its residual (~15 bits: ~1e-4,
# TOL_INT8X2) at twice the integer work (decode stays memory-bound, prefill halves).
ACT_FORMATS = ("int8", "int8x2")
# Relative logit error of the whole model against transformers (tests/test_model.py, tiny random
# checkpoint, measured: int8 1.4e-2, int8x2 2.3e-3). int8x2 is bounded by the weights: the
# kernels use q * scale exactly, compressed-tensors rounds it to bf16 (<= 2^-9 per weight).
LOGIT_TOL = {"int8": 3e-2, "int8x2": 5e-3}
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


class _SubmitWait:
    """submit/wait/forward on top of a subclass's ``_run(x, ids, wts) -> np.ndarray``."""

    def _init_common(self, num_experts, hidden_size, intermediate_size, num_threads):
        if hidden_size % layout.GROUP or intermediate_size % layout.GROUP:
            raise ValueError(f"hidden_size ({hidden_size}) and intermediate_size ({intermediate_size}) "
                             f"must be multiples of the group size {layout.GROUP}")
        self.E, self.D, self.I = num_experts, hidden_size, intermediate_size
        # numba cannot use more threads than it started with (NUMBA_NUM_THREADS, default: cores)
        self.num_threads = min(num_threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
        self._loaded = np.zeros(num_experts, bool)
        self._future = None

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

    def submit(self, x, topk_ids, topk_weights):
        """Start the routed experts for x [T, D]; returns at once. Call wait() for the result."""
        assert self._future is None, "submit() called twice without wait()"
        args = self._check_inputs(x, topk_ids, topk_weights)
        self._future = _WORKER.submit(self._run, *args)

    def wait(self) -> torch.Tensor:
        """The output of the last submit(): fp32 [T, D]."""
        assert self._future is not None, "wait() without submit()"
        fut, self._future = self._future, None
        return torch.from_numpy(fut.result())

    def forward(self, x, topk_ids, topk_weights) -> torch.Tensor:
        self.submit(x, topk_ids, topk_weights)
        return self.wait()

    __call__ = forward

    def load_expert_dense(self, e, w_gate, w_up, w_down):
        """Dense [N, K] weights (bf16/FP8-dequantized/fp32): RTN int4 group 32, then load_expert."""
        self.load_expert(e, *layout.quantize_rtn(w_gate), *layout.quantize_rtn(w_up),
                         *layout.quantize_rtn(w_down))


class CPUExperts(_SubmitWait):
    """INT4 experts in the kernel layout, run by the Numba kernels (backend "numba")."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 num_threads: int | None = None, act_format: str = "int8"):
        if act_format not in ACT_FORMATS:
            raise ValueError(f"act_format must be one of {ACT_FORMATS}, got {act_format!r}")
        self._init_common(num_experts, hidden_size, intermediate_size, num_threads)
        self.act_format = act_format
        self.LOGIT_TOL = LOGIT_TOL[act_format]
        E, D, I = num_experts, hidden_size, intermediate_size
        # np.empty: pages are only touched when an expert is loaded
        self.wg = np.empty((E, *layout.layout_shape(I, D)), np.uint8)  # [E, I/8, D/32, 144]
        self.wu = np.empty((E, *layout.layout_shape(I, D)), np.uint8)
        self.wd = np.empty((E, *layout.layout_shape(D, I)), np.uint8)  # [E, D/8, I/32, 144]
        per_expert = 3 * D * I // 2 + 3 * D * I // layout.GROUP * 2  # on-disk int4 + bf16 scales
        assert self.nbytes == E * per_expert, (self.nbytes, E * per_expert)

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

    def load_expert(self, e, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale):
        """One expert's compressed-tensors tensors as on disk -> kernel layout (only copy kept)."""
        assert 0 <= e < self.E, f"expert {e} out of range [0, {self.E})"
        layout.repack(gate_packed, gate_scale, self.wg[e])
        layout.repack(up_packed, up_scale, self.wu[e])
        layout.repack(down_packed, down_scale, self.wd[e])
        self._loaded[e] = True

    def dequantized(self, e):
        """(w_gate [I, D], w_up [I, D], w_down [D, I]) fp32: exactly the weights the kernel uses."""
        return tuple(torch.from_numpy(layout.dequantize_layout(w[e])) for w in (self.wg, self.wu, self.wd))

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


class RefExperts(_SubmitWait):
    """Dequantized fp32 experts run by ``moe_int4_ref`` (backend "ref", the yardstick).

    Weights are dequantized exactly as compressed-tensors does (q * scale rounded to bf16), so
    the model on this backend matches transformers; the INT4 kernels use the exact product."""

    LOGIT_TOL = 1e-4  # relative logit error vs transformers (tests/test_model.py)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 num_threads: int | None = None, act_format: str = "fp32"):
        self._init_common(num_experts, hidden_size, intermediate_size, num_threads)
        E, D, I = num_experts, hidden_size, intermediate_size
        self.w_gate = np.zeros((E, I, D), np.float32)
        self.w_up = np.zeros((E, I, D), np.float32)
        self.w_down = np.zeros((E, D, I), np.float32)

    @property
    def nbytes(self) -> int:
        return self.w_gate.nbytes + self.w_up.nbytes + self.w_down.nbytes

    def load_expert(self, e, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale):
        for dst, p, s in ((self.w_gate, gate_packed, gate_scale), (self.w_up, up_packed, up_scale),
                          (self.w_down, down_packed, down_scale)):
            # straight from the on-disk format (independent of the kernel layout)
            dst[e] = dequantize_ref(p, layout.bf16_bits_to_f32(layout.bf16_bits(s)), round_bf16=True)
        self._loaded[e] = True

    def dequantized(self, e):
        return tuple(torch.from_numpy(w[e].copy()) for w in (self.w_gate, self.w_up, self.w_down))

    def _run(self, x, ids, wts):
        return moe_int4_ref(x, ids, wts, self.w_gate, self.w_up, self.w_down)
