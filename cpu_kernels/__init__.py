"""CPU kernels for the routed experts: INT4 weights (compressed-tensors, group 32) in RAM.

    ex = EXPERT_BACKENDS["numba"](num_experts, hidden_size, intermediate_size)
    ex.load_expert(e, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale)
    ex.submit(x, topk_ids, topk_weights); ...; y = ex.wait()

Backends: "numba" (``CPUExperts``, the fast path), "ref" (``RefExperts``, dequantized fp32 +
``moe_int4_ref``, the yardstick), "kt" (kt-kernel's AVX2/AVX-512/AMX kernels; only where the
kt-kernel package is installed, see ``kt_backend.py``). Tests: tests/test_cpu_kernels.py.
"""
from .experts import CPUExperts, RefExperts
from .kt_backend import KTExperts, kt_available
from .reference import dequantize_ref, moe_int4_ref

# Tolerances per activation format: worst relative L2 error per token against moe_int4_ref on
# the same INT4 weights, measured on random activations (tests/test_cpu_kernels.py, pytest -s):
#   int8   mean 1.2e-2; max 2.3e-2 at toy sizes, 1.2e-2 at 7168x2048 (x and h ~0.8% each)
#   int8x2 mean 5e-5, max 8e-5;  the fp32 reference itself ~1e-6
# kt-kernel (bf16 activations, its own int8 quantization) is held to TOL_INT8 as well.
TOL_INT8 = 3e-2
TOL_INT8X2 = 3e-4
TOL_FP32 = 1e-4

EXPERT_BACKENDS = {"ref": RefExperts, "numba": CPUExperts, "kt": KTExperts}

__all__ = ["CPUExperts", "RefExperts", "KTExperts", "kt_available", "EXPERT_BACKENDS",
           "moe_int4_ref", "dequantize_ref", "TOL_INT8", "TOL_INT8X2", "TOL_FP32"]
