"""The memory plan: what goes where, in bytes, before anything loads (tok/s prediction: hybrid/speed.py).

    plan = make_plan(config, gpu_mem_bytes=24 * GIB, ram_bytes=512 * GIB, context=65536,
                     gpu_weights="int8", hw=Hardware.from_dict(json.load(open("hw.json"))))
    print(format_plan(plan))     # `hybrid plan MODEL_DIR ...` is hybrid.apps.plan_cli.cli_plan(argv)

GPU: the accelerator-side weights (MLA, dense layers, shared experts, lm_head in bf16 or 8 bits per
hybrid/model/int8_linear.py, kv_b_proj kept bf16; router fp32; norms and embeddings bf16), hot experts
kept on the GPU in INT4, the latent KV cache (layers x context x batch x bytes per token: bf16
(kv_lora_rank + rope dim) x 2, 8-bit (kv_lora_rank + rope dim) + two fp32 scales; "auto" is the model
dtype, fp32 on a CPU-only machine), two expert streaming buffers and a fixed reserve. RAM: the routed
experts in INT4 (packed + bf16 scale per 32; bf16/fp8 checkpoints are quantized to INT4 at load, same
size), pinned transfer buffers and a reserve. Sizes are binary: parse_size("24GB") is 24 GiB.
If it does not fit, `problem` names the part and `suggestions` the smallest changes that make it fit
(hybrid/plan/advice.py, also default_max_context: the context chat / serve use when none is given).
Tests: tests/test_plan.py.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hybrid.config import ModelConfig
from hybrid.experts.backends import BACKENDS, expert_nbytes
from hybrid.formats import CPU_WEIGHTS, INT4_GROUP, choose_cpu_weights, int4_expert_nbytes
from hybrid.speed import Hardware, predict

GIB = 1 << 30
GPU_FORMATS = ("bf16", "int8", "fp8")
KV_DTYPES = ("auto", "bf16", "fp8", "int8")
CPU_FORMATS = CPU_WEIGHTS
GPU_RESERVE_BYTES = 2 * GIB       # CUDA context, allocator slack, activations of a step
RAM_RESERVE_BYTES = 8 * GIB       # OS, Python + torch, page cache while reading shards
KV_BYTES = 2                      # bf16 latent cache
KV_SCALE_BYTES = 8                # 8-bit cache: an fp32 scale for the latent and one for the rope part
PREFILL_CHUNK = 2048              # tokens per prefill step (sizes the pinned activation buffers)
STREAM_CHUNK_EXPERTS = 32         # experts per streaming buffer (two buffers)
MIN_CONTEXT = 1024                # shortest context the advice offers (shorter models: their maximum)
VISION_MAX_PATCHES = 32768       # patches in one tower call (hybrid/media: up to 16 images per request)
VISION_CACHE_BYTES = 256 << 20   # encoded images kept by content (hybrid/media/encode.py)
ROOM_CONVERSATION = 8192          # "M conversations of 8K" in the cache-room line
# The flags of chat / serve / plan that each planned option maps to (the suggestions print these).
FLAGS = {"context": "--max-context", "batch": "--max-batch", "gpu_weights": "--gpu-weights",
         "gpu_experts": "--gpu-experts", "kv_cache_dtype": "--kv-cache-dtype", "expert_backend": "--expert-backend"}
# Rates used for the tok/s estimate when no --hw file is given (a 2024 workstation, stated as such):
# 8-channel DDR5 (~200 GB/s read of ~300 theoretical), PCIe 4.0 x16, an RTX 4090-class GPU.
DEFAULT_HW = Hardware(ram_bandwidth_gbs=200.0, pcie_gbs=25.0, gpu_bandwidth_gbs=1000.0, cpu_kernel_efficiency=0.5,
                      cpu_gflops=1000.0, gpu_tflops=80.0)


class PlanError(RuntimeError):
    """The model does not fit this machine; the message is the formatted plan with advice."""


@dataclass
class Plan:
    model: str
    context: int
    batch: int
    gpu_weights: str
    gpu_experts: int
    gpu_mem_bytes: int
    ram_bytes: int
    on_gpu: bool                       # False: a CPU-only machine, the accelerator side is in RAM
    gpu_weights_bytes: int             # accelerator-side weights incl. hot experts
    gpu_expert_bytes: int              # of which hot experts (INT4)
    kv_cache_bytes: int
    stream_buffer_bytes: int
    gpu_reserve_bytes: int
    cpu_expert_bytes: int
    pinned_bytes: int
    ram_reserve_bytes: int
    gpu_total_bytes: int
    ram_total_bytes: int
    fits_gpu: bool
    fits_ram: bool
    fits: bool
    expert_backend: str = "numba"      # RAM per CPU expert depends on it (torch / ref: dequantized, 8x)
    kv_cache_dtype: str = "auto"
    cpu_weights: str = "off"           # no GPU: the Linears' format through our kernels (resolve_cpu_weights)
    max_position_embeddings: int = 0
    problem: str = ""                  # what does not fit, the largest parts named
    suggestions: list = field(default_factory=list)    # [{"changes": {option: value}, "flags": str, "text": str}]
    advice: list = field(default_factory=list)         # problem + suggestion texts (for people)
    cache_room: dict = field(default_factory=dict)     # tokens of KV cache that fit, by cache dtype
    parts: dict = field(default_factory=dict)          # accelerator-side bytes by part
    predicted_prefill_tok_s: float | None = None
    predicted_decode_tok_s: float | None = None
    hw_source: str = ""                # "" (no prediction), "--hw FILE" or "default rates"
    prediction: dict = field(default_factory=dict)


# ---- sizes ---------------------------------------------------------------------------------------
def linear_shapes(config: ModelConfig) -> dict[str, list[tuple[int, int]]]:
    """(out, in) of every accelerator-side nn.Linear, grouped by part."""
    c = config
    H, qk = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    D, R, P = c.hidden_size, c.kv_lora_rank, c.qk_rope_head_dim
    attn = ([(c.q_lora_rank, D), (H * qk, c.q_lora_rank)] if c.q_lora_rank else [(H * qk, D)])
    attn += [(R + P, D), (D, H * c.v_head_dim)]
    n_moe = c.num_moe_layers
    n_dense = c.num_hidden_layers - n_moe
    shared_i = c.moe_intermediate_size * c.n_shared_experts
    return {
        "attention": attn * c.num_hidden_layers,
        "kv_b_proj": [(H * (c.qk_nope_head_dim + c.v_head_dim), R)] * c.num_hidden_layers,
        "dense_mlp": [(c.intermediate_size, D), (c.intermediate_size, D), (D, c.intermediate_size)] * n_dense,
        "shared_experts": ([(shared_i, D), (shared_i, D), (D, shared_i)] * n_moe) if shared_i else [],
        "lm_head": [(c.vocab_size, D)],
    }


def expert_bytes(config: ModelConfig) -> int:
    """One routed expert (gate, up, down) in INT4 + scales (hybrid.formats.int4_expert_nbytes): what the
    INT4 backends hold in RAM, what hot experts and streaming hold on the GPU."""
    g = config.quantization.group_size if config.quantization.method == "int4" else INT4_GROUP
    return int4_expert_nbytes(config.hidden_size, config.moe_intermediate_size, g)


def resolve_cpu_weights(cpu_weights: str, on_gpu: bool, gpu_weights: str = "bf16") -> str:
    """The plan's reading of LLM(cpu_weights=): hybrid.formats.choose_cpu_weights, the same decision (the
    plan assumes numba's threading layer allows it: hybrid/model/cpu_linear.py resolve_cpu_weights), except
    that an explicit format reads as "off" where it cannot apply: the advice re-plans a resolved plan with
    a GPU or gpu_weights it suggests."""
    if cpu_weights in ("bf16", "int8") and (on_gpu or gpu_weights != "bf16"):
        return "off"
    return choose_cpu_weights(cpu_weights, not on_gpu, gpu_weights)[0]


def accelerator_parts(config: ModelConfig, fmt: str, dense_bytes: int = 2, cpu_weights: str = "off") -> dict[str, int]:
    """Bytes of the accelerator-side weights by part; `fmt` applies to the Linears (8 bits: + fp32 scale per
    row) but kv_b_proj, which stays in the model dtype (hybrid/model/int8_linear.py says why). A resolved
    `cpu_weights` ("bf16" | "int8", CPU-only) sets the Linears' bytes the same way, kv_b_proj included (its
    absorbed decode runs through cpu_kernels/mla_absorb.py, hybrid/model/cpu_linear.py)."""
    c = config
    out = {}
    if cpu_weights == "bf16":
        fmt, dense_linear = "bf16", 2
    else:
        fmt, dense_linear = (cpu_weights if cpu_weights == "int8" else fmt), dense_bytes
    for part, shapes in linear_shapes(c).items():
        if part == "kv_b_proj" and cpu_weights not in ("bf16", "int8"):
            out[part] = sum(n * k for n, k in shapes) * dense_bytes
        elif fmt == "bf16":
            out[part] = sum(n * k for n, k in shapes) * dense_linear
        else:
            out[part] = sum(n * k + 4 * n for n, k in shapes)
    out["router"] = c.num_moe_layers * c.n_routed_experts * (c.hidden_size + 1) * 4     # fp32
    out["embed_tokens"] = c.vocab_size * c.hidden_size * dense_bytes
    norms = c.num_hidden_layers * (2 * c.hidden_size + c.kv_lora_rank + (c.q_lora_rank or 0)) + c.hidden_size
    out["norms"] = norms * dense_bytes
    if c.vision is not None:          # K2.5/K2.6: MoonViT tower + projector in the model dtype (hybrid/model/vision.py)
        out["vision_tower"] = c.vision.weight_count() * dense_bytes
        # one call's activations at the largest image budget, and the encoder's content cache
        out["vision_activations"] = c.vision.activation_bytes(VISION_MAX_PATCHES, dense_bytes) + VISION_CACHE_BYTES
    return out


def kv_bytes_per_token(config: ModelConfig, kv_cache_dtype: str = "bf16", model_bytes: int = 2) -> int:
    """Bytes of latent cache per token per layer (the formula of hybrid.model.kv_cache.cache_bytes_per_token):
    bf16 (R + P) x 2; fp8 / int8 (R + P) x 1 + two fp32 scales; auto: the model dtype (`model_bytes`)."""
    width = config.kv_lora_rank + config.qk_rope_head_dim
    if kv_cache_dtype in ("fp8", "int8"):
        return width + KV_SCALE_BYTES
    if kv_cache_dtype not in ("auto", "bf16"):
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} unknown; choose one of {', '.join(KV_DTYPES)}")
    return width * (KV_BYTES if kv_cache_dtype == "bf16" else model_bytes)


def kv_cache_bytes(config: ModelConfig, context: int, batch: int, kv_cache_dtype: str = "bf16",
                   model_bytes: int = 2) -> int:
    return config.num_hidden_layers * context * batch * kv_bytes_per_token(config, kv_cache_dtype, model_bytes)


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?b)?\s*$", re.I)


def parse_size(text: str | int) -> int:
    """'24GB', '24G', '24GiB', '1.5TB', '512m', '0' -> bytes; K/M/G/T/P are powers of 1024. A number
    without a unit (other than 0) is refused: '24' is far more often 24 GB meant than 24 bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"size {text!r} not understood; use e.g. 24GB, 512GiB or 1TB")
    value, unit = float(m.group(1)), m.group(2).lower()
    if not unit and not m.group(3) and value != 0:
        raise ValueError(f"size {text!r} has no unit: write {m.group(1)}GB (or 0 for none)")
    return int(value * 1024 ** " kmgtp".index(unit or " "))


