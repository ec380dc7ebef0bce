"""The accelerator side's Linears on a CPU-only machine: our own matrix-vector kernels at decode.

When the model runs on the CPU, every decode step reads all of the accelerator-side Linear weights
(attention, dense layer 0, shared experts, lm_head) once for a handful of rows. torch's bf16 `mm`
reaches about half the read bandwidth there, and float32 reads twice the bytes of the bf16 checkpoint.
`CPULinear` keeps the weight as
    "bf16": the checkpoint's bf16 values (exact for a bf16 checkpoint even when the model runs in
            float32: those weights were widened from bf16 at load), 2 bytes per weight;
    "int8": per-output-channel absmax int8 + an fp32 scale (gpu_kernels.quantize_weight_8bit, the
            same quantizer as --gpu-weights int8), 1 byte per weight;
and multiplies with cpu_kernels.dense (Numba, fp32 accumulation) when a call has at most
DECODE_ROWS rows (decode, and short prompts); longer calls (prefill) widen the weight to fp32 in chunks of
output rows and use torch's fp32 matmul, compute-bound there (also for a bf16 model: torch's bf16 matmul
measured 0.3 GFLOP/s against 147 in fp32 on a 2-core Zen 2 without bf16 FMAs). The output has the
input's dtype. DECODE_ROWS: on K2.6's attention and shared-expert shapes, 2-core Zen 2, the Numba kernels
gave 70-80 GFLOP/s at 16-256 rows and the widen + matmul path 15 / 56 / 75 / 99 at 16 / 64 / 128 / 256.

The default (`LLM(cpu_weights="auto")`, resolve_cpu_weights) is "bf16" when the accelerator side runs on the
CPU without gpu_weights quantization (hybrid.formats.choose_cpu_weights): the products are the
same fp32 products of the same bf16 values as torch's float32 Linear, in another summation order, for
half the bytes read. A module whose weight is not exactly a bf16 value (a float32 checkpoint) keeps
torch's Linear under "auto". "int8" halves the bytes again at a measured logit error and stays opt-in.

`swap_cpu_linears(model, fmt)` replaces the same modules as hybrid/model/int8_linear.py's
quantize_model_linears (QUANTIZABLE + lm_head; the router stays fp32) and kv_b_proj: the absorbed decode
(attention.py) reads its two halves W_UK / W_UV in place through cpu_kernels/mla_absorb.py (mla_query,
mla_output), where torch's bmm over the bf16 views measured 1.7 GB/s at 1 token and 0.13 GB/s at 16 on
a 2-core Zen 2. Tests: tests/test_cpu_dense.py. Speed: tools/bench_generate.py --cpu-weights.
"""
from __future__ import annotations

import contextlib
import threading

import numba
import numpy as np
import torch
from torch import nn

from cpu_kernels.dense import linear_bf16, linear_int8, threading_layer
from cpu_kernels.mla_absorb import absorb_output, absorb_query
from gpu_kernels import quantize_weight_8bit
from hybrid.formats import choose_cpu_weights
from hybrid.model.int8_linear import swap_linears

FORMATS = ("bf16", "int8")
DECODE_ROWS = 64                 # calls with more rows (prefill) go through torch's matmul
PREFILL_CHUNK_BYTES = 64 << 20   # widened weight chunk for the prefill path (fp32 bytes)


def _threads() -> int:
    """torch's thread count for the accelerator side (LLM accel_threads), within numba's pool."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


_local = threading.local()


def _scratch(n: int) -> torch.Tensor:
    """A flat fp32 buffer of at least n elements, one per thread, kept between calls."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):     # a normal tensor: writable in and out of inference mode
            buf = _local.buf = torch.empty(n, dtype=torch.float32)
    return buf


@contextlib.contextmanager
def _numba_threads():
    """numba's kernels below run on torch's thread count, restored after."""
    prev = numba.get_num_threads()
    numba.set_num_threads(_threads())
    try:
        yield
    finally:
        numba.set_num_threads(prev)


