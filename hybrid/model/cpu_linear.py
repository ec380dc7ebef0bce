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
DECODE_ROWS rows; longer calls (prefill) widen the weight to fp32 in chunks of output rows and use
torch's fp32 matmul, compute-bound there (also for a bf16 model: torch's bf16 matmul measured 0.3
GFLOP/s against 147 in fp32 on a 2-core Zen 2 without bf16 FMAs). The output has the input's dtype.

The default (`LLM(cpu_weights="auto")`, resolve_cpu_weights) is "bf16" when the accelerator side runs on the
CPU without gpu_weights quantization and numba's threading layer can run two kernels at once (omp or
tbb: the expert worker thread runs its kernels while the main thread runs these): the products are the
same fp32 products of the same bf16 values as torch's float32 Linear, in another summation order, for
half the bytes read. A module whose weight is not exactly a bf16 value (a float32 checkpoint) keeps
torch's Linear under "auto". "int8" halves the bytes again at a measured logit error and stays opt-in.

`swap_cpu_linears(model, fmt)` replaces the same modules as hybrid/model/int8_linear.py's
quantize_model_linears (QUANTIZABLE + lm_head; kv_b_proj stays: the absorbed decode reads it in place;
the router stays fp32). Tests: tests/test_cpu_dense.py. Speed: tools/bench_generate.py --cpu-weights.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from torch import nn

from cpu_kernels.dense import linear_bf16, linear_int8, threading_layer
from gpu_kernels import quantize_weight_8bit
from hybrid.model.int8_linear import swap_linears

FORMATS = ("bf16", "int8")
DECODE_ROWS = 16                 # calls with more rows (prefill) go through torch's matmul
PREFILL_CHUNK_BYTES = 64 << 20   # widened weight chunk for the prefill path (fp32 bytes)


def _threads() -> int:
    """torch's thread count for the accelerator side (LLM accel_threads), within numba's pool."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


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

    def dense_weight(self, rows: slice = slice(None), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this module multiplies by (rows of it), widened to `dtype`."""
        q = self.weight_q[rows]
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
            prev = numba.get_num_threads()
            numba.set_num_threads(_threads())
            try:
                if self.fmt == "bf16":
                    linear_bf16(self.weight_q.numpy().view(np.uint16), xf, y)
                else:
                    linear_int8(self.weight_q.numpy(), self.weight_scale.numpy(), xf, y)
            finally:
                numba.set_num_threads(prev)
            out = torch.from_numpy(y)
        else:
            compute = torch.float32      # torch's bf16 matmul on a CPU without bf16 FMAs: 0.3 vs 147 GFLOP/s
            step = max(1, PREFILL_CHUNK_BYTES // (4 * K))
            xc = x2.to(compute)
            out = torch.empty(T, self.out_features, dtype=compute)
            for n0 in range(0, self.out_features, step):
                rows = slice(n0, min(self.out_features, n0 + step))
                torch.matmul(xc, self.dense_weight(rows, compute).T, out=out[:, rows])
        return out.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def resolve_cpu_weights(requested: str, device_type: str, gpu_weights: str = "bf16") -> tuple[str, str]:
    """(format, why) for LLM(cpu_weights=requested): "auto" picks "bf16" on a CPU-only run (see the module
    docstring) and "off" elsewhere; an explicit "bf16" / "int8" where it cannot apply is an error."""
    if requested not in ("auto", "off", *FORMATS):
        raise ValueError(f"cpu_weights {requested!r}: choose auto, off, {', '.join(FORMATS)}")
    if requested == "auto":
        if device_type != "cpu":
            return "off", "the accelerator side runs on the GPU"
        if gpu_weights != "bf16":
            return "off", f"gpu_weights={gpu_weights} quantizes those Linears already"
        layer = threading_layer()
        if layer not in ("omp", "tbb"):
            return "off", (f"FALLBACK to torch's Linears: numba's threading layer is {layer!r}, which cannot run "
                           "these kernels beside the expert kernels (install tbb, or a libgomp for omp)")
        return "bf16", "auto: CPU-only, the checkpoint's bf16 values through our kernels, half the bytes of float32"
    if requested != "off" and (device_type != "cpu" or gpu_weights != "bf16"):
        raise ValueError("cpu_weights applies when the accelerator side runs on the CPU (device='cpu'), "
                         "without gpu_weights")
    return requested, "requested" if requested != "off" else "off: torch's Linears"


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
    out = swap_linears(model, make, lm_head)
    return {**out, "kept": len(kept)}
