"""Benchmark the CPU routed-expert kernels against the machine's own limits, in one run.

    python tools/bench_experts.py [--quick] [--json] [--threads N] [--act-format int8|int8x2]
                                  [--prefill-experts E] [--dense | --dense-only]
                                  [--llamacpp [--llamacpp-rounds R] [--llamacpp-experts E]]
                                  [--isas avx512vnni512,avx512vnni,avx2 [--isa-rounds R]]

Measures (1) read bandwidth: a STREAM-like parallel sum over 1 GiB (Numba, all threads, best of
several runs), (2) the fp32 FMA peak: torch.matmul 2048^3 (OpenBLAS/oneDNN, all threads) and (3) the
int8 dot-product peak (bench_dense.int8_dot_peak: vpmaddubsw + vpmaddwd, GOP/s), then
  decode: batch-1, top-8, K2.6 expert shape (7168 x 2048), consecutive tokens cycle over a working
          set of experts >= 8x the last-level cache so every weight comes from DRAM; GB/s of INT4
          weights+scales read and the ratio to the read bandwidth, for 1..N threads;
  prefill: 64/512/2048 tokens, top-8 over the experts (uniform and skewed routing); GFLOP/s
          (6*D*I per token and expert) and the ratios to the fp32 peak and to the int8 dot peak;
  kt:     the same decode and prefill (T=512) on kt-kernel's RAWINT4 kernels, where it is installed;
  --llamacpp: llama.cpp's CPU MoE graph (tools/bench_llamacpp.py: ggml built from the llama-cpp-python
          sdist; q4_0 / q4_K, plain or repacked) on the same shapes and routing, rounds of ours then
          theirs back to back (best of the rounds each): decode GB/s, prefill T=512/2048 on
          --llamacpp-experts experts (both sides; 128 by default so both fit in RAM), the ratios
          decode_vs_llamacpp (tokens/s ours / theirs), prefill_{512,2048}_vs_llamacpp_best.
The read bandwidth is measured again after each kernel run (other processes on a small machine
change it): the decode ratio uses the best figure seen at that thread count, and the figures
before and after each run are printed, so a disturbed run shows.
Weights are random nibbles (speed does not depend on their values), loaded with
CPUExperts.set_expert (numba) / KTExperts.load_expert (kt, the int32 words as stored); an
expert's bytes are hybrid.formats.int4_expert_nbytes.
--dense adds tools/bench_dense.py: the accelerator side's Linears on the CPU per path (torch float32 /
bf16, our Numba bf16 / int8 kernels) at 1, 4 and 16 rows, torch's matmul GFLOP/s, and the int8
dot-product peak (a vpmaddubsw + vpmaddwd loop) beside the fp32 peak; --dense-only runs just that
(with the read bandwidth and the fp32 peak). hybrid/speed.py reads dense_gbs / matmul_gflops.
--json prints one object with read_bandwidth_gbs, fma_peak_gflops, decode_gbs, decode_ratio,
prefill_512_gflops, prefill_512_ratio, prefill_512_int8_ratio, int8_dot_peak_gops, threads,
read_bandwidth_after_gbs (+ kt_* where kt-kernel runs, llamacpp_* and *_vs_llamacpp* with --llamacpp).
--isas A,B,...: the expert kernels under each instruction set (HYBRID_CPU_ISA, cpu_kernels/isa.py), one
subprocess per set, the sets alternating over --isa-rounds rounds (best of the rounds each), side by side:
decode GB/s and its ratio to the bandwidth measured in that subprocess, prefill GFLOP/s and the ratio to
that set's int8 dot peak, and each figure over the first set's (e.g. the AVX2 path forced beside AVX-512).
"""
import argparse
import json
import os
import sys
import time

import numba
import numpy as np
import torch
from numba import njit, prange

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cpu_kernels import CPUExperts, KTExperts, kt_available  # noqa: E402
from hybrid.formats import int4_expert_nbytes, pack_int4  # noqa: E402

D, I, TOPK = 7168, 2048, 8


def llc_bytes() -> int:
    best = 32 << 20
    for idx in range(8):
        path = f"/sys/devices/system/cpu/cpu0/cache/index{idx}/size"
        if os.path.exists(path):
            txt = open(path).read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(txt[-1], 1)
            best = max(best, int(txt.rstrip("KM")) * mult)
    return best


