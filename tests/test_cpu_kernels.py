"""CPU routed-expert kernels: layout round trip (against compressed-tensors' own unpacker), byte sizes,
the Numba kernels against moe_int4_ref, and every backend of the runtime's registry against moe_int4_ref.

Kernels (cpu_kernels.CPUExperts, both activation formats) are compared with moe_int4_ref on the SAME
weights, CPUExperts.dequantized(e), so only the kernels' arithmetic is judged. The registry loop
(hybrid.experts.backends.BACKENDS: numba, kt where installed, torch, ref) loads the checkpoint's INT4
tensors as stored with load_expert and is compared with moe_int4_ref on weights dequantized by
hybrid.formats.dequantize_int4 (bf16-rounded, as compressed-tensors does).
Instruction-set variants (cpu_kernels/isa.py): each ISA this CPU can run is forced with HYBRID_CPU_ISA in a
subprocess, checked against moe_int4_ref on fresh random inputs and against the other variants (the
integer sums are exact, so the outputs are bitwise equal); ISAs this CPU lacks are skipped with the reason.
"""
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

from cpu_kernels import CPUExperts, isa, kt_available, layout, moe_int4_ref
from hybrid.config import load_config
from hybrid.experts.backends import BACKENDS, make_backend
from hybrid.formats import dequantize_int4, int4_expert_nbytes, pack_int4, unpack_int4_u

# Worst per-token relative error (|y - ref| / |ref|) allowed; measured on these tests (max over cases,
# fixed seeds; `pytest -s` prints each case's figure):
TOL_INT8 = 3e-2      # int8 activations, one absmax/127 row per 32-group: measured max 2.3e-2
TOL_INT8X2 = 3e-4    # int8 row + int8 row of its residual (~15 bits): measured max 7.7e-5
TOL_FP32 = 1e-4      # fp32 matmul order vs numpy only (torch, ref backends): measured max 7.5e-7
TOL_BF16_ACT = 3e-2  # kt-kernel: activations travel as bf16 (its old bound, as int8; not measured here)

# runtime backend (+ activation format) -> bound against moe_int4_ref on dequantize_int4's weights
REGISTRY = [(name, None) for name in BACKENDS] + [("numba", "int8x2")]
REGISTRY_IDS = [name if fmt is None else f"{name}-{fmt}" for name, fmt in REGISTRY]
REGISTRY_TOL = {"numba": TOL_INT8, "numba-int8x2": TOL_INT8X2, "kt": TOL_BF16_ACT,
                "torch": TOL_FP32, "ref": TOL_FP32}
KERNEL_TOL = {"int8": TOL_INT8, "int8x2": TOL_INT8X2}
FIXTURE_CONFIG = Path(__file__).parent / "fixtures" / "kimi-k2.6"


