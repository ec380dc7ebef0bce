"""The `hybrid` command (also `python -m hybrid`):

    hybrid demo                                   tiny synthetic model, end to end
    hybrid chat MODEL_DIR                         terminal chat
    hybrid serve MODEL_DIR [--port 8000]          OpenAI-compatible server
    hybrid batch MODEL_DIR --input in.jsonl --output out.jsonl
    hybrid plan ...                               will it fit, where do the experts go (hybrid/plan.py)
    hybrid profile MODEL_DIR --prompts FILE       routing counts for --gpu-experts (hybrid/apps/profile.py)
    hybrid bench generate|experts [ARGS]          tools/bench_generate.py, tools/bench_experts.py

Model options shared by chat / serve / batch / demo: --device, --expert-backend, --max-context,
--max-batch, --threads. Checked by tests/test_cli.py.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from pathlib import Path

BENCHES = {"generate": "bench_generate", "experts": "bench_experts"}


def _model_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default: auto)")
    g.add_argument("--expert-backend", default="auto", help="routed-expert CPU backend: auto, numba, torch, ...")
    g.add_argument("--max-context", type=int, default=4096, help="tokens per sequence (default: 4096)")
    g.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default: 16)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for the experts (default: all)")
    g.add_argument("--expert-act-format", default=None, choices=["int8", "int8x2"],
                   help="activations of the numba expert kernels (int8x2: more exact, slower prefill)")
    g.add_argument("--accel-threads", type=int, default=None,
                   help="torch threads for the accelerator side when it runs on the CPU (default: torch's)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="accelerator-side dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    g.add_argument("--gpu-weights", default="bf16", choices=["bf16", "int8", "fp8"],
                   help="accelerator-side weights as loaded (bf16) or quantized to 8 bits at load")
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
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--max-tokens", type=int, default=None, help="per answer (default: until it ends)")
    g.add_argument("--ignore-eos", action="store_true", help="generate past the end token (benchmarks, tests)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid", description="CPU/GPU hybrid inference for Kimi K2.6-class "
                                     "MoE models. Start with `hybrid demo`.")
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
    p.add_argument("--api-key", default=os.environ.get("HYBRID_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $HYBRID_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: folder name)")
    p.add_argument("--log-level", default="info")

    p = sub.add_parser("batch", parents=[model], help="run a JSONL file of requests, resumable")
    p.add_argument("model_dir")
    p.add_argument("--input", required=True, help="JSONL: one {id, messages|prompt, ...} per line")
    p.add_argument("--output", required=True, help="JSONL results, appended; rerun to resume")
    p.add_argument("--max-tokens", type=int, default=None, help="for lines that set none (default: until it ends)")
    p.add_argument("--no-progress", action="store_true")

    sub.add_parser("plan", help="will a checkpoint fit this machine, and where do the experts go",
                   add_help=False)
    sub.add_parser("profile", help="count routed-expert use on prompts (for --gpu-experts)", add_help=False)
    p = sub.add_parser("bench", help="benchmarks: generate (end to end) or experts (CPU kernels)", add_help=False)
    return parser


def load_llm(args, progress: bool = True):
    from hybrid.llm import LLM
    return LLM(args.model_dir, device=args.device, expert_backend=args.expert_backend,
               expert_act_format=args.expert_act_format, num_threads=args.threads,
               accel_threads=args.accel_threads, max_batch=args.max_batch, max_context=args.max_context,
               dtype=args.dtype,
               gpu_weights=args.gpu_weights, gpu_experts=args.gpu_experts, expert_streaming=args.expert_streaming,
               expert_cache=args.expert_cache,
               progress=progress)


def cli_plan(argv: list[str] | None = None) -> int:
    """`hybrid plan MODEL_DIR [...]`: prints the plan (or --json); returns 0 if it fits, 1 if not."""
    from hybrid import plan
    from hybrid.config import load_config
    ap = argparse.ArgumentParser(prog="hybrid plan", description="memory plan and tok/s prediction for a checkpoint "
                                 "(a directory holding config.json is enough)")
    ap.add_argument("model_dir")
    ap.add_argument("--gpu-mem", help="GPU memory, e.g. 24GB (default: this machine's; 0 = no GPU)")
    ap.add_argument("--ram", help="RAM, e.g. 512GB (default: this machine's)")
    ap.add_argument("--context", type=int, default=65536, help="tokens of KV cache per sequence (default 65536)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--gpu-weights", choices=plan.GPU_FORMATS, default="bf16")
    ap.add_argument("--gpu-experts", type=int, default=0, help="routed experts kept on the GPU (INT4)")
    ap.add_argument("--expert-backend", default="auto", help="the RAM an expert takes depends on it: "
                    "auto, numba, kt (INT4) or torch, ref (dequantized, 8x)")
    ap.add_argument("--hw", help="JSON file of measured rates: " + ", ".join(plan.Hardware.KEYS))
    ap.add_argument("--prefill-tokens", type=int, help="prompt length for the prefill prediction "
                    "(default min(context, 8192))")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    config = load_config(args.model_dir)
    mem = plan.machine_memory() if args.gpu_mem is None or args.ram is None else {}
    gpu_mem = plan.parse_size(args.gpu_mem) if args.gpu_mem is not None else mem["gpu_mem_bytes"]
    ram = plan.parse_size(args.ram) if args.ram is not None else mem["ram_bytes"]
    hw = plan.Hardware.from_dict(json.loads(Path(args.hw).read_text())) if args.hw else None
    p = plan.make_plan(config, gpu_mem_bytes=gpu_mem, ram_bytes=ram, context=args.context, batch=args.batch,
                     gpu_weights=args.gpu_weights, gpu_experts=args.gpu_experts, hw=hw,
                     prefill_tokens=args.prefill_tokens, expert_backend=args.expert_backend)
    print(json.dumps(plan.plan_to_json(p)) if args.json else plan.format_plan(p))
    return 0 if p.fits else 1


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
    if argv and argv[0] == "plan":                # its own options (cli_plan above)
        return cli_plan(argv[1:])
    if argv and argv[0] == "bench":
        return _run_bench(argv[1:])
    if argv and argv[0] == "profile":             # its own options, parsed by hybrid/apps/profile.py
        from hybrid.apps.profile import cli_profile
        try:
            return cli_profile(argv[1:])
        except ValueError as e:
            print(f"hybrid profile: error: {e}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from hybrid.plan import PlanError
    try:
        return _dispatch(args) or 0
    except ValueError as e:                        # bad user input: say what, no traceback
        print(f"hybrid {args.command}: error: {e}", file=sys.stderr)
        return 2
    except PlanError as e:                         # would not fit: the plan and the advice
        print(f"hybrid {args.command}: the model does not fit this machine:\n{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nhybrid {args.command}: interrupted", file=sys.stderr)
        return 130


def _dispatch(args) -> int | None:
    if args.command == "demo":
        from hybrid.apps.demo import run_demo
        run_demo(args.device, args.expert_backend, args.threads, args.max_tokens)
    elif args.command == "chat":
        from hybrid.sampling import SamplingParams
        from hybrid.apps.terminal_chat import run_chat
        llm = load_llm(args)
        from hybrid.apps.openai_protocol import generation_defaults
        kw = {**generation_defaults(llm.model_dir),
              **{k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None}}
        run_chat(llm, thinking=not args.no_think, system=args.system,
                 sampling=SamplingParams(max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, **kw))
    elif args.command == "serve":
        from hybrid.apps.server import serve
        llm = load_llm(args)
        name = args.served_model_name or Path(args.model_dir).resolve().name
        serve(llm, name, args.host, args.port, args.api_key, args.log_level)
    elif args.command == "batch":
        from hybrid.apps.batch import run_batch
        if not Path(args.input).is_file():         # before minutes of loading
            raise ValueError(f"--input {args.input}: no such file")
        llm = load_llm(args, progress=not args.no_progress)
        counts = run_batch(llm, args.input, args.output, args.max_tokens, progress=not args.no_progress)
        print(f"batch: {counts['results']} results, {counts['errors']} error records, "
              f"{counts['skipped']} already done; {counts['tokens_per_s']:.1f} tok/s -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