class CPULinear(nn.Module):
    """y = x . W^T with W held as bf16 bits (uint16 [N, K]) or int8 [N, K] * fp32 scale [N]; no bias."""

    def __init__(self, in_features: int, out_features: int, fmt: str = "bf16"):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"CPU weight format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        wdtype = torch.int16 if fmt == "bf16" else torch.int8       # bf16 kept as its bit pattern
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=wdtype))
        self.register_buffer("weight_scale", torch.ones(out_features if fmt == "int8" else 0, dtype=torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "bf16") -> "CPULinear":
        assert linear.bias is None, "the model has no biases; CPULinear does not store one"
        w = linear.weight.detach()
        if w.device.type != "cpu":
            raise ValueError("CPULinear is for a model on the CPU")
        m = cls(linear.in_features, linear.out_features, fmt)
        if fmt == "bf16":
            m.weight_q = w.to(torch.bfloat16).contiguous().view(torch.int16)
        else:
            q, scale = quantize_weight_8bit(w, "int8")
            m.weight_q, m.weight_scale = q.contiguous(), scale.contiguous()
        return m

    @property
    def nbytes(self) -> int:
        return self.weight_q.numel() * self.weight_q.element_size() + self.weight_scale.numel() * 4

    def dense_weight(self, rows: slice = slice(None), dtype: torch.dtype = torch.float32,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight this module multiplies by (rows of it), widened to `dtype`; into `out` (fp32, the
        rows' shape) when given."""
        q = self.weight_q[rows]
        if out is not None:
            if self.fmt == "bf16":
                return out.copy_(q.view(torch.bfloat16))
            return out.copy_(q).mul_(self.weight_scale[rows, None])
        if self.fmt == "bf16":
            return q.view(torch.bfloat16).to(dtype)
        return (q.to(torch.float32) * self.weight_scale[rows, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)
        T = x2.shape[0]
        if T <= DECODE_ROWS:
            xf = x2.detach().to(torch.float32).contiguous().numpy()
            y = np.empty((T, self.out_features), np.float32)
            with _numba_threads():
                if self.fmt == "bf16":
                    linear_bf16(self.weight_q.numpy().view(np.uint16), xf, y)
                else:
                    linear_int8(self.weight_q.numpy(), self.weight_scale.numpy(), xf, y)
            out = torch.from_numpy(y)
        else:
            # fp32: torch's bf16 matmul on a CPU without bf16 FMAs measured 0.3 vs 147 GFLOP/s. The weight is
            # widened chunk by chunk into one reused buffer (a fresh 64 MiB tensor per chunk cost its page
            # faults every call: ~4x slower at 64 tokens)
            step = max(1, PREFILL_CHUNK_BYTES // (4 * K))
            xc = x2.to(torch.float32)
            out = torch.empty(T, self.out_features, dtype=torch.float32)
            buf = _scratch(min(step, self.out_features) * K)
            for n0 in range(0, self.out_features, step):
                rows = slice(n0, min(self.out_features, n0 + step))
                w = self.dense_weight(rows, out=buf[:(rows.stop - n0) * K].view(-1, K))
                torch.matmul(xc, w.T, out=out[:, rows])
        return out.to(x.dtype).reshape(*lead, self.out_features)

    def _mla_halves(self, heads: int, nope: int):
        """kv_b_proj's W_UK [H, nope, R] and W_UV [H, V, R] as numpy views of the held weight, and their
        scales ([H, rows], or [H, 0] for bf16): rows grouped as the loader's regroup_kv_b leaves them."""
        w = self.weight_q.numpy()
        w = w.view(np.uint16) if self.fmt == "bf16" else w
        split, R = heads * nope, self.in_features
        s = self.weight_scale.numpy()
        s_uk = s[:split].reshape(heads, nope) if self.fmt == "int8" else np.zeros((heads, 0), np.float32)
        s_uv = s[split:].reshape(heads, -1) if self.fmt == "int8" else np.zeros((heads, 0), np.float32)
        return w[:split].reshape(heads, nope, R), w[split:].reshape(heads, -1, R), s_uk, s_uv

    def mla_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """MLA's absorbed query for kv_b_proj: q_nope [B, H, nope] -> q_lat [B, H, R] (cpu_kernels.mla_absorb)."""
        B, H, nope = q_nope.shape
        w_uk, _, s_uk, _ = self._mla_halves(H, nope)
        out = np.empty((B, H, self.in_features), np.float32)
        with _numba_threads():
            absorb_query(w_uk, s_uk, q_nope.detach().to(torch.float32).contiguous().numpy(), out)
        return torch.from_numpy(out).to(q_nope.dtype)

    def mla_output(self, o_lat: torch.Tensor, nope: int, dtype: torch.dtype) -> torch.Tensor:
        """MLA's absorbed output for kv_b_proj: o_lat [B, H, R] -> [B, H, V] in `dtype`."""
        B, H, R = o_lat.shape
        _, w_uv, _, s_uv = self._mla_halves(H, nope)
        out = np.empty((H, B, w_uv.shape[1]), np.float32)
        with _numba_threads():
            absorb_output(w_uv, s_uv, o_lat.detach().to(torch.float32).transpose(0, 1).contiguous().numpy(), out)
        return torch.from_numpy(out).to(dtype).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def resolve_cpu_weights(requested: str, device_type: str, gpu_weights: str = "bf16") -> tuple[str, str]:
    """(format, why) for LLM(cpu_weights=requested): hybrid.formats.choose_cpu_weights, with one fallback: "auto"
    keeps torch's Linears where numba's threading layer is workqueue, which fails when two threads call
    parallel kernels at once (a guard: on a CPU-only machine the routed experts run inline on the engine's
    thread, hybrid/experts/offload.py, so nothing here calls them from two threads today)."""
    fmt, why = choose_cpu_weights(requested, device_type == "cpu", gpu_weights)
    if requested == "auto" and fmt == "bf16":
        layer = threading_layer()
        if layer not in ("omp", "tbb"):
            return "off", (f"FALLBACK to torch's Linears: numba's threading layer is {layer!r}, which cannot run "
                           "kernels from two threads at once (install tbb, or a libgomp for omp)")
    return fmt, why


def _bf16_exact(w: torch.Tensor) -> bool:
    return w.dtype == torch.bfloat16 or torch.equal(w.to(torch.bfloat16).to(w.dtype), w)


def swap_cpu_linears(model: nn.Module, fmt: str = "bf16", lm_head: bool = True, exact_only: bool = False) -> dict:
    """Replace the accelerator-side nn.Linear modules of a KimiForCausalLM on the CPU in place.

    fmt "off" leaves the model alone. exact_only (with "bf16", the "auto" default): a module whose weight
    is not exactly a bf16 value keeps its nn.Linear (counted in "kept"). Returns {"swapped": n, "kept": m,
    "bytes_before": b0, "bytes_after": b1}."""
    if fmt == "off":
        return {"swapped": 0, "kept": 0, "bytes_before": 0, "bytes_after": 0}
    if fmt not in FORMATS:
        raise ValueError(f"cpu weight format {fmt!r} is not supported; choose off, {', '.join(FORMATS)}")
    kept = []

    def make(old):
        if exact_only and fmt == "bf16" and not _bf16_exact(old.weight.detach()):
            kept.append(old)
            return old
        return CPULinear.from_linear(old, fmt)
    out = swap_linears(model, make, lm_head, kv_b=True)
    return {**out, "kept": len(kept)}
