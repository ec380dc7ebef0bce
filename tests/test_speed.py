"""hybrid/speed.py's dtype-aware CPU-only prediction: the dense path by dtype / CPU weight format, the
rate interpolation between measured row counts, Hardware.from_dict reading tools/bench_experts.py
--dense output, and the old model kept when no dtype is given. The figures checked are the model's
arithmetic on hand-written rates (not timings); tools/bench_generate.py --hw compares predictions with
measurements. Run: pytest tests/test_speed.py (a few seconds).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from hybrid.config import load_config
from hybrid.plan import expert_bytes, linear_shapes, make_plan, parse_size
from hybrid.speed import PATH_BYTES, Hardware, dense_path, interpolate_rate, predict

K26 = Path(__file__).parent / "fixtures" / "kimi-k2.6"
BENCH = {"read_bandwidth_gbs": 40.0, "decode_ratio": 0.8, "prefill_512_gflops": 300.0, "fma_peak_gflops": 900.0,
         "dense_gbs": {"torch_float32": {"1": 30.0, "4": 20.0, "16": 8.0},
                       "torch_bfloat16": {"1": 20.0, "4": 6.0, "16": 2.0},
                       "numba_bf16": {"1": 36.0, "4": 30.0, "16": 12.0},
                       "numba_int8": {"1": 34.0, "4": 25.0, "16": 10.0},
                       "mla_numba_bf16": {"1": 24.0, "4": 10.0, "16": 3.0},
                       "mla_torch_bfloat16": {"1": 2.0, "4": 0.5, "16": 0.1}},
         "matmul_gflops": {"bfloat16": 100.0}}


@pytest.fixture(scope="module")
def k26():
    return load_config(K26)


def _cpu_plan(config, batch, **kw):
    hw = Hardware.from_dict(BENCH)
    p = make_plan(config, gpu_mem_bytes=0, ram_bytes=parse_size("2TB"), context=4096, batch=batch, hw=hw)
    params = sum(n * k for shapes in linear_shapes(config).values() for n, k in shapes)
    predict(config, p, hw, 512, expert_bytes=expert_bytes(config), params=params, kv_bytes=4, **kw)
    return p, params


def test_dense_path_names():
    assert dense_path("float32", None) == "torch_float32"
    assert dense_path("torch.bfloat16", "off") == "torch_bfloat16"
    assert dense_path("float32", "int8") == "numba_int8" and dense_path(None, "bf16") == "numba_bf16"
    assert dense_path(None, None) is None
    assert set(PATH_BYTES) >= {p.removeprefix("mla_") for p in BENCH["dense_gbs"]}


def test_interpolation_is_linear_in_time_per_byte():
    r = {1: 30.0, 4: 20.0, 16: 8.0}
    assert interpolate_rate(r, 1) == 30.0 and interpolate_rate(r, 16) == 8.0
    assert interpolate_rate(r, 64) == 8.0                               # held beyond the last point
    f = (2 - 1) / 3
    assert interpolate_rate(r, 2) == pytest.approx(1 / ((1 - f) / 30 + f / 20))
    with pytest.raises(ValueError):
        interpolate_rate({}, 1)


def test_hardware_reads_dense_rates():
    hw = Hardware.from_dict(BENCH)
    assert hw.dense_gbs["numba_int8"][4] == 25.0                         # JSON string keys -> rows
    assert hw.matmul_gflops == {"bfloat16": 100.0, "float32": 900.0}     # float32 from fma_peak_gflops
    old = Hardware.from_dict({k: BENCH[k] for k in ("read_bandwidth_gbs", "decode_ratio", "prefill_512_gflops")})
    assert old.dense_gbs == {} and old.matmul_gflops == {}


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("dtype,cpu_weights", [("float32", None), ("bfloat16", None), ("float32", "bf16"),
                                               ("bfloat16", "int8")])
def test_cpu_only_step_uses_the_path_rate(k26, batch, dtype, cpu_weights):
    p, params = _cpu_plan(k26, batch, dtype=dtype, cpu_weights=cpu_weights)
    path = dense_path(dtype, cpu_weights)
    assert p.prediction["accelerator_path"] == path
    rates = Hardware.from_dict(BENCH).dense_gbs
    kvb = sum(n * k for n, k in linear_shapes(k26)["kv_b_proj"])
    # kv_b_proj: our mla kernels with cpu_weights (else torch's bmm in the model dtype), at BENCH's "mla_" rate
    # for that path where it has one, else at the path's Linear rate
    kvb_path = path if cpu_weights else "torch_" + dtype
    kvb_rate = rates.get("mla_" + kvb_path, rates[kvb_path])
    linears_ms = ((params - kvb) * PATH_BYTES[path] / (interpolate_rate(rates[path], batch) * 1e9)
                  + kvb * PATH_BYTES[kvb_path] / (interpolate_rate(kvb_rate, batch) * 1e9)) * 1e3
    acc = p.prediction["decode_step_ms"]["accelerator"]
    assert linears_ms <= acc <= linears_ms * 1.2          # + router, norms and the KV cache at RAM speed
    assert p.prediction["decode_step_ms"]["overhead"] == 0.0   # not measured in BENCH
    assert p.predicted_decode_tok_s == pytest.approx(batch * 1e3 / sum(p.prediction["decode_step_ms"].values()))


def test_float32_is_slower_than_bf16_storage(k26):
    f32, _ = _cpu_plan(k26, 4, dtype="float32")
    bf16, _ = _cpu_plan(k26, 4, dtype="float32", cpu_weights="bf16")
    i8, _ = _cpu_plan(k26, 4, dtype="float32", cpu_weights="int8")
    assert f32.predicted_decode_tok_s < bf16.predicted_decode_tok_s < i8.predicted_decode_tok_s
    assert f32.prediction["prefill_s"]["accelerator"] < _cpu_plan(k26, 4, dtype="bfloat16")[0].prediction[
        "prefill_s"]["accelerator"]                                       # 900 vs 100 GFLOP/s matmul


def test_without_dtype_the_old_model_stays(k26):
    old, _ = _cpu_plan(k26, 1)
    assert old.prediction["accelerator_path"] == "ram"
    bare = Hardware.from_dict({k: BENCH[k] for k in ("read_bandwidth_gbs", "decode_ratio", "prefill_512_gflops")})
    again = make_plan(k26, gpu_mem_bytes=0, ram_bytes=parse_size("2TB"), context=4096, hw=bare)
    dense = sum(v for k, v in again.parts.items() if k != "embed_tokens" and not k.startswith("vision"))
    kv = again.context / 2 * k26.num_hidden_layers * (k26.kv_lora_rank + k26.qk_rope_head_dim) * 4
    ms = (dense + kv) / (BENCH["read_bandwidth_gbs"] * 1e9) * 1e3   # no measured dense rates: bytes / ram_bw
    assert again.prediction["decode_step_ms"]["accelerator"] == pytest.approx(ms, rel=1e-6)


def test_make_plan_predicts_the_cpu_default(k26):
    """Without a GPU, make_plan plans and predicts the default CPU path (cpu_weights auto = bf16 through our
    kernels: the Linears and kv_b_proj at 2 bytes a weight), and "off" torch's float32 Linears (kv_b_proj too)."""
    hw = Hardware.from_dict(BENCH)
    kw = dict(gpu_mem_bytes=0, ram_bytes=parse_size("2TB"), context=4096, hw=hw)
    auto, off = make_plan(k26, **kw), make_plan(k26, cpu_weights="off", **kw)
    assert auto.cpu_weights == "bf16" and off.cpu_weights == "off"
    assert auto.prediction["accelerator_path"] == "numba_bf16" and off.prediction["accelerator_path"] == "torch_float32"
    lin = linear_shapes(k26)
    for part in ("attention", "lm_head", "shared_experts"):
        n = sum(a * b for a, b in lin[part])
        assert auto.parts[part] == 2 * n and off.parts[part] == 4 * n
    assert 2 * auto.parts["kv_b_proj"] == off.parts["kv_b_proj"] == 4 * sum(a * b for a, b in lin["kv_b_proj"])
    assert auto.predicted_decode_tok_s > off.predicted_decode_tok_s
    gpu = make_plan(k26, gpu_mem_bytes=parse_size("48GB"), ram_bytes=parse_size("2TB"), context=4096)
    assert gpu.cpu_weights == "off"


