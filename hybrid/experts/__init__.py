"""The routed experts: backends (backends.py: numba, kt, torch, ref, "auto"), the one submit/wait hand-off per
MoE layer (offload.py), long-prefill streaming (streaming.py), the routing profile and hot experts
(profile.py), the repacked-expert disk cache (disk_cache.py). Imports cpu_kernels and gpu_kernels below it.
Checked by tests/test_backends.py, tests/test_offload.py, tests/test_hot_experts.py."""
