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
                       "numba_int8": {"1": 34.0, "4": 25.0, "16": 10.0}},
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
    assert set(PATH_BYTES) >= set(BENCH["dense_gbs"])


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
    rate = interpolate_rate(Hardware.from_dict(BENCH).dense_gbs[path], batch)
    linears_ms = params * PATH_BYTES[path] / (rate * 1e9) * 1e3
    acc = p.prediction["decode_step_ms"]["accelerator"]
    assert linears_ms <= acc <= linears_ms * 1.2          # + router, norms and the KV cache at RAM speed
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
    again = make_plan(k26, gpu_mem_bytes=0, ram_bytes=parse_size("2TB"), context=4096, hw=Hardware.from_dict(BENCH))
    assert old.prediction["accelerator_path"] == "ram"
    assert old.predicted_decode_tok_s == pytest.approx(again.predicted_decode_tok_s)
