"""8-bit accelerator-side weights (hybrid/gpu_weights.py): Int8Linear, the module swap, and the
logit error on tiny synthetic checkpoints against the unquantized fp32 model.
Run: pytest tests/test_gpu_weights.py (about 5 s).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybrid import LLM
from hybrid.model.attention import RMSNorm, Step
from hybrid.model.int8_linear import Int8Linear, measure_int8_logit_error, quantize_model_linears
from hybrid.model.model import Router

# int8 on the tiny checkpoint, routers replaying the reference's choices: measured rel-L2 per
# position 2.2-2.6% mean, 3.5-4.2% max over three variants (hidden 128: the per-row step is large).
FROZEN_REL_L2_MAX = 0.06
# free-running, a few routers flip near ties, as a bf16 run does (bf16 vs fp32 agrees on 91% too)
FREE_ARGMAX_MIN = 0.8


@pytest.fixture(scope="module")
def int8_error(tiny_dir):
    return measure_int8_logit_error(tiny_dir, "int8")


def test_int8_linear_is_the_dequantized_linear():
    lin = nn.Linear(96, 70, bias=False)
    q = Int8Linear.from_linear(lin, "int8")
    x = torch.randn(3, 96)
    assert q.weight_q.dtype == torch.int8 and q.weight_scale.shape == (70,)
    torch.testing.assert_close(q(x), F.linear(x, q.weight), atol=1e-5, rtol=1e-5)
    rel = (q.weight - lin.weight).norm() / lin.weight.norm()
    assert rel < 0.01, f"int8 weight error {rel:.4f}"
    assert q.nbytes == 70 * 96 + 70 * 4
    with pytest.raises(ValueError, match="int8, fp8"):
        Int8Linear(4, 4, fmt="int4")


def test_swap_leaves_router_norms_embeddings_and_experts(tiny_dir):
    llm = LLM(tiny_dir, expert_backend="torch", progress=False)
    m = llm.model
    c = llm.config
    linears = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    experts = [layer.mlp.experts for layer in m.model.layers if c.is_moe_layer(layer.self_attn.layer_idx)]
    info = quantize_model_linears(m, "int8")
    swapped = {n for n, mod in m.named_modules() if isinstance(mod, Int8Linear)}
    assert swapped == linears and info["swapped"] == len(linears)      # every nn.Linear of the model ...
    assert not any(isinstance(mod, nn.Linear) for mod in m.modules())
    per_attn = 5 if c.q_lora_rank else 3
    n_dense = c.first_k_dense_replace
    n_moe = c.num_hidden_layers - n_dense
    assert len(swapped) == c.num_hidden_layers * per_attn + 3 * n_dense + 3 * n_moe + 1   # ... and lm_head
    assert isinstance(m.model.embed_tokens, nn.Embedding)
    assert all(isinstance(mod, Router) and mod.weight.dtype == torch.float32
               for layer in m.model.layers[n_dense:] for mod in [layer.mlp.gate])
    assert all(isinstance(layer.input_layernorm, RMSNorm) for layer in m.model.layers)
    assert [layer.mlp.experts for layer in m.model.layers if c.is_moe_layer(layer.self_attn.layer_idx)] == experts
    assert info["bytes_after"] < 0.3 * info["bytes_before"]          # fp32 -> int8 + scales


def test_lm_head_can_stay_unquantized(tiny_dir):
    llm = LLM(tiny_dir, expert_backend="torch", progress=False)
    quantize_model_linears(llm.model, "int8", lm_head=False)
    assert isinstance(llm.model.lm_head, nn.Linear)
    with pytest.raises(ValueError, match="bf16, int8, fp8"):
        quantize_model_linears(llm.model, "int4")


def test_absorbed_form_reads_the_quantized_kv_b(tiny_dir):
    """MLAttention._absorbed takes W_UK/W_UV from kv_b_proj.weight: plain and absorbed still agree."""
    llm = LLM(tiny_dir, expert_backend="torch", progress=False)
    quantize_model_linears(llm.model, "int8")
    ids = torch.arange(7) * 31
    plain = llm.model(ids, Step.single(7))
    absorbed = llm.model(ids, Step.single(7), absorb=True)
    torch.testing.assert_close(absorbed, plain, atol=1e-3, rtol=1e-3)


def test_int8_logit_error_is_small(int8_error):
    free, frozen, base = int8_error["free"], int8_error["frozen"], int8_error["bf16_baseline"]
    assert frozen["rel_l2_max"] < FROZEN_REL_L2_MAX, int8_error
    assert frozen["argmax_agreement"] >= 0.9, int8_error
    assert free["argmax_agreement"] >= FREE_ARGMAX_MIN, int8_error
    assert free["kl_mean"] < 0.05, int8_error
    assert base["argmax_agreement"] >= FREE_ARGMAX_MIN                # the noise floor, for the record


def test_fp8_runs_with_a_looser_error(tiny_dir):
    r = measure_int8_logit_error(tiny_dir, "fp8", n_tokens=32)
    assert r["frozen"]["rel_l2_max"] < 0.3 and r["frozen"]["kl_mean"] < 0.05, r
