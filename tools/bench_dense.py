"""The accelerator side's Linears on the CPU: GB/s of weights per path and rows, and the int8 dot peak.

    python tools/bench_dense.py [--threads N] [--rows 1,4,16] [--json]
    (also run by tools/bench_experts.py --dense, which adds the figures to its --json output)

Also the decode step's overhead beyond reading weights (step_overhead: per step and per layer, at
batch 1/4/16, on the tiny synthetic preset, in float32 and bfloat16), which hybrid/speed.py adds on a
CPU-only machine.
Paths (hybrid/speed.py dense_path names), each on a working set of K2.6-shaped matrices >= 8x the
last-level cache so every weight comes from DRAM:
  torch_float32   x @ W.T with W float32 (the model in float32, LLM's CPU default);
  torch_bfloat16  x @ W.T, both bf16 (the model in bf16);
  numba_bf16      cpu_kernels.dense.linear_bf16 (CPULinear "bf16"), x fp32;
  numba_int8      cpu_kernels.dense.linear_int8 (CPULinear "int8"), x fp32;
  mla_<path>      the absorbed decode's kv_b_proj halves (W_UK, W_UV at K2.6's 64 heads x 128 x 512) for
                  each of the four: torch's bmm over the views in place (hybrid/model/attention.py), or
                  CPULinear.mla_query + mla_output (cpu_kernels/mla_absorb.py).
GB/s = weight bytes of the path / time (best of rounds); ratio = GB/s / read bandwidth measured right
before and after each path's run (the best of the two). Also: torch's matmul GFLOP/s at 2048^3 in
float32 and bf16 (prefill), and the int8 dot-product peak: a register-only loop of the expert kernels'
instructions (cpu_kernels/moe_int4.py, its ISA: 256-bit vpmaddubsw + vpmaddwd on AVX2, vpdpbusd at 256
or 512 bits with VNNI) on all threads, in GOP/s (one u8 x s8 multiply + one add = 2 ops), the physical
ceiling of the INT4 x INT8 prefill.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cpu_kernels import moe_int4  # noqa: E402
from cpu_kernels.dense import linear_bf16, linear_int8  # noqa: E402

# (out, in) shapes of K2.6's accelerator-side Linears decode reads (q_a, q_b, kv_a, o, shared gate/up/down)
SHAPES = [(1536, 7168), (12288, 1536), (576, 7168), (7168, 8192), (2048, 7168), (2048, 7168), (7168, 2048)]
PATHS = ("torch_float32", "torch_bfloat16", "numba_bf16", "numba_int8")
MLA_PATHS = tuple("mla_" + p for p in PATHS)
MLA_SHAPE = (64, 128, 512, 128)        # K2.6's kv_b_proj: heads, nope, kv_lora_rank, v_head_dim
BYTES = {"torch_float32": 4, "torch_bfloat16": 2, "numba_bf16": 2, "numba_int8": 1}
PEAK_ITERS = 1 << 22
CHAINS = 12          # independent dependency chains: enough to cover vpmaddubsw + vpmaddwd latency
PEAK_LANES = moe_int4.W if moe_int4.VNNI else 8     # s32 lanes of the expert kernels' dot-product registers


def _make_peak():
    L = PEAK_LANES
    _v32i8, _v8i32 = ir.VectorType(ir.IntType(8), 4 * L), ir.VectorType(ir.IntType(32), L)

    @intrinsic
    def int8_loop(typingctx, n, seed):
        """n iterations of CHAINS independent vpmaddubsw + vpmaddwd + vpaddd chains, each fed its own
        accumulator's bytes (a loop-carried dependency, so nothing can be hoisted); returns a lane sum."""
        sig = types.int64(types.int64, types.int64)

        def codegen(context, builder, signature, args):
            n, seed = args
            i64 = ir.IntType(64)
            s8 = builder.trunc(seed, ir.IntType(8))
            b = builder.insert_element(ir.Constant(_v32i8, None), s8, ir.Constant(ir.IntType(32), 0))
            b = builder.shuffle_vector(b, b, ir.Constant(ir.VectorType(ir.IntType(32), 4 * L), [0] * (4 * L)))
            entry = builder.block
            head = builder.append_basic_block("pk.head")
            body = builder.append_basic_block("pk.body")
            done = builder.append_basic_block("pk.done")
            builder.branch(head)
            builder.position_at_end(head)
            i = builder.phi(i64)
            i.add_incoming(ir.Constant(i64, 0), entry)
            accs = [builder.phi(_v8i32) for _ in range(CHAINS)]
            for j, a in enumerate(accs):
                a.add_incoming(ir.Constant(_v8i32, [j + 1] * L), entry)
            builder.cbranch(builder.icmp_signed("<", i, n), body, done)
            builder.position_at_end(body)
            if moe_int4.VNNI:     # one vpdpbusd per step (256- or 512-bit, as the kernels use)
                new = [moe_int4._dpbusd(builder, a, builder.bitcast(a, _v32i8), b) for a in accs]
            else:
                new = [builder.add(a, moe_int4._pairsum_i32(builder, moe_int4._maddubs(
                    builder, builder.bitcast(a, _v32i8), b))) for a in accs]
            nxt = builder.add(i, ir.Constant(i64, 1))
            end = builder.block
            builder.branch(head)
            i.add_incoming(nxt, end)
            for a, v in zip(accs, new):
                a.add_incoming(v, end)
            builder.position_at_end(done)
            tot = accs[0]
            for a in accs[1:]:
                tot = builder.add(tot, a)
            lane = builder.extract_element(tot, ir.Constant(ir.IntType(32), 0))
            return builder.sext(lane, i64)

        return sig, codegen

    @njit(parallel=True, nogil=True)
    def run(threads, n):
        out = np.zeros(threads, np.int64)
        for t in prange(threads):
            out[t] = int8_loop(n, t)
        return out.sum()

    return run


