"""CPU dense Linears (cpu_kernels/dense.py, cpu_kernels/mla_absorb.py, hybrid/model/cpu_linear.py): the Numba
matrix-vector kernels and MLA's absorbed kv_b_proj kernels against float64 numpy references
(cpu_kernels.reference.linear_ref, mla_absorb.reference) on fresh random inputs with odd sizes, the
model's cached absorbed decode through them against torch's bmm in float32 and bfloat16, CPULinear
against F.linear on the weight it stands for (decode and prefill paths),
the module swap, and the logit error of the swapped tiny checkpoints against the unswapped fp32
model (bf16 storage: the checkpoint's own values, so only the summation order differs; int8: the
per-channel quantization error, bounded like --gpu-weights int8 in tests/test_gpu_weights.py).
Run: pytest tests/test_cpu_dense.py (about 30 s, Numba compiles on first use).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpu_kernels.dense import linear, linear_bf16, linear_int8
from cpu_kernels.mla_absorb import absorb_output, absorb_query
from cpu_kernels.mla_absorb import reference as mla_reference
from cpu_kernels.reference import linear_ref
from hybrid import LLM
from hybrid.model import cpu_linear
from hybrid.model.cpu_linear import CPULinear, swap_cpu_linears

# fp32 accumulation vs float64: error <= ~K * 2^-24 * sum|x w|; bound it relative to sum|x||w| per output
KERNEL_REL_TO_ABS_SUM = 1e-5
# CPULinear vs F.linear in fp32 on the same weight: another summation order only
TOL_LINEAR = dict(atol=1e-4, rtol=1e-4)
# bf16 storage of a bf16 checkpoint run in float32: the same products, another order (measured ~1e-6)
BF16_LOGIT_REL_L2_MAX = 1e-4
# int8 per channel on the tiny checkpoints, frozen routing not needed: measured rel-L2 per position
# 2-4% (tests/test_gpu_weights.py bounds the same quantizer at 6% with routers replayed; free-running
# routers may flip near ties, so the bound here is on argmax agreement and the mean rel-L2)
INT8_LOGIT_REL_L2_MEAN_MAX = 0.08
INT8_ARGMAX_MIN = 0.8

# K past one BLOCK_BYTES block (256 bf16 / 512 int8 values), with and without a tail
SIZES = [(1, 1, 1), (1, 37, 91), (3, 70, 96), (4, 33, 257), (5, 129, 64), (16, 47, 200), (17, 23, 31),
         (1, 9, 1024), (6, 11, 2051), (4, 5, 513), (8, 7, 600), (16, 6, 300), (11, 9, 1030)]


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _bits_to_f32(w: np.ndarray) -> np.ndarray:
    return (w.astype(np.uint32) << 16).view(np.float32)


def _abs_bound(x, wf):
    """KERNEL_REL_TO_ABS_SUM * sum_k |x[t,k]| |W[n,k]| (W dense float [N, K])."""
    return KERNEL_REL_TO_ABS_SUM * (np.abs(x).astype(np.float64) @ np.abs(wf).astype(np.float64).T) + 1e-30


@pytest.mark.parametrize("T,N,K", SIZES)
def test_bf16_kernel_matches_reference(T, N, K):
    rng = np.random.default_rng()
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = _bf16_bits(rng.standard_normal((N, K)).astype(np.float32))
    y = np.empty((T, N), np.float32)
    linear_bf16(w, x, y)
    ref = linear_ref(x, w)
    assert np.all(np.abs(y - ref) <= _abs_bound(x, _bits_to_f32(w))), np.abs(y - ref).max()


@pytest.mark.parametrize("T,N,K", SIZES)
def test_int8_kernel_matches_reference(T, N, K):
    rng = np.random.default_rng()
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = rng.integers(-127, 128, (N, K), dtype=np.int8)
    scale = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    y = np.empty((T, N), np.float32)
    linear_int8(w, scale, x, y)
    ref = linear_ref(x, w, scale)
    assert np.all(np.abs(y - ref) <= _abs_bound(x, w * scale[:, None])), np.abs(y - ref).max()


def test_linear_entry_point_checks_its_inputs():
    w = np.zeros((5, 7), np.int8)
    with pytest.raises(ValueError, match="scale"):
        linear(w, np.zeros((1, 7), np.float32))
    with pytest.raises(ValueError, match="shapes"):
        linear(w, np.zeros((1, 6), np.float32), np.ones(5, np.float32))
    with pytest.raises(ValueError, match="dtype"):
        linear(np.zeros((5, 7), np.float32), np.zeros((1, 7), np.float32))
    assert linear(w, np.ones((2, 7), np.float32), np.ones(5, np.float32)).shape == (2, 5)


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 16, 40, 65])  # <= DECODE_ROWS (64): Numba; more: torch's matmul
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_linear_is_the_linear_of_its_weight(fmt, rows, dtype):
    lin = nn.Linear(97, 71, bias=False)
    m = CPULinear.from_linear(lin, fmt)
    w = m.dense_weight()                                  # the weight it stands for, fp32
    if fmt == "bf16":
        assert torch.equal(w, lin.weight.detach().to(torch.bfloat16).float())
        assert m.nbytes == 97 * 71 * 2
    else:
        assert (w - lin.weight.detach()).abs().max() <= lin.weight.detach().abs().amax(1).max() / 127 / 2 + 1e-6
        assert m.nbytes == 97 * 71 + 71 * 4
    x = torch.randn(rows, 97).to(dtype)
    got = m(x.reshape(1, rows, 97))
    assert got.dtype == dtype and got.shape == (1, rows, 71)
    ref = F.linear(x.float(), w)
    tol = TOL_LINEAR if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)   # bf16 output rounding
    torch.testing.assert_close(got.reshape(rows, 71).float(), ref, **tol)


def test_prefill_buffer_made_in_inference_mode_is_usable_outside():
    """The reused widening buffer (first made under the engine's inference_mode) takes writes outside it."""
    m = CPULinear.from_linear(nn.Linear(33, 90, bias=False), "bf16")
    x = torch.randn(cpu_linear.DECODE_ROWS + 1, 33)
    cpu_linear._local.__dict__.clear()
    with torch.inference_mode():
        a = m(x)
    b = m(x)
    torch.testing.assert_close(a, b)


def test_cpu_linear_prefill_chunks(monkeypatch):
    monkeypatch.setattr(cpu_linear, "PREFILL_CHUNK_BYTES", 4 * 13 * 5)     # 5 rows per chunk, 71 = 14*5+1
    lin = nn.Linear(13, 71, bias=False)
    m = CPULinear.from_linear(lin, "int8")
    x = torch.randn(20, 13)
    torch.testing.assert_close(m(x), F.linear(x, m.dense_weight()), **TOL_LINEAR)


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="not supported"):
        CPULinear(4, 4, "fp8")
    with pytest.raises(ValueError, match="not supported"):
        swap_cpu_linears(nn.Sequential(), "int4")


