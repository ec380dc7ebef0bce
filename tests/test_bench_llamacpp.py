"""tools/bench_llamacpp.py + tools/llamacpp_moe.c: llama.cpp's MoE FFN graph gives the MoE FFN.

On tiny random shapes (odd expert/token counts, I not a multiple of 64) the C program's output is
compared with a plain numpy float64 reference of the DeepSeek-V3 MoE FFN
    out[t] = sum_k w[t, k] * down_e (silu(gate_e x_t) * (up_e x_t)),  e = ids[t, k]
on the same weights: q4_0 blocks written from our int4 format (nibbles + bf16 scales), and q4_K
quantized by ggml from float weights (the reference then uses what ggml dequantizes them to).
Skipped unless llama.cpp's ggml is already built in the cache (tools/bench_llamacpp.cache_dir()) or
HYBRID_BUILD_LLAMACPP is set: CI does not build llama.cpp.
"""
import os

import numpy as np
import pytest

from tools import bench_llamacpp as bl

# ggml quantizes the activations before every q4 dot product: x to q8_0 (blocks of 32, scale
# max|x|/127; q8_K blocks of 256 for q4_K) for gate/up, and the SwiGLU output again before down.
# Each rounding is at most half a step, 1/254 of a block's largest value, ~0.2-0.5 % rms of a dot
# product; two of them compound to about 1 % relative rms. The bound leaves room for that, and a
# wrong expert or weight layout gives a relative error near 1 or above (checked below).
REL_TOL = 0.03
WRONG_MIN = 0.3

pytestmark = pytest.mark.skipif(
    not bl.library_built() and not os.environ.get("HYBRID_BUILD_LLAMACPP"),
    reason="llama.cpp's ggml is not built in ~/.cache/hybrid (set HYBRID_BUILD_LLAMACPP=1 to build it)")


@pytest.fixture(scope="module")
def exe():
    return bl.build(say=lambda *a: None)


def _bf16(a):
    return (np.asarray(a, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


def _reference(wg, wu, wd, x, ids, w):
    x, out = x.astype(np.float64), np.zeros((x.shape[0], wd.shape[1]))
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[t, k]
            g, u = wg[e].astype(np.float64) @ x[t], wu[e].astype(np.float64) @ x[t]
            out[t] += w[t, k] * (wd[e].astype(np.float64) @ (g / (1 + np.exp(-g)) * u))
    return out


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _problem(rng, D, I, E, T, K):
    x = rng.standard_normal((T, D)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)
    return x, ids, w


def _int4_expert(rng, n, k):
    """our format: nibbles u [n, k] and bf16 scales [n, k // 32]; value (u - 8) * scale."""
    u = rng.integers(0, 16, (n, k), dtype=np.uint8)
    s = _bf16(rng.uniform(0.004, 0.03, (n, k // 32)))
    return u, s, (u.astype(np.float32) - 8) * np.repeat(s, 32, axis=1)


@pytest.mark.parametrize("repack", [0, 1])
@pytest.mark.parametrize("D,I,E,T,K", [(256, 96, 6, 5, 2), (320, 160, 5, 7, 3)])
def test_q4_0_matches_reference(exe, repack, D, I, E, T, K):
    rng = np.random.default_rng([D, I, E, T, K, repack, int.from_bytes(os.urandom(4), "little")])
    blocks, deq = {}, {}
    for name, (n, k) in (("gate", (I, D)), ("up", (I, D)), ("down", (D, I))):
        parts = [_int4_expert(rng, n, k) for _ in range(E)]
        blocks[name] = np.stack([bl.to_q4_0(u, s) for u, s, _ in parts])
        deq[name] = np.stack([f for _, _, f in parts])
    x, ids, w = _problem(rng, D, I, E, T, K)
    out, _, info = bl.check(exe, "q4_0", repack, blocks["gate"], blocks["up"], blocks["down"], x, ids, w)
    assert info["weight_buffer"] == ("CPU_REPACK" if repack else "CPU")
    ref = _reference(deq["gate"], deq["up"], deq["down"], x, ids, w)
    assert out.shape == (T, D) and np.isfinite(out).all()
    assert _rel(out, ref) < REL_TOL
    wrong = _reference(deq["gate"], deq["up"], deq["down"], x, (ids + 1) % E, w)
    assert _rel(wrong, ref) > WRONG_MIN        # the bound tells a wrong expert apart


@pytest.mark.parametrize("repack", [0, 1])
def test_q4_K_matches_reference(exe, repack):
    D, I, E, T, K = 512, 256, 5, 6, 3       # q4_K: rows are whole 256-value super-blocks
    rng = np.random.default_rng([D, I, E, T, K, repack, int.from_bytes(os.urandom(4), "little")])
    wg, wu = (0.02 * rng.standard_normal((2, E, I, D))).astype(np.float32)
    wd = (0.02 * rng.standard_normal((E, D, I))).astype(np.float32)
    x, ids, w = _problem(rng, D, I, E, T, K)
    out, deq, info = bl.check(exe, "q4_K", repack, wg, wu, wd, x, ids, w)
    assert info["weight_buffer"] == ("CPU_REPACK" if repack else "CPU")
    for a, f in zip(deq, (wg, wu, wd)):       # ggml's own 4-bit rounding of the floats: a few % rms
        assert _rel(a, f) < 0.2
    ref = _reference(*deq, x, ids, w)
    assert _rel(out, ref) < REL_TOL


def test_to_q4_0_layout():
    """element j of a block in the low nibble of byte 2 + j, element j + 16 in its high nibble."""
    rng = np.random.default_rng()
    u = rng.integers(0, 16, (3, 64), dtype=np.uint8)
    s = _bf16(rng.uniform(0.01, 0.02, (3, 2)))
    b = bl.to_q4_0(u, s)
    assert b.shape == (3, 2, 18)
    assert np.array_equal(b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32), s)
    lo, hi = b[..., 2:] & 15, b[..., 2:] >> 4
    assert np.array_equal(np.concatenate([lo, hi], axis=-1).reshape(3, 64), u)
