"""The repacked-expert cache (hybrid/experts/disk_cache.py, `expert_cache=`): on INT4, FP8 and bf16
checkpoints the first start writes it (a manifest keyed on the shards that really hold each layer's
experts), the second start memory-maps it without reading or quantizing any expert and gives
bit-identical logits; a changed shard is detected and rebuilt; backends without a repacked layout
refuse the option. Also: the auto backend choice is logged."""
import json
import logging
import os

import numpy as np
import pytest
import torch

from hybrid import LLM
from hybrid.synthetic import write_checkpoint

pytest.importorskip("numba")

IDS = list(range(5, 30))


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """DeepSeek-V3 config without quantization_config, every Linear bf16 (a community bf16 conversion)."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt-bf16"), "tiny", layout="bf16", tokenizer=False, seed=5)


@pytest.fixture(params=["k2.6", "deepseek-v3-fp8", "bf16"])
def any_format(request, checkpoint_dir, bf16_dir):
    return bf16_dir if request.param == "bf16" else checkpoint_dir(request.param)


def expert_shards(model_dir, layer: int) -> set[str]:
    """Shard files holding layer `layer`'s routed experts, read from the index file itself."""
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    key = f"model.layers.{layer}.mlp.experts."
    return {f for name, f in weight_map.items() if name.removeprefix("language_model.").startswith(key)}


def moe_layers(model_dir) -> list[int]:
    raw = json.loads((model_dir / "config.json").read_text())
    cfg = raw.get("text_config", raw)
    return list(range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]))


def test_second_start_maps_the_cache_and_gives_the_same_logits(any_format, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = LLM(any_format, expert_backend="numba", expert_cache=str(cache), progress=False)
    a = first.score(IDS)
    layers = moe_layers(any_format)
    assert sorted(p.name for p in cache.iterdir()) == [f"layer{i:03d}" for i in layers]
    for i in layers:
        manifest = json.loads((cache / f"layer{i:03d}" / "manifest.json").read_text())
        assert set(manifest["shards"]) == expert_shards(any_format, i)
        assert not isinstance(first.model.model.layers[i].mlp.experts.backend.arrays["gate"], np.memmap)

    import hybrid.experts.backends as backends

    def no_reading(*args, **kw):
        raise AssertionError("the second start read (or quantized) an expert instead of mapping the cache")
    monkeypatch.setattr(backends, "expert_as_int4", no_reading)
    second = LLM(any_format, expert_backend="numba", expert_cache=str(cache), progress=False)
    for i in layers:
        ex = second.model.model.layers[i].mlp.experts.backend
        assert all(isinstance(ex.arrays[k], np.memmap) for k in ("gate", "up", "down")), f"layer {i} not mapped"
    assert torch.equal(second.score(IDS), a)


def test_changed_shard_is_detected_and_rebuilt(ckpt_copy, tmp_path, caplog):
    cache = tmp_path / "cache"
    LLM(ckpt_copy, expert_backend="numba", expert_cache=str(cache), progress=False)
    (shard,) = expert_shards(ckpt_copy, 1)
    st = (ckpt_copy / shard).stat()
    os.utime(ckpt_copy / shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))        # "re-downloaded"
    caplog.set_level(logging.INFO, logger="hybrid.expert_cache")
    again = LLM(ckpt_copy, expert_backend="numba", expert_cache=str(cache), progress=False)
    assert "stale" in caplog.text
    assert not isinstance(again.model.model.layers[1].mlp.experts.backend.arrays["gate"], np.memmap)
    third = LLM(ckpt_copy, expert_backend="numba", expert_cache=str(cache), progress=False)   # rewritten
    assert isinstance(third.model.model.layers[1].mlp.experts.backend.arrays["gate"], np.memmap)


@pytest.mark.parametrize("backend", ["torch", "ref"])
def test_backends_without_a_repacked_layout_refuse_the_cache(ckpt_copy, backend):
    with pytest.raises(ValueError, match="expert_cache"):
        LLM(ckpt_copy, expert_backend=backend, expert_cache=True, progress=False)
    assert not (ckpt_copy / ".hybrid-cache").exists()


def test_auto_backend_is_logged(tiny_dir, caplog):
    caplog.set_level(logging.INFO, logger="hybrid")
    llm = LLM(tiny_dir, expert_backend="auto", progress=False)
    assert llm.expert_backend in ("numba", "kt")
    assert f"expert backend: {llm.expert_backend} (" in caplog.text
    from cpu_kernels import CPUExperts
    if llm.expert_backend == "numba":
        assert isinstance(llm.model.model.layers[1].mlp.experts.backend, CPUExperts)
