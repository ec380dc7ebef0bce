"""Triton kernels for the accelerator side, each with a torch reference beside it.

    from gpu_kernels import mla_decode, int4_matmul, int8_matmul
    o_lat = mla_decode(q_lat, q_pe, ckv, kpe, slots, lengths, softmax_scale)   # absorbed MLA decode
    o_lat = paged_mla_decode(q_lat, q_pe, ckv, kpe, block_table, lengths, page, softmax_scale)  # paged cache
    y = int4_matmul(x, weight_packed, weight_scale)                            # W4A16, group 32
    y = int8_matmul(x, weight_q, weight_scale)                                 # 8-bit weight-only

Each wrapper runs the Triton kernel when the tensors are on CUDA, or when TRITON_INTERPRET=1 (the
interpreter runs kernels on CPU tensors, which is how the kernels are tested on machines without a
GPU), and the torch reference otherwise. `KERNELS[name] = {"ref": ..., "triton": ...}` names both.
A shape the kernel cannot handle falls back to the reference. Under the interpreter every kernel widens
its tl.dot operands to fp32 first (constexpr DOT_F32): Triton 3.9's interpreter multiplies bf16 tiles
wrongly, and bf16 -> fp32 is exact, so the interpreted kernel still computes the same products (with
the same bf16 roundings of the dequantized weights and of P) in fp32. Tests: tests/test_gpu_kernels.py.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:   # ImportError, or a broken CUDA toolchain on import
        return False
    return True


# Triton decides at decoration time (when the kernel modules below are imported) whether a kernel is
# compiled or interpreted, so the switch is read once, here, before they are imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when this process imported the kernels under TRITON_INTERPRET=1 (they run on CPU tensors)."""
    return _INTERPRET


def use_triton_on(device: torch.device | str) -> bool:
    """True when Triton kernels run on tensors of this device: CUDA, or the CPU under the interpreter.
    The model loader asks once per device; the wrappers below ask per call (use_triton)."""
    return triton_available() and torch.device(device).type == ("cpu" if interpreting() else "cuda")


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run for these tensors (all on a device where it runs)."""
    return all(use_triton_on(t.device) for t in tensors)


from .int4_matmul import int4_matmul, int4_matmul_ref, int4_matmul_triton  # noqa: E402
from .int8_matmul import (int8_matmul, int8_matmul_ref, int8_matmul_triton,  # noqa: E402
                          quantize_weight_8bit)
from .mla_decode import mla_decode, mla_decode_ref, mla_decode_triton  # noqa: E402
from .paged_mla_decode import paged_mla_decode, paged_mla_decode_ref, paged_mla_decode_triton  # noqa: E402

KERNELS = {
    "mla_decode": {"ref": mla_decode_ref, "triton": mla_decode_triton},
    "paged_mla_decode": {"ref": paged_mla_decode_ref, "triton": paged_mla_decode_triton},
    "int4_matmul": {"ref": int4_matmul_ref, "triton": int4_matmul_triton},
    "int8_matmul": {"ref": int8_matmul_ref, "triton": int8_matmul_triton},
}

__all__ = ["mla_decode", "mla_decode_ref", "mla_decode_triton", "paged_mla_decode", "paged_mla_decode_ref",
           "paged_mla_decode_triton", "int4_matmul", "int4_matmul_ref",
           "int4_matmul_triton", "int8_matmul", "int8_matmul_ref", "int8_matmul_triton",
           "quantize_weight_8bit", "use_triton", "use_triton_on", "triton_available", "interpreting", "KERNELS"]
