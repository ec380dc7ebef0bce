"""Speed prediction for the memory plan (hybrid/plan.py): the machine's measured rates (`Hardware`)
and `predict`, which fills a Plan's predicted prefill/decode tok/s from them.
Checked by tests/test_plan.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from hybrid.config import ModelConfig
from hybrid.experts.streaming import LayerShape, Rates, expected_experts_hit, layer_costs, threshold_tokens

TRANSFER_LATENCY_S = 10e-6        # per host<->device copy + sync in a decode step
INT4_GPU_EFFICIENCY = 0.5         # W4A16 kernels reach about half the dense bf16 peak


@dataclass(frozen=True)
class Hardware:
    """Measured rates of a workstation (tools/bench_experts.py for the CPU side)."""
    ram_bandwidth_gbs: float          # STREAM-like read bandwidth, GB/s (1e9)
    pcie_gbs: float                   # host->device copy rate, 0 without a GPU
    gpu_bandwidth_gbs: float          # GPU memory bandwidth, 0 without a GPU
    cpu_kernel_efficiency: float      # INT4 decode kernel GB/s over ram_bandwidth_gbs (0..1]
    cpu_gflops: float                 # INT4 expert kernel GFLOP/s at prefill sizes
    gpu_tflops: float                 # dense bf16 TFLOP/s, 0 without a GPU

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
        hw = cls(**{k: float(d[k]) for k in cls.KEYS})
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



def predict(config: ModelConfig, plan, hw: Hardware, prefill_tokens: int, *, expert_bytes: int, params: int,
            kv_bytes: int) -> None:
    """Fill the plan's predictions (expert_bytes: one routed expert; params: accelerator-side linear
    weights; kv_bytes: bytes per cached latent value). The model, per decode step of a batch of B sequences:
        cpu  = distinct routed-expert bytes on the CPU / (ram_bw * cpu_kernel_efficiency)
               (distinct experts per layer E*(1-(1-k/E)^B), uniform routing; hot experts take
               their uniform share gpu_experts / (layers * E) of those bytes to the GPU)
        gpu  = (accelerator-side weights except embeddings + hot-expert share + the KV cache read at
               half the context) / gpu_bw      (on a CPU-only machine: / ram_bw)
        xfer = MoE layers * (2 * 10 us + B * D * 6 bytes / pcie)   (hidden to the CPU, result back)
        decode tok/s = B / (cpu + gpu + xfer)   (no overlap assumed: the shared expert is short)
    Prefill of one prompt of T tokens: per MoE layer min(cpu(T), stream(T)) from
    hybrid/experts/streaming.py, plus the accelerator side at 2 flop per weight per token and
    the causal attention (T^2/2 * H * (d_qk + d_v) * 2 flop per layer) at gpu_tflops
    (cpu_gflops on a CPU-only machine); prefill tok/s = T / total."""
    c = config
    gpu = plan.on_gpu and hw.has_gpu
    eb = expert_bytes
    n_moe, E, k, D = c.num_moe_layers, c.n_routed_experts, c.num_experts_per_tok, c.hidden_size
    frac_gpu = min(plan.gpu_experts, n_moe * E) / (n_moe * E) if (gpu and n_moe) else 0.0
    B = plan.batch
    hit = expected_experts_hit(E, k, B) if n_moe else 0.0
    cpu_bytes = n_moe * hit * eb * (1 - frac_gpu)
    t_cpu = cpu_bytes / (hw.ram_bandwidth_gbs * hw.cpu_kernel_efficiency * 1e9)
    dense = sum(v for p, v in plan.parts.items() if p != "embed_tokens")
    kv_read = B * c.num_hidden_layers * (plan.context / 2) * (c.kv_lora_rank + c.qk_rope_head_dim) * kv_bytes
    gpu_bytes = dense + n_moe * hit * eb * frac_gpu + kv_read
    t_gpu = gpu_bytes / ((hw.gpu_bandwidth_gbs if gpu else hw.ram_bandwidth_gbs) * 1e9)
    t_xfer = n_moe * (2 * TRANSFER_LATENCY_S + B * D * 6 / (hw.pcie_gbs * 1e9)) if gpu else 0.0
    plan.predicted_decode_tok_s = B / (t_cpu + t_gpu + t_xfer)

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
    t_dense = flops / ((hw.gpu_tflops * 1e12) if gpu else (hw.cpu_gflops * 1e9))
    plan.predicted_prefill_tok_s = T / (t_exp + t_dense)
    plan.prediction = {
        "decode_step_ms": {"cpu_experts": t_cpu * 1e3, "accelerator": t_gpu * 1e3, "transfers": t_xfer * 1e3},
        "decode_expert_bytes_per_token": cpu_bytes / B,
        "prefill_tokens": T, "prefill_s": {"experts": t_exp, "accelerator": t_dense},
        "prefill_experts_streamed": streamed,
        "stream_threshold_tokens": threshold_tokens(rates, shape) if (gpu and n_moe) else None,
    }