def test_step_overhead_is_added_per_layer_and_step(k26):
    """With step_overhead measured (tools/bench_dense.py), a CPU-only step costs per_step + layers x per_layer
    more, interpolated linearly between the measured batch sizes."""
    over = {"per_step_ms": {"1": 2.0, "16": 5.0}, "per_layer_ms": {"1": 0.5, "16": 2.0}}
    hw0, hw1 = Hardware.from_dict(BENCH), Hardware.from_dict({**BENCH, "step_overhead": over})
    for batch, want in ((1, 2.0 + 61 * 0.5), (16, 5.0 + 61 * 2.0), (6, 3.0 + 61 * 1.0), (64, 5.0 + 61 * 2.0)):
        plans = [make_plan(k26, gpu_mem_bytes=0, ram_bytes=parse_size("2TB"), context=4096, batch=batch, hw=hw)
                 for hw in (hw0, hw1)]
        ms = [sum(p.prediction["decode_step_ms"].values()) for p in plans]
        assert plans[1].prediction["decode_step_ms"]["overhead"] == pytest.approx(want)
        assert ms[1] - ms[0] == pytest.approx(want)


def test_step_overhead_is_taken_for_the_model_dtype(k26):
    over = {"float32": {"per_step_ms": {"1": 1.0}, "per_layer_ms": {"1": 1.0}},
            "bfloat16": {"per_step_ms": {"1": 3.0}, "per_layer_ms": {"1": 2.0}}}
    for dtype, want in (("float32", 1.0 + 61 * 1.0), ("bfloat16", 3.0 + 61 * 2.0)):
        p, _ = _cpu_plan(k26, 1, dtype=dtype, cpu_weights="bf16")
        hw = Hardware.from_dict({**BENCH, "step_overhead": over})
        params = sum(n * k for shapes in linear_shapes(k26).values() for n, k in shapes)
        predict(k26, p, hw, 512, expert_bytes=expert_bytes(k26), params=params, kv_bytes=4, dtype=dtype,
                cpu_weights="bf16")
        assert p.prediction["decode_step_ms"]["overhead"] == pytest.approx(want)


