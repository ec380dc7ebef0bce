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

# Error of the int8-activation path, relative L2 per token against moe_int4_ref on the same
# INT4 weights (measured ~0.6-0.9% on random activations; see tests/test_cpu_kernels.py).
TOL_INT8 = 2.5e-2
TOL_FP32 = 1e-4

EXPERT_BACKENDS = {"ref": RefExperts, "numba": CPUExperts, "kt": KTExperts}

__all__ = ["CPUExperts", "RefExperts", "KTExperts", "kt_available", "EXPERT_BACKENDS",
           "moe_int4_ref", "dequantize_ref", "TOL_INT8", "TOL_FP32"]
