"""The latent KV cache: per layer and sequence slot only the normed latent c_kv (kv_lora_rank) and the
roped k_pe (qk_rope_head_dim) of each token — 576 numbers per token per layer for K2.6, instead of
64 heads of full keys and values. Preallocated for `max_context` tokens x `num_slots` sequences.

Prefix reuse: a slot keeps the tokens it holds after its sequence ends; a new prompt that starts
with those tokens takes that slot and prefills only the rest (multi-turn chat re-sends the whole
conversation; only the new message is prefilled). Checked by tests/test_engine.py.
"""
from __future__ import annotations

import time

import torch

from hybrid.config import ModelConfig


class LatentCache:
    def __init__(self, config: ModelConfig, num_slots: int, max_context: int, dtype: torch.dtype,
                 device: torch.device):
        L, R, P = config.num_hidden_layers, config.kv_lora_rank, config.qk_rope_head_dim
        self.max_context = max_context
        self.ckv = torch.zeros(L, num_slots, max_context, R, dtype=dtype, device=device)
        self.kpe = torch.zeros(L, num_slots, max_context, P, dtype=dtype, device=device)

    @staticmethod
    def bytes_needed(config: ModelConfig, num_slots: int, max_context: int, dtype: torch.dtype) -> int:
        per_token = (config.kv_lora_rank + config.qk_rope_head_dim) * torch.finfo(dtype).bits // 8
        return config.num_hidden_layers * num_slots * max_context * per_token

    @property
    def nbytes(self) -> int:
        return self.ckv.numel() * self.ckv.element_size() + self.kpe.numel() * self.kpe.element_size()

    def write(self, layer: int, slot: int, start: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        end = start + c_kv.shape[0]
        assert end <= self.max_context, f"cache overflow: position {end} > max_context {self.max_context}"
        self.ckv[layer, slot, start:end] = c_kv
        self.kpe[layer, slot, start:end] = k_pe

    def write_rows(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, c_kv: torch.Tensor,
                   k_pe: torch.Tensor) -> None:
        """One token per row (batched decode): row b goes to (slots[b], positions[b]). The engine never
        schedules a position at or past max_context (it finishes the sequence first)."""
        self.ckv[layer, slots, positions] = c_kv
        self.kpe[layer, slots, positions] = k_pe

    def read(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ckv[layer, slot, :length], self.kpe[layer, slot, :length]


class SlotPool:
    """Which cache slot each running sequence uses, and which tokens each idle slot still holds."""

    def __init__(self, num_slots: int):
        self.tokens: list[list[int]] = [[] for _ in range(num_slots)]   # tokens valid in each slot
        self.busy = [False] * num_slots
        self.last_used = [0.0] * num_slots

    def free_count(self) -> int:
        return self.busy.count(False)

    def acquire(self, prompt: list[int]) -> tuple[int, int] | None:
        """(slot, number of prompt tokens already cached there) or None when every slot is busy.
        At least one prompt token is always left to prefill, so the step has logits to sample from."""
        best, best_len = None, -1
        for s, busy in enumerate(self.busy):
            if busy:
                continue
            cached = self.tokens[s]
            n = 0
            limit = min(len(cached), len(prompt) - 1)
            while n < limit and cached[n] == prompt[n]:
                n += 1
            if n > best_len or (n == best_len and self.last_used[s] < self.last_used[best]):
                best, best_len = s, n
        if best is None:
            return None
        self.busy[best] = True
        self.tokens[best] = list(prompt[:best_len])
        return best, best_len

    def release(self, slot: int, tokens_in_cache: list[int]) -> None:
        self.busy[slot] = False
        self.tokens[slot] = list(tokens_in_cache)
        self.last_used[slot] = time.monotonic()
