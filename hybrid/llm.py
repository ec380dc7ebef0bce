"""LLM: the object a user holds. Loads a checkpoint (config, expert backend choice, memory plan, reader,
model, the expert worker, tokenizer, and for K2.5/K2.6 the vision tower) and offers score / generate / stream /
chat on top of the engine (hybrid/engine.py). Checked by tests/test_model.py, tests/test_engine.py,
tests/test_vision_model.py (images).
"""
from __future__ import annotations

import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch

from hybrid.checkpoint import Checkpoint
from hybrid.config import load_config
from hybrid.engine import Engine, RequestOutput
from hybrid.experts.backends import resolve_backend
from hybrid.model.attention import Step
from hybrid.model.inventory import format_placement, placement_summary
from hybrid.model.loader import load_model
from hybrid.sampling import SamplingParams

log = logging.getLogger("hybrid")

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


class LLM:
    """A loaded model: `score`, `generate`, `stream` (and `chat` once a tokenizer is present)."""

    def __init__(self, model_dir: str | Path, *, device: str = "auto", dtype: torch.dtype | str | None = None,
                 expert_backend: str = "auto", expert_act_format: str | None = None,
                 num_threads: int | None = None, accel_threads: int | None = None,
                 max_batch: int = 16, max_context: int | None = None, max_prefill_tokens: int = 2048,
                 cache_tokens: int | None = None, kv_cache_dtype: str = "auto", block_size: int = 64,
                 enable_prefix_caching: bool = True, gpu_weights: str = "bf16", cpu_weights: str = "auto",
                 gpu_experts: int = 0, expert_streaming: str = "off", expert_rates=None,
                 expert_cache: bool | str | Path = False, check_memory: bool = True, progress: bool = True,
                 image_limits=None):
        """Load MODEL_DIR. Options beyond the obvious ones:
        expert_act_format: activations of the CPU expert kernels (numba: "int8", the default, or
            "int8x2": ~200x smaller error for about half the prefill speed).
        num_threads: CPU threads of the expert kernels; accel_threads: torch's threads for the
            accelerator side when it runs on the CPU (torch.set_num_threads).
        gpu_weights: "bf16" keeps the accelerator-side weights in `dtype`; "int8" / "fp8" quantizes
            them at load (weight-only, per output channel).
        cpu_weights: on a CPU-only machine, "bf16" | "int8" runs the accelerator side's matrix-vector
            products (decode, up to 16 rows) through our Numba kernels (hybrid/model/cpu_linear.py) on
            the checkpoint's bf16 values or per-channel int8; "off" keeps torch's Linears; "auto" (the
            default): "bf16" on a CPU-only run (same products, half the bytes of float32), else "off".
        gpu_experts: keep the N most used routed experts of MODEL_DIR/routing_profile.json
            (`hybrid profile`) on the accelerator.
        expert_streaming: "off" | "auto" (per-layer cost model fed by expert_rates, see
            hybrid/experts/streaming.py; CPU-only machines always keep the CPU) | "always".
        expert_cache: True keeps the repacked experts in MODEL_DIR/.hybrid-cache (a folder path:
            there), memory-mapped at the next start instead of repacked.
        max_context: longest sequence (prompt + output); None: the longest the memory plan allows for
            one conversation on this machine, up to the model's maximum (vLLM's max_model_len).
        cache_tokens: the shared paged KV cache pool, in tokens, for all sequences together (None:
            max_batch x max_context, bounded by what the plan leaves free, at least one max_context);
            max_batch is then a limit on concurrency, not a reservation (hybrid/model/kv_cache.py).
        kv_cache_dtype: "auto" (the model dtype) | "bf16" | "fp8" | "int8" (8-bit: half the bytes).
        enable_prefix_caching: requests reuse the cached blocks of earlier prompts with the same prefix.
        check_memory: compare the memory plan with this machine before reading any weight, and
            stop with the numbers and advice if it cannot fit.
        image_limits: hybrid.media.ImageLimits (bytes, pixels, images per request, remote fetching: off by
            default, download timeout, base folder of relative paths) for checkpoints with a vision tower."""
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
        self.expert_backend, why = resolve_backend(expert_backend, self.config, num_threads, expert_act_format)
        log.info("expert backend: %s (%s)", self.expert_backend, why)
        if progress or why.startswith("FALLBACK"):
            print(f"routed experts: {self.expert_backend} backend ({why})", file=sys.stderr)
        if expert_cache and self.expert_backend != "numba":
            raise ValueError(f"expert_cache keeps the numba kernels' repacked layout; the expert backend is "
                             f"{self.expert_backend!r} (use expert_backend='numba', or no cache)")
        from hybrid.model.cpu_linear import resolve_cpu_weights, swap_cpu_linears
        self.cpu_weights, self.cpu_weights_why = resolve_cpu_weights(cpu_weights, self.device.type, gpu_weights)
        max_context, cache_tokens = self._cache_size(max_batch, max_context, cache_tokens, kv_cache_dtype,
                                                     gpu_weights, gpu_experts, check_memory)
        self.checkpoint = Checkpoint(self.model_dir, self.config)
        from hybrid.text.tokenizer import load_tokenizer
        self.tokenizer = load_tokenizer(self.model_dir)   # None: no tokenizer files (token ids only); bad files: error now
        cache_dir = None
        if expert_cache:
            cache_dir = self.model_dir / ".hybrid-cache" if expert_cache is True else Path(expert_cache)
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"expert_cache: cannot create {cache_dir} ({e}); pass a writable folder") from None
        # the one thread that runs the routed experts of every MoE layer (hybrid/experts/offload.py)
        self.expert_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybrid-experts")
        self.model = load_model(self.checkpoint, self.device, self.dtype, self.expert_backend, self.expert_worker,
                                num_threads, progress, cache_dir, expert_act_format)
        why = self.cpu_weights_why
        swapped = swap_cpu_linears(self.model, self.cpu_weights, exact_only=cpu_weights == "auto")
        if self.cpu_weights != "off" and swapped["kept"]:
            why += f"; {swapped['kept']} Linears whose weights are not bf16 values keep torch's float Linear"
        self.cpu_weights_why = why
        if why.startswith("FALLBACK"):
            log.warning("cpu_weights: %s", why)
            print(f"accelerator-side Linears: {why}", file=sys.stderr)
        if gpu_weights != "bf16":
            from hybrid.model.int8_linear import quantize_model_linears
            quantize_model_linears(self.model, gpu_weights)
        if gpu_experts or expert_streaming != "off":
            from hybrid.experts.profile import attach_accelerator_experts
            attach_accelerator_experts(self.model, self.checkpoint, self.device, self.model_dir, gpu_experts,
                                       expert_streaming, expert_rates)
        self.vision, self.images = None, None       # K2.5/K2.6: MoonViT tower + projector, image encoder
        from hybrid.model.vision import has_vision_weights
        if self.config.vision is not None and has_vision_weights(self.model_dir):
            from hybrid.media import ImageLimits
            from hybrid.media.encode import ImageEncoder
            from hybrid.model.vision import load_vision
            self.vision = load_vision(self.model_dir, self.config.vision, self.device, self.dtype)
            self.images = ImageEncoder(self.vision, self.device, self.dtype, image_limits or ImageLimits())
        elif self.config.vision is not None:
            log.warning("%s: config.json has a vision_config but no vision_tower.* tensors; images are refused",
                        self.model_dir)
        self.media_pad_id = self.config.media_placeholder_token_id
        if self.media_pad_id is None and self.tokenizer is not None:
            self.media_pad_id = getattr(self.tokenizer, "media_pad_id", None)
        self.engine = Engine(self.model, self.config, self.tokenizer, self.device, self.dtype, max_batch,
                             max_context, max_prefill_tokens, cache_tokens=cache_tokens,
                             kv_cache_dtype=kv_cache_dtype, block_size=block_size,
                             enable_prefix_caching=enable_prefix_caching)
        if progress:
            print(format_placement(self.placement()))

    def _cache_size(self, max_batch, max_context, cache_tokens, kv_cache_dtype, gpu_weights, gpu_experts,
                    check_memory) -> tuple[int, int]:
        """(max_context, cache pool tokens) from the memory plan; with check_memory, stop before reading
        any weight (PlanError with the numbers and advice) if the weights plus the pool do not fit."""
        from hybrid import plan
        top = self.config.max_position_embeddings
        if max_context is not None and not 1 < max_context <= top:
            raise ValueError(f"max_context {max_context}: the model takes 2..{top} tokens (max_position_embeddings)")
        mem = plan.machine_memory()
        gpu = mem["gpu_mem_bytes"] if self.device.type == "cuda" else 0
        kw = dict(gpu_weights=gpu_weights, gpu_experts=gpu_experts, expert_backend=self.expert_backend,
                  kv_cache_dtype=kv_cache_dtype, cpu_weights=self.cpu_weights)
        if max_context is None:
            max_context = (plan.default_max_context(self.config, gpu, mem["ram_bytes"], batch=1, **kw)
                           if check_memory else min(top, 4096))
        if cache_tokens is None:
            want = max_batch * max_context
            if check_memory:
                p = plan.make_plan(self.config, gpu_mem_bytes=gpu, ram_bytes=mem["ram_bytes"], context=1,
                                   advise=False, **kw)
                want = min(want, plan.cache_room(self.config, p, "8-bit" if kv_cache_dtype in ("fp8", "int8")
                                                 else "bf16"))
            cache_tokens = max(want, max_context)
        if check_memory:     # the pool is the cache: plan it as one sequence of cache_tokens
            plan.check_before_load(self.config, context=max_context, batch=-(-cache_tokens // max_context),
                                   gpu_mem_bytes=gpu,
                                   ram_bytes=mem["ram_bytes"], **kw)
        return max_context, cache_tokens

    def placement(self) -> dict:
        """What lives where, in bytes (see hybrid/model/inventory.py)."""
        summary = placement_summary(self.model, self.engine.cache)
        summary["cpu_weights"] = f"{self.cpu_weights} ({self.cpu_weights_why})"
        if self.vision is not None:
            summary["accelerator"]["vision tower"] = sum(p.numel() * p.element_size() for p in self.vision.parameters())
        return summary

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

    def score(self, token_ids: list[int], images=None) -> torch.Tensor:
        """float32 logits [len(ids), vocab_size]: row t predicts token t+1 (no cache involved).
        images: one per `<|media_pad|>` in token_ids (data URL, path, bytes, PIL image), in order; each pad is
        expanded to the image's merged-patch count, and the logits cover the EXPANDED sequence."""
        if not images:
            ids = self._check_ids(token_ids)
            return self.model(ids, Step.single(len(ids), device=self.device)).cpu()
        ids, media = self.expand_images(list(token_ids), images)
        t = self._check_ids(ids)
        rows = torch.cat([torch.arange(m.start, m.start + m.embeds.shape[0]) for m in media]).to(self.device)
        values = torch.cat([m.embeds for m in media])
        return self.model(t, Step.single(len(t), device=self.device), embeds=(rows, values)).cpu()

    def expand_images(self, token_ids: list[int], images, where: str = "images") -> tuple[list[int], list]:
        """(token ids with each <|media_pad|> expanded, [MediaSpan]) for `images` (one per pad, in order)."""
        from hybrid.engine import MediaSpan
        from hybrid.media import NoVisionTower, expand_placeholders
        from hybrid.media.prompt import check_count
        images = list(images)
        if self.images is None:
            raise NoVisionTower(where, f"this model ({self.config.model_type}, {self.model_dir.name}) has no vision "
                                       "tower; it cannot take images")
        check_count(len(images), self.images.limits.max_images, where)
        processed = self.images.process([(f"{where}[{k}]", im) for k, im in enumerate(images)])
        ids, starts = expand_placeholders(token_ids, self.media_pad_id, [p.n_tokens for p in processed], where)
        embeds = self.images.encode(processed)
        return ids, [MediaSpan(s, e, p.key) for s, e, p in zip(starts, embeds, processed)]

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
                    r.error = delta.error or r.error
                    if delta.logprobs is not None:
                        r.logprobs = (r.logprobs or []) + list(delta.logprobs)
        return [results[r] for r in rids]

    def stream(self, prompt, sampling: SamplingParams | None = None, media=None) -> Iterator[RequestOutput]:
        """Yield increments (new token ids and text) for one prompt until it finishes.
        media: [hybrid.engine.MediaSpan] (from chat_inputs / expand_images) for prompts with images.
        Closing the iterator early aborts the request."""
        if media:
            rid = self.engine.add_request(self._prompt_ids(prompt), sampling or SamplingParams(), media=media)
        else:
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
        from hybrid.chat import chat_prompt_ids
        return chat_prompt_ids(self, messages, tools, thinking, preserve_thinking, **template_kwargs)

    def chat_inputs(self, messages, tools=None, thinking: bool = True, preserve_thinking: bool = False,
                    **template_kwargs):
        """(prompt_ids, media) for messages that may hold image parts: what the server / batch pass to
        engine.add_request(prompt_ids, params, media=media). Errors (bad or too many images, video parts,
        images to a text-only model) are hybrid.media.MediaError (ValueError) naming messages[i].content[j]."""
        from hybrid.chat import chat_inputs
        return chat_inputs(self, messages, tools, thinking, preserve_thinking, **template_kwargs)

    def chat(self, messages, sampling: SamplingParams | None = None, tools=None, thinking: bool = True,
             preserve_thinking: bool = False, response_format=None, tool_choice=None, max_reasoning_tokens=None,
             **template_kwargs):
        """One assistant turn: ChatResult(message=ParsedMessage(reasoning_content, content, tool_calls), ...).
        response_format / tool_choice as in the OpenAI API (grammar-constrained: hybrid/chat.py `constrained`)."""
        from hybrid.chat import chat
        return chat(self, messages, sampling, tools, thinking, preserve_thinking, response_format, tool_choice,
                    max_reasoning_tokens, **template_kwargs)

    def chat_stream(self, messages, sampling: SamplingParams | None = None, tools=None, thinking: bool = True,
                    preserve_thinking: bool = False, **template_kwargs):
        """Yield reasoning / content / tool-call deltas, then the final ChatResult."""
        from hybrid.chat import chat_stream
        return chat_stream(self, messages, sampling, tools, thinking, preserve_thinking, **template_kwargs)