# ---- inputs ----------------------------------------------------------------------------------
def rand_nibbles(rng, n, k):
    """(u uint8 [n, k] in 0..15, scale bf16 [n, k/32]) with random contents."""
    u = rng.integers(0, 16, (n, k), dtype=np.uint8)
    scale = torch.from_numpy(rng.uniform(0.5, 1.5, (n, k // 32)).astype(np.float32) / np.sqrt(k) / 4)
    return u, scale.to(torch.bfloat16)


def rand_int4(rng, n, k):
    """An INT4 Linear as a checkpoint stores it: (packed int32 [n, k/8], scale bf16 [n, k/32])."""
    u, scale = rand_nibbles(rng, n, k)
    return pack_int4(torch.from_numpy(u.astype(np.int8) - 8)), scale


def independent_dequant(packed, scale, k):
    """compressed-tensors' own unpacker, times the scale in fp32 (exact: 4-bit x 8-bit mantissas)."""
    q = unpack_from_int32(packed, 4, torch.Size([packed.shape[0], k])).float()
    return (q * scale.float().repeat_interleave(32, dim=1)).numpy()


def cpu_experts(E, D, I, seed, act_format="int8"):
    rng = np.random.default_rng(seed)
    ex = CPUExperts(E, D, I, act_format=act_format)
    for e in range(E):
        ex.set_expert(e, *rand_nibbles(rng, I, D), *rand_nibbles(rng, I, D), *rand_nibbles(rng, D, I))
    return ex


def model_config(E, D, I, K):
    cfg = load_config(FIXTURE_CONFIG)
    return dataclasses.replace(cfg, n_routed_experts=E, hidden_size=D, moe_intermediate_size=I,
                               num_experts_per_tok=K, n_group=1, topk_group=1)


def registry_backend(name, fmt, E, D, I, K, seed):
    """Backend `name` made by the runtime's make_backend, loaded with INT4 as stored; and the weights of
    the same tensors ([E, I, D], [E, I, D], [E, D, I] fp32) to judge it by: dequantize_int4's (bf16-rounded)
    for every backend but numba, which keeps the exact fp32 q * scale (<= 2^-9 relative from the bf16
    rounding, ~5e-3 on an output: more than int8x2's error), so its weights come from compressed-tensors'
    own unpacker in fp32 and its bound is its activation format's."""
    if name == "kt" and not kt_available():
        pytest.skip("kt-kernel is not installed")
    rng = np.random.default_rng(seed)
    ex = make_backend(name, model_config(E, D, I, K), act_format=fmt)
    dense = [[], [], []]
    for e in range(E):
        parts = [rand_int4(rng, I, D), rand_int4(rng, I, D), rand_int4(rng, D, I)]
        ex.load_expert(e, *[t for p in parts for t in p])
        for i, ((p, s), k) in enumerate(zip(parts, (D, D, I))):
            dense[i].append(torch.from_numpy(independent_dequant(p, s, k)) if name == "numba"
                            else dequantize_int4(p, s, k, dtype=torch.float32))
    return ex, [torch.stack(w) for w in dense]


def kernel_weights(ex):
    ws = [ex.dequantized(e) for e in range(ex.E)]
    return [torch.stack([w[i] for w in ws]) for i in range(3)]


def routing(rng, T, E, K, kind):
    if kind == "one_expert":                      # every token to expert 2, plus K-1 others
        others = [e for e in range(E) if e != 2]
        return np.array([[2] + list(rng.permutation(others)[:K - 1]) for _ in range(T)])
    pool = np.arange(1 if kind == "skip_expert" else 0, E)   # skip_expert: expert 0 gets no token
    return np.array([rng.permutation(pool)[:K] for _ in range(T)])


def rel_err_per_token(y, ref):
    y, ref = np.asarray(y), np.asarray(ref)
    return np.linalg.norm(y - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)


def check(ex, x, ids, wts, dense, tol, what):
    y = ex.forward(x, ids, wts)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and tuple(y.shape) == tuple(x.shape)
    ref = moe_int4_ref(x, ids, wts, *dense)
    err = rel_err_per_token(y.numpy(), ref)
    assert err.max() <= tol, f"{what}: worst token rel. error {err.max():.3g} > {tol}"
    print(f"{what}: rel. error mean {err.mean():.2e}, max {err.max():.2e}")   # the record (pytest -s)
    return y


# ---- layout and bytes ------------------------------------------------------------------------
@pytest.mark.parametrize("n,k", [(8, 32), (8, 64), (16, 96), (8, 320), (24, 7168)])
def test_repack_round_trip(n, k):
    rng = np.random.default_rng(k + n)
    packed, scale = rand_int4(rng, n, k)
    u = unpack_int4_u(packed, k).numpy()            # the runtime's unpack, as backends.py feeds repack
    w = layout.repack(u, scale)
    assert w.shape == layout.layout_shape(n, k) and w.dtype == np.uint8
    assert w.nbytes == packed.numel() * 4 + scale.numel() * 2       # exactly the disk bytes
    ours = layout.dequantize_layout(w)
    indep = independent_dequant(packed, scale, k)
    np.testing.assert_array_equal(ours, indep)
    # compressed-tensors rounds q * scale to bf16: the kernel's weights differ by <= half a bf16 ulp
    ct = torch.from_numpy(indep).to(torch.bfloat16).float().numpy()
    assert np.all(np.abs(ours - ct) <= np.abs(ct) * 2.0 ** -8)
    u2, s2 = layout.unpack_layout(w)
    np.testing.assert_array_equal(u2, u)
    np.testing.assert_array_equal(s2, scale.view(torch.int16).numpy().view(np.uint16))
    q = unpack_from_int32(packed, 4, torch.Size([n, k])).numpy()
    np.testing.assert_array_equal(u2.astype(np.int16) - 8, q)
    # one byte by the layout's definition: tile 0, group g, vector j, row r, input kk
    g, j, r, kk = k // 32 - 1, 2, 5, 3
    uu = q.astype(np.int16) + 8
    assert w[0, g, 32 * j + 4 * r + kk] == uu[r, 32 * g + 4 * j + kk] | (uu[r, 32 * g + 16 + 4 * j + kk] << 4)
    assert w[0, g, 128:].view(np.uint16)[r] == s2[r, g]


def test_repack_into_buffer_and_fp32_scales():
    rng = np.random.default_rng(1)
    u, scale = rand_nibbles(rng, 16, 64)
    out = np.zeros(layout.layout_shape(16, 64), np.uint8)
    assert layout.repack(u, scale, out) is out
    np.testing.assert_array_equal(out, layout.repack(torch.from_numpy(u), scale.float().numpy()))


def test_dequantized_is_the_loaded_expert():
    ex = cpu_experts(3, 64, 32, seed=3)
    rng = np.random.default_rng(3)   # the same stream as cpu_experts
    for e in range(3):
        for got, (u, s) in zip(ex.dequantized(e), [rand_nibbles(rng, 32, 64), rand_nibbles(rng, 32, 64),
                                                    rand_nibbles(rng, 64, 32)]):
            want = (u.astype(np.float32) - 8) * s.float().repeat_interleave(32, dim=1).numpy()
            np.testing.assert_array_equal(got.numpy(), want)


def test_bytes_k26_shape():
    E, D, I = 3, 7168, 2048          # np.empty: nothing is touched
    ex = CPUExperts(E, D, I)
    disk = E * 3 * (D * I // 8 * 4 + D * I // 32 * 2)
    assert ex.nbytes == disk == E * int4_expert_nbytes(D, I)
    assert ex.nbytes <= 1.05 * disk


# ---- the kernels against the reference on the same weights ------------------------------------
CASES = [  # (T, E, top-k, D, I, routing)
    (1, 4, 2, 64, 32, "random"),
    (2, 4, 1, 64, 32, "random"),
    (7, 6, 3, 64, 32, "random"),
    (64, 8, 8, 64, 32, "random"),
    (300, 8, 4, 64, 32, "random"),
    (7, 5, 2, 64, 32, "skip_expert"),
    (64, 4, 1, 64, 32, "one_expert"),
    (64, 9, 8, 64, 32, "one_expert"),
    (1, 3, 3, 320, 288, "random"),      # 10 / 9 groups: SIMD blocks of 8 + scalar tails
    (7, 3, 2, 320, 288, "random"),
    (300, 12, 8, 512, 256, "random"),   # SIMD only, many tokens per expert
    (5, 10, 5, 512, 256, "random"),
]
CASE_IDS = [f"T{c[0]}-E{c[1]}-k{c[2]}-{c[3]}x{c[4]}-{c[5]}" for c in CASES]


@pytest.mark.parametrize("fmt", list(KERNEL_TOL))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernels_vs_reference(fmt, case):
    T, E, K, D, I, kind = case
    ex = cpu_experts(E, D, I, seed=T + E, act_format=fmt)
    rng = np.random.default_rng(T * 7 + K)
    x = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))
    ids = torch.from_numpy(routing(rng, T, E, K, kind))
    wts = torch.from_numpy(rng.uniform(0.1, 1.0, (T, K)).astype(np.float32))
    y = check(ex, x, ids, wts, kernel_weights(ex), KERNEL_TOL[fmt], f"numba-{fmt}")
    torch.testing.assert_close(ex.forward(x, ids, wts), y, rtol=0, atol=0)   # deterministic


@pytest.mark.parametrize("fmt", list(KERNEL_TOL))
def test_kernels_duplicates_and_zero_weights(fmt):
    """An expert twice in a token's row, zero weights (how offload.py hands off GPU-resident experts)."""
    ex = cpu_experts(4, 64, 32, seed=11, act_format=fmt)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    ids = np.array([[1, 1, 2], [0, 3, 0], [2, 2, 2], [3, 1, 0], [1, 2, 3]])
    wts = rng.uniform(0.1, 1.0, (5, 3)).astype(np.float32)
    wts[0, 1] = wts[1, 2] = wts[4] = 0.0   # token 4: nothing at all
    y = check(ex, x, ids, wts, kernel_weights(ex), KERNEL_TOL[fmt], f"numba-{fmt}")
    assert torch.all(y[4] == 0)
    assert torch.all(ex.forward(x, ids, np.zeros_like(wts)) == 0)


@pytest.mark.parametrize("fmt", list(KERNEL_TOL))
@pytest.mark.parametrize("T", [1, 7])
def test_kernels_k26_shape(fmt, T):
    E, D, I = 3, 7168, 2048
    ex = cpu_experts(E, D, I, seed=T, act_format=fmt)
    rng = np.random.default_rng(T)
    x = rng.standard_normal((T, D)).astype(np.float32)
    ids = np.array([rng.permutation(E)[:2] for _ in range(T)])
    wts = rng.uniform(0.1, 1.0, (T, 2)).astype(np.float32)
    check(ex, x, ids, wts, kernel_weights(ex), KERNEL_TOL[fmt], f"numba-{fmt} K2.6 shape")


def test_errors_are_loud():
    ex = CPUExperts(4, 64, 32)
    with pytest.raises(ValueError, match="never loaded"):
        ex.forward(np.zeros((1, 64), np.float32), np.array([[1]]), np.ones((1, 1), np.float32))
    with pytest.raises(ValueError, match="act_format"):
        CPUExperts(4, 64, 32, act_format="fp16")
    with pytest.raises(ValueError, match="multiples"):
        CPUExperts(4, 48, 32)


def test_repacked_arrays_round_trip_through_files(tmp_path):
    """A cache of the repacked layout (np.save, then memory-mapped) gives the same outputs."""
    ex = cpu_experts(5, 64, 32, seed=13)
    for name, a in ex.arrays.items():
        np.save(tmp_path / f"{name}.npy", a)
    mm = {name: np.load(tmp_path / f"{name}.npy", mmap_mode="c") for name in ex.arrays}
    ex2 = CPUExperts.from_arrays(mm["gate"], mm["up"], mm["down"])
    assert (ex2.E, ex2.D, ex2.I, ex2.nbytes) == (ex.E, ex.D, ex.I, ex.nbytes)
    rng = np.random.default_rng(13)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    ids = np.array([rng.permutation(5)[:2] for _ in range(3)])
    wts = rng.uniform(0.1, 1.0, (3, 2)).astype(np.float32)
    torch.testing.assert_close(ex2.forward(x, ids, wts), ex.forward(x, ids, wts), rtol=0, atol=0)


# ---- every runtime backend, loaded with INT4 as stored ---------------------------------------
REGISTRY_CASES = [  # (T, E, top-k, D, I, routing)
    (1, 4, 2, 64, 32, "random"),
    (7, 6, 3, 64, 32, "skip_expert"),
    (80, 8, 4, 64, 32, "random"),       # more slots than the decode path takes
    (3, 3, 2, 320, 288, "random"),      # tails
    (64, 4, 2, 64, 32, "one_expert"),
]


def test_registry_is_covered():
    assert set(BACKENDS) == {"numba", "kt", "torch", "ref"}, "a new backend needs its bound in REGISTRY_TOL"


@pytest.mark.parametrize("backend", REGISTRY, ids=REGISTRY_IDS)
@pytest.mark.parametrize("case", REGISTRY_CASES, ids=[f"T{c[0]}-E{c[1]}-k{c[2]}-{c[3]}x{c[4]}-{c[5]}"
                                                       for c in REGISTRY_CASES])
def test_backend_vs_reference(backend, case):
    T, E, K, D, I, kind = case
    name, fmt = backend
    key = name if fmt is None else f"{name}-{fmt}"
    ex, dense = registry_backend(name, fmt, E, D, I, K, seed=T + E + 100)
    rng = np.random.default_rng(T * 5 + K)
    x = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))
    ids = torch.from_numpy(routing(rng, T, E, K, kind))
    wts = torch.from_numpy(rng.uniform(0.1, 1.0, (T, K)).astype(np.float32))
    check(ex, x, ids, wts, dense, REGISTRY_TOL[key], f"backend {key}")


