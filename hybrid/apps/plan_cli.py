"""`hybrid plan MODEL_DIR [...]`: the memory plan and tok/s estimate for a checkpoint (hybrid/plan), as the
CLI prints it; exit status 0 if it fits, 1 if not. hybrid/apps/cli.py dispatches to cli_plan.
Checked by tests/test_plan.py.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hybrid.formats import choose_cpu_weights


def _plan_parser():
    from hybrid import plan
    ap = argparse.ArgumentParser(prog="hybrid plan", description="memory plan and tok/s estimate for a checkpoint "
                                 "(a directory holding config.json is enough); exit status 0 if it fits, 1 if not")
    ap.add_argument("model_dir")
    ap.add_argument("--gpu-mem", help="GPU memory with a unit, e.g. 24GB (default: this machine's; 0 = no GPU)")
    ap.add_argument("--ram", help="RAM with a unit, e.g. 512GB (default: this machine's)")
    ap.add_argument("--max-context", "--max-model-len", "--context", dest="max_context", type=int, default=None,
                    help="tokens per sequence (default: the longest that fits, as chat and serve choose it)")
    ap.add_argument("--max-batch", "--batch", dest="max_batch", type=int, default=1,
                    help="sequences with a full context each (default 1; serve's default is 16)")
    ap.add_argument("--gpu-weights", choices=plan.GPU_FORMATS, default="bf16")
    ap.add_argument("--gpu-experts", type=int, default=0, help="routed experts kept on the GPU (INT4)")
    ap.add_argument("--kv-cache-dtype", choices=plan.KV_DTYPES, default="auto",
                    help="auto (the model dtype: bf16 on a GPU, fp32 on the CPU), bf16, or 8 bits (fp8, int8)")
    ap.add_argument("--cpu-weights", choices=plan.CPU_FORMATS, default="auto",
                    help="no GPU: the Linears' format through our kernels (auto = bf16 without a GPU)")
    ap.add_argument("--expert-backend", default="auto", help="the RAM an expert takes depends on it: "
                    "auto, numba, kt (INT4) or torch, ref (dequantized, 8x)")
    ap.add_argument("--hw", help="JSON file of measured rates (tools/bench_experts.py --json, plus pcie_gbs, "
                    "gpu_bandwidth_gbs, gpu_tflops); default: stated default rates, marked as an estimate")
    ap.add_argument("--prefill-tokens", type=int, help="prompt length for the prefill estimate "
                    "(default min(context, 8192))")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def cli_plan(argv: list[str] | None = None) -> int:
    """`hybrid plan MODEL_DIR [...]`: prints the plan (or --json); returns 0 if it fits, 1 if not.
    Bad input raises ValueError (main() prints it as one line)."""
    from hybrid import plan
    from hybrid.config import load_config
    args = _plan_parser().parse_args(argv)
    if not Path(args.model_dir).is_dir():
        raise ValueError(f"{args.model_dir}: no such directory (pass a folder holding the checkpoint's config.json)")
    config = load_config(args.model_dir)
    mem = plan.machine_memory() if args.gpu_mem is None or args.ram is None else {}
    gpu_mem = plan.parse_size(args.gpu_mem) if args.gpu_mem is not None else mem["gpu_mem_bytes"]
    ram = plan.parse_size(args.ram) if args.ram is not None else mem["ram_bytes"]
    if args.hw:
        try:
            hw = plan.Hardware.from_dict(json.loads(Path(args.hw).read_text()))
        except OSError as e:
            raise ValueError(f"--hw {args.hw}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"--hw {args.hw}: not JSON ({e})") from None
    # an explicit --cpu-weights where it cannot apply is refused as LLM refuses it (the plan itself reads it
    # as "off", for the advice's re-plans)
    choose_cpu_weights(args.cpu_weights, gpu_mem == 0, args.gpu_weights)
    kw = dict(gpu_mem_bytes=gpu_mem, ram_bytes=ram, batch=args.max_batch, gpu_weights=args.gpu_weights,
              gpu_experts=args.gpu_experts, expert_backend=args.expert_backend, kv_cache_dtype=args.kv_cache_dtype,
              cpu_weights=args.cpu_weights)
    context, chosen = args.max_context, args.max_context is None
    if chosen:
        try:
            context = plan.default_max_context(config, **{**kw, "expert_backend": "numba" if args.expert_backend
                                                          == "auto" else args.expert_backend})
        except plan.PlanError:
            context = min(plan.MIN_CONTEXT, config.max_position_embeddings)
    p = plan.make_plan(config, context=context, prefill_tokens=args.prefill_tokens,
                       hw=hw if args.hw else plan.DEFAULT_HW, hw_source=f"--hw {args.hw}" if args.hw else "default rates",
                       **kw)
    if args.json:
        print(json.dumps(plan.plan_to_json(p)))
    else:
        print(plan.format_plan(p))
        if chosen:
            print(f"context {context}: " + ("the longest that fits (chat and serve choose it when --max-context "
                  f"is not given; the model takes up to {config.max_position_embeddings})" if p.fits else
                  "no --max-context given and none fits: planned at the shortest offered"))
    return 0 if p.fits else 1
