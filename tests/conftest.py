"""Shared fixtures: tiny synthetic checkpoints in the real layout, written once per test session.

Marker `cuda`: the test needs a CUDA GPU (`@pytest.mark.cuda`); on a machine without one it is skipped
with that reason, on a GPU machine it runs (`pytest -m cuda` runs only those)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))   # tests/hf_reference.py

from hybrid.synthetic import write_checkpoint  # noqa: E402

# name -> write_checkpoint arguments; every variant is checked against transformers
VARIANTS = {
    "k2.6": dict(),
    "groups": dict(n_group=4, topk_group=2, seed=1),                         # group-limited routing
    "dense2-yarn": dict(first_k_dense_replace=2, num_hidden_layers=4, beta_fast=1.0, seed=2),
    "deepseek-v3-fp8": dict(layout="deepseek-v3", n_group=4, topk_group=2, seed=3),
    "bf16": dict(layout="bf16", seed=4),                                     # dense bf16 experts, quantized at load
}


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped, with the reason, where torch sees none)")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """Path of a tiny synthetic checkpoint of the given variant (cached for the session)."""
    made = {}

    def get(variant: str = "k2.6") -> Path:
        if variant not in made:
            out = tmp_path_factory.mktemp(f"ckpt-{variant}")
            made[variant] = write_checkpoint(out, "tiny", tokenizer=True, **VARIANTS[variant])
        return made[variant]
    return get


@pytest.fixture(scope="session")
def tiny_dir(checkpoint_dir) -> Path:
    return checkpoint_dir("k2.6")


@pytest.fixture
def ckpt_copy(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, for tests that damage or touch its files."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, dst)
    return dst
