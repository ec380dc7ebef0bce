"""What a loaded model holds where, in bytes: accelerator-side weights by kind, the latent KV cache, the
routed experts in RAM (and, for our Numba experts, the instruction set their kernels use: cpu_kernels/isa.py).
Printed by LLM at load and by `hybrid demo`.
Checked by tests/test_engine.py."""
from __future__ import annotations


def _category(name: str) -> str:
    if name.startswith("model.embed_tokens"):
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in name:
        return "attention (MLA)"
    if ".mlp.shared_experts." in name:
        return "shared experts"
    if ".mlp.gate." in name:
        return "routers"
    if ".mlp." in name:
        return "dense MLP"
    return "norms"


def placement_summary(model, cache=None) -> dict:
    """Bytes of what lives where: accelerator-side weights by kind, the KV cache, the CPU experts."""
    accel: dict[str, int] = {}
    device = None
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        device = device or p.device
        accel[_category(name)] = accel.get(_category(name), 0) + p.numel() * p.element_size()
    experts, backend = 0, None
    for layer in model.model.layers:
        offload = getattr(layer.mlp, "experts", None)
        if offload is not None:
            experts += offload.backend.nbytes
            backend = type(offload.backend).__name__
    isa = None
    if backend == "NumbaExperts":          # hybrid/experts/backends.py: our kernels (cpu_kernels)
        from cpu_kernels import isa as isa_mod
        isa = isa_mod.ISA + (f" (forced by {isa_mod.ENV})" if isa_mod.FORCED else "")
    return {"device": str(device), "accelerator": accel, "kv_cache": cache.nbytes if cache is not None else 0,
            "cpu_experts": experts, "expert_backend": backend, "expert_isa": isa}


def format_placement(summary: dict) -> str:
    def gb(n: int) -> str:
        return f"{n / 2**30:8.2f} GiB" if n >= 2**30 else f"{n / 2**20:8.2f} MiB"
    lines = [f"accelerator side on {summary['device']}:"]
    for kind, n in sorted(summary["accelerator"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {kind:<18}{gb(n)}")
    lines.append(f"  {'latent KV cache':<18}{gb(summary['kv_cache'])}")
    if summary.get("cpu_weights") and not summary["cpu_weights"].startswith("off"):
        lines.append(f"  Linears on the CPU: {summary['cpu_weights']}")
    isa = f", {summary['expert_isa']} kernels" if summary.get("expert_isa") else ""
    lines.append(f"routed experts on the CPU ({summary['expert_backend']}{isa}):")
    lines.append(f"  {'routed experts':<18}{gb(summary['cpu_experts'])}")
    return "\n".join(lines)