def _score(llm, ids):
    return llm.score(ids).float()


def _rel_l2(ref, got):
    return ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).float()


@pytest.fixture(scope="module")
def tiny_logits(tiny_dir):
    llm = LLM(tiny_dir, device="cpu", dtype=torch.float32, progress=False, cpu_weights="off")   # torch's Linears
    ids = torch.randint(0, llm.config.vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    return llm, ids, _score(llm, ids)


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_swapped_model_logits(tiny_dir, tiny_logits, fmt, monkeypatch):
    _, ids, ref = tiny_logits
    llm = LLM(tiny_dir, device="cpu", dtype=torch.float32, progress=False, cpu_weights="off")
    info = swap_cpu_linears(llm.model, fmt)
    swapped = [n for n, m in llm.model.named_modules() if isinstance(m, CPULinear)]
    assert info["swapped"] == len(swapped) > 0 and "lm_head" in swapped
    assert any("kv_b_proj" in n for n in swapped) and not any(n.endswith("mlp.gate") for n in swapped)
    assert info["bytes_after"] < info["bytes_before"] / (1.9 if fmt == "bf16" else 3.5)
    monkeypatch.setattr(cpu_linear, "DECODE_ROWS", 10 ** 9)                     # every row through Numba
    got = _score(llm, ids)
    err = _rel_l2(ref, got)
    if fmt == "bf16":
        assert err.max() <= BF16_LOGIT_REL_L2_MAX, err.max()
    else:
        assert err.mean() <= INT8_LOGIT_REL_L2_MEAN_MAX, err
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= INT8_ARGMAX_MIN


def test_swapped_model_generates_like_the_prefill_path(tiny_dir):
    """Greedy decode (1-row calls: Numba) and scoring the same text (prefill: torch) agree, on the
    default CPU setting (cpu_weights auto = bf16)."""
    llm = LLM(tiny_dir, device="cpu", dtype=torch.float32, progress=False)
    assert any(isinstance(m, CPULinear) for m in llm.model.modules())
    from hybrid import SamplingParams
    prompt = [5, 9, 2, 7]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    toks = list(out.token_ids)
    logits = llm.score(prompt + toks[:-1]).float()
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == toks


TOL_LLM_BF16 = 1e-4      # fp32 accumulation in another order over the same bf16 weight values


def test_llm_cpu_weights_option(tiny_dir):
    """The CPU default (cpu_weights auto) and "bf16" score like torch's float32 Linears (exact weights,
    fp32 sums) and say so in the placement summary; cpu_weights on a non-CPU setting or an unknown value
    is an error."""
    import hybrid
    ids = list(range(3, 40))
    base = hybrid.LLM(tiny_dir, device="cpu", expert_backend="torch", progress=False, max_context=256,
                      cpu_weights="off")
    assert not any(isinstance(m, CPULinear) for m in base.model.modules())
    a = base.score(ids)
    for choice in ("auto", "bf16"):
        ours = hybrid.LLM(tiny_dir, device="cpu", expert_backend="torch", progress=False, max_context=256,
                          **({} if choice == "auto" else {"cpu_weights": choice}))
        assert ours.cpu_weights == "bf16" and ours.placement()["cpu_weights"].startswith("bf16")
        assert sum(isinstance(m, CPULinear) for m in ours.model.modules()) > 0
        b = ours.score(ids)
        assert (a - b).abs().max() <= TOL_LLM_BF16 * a.abs().max()
    with pytest.raises(ValueError, match="cpu_weights"):
        hybrid.LLM(tiny_dir, device="cpu", progress=False, max_context=256, cpu_weights="fp4")


def test_auto_resolution_and_fallbacks(monkeypatch):
    """auto: bf16 on the CPU only, off with a GPU or quantized gpu_weights, and a stated fallback when numba's
    threading layer cannot run two kernels at once; explicit formats where they cannot apply are errors."""
    assert cpu_linear.resolve_cpu_weights("auto", "cpu")[0] == "bf16"
    assert cpu_linear.resolve_cpu_weights("auto", "cuda")[0] == "off"
    assert cpu_linear.resolve_cpu_weights("auto", "cpu", "int8")[0] == "off"
    assert cpu_linear.resolve_cpu_weights("int8", "cpu")[0] == "int8"
    with pytest.raises(ValueError, match="CPU"):
        cpu_linear.resolve_cpu_weights("bf16", "cuda")
    monkeypatch.setattr(cpu_linear, "threading_layer", lambda: "workqueue")
    fmt, why = cpu_linear.resolve_cpu_weights("auto", "cpu")
    assert fmt == "off" and why.startswith("FALLBACK") and "workqueue" in why


def test_auto_keeps_linears_that_are_not_bf16_values():
    """exact_only (the auto default): a float32 weight that bf16 would round stays an nn.Linear."""
    model = nn.Module()
    model.lm_head = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(8, 64).to(torch.bfloat16).float())     # exact bf16 values
    info = swap_cpu_linears(model, "bf16", exact_only=True)
    assert info == {"swapped": 1, "kept": 0, "bytes_before": 8 * 64 * 4, "bytes_after": 8 * 64 * 2}
    model.lm_head = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(8, 64) * (1 + 2 ** -12))              # not bf16 values
    info = swap_cpu_linears(model, "bf16", exact_only=True)
    assert info["swapped"] == 0 and info["kept"] == 1 and isinstance(model.lm_head, nn.Linear)


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
@pytest.mark.parametrize("H,D,R,V,B", [(1, 1, 1, 1, 1), (3, 5, 37, 7, 1), (2, 128, 512, 128, 3), (5, 9, 100, 11, 6),
                                       (4, 16, 70, 24, 16)])
