"""The repacked-expert cache: a second start memory-maps it; a changed shard is detected and rebuilt."""
import logging
import os

import numpy as np
import pytest
import torch

from hybrid import LLM

pytest.importorskip("numba")


@pytest.fixture
def ckpt(ckpt_copy):
    return ckpt_copy


def test_second_start_maps_the_cache_and_gives_the_same_logits(ckpt, tmp_path):
    cache = tmp_path / "cache"
    ids = list(range(5, 30))
    first = LLM(ckpt, expert_backend="numba", expert_cache=str(cache), progress=False)
    a = first.score(ids)
    layers = sorted(p.name for p in cache.iterdir())
    assert layers == ["layer001", "layer002"] and (cache / "layer001" / "manifest.json").is_file()
    second = LLM(ckpt, expert_backend="numba", expert_cache=str(cache), progress=False)
    ex = second.model.model.layers[1].mlp.experts.backend
    assert isinstance(ex.arrays["gate"], np.memmap), "the second start must map the cache, not repack"
    assert torch.equal(second.score(ids), a)


def test_changed_shard_is_detected_and_rebuilt(ckpt, tmp_path, caplog):
    cache = tmp_path / "cache"
    LLM(ckpt, expert_backend="numba", expert_cache=str(cache), progress=False)
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))        # "re-downloaded"
    caplog.set_level(logging.INFO, logger="hybrid.expert_cache")
    again = LLM(ckpt, expert_backend="numba", expert_cache=str(cache), progress=False)
    assert "stale" in caplog.text
    assert not isinstance(again.model.model.layers[1].mlp.experts.backend.arrays["gate"], np.memmap)


def test_auto_backend_is_logged(tiny_dir, caplog):
    caplog.set_level(logging.INFO, logger="hybrid.loader")
    llm = LLM(tiny_dir, expert_backend="auto", progress=False)
    assert "expert_backend auto:" in caplog.text
    assert type(llm.model.model.layers[1].mlp.experts.backend).__name__ in ("CPUExperts", "KTExperts")
