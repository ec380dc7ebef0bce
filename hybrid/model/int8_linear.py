"""8-bit weight-only storage of the accelerator-side Linears, quantized once at load.

K2.6's GPU-resident part (MLA, dense layer 0, shared experts, lm_head, embeddings: ~11.7B parameters)
is ~23.4 GB in bf16, more than a 24 GB card; in 8 bits (one fp32 scale per output channel) the
Linears take half. `quantize_model_linears(model)` swaps every attention, dense-MLP, shared-expert
(and by default lm_head) nn.Linear of a KimiForCausalLM for an `Int8Linear`, whose forward is
gpu_kernels.int8_matmul (Triton on CUDA, the torch reference elsewhere). Left alone: the router (fp32
scores decide expert choice), norms, embeddings, the CPU-side routed experts, and kv_b_proj, whose
weight the absorbed decode reads as two matrices (W_UK, W_UV) every step: kept in the model dtype it
is read in place (0.5 GB more than 8 bits for K2.6, which hybrid/plan.py counts), where an 8-bit copy
would have to be dequantized every layer of every step.
tools/logit_match.py --gpu-weights int8 gives the logit error against the unquantized model.
Tests: tests/test_gpu_weights.py.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from gpu_kernels import int8_matmul, quantize_weight_8bit
from gpu_kernels.int8_matmul import FORMATS

# module names (relative to KimiForCausalLM) whose nn.Linear is accelerator-side and quantizable
QUANTIZABLE = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|o_proj)"
                         r"|mlp\.(gate_proj|up_proj|down_proj)"
                         r"|mlp\.shared_experts\.(gate_proj|up_proj|down_proj))$")


class Int8Linear(nn.Module):
    """y = x . (q * scale[:, None])^T with q int8 (or float8_e4m3fn) [N, K] and fp32 scale [N]; no bias."""

    def __init__(self, in_features: int, out_features: int, fmt: str = "int8",
                 dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"8-bit format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
        self.in_features, self.out_features, self.fmt, self.dtype = in_features, out_features, fmt, dtype
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=FORMATS[fmt][0], device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "int8") -> "Int8Linear":
        assert linear.bias is None, "the model has no biases; Int8Linear does not store one"
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, fmt, dtype=w.dtype, device="meta")
        q, scale = quantize_weight_8bit(w, fmt)
        m.weight_q, m.weight_scale = q, scale
        return m

    @property
    def nbytes(self) -> int:
        return self.weight_q.numel() * self.weight_q.element_size() + self.weight_scale.numel() * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.weight_q, self.weight_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def quantize_model_linears(model: nn.Module, fmt: str = "int8", lm_head: bool = True) -> dict:
    """Replace the accelerator-side nn.Linear modules of a KimiForCausalLM in place.

    Swapped: every Linear in self_attn but kv_b_proj, the dense MLP (layers < first_k_dense_replace), the shared
    experts, and lm_head when `lm_head`. Returns {"swapped": n, "bytes_before": b0, "bytes_after": b1}.
    """
    if fmt == "bf16":
        return {"swapped": 0, "bytes_before": 0, "bytes_after": 0}
    if fmt not in FORMATS:
        raise ValueError(f"gpu weight format {fmt!r} is not supported; choose bf16, {', '.join(FORMATS)}")
    return swap_linears(model, lambda old: Int8Linear.from_linear(old, fmt), lm_head)


KV_B = re.compile(r"model\.layers\.\d+\.self_attn\.kv_b_proj$")


def swap_linears(model: nn.Module, make, lm_head: bool = True, kv_b: bool = False) -> dict:
    """Replace each accelerator-side nn.Linear matched by QUANTIZABLE (and lm_head when `lm_head`, kv_b_proj
    when `kv_b`) with make(old), in place; the one loop behind quantize_model_linears and
    cpu_linear.swap_cpu_linears (which takes kv_b_proj too: its kernels read W_UK / W_UV in place).
    `make(old).nbytes` is its size; make may return old (not swapped, not counted). Returns {"swapped": n, "bytes_before": b0, "bytes_after": b1}."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and (QUANTIZABLE.match(n) or (lm_head and n == "lm_head") or (kv_b and KV_B.match(n)))]
    before = after = swapped = 0
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        new = make(old)                       # make may return `old` to keep a module as it is
        if new is old:
            continue
        before += old.weight.numel() * old.weight.element_size()
        after += new.nbytes
        swapped += 1
        setattr(parent, attr, new)
    return {"swapped": swapped, "bytes_before": before, "bytes_after": after}