def test_mla_absorb_kernels(fmt, H, D, R, V, B):
    """MLA's absorbed query / output (cpu_kernels/mla_absorb.py) against float64 numpy einsums on the same
    widened weights, odd sizes and 1-16 tokens; bound relative to sum |q| |w| per output as above."""
    rng = np.random.default_rng(H * 1000 + R + B)
    if fmt == "bf16":
        w = (rng.standard_normal((H, D + V, R)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        s_uk, s_uv, scales = np.zeros((H, 0), np.float32), np.zeros((H, 0), np.float32), None
        wf = (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    else:
        w = rng.integers(-127, 128, (H, D + V, R)).astype(np.int8)
        s_uk, s_uv = rng.random((H, D)).astype(np.float32), rng.random((H, V)).astype(np.float32)
        scales = (s_uk, s_uv)
        wf = w.astype(np.float64) * np.concatenate([s_uk, s_uv], 1)[:, :, None]
    w_uk, w_uv = np.ascontiguousarray(w[:, :D]), np.ascontiguousarray(w[:, D:])
    q = rng.standard_normal((B, H, D)).astype(np.float32)
    o = rng.standard_normal((H, B, R)).astype(np.float32)
    q_lat, y = np.empty((B, H, R), np.float32), np.empty((H, B, V), np.float32)
    absorb_query(w_uk, s_uk, q, q_lat)
    absorb_output(w_uv, s_uv, o, y)
    ref_q, ref_y = mla_reference((w_uk, w_uv), scales, q, o)
    abs_q = np.einsum("bhd,hdr->bhr", np.abs(q), np.abs(wf[:, :D]))
    abs_y = np.einsum("hbr,hvr->hbv", np.abs(o), np.abs(wf[:, D:]))
    assert np.all(np.abs(q_lat - ref_q) <= KERNEL_REL_TO_ABS_SUM * abs_q + 1e-30)
    assert np.all(np.abs(y - ref_y) <= KERNEL_REL_TO_ABS_SUM * abs_y + 1e-30)


# a bfloat16 model's decode, our kernels against torch's bf16 bmm / Linears on the same weights: both round
# activations to bf16 between ops (2^-8 relative each) and sum in another order; 40 teacher-forced steps
BF16_DECODE_REL_MAX = 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absorbed_decode_through_our_kernels(tiny_dir, dtype):
    """Cached one-token decode steps (the absorbed form: kv_b_proj through mla_query / mla_output) of the
    default CPU setting against torch's Linears and bmm (cpu_weights off), same tokens, both dtypes."""
    from hybrid.model.attention import Step
    from hybrid.model.kv_cache import LatentCache
    models = [LLM(tiny_dir, device="cpu", dtype=dtype, progress=False, max_context=128, cpu_weights=cw)
              for cw in ("off", "auto")]
    assert isinstance(models[1].model.model.layers[0].self_attn.kv_b_proj, CPULinear)
    tokens = torch.randint(0, 2048, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    caches = [LatentCache(m.config, 1, 128, dtype, m.device) for m in models]
    outs = [m.model(torch.tensor(tokens), Step.single(len(tokens)), c)[-1] for m, c in zip(models, caches)]
    worst = 0.0
    for i in range(40):
        tokens.append(int(outs[0].argmax()))
        outs = [m.model(torch.tensor(tokens[-1:]), Step.single(1, start=len(tokens) - 1), c)[-1].float()
                for m, c in zip(models, caches)]
        worst = max(worst, ((outs[1] - outs[0]).abs().max() / outs[0].abs().max()).item())
    bound = BF16_DECODE_REL_MAX if dtype == torch.bfloat16 else TOL_LLM_BF16
    assert worst <= bound, worst
