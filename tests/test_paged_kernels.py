"""gpu_kernels/paged_mla_decode.py: the paged decode kernel under TRITON_INTERPRET=1 against its torch
reference (fp32, bf16, int8 and fp8 caches; page sizes 1, 4, 16, 64; lengths 0, 1, 17, 40, 300 —
block and split boundaries; block tables in shuffled order), the reference against an independent
float64 softmax over a contiguous copy of the keys, and the 8-bit row quantizers' error (int8: at most
half a step per value; e4m3: 3 mantissa bits). As in tests/test_gpu_kernels.py, the interpreter cases
run in one child process (`python tests/test_paged_kernels.py` with the variable set).
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
TOL_REF64 = dict(atol=1e-5, rtol=1e-5)     # fp32 reference against float64 math
FP8_REL_STEP = 2.0 ** -4                   # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4
# decode output (o_lat) with 8-bit keys against the same keys unquantized, relative Frobenius error on
# Gaussian keys (R = 24, queries x2 so softmax is peaked): measured int8 8.7e-3, e4m3 6.1e-2
TOL_OLAT_INT8, TOL_OLAT_FP8 = 2e-2, 1.2e-1


def paged_inputs(B, H, R, P, page, lengths, dtype, seed, fmt=None):
    """Random queries and per-sequence keys, scattered into a pool of shuffled blocks.
    Returns (q_lat, q_pe, ckv, kpe, ckv_scale, kpe_scale, block_table, lengths, keys) with keys[b] =
    (kc [n, R], kp [n, P]) in float32 as the cache holds them (dequantized for 8-bit)."""
    from gpu_kernels.paged_mla_decode import dequantize_rows, quantize_rows, storage_dtype
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-n // page) for n in lengths]
    total = sum(nblk) + 3                                            # a few spare blocks
    perm = torch.randperm(total, generator=g).tolist()
    width = max(max(nblk), 1)
    table = torch.zeros(B, width, dtype=torch.int32)
    ckv = torch.zeros(total * page, R, dtype=storage_dtype(fmt, dtype))
    kpe = torch.zeros(total * page, P, dtype=storage_dtype(fmt, dtype))
    cs, ps = torch.zeros(total * page), torch.zeros(total * page)
    keys, used = [], 0
    for b, n in enumerate(lengths):
        blocks = perm[used:used + nblk[b]]
        used += nblk[b]
        table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        kc, kp = torch.randn(n, R, generator=g), torch.randn(n, P, generator=g) * 3
        rows = torch.tensor([blocks[t // page] * page + t % page for t in range(n)], dtype=torch.long)
        if fmt:
            (qc, sc), (qp, sp) = quantize_rows(kc, fmt), quantize_rows(kp, fmt)
            ckv[rows], cs[rows], kpe[rows], ps[rows] = qc, sc, qp, sp
            kc, kp = dequantize_rows(qc, sc, fmt, torch.float32), dequantize_rows(qp, sp, fmt, torch.float32)
        else:
            ckv[rows], kpe[rows] = kc.to(dtype), kp.to(dtype)
            kc, kp = kc.to(dtype).float(), kp.to(dtype).float()
        keys.append((kc, kp))
    q_lat = torch.randn(B, H, R, generator=g).to(dtype)
    q_pe = torch.randn(B, H, P, generator=g).to(dtype)
    return q_lat, q_pe, ckv, kpe, cs, ps, table, torch.tensor(lengths), keys


def _check(B, H, R, P, page, lengths, dtype=torch.float32, fmt=None, seed=0):
    from gpu_kernels import use_triton
    from gpu_kernels.paged_mla_decode import paged_mla_decode, paged_mla_decode_ref
    q_lat, q_pe, ckv, kpe, cs, ps, table, ln, _ = paged_inputs(B, H, R, P, page, lengths, dtype, seed, fmt)
    assert use_triton(q_lat, ckv), "the wrapper should pick Triton under TRITON_INTERPRET=1"
    args = (q_lat, q_pe, ckv, kpe, table, ln, page, 0.3, cs, ps)
    got = paged_mla_decode(*args, fmt=fmt)
    want = paged_mla_decode_ref(*args, fmt=fmt)
    tol = TOL_FP32 if dtype == torch.float32 else TOL_BF16
    torch.testing.assert_close(got.float(), want.float(), **tol)


CASES = {
    "page16_lengths_1_17_40": lambda: _check(3, 4, 32, 8, 16, [1, 17, 40]),
    "page1_empty_and_short": lambda: _check(2, 4, 32, 8, 1, [0, 5]),
    "page4_20_heads_split_300": lambda: _check(1, 20, 24, 8, 4, [300], seed=1),
    "page64_batch_splits": lambda: _check(2, 4, 16, 8, 64, [300, 129], seed=2),
    "page16_bf16": lambda: _check(2, 4, 32, 8, 16, [40, 17], dtype=torch.bfloat16, seed=3),
    "page16_int8_fp32": lambda: _check(3, 4, 32, 8, 16, [1, 40, 300], fmt="int8", seed=4),
    "page4_fp8_fp32": lambda: _check(2, 20, 24, 8, 4, [17, 129], fmt="fp8", seed=5),
    "page16_int8_bf16": lambda: _check(2, 4, 32, 8, 16, [40, 17], dtype=torch.bfloat16, fmt="int8", seed=6),
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
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_paged_kernel_under_interpreter(interpreter_verdicts, case):
    assert interpreter_verdicts[case] == "ok", interpreter_verdicts[case]


# ---- in-process: the reference and the quantizers (torch only) --------------------------------------
@pytest.mark.parametrize("impl", ["ref", "torch", "torch_fallback"])
@pytest.mark.parametrize("page,fmt", [(1, None), (4, None), (16, None), (64, None), (4, "int8"), (16, "fp8")])
def test_paged_reference_equals_float64_softmax_over_contiguous_keys(page, fmt, impl, monkeypatch):
    """The reference (per-sequence loop) and the batched torch path (one padded gather, the CPU's; and its
    fallback to the loop past BATCHED_MAX_ROWS) walk the shuffled block tables to the right rows: the output
    equals softmax attention in float64 over each sequence's keys kept aside contiguously (dequantized for
    8-bit); a sequence of length 0 gives zeros."""
    import importlib
    pmd = importlib.import_module("gpu_kernels.paged_mla_decode")    # the module (the package exports the function)
    if impl == "torch_fallback":
        monkeypatch.setattr(pmd, "BATCHED_MAX_ROWS", 1)
    fn = pmd.paged_mla_decode_ref if impl == "ref" else pmd.paged_mla_decode_torch
    lengths = [0, 1, page, page + 1, 37]
    q_lat, q_pe, ckv, kpe, cs, ps, table, ln, keys = paged_inputs(5, 3, 24, 8, page, lengths, torch.float32,
                                                                   seed=page, fmt=fmt)
    got = fn(q_lat, q_pe, ckv, kpe, table, ln, page, 0.3, cs, ps, fmt=fmt)
    for b, (kc, kp) in enumerate(keys):
        if lengths[b] == 0:
            assert torch.all(got[b] == 0)
            continue
        s = (q_lat[b].double() @ kc.double().T + q_pe[b].double() @ kp.double().T) * 0.3
        want = torch.softmax(s, -1) @ kc.double()
        torch.testing.assert_close(got[b].double(), want, **TOL_REF64)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_8bit_rows_round_trip(fmt):
    """One scale per row: int8 values land within half a step (scale/2) of the input; e4m3 within 2^-4
    relative (3 mantissa bits) for values above the subnormal range; all-zero rows stay zero."""
    from gpu_kernels.paged_mla_decode import dequantize_rows, quantize_rows
    x = torch.randn(37, 61) * torch.logspace(-3, 2, 37)[:, None]
    x[5] = 0
    q, s = quantize_rows(x, fmt)
    assert q.dtype == (torch.int8 if fmt == "int8" else torch.uint8) and s.shape == (37,)
    y = dequantize_rows(q, s, fmt, torch.float32)
    assert torch.all(y[5] == 0)
    if fmt == "int8":
        assert torch.all((y - x).abs() <= s[:, None] / 2 * (1 + 1e-5))
    else:
        normal = x.abs() >= s[:, None] * 2.0 ** -6                  # e4m3's smallest normal is 2^-6
        rel = ((y - x).abs() / x.abs().clamp_min(1e-30))[normal]
        assert rel.max() <= FP8_REL_STEP * (1 + 1e-5)


@pytest.mark.parametrize("fmt,bound", [("int8", TOL_OLAT_INT8), ("fp8", TOL_OLAT_FP8)])
def test_8bit_cache_attention_error(fmt, bound):
    """The same keys stored 8-bit and fp32: the decode output differs by less than `bound` (relative)."""
    from gpu_kernels.paged_mla_decode import paged_mla_decode_ref, quantize_rows
    q_lat, q_pe, ckv, kpe, cs, ps, table, ln, _ = paged_inputs(4, 8, 24, 8, 16, [7, 40, 129, 300],
                                                               torch.float32, seed=11)
    q_lat, q_pe = q_lat * 2, q_pe * 2
    (qc, sc), (qp, sp) = quantize_rows(ckv, fmt), quantize_rows(kpe, fmt)
    want = paged_mla_decode_ref(q_lat, q_pe, ckv, kpe, table, ln, 16, 0.3)
    got = paged_mla_decode_ref(q_lat, q_pe, qc, qp, table, ln, 16, 0.3, sc, sp, fmt=fmt)
    err = ((got - want).norm() / want.norm()).item()
    print(f"{fmt}: o_lat relative error {err:.2e}")
    assert err < bound, f"{fmt}: {err:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,fmt", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "int8"),
                                       (torch.bfloat16, "fp8"), (torch.float32, "int8")])
def test_compiled_paged_kernel_on_cuda(dtype, fmt):
    """The compiled kernel on the GPU against the torch reference (on the CPU copies), page 64 and 16."""
    from gpu_kernels.paged_mla_decode import paged_mla_decode, paged_mla_decode_ref
    for page, lengths in ((64, [1, 63, 64, 65, 700]), (16, [0, 17, 300])):
        args = paged_inputs(len(lengths), 20, 64, 16, page, lengths, dtype, seed=page, fmt=fmt)[:8]
        q_lat, q_pe, ckv, kpe, cs, ps, table, ln = args
        want = paged_mla_decode_ref(q_lat, q_pe, ckv, kpe, table, ln, page, 0.3, cs, ps, fmt=fmt)
        dev = [t.cuda() for t in args]
        got = paged_mla_decode(*dev[:4], dev[6], dev[7], page, 0.3, dev[4], dev[5], fmt=fmt)
        torch.testing.assert_close(got.cpu().float(), want.float(),
                                   **(TOL_FP32 if dtype == torch.float32 else TOL_BF16))


def test_paged_module_imports_nothing_from_hybrid():
    """A fresh interpreter imports gpu_kernels.paged_mla_decode and runs its reference and quantizers:
    no `hybrid` module gets loaded (gpu_kernels stays independent of the package)."""
    code = (
        "import sys, torch\n"
        "from gpu_kernels.paged_mla_decode import paged_mla_decode, quantize_rows\n"
        "q, s = quantize_rows(torch.randn(8, 8), 'int8')\n"
        "paged_mla_decode(torch.randn(1, 2, 8), torch.randn(1, 2, 4), q, q[:, :4].contiguous(),\n"
        "                 torch.tensor([[1, 0]]), torch.tensor([5]), 4, 0.5, s, s, fmt='int8')\n"
        "print(sorted(m for m in sys.modules if m == 'hybrid' or m.startswith('hybrid.')))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", f"imported {proc.stdout.strip()}"


def test_paged_wrapper_uses_the_batched_torch_path_on_cpu():
    import gpu_kernels
    from gpu_kernels.paged_mla_decode import paged_mla_decode, paged_mla_decode_ref, paged_mla_decode_torch
    if gpu_kernels.interpreting():
        pytest.skip("this process runs under TRITON_INTERPRET=1")
    for dtype, tol in ((torch.float32, TOL_FP32), (torch.bfloat16, TOL_BF16)):
        q_lat, q_pe, ckv, kpe, cs, ps, table, ln, _ = paged_inputs(3, 3, 16, 8, 4, [5, 9, 2], dtype, 0)
        args = (q_lat, q_pe, ckv, kpe, table, ln, 4, 0.3)
        got = paged_mla_decode(*args)
        assert got.dtype == dtype and torch.equal(got, paged_mla_decode_torch(*args))
        torch.testing.assert_close(got.float(), paged_mla_decode_ref(*args).float(), **tol)


if __name__ == "__main__":
    print(json.dumps(_run_cases()))
