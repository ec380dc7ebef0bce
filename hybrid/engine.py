"""LLM and Engine: requests -> batched steps -> tokens.

One `Engine.step()` runs ONE forward over every running sequence: prompts being prefilled (in
chunks of at most `max_prefill_tokens` per step) and sequences decoding one token each, packed
together, so the MoE groups every token of the step by expert and each expert's weights are read
once per step. Requests join between steps (continuous batching) and leave when done; a finished
sequence leaves its tokens in its cache slot for prefix reuse (hybrid/kv_cache.py).
`LLM` is the user's object: score / generate / stream / chat on top of the engine.
Checked by tests/test_engine.py (greedy tokens equal transformers' generate, batching, stops).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .attention import Batch
from .checkpoint import Checkpoint
from .config import load_config
from .kv_cache import LatentCache, SlotPool
from .loader import load_model
from .placement import default_dtype, format_placement, placement_summary, resolve_device
from .sampling import SamplerState, SamplingParams, sample


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
        batch = Batch(slots, starts, lengths,
                      torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)]).to(self.device))
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        logits = self.model(torch.tensor(ids, dtype=torch.long, device=self.device), batch, self.cache,
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


DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLM:
    """A loaded model: `score`, `generate`, `stream` (and `chat` once a tokenizer is present)."""

    def __init__(self, model_dir: str | Path, *, device: str = "auto", dtype: torch.dtype | str | None = None,
                 expert_backend: str = "auto", num_threads: int | None = None, accel_threads: int | None = None,
                 max_batch: int = 16,
                 max_context: int = 4096, max_prefill_tokens: int = 2048, gpu_weights: str = "bf16",
                 gpu_experts: int = 0, expert_streaming: str = "off", expert_rates=None,
                 expert_cache: bool | str | Path = False, check_memory: bool = True, progress: bool = True):
        """num_threads: CPU threads of the routed-expert kernels; accel_threads: torch's threads for the
        accelerator side when it runs on the CPU (torch.set_num_threads). gpu_weights: "bf16" keeps the accelerator-side weights in `dtype`; "int8" / "fp8" quantizes
        them at load (weight-only, per output channel). gpu_experts: keep the N most used routed
        experts of MODEL_DIR/routing_profile.json (`hybrid profile`) on the accelerator.
        expert_streaming: "off" | "auto" (per-layer cost model fed by expert_rates, see
        hybrid/expert_streaming.py; CPU-only machines always keep the CPU) | "always".
        expert_cache: True keeps the repacked experts in MODEL_DIR/.hybrid-cache (a folder path: there),
        memory-mapped at the next start instead of repacked. check_memory: compare the memory plan with
        this machine before reading any weight, and stop with the numbers and advice if it cannot fit."""
        self.model_dir = Path(model_dir)
        self.config = load_config(self.model_dir)
        self.device = resolve_device(device)
        if accel_threads:
            torch.set_num_threads(accel_threads)
        if isinstance(dtype, str):
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"dtype {dtype!r} unknown; choose one of {', '.join(DTYPE_NAMES)}")
            dtype = DTYPE_NAMES[dtype]
        self.dtype = dtype or default_dtype(self.device)
        if check_memory:
            from .plan import check_before_load
            check_before_load(self.config, context=min(max_context, self.config.max_position_embeddings),
                              batch=max_batch, gpu_weights=gpu_weights, gpu_experts=gpu_experts)
        self.checkpoint = Checkpoint(self.model_dir, self.config)
        self.tokenizer = None
        if (self.model_dir / "tiktoken.model").is_file():
            from .tokenizer import Tokenizer
            self.tokenizer = Tokenizer.from_pretrained(self.model_dir)
        cache_dir = None
        if expert_cache:
            cache_dir = self.model_dir / ".hybrid-cache" if expert_cache is True else Path(expert_cache)
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"expert_cache: cannot create {cache_dir} ({e}); pass a writable folder") from None
        self.model = load_model(self.checkpoint, self.device, self.dtype, expert_backend, num_threads, progress,
                                cache_dir)
        if gpu_weights != "bf16":
            from .gpu_weights import quantize_model_linears
            quantize_model_linears(self.model, gpu_weights)
        if gpu_experts or expert_streaming != "off":
            from .hot_experts import attach_accelerator_experts
            attach_accelerator_experts(self, gpu_experts, expert_streaming, expert_rates)
        self.engine = Engine(self.model, self.config, self.tokenizer, self.device, self.dtype, max_batch,
                             max_context, max_prefill_tokens)
        if progress:
            print(format_placement(self.placement()))

    def placement(self) -> dict:
        """What lives where, in bytes (see hybrid/placement.py)."""
        return placement_summary(self.model, self.engine.cache)

    # ---- scoring ----------------------------------------------------------------------
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
        """float32 logits [len(token_ids), vocab_size]: row t predicts token t+1 (no cache involved)."""
        ids = self._check_ids(token_ids)
        return self.model(ids, Batch.single(len(ids), device=self.device)).cpu()

    # ---- generation -------------------------------------------------------------------
    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_dir} has no tokenizer files (tiktoken.model); pass token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(self, prompts, sampling: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Generate for a list of prompts (text or token ids), batched; one output per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        rids = [self.engine.add_request(self._prompt_ids(p), sp) for p, sp in zip(prompts, params)]
        results = {rid: RequestOutput(rid, [], [], "") for rid in rids}
        while any(results[r].finish_reason is None for r in rids):
            for delta in self.engine.step():
                if delta.request_id in results:
                    r = results[delta.request_id]
                    r.prompt_token_ids = delta.prompt_token_ids
                    r.token_ids += delta.token_ids
                    r.text += delta.text
                    r.finish_reason, r.cached_prompt_tokens = delta.finish_reason, delta.cached_prompt_tokens
                    r.metrics = delta.metrics or r.metrics
        return [results[r] for r in rids]

    def stream(self, prompt, sampling: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield increments (new token ids and text) for one prompt until it finishes.
        Closing the iterator early aborts the request."""
        rid = self.engine.add_request(self._prompt_ids(prompt), sampling or SamplingParams())
        done = False
        try:
            while not done:
                for delta in self.engine.step():
                    if delta.request_id == rid:
                        done = delta.finish_reason is not None
                        if delta.token_ids or delta.text or done:
                            yield delta
        finally:
            if not done:
                self.engine.abort(rid)
                self.engine.step()

    # ---- chat ---------------------------------------------------------------------------
    def chat_prompt_ids(self, messages, tools=None, thinking: bool = True, preserve_thinking: bool = False,
                        **template_kwargs) -> list[int]:
        """The prompt token ids the checkpoint's chat template gives for these messages."""
        from .chat_session import chat_prompt_ids
        return chat_prompt_ids(self, messages, tools, thinking, preserve_thinking, **template_kwargs)

    def chat(self, messages, sampling: SamplingParams | None = None, tools=None, thinking: bool = True,
             preserve_thinking: bool = False, **template_kwargs):
        """One assistant turn: ChatResult(message=ParsedMessage(reasoning_content, content, tool_calls), ...)."""
        from .chat_session import chat
        return chat(self, messages, sampling, tools, thinking, preserve_thinking, **template_kwargs)

    def chat_stream(self, messages, sampling: SamplingParams | None = None, tools=None, thinking: bool = True,
                    preserve_thinking: bool = False, **template_kwargs):
        """Yield reasoning / content / tool-call deltas, then the final ChatResult."""
        from .chat_session import chat_stream
        return chat_stream(self, messages, sampling, tools, thinking, preserve_thinking, **template_kwargs)
