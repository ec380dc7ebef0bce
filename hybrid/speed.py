"""Speed prediction for the memory plan (hybrid/plan): the machine's measured rates (`Hardware`)
and `predict`, which fills a Plan's predicted prefill/decode tok/s from them.

On a CPU-only machine the accelerator side's Linears are read from RAM every decode step; how fast
depends on the path (torch's float32 or bf16 matmul, or hybrid/model/cpu_linear.py's Numba kernels
with bf16 / int8 weights) and on the batch. `Hardware.dense_gbs` holds those rates as measured by
tools/bench_experts.py --dense (GB/s of weight bytes per path and rows), and `predict(..., dtype=,
cpu_weights=)` uses them. Checked by tests/test_plan.py and tests/test_speed.py; compared with
measurements by tools/bench_generate.py --hw.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hybrid.config import ModelConfig
from hybrid.experts.streaming import LayerShape, Rates, expected_experts_hit, layer_costs, threshold_tokens

TRANSFER_LATENCY_S = 10e-6        # per host<->device copy + sync in a decode step
INT4_GPU_EFFICIENCY = 0.5         # W4A16 kernels reach about half the dense bf16 peak
CPU_LINEAR_NUMBA_ROWS = 64     # hybrid/model/cpu_linear.py DECODE_ROWS: calls up to this many rows run our kernels
# bytes per weight of the accelerator-side Linears on the CPU, by path (dense_path)
PATH_BYTES = {"torch_float32": 4, "torch_bfloat16": 2, "torch_float16": 2, "numba_bf16": 2, "numba_int8": 1}


def dense_path(dtype: str | None, cpu_weights: str | None) -> str | None:
    """The CPU path of the accelerator-side Linears: numba_bf16 / numba_int8 (CPULinear), else torch_<dtype>."""
    if cpu_weights in ("bf16", "int8"):
        return f"numba_{cpu_weights}"
    if dtype:
        return "torch_" + str(dtype).replace("torch.", "")
    return None


def interpolate_ms(points: dict, batch: int) -> float:
    """ms at `batch` from {rows: ms} measured at a few batch sizes: linear between two measured points,
    held at the nearest one outside them (0 without points)."""
    pts = sorted((int(b), float(v)) for b, v in points.items())
    if not pts:
        return 0.0
    if batch <= pts[0][0]:
        return pts[0][1]
    for (b0, v0), (b1, v1) in zip(pts, pts[1:]):
        if batch <= b1:
            return v0 + (v1 - v0) * (batch - b0) / (b1 - b0)
    return pts[-1][1]


def interpolate_rate(rates: dict, batch: int) -> float:
    """GB/s at `batch` rows from {rows: GB/s} measured at a few row counts: time per byte is linear in the
    rows between two measured points (a matrix-vector product turns compute-bound as rows grow), and
    held at the nearest measured point outside them."""
    pts = sorted((int(b), float(g)) for b, g in rates.items() if float(g) > 0)
    if not pts:
        raise ValueError("no measured rates")
    if batch <= pts[0][0]:
        return pts[0][1]
    for (b0, g0), (b1, g1) in zip(pts, pts[1:]):
        if batch <= b1:
            f = (batch - b0) / (b1 - b0)
            return 1.0 / ((1 - f) / g0 + f / g1)
    return pts[-1][1]


@dataclass(frozen=True)
class Hardware:
    """Measured rates of a workstation (tools/bench_experts.py for the CPU side)."""
    ram_bandwidth_gbs: float          # STREAM-like read bandwidth, GB/s (1e9)
    pcie_gbs: float                   # host->device copy rate, 0 without a GPU
    gpu_bandwidth_gbs: float          # GPU memory bandwidth, 0 without a GPU
    cpu_kernel_efficiency: float      # INT4 decode kernel GB/s over ram_bandwidth_gbs (0..1]
    cpu_gflops: float                 # INT4 expert kernel GFLOP/s at prefill sizes
    gpu_tflops: float                 # dense bf16 TFLOP/s, 0 without a GPU
    # CPU-only accelerator side (optional; tools/bench_experts.py --dense): {path: {rows: GB/s of weights}}
    # for the paths of dense_path, and {dtype: GFLOP/s} of torch's matmul at prefill sizes
    dense_gbs: dict = field(default_factory=dict, compare=False, hash=False)
    matmul_gflops: dict = field(default_factory=dict, compare=False, hash=False)
    # a decode step's time beyond reading weights (tools/bench_dense.py step_overhead, CPU-only), by model
    # dtype: {"float32": {"per_step_ms": {rows: ms}, "per_layer_ms": {rows: ms}}, "bfloat16": {...}}
    step_overhead: dict = field(default_factory=dict, compare=False, hash=False)

    KEYS = ("ram_bandwidth_gbs", "pcie_gbs", "gpu_bandwidth_gbs", "cpu_kernel_efficiency", "cpu_gflops",
            "gpu_tflops")

    @classmethod
    def from_dict(cls, d: dict) -> "Hardware":
        """Our keys, or tools/bench_experts.py --json output (read_bandwidth_gbs, decode_ratio,
        prefill_512_gflops) completed with pcie_gbs / gpu_bandwidth_gbs / gpu_tflops."""
        d = dict(d)
        d.setdefault("ram_bandwidth_gbs", d.get("read_bandwidth_gbs"))
        d.setdefault("cpu_kernel_efficiency", d.get("decode_ratio"))
        d.setdefault("cpu_gflops", d.get("prefill_512_gflops"))
        for k in ("pcie_gbs", "gpu_bandwidth_gbs", "gpu_tflops"):
            d.setdefault(k, 0.0)
        missing = [k for k in cls.KEYS if d.get(k) is None]
        if missing:
            raise ValueError(f"hardware figures missing: {', '.join(missing)} (needed: {', '.join(cls.KEYS)})")
        dense = {p: {int(b): float(g) for b, g in r.items()} for p, r in (d.get("dense_gbs") or {}).items()}
        mm = {k: float(v) for k, v in (d.get("matmul_gflops") or {}).items()}
        if "float32" not in mm and d.get("fma_peak_gflops"):
            mm["float32"] = float(d["fma_peak_gflops"])
        raw = d.get("step_overhead") or {}
        if "per_layer_ms" in raw:                      # one dtype's figures: the float32 default
            raw = {"float32": raw}
        over = {dt: {k: {int(b): float(v) for b, v in r.items()} for k, r in o.items()
                     if k in ("per_step_ms", "per_layer_ms")} for dt, o in raw.items()}
        hw = cls(**{k: float(d[k]) for k in cls.KEYS}, dense_gbs=dense, matmul_gflops=mm, step_overhead=over)
        if not 0 < hw.cpu_kernel_efficiency <= 1:
            raise ValueError(f"cpu_kernel_efficiency must be in (0, 1], got {hw.cpu_kernel_efficiency}")
        if hw.ram_bandwidth_gbs <= 0 or hw.cpu_gflops <= 0:
            raise ValueError("ram_bandwidth_gbs and cpu_gflops must be > 0")
        return hw

    @property
    def has_gpu(self) -> bool:
        return self.pcie_gbs > 0 and self.gpu_bandwidth_gbs > 0 and self.gpu_tflops > 0

    def rates(self) -> Rates:
        return Rates(self.pcie_gbs if self.has_gpu else 0.0, self.gpu_tflops * 1e3 * INT4_GPU_EFFICIENCY,
                     self.ram_bandwidth_gbs * self.cpu_kernel_efficiency, self.cpu_gflops)



_LINEAR_PARTS = ("attention", "dense_mlp", "shared_experts", "lm_head")     # kv_b_proj: its own rate, below


def predict(config: ModelConfig, plan, hw: Hardware, prefill_tokens: int, *, expert_bytes: int, params: int,
            kv_bytes: float, dtype: str | None = None, cpu_weights: str | None = None,
            experts_hit: float | None = None) -> None:
    """Fill the plan's predictions (expert_bytes: one routed expert; params: accelerator-side linear
    weights; kv_bytes: bytes per cached latent value). The model, per decode step of a batch of B sequences:
        cpu  = distinct routed-expert bytes on the CPU / (ram_bw * cpu_kernel_efficiency)
               (distinct experts per layer E*(1-(1-k/E)^B), uniform routing; hot experts take
               their uniform share gpu_experts / (layers * E) of those bytes to the GPU; `experts_hit`, the
               distinct experts per layer a run measured, replaces the uniform figure: tools/bench_generate.py
               passes its own, as a random-weight router sends a batch to fewer experts than K2.6's)
        gpu  = (accelerator-side weights except embeddings + hot-expert share + the KV cache read at
               half the context) / gpu_bw      (on a CPU-only machine: / ram_bw)
        xfer = MoE layers * (2 * 10 us + B * D * 6 bytes / pcie)   (hidden to the CPU, result back)
        decode tok/s = B / (cpu + gpu + xfer)   (no overlap assumed: the shared expert is short)
    On a CPU-only machine with `dtype` ("float32" | "bfloat16") or `cpu_weights` ("bf16" | "int8":
    CPULinear) given and hw.dense_gbs measured for that path, the Linears take
        params * bytes per weight of the path / dense_gbs[path] at B rows (interpolate_rate)
    instead of the plan's bytes / ram_bw (the old model, kept when neither is given); kv_b_proj (read in
    place by the absorbed decode: our mla kernels with cpu_weights, torch's bmm in the model dtype without)
    at dense_gbs["mla_" + that path] where measured; and with hw.step_overhead measured, the step's
    time beyond reading weights: per_step_ms(B) + layers * per_layer_ms(B).
    Prefill of one prompt of T tokens: per MoE layer min(cpu(T), stream(T)) from
    hybrid/experts/streaming.py, plus the accelerator side at 2 flop per weight per token and
    the causal attention (T^2/2 * H * (d_qk + d_v) * 2 flop per layer) at gpu_tflops
    (on a CPU-only machine: torch's matmul GFLOP/s for `dtype` where measured, else cpu_gflops; with
    cpu_weights, CPULinear's two paths: up to CPU_LINEAR_NUMBA_ROWS tokens the Numba kernels at their
    16-row rate in flop, beyond it torch's fp32 matmul plus widening the weight through RAM);
    prefill tok/s = T / total."""
    c = config
    gpu = plan.on_gpu and hw.has_gpu
    eb = expert_bytes
    n_moe, E, k, D = c.num_moe_layers, c.n_routed_experts, c.num_experts_per_tok, c.hidden_size
    frac_gpu = min(plan.gpu_experts, n_moe * E) / (n_moe * E) if (gpu and n_moe) else 0.0
    B = plan.batch
    hit = (expected_experts_hit(E, k, B) if experts_hit is None else experts_hit) if n_moe else 0.0
    cpu_bytes = n_moe * hit * eb * (1 - frac_gpu)
    t_cpu = cpu_bytes / (hw.ram_bandwidth_gbs * hw.cpu_kernel_efficiency * 1e9)
    # read every decode step: everything but the embedding table and the vision tower (prefill of images only)
    dense = sum(v for p, v in plan.parts.items() if p != "embed_tokens" and not p.startswith("vision"))
    kv_read = B * c.num_hidden_layers * (plan.context / 2) * (c.kv_lora_rank + c.qk_rope_head_dim) * kv_bytes
    path = None if gpu else dense_path(dtype, cpu_weights)
    t_over = 0.0
    if path in hw.dense_gbs and path in PATH_BYTES:
        # kv_b_proj: the absorbed decode reads its two halves in place, through our kernels where the CPU
        # Linears are ours (CPULinear.mla_query / mla_output), else torch's bmm in the model dtype; at the
        # rate bench_dense measured for that ("mla_" + path), else at the path's Linear rate
        mdtype = "torch_" + (str(dtype).replace("torch.", "") if dtype else "float32")
        kvb_params = c.num_hidden_layers * c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank
        base = path if path.startswith("numba_") else mdtype
        kvb_bytes = kvb_params * PATH_BYTES.get(base, 4)
        kvb_gbs = hw.dense_gbs.get("mla_" + base) or hw.dense_gbs.get(base)
        kvb_rate = interpolate_rate(kvb_gbs, B) if kvb_gbs else hw.ram_bandwidth_gbs
        linear_bytes = (params - kvb_params) * PATH_BYTES[path]
        other = dense - sum(v for p, v in plan.parts.items() if p in _LINEAR_PARTS or p == "kv_b_proj")  # router, norms
        t_gpu = linear_bytes / (interpolate_rate(hw.dense_gbs[path], B) * 1e9) + kvb_bytes / (kvb_rate * 1e9) \
            + (other + kv_read) / (hw.ram_bandwidth_gbs * 1e9)
        over = hw.step_overhead.get(mdtype.replace("torch_", ""), {})
        if over:
            t_over = (interpolate_ms(over.get("per_step_ms", {}), B)
                      + c.num_hidden_layers * interpolate_ms(over.get("per_layer_ms", {}), B)) / 1e3
    else:
        gpu_bytes = dense + n_moe * hit * eb * frac_gpu + kv_read
        t_gpu = gpu_bytes / ((hw.gpu_bandwidth_gbs if gpu else hw.ram_bandwidth_gbs) * 1e9)
    t_xfer = n_moe * (2 * TRANSFER_LATENCY_S + B * D * 6 / (hw.pcie_gbs * 1e9)) if gpu else 0.0
    plan.predicted_decode_tok_s = B / (t_cpu + t_gpu + t_xfer + t_over)

    T = prefill_tokens
    shape = LayerShape.from_config(c)
    rates = hw.rates() if gpu else Rates(0.0, 0.0, hw.ram_bandwidth_gbs * hw.cpu_kernel_efficiency, hw.cpu_gflops)
    t_exp, streamed = 0.0, False
    if n_moe:
        cpu_s, stream_s = layer_costs(rates, shape, T)
        cpu_s *= (1 - frac_gpu)
        streamed = stream_s < cpu_s
        t_exp = n_moe * min(cpu_s, stream_s)

    attn_flops = c.num_hidden_layers * (T * T / 2) * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * 2
    flops = 2 * params * T + attn_flops
    mm_dtype = "float32" if cpu_weights in ("bf16", "int8") else (str(dtype).replace("torch.", "") if dtype else None)
    cpu_mm = hw.matmul_gflops.get(mm_dtype) if mm_dtype else None     # CPULinear's prefill runs in fp32
    t_dense = flops / ((hw.gpu_tflops * 1e12) if gpu else ((cpu_mm or hw.cpu_gflops) * 1e9))
    if not gpu and path in hw.dense_gbs and path.startswith("numba_"):
        lin_flops, attn_s = 2 * params * T, attn_flops / ((cpu_mm or hw.cpu_gflops) * 1e9)
        if T <= CPU_LINEAR_NUMBA_ROWS:
            # CPULinear's Numba kernels, compute-bound past 16 rows: the 16-row rate in flop
            rows = max(hw.dense_gbs[path])
            gflops = 2 * rows * interpolate_rate(hw.dense_gbs[path], rows) / PATH_BYTES[path]
            t_dense = lin_flops / (gflops * 1e9) + attn_s
        elif cpu_mm:
            # the weight widened to fp32 (read it, write and read 4 bytes a weight), then torch's fp32 matmul
            widen = params * (PATH_BYTES[path] + 8) / (hw.ram_bandwidth_gbs * 1e9)
            t_dense = lin_flops / (cpu_mm * 1e9) + widen + attn_s
    plan.predicted_prefill_tok_s = T / (t_exp + t_dense)
    plan.prediction = {
        "decode_step_ms": {"cpu_experts": t_cpu * 1e3, "accelerator": t_gpu * 1e3, "transfers": t_xfer * 1e3,
                           "overhead": t_over * 1e3},
        "decode_expert_bytes_per_token": cpu_bytes / B, "accelerator_path": path or ("gpu" if gpu else "ram"),
        "prefill_tokens": T, "prefill_s": {"experts": t_exp, "accelerator": t_dense},
        "prefill_experts_streamed": streamed,
        "stream_threshold_tokens": threshold_tokens(rates, shape) if (gpu and n_moe) else None,
    }