def test_cpu_prefill_follows_cpulinear_paths(k26):
    """With cpu_weights, prefill's Linears take CPULinear's two paths: up to CPU_LINEAR_NUMBA_ROWS tokens our
    kernels at their 16-row rate in flop (2 x 16 x GB/s / bytes a weight), beyond it torch's fp32 matmul
    plus widening the weight (bytes + 8 per weight through RAM); the attention at the matmul rate."""
    from hybrid.model import cpu_linear
    from hybrid.speed import CPU_LINEAR_NUMBA_ROWS
    assert CPU_LINEAR_NUMBA_ROWS == cpu_linear.DECODE_ROWS
    hw = Hardware.from_dict({**BENCH, "matmul_gflops": {"float32": 200.0}})
    params = sum(n * k for shapes in linear_shapes(k26).values() for n, k in shapes)
    c = k26
    for T in (64, 65):
        p = make_plan(k26, gpu_mem_bytes=0, ram_bytes=parse_size("2TB"), context=4096, batch=1, hw=hw)
        predict(k26, p, hw, T, expert_bytes=expert_bytes(k26), params=params, kv_bytes=4, dtype="float32",
                cpu_weights="bf16")
        attn = c.num_hidden_layers * (T * T / 2) * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * 2 / 200e9
        if T == 64:
            want = 2 * params * T / (2 * 16 * 12.0 / 2 * 1e9) + attn          # numba_bf16 at 16 rows: 12 GB/s
        else:
            want = 2 * params * T / 200e9 + params * (2 + 8) / (40.0 * 1e9) + attn
        assert p.prediction["prefill_s"]["accelerator"] == pytest.approx(want, rel=1e-9)


def test_measured_experts_hit_replaces_uniform_routing(k26):
    """bench_generate passes the distinct experts per layer it measured: the CPU expert time is then
    those experts' bytes at the kernel's rate, not the uniform-routing expectation's."""
    hw = Hardware.from_dict(BENCH)
    p, _ = _cpu_plan(k26, 16, dtype="float32", cpu_weights="bf16")
    uniform = p.prediction["decode_step_ms"]["cpu_experts"]
    p2, _ = _cpu_plan(k26, 16, dtype="float32", cpu_weights="bf16", experts_hit=20.0)
    want = k26.num_moe_layers * 20.0 * expert_bytes(k26) / (hw.ram_bandwidth_gbs * hw.cpu_kernel_efficiency * 1e9)
    assert p2.prediction["decode_step_ms"]["cpu_experts"] == pytest.approx(1e3 * want)
    assert uniform > p2.prediction["decode_step_ms"]["cpu_experts"]      # 16 tokens x top-8 of 384 hit > 20
    assert p2.predicted_decode_tok_s > p.predicted_decode_tok_s
