"""Fill a KimiForCausalLM from a checkpoint: a loop over the model's parameters (named like the
checkpoint's tensors) plus, per MoE layer, its routed experts in a backend (hybrid/experts/backends.py)
behind the layer's ExpertOffload (hybrid/experts/offload.py). Peak memory while loading is the final
model plus one tensor (the model is built on the meta device, then filled in place), and the shards'
memory maps are dropped after each layer, so mapped checkpoint pages do not accumulate.
Checked by tests/test_model.py (logits vs transformers) and tests/test_checkpoint.py (bad inputs).
"""
from __future__ import annotations

from concurrent.futures import Executor
from pathlib import Path

import torch
from tqdm import tqdm

from gpu_kernels import use_triton_on
from hybrid.checkpoint import Checkpoint
from hybrid.experts.backends import load_layer_experts
from hybrid.experts.offload import ExpertOffload, OverlapStats
from hybrid.model.attention import Rope, regroup_kv_b
from hybrid.model.model import KimiForCausalLM, Router

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def load_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, expert_backend: str, worker: Executor,
               num_threads: int | None = None, progress: bool = True, expert_cache: Path | None = None,
               act_format: str | None = None) -> KimiForCausalLM:
    """expert_backend: a resolved backend name (hybrid.experts.backends.resolve_backend);
    worker: the one expert thread (made by LLM); expert_cache: folder of the repacked-expert cache
    (numba backend); act_format: the expert kernels' activation format."""
    config = ckpt.config
    with torch.device("meta"):
        model = KimiForCausalLM(config).to(dtype)
    for m in model.modules():
        if isinstance(m, Router):
            m.float()                       # router weight and bias stay fp32, as in the reference
    model.to_empty(device=device)
    model.rope = Rope(config)               # its tables were created on the meta device
    model.overlap_stats = OverlapStats()    # per-layer CPU/accelerator timings, off until enabled
    for layer in model.model.layers:
        layer.self_attn.triton = use_triton_on(device)      # absorbed decode: Triton kernel or its reference

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
            elif name.endswith("self_attn.kv_b_proj.weight"):
                t = regroup_kv_b(ckpt.linear(module, *p.shape), config.num_attention_heads,
                                 config.qk_nope_head_dim, config.v_head_dim)
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
            experts = load_layer_experts(ckpt, i, expert_backend, num_threads, act_format, expert_cache)
            moe.experts = ExpertOffload(experts, i, device, worker, model.overlap_stats)
        ckpt.release()
    return model.eval()
