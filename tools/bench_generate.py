"""End-to-end generation benchmark on a synthetic checkpoint (default: the k2-slice preset, real K2.6
layer shapes), measured against this machine's own read bandwidth in the same run.

    python tools/bench_generate.py [MODEL_DIR] [--batches 1,4,16] [--prompt-len 64] [--steps 8]
                                   [--expert-backend auto] [--dtype float32|bfloat16] [--json]
                                   [--cpu-weights auto|off|bf16|int8] [--logit-error] [--hw HW.json]

MODEL_DIR defaults to /tmp/hybrid-k2slice (written by tools/make_checkpoint.py --preset k2-slice
if missing). For each batch size B it reports:
  prefill tok/s       B prompts of --prompt-len tokens in one batched prefill;
  decode tok/s        B tokens per step, over --steps steps;
  bound tok/s         B / (bytes that one decode step must read / measured read bandwidth), where
                      the bytes are every accelerator-side weight as held (on a CPU-only machine
                      they are read from RAM too) plus the INT4 routed experts the step touches;
  of bound            decode tok/s / bound tok/s;
  overhead            share of the step time outside the model's forward (engine bookkeeping,
                      sampling, detokenisation);
  overlap             MoE layer time / max(CPU expert time, accelerator time), per MoE layer, summed.
--cpu-weights is LLM's option (default auto: on the CPU, bf16 through hybrid/model/cpu_linear.py's CPULinear,
our Numba matrix-vector kernels at decode; off: torch's Linears); with --logit-error the model loads with
"off" and is swapped after the reference logits are taken; --logit-error then also reports
the logits of a 64-token prompt, every row through the Numba kernels, against the unswapped model
(rel-L2 per position, argmax agreement). --hw adds hybrid plan's prediction (hybrid/speed.py) beside
the measured tok/s, with this run's dtype and CPU weight format, and for decode the distinct experts
this run touched (a random-weight router spreads a batch over fewer experts than uniform routing, the
plan's assumption for a real model; that figure is kept as predicted_decode_tok_s_uniform).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hybrid import LLM, SamplingParams  # noqa: E402
from tools.bench_experts import read_bandwidth  # noqa: E402

DEFAULT_DIR = "/tmp/hybrid-k2slice"


def accelerator_bytes(llm) -> int:
    """Bytes of every weight the accelerator side reads per decode step (all but the embedding table;
    the 8-bit / CPU Linears keep theirs as buffers weight_q, weight_scale)."""
    total = 0
    for name, p in llm.model.named_parameters():
        if name != "model.embed_tokens.weight":
            total += p.numel() * p.element_size()
    for name, b in llm.model.named_buffers():
        if name.endswith(("weight_q", "weight_scale")):
            total += b.numel() * b.element_size()
    return total


def logit_error(llm, fmt: str, n_tokens: int = 64) -> dict:
    """Swap the Linears for CPULinear(fmt) and compare the logits of n_tokens random ids, every row
    through the Numba kernels, with the unswapped model's (the same LLM, scored before the swap)."""
    from hybrid.model import cpu_linear
    ids = torch.randint(0, llm.config.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = llm.score(ids).float()
    info = cpu_linear.swap_cpu_linears(llm.model, fmt)
    saved, cpu_linear.DECODE_ROWS = cpu_linear.DECODE_ROWS, 10 ** 9
    try:
        got = llm.score(ids).float()
    finally:
        cpu_linear.DECODE_ROWS = saved
    rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    return {"format": fmt, "rel_l2_max": rel.max().item(), "rel_l2_mean": rel.mean().item(),
            "argmax_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(), **info}


def expert_bytes_touched(llm, moe_ids: list[torch.Tensor]) -> int:
    """INT4 bytes (packed + bf16 scales) of the distinct experts each MoE layer used in one step."""
    from hybrid.formats import int4_expert_nbytes
    per_expert = int4_expert_nbytes(llm.config.hidden_size, llm.config.moe_intermediate_size)
    return sum(len(ids.unique()) for ids in moe_ids) * per_expert


class ForwardTimer:
    """Wraps the model's forward: total time inside it, and the routed expert ids of the last call."""

    def __init__(self, llm):
        self.llm, self.inside, self.last_ids = llm, 0.0, []
        self.forward = llm.model.forward
        llm.model.forward = self
        for layer in llm.model.model.layers:
            if hasattr(layer.mlp, "gate"):
                gate = layer.mlp.gate
                orig = gate.forward

                def hook(x, _orig=orig):
                    ids, w = _orig(x)
                    self.last_ids.append(ids)
                    return ids, w
                gate.forward = hook

    def __call__(self, *args, **kwargs):
        self.last_ids = []
        t0 = time.perf_counter()
        out = self.forward(*args, **kwargs)
        self.inside += time.perf_counter() - t0
        return out


def run_batch(llm, timer, B: int, prompt_len: int, steps: int) -> dict:
    eng = llm.engine
    g = torch.Generator().manual_seed(B)
    vocab = llm.config.vocab_size - 256
    sp = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    for _ in range(B):
        eng.add_request(torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), sp)
    t0 = time.perf_counter()
    eng.step()                                  # one batched prefill of B x prompt_len tokens
    prefill_s = time.perf_counter() - t0
    stats = llm.model.overlap_stats
    stats.reset()
    stats.enabled = True
    timer.inside = 0.0
    step_times, touched = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        step_times.append(time.perf_counter() - t0)
        touched.append(expert_bytes_touched(llm, timer.last_ids))
    stats.enabled = False
    while eng.has_unfinished():
        eng.step()
    decode_s = sum(step_times)
    ov = stats.summary()
    return {"batch": B, "prefill_tok_s": B * prompt_len / prefill_s, "decode_tok_s": B * steps / decode_s,
            "step_ms": 1e3 * decode_s / steps, "expert_bytes_per_step": sum(touched) / steps,
            "overhead_frac": 1 - timer.inside / decode_s, "overlap_ratio": ov["overlap_ratio"],
            "cpu_experts_ms_per_step": 1e3 * ov["cpu_experts_s"] / steps,
            "accel_ms_per_step": 1e3 * ov["accel_s"] / steps, "wait_ms_per_step": 1e3 * ov["wait_s"] / steps}


def predicted(llm, hw_file: str, batch: int, prompt_len: int, steps: int, cpu_weights: str = "off",
              expert_bytes_per_step: float | None = None) -> dict:
    """hybrid plan's prediction for this machine (no GPU here: everything in RAM), re-run by
    hybrid.speed.predict with this run's dtype and CPU weight format. Decode: with the distinct experts
    per layer this run touched (expert_bytes_per_step), not the plan's uniform-routing figure: the
    synthetic router's random weights send a batch to fewer experts than uniform (the plan models the
    machine; routing is the weights'); the uniform figure is kept as predicted_decode_tok_s_uniform.
    Prefill: the plan's one prompt of batch * prompt_len tokens (the batched prefill's Linears and
    experts see that many rows; its attention, per prompt, is a small part at these lengths)."""
    from hybrid.plan import Hardware, machine_memory, make_plan
    from hybrid.speed import predict
    hw = Hardware.from_dict(json.load(open(hw_file)))
    mem = machine_memory()
    plan = make_plan(llm.config, gpu_mem_bytes=mem["gpu_mem_bytes"], ram_bytes=mem["ram_bytes"],
                     context=prompt_len + steps + 8, batch=batch, hw=hw, prefill_tokens=batch * prompt_len,
                     cpu_weights=cpu_weights)
    from hybrid.plan import KV_BYTES, expert_bytes, linear_shapes
    params = sum(n * k for shapes in linear_shapes(llm.config).values() for n, k in shapes)
    kw = dict(expert_bytes=expert_bytes(llm.config), params=params, kv_bytes=KV_BYTES,
              dtype=str(llm.dtype).replace("torch.", ""), cpu_weights=cpu_weights)
    predict(llm.config, plan, hw, batch * prompt_len, **kw)
    out = {"predicted_decode_tok_s_uniform": plan.predicted_decode_tok_s}
    n_moe = llm.config.num_moe_layers
    if expert_bytes_per_step and n_moe:
        predict(llm.config, plan, hw, batch * prompt_len, experts_hit=expert_bytes_per_step / (
            n_moe * kw["expert_bytes"]), **kw)
    return {**out, "predicted_prefill_tok_s": plan.predicted_prefill_tok_s,
            "predicted_decode_tok_s": plan.predicted_decode_tok_s,
            "predicted_step_ms": plan.prediction["decode_step_ms"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=DEFAULT_DIR)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--expert-backend", default="auto")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="accelerator-side dtype (default: bf16 on a GPU, float32 on the CPU)")
    ap.add_argument("--hw", help="tools/bench_experts.py --json output: adds hybrid plan's predicted tok/s "
                                 "for this machine next to the measured ones")
    ap.add_argument("--cpu-weights", default="auto", choices=["auto", "off", "bf16", "int8"],
                    help="LLM(cpu_weights=): accelerator-side Linears as CPULinear on the CPU (default auto: bf16)")
    ap.add_argument("--logit-error", action="store_true", help="with --cpu-weights: logits vs the unswapped model")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        from hybrid.synthetic import write_checkpoint
        print(f"writing the k2-slice checkpoint to {args.model_dir} ...", file=sys.stderr)
        write_checkpoint(args.model_dir, "k2-slice", progress=True)
    threads = os.cpu_count()
    bw = read_bandwidth(threads)
    swap_later = args.logit_error and args.cpu_weights not in ("off",)
    llm = LLM(args.model_dir, expert_backend=args.expert_backend, max_batch=max(batches), dtype=args.dtype,
              max_context=args.prompt_len + args.steps + 8, progress=not args.json,
              cpu_weights="off" if swap_later else args.cpu_weights)
    err = None
    cpu_weights = llm.cpu_weights
    if swap_later:
        from hybrid.model.cpu_linear import resolve_cpu_weights
        cpu_weights = resolve_cpu_weights(args.cpu_weights, llm.device.type)[0]
        if cpu_weights != "off":
            err = logit_error(llm, cpu_weights)
    # untimed warm-up: numba compiles (or loads from its cache) the kernels on first use
    llm.generate([list(range(1, args.prompt_len + 1))] * 2, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    timer = ForwardTimer(llm)
    acc_bytes = accelerator_bytes(llm)
    rows = []
    for B in batches:
        r = run_batch(llm, timer, B, args.prompt_len, args.steps)
        step_bytes = acc_bytes + r["expert_bytes_per_step"]
        r["bound_tok_s"] = B / (step_bytes / (bw * 1e9))
        r["of_bound"] = r["decode_tok_s"] / r["bound_tok_s"]
        if args.hw:
            r.update(predicted(llm, args.hw, B, args.prompt_len, args.steps, cpu_weights, r["expert_bytes_per_step"]))
        rows.append(r)
    result = {"model_dir": args.model_dir, "read_bandwidth_gbs": bw, "threads": threads,
              "device": str(llm.device), "dtype": str(llm.dtype), "cpu_weights": cpu_weights,
              "read_bandwidth_after_gbs": read_bandwidth(threads), "logit_error": err,
              "accelerator_bytes": acc_bytes, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print(f"read bandwidth {bw:.1f} GB/s before, {result['read_bandwidth_after_gbs']:.1f} after ({threads} "
          f"threads); accelerator side on {llm.device} ({llm.dtype}, CPU weights {cpu_weights}, "
          f"{acc_bytes / 1e9:.2f} GB read per step)")
    if err:
        print(f"logit error of CPU weights {err['format']} vs unswapped ({args.prompt_len} ids): rel-L2 max "
              f"{err['rel_l2_max']:.2e} mean {err['rel_l2_mean']:.2e}, argmax {err['argmax_agreement']:.1%}")
    print(f"{'batch':>5} {'prefill tok/s':>13} {'decode tok/s':>12} {'bound tok/s':>11} {'of bound':>8} "
          f"{'overhead':>8} {'overlap':>7} {'cpu ms':>7} {'accel ms':>8} {'wait ms':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {r['prefill_tok_s']:>13.1f} {r['decode_tok_s']:>12.2f} {r['bound_tok_s']:>11.2f} "
              f"{r['of_bound']:>8.2f} {r['overhead_frac']:>8.1%} {r['overlap_ratio']:>7.2f} "
              f"{r['cpu_experts_ms_per_step']:>7.1f} {r['accel_ms_per_step']:>8.1f} {r['wait_ms_per_step']:>7.1f}")
    if args.hw:
        print("hybrid plan's prediction for this machine (--hw): " + "; ".join(
            f"batch {r['batch']}: prefill {r['predicted_prefill_tok_s']:.1f} (measured {r['prefill_tok_s']:.1f}), "
            f"decode {r['predicted_decode_tok_s']:.2f} (measured {r['decode_tok_s']:.2f}; uniform routing "
            f"{r['predicted_decode_tok_s_uniform']:.2f}) tok/s" for r in rows))
    return result


if __name__ == "__main__":
    main()
