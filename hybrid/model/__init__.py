"""The model: forward pass (model.py), MLA attention (attention.py), latent KV cache (kv_cache.py), the loader
that fills it from a checkpoint (loader.py), 8-bit accelerator-side Linears (int8_linear.py), and what it holds
where (inventory.py). Imports hybrid.experts, gpu_kernels and cpu_kernels below it, never hybrid.engine / llm / apps.
Checked by tests/test_model.py (against transformers) and tests/test_engine.py."""