def int8_dot_peak(threads: int, rounds: int = 3) -> float:
    """GOP/s of the expert kernels' int8 dot instructions on `threads` threads: vpmaddubsw + vpmaddwd
    (AVX2), or vpdpbusd at their register width (VNNI ISAs); CHAINS x (4 x lanes) byte pairs x 2 ops."""
    run = _make_peak()
    numba.set_num_threads(threads)
    run(threads, 1000)
    best = min(_timeit(lambda: run(threads, PEAK_ITERS)) for _ in range(rounds))
    return threads * PEAK_ITERS * CHAINS * 4 * PEAK_LANES * 2 / best / 1e9


def _timeit(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_gflops(threads: int, dtype: torch.dtype, n: int = 2048, rounds: int = 3) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    return 2 * n ** 3 / min(_timeit(lambda: torch.matmul(a, b)) for _ in range(rounds)) / 1e9


def _weights(path: str, copies: int):
    """`copies` copies of SHAPES (of MLA_SHAPE for mla_ paths) in the path's storage: a list of
    (callable(x) -> y, bytes, k) with x [T, k]."""
    if path.startswith("mla_"):
        return [_mla_weights(path[4:], c) for c in range(copies)]
    out = []
    for c in range(copies):
        for n, k in SHAPES:
            w = torch.randn(n, k, generator=torch.Generator().manual_seed(c * 31 + n + k)) * 0.02
            if path == "torch_float32":
                out.append((lambda x, w=w.contiguous(): x @ w.T, w.numel() * 4, k))
            elif path == "torch_bfloat16":
                out.append((lambda x, w=w.to(torch.bfloat16): x.to(torch.bfloat16) @ w.T, w.numel() * 2, k))
            elif path == "numba_bf16":
                wb = w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

                def f(x, wb=wb):
                    y = np.empty((x.shape[0], wb.shape[0]), np.float32)
                    linear_bf16(wb, x.numpy(), y)
                    return y
                out.append((f, wb.nbytes, k))
            else:
                s = (w.abs().amax(1) / 127).float()
                q = (w / s[:, None]).round().clamp(-127, 127).to(torch.int8).numpy()

                def f(x, q=q, s=s.numpy()):
                    y = np.empty((x.shape[0], q.shape[0]), np.float32)
                    linear_int8(q, s, x.numpy(), y)
                    return y
                out.append((f, q.nbytes + s.nbytes, k))
    return out


def _mla_weights(path: str, c: int):
    """One kv_b_proj at MLA_SHAPE as the absorbed decode uses it on `path`: x [T, H * nope] is q_nope;
    o_lat [T, H, R] is made once per T (the attention over the cache is not part of this)."""
    from hybrid.model.cpu_linear import CPULinear
    H, nope, R, V = MLA_SHAPE
    lin = torch.nn.Linear(R, H * (nope + V), bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(H * (nope + V), R, generator=torch.Generator().manual_seed(c)) * 0.02)
    o_lat = {}

    def lat(T, dtype):
        if T not in o_lat:
            o_lat[T] = torch.randn(T, H, R).to(dtype)
        return o_lat[T]
    if path.startswith("torch_"):
        dtype = getattr(torch, path[6:])
        w = lin.weight.detach().to(dtype)
        w_uk, w_uv = w[:H * nope].view(H, nope, R), w[H * nope:].view(H, V, R)

        def f(x):
            q = x.to(dtype).view(-1, H, nope)
            torch.matmul(q.transpose(0, 1), w_uk)
            return torch.matmul(w_uv, lat(x.shape[0], dtype).permute(1, 2, 0))
        return f, w.numel() * w.element_size(), H * nope
    m = CPULinear.from_linear(lin, path[6:])

    def g(x):
        m.mla_query(x.view(-1, H, nope))
        return m.mla_output(lat(x.shape[0], torch.float32), nope, torch.float32)
    return g, m.nbytes, H * nope


def bench_path(path: str, threads: int, rows: list[int], llc: int, rounds: int = 3) -> dict:
    """{rows: GB/s} of one path over a working set >= 8x the LLC (in that path's bytes)."""
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    base = path[4:] if path.startswith("mla_") else path
    if path.startswith("mla_"):
        H, nope, R, V = MLA_SHAPE
        one = H * (nope + V) * R * BYTES[base]
    else:
        one = sum(n * k for n, k in SHAPES) * BYTES[base]
    mats = _weights(path, max(1, -(-8 * llc // one)))
    total = sum(b for _, b, _ in mats)
    res = {}
    for T in rows:
        xs = {k: torch.randn(T, k) for k in {k for _, _, k in mats}}
        for f, _, k in mats[:len(SHAPES)]:
            f(xs[k])                                       # compile / warm up
        best = min(_timeit(lambda: [f(xs[k]) for f, _, k in mats]) for _ in range(rounds))
        res[T] = total / best / 1e9
    return res


def step_overhead(threads: int, batches=(1, 4, 16), layers=(2, 6), steps: int = 12, rounds: int = 3,
                  dtype: str = "float32") -> dict:
    """Time of a decode step that is not weight reading: torch/numba call overheads, attention on a short
    cache, sampling, engine bookkeeping. Measured on the `tiny` synthetic preset (the same calls per layer
    as K2.6, negligible bytes) with the LLM's defaults on the CPU in `dtype`, at two layer counts:
        step_ms(B, L) = per_step_ms[B] + L * per_layer_ms[B]   (a fit through the two points).
    Decode time = generate(1 + steps tokens) - generate(1 token) (prefill and the first token cancel)."""
    import tempfile

    from hybrid import LLM, SamplingParams
    from hybrid.synthetic import write_checkpoint
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    ms = {}
    for L in layers:
        d = os.path.join(tempfile.gettempdir(), f"hybrid-overhead-tiny-{L}")
        if not os.path.exists(os.path.join(d, "config.json")):
            write_checkpoint(d, "tiny", num_hidden_layers=L, tokenizer=False)
        llm = LLM(d, device="cpu", max_batch=max(batches), max_context=128, progress=False, check_memory=False,
                  dtype=dtype)
        for B in batches:
            prompts = [[5 + b, 9, 2, 7, 11, 3] for b in range(B)]

            def gen(n):
                return llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            gen(1 + steps)                                    # compile / warm up
            t1 = min(_timeit(lambda: gen(1)) for _ in range(rounds))
            tn = min(_timeit(lambda: gen(1 + steps)) for _ in range(rounds))
            ms[B, L] = 1e3 * max(tn - t1, 0.0) / steps
    (l0, l1) = layers
    per_layer = {B: max(0.0, (ms[B, l1] - ms[B, l0]) / (l1 - l0)) for B in batches}
    per_step = {B: max(0.0, ms[B, l0] - l0 * per_layer[B]) for B in batches}
    return {"per_layer_ms": per_layer, "per_step_ms": per_step,
            "step_ms": {f"B{B}_L{L}": v for (B, L), v in ms.items()}}


def run(threads: int, rows: list[int], llc: int, read_bandwidth, say=print) -> dict:
    """All paths with the read bandwidth right before and after each; the int8 and matmul peaks."""
    out = {"dense_gbs": {}, "dense_ratio": {}, "dense_bw_around": {}}
    for path in PATHS + MLA_PATHS:
        before = read_bandwidth(threads, reps=3)
        r = bench_path(path, threads, rows, llc)
        after = read_bandwidth(threads, reps=3)
        bw = max(before, after)
        out["dense_gbs"][path] = r
        out["dense_ratio"][path] = {T: g / bw for T, g in r.items()}
        out["dense_bw_around"][path] = (before, after)
        say(f"  {path:19s} " + "  ".join(f"{T:2d} rows {g:5.1f} GB/s ({g / bw:.2f})" for T, g in r.items())
            + f"   [read bw before {before:.1f} / after {after:.1f} GB/s]")
    out["matmul_gflops"] = {"float32": matmul_gflops(threads, torch.float32),
                            "bfloat16": matmul_gflops(threads, torch.bfloat16)}
    out["int8_dot_peak_gops"] = int8_dot_peak(threads)
    out["step_overhead"] = {dt: step_overhead(threads, dtype=dt) for dt in ("float32", "bfloat16")}
    for dt, o in out["step_overhead"].items():
        say(f"  decode step overhead, {dt} (tiny preset, no weight bytes): " + ", ".join(
            f"batch {B}: {o['per_step_ms'][B]:.2f} ms + {o['per_layer_ms'][B]:.2f} ms/layer" for B in o["per_layer_ms"]))
    say(f"  torch matmul 2048^3: float32 {out['matmul_gflops']['float32']:.0f}, bfloat16 "
        f"{out['matmul_gflops']['bfloat16']:.0f} GFLOP/s; int8 dot peak (vpmaddubsw+vpmaddwd, 256-bit): "
        f"{out['int8_dot_peak_gops']:.0f} GOP/s")
    return out


def main(argv=None):
    from tools.bench_experts import llc_bytes, read_bandwidth
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    rows = [int(r) for r in args.rows.split(",")]
    bw = read_bandwidth(args.threads)
    say(f"read bandwidth {bw:.1f} GB/s ({args.threads} threads); dense Linears, GB/s of weights (ratio to bw):")
    res = {"read_bandwidth_gbs": bw, "threads": args.threads, **run(args.threads, rows, llc_bytes(), read_bandwidth, say)}
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
