"""LLM: the object a user holds. Loads a checkpoint (config, reader, model, expert backend) and scores
token sequences. Checked by tests/test_model.py.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .attention import Batch
from .checkpoint import Checkpoint
from .config import load_config
from .loader import load_model
from .placement import default_dtype, resolve_device


class LLM:
    def __init__(self, model_dir: str | Path, *, device: str = "auto", dtype: torch.dtype | None = None,
                 expert_backend: str = "auto", num_threads: int | None = None, progress: bool = True):
        self.model_dir = Path(model_dir)
        self.config = load_config(self.model_dir)
        self.device = resolve_device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.checkpoint = Checkpoint(self.model_dir, self.config)
        self.model = load_model(self.checkpoint, self.device, self.dtype, expert_backend, num_threads, progress)

    def _check_ids(self, token_ids, what: str = "token_ids") -> torch.Tensor:
        ids = list(token_ids)
        if not ids:
            raise ValueError(f"{what} is empty")
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"{what}: {bad[0]!r} is not a token id in 0..{self.config.vocab_size - 1}")
        if len(ids) > self.config.max_position_embeddings:
            raise ValueError(f"{what}: {len(ids)} tokens exceed max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """float32 logits [len(token_ids), vocab_size]: row t predicts token t+1."""
        ids = self._check_ids(token_ids)
        return self.model(ids, Batch.single(len(ids), device=self.device)).cpu()