def machine_memory() -> dict:
    """{'ram_bytes', 'ram_available_bytes', 'gpu_mem_bytes'} of this machine (VRAM 0 without CUDA)."""
    info = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    gpu = 0
    try:
        import torch
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_properties(0).total_memory
    except Exception:   # a broken CUDA install reads as no GPU
        gpu = 0
    return {"ram_bytes": info.get("MemTotal", 0), "ram_available_bytes": info.get("MemAvailable", 0),
            "gpu_mem_bytes": gpu}


# ---- the plan -----------------------------------------------------------------------------------
def _layout(config, gpu_mem_bytes, context, batch, gpu_weights, gpu_experts, expert_backend="numba",
            kv_cache_dtype="auto", cpu_weights="auto"):
    on_gpu = gpu_mem_bytes > 0
    cpu_weights = resolve_cpu_weights(cpu_weights, on_gpu, gpu_weights)
    eb = expert_bytes(config)
    cpu_eb = expert_nbytes(expert_backend, config)      # 8x eb for the dequantizing torch / ref backends
    n_experts = config.num_moe_layers * config.n_routed_experts
    dense_bytes = 2 if on_gpu else 4       # on the CPU the accelerator side runs in fp32 (llm.default_dtype)
    parts = accelerator_parts(config, gpu_weights, dense_bytes, cpu_weights)
    gpu_exp = min(gpu_experts, n_experts) * eb if on_gpu else 0
    stream = 2 * min(STREAM_CHUNK_EXPERTS, config.n_routed_experts) * eb if on_gpu and config.num_moe_layers else 0
    pinned = (stream + 2 * PREFILL_CHUNK * config.hidden_size * (2 + 4) * batch) if on_gpu else 0
    return dict(on_gpu=on_gpu, parts=parts, cpu_weights=cpu_weights, gpu_weights_bytes=sum(parts.values()) + gpu_exp,
                gpu_expert_bytes=gpu_exp,
                kv_cache_bytes=kv_cache_bytes(config, context, batch, kv_cache_dtype, dense_bytes),
                stream_buffer_bytes=stream, gpu_reserve_bytes=GPU_RESERVE_BYTES if on_gpu else 0,
                cpu_expert_bytes=(n_experts - (gpu_exp // eb if eb else 0)) * cpu_eb, pinned_bytes=pinned,
                ram_reserve_bytes=RAM_RESERVE_BYTES)


def make_plan(config: ModelConfig, *, gpu_mem_bytes: int, ram_bytes: int, context: int, batch: int = 1,
              gpu_weights: str = "bf16", gpu_experts: int = 0, hw: Hardware | dict | None = None,
              prefill_tokens: int | None = None, expert_backend: str = "numba", kv_cache_dtype: str = "auto",
              cpu_weights: str = "auto", advise: bool = True, hw_source: str = "--hw") -> Plan:
    """Bytes per device for this config and these settings, whether they fit, what does not and the
    smallest changes that would (advise=False skips that), and with `hw` predicted tok/s.
    gpu_mem_bytes = 0 plans a CPU-only machine (everything in RAM)."""
    if gpu_weights not in GPU_FORMATS:
        raise ValueError(f"gpu_weights {gpu_weights!r} is not supported; choose one of {', '.join(GPU_FORMATS)}")
    if kv_cache_dtype not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} unknown; choose one of {', '.join(KV_DTYPES)}")
    if context < 1 or batch < 1 or gpu_experts < 0:
        raise ValueError(f"context ({context}) and batch ({batch}) must be >= 1, gpu_experts ({gpu_experts}) >= 0")
    if gpu_mem_bytes < 0 or ram_bytes < 0:
        raise ValueError("memory sizes must be >= 0")
    if context > config.max_position_embeddings:
        raise ValueError(f"context {context} exceeds the model's maximum, max_position_embeddings "
                         f"({config.max_position_embeddings})")
    if expert_backend not in BACKENDS and expert_backend != "auto":
        raise ValueError(f"expert_backend {expert_backend!r} unknown; choose one of auto, {', '.join(BACKENDS)}")
    expert_backend = "numba" if expert_backend == "auto" else expert_backend   # auto: an INT4 backend (numba | kt)
    L = _layout(config, gpu_mem_bytes, context, batch, gpu_weights, gpu_experts, expert_backend, kv_cache_dtype,
                cpu_weights)
    device_side = L["gpu_weights_bytes"] + L["kv_cache_bytes"] + L["stream_buffer_bytes"] + L["gpu_reserve_bytes"]
    gpu_total = device_side if L["on_gpu"] else 0
    ram_total = L["cpu_expert_bytes"] + L["pinned_bytes"] + L["ram_reserve_bytes"] + (0 if L["on_gpu"] else device_side)
    fits_gpu = gpu_total <= gpu_mem_bytes
    fits_ram = ram_total <= ram_bytes
    plan = Plan(model=config.model_type, context=context, batch=batch, gpu_weights=gpu_weights,
                gpu_experts=gpu_experts, gpu_mem_bytes=gpu_mem_bytes, ram_bytes=ram_bytes,
                gpu_total_bytes=gpu_total, ram_total_bytes=ram_total, fits_gpu=fits_gpu, fits_ram=fits_ram,
                fits=fits_gpu and fits_ram, expert_backend=expert_backend, kv_cache_dtype=kv_cache_dtype,
                max_position_embeddings=config.max_position_embeddings, **L)
    if not advise:
        return plan
    advise_plan(config, plan)        # hybrid/plan/advice.py: cache room, problem, suggestions
    if hw is not None:
        hw = Hardware.from_dict(hw) if isinstance(hw, dict) else hw
        predict(config, plan, hw, prefill_tokens or min(context, 8192), expert_bytes=expert_bytes(config),
                params=sum(n * k for shapes in linear_shapes(config).values() for n, k in shapes),
                kv_bytes=kv_bytes_per_token(config, kv_cache_dtype, 2 if plan.on_gpu else 4)
                / (config.kv_lora_rank + config.qk_rope_head_dim),
                dtype=None if plan.on_gpu else "float32", cpu_weights=plan.cpu_weights)
        plan.hw_source = hw_source
    return plan


def _gb(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


# ---- output -------------------------------------------------------------------------------------
def plan_to_json(plan: Plan) -> dict:
    return asdict(plan)


def _room_line(plan: Plan) -> str:
    top = plan.max_position_embeddings
    out = []
    for kind, n in plan.cache_room.items():
        if n < 1:
            out.append(f"{kind}: none")
            continue
        out.append(f"{kind}: {n} tokens = one {min(n, top)}-token conversation"
                   + (f" (the model's maximum)" if n >= top else "")
                   + f" or {n // ROOM_CONVERSATION} of {ROOM_CONVERSATION // 1024}K")
    return "KV cache room (" + ("GPU" if plan.on_gpu else "RAM") + " left by the rest): " + "; ".join(out)


def format_plan(plan: Plan) -> str:
    g = lambda n: f"{n / GIB:10.2f}"  # noqa: E731
    blank = " " * 10
    fmt = plan.gpu_weights if plan.on_gpu or plan.gpu_weights != "bf16" else "fp32 on the CPU"
    if not plan.on_gpu and plan.cpu_weights != "off":
        fmt = f"{plan.cpu_weights} Linears+fp32"          # --cpu-weights: the Linears through our kernels
    kv = plan.kv_cache_dtype if plan.kv_cache_dtype != "auto" else ("bf16" if plan.on_gpu else "fp32")
    rows = [(f"accelerator-side weights ({fmt})",
             plan.gpu_weights_bytes - plan.gpu_expert_bytes, plan.on_gpu)]
    if plan.gpu_experts:
        rows.append((f"hot experts on the GPU ({plan.gpu_experts})", plan.gpu_expert_bytes, True))
    rows += [(f"KV cache ({kv}, {plan.context} tokens x {plan.batch})", plan.kv_cache_bytes, plan.on_gpu),
             ("expert streaming buffers", plan.stream_buffer_bytes, True),
             ("reserve (CUDA context, activations)", plan.gpu_reserve_bytes, True),
             ("routed experts, INT4 + scales" if plan.expert_backend in ("numba", "kt", "auto")
              else f"routed experts, dequantized ({plan.expert_backend})", plan.cpu_expert_bytes, False),
             ("pinned transfer buffers", plan.pinned_bytes, False),
             ("reserve (OS, runtime, page cache)", plan.ram_reserve_bytes, False)]
    lines = [f"memory plan: {plan.model}, context {plan.context}, batch {plan.batch}, GPU weights "
             f"{plan.gpu_weights}" + ("" if plan.on_gpu else " (no GPU: everything in RAM)"),
             f"{'':44s}{'GPU GiB':>10s}{'RAM GiB':>10s}"]
    for name, n, gpu_side in rows:
        if n or name.startswith(("accelerator", "KV", "routed")):
            lines.append(f"{name:44s}" + (g(n) + blank if gpu_side else blank + g(n)))
    lines.append(f"{'total':44s}{g(plan.gpu_total_bytes)}{g(plan.ram_total_bytes)}")
    lines.append(f"{'available':44s}{g(plan.gpu_mem_bytes)}{g(plan.ram_bytes)}")
    yes = lambda ok: f"{'yes' if ok else 'NO':>10s}"  # noqa: E731
    lines.append(f"{'fits':44s}{yes(plan.fits_gpu) if plan.on_gpu else blank}{yes(plan.fits_ram)}")
    if plan.cache_room:
        lines.append(_room_line(plan))
    if not plan.fits:
        lines.append(f"does not fit: {plan.problem}")
        if plan.suggestions:
            lines.append("smallest changes that fit (each checked by planning again):")
            lines += [f"  - {s['text']}" for s in plan.suggestions]
        else:
            lines += [f"  - {a}" for a in plan.advice[1:]]
    if plan.predicted_decode_tok_s is not None:
        p = plan.prediction
        how = "experts streamed to the GPU" if p["prefill_experts_streamed"] else "experts on the CPU"
        thr = p["stream_threshold_tokens"]
        ms = p["decode_step_ms"]
        lines.append(f"predicted: prefill {plan.predicted_prefill_tok_s:.1f} tok/s ({p['prefill_tokens']}-token "
                     f"prompt, {how}" + (f"; streaming pays from {thr} tokens a layer" if thr else "") + "), "
                     f"decode {plan.predicted_decode_tok_s:.2f} tok/s (step: CPU experts {ms['cpu_experts']:.1f} ms, "
                     f"accelerator {ms['accelerator']:.1f} ms, transfers {ms['transfers']:.1f} ms"
                     + (f", overhead {ms['overhead']:.1f} ms" if ms.get("overhead") else "") + ")")
        if plan.hw_source == "default rates":
            h = DEFAULT_HW
            lines.append(f"  (an estimate from default rates, not this machine's: RAM {h.ram_bandwidth_gbs:g} GB/s x "
                         f"{h.cpu_kernel_efficiency:g}, CPU {h.cpu_gflops:g} GFLOP/s"
                         + (f", PCIe {h.pcie_gbs:g} GB/s, GPU {h.gpu_bandwidth_gbs:g} GB/s, {h.gpu_tflops:g} TFLOP/s"
                            if plan.on_gpu else "")
                         + "; measure yours: tools/bench_experts.py --json > hw.json, then --hw hw.json)")
    return "\n".join(lines)


def check_before_load(config: ModelConfig, **kwargs) -> Plan:
    """make_plan with this machine's memory unless given; raises PlanError (the table + advice) if it does not fit."""
    mem = machine_memory()
    kwargs.setdefault("gpu_mem_bytes", mem["gpu_mem_bytes"])
    kwargs.setdefault("ram_bytes", mem["ram_bytes"])
    plan = make_plan(config, **kwargs)
    if not plan.fits:
        raise PlanError(format_plan(plan))
    return plan


from hybrid.plan.advice import advise_plan, cache_room, default_max_context  # noqa: E402,F401  (uses the above)
