"""llama.cpp's CPU MoE kernels as a peer of ours: build, run, and compare back to back.

Used by tools/bench_experts.py --llamacpp; checked by tests/test_bench_llamacpp.py (the C program's MoE
output against a numpy reference on tiny shapes). Steps:
  build:   the llama-cpp-python sdist (PyPI, version VERSION) holds llama.cpp under vendor/llama.cpp; only
           its ggml folder is built (CPU backend, GGML_NATIVE=ON, Release, shared libraries) into
           ~/.cache/hybrid/llamacpp-<version>-<hash of the CPU flags>, reused later, and
           tools/llamacpp_moe.c is compiled against it (one binary per source hash).
  run:     the C program builds llama.cpp's MoE FFN graph (ggml_mul_mat_id x 3 as build_moe_ffn in
           src/llama-graph.cpp builds it for DeepSeek-V3) and prints JSON timings; VARIANTS = q4_0 / q4_K,
           each in a plain CPU buffer or the CPU backend's CPU_REPACK extra buffer type (interleaved layouts).
  compare: rounds of ours then each llama.cpp variant, every run wrapped in bench_experts' measured();
           the best of the rounds per side and the ratios ours/theirs. Prefill rounds after the first run
           only the variants within KEEP of the best variant at some T (the full run stays short).
Our expert format (int4 groups of 32, bf16 scale, value = (u - 8) * scale) is q4_0 with an fp16 scale:
to_q4_0() writes those blocks, so the q4_0 variant can carry the very same values (used by the test).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np

VERSION = "0.3.36"
VARIANTS = (("q4_0", 0), ("q4_0", 1), ("q4_K", 0), ("q4_K", 1))   # (ggml type, repacked)
KEEP = 0.75
SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llamacpp_moe.c")


def cache_dir() -> str:
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    tag = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    root = os.environ.get("HYBRID_CACHE", os.path.expanduser("~/.cache/hybrid"))
    return os.path.join(root, f"llamacpp-{VERSION}-{tag}")


def _ggml_dir(cache):
    return os.path.join(cache, f"llama_cpp_python-{VERSION}", "vendor", "llama.cpp", "ggml")


def _libdir(cache):
    return os.path.join(cache, "build", "src")


def binary_path(cache=None) -> str:
    cache = cache or cache_dir()
    tag = hashlib.sha256(open(SRC, "rb").read()).hexdigest()[:10]
    return os.path.join(cache, f"llamacpp_moe-{tag}")


def library_built(cache=None) -> bool:
    return os.path.exists(os.path.join(_libdir(cache or cache_dir()), "libggml-cpu.so"))


def fetch_sdist(dest: str) -> str:
    """The sdist tarball in dest: pip download, or (pip builds metadata, which needs scikit-build-core, and
    fails without it) the sdist URL from PyPI's project JSON (its per-version JSON may answer 404)."""
    name = f"llama_cpp_python-{VERSION}.tar.gz"
    path = os.path.join(dest, name)
    if os.path.exists(path):
        return path
    subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps",
                    "--no-binary", ":all:", "--no-build-isolation", "-d", dest],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if not os.path.exists(path):
        index = "https://pypi.org/pypi/llama-cpp-python/json"
        meta = json.load(urllib.request.urlopen(index))
        url = next(u["url"] for u in meta["releases"][VERSION] if u["packagetype"] == "sdist")
        url = urllib.parse.urljoin(index, url)   # a mirror may answer relative URLs
        with urllib.request.urlopen(url) as r, open(path + ".part", "wb") as f:
            shutil.copyfileobj(r, f)
        os.replace(path + ".part", path)
    return path


def build(say=print, cache=None) -> str:
    """Build ggml (once per cache dir) and the C program (once per source); returns the binary's path."""
    cache = cache or cache_dir()
    os.makedirs(cache, exist_ok=True)
    t0 = time.perf_counter()
    if not library_built(cache):
        src = _ggml_dir(cache)
        if not os.path.isdir(src):
            tar = fetch_sdist(cache)
            prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/ggml/"
            with tarfile.open(tar) as tf:
                tf.extractall(cache, members=[m for m in tf.getmembers() if m.name.startswith(prefix)],
                              filter="data")
        pc = os.path.join(src, "ggml.pc.in")   # the sdist leaves it out; CMake's configure_file needs it
        if not os.path.exists(pc):
            open(pc, "w").close()
        say(f"building llama.cpp's ggml {VERSION} (CPU, native) in {cache} ...")
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", src, "-B", os.path.join(cache, "build"), *gen, "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=ON", "-DGGML_CPU=ON", "-DBUILD_SHARED_LIBS=ON", "-DGGML_BUILD_TESTS=OFF",
                        "-DGGML_BUILD_EXAMPLES=OFF", "-DGGML_OPENMP=ON"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", os.path.join(cache, "build"), "-j", str(os.cpu_count() or 2)],
                       check=True, stdout=subprocess.DEVNULL)
    exe = binary_path(cache)
    if not os.path.exists(exe):
        lib = _libdir(cache)
        subprocess.run(["gcc", "-O2", "-march=native", SRC, "-o", exe + ".part", "-I",
                        os.path.join(_ggml_dir(cache), "include"), "-L", lib, "-lggml", "-lggml-base",
                        "-lggml-cpu", f"-Wl,-rpath,{lib}"], check=True)
        os.replace(exe + ".part", exe)
    if time.perf_counter() - t0 > 5:
        say(f"llama.cpp build: {time.perf_counter() - t0:.0f} s")
    return exe


