"""The routed-expert backends, one registry, and the loading of one MoE layer's experts into one.

A backend holds the routed experts of one MoE layer in RAM and is synchronous:
    load_expert(e, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale)  # INT4 as stored
    forward(x, topk_ids, topk_weights) -> fp32 [T, D] on the CPU
    nbytes                                                                         # RAM it holds
The overlap with the accelerator is not theirs: hybrid/experts/offload.py calls `forward` on the one
expert worker thread. Backends (BACKENDS):
    numba  cpu_kernels.CPUExperts, our INT4 kernels (the default)            RAM: INT4 + scales
    kt     cpu_kernels.KTExperts, KTransformers' kt-kernel (when installed)   RAM: INT4 + scales
    torch  dequantized weights (bf16-rounded, in fp32), torch matmuls        RAM: 8x the INT4 bytes
    ref    the same weights, cpu_kernels.moe_int4_ref (numpy), the yardstick RAM: 8x the INT4 bytes
Every backend receives INT4: bf16 / FP8 experts are quantized once at load with
hybrid.formats.quantize_int4, whatever the backend, so the README and the memory plan hold for all.
"auto" picks numba or kt by a short batch-1 measurement and says why; a named backend that cannot
run, or an option it cannot honour (expert_act_format), is an error, never a silent fallback.
Checked by tests/test_model.py (every backend against transformers) and tests/test_backends.py.
"""
from __future__ import annotations

import functools
import time

import numpy as np
import torch
import torch.nn.functional as F

from hybrid.config import ModelConfig
from hybrid.formats import dequantize_int4, int4_expert_nbytes, quantize_int4, unpack_int4_u


class TorchExperts:
    """Dequantized weights exactly as compressed-tensors gives them (bf16-rounded), torch matmuls."""

    ACT_FORMATS = ("fp32",)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 num_threads: int | None = None, act_format: str = "fp32", dtype: torch.dtype = torch.float32):
        self.E, self.D, self.I, self.dtype = num_experts, hidden_size, intermediate_size, dtype
        self.w_gate = torch.zeros(num_experts, intermediate_size, hidden_size, dtype=dtype)
        self.w_up = torch.zeros_like(self.w_gate)
        self.w_down = torch.zeros(num_experts, hidden_size, intermediate_size, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w_gate, self.w_up, self.w_down))

    def load_expert(self, e, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale):
        self.w_gate[e] = dequantize_int4(gate_packed, gate_scale, self.D).to(self.dtype)
        self.w_up[e] = dequantize_int4(up_packed, up_scale, self.D).to(self.dtype)
        self.w_down[e] = dequantize_int4(down_packed, down_scale, self.I).to(self.dtype)

    def forward(self, x, topk_ids, topk_weights) -> torch.Tensor:
        x, ids, weights = x.detach().to("cpu"), topk_ids.to("cpu"), topk_weights.to("cpu", torch.float32)
        out = torch.zeros(x.shape[0], self.D, dtype=torch.float32)
        for e in ids.unique().tolist():
            tok, k = torch.where(ids == e)
            xe = x[tok].to(self.dtype)
            h = F.silu(xe @ self.w_gate[e].T) * (xe @ self.w_up[e].T)
            y = (h @ self.w_down[e].T).float()
            out.index_add_(0, tok, y * weights[tok, k, None])
        return out


class RefExperts(TorchExperts):
    """The same dequantized fp32 weights run by cpu_kernels.moe_int4_ref (numpy): the yardstick."""

    def forward(self, x, topk_ids, topk_weights) -> torch.Tensor:
        from cpu_kernels import moe_int4_ref
        return torch.from_numpy(moe_int4_ref(x, topk_ids, topk_weights, self.w_gate.numpy(),
                                             self.w_up.numpy(), self.w_down.numpy()))


@functools.cache
def _numba_class():
    from cpu_kernels import ACT_FORMATS, CPUExperts

    class NumbaExperts(CPUExperts):
        """cpu_kernels.CPUExperts fed from the checkpoint's INT4 words (unpacked by hybrid.formats)."""

        def load_expert(self, e, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale):
            self.set_expert(e, unpack_int4_u(gate_packed, self.D), gate_scale, unpack_int4_u(up_packed, self.D),
                            up_scale, unpack_int4_u(down_packed, self.I), down_scale)
    NumbaExperts.ACT_FORMATS = ACT_FORMATS
    return NumbaExperts


def _kt_class():
    from cpu_kernels import KTExperts, kt_available
    if not kt_available():
        raise ImportError("the kt-kernel package is not installed "
                          "(pip install --no-deps kt-kernel==0.7.2 'gguf>=0.17')")
    return KTExperts


# name -> (class factory, resident bytes per expert given (hidden, intermediate))
BACKENDS = {
    "numba": (_numba_class, int4_expert_nbytes),
    "kt": (_kt_class, int4_expert_nbytes),
    "torch": (lambda: TorchExperts, lambda d, i: 3 * d * i * 4),
    "ref": (lambda: RefExperts, lambda d, i: 3 * d * i * 4),
}
AUTO_CANDIDATES = ("numba", "kt")     # "auto" measures those that import, in this order of preference


def backend_class(name: str):
    """The class of backend `name`; ValueError naming the choices, or why it cannot run here."""
    if name not in BACKENDS:
        raise ValueError(f"expert_backend {name!r} unknown; choose one of auto, {', '.join(BACKENDS)}")
    try:
        return BACKENDS[name][0]()
    except ImportError as e:
        raise ValueError(f"expert_backend {name!r} cannot run here: {e}") from None


