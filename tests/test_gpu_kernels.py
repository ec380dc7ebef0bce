"""Triton kernels (gpu_kernels/) against their torch references, on the CPU via TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when a kernel is decorated, so the interpreter cases run in one child
process (`python tests/test_gpu_kernels.py` with the variable set) that prints a JSON verdict per
case; this pytest module never imports triton under the interpreter itself, so other test modules
are unaffected. Shapes are tiny and odd (T = 1, 3, 20; N not a multiple of the 64-wide block; cache
lengths 0, 1, 17, 40, 300; 20 heads = one full and one partial block of 16). In-process tests check
the INT4 reference against compressed-tensors' own unpacker (independent of gpu_kernels and of
hybrid/formats.py), the MLA reference against hybrid/model/attention.py's absorbed form, the CPU
dispatch, and that gpu_kernels imports nothing from hybrid/. The compiled kernels on a GPU:
tests/test_cuda.py. Run: pytest tests/test_gpu_kernels.py (about 10 s).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOL_FP32 = dict(atol=1e-4, rtol=1e-4)      # fp32 in, fp32 accumulate: only summation order differs
TOL_BF16 = dict(atol=2e-2, rtol=2e-2)      # bf16 inputs / outputs (one bf16 rounding of the result)
# per-channel absmax 8-bit weights, relative Frobenius error on Gaussian weights: int8's step is amax/127
# (~0.6% rms for K = 96); e4m3 keeps 3 mantissa bits (~2-3% rms)
INT8_WEIGHT_REL_MAX = 0.01
FP8_WEIGHT_REL_MAX = 0.05


# ---- cases run under the interpreter (child process) ----------------------------------------------
def _mla_inputs(B, H, R, P, S, Lmax, slots, lengths, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return (t(B, H, R), t(B, H, P), t(S, Lmax, R), t(S, Lmax, P),
            torch.tensor(slots), torch.tensor(lengths))


def _check_mla(B, H, R, P, S, Lmax, slots, lengths, dtype=torch.float32, seed=0):
    from gpu_kernels import mla_decode, mla_decode_ref, use_triton
    ql, qp, ckv, kpe, sl, ln = _mla_inputs(B, H, R, P, S, Lmax, slots, lengths, dtype, seed)
    assert use_triton(ql, ckv), "the wrapper should pick Triton under TRITON_INTERPRET=1"
    got = mla_decode(ql, qp, ckv, kpe, sl, ln, 0.3)
    want = mla_decode_ref(ql, qp, ckv, kpe, sl, ln, 0.3)
    torch.testing.assert_close(got.float(), want.float(), **(TOL_FP32 if dtype == torch.float32 else TOL_BF16))


def _int4_inputs(T, N, K, dtype, seed):
    from hybrid.formats import quantize_int4
    g = torch.Generator().manual_seed(seed)
    packed, scale = quantize_int4(torch.randn(N, K, generator=g) / K ** 0.5)
    return torch.randn(T, K, generator=g).to(dtype), packed, scale


def _check_int4(T, N, K, dtype=torch.float32, seed=0):
    from gpu_kernels import int4_matmul, int4_matmul_ref
    x, packed, scale = _int4_inputs(T, N, K, dtype, seed)
    got = int4_matmul(x, packed, scale)
    assert got.shape == (T, N) and got.dtype == dtype
    torch.testing.assert_close(got.float(), int4_matmul_ref(x, packed, scale).float(),
                               **(TOL_FP32 if dtype == torch.float32 else TOL_BF16))


def _check_int8(shape, N, fmt="int8", dtype=torch.float32, seed=0):
    from gpu_kernels import int8_matmul, int8_matmul_ref, quantize_weight_8bit
    g = torch.Generator().manual_seed(seed)
    K = shape[-1]
    q, s = quantize_weight_8bit(torch.randn(N, K, generator=g), fmt)
    x = torch.randn(*shape, generator=g).to(dtype)
    got = int8_matmul(x, q, s)
    assert got.shape == (*shape[:-1], N)
    torch.testing.assert_close(got.float(), int8_matmul_ref(x, q, s).float(),
                               **(TOL_FP32 if dtype == torch.float32 else TOL_BF16))


CASES = {
    "mla_lengths_1_17_40": lambda: _check_mla(3, 4, 32, 8, 4, 40, [2, 0, 3], [1, 17, 40]),
    "mla_empty_and_short": lambda: _check_mla(2, 4, 32, 8, 2, 8, [1, 0], [0, 5]),
    "mla_20_heads_split_300": lambda: _check_mla(1, 20, 24, 8, 2, 300, [1], [300], seed=1),
    "mla_batch_splits": lambda: _check_mla(2, 4, 16, 8, 3, 300, [2, 0], [300, 129], seed=2),
    "mla_bf16": lambda: _check_mla(2, 4, 32, 8, 2, 40, [1, 0], [40, 17], dtype=torch.bfloat16, seed=3),
    "int4_T1": lambda: _check_int4(1, 70, 96),
    "int4_T3": lambda: _check_int4(3, 70, 96, seed=1),
    "int4_T20_N130": lambda: _check_int4(20, 130, 64, seed=2),
    "int4_bf16": lambda: _check_int4(3, 70, 128, dtype=torch.bfloat16, seed=3),
    "int8_T1": lambda: _check_int8((1, 96), 70),
    "int8_T3_K50": lambda: _check_int8((3, 50), 70, seed=1),
    "int8_3d_T20": lambda: _check_int8((2, 10, 96), 130, seed=2),
    "int8_bf16": lambda: _check_int8((3, 96), 70, dtype=torch.bfloat16, seed=3),
    "fp8_T3": lambda: _check_int8((3, 96), 70, fmt="fp8", seed=4),
}


def _run_cases() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    verdict = {}
    for name, case in CASES.items():
        try:
            case()
            verdict[name] = "ok"
        except Exception as e:  # reported per case to the parent
            verdict[name] = f"{type(e).__name__}: {e}"
    return verdict


@pytest.fixture(scope="module")
def interpreter_verdicts():
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_under_interpreter(interpreter_verdicts, case):
    assert interpreter_verdicts[case] == "ok", interpreter_verdicts[case]


# ---- in-process: references and dispatch (torch only) ---------------------------------------------
def test_mla_reference_matches_model_absorbed_form(tiny_dir):
    """mla_decode_ref + W_UV equals MLAttention._absorbed (hybrid/model/attention.py) for decode steps:
    one query at the last cached position, so no causal mask."""
    from gpu_kernels import mla_decode_ref
    from hybrid.model.attention import MLAttention
    from hybrid.config import load_config
    config = load_config(tiny_dir)
    torch.manual_seed(0)
    att = MLAttention(config, 0)
    H, nope, R, P = att.h, att.nope, att.r, att.rope_dim
    lengths, slots = [1, 17, 40], [2, 0, 1]
    ckv, kpe = torch.randn(3, 40, R), torch.randn(3, 40, P)
    q_nope, q_pe = torch.randn(3, H, nope), torch.randn(3, H, P)
    w_uk, w_uv = (w.detach() for w in att._w_uk_uv())
    q_lat = torch.einsum("bhd,hdr->bhr", q_nope, w_uk)
    o_lat = mla_decode_ref(q_lat, q_pe, ckv, kpe, torch.tensor(slots), torch.tensor(lengths), att.scale)
    got = torch.einsum("bhr,hvr->bhv", o_lat, w_uv)
    with torch.no_grad():
        want = torch.cat([att._absorbed(q_nope[b:b + 1], q_pe[b:b + 1], ckv[s, :n], kpe[s, :n], None)
                          for b, (s, n) in enumerate(zip(slots, lengths))])
    torch.testing.assert_close(got, want, **TOL_FP32)


def test_wrappers_use_reference_on_cpu():
    import gpu_kernels
    from gpu_kernels import int4_matmul, int4_matmul_ref, int8_matmul, int8_matmul_ref, quantize_weight_8bit
    if gpu_kernels.interpreting():
        pytest.skip("this process runs under TRITON_INTERPRET=1")
    x, packed, scale = _int4_inputs(3, 70, 96, torch.float32, 0)
    assert not gpu_kernels.use_triton(x, packed, scale)
    assert torch.equal(int4_matmul(x, packed, scale), int4_matmul_ref(x, packed, scale))
    q, s = quantize_weight_8bit(torch.randn(70, 96))
    assert torch.equal(int8_matmul(x, q, s), int8_matmul_ref(x, q, s))


def _ct_dense(packed: torch.Tensor, scale: torch.Tensor, K: int, group: int = 32) -> torch.Tensor:
    """W = bf16(q * scale) with q from compressed-tensors' own unpacker (not gpu_kernels, not hybrid.formats)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    q = unpack_from_int32(packed, 4, torch.Size([packed.shape[0], K]))            # int8 in [-8, 7]
    s = scale.to(torch.bfloat16).repeat_interleave(group, dim=1)[:, :K]
    return q.to(torch.bfloat16) * s                                                # bf16 product: rounded to bf16


