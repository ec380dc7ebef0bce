"""CPU kernels for the routed experts: INT4 weights (group 32) in RAM. Imports nothing from hybrid/.

    ex = CPUExperts(num_experts, hidden_size, intermediate_size)      # the Numba kernels
    ex.set_expert(e, gate_u, gate_scale, up_u, up_scale, down_u, down_scale)   # nibbles + bf16 scales
    y = ex.forward(x, topk_ids, topk_weights)                          # fp32 [T, D], synchronous

``isa.ISA`` is the instruction set the kernels use (AVX512-VNNI / AVX-VNNI / AVX2 / generic, picked at
import; HYBRID_CPU_ISA forces one). ``dense.py``: matrix-vector kernels for dense Linears (bf16 / int8
weights) used by hybrid/model/cpu_linear.py on CPU-only machines, and ``mla_absorb.py``: MLA's absorbed
kv_b_proj products per head, read in place (both: tests/test_cpu_dense.py).
``moe_int4_ref`` / ``linear_ref`` (reference.py) are the plain numpy yardsticks beside them; ``KTExperts``
(kt_backend.py) runs KTransformers' kt-kernel where that package is installed. The runtime's backend
registry is hybrid/experts/backends.py. Tests: tests/test_cpu_kernels.py.
"""
from .experts import ACT_FORMATS, CPUExperts
from . import isa
from .kt_backend import KTExperts, kt_available
from .reference import linear_ref, moe_int4_ref

__all__ = ["isa", "ACT_FORMATS", "CPUExperts", "KTExperts", "kt_available", "moe_int4_ref", "linear_ref"]