def expert_nbytes(name: str, config: ModelConfig) -> int:
    """RAM one routed expert takes on backend `name` (the memory plan's figure)."""
    return BACKENDS["numba" if name == "auto" else name][1](config.hidden_size, config.moe_intermediate_size)


def _decode_seconds(cls, config: ModelConfig, num_threads: int | None, steps: int = 3) -> float:
    """Time of one batch-1 decode call on a few random experts of the model's shape."""
    E = min(config.n_routed_experts, 2 * config.num_experts_per_tok)
    D, I = config.hidden_size, config.moe_intermediate_size
    ex = cls(E, D, I, num_threads=num_threads)
    rng = np.random.default_rng(0)
    for e in range(E):
        parts = []
        for n, k in ((I, D), (I, D), (D, I)):
            parts += [torch.from_numpy(rng.integers(-2**31, 2**31, (n, k // 8), dtype=np.int64).astype(np.int32)),
                      torch.full((n, k // 32), 0.01, dtype=torch.bfloat16)]
        ex.load_expert(e, *parts)
    x = torch.randn(1, D)
    k = config.num_experts_per_tok
    ids, w = torch.arange(k)[None], torch.full((1, k), 1.0 / k)
    ex.forward(x, ids, w)                                             # compile / warm up
    t0 = time.perf_counter()
    for s in range(steps):
        ex.forward(x, (ids + s * k) % E, w)
    return (time.perf_counter() - t0) / steps


def resolve_backend(name: str, config: ModelConfig, num_threads: int | None = None,
                    act_format: str | None = None) -> tuple[str, str]:
    """(backend name, why it was chosen). A named backend must run here and honour act_format."""
    if name != "auto":
        cls = backend_class(name)
        if act_format is not None and act_format not in cls.ACT_FORMATS:
            raise ValueError(f"expert_act_format {act_format!r} is not supported by expert_backend {name!r} "
                             f"(it takes {', '.join(cls.ACT_FORMATS)})")
        return name, "named by the user"
    usable, why_not = {}, []
    for cand in AUTO_CANDIDATES:
        try:
            cls = backend_class(cand)
        except ValueError as e:
            why_not.append(str(e))
            continue
        if act_format is None or act_format in cls.ACT_FORMATS:
            usable[cand] = cls
        else:
            why_not.append(f"{cand} does not take expert_act_format {act_format!r}")
    if not usable:
        if act_format is not None:
            raise ValueError(f"expert_backend auto: no backend takes expert_act_format {act_format!r} "
                             f"({'; '.join(why_not)})")
        return "torch", ("FALLBACK: no fast CPU backend can run (" + "; ".join(why_not) + "); the torch "
                         "backend holds the experts dequantized, 8x the RAM of INT4")
    if len(usable) == 1:
        only = next(iter(usable))
        return only, f"the only fast backend installed{' (' + '; '.join(why_not) + ')' if why_not else ''}"
    times = {b: _decode_seconds(cls, config, num_threads) for b, cls in usable.items()}
    best = min(times, key=times.get)
    return best, "fastest batch-1 decode here: " + ", ".join(f"{b} {t * 1e3:.2f} ms" for b, t in times.items())


def make_backend(name: str, config: ModelConfig, num_threads: int | None = None, act_format: str | None = None):
    cls = backend_class(name)
    extra = {"act_format": act_format} if act_format else {}
    return cls(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size,
               num_threads=num_threads, **extra)


def expert_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """The routed expert's projections and their [out, in] shapes."""
    D, I = config.hidden_size, config.moe_intermediate_size
    return {"gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I)}


def expert_int4(ckpt, layer: int, e: int) -> tuple | None:
    """(gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale) as stored, or None
    when the expert is not stored as INT4 (bf16 / FP8 checkpoints)."""
    P = f"model.layers.{layer}.mlp.experts.{e}"
    shapes = expert_shapes(ckpt.config)
    if not all(ckpt.weight_format(f"{P}.{proj}") == "int4" for proj in shapes):
        return None
    return tuple(t for proj, (n, k) in shapes.items() for t in ckpt.int4(f"{P}.{proj}", n, k))


def expert_as_int4(ckpt, layer: int, e: int) -> tuple:
    """The expert in INT4: as stored, or quantized with the runtime's one quantizer (bf16 / FP8)."""
    stored = expert_int4(ckpt, layer, e)
    if stored is not None:
        return stored
    P = f"model.layers.{layer}.mlp.experts.{e}"
    return tuple(t for proj, (n, k) in expert_shapes(ckpt.config).items()
                 for t in quantize_int4(ckpt.linear(f"{P}.{proj}", n, k)))


def load_layer_experts(ckpt, layer: int, backend: str, num_threads: int | None = None,
                       act_format: str | None = None, cache_dir=None):
    """Backend `backend` holding MoE layer `layer`'s routed experts; with cache_dir (numba only), read
    from / written to the repacked-expert disk cache (hybrid/experts/disk_cache.py)."""
    if cache_dir is not None:
        from hybrid.experts import disk_cache
        cached = disk_cache.load_layer(cache_dir, ckpt, layer, backend_class(backend), num_threads,
                                       act_format or "int8")
        if cached is not None:
            return cached
    experts = make_backend(backend, ckpt.config, num_threads, act_format)
    for e in range(ckpt.config.n_routed_experts):
        experts.load_expert(e, *expert_as_int4(ckpt, layer, e))
    if cache_dir is not None:
        disk_cache.save_layer(cache_dir, ckpt, layer, experts)
    return experts