@njit(nogil=True, cache=True)
def _sum(a):
    s = np.uint64(0)
    for i in range(a.shape[0]):  # 0..n: no negative-index wraparound check, so LLVM vectorizes
        s += a[i]
    return s


@njit(parallel=True, nogil=True, cache=True)
def _read_sum(a):
    nchunk = 64
    per = a.shape[0] // nchunk
    parts = np.zeros(nchunk, np.uint64)
    for c in prange(nchunk):
        parts[c] = _sum(a[c * per:(c + 1) * per])
    return parts.sum()


def read_bandwidth(threads, nbytes=1 << 30, reps=5):
    a = np.ones(nbytes // 8, np.uint64)
    numba.set_num_threads(threads)
    _read_sum(a)
    best = min(_timeit(lambda: _read_sum(a)) for _ in range(reps))
    return nbytes / best / 1e9


def fma_peak(threads, n=2048, reps=5):
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = min(_timeit(lambda: torch.matmul(a, b)) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _timeit(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _random_expert(seed=0):
    """One expert's random nibbles (uint8, u = q + 8) and bf16 scales 0.01: gate/up [I, D], down [D, I]."""
    rng = np.random.default_rng(seed)
    parts = {}
    for n, k in ((I, D), (D, I)):
        parts[n, k] = (rng.integers(0, 16, (n, k), dtype=np.uint8),
                       torch.full((n, k // 32), 0.01, dtype=torch.bfloat16))
    return parts[I, D], parts[D, I]


def make_experts(num_experts, threads, act_format="int8"):
    """numba experts (cpu_kernels.CPUExperts) with random weights; each expert its own copy in RAM."""
    ex = CPUExperts(num_experts, D, I, num_threads=threads, act_format=act_format)
    (gu, gs), (du, ds) = _random_expert()
    for e in range(num_experts):
        ex.set_expert(e, gu, gs, gu, gs, du, ds)
    return ex


def make_kt_experts(num_experts, threads):
    """kt-kernel experts (cpu_kernels.KTExperts) loaded with the int32 words as a checkpoint stores them."""
    ex = KTExperts(num_experts, D, I, num_threads=threads)
    (gu, gs), (du, ds) = _random_expert()
    g = pack_int4(torch.from_numpy(gu.astype(np.int8) - 8)), gs
    d = pack_int4(torch.from_numpy(du.astype(np.int8) - 8)), ds
    for e in range(num_experts):  # KTExperts.load_expert copies: each expert its own bytes
        ex.load_expert(e, *g, *g, *d)
    return ex


def expert_bytes():
    return int4_expert_nbytes(D, I)


def bench_decode(ex, threads, steps, windows=3):
    """Tokens cycle over all experts, 8 distinct per token; GB/s of weights read.

    Best of ``windows`` runs of ``steps`` tokens (other processes on a small machine steal
    cores now and then; the best window is the kernel's own speed)."""
    ex.num_threads = threads  # kt: its pool is built with the threads of its constructor
    E = ex.E
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, D)).astype(np.float32)
    w = np.full((1, TOPK), 1.0 / TOPK, np.float32)
    ids = [np.array([[(TOPK * s + k) % E for k in range(TOPK)]]) for s in range(steps + 2)]
    ex.forward(x, ids[0], w)  # warm-up (compilation, page faults)
    best = float("inf")
    for _ in range(windows):
        t0 = time.perf_counter()
        for s in range(steps):
            ex.forward(x, ids[s + 2], w)
        best = min(best, time.perf_counter() - t0)
    return steps * TOPK * expert_bytes() / best / 1e9


def routing(T, E, skew, rng):
    if skew:  # Zipf-like popularity over a random expert order, 8 distinct per token (Gumbel top-k)
        logp = -1.0 * np.log(1 + rng.permutation(E))
        keys = logp[None, :] + rng.gumbel(size=(T, E))
    else:
        keys = rng.random((T, E))
    return np.argsort(-keys, axis=1)[:, :TOPK]


def bench_prefill(ex, T, skew, reps, warm=True):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((T, D)).astype(np.float32)
    ids = routing(T, ex.E, skew, rng)
    w = np.full((T, TOPK), 1.0 / TOPK, np.float32)
    if warm:   # compilation, first touch of the buffers
        ex.forward(x, ids, w)
    best = min(_timeit(lambda: ex.forward(x, ids, w)) for _ in range(reps))
    return 6.0 * D * I * T * TOPK / best / 1e9


def bench_kt(threads, decode_experts, prefill_experts, quick=False, say=print, measured=None):
    """kt-kernel figures: the same shapes, routing and timing method as the numba runs above.
    measured(run, threads, fn) -> (fn(), note) wraps each run (main's read-bandwidth check)."""
    from cpu_kernels.kt_backend import _ext, _rawint4_class
    measured = measured or (lambda run, t, fn: (fn(), ""))
    os.environ.setdefault("KT_RAWINT4_BACKEND", "avx2")
    res = {}
    ex = make_kt_experts(decode_experts, threads)
    t0 = time.perf_counter()
    dec, note = measured("kt_decode", threads, lambda: bench_decode(ex, threads, steps=10 if quick else 40))
    res["kt_decode_gbs"] = dec
    say(f"\nkt-kernel ({_rawint4_class(_ext()).__name__}): decode {dec:.2f} GB/s "
        f"({time.perf_counter() - t0:.0f} s; {note})")
    ex = None                  # free the decode experts before the prefill set is made
    ex = make_kt_experts(prefill_experts, threads)
    g, note = measured("kt_prefill_512", threads, lambda: bench_prefill(ex, 512, False, reps=1))
    res["kt_prefill_512_gflops"] = g
    say(f"kt-kernel: prefill T=512 uniform {g:.1f} GFLOP/s ({note})")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run: fewer steps/experts/sizes")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    ap.add_argument("--act-format", default="int8", help="numba activation format: int8 or int8x2")
    ap.add_argument("--prefill-experts", type=int, default=None,
                    help="experts in the prefill runs (default 384, 64 with --quick)")
    ap.add_argument("--dense", action="store_true", help="also the dense Linear paths + int8 peak (bench_dense.py)")
    ap.add_argument("--dense-only", action="store_true", help="only those (no expert kernels)")
    ap.add_argument("--llamacpp", action="store_true", help="also llama.cpp's CPU MoE kernels, back to back")
    ap.add_argument("--llamacpp-rounds", type=int, default=None, help="rounds of ours/theirs (3, 1 with --quick)")
    ap.add_argument("--llamacpp-experts", type=int, default=None, help="prefill experts there (128, 64 --quick)")
    ap.add_argument("--isas", default=None, help="comma list of HYBRID_CPU_ISA values to compare, one subprocess each")
    ap.add_argument("--isa-rounds", type=int, default=2, help="alternating rounds of --isas (best of them each)")
    args = ap.parse_args(argv)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if args.isas:
        return compare_isas(args, say=say)
    N = args.threads
    json_out = sys.stdout
    if args.json:   # native libraries (kt-kernel) print to fd 1: send that to stderr, keep stdout for the JSON
        sys.stdout.flush()
        json_out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
    from cpu_kernels.isa import ISA, FORCED
    res = {"threads": N, "cpu": _cpu_name(), "act_format": args.act_format, "isa": ISA, "isa_forced": FORCED}
    say(f"expert kernels' instruction set: {ISA} ({'forced by HYBRID_CPU_ISA' if FORCED else 'picked from the CPU'})")

    bw = {t: read_bandwidth(t, reps=3 if args.quick else 5) for t in range(1, N + 1)}
    res["read_bandwidth_gbs"] = bw[N]
    res["read_bandwidth_gbs_by_threads"] = bw
    res["fma_peak_gflops"] = fma_peak(N, reps=3 if args.quick else 5)
    say("read bandwidth (GB/s, best of runs): " + ", ".join(f"{t} thr {v:.1f}" for t, v in bw.items()))
    from tools import bench_dense
    res["int8_dot_peak_gops"] = bench_dense.int8_dot_peak(N)
    say(f"fp32 FMA peak (torch.matmul 2048^3, {N} thr): {res['fma_peak_gflops']:.0f} GFLOP/s; int8 dot peak "
        f"(vpmaddubsw+vpmaddwd): {res['int8_dot_peak_gops']:.0f} GOP/s")
    around = res["read_bandwidth_around_runs"] = {}   # run -> (GB/s before, GB/s after)
    if args.dense or args.dense_only:
        say("\ndense Linears on the CPU (tools/bench_dense.py), GB/s of weights (ratio to read bw):")
        res.update(bench_dense.run(N, [1, 4, 16], llc_bytes(), read_bandwidth, say))
        if args.dense_only:
            res["read_bandwidth_after_gbs"] = read_bandwidth(N, reps=3)
            if args.json:
                print(json.dumps(res, default=float), file=json_out, flush=True)
            return res

    def measured(run, t, fn):
        """fn() with the read bandwidth (t threads) measured right before and right after it."""
        before = read_bandwidth(t, reps=3)
        out = fn()
        after = read_bandwidth(t, reps=3)
        around[run] = (before, after)
        bw[t] = max(bw[t], before, after)
        if "prefill" in run and t == N:   # the int8 ceiling again right after (a register-only loop, ~0.1 s)
            res["int8_dot_peak_gops"] = max(res["int8_dot_peak_gops"], bench_dense.int8_dot_peak(t))
        return out, f"read bw before {before:.1f} / after {after:.1f} GB/s"

    llc = llc_bytes()
    e_dec = max(TOPK * 2, -(-8 * llc // expert_bytes()) + 1)
    ex = make_experts(e_dec, N, args.act_format)
    say(f"\ndecode: K2.6 experts {D}x{I}, {e_dec} experts = {e_dec * expert_bytes() / 1e9:.2f} GB "
        f"(>= 8x LLC {llc >> 20} MiB), top-{TOPK}, act_format {args.act_format}")
    dec = {}
    for t in range(1, N + 1):
        dec[t], note = measured(f"decode_{t}thr", t, lambda: bench_decode(
            ex, t, steps=10 if args.quick else 25, windows=2 if args.quick else 4))
        say(f"  {t} thr: {dec[t]:6.2f} GB/s  ratio to read bw({t} thr) {dec[t] / bw[t]:.2f}  "
            f"{1e3 * TOPK * expert_bytes() / dec[t] / 1e9:.2f} ms/token/layer  ({note})")
    say("read bandwidth, best seen: " + ", ".join(f"{t} thr {v:.1f}" for t, v in bw.items()))
    res["read_bandwidth_gbs"] = bw[N]
    res["decode_gbs"] = dec[N]
    res["decode_ratio"] = dec[N] / bw[N]
    res["decode_gbs_by_threads"] = dec
    ex = None                  # free the decode experts before the prefill set is made

    e_pre = args.prefill_experts or (64 if args.quick else 384)
    fit = int(0.6 * _mem_available() // expert_bytes())
    if e_pre > fit:
        say(f"\nonly {_mem_available() / 1e9:.1f} GB available: prefill uses {fit} experts, not {e_pre}")
        e_pre = fit
    sizes = (64, 512) if args.quick else (64, 512, 2048)
    ex = make_experts(e_pre, N, args.act_format)
    say(f"\nprefill: {e_pre} experts ({e_pre * expert_bytes() / 1e9:.1f} GB), top-{TOPK}, {N} thr; "
        f"GFLOP/s = 6*D*I*T*8 / time")
    for T in sizes:
        for skew in (False, True):
            name = f"prefill_{T}{'_skewed' if skew else ''}"
            g, note = measured(name, N, lambda: bench_prefill(ex, T, skew, reps=1 if T >= 2048 or args.quick else 2))
            res[name + "_gflops"] = g
            res[name + "_ratio"] = g / res["fma_peak_gflops"]
            res[name + "_int8_ratio"] = g / res["int8_dot_peak_gops"]
            say(f"  T={T:5d} {'skewed ' if skew else 'uniform'}: {g:7.1f} GFLOP/s  "
                f"ratio to fp32 peak {g / res['fma_peak_gflops']:.2f}, to int8 peak "
                f"{g / res['int8_dot_peak_gops']:.2f}  ({note})")
    ex = None                  # free the decode experts before the prefill set is made
    res["prefill_experts"] = e_pre

    if kt_available():
        res.update(bench_kt(N, e_dec, e_pre, quick=args.quick, say=say, measured=measured))
        if "kt_decode_gbs" in res:
            res["decode_vs_kt"] = res["decode_gbs"] / res["kt_decode_gbs"]
        if "kt_prefill_512_gflops" in res:
            res["prefill_512_vs_kt"] = res["prefill_512_gflops"] / res["kt_prefill_512_gflops"]
    else:
        say("\nkt-kernel not installed: no kt figures")
    if args.llamacpp:
        from tools import bench_llamacpp
        e_cmp = min(fit // 2, args.llamacpp_experts or (64 if args.quick else 128))   # both sides in RAM
        res.update(bench_llamacpp.compare(
            sys.modules[__name__], N, e_dec, e_cmp, measured, say, sizes=(512,) if args.quick else (512, 2048),
            rounds=args.llamacpp_rounds or (1 if args.quick else 3), decode_steps=10 if args.quick else 25,
            decode_windows=2 if args.quick else 4))
    for k in [k for k in res if k.endswith("_gflops") and "prefill" in k and "llamacpp_prefill" not in k]:
        res[k.replace("_gflops", "_int8_ratio")] = res[k] / res["int8_dot_peak_gops"]   # the best peak seen
    say(f"\nint8 dot peak, best seen ({N} thr): {res['int8_dot_peak_gops']:.0f} GOP/s; prefill / int8 peak: "
        + ", ".join(f"{k[:-len('_int8_ratio')]} {v:.2f}" for k, v in res.items() if k.endswith("_int8_ratio")))
    if args.llamacpp:
        say("llama.cpp: decode_vs_llamacpp {:.2f} ({} best)".format(
            res["decode_vs_llamacpp"], res["llamacpp_decode_best_variant"]) + "".join(
            f"; prefill_{T}_vs_llamacpp_best {res[f'prefill_{T}_vs_llamacpp_best']:.2f} "
            f"({res[f'llamacpp_prefill_{T}_best_variant']}), ours/int8 peak "
            f"{res[f'llamacpp_cmp_ours_prefill_{T}_int8_ratio']:.2f}"
            for T in (512, 2048) if f"prefill_{T}_vs_llamacpp_best" in res))
    res["read_bandwidth_after_gbs"] = read_bandwidth(N, reps=3)
    say(f"\nread bandwidth at the end ({N} thr): {res['read_bandwidth_after_gbs']:.1f} GB/s")
    if args.json:
        print(json.dumps(res, default=float), file=json_out, flush=True)
    return res


ISA_KEYS = ("decode_gbs", "decode_ratio", "prefill_512_gflops", "prefill_2048_gflops", "prefill_512_int8_ratio",
            "prefill_2048_int8_ratio", "int8_dot_peak_gops", "read_bandwidth_gbs")


def compare_isas(args, say=print, run_one=None) -> dict:
    """--isas: this script under each HYBRID_CPU_ISA in turn (`run_one(isa, argv) -> its --json dict`,
    default a subprocess), best of --isa-rounds rounds per figure, ratios to the first set."""
    from cpu_kernels import isa as isa_mod
    names = [n.strip().lower() for n in args.isas.split(",") if n.strip()]
    for n in names:
        lack = isa_mod.missing(n)           # ValueError for an unknown name
        if lack:
            raise SystemExit(f"--isas: this CPU lacks {', '.join(lack)} for {n}; it can run "
                             f"{', '.join(isa_mod.runnable())}")
    argv = ["--json", "--threads", str(args.threads), "--act-format", args.act_format]
    argv += ["--quick"] if args.quick else []
    argv += ["--prefill-experts", str(args.prefill_experts)] if args.prefill_experts else []
    run_one = run_one or _run_isa
    best = {n: {} for n in names}
    for r in range(args.isa_rounds):
        for n in names:
            out = run_one(n, argv)
            assert out.get("isa") == n, (n, out.get("isa"))
            for k in ISA_KEYS:
                if k in out:
                    best[n][k] = max(best[n].get(k, 0.0), float(out[k]))
            say(f"round {r + 1}, {n}: " + ", ".join(f"{k} {best[n][k]:.2f}" for k in ISA_KEYS if k in out))
    base = names[0]
    res = {"isa_compare": best, "isa_rounds": args.isa_rounds}
    for n in names[1:]:
        for k in ISA_KEYS:
            if k in best[n] and best[base].get(k):
                res[f"{n}_vs_{base}_{k}"] = best[n][k] / best[base][k]
    say("\ninstruction sets, best of rounds:")
    for n in names:
        say(f"  {n:14s} " + "  ".join(f"{k} {v:8.2f}" for k, v in best[n].items()))
    if args.json:
        print(json.dumps(res, default=float), flush=True)
    return res


def _run_isa(isa: str, argv: list) -> dict:
    import subprocess
    env = dict(os.environ, HYBRID_CPU_ISA=isa)
    r = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench_experts under HYBRID_CPU_ISA={isa} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 40


def _cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
