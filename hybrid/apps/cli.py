"""The `hybrid` command (also `python -m hybrid`):

    hybrid demo                                   tiny synthetic model, end to end
    hybrid chat MODEL_DIR                         terminal chat
    hybrid serve MODEL_DIR [--port 8000]          OpenAI-compatible server
    hybrid batch MODEL_DIR --input in.jsonl --output out.jsonl
    hybrid plan ...                               will it fit, where do the experts go (hybrid/apps/plan_cli.py)
    hybrid profile MODEL_DIR --prompts FILE       routing counts for --gpu-experts (hybrid/apps/profile.py)
    hybrid bench generate|experts [ARGS]          tools/bench_generate.py, tools/bench_experts.py

Model options shared by chat / serve / batch / demo: --device, --expert-backend, --max-context (also
--max-model-len; default: the longest the memory plan allows, up to the model's maximum), --max-batch
(chat: 1, others: 16), --threads. `--version`; user mistakes (paths, values, sizes without a unit) are
one line on stderr with exit status 2, `--debug` (anywhere, or HYBRID_DEBUG=1) shows the traceback.
Checked by tests/test_cli.py, tests/test_plan.py (`hybrid plan`), tests/test_terminal_chat.py.
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback
from pathlib import Path

from hybrid.apps.plan_cli import cli_plan  # noqa: F401  (`hybrid plan`: hybrid/apps/plan_cli.py)

BENCHES = {"generate": "bench_generate", "experts": "bench_experts"}


def _model_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default: auto)")
    g.add_argument("--expert-backend", default="auto", help="routed-expert CPU backend: auto, numba, torch, ...")
    g.add_argument("--max-context", "--max-model-len", dest="max_context", type=int, default=None,
                   help="tokens per sequence, prompt + answer (default: the longest the memory plan allows "
                        "for one conversation, up to the model's maximum)")
    g.add_argument("--max-batch", type=int, default=None, help="sequences decoded together, a limit on "
                   "concurrency: they share one paged KV cache pool (default: chat 1, others 16)")
    g.add_argument("--cache-tokens", type=int, default=None, help="size of the shared KV cache pool in tokens "
                   "(default: max-batch x max-context, bounded by the memory the plan leaves free)")
    g.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse cached blocks of earlier prompts with the same prefix")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bf16", "fp8", "int8"],
                   help="KV cache: auto (the model dtype) or 8 bits (half the memory)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for the experts (default: all)")
    g.add_argument("--expert-act-format", default=None, choices=["int8", "int8x2"],
                   help="activations of the numba expert kernels (int8x2: more exact, slower prefill)")
    g.add_argument("--accel-threads", type=int, default=None,
                   help="torch threads for the accelerator side when it runs on the CPU (default: torch's)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="accelerator-side dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    g.add_argument("--gpu-weights", default="bf16", choices=["bf16", "int8", "fp8"],
                   help="accelerator-side weights as loaded (bf16) or quantized to 8 bits at load")
    g.add_argument("--cpu-weights", default="auto", choices=["auto", "off", "bf16", "int8"],
                   help="no GPU: the accelerator side's decode matrix-vector products through our kernels "
                        "(bf16: the checkpoint's values; int8: half the bytes again); auto (default): bf16 "
                        "without a GPU; off: torch's float32 Linears")
    g.add_argument("--gpu-experts", type=int, default=0,
                   help="keep the N most used routed experts on the accelerator (needs `hybrid profile`)")
    g.add_argument("--expert-cache", nargs="?", const=True, default=False, metavar="FOLDER",
                   help="keep the repacked experts in a cache (default folder: MODEL_DIR/.hybrid-cache) "
                        "and memory-map it at the next start")
    g.add_argument("--expert-streaming", default="off", choices=["off", "auto", "always"],
                   help="stream a layer's experts to the accelerator for long prefills (cost model)")
    return p


def _sampling_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=None, help="(default: the checkpoint's "
                   "generation_config.json, else 1.0; /set temperature 0.6 inside the chat)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="reproducible sampling")
    g.add_argument("--max-tokens", type=int, default=None, help="per answer (default: until it ends)")
    g.add_argument("--ignore-eos", action="store_true", help="generate past the end token (benchmarks, tests)")
    return p


def _ray_options(p: argparse.ArgumentParser, count_flag: str, count_help: str) -> None:
    g = p.add_argument_group("several machines (Ray; pip install -e \".[ray]\")")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster: ADDRESS (HOST:6379, or auto for the one `ray start` runs here); "
                        "without ADDRESS a local one is started")
    g.add_argument(count_flag, type=int, default=2, help=count_help)
    g.add_argument("--worker-cpus", type=float, default=None,
                   help="CPUs each worker declares to Ray (default: --threads, else a whole machine)")


def llm_options(args) -> dict:
    """The LLM keyword arguments of the model flags, for the LLMs --ray builds on other machines (options
    left unset stay unset: each machine's LLM plans its own context from its own memory)."""
    kw = dict(device=args.device, expert_backend=args.expert_backend, expert_act_format=args.expert_act_format,
              num_threads=args.threads, accel_threads=args.accel_threads, max_batch=args.max_batch,
              max_context=args.max_context, dtype=args.dtype, gpu_weights=args.gpu_weights,
              gpu_experts=args.gpu_experts, cpu_weights=args.cpu_weights, expert_streaming=args.expert_streaming,
              expert_cache=args.expert_cache,
              kv_cache_dtype=args.kv_cache_dtype, cache_tokens=args.cache_tokens,
              enable_prefix_caching=not args.no_prefix_caching)
    return {k: v for k, v in kw.items() if v is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid", description="CPU/GPU hybrid inference for Kimi K2.6-class "
                                     "MoE models. Start with `hybrid demo`.")
    parser.add_argument("--version", action="version", version=f"hybrid {version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (any command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    model, sampling = _model_options(), _sampling_options()

    p = sub.add_parser("demo", parents=[model], help="run a tiny synthetic model end to end (start here)")
    p.add_argument("--max-tokens", type=int, default=48)

    p = sub.add_parser("chat", parents=[model, sampling], help="chat in the terminal")
    p.add_argument("model_dir")
    p.add_argument("--no-think", action="store_true", help="start with thinking off (/think on turns it on)")
    p.add_argument("--system", default=None, help="system prompt")

    p = sub.add_parser("serve", parents=[model], help="OpenAI-compatible HTTP server")
    p.add_argument("model_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $HYBRID_API_KEY, which keeps the key out "
                        "of the process list; else none)")
    p.add_argument("--max-body-mb", type=float, default=16, help="largest request body, MiB (413 above)")
    p.add_argument("--no-remote-images", action="store_true",
                   help="refuse http(s) image URLs (default: fetched within size and time limits)")
    p.add_argument("--max-images", type=int, default=16, help="images per request (default 16)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: folder name)")
    p.add_argument("--log-level", default="info")
    _ray_options(p, "--replicas", "engine replicas behind the endpoint, one per machine (default: 2)")

    p = sub.add_parser("batch", parents=[model], help="run a JSONL file of requests, resumable")
    p.add_argument("model_dir")
    p.add_argument("--input", required=True, help="JSONL: one {id, messages|prompt, ...} per line")
    p.add_argument("--output", required=True, help="JSONL results, appended; rerun to resume")
    p.add_argument("--max-tokens", type=int, default=None, help="for lines that set none (default: until it ends)")
    p.add_argument("--retry-errors", action="store_true", help="redo lines answered by an error record")
    p.add_argument("--no-progress", action="store_true")
    _ray_options(p, "--workers", "workers, one hybrid LLM each, one per machine (default: 2)")

    sub.add_parser("plan", help="will a checkpoint fit this machine, and where do the experts go",
                   add_help=False)
    sub.add_parser("profile", help="count routed-expert use on prompts (for --gpu-experts)", add_help=False)
    p = sub.add_parser("bench", help="benchmarks: generate (end to end) or experts (CPU kernels)", add_help=False)
    return parser


def version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version
        return dist_version("hybrid")
    except PackageNotFoundError:
        return "0.1.0 (not installed)"


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _check_model_dir(args, needs_tokenizer: bool) -> None:
    """User mistakes found before minutes of loading: the folder, config.json, the tokenizer, the context."""
    d = Path(args.model_dir)
    if not d.is_dir():
        raise ValueError(f"{args.model_dir}: no such directory (pass a checkpoint folder holding config.json)")
    if not (d / "config.json").is_file():
        raise ValueError(f"{args.model_dir}: no config.json here; is it a Hugging Face checkpoint folder?")
    if not (d / "tiktoken.model").is_file():
        if needs_tokenizer:
            raise ValueError(f"{args.model_dir}: no tiktoken.model, and chat needs the tokenizer "
                             "(copy the checkpoint's tokenizer files into the folder)")
        _say(f"note: {args.model_dir} has no tiktoken.model: only token-id prompts will work")


def resolve_context(args, config, device: str) -> None:
    """Fill args.max_batch (chat 1, others 16) and args.max_context (default: the plan's longest);
    refuse a context above the model's maximum and --gpu-experts without a GPU."""
    from hybrid import plan
    if args.max_batch is None:
        args.max_batch = 1 if args.command == "chat" else 16
    top = config.max_position_embeddings
    if args.max_context is not None and not 1 < args.max_context <= top:
        raise ValueError(f"--max-context {args.max_context}: the model takes 2..{top} tokens (max_position_embeddings)")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch {args.max_batch}: must be >= 1")
    mem = plan.machine_memory()
    on_gpu = device.startswith("cuda") or (device == "auto" and mem["gpu_mem_bytes"] > 0)
    if args.gpu_experts and not on_gpu:
        raise ValueError(f"--gpu-experts {args.gpu_experts} keeps experts on a GPU, and "
                         + ("--device is cpu" if device == "cpu" else "torch sees no CUDA GPU here")
                         + "; leave it out (the experts run on the CPU)")
    if getattr(args, "expert_streaming", "off") != "off" and not on_gpu:
        _say(f"note: --expert-streaming {args.expert_streaming} has no GPU to stream to; the experts stay on the CPU")
    if args.max_context is None:
        gpu = mem["gpu_mem_bytes"] if on_gpu else 0
        backend = "numba" if args.expert_backend == "auto" else args.expert_backend
        args.max_context = plan.default_max_context(
            config, gpu, mem["ram_bytes"], batch=1, gpu_weights=args.gpu_weights,
            gpu_experts=args.gpu_experts, expert_backend=backend if backend in plan.BACKENDS else "numba",
            kv_cache_dtype=args.kv_cache_dtype, cpu_weights=args.cpu_weights)
        _say(f"context: {args.max_context} tokens per sequence, up to {args.max_batch} sequences sharing one cache pool "
             + ("(the model's maximum)" if args.max_context == top else
                f"(the longest that fits this machine; the model takes up to {top})")
             + "; --max-context to change")


def _cache_state(folder: Path) -> dict:
    return {m.parent.name: m.stat().st_mtime_ns for m in folder.glob("layer*/manifest.json")} if folder.is_dir() else {}


def load_llm(args, progress: bool = True):
    from hybrid.config import load_config
    from hybrid.llm import LLM
    _check_model_dir(args, needs_tokenizer=args.command == "chat")
    config = load_config(args.model_dir)
    resolve_context(args, config, args.device)
    extra = dict(kv_cache_dtype=args.kv_cache_dtype, cache_tokens=args.cache_tokens,
                 enable_prefix_caching=not args.no_prefix_caching)
    if args.command == "serve":
        from hybrid.media import ImageLimits
        extra["image_limits"] = ImageLimits(allow_remote=not args.no_remote_images, max_images=args.max_images)
    cache = None
    if args.expert_cache:
        cache = Path(args.model_dir) / ".hybrid-cache" if args.expert_cache is True else Path(args.expert_cache)
        before = _cache_state(cache)
    llm = LLM(args.model_dir, device=args.device, expert_backend=args.expert_backend,
              expert_act_format=args.expert_act_format, num_threads=args.threads,
              accel_threads=args.accel_threads, max_batch=args.max_batch, max_context=args.max_context,
              dtype=args.dtype, gpu_weights=args.gpu_weights, gpu_experts=args.gpu_experts, cpu_weights=args.cpu_weights,
              expert_streaming=args.expert_streaming, expert_cache=args.expert_cache, progress=progress, **extra)
    if cache is not None:
        after = _cache_state(cache)
        written = sum(1 for k, t in after.items() if before.get(k) != t)
        used = sum(1 for k, t in after.items() if before.get(k) == t)
        _say(f"expert cache {cache}: " + (f"used {used} layers (memory-mapped)" if used else "")
             + (", " if used and written else "")
             + (f"wrote {written} layers (the next start memory-maps them)" if written else "")
             + ("nothing cached (no MoE layer)" if not used and not written else ""))
    return llm


def _run_bench(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        print(f"usage: hybrid bench {{{','.join(BENCHES)}}} [ARGS]   (--help after the name for its options)",
              file=sys.stderr)
        return 2
    module = BENCHES[argv[0]]
    path = Path(__file__).resolve().parents[2] / "tools" / f"{module}.py"
    if not path.is_file():      # tools/ is not installed: the benchmarks run from a source checkout
        print(f"benchmark {argv[0]} is not available: it is tools/{module}.py in the source tree "
              f"(git clone, then run it there)", file=sys.stderr)
        return 2
    old = sys.argv
    sys.argv = [f"hybrid bench {argv[0]}"] + argv[1:]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = old
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("HYBRID_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    name = argv[0] if argv and not argv[0].startswith("-") else ""
    from hybrid.plan import PlanError
    try:
        return _main(argv)
    except PlanError as e:                         # would not fit: the plan and the advice
        if debug:
            raise
        _say(f"hybrid {name}: the model does not fit this machine:\n{e}")
        return 2
    except (ValueError, OSError) as e:             # user mistakes (paths, values): one line, no traceback
        if debug:
            raise
        where = f"{e.filename}: " if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e) else ""
        _say(f"hybrid {name}: error: {where}{e.strerror if isinstance(e, OSError) and e.strerror else e}"
             + "   (--debug shows the traceback)")
        return 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        _say(f"\nhybrid {name}: interrupted")
        return 130


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "plan":                # its own options (hybrid/apps/plan_cli.py)
        return cli_plan(argv[1:])
    if argv and argv[0] == "bench":
        return _run_bench(argv[1:])
    if argv and argv[0] == "profile":             # its own options, parsed by hybrid/apps/profile.py
        from hybrid.apps.profile import cli_profile
        return cli_profile(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return _dispatch(args) or 0


def _dispatch(args) -> int | None:
    if args.command == "demo":
        from hybrid.apps.demo import run_demo
        run_demo(args.device, args.expert_backend, args.threads, args.max_tokens)
    elif args.command == "chat":
        from hybrid.apps.openai_protocol import generation_defaults
        from hybrid.apps.terminal_chat import run_chat
        from hybrid.sampling import SamplingParams
        sampling = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                                    "seed") if getattr(args, k) is not None}
        kw = {**(generation_defaults(args.model_dir) if Path(args.model_dir).is_dir() else {}), **sampling}
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, **kw)   # checked before loading
        llm = load_llm(args)
        run_chat(llm, thinking=not args.no_think, system=args.system, sampling=params)
    elif args.command == "serve":
        from hybrid.apps.server import serve
        name = args.served_model_name or Path(args.model_dir).resolve().name
        if args.max_body_mb <= 0 or args.max_images < 1:
            raise ValueError("--max-body-mb must be > 0 and --max-images >= 1")
        from hybrid.config import load_config
        _check_model_dir(args, needs_tokenizer=False)
        if args.ray is not None:                   # N replicas on a Ray cluster, one endpoint (hybrid/apps/ray_serve.py)
            from hybrid.apps.ray_serve import serve_ray   # (each replica plans its context on its own machine)
            serve_ray(args.model_dir, address=None if args.ray == "local" else args.ray, replicas=args.replicas,
                      host=args.host, port=args.port, api_key=args.api_key or os.environ.get("HYBRID_API_KEY"),
                      model_name=name, num_cpus=args.worker_cpus, **llm_options(args))
            return 0
        resolve_context(args, load_config(args.model_dir), args.device)    # bad options: an error before binding
        # the port is bound first; the model loads behind it (/health: 503 "loading" until ready)
        serve(lambda: load_llm(args), name, args.host, args.port, args.api_key, args.log_level,
              max_body_bytes=int(args.max_body_mb * 2**20))
    elif args.command == "batch":
        from hybrid.apps.batch import check_paths, run_batch
        check_paths(args.input, args.output)       # before minutes of loading (BatchPathError is a ValueError)
        if args.ray is not None:                   # workers on a Ray cluster (hybrid/apps/ray_batch.py)
            from hybrid.apps.ray_batch import run_ray_batch
            counts = run_ray_batch(args.model_dir, args.input, args.output, workers=args.workers,
                                   address=None if args.ray == "local" else args.ray, max_tokens=args.max_tokens,
                                   progress=not args.no_progress, num_cpus=args.worker_cpus,
                                   retry_errors=args.retry_errors, **llm_options(args))
            print(f"batch --ray: {counts['results']} results, {counts['errors']} error records, "
                  f"{counts['skipped']} already done, {counts['resent']} sent again after "
                  f"{counts['workers_lost']} lost workers; {counts['records_per_s']:.2f} records/s, "
                  f"per worker {counts['per_worker']} -> {args.output}")
            return 0
        llm = load_llm(args, progress=not args.no_progress)
        counts = run_batch(llm, args.input, args.output, args.max_tokens, progress=not args.no_progress,
                           retry_errors=args.retry_errors)
        print(f"batch: {counts['results']} results, {counts['errors']} error records, "
              f"{counts['skipped']} already done; {counts['tokens_per_s']:.1f} tok/s -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