def to_q4_0(u: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """ggml q4_0 blocks (18 bytes: fp16 d, 16 bytes with element j in the low nibble of byte j and element
    j + 16 in the high nibble) of nibbles u [n, k] (value (u - 8) * scale) and float scales [n, k // 32]."""
    n, k = u.shape
    ub = u.reshape(n, k // 32, 32).astype(np.uint8)
    qs = ub[..., :16] | (ub[..., 16:] << 4)
    d = np.asarray(scale, np.float32).astype(np.float16).reshape(n, k // 32, 1).view(np.uint8)
    return np.concatenate([d, qs], axis=-1)


def run(exe, mode, timeout=1800, **kw) -> dict:
    args = [exe, mode] + [f"{k}={v}" for k, v in kw.items()]
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def check(exe, qtype, repack, gate, up, down, x, ids, w, threads=2):
    """llama.cpp's MoE FFN output [T, D] for weights given by Python: q4_0 as block arrays
    (to_q4_0), q4_K as float32 [E, n, k] quantized by ggml. Returns (out, dequantized weights or None)."""
    E, T, K = gate.shape[0], x.shape[0], ids.shape[1]
    D = x.shape[1]
    I = gate.shape[1]
    with tempfile.TemporaryDirectory() as d:
        for name, a in (("gate.bin", gate), ("up.bin", up), ("down.bin", down)):
            np.ascontiguousarray(a if qtype == "q4_0" else a.astype(np.float32)).tofile(os.path.join(d, name))
        x.astype(np.float32).tofile(os.path.join(d, "x.f32"))
        ids.astype(np.int32).tofile(os.path.join(d, "ids.i32"))
        w.astype(np.float32).tofile(os.path.join(d, "w.f32"))
        info = run(exe, "check", type=qtype, repack=repack, threads=threads, D=D, I=I, E=E, K=K, T=T, dir=d)
        out = np.fromfile(os.path.join(d, "out.f32"), np.float32).reshape(T, D)
        deq = None
        if qtype != "q4_0":
            deq = [np.fromfile(os.path.join(d, n + ".deq.f32"), np.float32).reshape(a.shape)
                   for n, a in (("gate", gate), ("up", up), ("down", down))]
    return out, deq, info


def compare(be, threads, e_dec, e_pre, measured, say=print, sizes=(512, 2048), rounds=3,
            decode_steps=25, decode_windows=3, variants=VARIANTS):
    """Rounds of [ours, each llama.cpp variant] for decode, then for prefill at `sizes`; best per side.

    be: the bench_experts module (D, I, TOPK, make_experts, bench_decode, bench_prefill, routing,
    expert_bytes); measured(run, threads, fn) -> (fn(), note) wraps every run."""
    exe = build(say)
    D, I, K = be.D, be.I, be.TOPK
    flops = {T: 6.0 * D * I * T * K for T in sizes}
    name = {v: f"{v[0]}{'_repack' if v[1] else ''}" for v in variants}
    res, best, runs = {}, {}, {}

    def keep(key, val):
        best[key] = max(best.get(key, 0.0), val)
        runs[key] = runs.get(key, 0) + 1

    ex = be.make_experts(e_dec, threads)
    say(f"\nllama.cpp {VERSION} (ggml CPU backend, {threads} thr) vs ours, back to back, best of {rounds} rounds;"
        f"\ndecode: {e_dec} experts, batch 1, top-{K}; time per token -> GB/s of weights read")
    for r in range(rounds):
        g, note = measured(f"llamacpp_cmp_decode_ours_r{r}", threads,
                           lambda: be.bench_decode(ex, threads, steps=decode_steps, windows=decode_windows))
        keep("ours_decode", g)
        say(f"  round {r}: ours {g:6.2f} GB/s  ({note})")
        for v in variants:   # all every round: a decode run takes seconds
            out, note = measured(f"llamacpp_decode_{name[v]}_r{r}", threads, lambda: run(
                exe, "bench", type=v[0], repack=v[1], threads=threads, D=D, I=I, E=e_dec, K=K,
                steps=decode_steps, windows=decode_windows))
            keep(f"decode_{name[v]}", 1.0 / out["decode_s_per_token"])   # tokens/s
            res["llamacpp_expert_bytes"] = out["expert_bytes"]
            say(f"           {name[v]:13s} {K * out['expert_bytes'] / out['decode_s_per_token'] / 1e9:6.2f} GB/s "
                f"({1e3 * out['decode_s_per_token']:.2f} ms/token)  ({note})")
    ex = None
    ours_tps = best["ours_decode"] * 1e9 / (K * be.expert_bytes())
    for v in variants:
        tps = best[f"decode_{name[v]}"]
        res[f"llamacpp_decode_{name[v]}_gbs"] = tps * K * res["llamacpp_expert_bytes"] / 1e9
        res[f"llamacpp_decode_{name[v]}_ms_per_token"] = 1e3 / tps
    top = max(variants, key=lambda v: best[f"decode_{name[v]}"])
    res["llamacpp_decode_best_variant"] = name[top]
    res["llamacpp_decode_gbs"] = res[f"llamacpp_decode_{name[top]}_gbs"]
    res["llamacpp_decode_gbs_our_bytes"] = best[f"decode_{name[top]}"] * K * be.expert_bytes() / 1e9
    res["llamacpp_cmp_ours_decode_gbs"] = best["ours_decode"]
    res["decode_vs_llamacpp"] = ours_tps / best[f"decode_{name[top]}"]   # >1: ours faster per token

    ex = be.make_experts(e_pre, threads)
    say(f"prefill: {e_pre} experts (both sides), uniform routing, top-{K}; GFLOP/s = 6*D*I*T*{K} / time")
    with tempfile.TemporaryDirectory() as idsdir:
        for T in sizes:   # the routing bench_prefill uses (its rng: x drawn first, then the routing)
            rng = np.random.default_rng(2)
            rng.standard_normal((T, D))
            be.routing(T, e_pre, False, rng).astype(np.int32).tofile(os.path.join(idsdir, f"ids_{T}.i32"))
        live = list(variants)
        for r in range(rounds):
            for T in sizes:   # warm-up (compilation, first touch) in the first round only
                g, note = measured(f"llamacpp_cmp_prefill_{T}_ours_r{r}", threads,
                                   lambda: be.bench_prefill(ex, T, False, reps=1, warm=r == 0))
                keep(f"ours_prefill_{T}", g)
                say(f"  round {r}: T={T:5d} ours {g:7.1f} GFLOP/s  ({note})")
            for v in live:
                out, note = measured(f"llamacpp_prefill_{name[v]}_r{r}", threads, lambda: run(
                    exe, "bench", type=v[0], repack=v[1], threads=threads, D=D, I=I, E=e_pre, K=K,
                    T=",".join(map(str, sorted(sizes, reverse=True))), ids=idsdir))
                for T in sizes:
                    keep(f"prefill_{T}_{name[v]}", flops[T] / out["prefill_s"][str(T)] / 1e9)
                say(f"           {name[v]:13s} " + "  ".join(
                    f"T={T} {flops[T] / out['prefill_s'][str(T)] / 1e9:7.1f}" for T in sizes) + f" GFLOP/s  ({note})")
            live = _leaders(variants, [{v: best[f"prefill_{T}_{name[v]}"] for v in variants} for T in sizes])
    ex = None
    for T in sizes:
        for v in variants:
            res[f"llamacpp_prefill_{T}_{name[v]}_gflops"] = best[f"prefill_{T}_{name[v]}"]
        top = max(variants, key=lambda v: best[f"prefill_{T}_{name[v]}"])
        res[f"llamacpp_prefill_{T}_best_variant"] = name[top]
        res[f"llamacpp_prefill_{T}_gflops"] = best[f"prefill_{T}_{name[top]}"]
        res[f"llamacpp_cmp_ours_prefill_{T}_gflops"] = best[f"ours_prefill_{T}"]
        res[f"prefill_{T}_vs_llamacpp_best"] = best[f"ours_prefill_{T}"] / best[f"prefill_{T}_{name[top]}"]
    res["llamacpp_rounds"] = rounds
    res["llamacpp_runs"] = runs      # figure -> rounds it ran (variants far behind stop after round 0)
    res["llamacpp_prefill_experts"] = e_pre
    return res


def _leaders(variants, figures):
    """The variants within KEEP of the best on at least one of `figures` (dicts variant -> figure)."""
    return [v for v in variants if any(f[v] >= KEEP * max(f.values()) for f in figures)]