@pytest.mark.parametrize("backend", REGISTRY, ids=REGISTRY_IDS)
def test_backend_duplicates_and_zero_weights(backend):
    name, fmt = backend
    key = name if fmt is None else f"{name}-{fmt}"
    ex, dense = registry_backend(name, fmt, 4, 64, 32, 3, seed=21)
    rng = np.random.default_rng(21)
    x = torch.from_numpy(rng.standard_normal((5, 64)).astype(np.float32))
    ids = torch.tensor([[1, 1, 2], [0, 3, 0], [2, 2, 2], [3, 1, 0], [1, 2, 3]])
    wts = torch.from_numpy(rng.uniform(0.1, 1.0, (5, 3)).astype(np.float32))
    wts[0, 1] = wts[1, 2] = 0.0
    wts[4] = 0.0
    y = check(ex, x, ids, wts, dense, REGISTRY_TOL[key], f"backend {key}")
    assert torch.all(y[4] == 0)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_backend_nbytes(name):
    """The RAM a backend holds matches the registry's per-expert figure (the memory plan's)."""
    E, D, I = 3, 64, 32
    ex, _ = registry_backend(name, None, E, D, I, 2, seed=5)
    assert ex.nbytes == E * BACKENDS[name][1](D, I)
    if name in ("numba", "kt"):
        assert ex.nbytes == E * int4_expert_nbytes(D, I)


