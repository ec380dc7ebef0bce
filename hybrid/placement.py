"""Where things run: `device="auto"` is cuda when torch sees a GPU, else the CPU (same code path);
routed experts always run on the CPU backend. Checked by tests/test_engine.py."""
from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA GPU; use device='auto' or 'cpu'")
    return d


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (as the checkpoint); float32 on the CPU, where bf16 matmuls are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
