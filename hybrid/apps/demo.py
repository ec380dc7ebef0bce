"""`hybrid demo`: the first command to run. Writes the tiny synthetic checkpoint (random weights, real
K2.6 layout, tokenizer and chat template) into the cache folder if it is not there, loads it, shows
where everything was placed, and runs a short two-turn chat through the whole path (template ->
engine -> MLA attention + MoE with CPU experts -> sampler -> parser), streamed, with tokens/s and
the second turn's KV-cache reuse, then one image turn (a generated picture through the MoonViT tower
and projector into the prompt). The text is gibberish: the weights are random.
Checked by tests/test_cli.py::test_demo_end_to_end.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from rich.console import Console

from hybrid.sampling import SamplingParams

DEMO_NAME = "tiny-k2.6"


def cache_dir() -> Path:
    return Path(os.environ.get("HYBRID_CACHE") or Path.home() / ".cache" / "hybrid")


def ensure_tiny_checkpoint(console: Console) -> Path:
    """The demo checkpoint, written once (to a temporary folder, then renamed, so a crash mid-write
    never leaves a half checkpoint behind)."""
    from hybrid.synthetic import write_checkpoint
    path = cache_dir() / DEMO_NAME
    from hybrid.model.vision import has_vision_weights
    if (path / "config.json").is_file() and (path / "model.safetensors.index.json").is_file() \
            and has_vision_weights(path):           # (a demo cache from before images is rewritten)
        console.print(f"checkpoint: {path} (cached)")
        return path
    tmp = path.with_name(f"{DEMO_NAME}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    write_checkpoint(tmp, "tiny")
    shutil.rmtree(path, ignore_errors=True)
    try:
        tmp.rename(path)
    except OSError:                    # another demo finished writing it first
        shutil.rmtree(tmp, ignore_errors=True)
    console.print(f"checkpoint: wrote the tiny synthetic checkpoint to {path} in {time.perf_counter() - t0:.1f} s")
    return path


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def placement_report(llm) -> list[str]:
    """Where the model sits: device and dtype of the dense part, backend and bytes of the routed experts."""
    dense = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    experts = [layer.mlp.experts.backend for layer in llm.model.model.layers
               if getattr(layer.mlp, "experts", None) is not None]       # each MoE layer's ExpertOffload
    expert_bytes = sum(e.nbytes for e in experts)
    backend = f"{llm.expert_backend} ({type(experts[0]).__name__})" if experts else "none"
    cfg = llm.config
    kv = getattr(llm.engine.cache, "nbytes", None)
    return [
        f"model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.n_routed_experts} routed experts "
        f"(top-{cfg.num_experts_per_tok}), vocab {cfg.vocab_size}",
        f"attention, shared experts, dense layers, embeddings: {llm.device} ({str(llm.dtype).replace('torch.', '')}),"
        f" {_mb(dense)}",
        f"routed experts: CPU, backend {backend}, {len(experts)} MoE layers, {_mb(expert_bytes)}",
        f"KV cache: {llm.engine.max_batch} slots x {llm.engine.max_context} tokens"
        + (f", {_mb(kv() if callable(kv) else kv)}" if kv is not None else ""),
    ]


def demo_image(side: int = 224):
    """A small generated picture (colour gradient with a disc), as a PIL image."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (side, side))
    img.putdata([(x * 255 // side, y * 255 // side, 128) for y in range(side) for x in range(side)])
    ImageDraw.Draw(img).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=(250, 220, 40))
    return img


def image_turn(llm, console: Console, messages: list, sampling: SamplingParams) -> None:
    from hybrid.apps.terminal_chat import stream_turn
    img = demo_image()
    question = "What is in this picture?"
    messages.append({"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": question}]})
    t0 = time.perf_counter()
    _, media = llm.chat_inputs(messages)
    n = sum(m.embeds.shape[0] for m in media)
    console.print(f"\nuser: [image {img.width}x{img.height} -> {n} tokens, vision tower "
                  f"{time.perf_counter() - t0:.2f} s] {question}", style="bold", markup=False)
    console.print("assistant: ", style="bold", end="")
    result, _ = stream_turn(llm, console, messages, sampling, thinking=False)
    messages.append(result.message.to_dict())


def run_demo(device: str = "auto", expert_backend: str = "auto", num_threads: int | None = None,
             max_tokens: int = 48, console: Console | None = None) -> None:
    from hybrid.llm import LLM
    from hybrid.apps.terminal_chat import stream_turn
    console = console or Console(highlight=False, soft_wrap=True)
    console.rule("hybrid demo")
    path = ensure_tiny_checkpoint(console)
    t0 = time.perf_counter()
    llm = LLM(path, device=device, expert_backend=expert_backend, num_threads=num_threads, progress=False,
              max_context=1024, max_batch=4)
    console.print(f"loaded in {time.perf_counter() - t0:.2f} s")
    console.print(placement_report(llm)[0], markup=False)
    from hybrid.model.inventory import format_placement
    console.print(format_placement(llm.placement()), markup=False)
    sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=max_tokens)
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for turn, question in enumerate(["Hi! What can a hybrid CPU/GPU runtime do?",
                                     "And why do the experts run on the CPU?"], 1):
        messages.append({"role": "user", "content": question})
        console.print(f"\nuser: {question}", style="bold", markup=False)
        console.print("assistant: ", style="bold", end="")
        result, _ = stream_turn(llm, console, messages, sampling, thinking=turn == 1)
        messages.append(result.message.to_dict())
    if llm.images is not None:
        image_turn(llm, console, messages, sampling)
    console.print("\n(random weights, so the words are noise; the path they took is the real one)", style="dim")
    console.rule("next")
    console.print(
        "real checkpoint:  hybrid plan /path/to/Kimi-K2.6        (does it fit? where do experts go?)\n"
        "                  hybrid chat /path/to/Kimi-K2.6\n"
        "server:           hybrid serve /path/to/Kimi-K2.6 --port 8000   (OpenAI API at /v1)\n"
        f"                  hybrid serve {path}   (try it with this tiny model)\n"
        "batch:            hybrid batch /path/to/Kimi-K2.6 --input in.jsonl --output out.jsonl\n"
        "python:           llm = hybrid.LLM(path); llm.chat([{'role': 'user', 'content': 'hi'}])",
        markup=False, highlight=False)