# ---- instruction-set variants (cpu_kernels/isa.py) ----------------------------------------------
ISA_SCRIPT = r"""
import sys, numpy as np, torch
from cpu_kernels import CPUExperts, moe_int4_ref
from cpu_kernels.moe_int4 import ISA
seed, out = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(seed)
ys, errs = [], []
for T, E, K, D, I in [(1, 5, 3, 320, 288), (4, 6, 2, 64, 96), (37, 9, 4, 128, 64)]:   # decode, batch, prefill
    ex = CPUExperts(E, D, I)
    for e in range(E):
        ex.set_expert(e, *[a for n, k in ((I, D), (I, D), (D, I)) for a in (
            rng.integers(0, 16, (n, k), dtype=np.uint8),
            torch.from_numpy(rng.uniform(0.5, 1.5, (n, k // 32)).astype(np.float32) / 64).to(torch.bfloat16))])
    x = rng.standard_normal((T, D)).astype(np.float32)
    ids = np.array([rng.permutation(E)[:K] for _ in range(T)])
    w = rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)
    y = ex.forward(torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(w)).numpy()
    ws = [ex.dequantized(e) for e in range(E)]
    ref = moe_int4_ref(x, ids, w, *[torch.stack([v[i] for v in ws]) for i in range(3)])
    errs.append(float((np.linalg.norm(y - ref, axis=1) / np.linalg.norm(ref, axis=1)).max()))
    ys.append(y)
np.savez(out, *ys)
print(ISA, max(errs))
"""


