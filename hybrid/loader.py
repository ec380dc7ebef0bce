"""Fill a KimiForCausalLM from a checkpoint: a loop over the model's parameters (named like the
checkpoint's tensors) plus one routed-expert backend per MoE layer. Peak memory while loading is the
final model plus one tensor (the model is built on the meta device, then filled in place).
Checked by tests/test_model.py (logits vs transformers) and tests/test_checkpoint.py (bad inputs).
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from .attention import Rope
from .checkpoint import Checkpoint
from .config import ModelConfig
from .model import KimiForCausalLM
from .moe import Router, TorchExperts
from .scheduler import ExpertScheduler, OverlapStats

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def expert_backends() -> dict:
    """name -> class with the routed-expert interface (load_expert / submit / wait)."""
    backends = {"torch": TorchExperts}
    try:
        from cpu_kernels import EXPERT_BACKENDS
        backends.update(EXPERT_BACKENDS)
    except ImportError:
        pass
    return backends


def make_experts(name: str, config: ModelConfig, num_threads: int | None):
    backends = expert_backends()
    if name == "auto":
        name = "numba" if "numba" in backends else "torch"
    if name not in backends:
        raise ValueError(f"expert_backend {name!r} is not available; choose one of {', '.join(backends)}")
    return backends[name](config.n_routed_experts, config.hidden_size, config.moe_intermediate_size,
                          num_threads=num_threads)


def load_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, expert_backend: str = "auto",
               num_threads: int | None = None, progress: bool = True) -> KimiForCausalLM:
    config = ckpt.config
    with torch.device("meta"):
        model = KimiForCausalLM(config).to(dtype)
    for m in model.modules():
        if isinstance(m, Router):
            m.float()                       # router weight and bias stay fp32, as in the reference
    model.to_empty(device=device)
    model.rope = Rope(config)               # its tables were created on the meta device
    model.overlap_stats = OverlapStats()    # per-layer CPU/accelerator timings, off until enabled

    params = dict(model.named_parameters())
    by_layer: dict[int, list[str]] = {}
    for name in params:   # "model.layers.{i}...." -> i; embeddings, final norm, lm_head -> -1
        i = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        by_layer.setdefault(i, []).append(name)
    bar = tqdm(range(-1, config.num_hidden_layers), desc="loading", unit="layer", disable=not progress)
    for i in bar:
        for name in by_layer.get(i, []):
            p = params[name]
            module = name.rsplit(".", 1)[0]
            if name == "model.embed_tokens.weight" or name.endswith("mlp.gate.weight"):
                t = ckpt.tensor(name, shape=tuple(p.shape), dtypes=FLOAT_DTYPES)
            elif p.dim() == 2:
                t = ckpt.linear(module, *p.shape)
            else:
                t = ckpt.vector(name, p.shape[0])
            with torch.no_grad():
                p.copy_(t)
        if i >= 0 and config.is_moe_layer(i):
            moe = model.model.layers[i].mlp
            bias = f"model.layers.{i}.mlp.gate.e_score_correction_bias"
            moe.gate.e_score_correction_bias.copy_(
                ckpt.tensor(bias, shape=(config.n_routed_experts,), dtypes=FLOAT_DTYPES).float())
            moe.experts = ExpertScheduler(load_experts(ckpt, i, expert_backend, num_threads), i, device,
                                          model.overlap_stats)
    return model.eval()


def load_experts(ckpt: Checkpoint, i: int, backend: str, num_threads: int | None):
    c = ckpt.config
    D, I = c.hidden_size, c.moe_intermediate_size
    experts = make_experts(backend, c, num_threads)
    shapes = {"gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I)}
    for e in range(c.n_routed_experts):
        P = f"model.layers.{i}.mlp.experts.{e}"
        if all(ckpt.weight_format(f"{P}.{proj}") == "int4" for proj in shapes):
            parts = []
            for proj, (n, k) in shapes.items():
                parts.extend(ckpt.int4(f"{P}.{proj}", n, k))
            experts.load_expert(e, *parts)
        else:
            experts.load_expert_dense(e, *(ckpt.linear(f"{P}.{proj}", n, k) for proj, (n, k) in shapes.items()))
    return experts
