"""SamplingParams (vLLM's field names) and the sampler: penalties, temperature, top-k, top-p, min-p,
per-request seeds. Temperature 0 is greedy. Checked by tests/test_sampling.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                 # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 256   # None: until the context is full
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 0, "must be -1, 0 (off) or positive"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "must be non-negative integers"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} = {getattr(self, name)!r}: {msg}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class SamplerState:
    """Per-sequence sampling state: the seeded generator and the token counts the penalties need."""
    params: SamplingParams
    prompt_ids: list[int]
    generator: torch.Generator | None = None
    output_counts: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    def observe(self, token: int) -> None:
        self.output_counts[token] = self.output_counts.get(token, 0) + 1


def apply_penalties(logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
    """Repetition penalty over prompt + output (divide positive logits, multiply negative ones, as
    vLLM/transformers do); presence and frequency penalties over the output tokens (as OpenAI/vLLM)."""
    p = state.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(state.prompt_ids) | set(state.output_counts)), dtype=torch.long)
        if len(seen):
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and state.output_counts:
        ids = torch.tensor(list(state.output_counts), dtype=torch.long)
        counts = torch.tensor(list(state.output_counts.values()), dtype=logits.dtype)
        logits[ids] -= p.frequency_penalty * counts + p.presence_penalty
    return logits


def sample(logits: torch.Tensor, state: SamplerState) -> int:
    """One token from float32 logits [V] of one sequence."""
    p = state.params
    logits = apply_penalties(logits.float().clone(), state)
    if p.greedy:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k and p.top_k > 0 and p.top_k < logits.numel():
        kth = logits.topk(p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p           # mass strictly above each token
        sorted_p = sorted_p.masked_fill(before >= p.top_p, 0.0)   # keeps at least the top token
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=state.generator))