@pytest.fixture(scope="module")
def isa_seed():
    return int(np.random.default_rng().integers(1 << 30))      # fresh inputs, the same for every variant


def run_isa(name, seed, tmp_path):
    out = tmp_path / f"{name}.npz"
    env = dict(os.environ, HYBRID_CPU_ISA=name)
    r = subprocess.run([sys.executable, "-c", ISA_SCRIPT, str(seed), str(out)], env=env, capture_output=True,
                       text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    got, err = r.stdout.split()[-2:]
    return got, float(err), [np.load(out)[k] for k in sorted(np.load(out).files)]


def test_isa_pick_and_force():
    assert isa.ISA in isa.ISAS and isa.supported()[-1] == "generic"
    assert isa.pick("auto") == (isa.supported()[0], False)
    assert isa.pick("generic") == ("generic", True) and isa.pick("generic512") == ("generic512", True)
    zen4 = {"avx2": True, "avx512vnni": True, "avx512vl": True, "avx512f": True, "avx512bw": True}
    assert isa.pick("auto", zen4)[0] == "avx512vnni" and isa.pick("auto", {"avx2": True})[0] == "avx2"
    assert isa.pick("avx512vnni512", zen4) == ("avx512vnni512", True)       # opt-in: never auto
    assert not set(isa.OPT_IN) & set(isa.supported(zen4))
    assert isa.pick("auto", {"avx2": True, "avxvnni": True})[0] == "avxvnni"
    with pytest.raises(RuntimeError, match="lacks avx512vnni"):
        isa.pick("avx512vnni", {"avx2": True})
    with pytest.raises(RuntimeError, match="lacks avx512vnni, avx512f, avx512bw"):
        isa.pick("avx512vnni512", {"avx2": True})
    with pytest.raises(ValueError, match="unknown"):
        isa.pick("sse9")


# Compile (never run) the AVX-512 kernels for a Zen 4 (and an Ice Lake server) on any machine: numba
# targets NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, which isa.py also reads. The assembly is checked.
ZEN4_FEATURES = "+avx2,+fma,+f16c,+bmi2,+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512vnni"
ASM_SCRIPT = r"""
from numba import njit
from cpu_kernels import moe_int4 as m
sig = "void(" + ",".join(["int64"] * 12) + ")"
@njit(sig)
def four(w, ts, G, x0, x1, x2, x3, a0, a1, a2, a3, out):
    m._dot4(w, ts, G, x0, x1, x2, x3, a0, a1, a2, a3, out)
print(m.ISA, m.W)
print(four.inspect_asm(four.signatures[0]))
"""


@pytest.mark.parametrize("name, reg, width, cpu", [("avx512vnni512", "zmm", 16, "znver4"), ("avx512vnni", "ymm", 8, "znver4"),
                                                   ("avx512vnni512", "zmm", 16, "icelake-server")])
def test_isa_avx512_compiles(name, reg, width, cpu):
    """Also for an Intel server core, whose LLVM tuning prefers 256-bit vectors: the explicit 512-bit
    instruction must still be emitted on zmm."""
    env = dict(os.environ, HYBRID_CPU_ISA=name, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=ZEN4_FEATURES)
    r = subprocess.run([sys.executable, "-c", ASM_SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    head, asm = r.stdout.split("\n", 1)
    assert head == f"{name} {width}"
    dp = re.findall(r"vpdpbusd\s+(.*)", asm)          # AT&T operands: [mem or reg], reg, reg (the accumulator)
    # 4 tokens x 8 products per group step, all on `reg`; no AVX2 fallback in the loop
    assert len(dp) >= 32 and {r[:3] for d in dp for r in re.findall(r"%([xyz]mm)\d+", d)} == {reg}, dp[:8]
    assert "vpmaddubsw" not in asm


@pytest.mark.parametrize("name", isa.ISAS)
def test_isa_variant_vs_reference(name, isa_seed, tmp_path_factory):
    lack = isa.missing(name)
    if lack:
        pytest.skip(f"this CPU lacks {', '.join(lack)}: the {name} kernels need a machine that has it")
    tmp = tmp_path_factory.mktemp("isa")
    got, err, ys = run_isa(name, isa_seed, tmp)
    assert got == name and err <= TOL_INT8, (name, err)
    print(f"{name}: worst token rel. error {err:.2e}")
    base = "avx2" if name != "avx2" and not isa.missing("avx2") else None
    if base:                                            # exact integer sums: the same bits as AVX2
        for a, b in zip(ys, run_isa(base, isa_seed, tmp)[2]):
            np.testing.assert_array_equal(a, b)
