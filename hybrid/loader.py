"""Fill a KimiForCausalLM from a checkpoint: a loop over the model's parameters (named like the
checkpoint's tensors) plus one routed-expert backend per MoE layer. Peak memory while loading is the
final model plus one tensor (the model is built on the meta device, then filled in place), and the
shards' memory maps are dropped after each layer, so mapped checkpoint pages do not accumulate.
Checked by tests/test_model.py (logits vs transformers) and tests/test_checkpoint.py (bad inputs).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .attention import Rope, regroup_kv_b
from .checkpoint import Checkpoint
from .config import ModelConfig
from .model import KimiForCausalLM
from .moe import Router, TorchExperts
from .scheduler import ExpertScheduler, OverlapStats

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FAST_BACKENDS = ("numba", "kt")      # candidates of expert_backend="auto", in order of preference
log = logging.getLogger("hybrid.loader")


def expert_backends() -> dict:
    """name -> class with the routed-expert interface (load_expert / submit / wait)."""
    backends = {"torch": TorchExperts}
    try:
        from cpu_kernels import EXPERT_BACKENDS
        backends.update(EXPERT_BACKENDS)
    except ImportError:
        pass
    return backends


def _decode_seconds(cls, config: ModelConfig, num_threads: int | None, steps: int = 3) -> float:
    """Time of one batch-1 decode call on a few random experts of the model's shape."""
    E = min(config.n_routed_experts, 2 * config.num_experts_per_tok)
    D, I, g = config.hidden_size, config.moe_intermediate_size, 32
    ex = cls(E, D, I, num_threads=num_threads)
    rng = np.random.default_rng(0)
    for e in range(E):
        parts = []
        for n, k in ((I, D), (I, D), (D, I)):
            parts += [torch.from_numpy(rng.integers(-2**31, 2**31, (n, k // 8), dtype=np.int64).astype(np.int32)),
                      torch.full((n, k // g), 0.01, dtype=torch.bfloat16)]
        ex.load_expert(e, *parts)
    x = torch.randn(1, D)
    k = config.num_experts_per_tok
    ids, w = torch.arange(k)[None], torch.full((1, k), 1.0 / k)
    ex.forward(x, ids, w)                                             # compile / warm up
    t0 = time.perf_counter()
    for s in range(steps):
        ex.forward(x, (ids + s * k) % E, w)
    return (time.perf_counter() - t0) / steps


def resolve_backend(name: str, config: ModelConfig, num_threads: int | None) -> str:
    """"auto": the fastest installed CPU backend, by a short measurement at load (logged)."""
    backends = expert_backends()
    if name != "auto":
        if name not in backends:
            raise ValueError(f"expert_backend {name!r} is not available; choose one of {', '.join(backends)}")
        return name
    candidates = [b for b in FAST_BACKENDS if b in backends]
    if "kt" in candidates:
        from cpu_kernels import kt_available
        if not kt_available():
            candidates.remove("kt")
    if not candidates:
        log.info("expert_backend auto: torch (no CPU kernel package importable)")
        return "torch"
    if len(candidates) == 1:
        log.info("expert_backend auto: %s (the only fast backend installed)", candidates[0])
        return candidates[0]
    times = {b: _decode_seconds(backends[b], config, num_threads) for b in candidates}
    best = min(times, key=times.get)
    log.info("expert_backend auto: %s (batch-1 decode: %s)", best,
             ", ".join(f"{b} {t * 1e3:.2f} ms" for b, t in times.items()))
    return best


def make_experts(name: str, config: ModelConfig, num_threads: int | None, act_format: str | None = None):
    extra = {"act_format": act_format} if act_format else {}
    if extra and name == "torch":
        raise ValueError("expert_act_format applies to the CPU kernel backends (numba, ref, kt), not 'torch'")
    return expert_backends()[name](config.n_routed_experts, config.hidden_size, config.moe_intermediate_size,
                                   num_threads=num_threads, **extra)


def load_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, expert_backend: str = "auto",
               num_threads: int | None = None, progress: bool = True,
               expert_cache: Path | None = None, act_format: str | None = None) -> KimiForCausalLM:
    """expert_cache: folder of the repacked-expert cache (hybrid/expert_cache.py; numba backend).
    act_format: the expert kernels' activation format (numba: "int8" default, "int8x2" more exact)."""
    config = ckpt.config
    expert_backend = resolve_backend(expert_backend, config, num_threads)
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
            experts = load_experts(ckpt, i, expert_backend, num_threads, expert_cache, act_format)
            moe.experts = ExpertScheduler(experts, i, device, model.overlap_stats)
        ckpt.release()
    return model.eval()


def expert_projections(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """The routed expert's projections and their [out, in] shapes."""
    D, I = config.hidden_size, config.moe_intermediate_size
    return {"gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I)}


def expert_int4(ckpt: Checkpoint, layer: int, e: int) -> tuple | None:
    """(gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale) as stored, or None
    when the expert is not stored as INT4 (bf16 / FP8 checkpoints)."""
    P = f"model.layers.{layer}.mlp.experts.{e}"
    shapes = expert_projections(ckpt.config)
    if not all(ckpt.weight_format(f"{P}.{proj}") == "int4" for proj in shapes):
        return None
    return tuple(t for proj, (n, k) in shapes.items() for t in ckpt.int4(f"{P}.{proj}", n, k))


def load_experts(ckpt: Checkpoint, i: int, backend: str, num_threads: int | None,
                 cache_dir: Path | None = None, act_format: str | None = None):
    c = ckpt.config
    use_cache = cache_dir is not None and backend == "numba"
    if use_cache:
        from .expert_cache import load_layer
        cached = load_layer(cache_dir, ckpt, i, num_threads, act_format or "int8")
        if cached is not None:
            return cached
    experts = make_experts(backend, c, num_threads, act_format)
    shapes = expert_projections(c)
    for e in range(c.n_routed_experts):
        stored = expert_int4(ckpt, i, e)
        if stored is not None:
            experts.load_expert(e, *stored)
        else:
            P = f"model.layers.{i}.mlp.experts.{e}"
            experts.load_expert_dense(e, *(ckpt.linear(f"{P}.{proj}", n, k) for proj, (n, k) in shapes.items()))
    if use_cache:
        from .expert_cache import save_layer
        save_layer(cache_dir, ckpt, i, experts)
    return experts
