"""Expert streaming (hybrid/experts/streaming.py): the CPU-vs-stream cost model on the K2.6 expert
shape, and the double-buffer bookkeeping against a fake device that simulates a copy queue and a
compute queue and records every event. Run: pytest tests/test_expert_streaming.py (< 1 s).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hybrid.config import load_config
from hybrid.experts.streaming import (DoubleBuffer, LayerShape, Rates, StreamingPolicy, expected_experts_hit,
                                     layer_costs, threshold_tokens)

K26 = Path(__file__).parent / "fixtures" / "kimi-k2.6"
# a workstation: PCIe 4.0 x16, a GPU doing W4A16 at 150 TFLOP/s, an 8-channel DDR5 CPU
WORKSTATION = Rates(pcie_gbs=25.0, gpu_int4_gflops=150_000.0, cpu_kernel_gbs=150.0, cpu_gflops=2_000.0)
CPU_ONLY = Rates(pcie_gbs=0.0, gpu_int4_gflops=0.0, cpu_kernel_gbs=20.0, cpu_gflops=200.0)


@pytest.fixture(scope="module")
def shape():
    return LayerShape.from_config(load_config(K26))


def test_k26_layer_shape(shape):
    assert shape.num_experts == 384 and shape.top_k == 8
    assert shape.expert_bytes == 3 * 2048 * 7168 // 2 + 3 * 2048 * 7168 // 32 * 2   # 24.77 MB
    assert shape.flops_per_token == 6 * 7168 * 2048


def test_expected_experts_hit():
    assert expected_experts_hit(384, 8, 0) == 0
    assert expected_experts_hit(384, 8, 1) == pytest.approx(8)
    assert 383 < expected_experts_hit(384, 8, 4096) <= 384


def test_costs_by_hand(shape):
    cpu, stream = layer_costs(WORKSTATION, shape, 1)
    assert cpu == pytest.approx(8 * shape.expert_bytes / 150e9)        # decode reads 8 experts from RAM
    assert stream == pytest.approx(8 * shape.expert_bytes / 25e9)      # ... or copies them over PCIe
    cpu, stream = layer_costs(WORKSTATION, shape, 8192, experts_hit=384)
    assert cpu == pytest.approx(8192 * 8 * shape.flops_per_token / 2000e9)
    assert stream == pytest.approx(384 * shape.expert_bytes / 25e9)


def test_cpu_only_machine_always_picks_cpu(shape, caplog):
    assert threshold_tokens(CPU_ONLY, shape) is None
    with caplog.at_level(logging.INFO, logger="hybrid.expert_streaming"):
        for rates in (None, CPU_ONLY):
            policy = StreamingPolicy(rates, shape)
            assert policy.threshold is None
            assert not any(policy.decide(1, t).stream for t in (1, 64, 4096, 1 << 20))
    assert "no GPU" in caplog.text


def test_workstation_threshold(shape, caplog):
    with caplog.at_level(logging.INFO, logger="hybrid.expert_streaming"):
        policy = StreamingPolicy(WORKSTATION, shape)
    t = policy.threshold
    assert t is not None and 16 < t < 4096, t
    assert f">= {t} tokens" in caplog.text                       # the threshold is visible in the log
    assert not policy.decide(3, 1).stream                         # decode: CPU
    assert not policy.decide(3, t - 1).stream
    assert policy.decide(3, t).stream
    assert policy.decide(3, 8192).stream                          # long prefill: stream
    # a faster bus streams earlier; a faster CPU later
    faster_bus = Rates(64.0, 150_000.0, 150.0, 2_000.0)
    faster_cpu = Rates(25.0, 150_000.0, 150.0, 8_000.0)
    assert threshold_tokens(faster_bus, shape) < t < threshold_tokens(faster_cpu, shape)


class FakeDevice:
    """Two in-order queues on a simulated clock; records (kind, layer, buffer, start, end)."""

    def __init__(self, copy_s: float, compute_s: float):
        self.copy_s, self.compute_s = copy_s, compute_s
        self.free = {"copy": 0.0, "compute": 0.0}
        self.events: list[dict] = []
        self.waited = []

    def _op(self, kind, layer, buffer, after, dur):
        start = max(self.free[kind], after["end"] if after else 0.0)
        ev = dict(kind=kind, layer=layer, buffer=buffer, start=start, end=start + dur)
        self.free[kind] = ev["end"]
        self.events.append(ev)
        return ev

    def copy(self, layer, buffer, after):
        assert after is None or after["kind"] == "compute"
        return self._op("copy", layer, buffer, after, self.copy_s)

    def compute(self, layer, buffer, after):
        assert after is not None and after["kind"] == "copy" and after["layer"] == layer
        return self._op("compute", layer, buffer, after, self.compute_s)

    def wait(self, event):
        self.waited.append(event)

    def of(self, kind):
        return {e["layer"]: e for e in self.events if e["kind"] == kind}


def check_schedule(dev: FakeDevice, layers, nb):
    copies, computes = dev.of("copy"), dev.of("compute")
    assert sorted(copies) == sorted(computes) == sorted(layers)
    for i, layer in enumerate(layers):
        c, k = copies[layer], computes[layer]
        assert c["buffer"] == k["buffer"] == i % nb
        assert k["start"] >= c["end"], f"layer {layer} computed before its weights arrived"
        # no buffer is overwritten while in use: every other copy into this buffer lies outside
        # [copy start, compute end] of this layer
        for other in dev.events:
            if other["kind"] == "copy" and other["buffer"] == k["buffer"] and other["layer"] != layer:
                assert other["end"] <= c["start"] or other["start"] >= k["end"], \
                    f"copy of layer {other['layer']} overwrote buffer {k['buffer']} while layer {layer} used it"
    return max(e["end"] for e in dev.events)


@pytest.mark.parametrize("copy_s,compute_s", [(1.0, 1.0), (3.0, 1.0), (1.0, 3.0)])
def test_double_buffer_overlaps_copy_and_compute(copy_s, compute_s):
    layers = list(range(1, 9))
    dev = FakeDevice(copy_s, compute_s)
    DoubleBuffer(dev, layers).run()
    end = check_schedule(dev, layers, 2)
    copies, computes = dev.of("copy"), dev.of("compute")
    for a, b in zip(layers, layers[1:]):      # copy(l+1) runs while compute(l) runs
        assert copies[b]["start"] < computes[a]["end"] and copies[b]["end"] > computes[a]["start"]
    L = len(layers)
    assert end == pytest.approx(min(copy_s, compute_s) + L * max(copy_s, compute_s))
    assert end < L * (copy_s + compute_s)
    assert dev.waited == [computes[layers[-1]]]
    # issue order: two copies ahead, then copy(l+2) right after compute(l) is issued
    order = [(e["kind"], e["layer"]) for e in dev.events]
    assert order[:6] == [("copy", 1), ("copy", 2), ("compute", 1), ("copy", 3), ("compute", 2), ("copy", 4)]


def test_single_buffer_is_serial_and_safe():
    layers = [1, 2, 3]
    dev = FakeDevice(1.0, 2.0)
    DoubleBuffer(dev, layers, num_buffers=1).run()
    assert check_schedule(dev, layers, 1) == pytest.approx(9.0)


def test_stepwise_use_and_order_check():
    dev = FakeDevice(1.0, 1.0)
    db = DoubleBuffer(dev, [4, 7, 9])          # only the layers the policy chose to stream
    assert [e["layer"] for e in dev.events] == [4, 7]
    db.compute(4)
    with pytest.raises(AssertionError, match="order"):
        db.compute(9)
    db.compute(7)
    db.compute(9)
    check_schedule(dev, [4, 7, 9], 2)
