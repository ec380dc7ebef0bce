"""LLM: the object a user holds. Loads a checkpoint (memory plan, config, reader, model, expert backend,
tokenizer) and offers score / generate / stream / chat on top of the engine (hybrid/engine.py).
Checked by tests/test_model.py, tests/test_engine.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from .attention import Batch
from .checkpoint import Checkpoint
from .config import load_config
from .engine import Engine, RequestOutput
from .loader import load_model
from .placement import default_dtype, format_placement, placement_summary, resolve_device
from .sampling import SamplingParams

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLM:
    """A loaded model: `score`, `generate`, `stream` (and `chat` once a tokenizer is present)."""

    def __init__(self, model_dir: str | Path, *, device: str = "auto", dtype: torch.dtype | str | None = None,
                 expert_backend: str = "auto", expert_act_format: str | None = None,
                 num_threads: int | None = None, accel_threads: int | None = None,
                 max_batch: int = 16,
                 max_context: int = 4096, max_prefill_tokens: int = 2048, gpu_weights: str = "bf16",
                 gpu_experts: int = 0, expert_streaming: str = "off", expert_rates=None,
                 expert_cache: bool | str | Path = False, check_memory: bool = True, progress: bool = True):
        """Load MODEL_DIR. Options beyond the obvious ones:
        expert_act_format: activations of the CPU expert kernels (numba: "int8", the default, or
            "int8x2": ~200x smaller error for about half the prefill speed).
        num_threads: CPU threads of the expert kernels; accel_threads: torch's threads for the
            accelerator side when it runs on the CPU (torch.set_num_threads).
        gpu_weights: "bf16" keeps the accelerator-side weights in `dtype`; "int8" / "fp8" quantizes
            them at load (weight-only, per output channel).
        gpu_experts: keep the N most used routed experts of MODEL_DIR/routing_profile.json
            (`hybrid profile`) on the accelerator.
        expert_streaming: "off" | "auto" (per-layer cost model fed by expert_rates, see
            hybrid/expert_streaming.py; CPU-only machines always keep the CPU) | "always".
        expert_cache: True keeps the repacked experts in MODEL_DIR/.hybrid-cache (a folder path:
            there), memory-mapped at the next start instead of repacked.
        check_memory: compare the memory plan with this machine before reading any weight, and
            stop with the numbers and advice if it cannot fit."""
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
                                cache_dir, expert_act_format)
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
