"""CPU kernels for the routed experts: INT4 weights (group 32) in RAM. Imports nothing from hybrid/.

    ex = CPUExperts(num_experts, hidden_size, intermediate_size)      # the Numba kernels
    ex.set_expert(e, gate_u, gate_scale, up_u, up_scale, down_u, down_scale)   # nibbles + bf16 scales
    y = ex.forward(x, topk_ids, topk_weights)                          # fp32 [T, D], synchronous

``moe_int4_ref`` (reference.py) is the plain numpy yardstick beside them; ``KTExperts``
(kt_backend.py) runs KTransformers' kt-kernel where that package is installed. The runtime's backend
registry is hybrid/experts/backends.py. Tests: tests/test_cpu_kernels.py.
"""
from .experts import ACT_FORMATS, CPUExperts
from .kt_backend import KTExperts, kt_available
from .reference import moe_int4_ref

__all__ = ["ACT_FORMATS", "CPUExperts", "KTExperts", "kt_available", "moe_int4_ref"]
