"""A cache of the repacked routed-expert layout next to the checkpoint (or in a chosen folder), so the
next start memory-maps it instead of reading and repacking ~600 GB of INT4.

One folder per MoE layer: gate.npy / up.npy / down.npy (cpu_kernels layout) and manifest.json, which
records the layout version, the shapes and, for every shard holding the layer's experts, its size
and modification time. A manifest that does not match (changed shard, other layout version, other
shapes) means the layer is repacked and its cache rewritten. Files are written to a temporary name
and renamed, so a crash mid-write leaves no cache that looks valid. bf16 / FP8 experts are cached
after quantization to INT4 (hybrid.formats.quantize_int4), so the next start skips that too.
Only the numba backend has a repacked layout to cache; hybrid/llm.py refuses the option for others.
Checked by tests/test_expert_cache.py (INT4, FP8 and bf16 checkpoints).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger("hybrid.expert_cache")
ARRAYS = ("gate", "up", "down")
QUANTIZER_VERSION = 1   # bump when hybrid.formats.quantize_int4 changes (bf16 / FP8 experts are cached quantized)


def _key(ckpt, layer: int) -> dict:
    from cpu_kernels import layout
    c = ckpt.config
    prefix = f"model.layers.{layer}.mlp.experts."
    shards = sorted({ckpt.file_of(name).name for name in ckpt.names() if name.startswith(prefix)})
    if not shards:
        raise ValueError(f"{ckpt.dir}: no tensors named {prefix}* in the checkpoint")
    stats = {}
    for name in shards:
        st = (ckpt.dir / name).stat()
        stats[name] = [st.st_size, st.st_mtime_ns]
    return {"layout_version": layout.LAYOUT_VERSION, "quantizer": QUANTIZER_VERSION, "experts": c.n_routed_experts,
            "hidden": c.hidden_size, "intermediate": c.moe_intermediate_size, "shards": stats}


def load_layer(cache_dir: Path, ckpt, layer: int, cls, num_threads=None, act_format: str = "int8"):
    """The layer's experts (a cpu_kernels.CPUExperts subclass `cls`) memory-mapped from the cache,
    or None if absent or stale."""
    folder = Path(cache_dir) / f"layer{layer:03d}"
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        saved = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        saved = None
    if saved != _key(ckpt, layer):
        log.info("expert cache %s is stale (checkpoint or layout changed): repacking layer %d", folder, layer)
        return None
    arrays = [np.load(folder / f"{name}.npy", mmap_mode="c") for name in ARRAYS]
    return cls.from_arrays(*arrays, num_threads=num_threads, act_format=act_format)


def save_layer(cache_dir: Path, ckpt, layer: int, experts) -> None:
    folder = Path(cache_dir) / f"layer{layer:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)          # invalid until every array is written
    for name, arr in experts.arrays.items():
        tmp = folder / f".{name}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, folder / f"{name}.npy")
    tmp = folder / ".manifest.json.tmp"
    tmp.write_text(json.dumps(_key(ckpt, layer)))
    os.replace(tmp, folder / "manifest.json")
