"""CPU routed-expert kernels: layout round trip, memory bound, every backend vs moe_int4_ref.

Every backend of EXPERT_BACKENDS runs on random INT4 experts and is compared with moe_int4_ref on
the backend's own dequantized weights (ex.dequantized), so only the kernel's arithmetic is judged.
"""
import time

import numpy as np
import pytest
import torch

from cpu_kernels import EXPERT_BACKENDS, TOL_FP32, TOL_INT8, TOL_INT8X2, kt_available, moe_int4_ref
from cpu_kernels import layout

# every backend of the registry, the numba one in each activation format
BACKENDS = [(name, None) for name in EXPERT_BACKENDS] + [("numba", "int8x2")]
BACKEND_IDS = [name if fmt is None else f"{name}-{fmt}" for name, fmt in BACKENDS]
TOL = {"ref": TOL_FP32, "numba": TOL_INT8, "numba-int8x2": TOL_INT8X2, "kt": TOL_INT8}


def spec_unpack(packed, scale):
    """Independent decoder written from KIMI_K2_SPEC.md §2.3: column 8j+i sits in bits 4i..4i+3 of
    word j, q = u - 8, W = q * scale[r, c // 32] (here in fp32: exact)."""
    p = packed.numpy().astype(np.int64) & 0xFFFFFFFF
    n, kw = p.shape
    w = np.empty((n, 8 * kw), np.float32)
    s = scale.float().numpy()
    for j in range(kw):
        for i in range(8):
            c = 8 * j + i
            w[:, c] = (((p[:, j] >> (4 * i)) & 0xF) - 8).astype(np.float32) * s[:, c // 32]
    return w


def rand_linear(rng, n, k):
    """compressed-tensors (packed int32 [n, k/8], scale bf16 [n, k/32]) with random contents."""
    u = rng.integers(0, 16, (n, k), dtype=np.uint8)
    scale = torch.from_numpy(rng.uniform(0.5, 1.5, (n, k // 32)).astype(np.float32) / np.sqrt(k) / 4)
    return torch.from_numpy(layout.pack_compressed(u)), scale.to(torch.bfloat16)


def make_backend(name, E, D, I, seed=0, threads=None, act_format=None):
    if name == "kt" and not kt_available():
        pytest.skip("kt-kernel is not installed")
    rng = np.random.default_rng(seed)
    kw = {} if act_format is None else {"act_format": act_format}
    ex = EXPERT_BACKENDS[name](E, D, I, num_threads=threads, **kw)
    for e in range(E):
        ex.load_expert(e, *rand_linear(rng, I, D), *rand_linear(rng, I, D), *rand_linear(rng, D, I))
    return ex


def dense_weights(ex):
    ws = [ex.dequantized(e) for e in range(ex.E)]
    return [torch.stack([w[i] for w in ws]) for i in range(3)]


def rel_err_per_token(y, ref):
    y, ref = np.asarray(y), np.asarray(ref)
    return np.linalg.norm(y - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)


def check(ex, name, x, ids, wts):
    y = ex.forward(x, ids, wts)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and tuple(y.shape) == tuple(x.shape)
    ref = moe_int4_ref(x, ids, wts, *dense_weights(ex))
    err = rel_err_per_token(y.numpy(), ref)
    assert err.max() <= TOL[name], f"{name}: worst token rel. error {err.max():.3g} > {TOL[name]}"
    return err


@pytest.mark.parametrize("k", [32, 64, 96, 320, 7168])
def test_repack_round_trip(k):
    rng = np.random.default_rng(k)
    n = 8
    packed, scale = rand_linear(rng, n, k)
    w = layout.repack(packed, scale)
    assert w.nbytes == packed.numel() * 4 + scale.numel() * 2  # exactly the disk bytes
    ours = layout.dequantize_layout(w)
    indep = spec_unpack(packed, scale)
    np.testing.assert_array_equal(ours, indep)
    # compressed-tensors rounds q*scale to bf16: we differ by at most half a bf16 ulp
    ct = torch.from_numpy(indep).to(torch.bfloat16).float().numpy()
    assert np.all(np.abs(ours - ct) <= np.abs(ct) * 2.0 ** -8)
    u, s = layout.unpack_layout(w)
    np.testing.assert_array_equal(layout.pack_compressed(u), packed.numpy())
    np.testing.assert_array_equal(s, layout.bf16_bits(scale))
    # one byte by the layout's definition: tile 0, group g, vector j, row r, input kk
    g, j, r, kk = k // 32 - 1, 2, 5, 3
    uu = layout.unpack_compressed(packed)
    assert w[0, g, 32 * j + 4 * r + kk] == uu[r, 32 * g + 4 * j + kk] | (uu[r, 32 * g + 16 + 4 * j + kk] << 4)


@pytest.mark.parametrize("name", list(EXPERT_BACKENDS))
def test_dequantized_matches_disk_format(name):
    ex = make_backend(name, 2, 64, 32, seed=3)
    rng = np.random.default_rng(3)  # same stream as make_backend
    for e in range(2):
        for got, (p, s) in zip(ex.dequantized(e), [rand_linear(rng, 32, 64), rand_linear(rng, 32, 64),
                                                    rand_linear(rng, 64, 32)]):
            want = spec_unpack(p, s)
            if name == "ref":  # compressed-tensors' own rounding of q * scale to bf16
                want = torch.from_numpy(want).to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(got.numpy(), want)


def test_memory_bound_k26_shape():
    E, D, I = 3, 7168, 2048  # np.empty: nothing is touched
    ex = EXPERT_BACKENDS["numba"](E, D, I)
    disk = E * 3 * (D * I // 8 * 4 + D * I // 32 * 2)
    assert ex.nbytes <= 1.05 * disk, (ex.nbytes, disk)


CASES = [  # (T, E, top-k, D, I, routing)
    (1, 4, 2, 64, 32, "random"),
    (2, 4, 1, 64, 32, "random"),
    (7, 6, 3, 64, 32, "random"),
    (64, 8, 8, 64, 32, "random"),
    (300, 8, 4, 64, 32, "random"),
    (7, 5, 2, 64, 32, "skip_expert"),   # expert 0 gets no token
    (64, 4, 1, 64, 32, "one_expert"),   # every token to expert 2
    (64, 9, 8, 64, 32, "one_expert"),   # ... and its 7 others
    (1, 3, 3, 320, 288, "random"),      # 10 / 9 groups: SIMD blocks of 8 + scalar tails
    (7, 3, 2, 320, 288, "random"),
    (300, 12, 8, 512, 256, "random"),   # SIMD only, many tokens per expert (4-token tiles)
    (5, 10, 5, 512, 256, "random"),
]


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-E{c[1]}-k{c[2]}-{c[3]}x{c[4]}-{c[5]}" for c in CASES])
def test_backend_vs_reference(backend, case):
    T, E, K, D, I, routing = case
    name, fmt = backend
    ex = make_backend(name, E, D, I, seed=T + E, act_format=fmt)
    rng = np.random.default_rng(T * 7 + K)
    x = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))
    if routing == "one_expert":
        others = [e for e in range(E) if e != 2]
        ids = np.array([[2] + list(rng.permutation(others)[:K - 1]) for _ in range(T)])
    else:
        pool = np.arange(1 if routing == "skip_expert" else 0, E)
        ids = np.array([rng.permutation(pool)[:K] for _ in range(T)])
    wts = rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)
    tol_key = name if fmt is None else f"{name}-{fmt}"
    err = check(ex, tol_key, x, torch.from_numpy(ids), torch.from_numpy(wts))
    if name == "numba":  # the activation-format error, for the record (pytest -s)
        print(f"{tol_key} rel. error: mean {err.mean():.2e}, max {err.max():.2e}")


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_duplicates_and_zero_weights(backend):
    """An expert twice in a token's row, zero weights (how hot_experts.py hands off GPU experts)."""
    name, fmt = backend
    ex = make_backend(name, 4, 64, 32, seed=11, act_format=fmt)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    ids = np.array([[1, 1, 2], [0, 3, 0], [2, 2, 2], [3, 1, 0], [1, 2, 3]])
    wts = rng.uniform(0.1, 1.0, (5, 3)).astype(np.float32)
    wts[0, 1] = wts[1, 2] = wts[4] = 0.0  # token 4: nothing at all
    check(ex, name if fmt is None else f"{name}-{fmt}", x, ids, wts)
    y = ex.forward(x, ids, wts)
    assert torch.all(y[4] == 0)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("T", [1, 7])
def test_k26_shape(backend, T):
    E, D, I = 3, 7168, 2048
    name, fmt = backend
    ex = make_backend(name, E, D, I, seed=T, act_format=fmt)
    rng = np.random.default_rng(T)
    x = rng.standard_normal((T, D)).astype(np.float32)
    ids = np.array([rng.permutation(E)[:2] for _ in range(T)])
    wts = rng.uniform(0.1, 1.0, (T, 2)).astype(np.float32)
    err = check(ex, name if fmt is None else f"{name}-{fmt}", x, ids, wts)
    print(f"{name} {fmt} K2.6 shape rel. error: max {err.max():.2e}")


@pytest.mark.parametrize("name", list(EXPERT_BACKENDS))
def test_load_expert_dense_error(name):
    D, I = 256, 64
    rng = np.random.default_rng(5)
    dense = [rng.standard_normal(s).astype(np.float32) * 0.02 for s in ((I, D), (I, D), (D, I))]
    ex = EXPERT_BACKENDS[name](1, D, I) if name != "kt" or kt_available() else pytest.skip("no kt")
    ex.load_expert_dense(0, *[torch.from_numpy(w).to(torch.bfloat16) for w in dense])
    for w, q in zip(dense, ex.dequantized(0)):
        w = torch.from_numpy(w).to(torch.bfloat16).float().numpy()
        q = q.numpy()
        rel = np.linalg.norm(q - w) / np.linalg.norm(w)
        # RTN int4 on Gaussian weights: rms error ~ (2.1 sigma / 7.5) / sqrt(12) = 0.08 .. 0.095
        assert rel < 0.1, rel
        print(f"RTN int4 rel. rms error {rel:.4f}")
        g = w.reshape(w.shape[0], -1, 32)
        scale = np.maximum(g.max(axis=2) / 7, -g.min(axis=2) / 8) * (1 + 2.0 ** -7)  # bf16 round-up
        slack = np.abs(q) * 2.0 ** -8 if name == "ref" else 0  # ref: weights rounded to bf16
        assert np.all(np.abs(q - w) <= (scale[:, :, None] * 0.5).repeat(32, axis=2).reshape(w.shape) + slack)


def test_submit_returns_at_once_and_overlaps():
    ex = make_backend("numba", 16, 1024, 512, seed=9)
    rng = np.random.default_rng(9)
    T = 256
    x = torch.from_numpy(rng.standard_normal((T, 1024)).astype(np.float32))
    ids = torch.from_numpy(np.array([rng.permutation(16)[:8] for _ in range(T)]))
    wts = torch.from_numpy(rng.uniform(0.1, 1.0, (T, 8)).astype(np.float32))
    y_ref = ex.forward(x, ids, wts)  # compiled and warm
    t0 = time.perf_counter()
    ex.forward(x, ids, wts)
    t_run = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex.submit(x, ids, wts)
    t_submit = time.perf_counter() - t0
    a = torch.randn(256, 256)
    for _ in range(20):  # caller's own torch work meanwhile
        a = torch.tanh(a @ a.T / 256)
    y = ex.wait()
    assert t_submit < 0.5 * t_run, (t_submit, t_run)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # deterministic


def test_errors_are_loud():
    ex = EXPERT_BACKENDS["numba"](4, 64, 32)
    with pytest.raises(ValueError, match="never loaded"):
        ex.forward(np.zeros((1, 64), np.float32), np.array([[1]]), np.ones((1, 1), np.float32))
    with pytest.raises(ValueError, match="act_format"):
        EXPERT_BACKENDS["numba"](4, 64, 32, act_format="fp16")
    with pytest.raises(ValueError, match="multiples"):
        EXPERT_BACKENDS["numba"](4, 48, 32)


def test_repacked_arrays_round_trip_through_files(tmp_path):
    """A cache of the repacked layout (np.save, then memory-mapped) gives the same outputs."""
    ex = make_backend("numba", 5, 64, 32, seed=13)
    for name, a in ex.arrays.items():
        np.save(tmp_path / f"{name}.npy", a)
    mm = {name: np.load(tmp_path / f"{name}.npy", mmap_mode="c") for name in ex.arrays}
    ex2 = EXPERT_BACKENDS["numba"].from_arrays(mm["gate"], mm["up"], mm["down"])
    assert (ex2.E, ex2.D, ex2.I, ex2.nbytes) == (ex.E, ex.D, ex.I, ex.nbytes)
    rng = np.random.default_rng(13)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    ids = np.array([rng.permutation(5)[:2] for _ in range(3)])
    wts = rng.uniform(0.1, 1.0, (3, 2)).astype(np.float32)
    torch.testing.assert_close(ex2.forward(x, ids, wts), ex.forward(x, ids, wts), rtol=0, atol=0)