@pytest.mark.parametrize("T,N,K", [(1, 70, 96), (3, 70, 96), (20, 130, 64), (5, 33, 100)])
def test_int4_reference_matches_compressed_tensors_unpacker(T, N, K):
    """gpu_kernels.int4_matmul_ref (its own unpack) against compressed-tensors' unpack_from_int32, on
    arbitrary words (every nibble value, negative words) with random bf16 scales of both signs, and on
    words from hybrid.formats.quantize_int4. K = 100: a last word and a last group only partly used."""
    from gpu_kernels import int4_matmul_ref
    g = torch.Generator().manual_seed(T * 1000 + N)
    words = torch.randint(-2**31, 2**31, (N, -(-K // 8)), generator=g, dtype=torch.int64).to(torch.int32)
    scale = (torch.randn(N, -(-K // 32), generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(T, K, generator=g)
    got = int4_matmul_ref(x, words, scale)
    assert got.shape == (T, N) and got.dtype == torch.float32
    torch.testing.assert_close(got, x @ _ct_dense(words, scale, K).float().T, **TOL_FP32)
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(int4_matmul_ref(xb, words, scale).float(),
                               (xb.float() @ _ct_dense(words, scale, K).float().T).to(torch.bfloat16).float(),
                               **TOL_BF16)
    if K % 32 == 0:
        x, packed, scale = _int4_inputs(T, N, K, torch.float32, 1)
        torch.testing.assert_close(int4_matmul_ref(x, packed, scale), x @ _ct_dense(packed, scale, K).float().T,
                                   **TOL_FP32)


def test_gpu_kernels_import_nothing_from_hybrid():
    """A fresh interpreter imports gpu_kernels and runs every reference (late imports included):
    no `hybrid` module gets loaded."""
    code = (
        "import sys, torch\n"
        "import gpu_kernels as g\n"
        "x = torch.randn(3, 64)\n"
        "g.int4_matmul(x, torch.zeros(5, 8, dtype=torch.int32), torch.ones(5, 2, dtype=torch.bfloat16))\n"
        "g.int8_matmul(x, *g.quantize_weight_8bit(torch.randn(5, 64)))\n"
        "g.mla_decode(torch.randn(1, 2, 8), torch.randn(1, 2, 4), torch.randn(1, 3, 8), torch.randn(1, 3, 4),\n"
        "             torch.tensor([0]), torch.tensor([3]), 0.5)\n"
        "print(sorted(m for m in sys.modules if m == 'hybrid' or m.startswith('hybrid.')))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", f"gpu_kernels imported {proc.stdout.strip()}"


@pytest.mark.parametrize("fmt,bound", [("int8", INT8_WEIGHT_REL_MAX), ("fp8", FP8_WEIGHT_REL_MAX)])
def test_8bit_weight_quantization_error(fmt, bound):
    """Per-channel absmax 8-bit: relative Frobenius error of the weight stays below `bound`."""
    from gpu_kernels import quantize_weight_8bit
    w = torch.randn(130, 96)
    q, s = quantize_weight_8bit(w, fmt)
    err = (q.float() * s[:, None] - w).norm() / w.norm()
    assert err < bound, f"{fmt}: relative weight error {err:.4f}"
    with pytest.raises(ValueError, match="int8"):
        quantize_weight_8bit(w, "int4")


if __name__ == "__main__":
    print(json.dumps(_run_cases()))
