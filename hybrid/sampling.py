"""SamplingParams (vLLM's field names) and the sampler: penalties, temperature, top-k, top-p, min-p,
per-request seeds, raw logprobs, and an optional per-sequence constraint (structured output).

Validation (one ValueError naming the field, "SamplingParams.<field> = <value>: <why>"): numbers must
be finite ints/floats (a bool is not a number), integers must be ints, and the ranges are OpenAI's where
OpenAI has the field (temperature 0..2, top_p (0, 1], presence/frequency penalty -2..2, logprobs 0..20)
and vLLM's otherwise (top_k -1/0 = off or positive, min_p 0..1, seed a 64-bit integer), plus these of ours:
repetition_penalty 0.01..10 (vLLM: any > 0; beyond that range it only makes every seen token certain
or impossible), max_tokens and top_k at most 2**63-1 (the context caps them anyway).
Temperature below GREEDY_TEMPERATURE is greedy, as vLLM does (_SAMPLING_EPS = 1e-5 in vllm/sampling_params.py):
dividing by 1e-40 would turn logits into inf and the softmax into NaN.

The sampler is NaN-safe for every valid SamplingParams: NaN logits count as -inf, +inf as the largest
float, the temperature divides logits minus their maximum (so the top token is exactly 0, never inf-inf),
and top-p always keeps the most likely token. When no token is left (every logit -inf or NaN, or the
constraint allows none) it raises ValueError: the engine fails that sequence alone (finish_reason "error").
Checked by tests/test_sampling.py.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

GREEDY_TEMPERATURE = 1e-5         # below this, temperature means greedy (vLLM's _SAMPLING_EPS)
MAX_LOGPROBS = 20                 # OpenAI's top_logprobs limit
INT63 = 2 ** 63 - 1
LOGPROB_FLOOR = -9999.0           # -inf logprobs are reported as this (vLLM's OpenAI server does the same)
_FMAX = torch.finfo(torch.float32).max


def _show(v) -> str:
    """repr, short: a 10**5000 int must not raise (Python limits int -> str) nor flood a message."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"an integer of {v.bit_length()} bits"
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


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
    logprobs: int | None = None    # None: off; 0..20: the sampled token's logprob and that many top ones
    constraint: object | None = None   # per sequence: .mask(logits) -> logits, .advance(token)

    def _fail(self, name: str, msg: str):
        raise ValueError(f"SamplingParams.{name} = {_show(getattr(self, name))}: {msg}")

    def _number(self, name: str, lo: float, hi: float, lo_open: bool = False) -> None:
        v = getattr(self, name)
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            self._fail(name, "must be a number")
        try:
            f = float(v)
        except OverflowError:
            f = math.inf
        if not math.isfinite(f):
            self._fail(name, "must be a finite number")
        if not (lo < f if lo_open else lo <= f) or f > hi:
            self._fail(name, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        setattr(self, name, f)

    def _int(self, name: str, lo: int, hi: int, optional: bool = False) -> None:
        v = getattr(self, name)
        if v is None and optional:
            return
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            self._fail(name, "must be an integer" + (" or None" if optional else ""))
        if not lo <= int(v) <= hi:
            self._fail(name, f"must be in {lo}..{hi if hi < 2**62 else f'2**{hi.bit_length()}-1'}")
        setattr(self, name, int(v))

    def __post_init__(self):
        self._number("temperature", 0.0, 2.0)
        self._number("top_p", 0.0, 1.0, lo_open=True)
        self._int("top_k", -1, INT63)
        self._number("min_p", 0.0, 1.0)
        self._number("repetition_penalty", 0.01, 10.0)
        self._number("presence_penalty", -2.0, 2.0)
        self._number("frequency_penalty", -2.0, 2.0)
        self._int("seed", -2 ** 63, 2 ** 64 - 1, optional=True)
        self._int("max_tokens", 1, INT63, optional=True)
        self._int("logprobs", 0, MAX_LOGPROBS, optional=True)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "must be true or false")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not isinstance(self.stop, (list, tuple)):
            self._fail("stop", "must be a string or a list of strings")
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            self._fail("stop", "must be non-empty strings")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            self._fail("stop_token_ids", "must be a list of non-negative integers")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t <= INT63
                   for t in self.stop_token_ids):
            self._fail("stop_token_ids", "must be non-negative integers")
        c = self.constraint
        if c is not None and not (callable(getattr(c, "mask", None)) and callable(getattr(c, "advance", None))):
            self._fail("constraint", "must have mask(logits) and advance(token) methods")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


