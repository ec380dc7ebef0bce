"""8-bit accelerator-side weights (hybrid/model/int8_linear.py): Int8Linear against the dense weight it
stands for, the module swap (what is quantized, what stays: router, norms, embeddings, routed experts and
kv_b_proj, which the absorbed decode reads in place as W_UK / W_UV), plain vs absorbed attention on the
quantized model, and the logit error on the tiny synthetic checkpoint against the unquantized fp32 model
(tools/logit_match.py measure_8bit_logit_error). On a GPU: tests/test_cuda.py.
Run: pytest tests/test_gpu_weights.py (about 10 s).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))          # tools/ is not installed

from hybrid import LLM  # noqa: E402
from hybrid.model.attention import RMSNorm, Step  # noqa: E402
from hybrid.model.int8_linear import Int8Linear, quantize_model_linears  # noqa: E402
from hybrid.model.kv_cache import LatentCache  # noqa: E402
from hybrid.model.model import Router  # noqa: E402
from tools.logit_match import measure_8bit_logit_error  # noqa: E402

# Int8Linear(x) vs F.linear(x, q * scale): the same products in fp32, another summation order
TOL_LINEAR = dict(atol=1e-5, rtol=1e-5)
# per-channel absmax int8 on a Gaussian [70, 96] weight: step amax/127, ~0.6% rms relative error
INT8_WEIGHT_REL_MAX = 0.01
# plain vs absorbed attention on the same (quantized) weights, fp32: only the order of the products differs
# (kv_b_proj applied to the keys, or folded into the query and the output)
TOL_FORMS = dict(atol=1e-3, rtol=1e-3)
# int8 on the tiny checkpoints, routers replaying the reference's choices: measured rel-L2 per position
# 3.0-3.6% at worst over the four conftest variants (kv_b_proj unquantized; hidden 128: the per-row step is
# large), argmax agreement 94-98%.
FROZEN_REL_L2_MAX = 0.06
FROZEN_ARGMAX_MIN = 0.9
# free-running, a few routers flip near ties, as a bf16 run does (bf16 vs fp32 agrees on 91% too)
FREE_ARGMAX_MIN = 0.8
FREE_KL_MAX = 0.05
# fp8 e4m3 (3 mantissa bits) per output channel: about 5x int8's error (measured frozen rel-L2 max
# 15-16%, KL 0.014-0.018 over the four variants)
FP8_FROZEN_REL_L2_MAX = 0.3
FP8_FROZEN_KL_MAX = 0.05


@pytest.fixture(scope="module")
def int8_error(tiny_dir):
    return measure_8bit_logit_error(tiny_dir, "int8")


def test_int8_linear_is_the_dequantized_linear():
    lin = nn.Linear(96, 70, bias=False)
    q = Int8Linear.from_linear(lin, "int8")
    x = torch.randn(3, 96)
    assert q.weight_q.dtype == torch.int8 and q.weight_scale.shape == (70,)
    assert not hasattr(q, "weight"), "Int8Linear keeps no dense copy of its weight"
    dense = q.weight_q.float() * q.weight_scale[:, None]
    torch.testing.assert_close(q(x), F.linear(x, dense), **TOL_LINEAR)
    torch.testing.assert_close(q(x[None]), F.linear(x, dense)[None], **TOL_LINEAR)      # leading dims
    rel = (dense - lin.weight).norm() / lin.weight.norm()
    assert rel < INT8_WEIGHT_REL_MAX, f"int8 weight error {rel:.4f}"
    assert q.nbytes == 70 * 96 + 70 * 4
    with pytest.raises(ValueError, match="int8, fp8"):
        Int8Linear(4, 4, fmt="int4")


def test_swap_leaves_router_norms_embeddings_experts_and_kv_b(tiny_dir):
    llm = LLM(tiny_dir, expert_backend="torch", progress=False, cpu_weights="off")
    m = llm.model
    c = llm.config
    linears = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    kv_b = {n for n in linears if n.endswith("self_attn.kv_b_proj")}
    assert len(kv_b) == c.num_hidden_layers
    experts = [layer.mlp.experts for layer in m.model.layers if c.is_moe_layer(layer.self_attn.layer_idx)]
    kv_b_weights = {n: m.get_submodule(n).weight.detach().clone() for n in kv_b}
    info = quantize_model_linears(m, "int8")
    swapped = {n for n, mod in m.named_modules() if isinstance(mod, Int8Linear)}
    assert swapped == linears - kv_b and info["swapped"] == len(swapped)    # every other nn.Linear ...
    per_attn = 4 if c.q_lora_rank else 3          # q_a, q_b (or q), kv_a_with_mqa, o_proj
    n_dense = c.first_k_dense_replace
    n_moe = c.num_hidden_layers - n_dense
    assert len(swapped) == c.num_hidden_layers * per_attn + 3 * n_dense + 3 * n_moe + 1   # ... and lm_head
    # kv_b_proj: still the model dtype's nn.Linear, weights untouched (the absorbed decode reads them in place)
    left = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    assert left == kv_b
    for n in kv_b:
        w = m.get_submodule(n).weight
        assert type(m.get_submodule(n)) is nn.Linear and w.dtype == llm.dtype
        assert torch.equal(w, kv_b_weights[n])
    assert isinstance(m.model.embed_tokens, nn.Embedding)
    assert all(isinstance(mod, Router) and mod.weight.dtype == torch.float32
               for layer in m.model.layers[n_dense:] for mod in [layer.mlp.gate])
    assert all(isinstance(layer.input_layernorm, RMSNorm) for layer in m.model.layers)
    assert [layer.mlp.experts for layer in m.model.layers if c.is_moe_layer(layer.self_attn.layer_idx)] == experts
    assert info["bytes_after"] < 0.3 * info["bytes_before"]          # fp32 -> int8 + scales


def test_lm_head_can_stay_unquantized(tiny_dir):
    llm = LLM(tiny_dir, expert_backend="torch", progress=False, cpu_weights="off")
    quantize_model_linears(llm.model, "int8", lm_head=False)
    assert type(llm.model.lm_head) is nn.Linear
    assert isinstance(llm.model.model.layers[0].self_attn.o_proj, Int8Linear)
    with pytest.raises(ValueError, match="bf16, int8, fp8"):
        quantize_model_linears(llm.model, "int4")


def test_plain_and_absorbed_attention_agree_on_the_quantized_model(tiny_dir):
    """A prompt in both forms, and cached one-token decode steps (the batched absorbed path reading
    kv_b_proj as W_UK / W_UV) against a fresh plain forward over the whole prefix."""
    llm = LLM(tiny_dir, expert_backend="torch", progress=False, cpu_weights="off")
    quantize_model_linears(llm.model, "int8")
    model = llm.model
    ids = torch.randint(0, llm.config.vocab_size, (7,), generator=torch.Generator().manual_seed(7))
    plain = model(ids, Step.single(7))
    absorbed = model(ids, Step.single(7), absorb=True)
    torch.testing.assert_close(absorbed, plain, **TOL_FORMS)
    cache = LatentCache(llm.config, 1, 64, llm.dtype, llm.device)
    tokens = ids.tolist()
    logits = model(ids, Step.single(7), cache)[-1]
    for _ in range(5):
        tokens.append(int(logits.argmax()))
        logits = model(torch.tensor(tokens[-1:]), Step.single(1, start=len(tokens) - 1), cache)[-1]
        full = model(torch.tensor(tokens), Step.single(len(tokens)))[-1]
        torch.testing.assert_close(logits, full, **TOL_FORMS)


def test_int8_logit_error_is_small(int8_error):
    free, frozen, base = int8_error["free"], int8_error["frozen"], int8_error["bf16_baseline"]
    assert int8_error["format"] == "int8" and int8_error["lm_head_quantized"]
    assert frozen["rel_l2_max"] < FROZEN_REL_L2_MAX, int8_error
    assert frozen["argmax_agreement"] >= FROZEN_ARGMAX_MIN, int8_error
    assert free["argmax_agreement"] >= FREE_ARGMAX_MIN, int8_error
    assert free["kl_mean"] < FREE_KL_MAX, int8_error
    assert base["argmax_agreement"] >= FREE_ARGMAX_MIN                # the noise floor, for the record


def test_fp8_runs_with_a_looser_error(tiny_dir):
    r = measure_8bit_logit_error(tiny_dir, "fp8", n_tokens=32)
    assert r["frozen"]["rel_l2_max"] < FP8_FROZEN_REL_L2_MAX and r["frozen"]["kl_mean"] < FP8_FROZEN_KL_MAX, r
