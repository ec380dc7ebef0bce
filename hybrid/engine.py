"""Engine: requests -> batched steps -> tokens.

One `Engine.step()` runs ONE forward over every running sequence: prompts being prefilled (in
chunks of at most `max_prefill_tokens` per step) and sequences decoding one token each, packed
together, so the MoE groups every token of the step by expert and each expert's weights are read
once per step. Requests join between steps (continuous batching) and leave when done.

Memory: one paged latent cache (hybrid/model/kv_cache.py) of `cache_tokens` tokens in blocks of
`block_size`, shared by all sequences. A request is admitted while the pool has room for its prompt
(`max_batch` only limits how many run at once); when a step needs a block and none is free, the
newest running sequence is preempted (its blocks freed, its computed blocks left in the prefix cache)
and later resumed from what is still cached: no request fails for lack of memory.
Prefix caching: full blocks are keyed by a hash of their tokens, media keys and the blocks before
them, kept after their sequence ends, evicted least recently used; a new request starts from its
longest cached prefix (whole shared blocks, then the leading tokens of a cached block copied into its
own), always leaving at least one prompt token to prefill. `engine.stats`: preemptions, prefix hits,
blocks in use. The user's object, `LLM`, is in hybrid/llm.py.
Checked by tests/test_engine.py (greedy tokens equal transformers' generate, batching, stops) and
tests/test_paged_engine.py (prefix hits, preemption, errors, media, logprobs).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from hybrid.model.attention import Step
from hybrid.model.kv_cache import ROOT, BlockPool, PagedLatentCache, block_hash
from hybrid.sampling import SamplerState, SamplingParams, sample

# 64 tokens a block: FlashMLA's page size for MLA decode; the 2-4 block-table lookups of a decode
# kernel's key tile stay cheap; a 256K context is a 4,096-entry table; prefix reuse is not limited to
# whole blocks (the leading tokens of a cached block are copied), so a larger block loses no reuse.
DEFAULT_BLOCK_SIZE = 64


@dataclass
class MediaSpan:
    """Prompt rows start..start+n-1 hold placeholder tokens whose embeddings are `embeds` [n, hidden]
    (model dtype, engine device); `key` (content hash) enters the prefix-cache keys of those blocks."""
    start: int
    embeds: torch.Tensor
    key: str


@dataclass
class RequestOutput:
    """What a request produced (so far, in a streamed delta; in total, from generate)."""
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None = None     # "stop" | "length" | "abort" | "error" | None while running
    cached_prompt_tokens: int = 0        # prompt tokens found in the cache (not prefilled)
    metrics: dict = field(default_factory=dict)
    error: str | None = None             # finish_reason "error": what went wrong (this sequence only)
    logprobs: list | None = None         # SamplingParams.logprobs set: one entry per token of this delta


@dataclass
class _Sequence:
    id: str
    prompt: list[int]
    params: SamplingParams
    sampler: SamplerState
    media: list = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)   # block table
    keys: list[bytes] = field(default_factory=list)   # keys of the full blocks of tokens (computed lazily)
    registered: int = 0           # leading blocks whose content is registered in the pool
    cached: int = 0               # tokens of prompt+output already in the cache
    reused: int = -1              # prompt tokens that came from the prefix cache (-1: not admitted yet)
    output: list[int] = field(default_factory=list)
    text: str = ""                # generated text, stop strings cut
    emitted_text: int = 0         # characters of `text` already handed out
    emitted_tokens: int = 0
    decoder: object = None
    finish_reason: str | None = None
    error: str | None = None
    t_arrival: float = 0.0
    t_first_token: float = 0.0
    t_finish: float = 0.0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class Engine:
    def __init__(self, model, config, tokenizer, device, dtype, max_batch: int = 16, max_context: int = 4096,
                 max_prefill_tokens: int = 2048, cache_tokens: int | None = None, kv_cache_dtype: str = "auto",
                 block_size: int = DEFAULT_BLOCK_SIZE, enable_prefix_caching: bool = True):
        """cache_tokens: size of the shared cache pool in tokens (None: max_batch x max_context, the old
        reservation); it must hold at least one max_context sequence. kv_cache_dtype: "auto" (model
        dtype) | "bf16" | "fp8" | "int8"."""
        self.model, self.config, self.tokenizer, self.device = model, config, tokenizer, device
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.max_context = min(max_context, config.max_position_embeddings)
        self.block_size = block_size
        if cache_tokens is None:                                # every sequence can reach max_context
            cache_tokens = max_batch * self._blocks_for(self.max_context) * block_size
        num_blocks = cache_tokens // block_size
        if num_blocks < self._blocks_for(self.max_context):
            raise ValueError(f"cache_tokens={cache_tokens} holds {num_blocks} blocks of {block_size}; one sequence "
                             f"of max_context={self.max_context} needs {self._blocks_for(self.max_context)}")
        self.cache = PagedLatentCache(config, num_blocks, block_size, dtype, device, kv_cache_dtype)
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.stats = {"preemptions": 0, "prefix_hit_tokens": 0, "prefill_tokens": 0,
                      "blocks_total": num_blocks, "blocks_used": 0, "blocks_cached": 0, "block_size": block_size,
                      "running": 0, "waiting": 0, "kv_cache_dtype": kv_cache_dtype}
        self.waiting: list[_Sequence] = []
        self.running: list[_Sequence] = []
        self._ids = itertools.count()
        self.eos_ids = set(config.eos_token_ids)
        if tokenizer is not None:
            self.eos_ids |= set(getattr(tokenizer, "eos_token_ids", []) or [])

    def _blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # ---- requests ----------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    media: list[MediaSpan] | None = None) -> str:
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context holds {self.max_context} "
                             "(prompt plus at least one generated token)")
        bad = next((t for t in prompt_ids if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary 0..{self.config.vocab_size - 1}")
        for span in media or []:
            if span.start < 0 or span.start + span.embeds.shape[0] > len(prompt_ids):
                raise ValueError(f"media span at {span.start} of {span.embeds.shape[0]} rows is outside the prompt")
        rid = request_id or f"req-{next(self._ids)}"
        seq = _Sequence(rid, list(prompt_ids), params, SamplerState(params, list(prompt_ids)),
                        media=sorted(media or [], key=lambda m: m.start), t_arrival=time.perf_counter())
        if self.tokenizer is not None:
            seq.decoder = self.tokenizer.incremental_decoder(skip_special_tokens=params.skip_special_tokens)
        self.waiting.append(seq)
        return rid

    def abort(self, request_id: str) -> None:
        for seq in self.waiting + self.running:
            if seq.id == request_id and seq.finish_reason is None:
                seq.finish_reason = "abort"

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- prefix cache --------------------------------------------------------------------
    def _media_keys(self, seq: _Sequence, lo: int, hi: int) -> tuple:
        return tuple(m.key for m in seq.media if m.start < hi and m.start + m.embeds.shape[0] > lo)

    def _keys(self, seq: _Sequence, n_blocks: int) -> list[bytes]:
        """Keys of the first n_blocks full blocks of seq.tokens (extended as the sequence grows)."""
        bs, toks = self.block_size, seq.tokens
        while len(seq.keys) < n_blocks:
            j = len(seq.keys)
            parent = seq.keys[-1] if seq.keys else ROOT
            seq.keys.append(block_hash(parent, toks[j * bs:(j + 1) * bs], self._media_keys(seq, j * bs, (j + 1) * bs)))
        return seq.keys[:n_blocks]

    def _register(self, seq: _Sequence, partial: bool = False) -> None:
        """Offer seq's computed blocks to the prefix cache: every newly full one (and, when it leaves,
        the partly filled last one)."""
        bs, toks = self.block_size, seq.tokens
        full = seq.cached // bs
        keys = self._keys(seq, full)
        for j in range(seq.registered, full):
            parent = keys[j - 1] if j else ROOT
            self.pool.register(seq.blocks[j], parent, tuple(toks[j * bs:(j + 1) * bs]),
                               self._media_keys(seq, j * bs, (j + 1) * bs), keys[j])
        seq.registered = max(seq.registered, full)
        if partial and seq.cached % bs and full < len(seq.blocks):
            parent = keys[-1] if keys else ROOT
            self.pool.register(seq.blocks[full], parent, tuple(toks[full * bs:seq.cached]),
                               self._media_keys(seq, full * bs, seq.cached), None)

    def _release(self, seq: _Sequence) -> None:
        """Free seq's blocks (its computed ones stay in the prefix cache)."""
        self._register(seq, partial=True)
        for k in self._keys(seq, len(seq.keys)):
            if self.pool.pending.get(k) == seq.id:
                del self.pool.pending[k]
        self.pool.release(seq.blocks)
        seq.blocks, seq.registered, seq.cached = [], 0, 0

    def _admit(self, seq: _Sequence) -> bool:
        """Give seq its cached prefix and a block table, if the pool has room for its prompt."""
        bs, toks, pool = self.block_size, seq.tokens, self.pool
        limit = len(toks) - 1                                  # at least one token left to prefill
        hits = pool.longest_prefix(self._keys(seq, limit // bs)) if pool.prefix_caching else []
        if len(hits) < len(toks) // bs and pool.prefix_caching and self.running:
            nxt = self._keys(seq, len(toks) // bs)[len(hits)]
            if nxt in pool.pending:                            # a running prefill is computing that block:
                return False                                   # wait for it instead of computing it twice
        in_lru = sum(1 for b in hits if pool.ref[b] == 0)
        if self.running and self._blocks_for(len(toks)) - len(hits) > pool.free_count() - in_lru:
            return False
        for b in hits:
            pool.acquire(b)
        seq.blocks, seq.cached = list(hits), len(hits) * bs
        seq.registered = len(hits)
        if pool.prefix_caching and seq.cached < limit:         # leading tokens of a cached block: copy them
            parent = seq.keys[len(hits) - 1] if hits else ROOT
            start = seq.cached
            src, n = pool.best_partial(parent, toks[start:limit],
                                       lambda k: self._media_keys(seq, start, start + k))
            if n > 0:
                pool.acquire(src)                              # not evicted by the allocation below
                dst = pool.allocate(1)[0]
                self.cache.copy_rows(src, dst, n)
                pool.release([src])
                seq.blocks.append(dst)
                seq.cached += n
        for k in self._keys(seq, len(toks) // bs)[seq.cached // bs:]:
            pool.pending.setdefault(k, seq.id)
        if seq.reused < 0:
            seq.reused = min(seq.cached, len(seq.prompt))
        self.stats["prefix_hit_tokens"] += seq.cached
        return True

    def _preempt(self, seq: _Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        self.waiting.insert(0, seq)
        self.stats["preemptions"] += 1

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Admit waiting requests, run one forward over all running sequences, sample, check stops.
        Returns one delta per sequence that produced something or finished."""
        outputs = [self._finish(s) for s in self.waiting + self.running if s.finish_reason == "abort"]
        self.waiting = [s for s in self.waiting if s.finish_reason is None]
        self.running = [s for s in self.running if s.finish_reason is None]
        while self.waiting and len(self.running) < self.max_batch and self._admit(self.waiting[0]):
            self.running.append(self.waiting.pop(0))
        if not self.running:
            self._update_stats()
            return outputs

        # schedule: decoding sequences feed their last token, the others a chunk of what is not cached;
        # a sequence short of blocks preempts the newest running one (possibly itself)
        budget, plan, i = self.max_prefill_tokens, [], 0
        while i < len(self.running):
            seq = self.running[i]
            left = len(seq.tokens) - seq.cached
            n = 1 if left == 1 else min(left, max(budget, 1))
            need = max(0, self._blocks_for(seq.cached + n) - len(seq.blocks))
            while need > self.pool.free_count() and i < len(self.running):
                self._preempt(self.running[-1])
            if i >= len(self.running):
                break
            if left > 1:
                budget -= n
            seq.blocks += self.pool.allocate(need)
            plan.append((seq, n))
            i += 1

        ids, starts, lengths, sample_rows, sampled, emb_rows, emb_vals = [], [], [], [], [], [], []
        for seq, n in plan:
            lo = seq.cached
            for m in seq.media:                                # image rows in this chunk
                a, b = max(lo, m.start), min(lo + n, m.start + m.embeds.shape[0])
                if a < b:
                    emb_rows.extend(range(len(ids) + a - lo, len(ids) + b - lo))
                    emb_vals.append(m.embeds[a - m.start:b - m.start])
            ids.extend(seq.tokens[lo:lo + n])
            starts.append(lo)
            lengths.append(n)
            if lo + n == len(seq.tokens):                      # this step's last row gives its next token
                sample_rows.append(len(ids) - 1)
                sampled.append(seq)
        step = Step.build(list(range(len(plan))), starts, lengths, self.device,
                          [s.blocks for s, _ in plan], self.block_size)   # every tensor the layers need, once
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        kw = {}
        if emb_rows:
            kw["embeds"] = (torch.tensor(emb_rows, dtype=torch.long, device=self.device), torch.cat(emb_vals))
        logits = self.model(torch.tensor(ids, dtype=torch.long, device=self.device), step, self.cache,
                            logits_for=rows, **kw).cpu()
        # only now do the new rows count as cached: if the forward raised (or was interrupted), every
        # sequence keeps its old `cached`, so a half-written step is never offered for prefix reuse
        for seq, n in plan:
            if not (n == 1 and seq.output):                    # prompt (or recomputed) tokens, not a decode
                self.stats["prefill_tokens"] += n
            seq.cached += n
            self._register(seq)
        now = time.perf_counter()
        for row, seq in enumerate(sampled):
            try:
                token = sample(logits[row], seq.sampler)
                seq.sampler.observe(token)
                if not seq.output:
                    seq.t_first_token = now
                seq.output.append(token)
                self._check_stop(seq, token)
                outputs.append(self._delta(seq))
            except Exception as e:                              # this sequence alone ends
                seq.finish_reason, seq.error = "error", f"{type(e).__name__}: {e}"
                outputs.append(self._delta(seq))
        for seq in [s for s in self.running if s.finish_reason is not None]:
            self._release(seq)
            seq.t_finish = now
        self.running = [s for s in self.running if s.finish_reason is None]
        self._update_stats()
        return outputs

    def _update_stats(self) -> None:
        self.stats.update(blocks_used=self.pool.used_count(), blocks_cached=self.pool.cached_count(),
                          running=len(self.running), waiting=len(self.waiting))

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
                            seq.text[seq.emitted_text:text_end], seq.finish_reason, max(seq.reused, 0),
                            error=seq.error)
        if getattr(seq.params, "logprobs", None) is not None:
            out.logprobs = list((getattr(seq.sampler, "logprobs", None) or [])[seq.emitted_tokens:len(seq.output)])
        seq.emitted_tokens, seq.emitted_text = len(seq.output), text_end
        if seq.finish_reason is not None:
            out.metrics = self._metrics(seq)
        return out

    def _finish(self, seq: _Sequence) -> RequestOutput:
        self._release(seq)
        seq.t_finish = time.perf_counter()
        return self._delta(seq)

    def _metrics(self, seq: _Sequence) -> dict:
        t_first = seq.t_first_token or seq.t_finish or time.perf_counter()
        t_end = seq.t_finish or time.perf_counter()
        decode_s = max(t_end - t_first, 1e-9)
        reused = max(seq.reused, 0)
        return {"prompt_tokens": len(seq.prompt), "prefill_tokens": len(seq.prompt) - reused,
                "cached_prompt_tokens": reused, "completion_tokens": len(seq.output),
                "time_to_first_token_s": t_first - seq.t_arrival, "decode_s": decode_s,
                "decode_tokens_per_s": (len(seq.output) - 1) / decode_s if len(seq.output) > 1 else 0.0}