@dataclass
class SamplerState:
    """Per-sequence sampling state: the seeded generator, the token counts the penalties need, and the
    logprob entries (token_logprob, [(token_id, logprob), ...]) of each sampled token when asked for."""
    params: SamplingParams
    prompt_ids: list[int]
    generator: torch.Generator | None = None
    output_counts: dict = field(default_factory=dict)
    logprobs: list = field(default_factory=list)

    def __post_init__(self):
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    def observe(self, token: int) -> None:
        self.output_counts[token] = self.output_counts.get(token, 0) + 1
        if self.params.constraint is not None:
            self.params.constraint.advance(token)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf, +inf -> the largest float32: every later step stays free of NaN."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=_FMAX, neginf=float("-inf"))


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


def _record_logprobs(raw: torch.Tensor, token: int, state: SamplerState) -> None:
    lp = torch.log_softmax(raw, dim=-1)
    n = min(state.params.logprobs, lp.numel())
    top = lp.topk(n) if n else None
    alts = [] if top is None else [(int(i), max(float(v), LOGPROB_FLOOR)) for v, i in zip(top.values, top.indices)]
    state.logprobs.append((max(float(lp[token]), LOGPROB_FLOOR), alts))


TOP_P_FIRST_K = 256               # top-p looks at this many candidates first (a full sort of 163,840 costs ~40 ms)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token whose mass strictly above it reaches top_p; the top token always stays. Only the
    top k candidates are sorted, k doubling until they hold top_p (then nothing beyond them can stay)."""
    n, k = probs.numel(), min(TOP_P_FIRST_K, probs.numel())
    while True:
        vals, order = probs.topk(k) if k < n else probs.sort(descending=True)    # descending
        csum = vals.cumsum(0)
        if k == n or csum[-1] >= top_p:
            break
        k = 8 * k if 8 * k <= n // 8 else n                 # a flat distribution: soon a full sort
    drop = (csum - vals) >= top_p                            # mass strictly above each token
    drop[0] = False                                          # the top token stays, whatever top_p rounds to
    return torch.zeros_like(probs).scatter_(0, order, vals.masked_fill(drop, 0.0))


def _draw(probs: torch.Tensor, generator) -> int:
    """One index with probability proportional to `probs` (>= 0, not all 0), by inverting the cumulative
    sum (torch.multinomial takes ~11 ms at a 163,840-token vocabulary; this ~0.4 ms). A zero-probability
    token is never drawn: its cumulative sum equals its predecessor's."""
    cdf = probs.double().cumsum(0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    i = int(torch.searchsorted(cdf, u.reshape(1), right=True))
    if i >= probs.numel() or probs[i] <= 0:                  # u rounded up to the total
        i = int(probs.nonzero()[-1])
    return i


def sample(logits: torch.Tensor, state: SamplerState) -> int:
    """One token from the logits [V] of one sequence (any float dtype; NaN and inf tolerated)."""
    p = state.params
    raw = _finite(logits.detach().float().reshape(-1))
    work = raw.clone()
    if p.constraint is not None:
        work = _finite(p.constraint.mask(work).float())
    work = _finite(apply_penalties(work, state))
    top = work.max()
    if top == float("-inf"):
        raise ValueError("no token can be sampled: every logit is -inf or NaN"
                         + (" after the constraint's mask" if p.constraint is not None else ""))
    if p.greedy:
        token = int(work.argmax())
    else:
        work = (work - top) / p.temperature                      # the top token is exactly 0: no inf - inf
        if 0 < p.top_k < work.numel():
            kth = work.topk(p.top_k).values[-1]
            work = work.masked_fill(work < kth, float("-inf"))
        probs = torch.softmax(work, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            probs = _top_p(probs, p.top_p)
        token = _draw(probs, state.generator)
    if p.logprobs is not None:
        _record_logprobs(raw, token, state)
    return token
