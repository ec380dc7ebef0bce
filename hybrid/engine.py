"""Engine: requests -> batched steps -> tokens.

One `Engine.step()` runs ONE forward over every running sequence: prompts being prefilled (in
chunks of at most `max_prefill_tokens` per step) and sequences decoding one token each, packed
together, so the MoE groups every token of the step by expert and each expert's weights are read
once per step. Requests join between steps (continuous batching) and leave when done; a finished
sequence leaves its tokens in its cache slot for prefix reuse (hybrid/model/kv_cache.py).
The user's object, `LLM` (score / generate / stream / chat), is in hybrid/llm.py.
Checked by tests/test_engine.py (greedy tokens equal transformers' generate, batching, stops).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from hybrid.model.attention import Step
from hybrid.model.kv_cache import LatentCache, SlotPool
from hybrid.sampling import SamplerState, SamplingParams, sample


@dataclass
class RequestOutput:
    """What a request produced (so far, in a streamed delta; in total, from generate)."""
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None = None     # "stop" | "length" | "abort" | None while running
    cached_prompt_tokens: int = 0        # prompt tokens found in the cache (not prefilled)
    metrics: dict = field(default_factory=dict)


@dataclass
class _Sequence:
    id: str
    prompt: list[int]
    params: SamplingParams
    sampler: SamplerState
    slot: int = -1
    cached: int = 0               # tokens of prompt+output already in the cache
    reused: int = 0               # prompt tokens that came from the prefix cache
    output: list[int] = field(default_factory=list)
    text: str = ""                # generated text, stop strings cut
    emitted_text: int = 0         # characters of `text` already handed out
    emitted_tokens: int = 0
    decoder: object = None
    finish_reason: str | None = None
    t_arrival: float = 0.0
    t_first_token: float = 0.0
    t_finish: float = 0.0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt)


class Engine:
    def __init__(self, model, config, tokenizer, device, dtype, max_batch: int = 16, max_context: int = 4096,
                 max_prefill_tokens: int = 2048):
        self.model, self.config, self.tokenizer, self.device = model, config, tokenizer, device
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.max_context = min(max_context, config.max_position_embeddings)
        self.cache = LatentCache(config, max_batch, self.max_context, dtype, device)
        self.slots = SlotPool(max_batch)
        self.waiting: list[_Sequence] = []
        self.running: list[_Sequence] = []
        self._ids = itertools.count()
        self.eos_ids = set(config.eos_token_ids)
        if tokenizer is not None:
            self.eos_ids |= set(getattr(tokenizer, "eos_token_ids", []) or [])

    # ---- requests ----------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context holds {self.max_context} "
                             "(prompt plus at least one generated token)")
        bad = next((t for t in prompt_ids if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary 0..{self.config.vocab_size - 1}")
        rid = request_id or f"req-{next(self._ids)}"
        seq = _Sequence(rid, list(prompt_ids), params, SamplerState(params, list(prompt_ids)),
                        t_arrival=time.perf_counter())
        if self.tokenizer is not None:
            seq.decoder = self.tokenizer.incremental_decoder(skip_special_tokens=params.skip_special_tokens)
        self.waiting.append(seq)
        return rid

    def abort(self, request_id: str) -> None:
        for seq in self.waiting:
            if seq.id == request_id:
                seq.finish_reason = "abort"
        for seq in self.running:
            if seq.id == request_id and seq.finish_reason is None:
                seq.finish_reason = "abort"

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Admit waiting requests, run one forward over all running sequences, sample, check stops.
        Returns one delta per sequence that produced something or finished."""
        outputs = [self._finish(s) for s in self.waiting if s.finish_reason == "abort"]
        self.waiting = [s for s in self.waiting if s.finish_reason is None]
        outputs += [self._finish(s) for s in self.running if s.finish_reason == "abort"]
        self.running = [s for s in self.running if s.finish_reason is None]
        while self.waiting and len(self.running) < self.max_batch:
            got = self.slots.acquire(self.waiting[0].prompt)
            if got is None:
                break
            seq = self.waiting.pop(0)
            seq.slot, seq.cached = got
            seq.reused = seq.cached
            self.running.append(seq)
        if not self.running:
            return outputs

        # pack: decoding sequences give their last token, prefilling ones a chunk of their prompt
        ids, slots, starts, lengths, sample_rows, sampled = [], [], [], [], [], []
        budget = self.max_prefill_tokens
        for seq in self.running:
            if seq.prefilling:
                n = min(len(seq.prompt) - seq.cached, max(budget, 1))
                budget -= n
            else:
                n = 1
            ids.extend(seq.tokens[seq.cached:seq.cached + n])
            slots.append(seq.slot)
            starts.append(seq.cached)
            lengths.append(n)
            if seq.cached + n >= len(seq.prompt):       # this step's last row gives its next token
                sample_rows.append(len(ids) - 1)
                sampled.append(seq)
        step = Step.build(slots, starts, lengths, self.device)      # every tensor the layers need, once
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        logits = self.model(torch.tensor(ids, dtype=torch.long, device=self.device), step, self.cache,
                            logits_for=rows).cpu()
        # only now do the new rows count as cached: if the forward raised (or was interrupted), every
        # sequence keeps its old `cached`, so a half-written step is never offered for prefix reuse
        for seq, n in zip(self.running, lengths):
            seq.cached += n
        now = time.perf_counter()
        for row, seq in enumerate(sampled):
            token = sample(logits[row], seq.sampler)
            seq.sampler.observe(token)
            if not seq.output:
                seq.t_first_token = now
            seq.output.append(token)
            self._check_stop(seq, token)
            outputs.append(self._delta(seq))
        for seq in [s for s in self.running if s.finish_reason is not None]:
            self.slots.release(seq.slot, seq.tokens[:seq.cached])
            seq.t_finish = now
        self.running = [s for s in self.running if s.finish_reason is None]
        return outputs

    def _check_stop(self, seq: _Sequence, token: int) -> None:
        """Stop token / EOS (its text is not added), stop strings (text cut there), max_tokens, context."""
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            seq.finish_reason = "stop"
            return
        if seq.decoder is not None:
            seq.text += seq.decoder.add([token])
        if p.stop:
            window = seq.text[max(0, seq.emitted_text - max(map(len, p.stop))):]
            hits = [(window.find(s), s) for s in p.stop if s in window]
            if hits:
                pos, stop = min(hits)
                cut = len(seq.text) - len(window) + pos + (len(stop) if p.include_stop_str_in_output else 0)
                seq.text = seq.text[:cut]
                seq.finish_reason = "stop"
                return
        if (p.max_tokens is not None and len(seq.output) >= p.max_tokens) or len(seq.tokens) >= self.max_context:
            seq.finish_reason = "length"
            if seq.decoder is not None:
                seq.text += seq.decoder.finish()

    def _delta(self, seq: _Sequence) -> RequestOutput:
        """New tokens and text since the last delta; text that could still become a stop string is held."""
        text_end = len(seq.text)
        if seq.finish_reason is None and seq.params.stop:
            for k in range(min(max(map(len, seq.params.stop)) - 1, len(seq.text)), 0, -1):
                if any(s.startswith(seq.text[-k:]) for s in seq.params.stop):
                    text_end = len(seq.text) - k
                    break
        text_end = max(text_end, seq.emitted_text)
        out = RequestOutput(seq.id, seq.prompt, seq.output[seq.emitted_tokens:],
                            seq.text[seq.emitted_text:text_end], seq.finish_reason, seq.reused)
        seq.emitted_tokens, seq.emitted_text = len(seq.output), text_end
        if seq.finish_reason is not None:
            out.metrics = self._metrics(seq)
        return out

    def _finish(self, seq: _Sequence) -> RequestOutput:
        if seq.slot >= 0:
            self.slots.release(seq.slot, seq.tokens[:seq.cached])
        seq.t_finish = time.perf_counter()
        return self._delta(seq)

    def _metrics(self, seq: _Sequence) -> dict:
        t_first = seq.t_first_token or seq.t_finish or time.perf_counter()
        t_end = seq.t_finish or time.perf_counter()
        decode_s = max(t_end - t_first, 1e-9)
        return {"prompt_tokens": len(seq.prompt), "prefill_tokens": len(seq.prompt) - seq.reused,
                "cached_prompt_tokens": seq.reused, "completion_tokens": len(seq.output),
                "time_to_first_token_s": t_first - seq.t_arrival, "decode_s": decode_s,
                "decode_tokens_per_s": (len(seq.output) - 1) / decode_s if len(seq.output) > 1 else 0.0}
