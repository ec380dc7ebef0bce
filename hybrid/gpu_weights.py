"""8-bit weight-only storage of the accelerator-side Linears, quantized once at load.

K2.6's GPU-resident part (MLA, dense layer 0, shared experts, lm_head, embeddings: ~11.7B parameters)
is ~23.4 GB in bf16, more than a 24 GB card; in 8 bits (one fp32 scale per output channel) the
Linears take half. `quantize_model_linears(model)` swaps every attention, dense-MLP, shared-expert
(and by default lm_head) nn.Linear of a KimiForCausalLM for an `Int8Linear`, whose forward is
gpu_kernels.int8_matmul (Triton on CUDA, the torch reference elsewhere). The router (fp32 scores
decide expert choice), norms, embeddings and the CPU-side routed experts are left alone.
`measure_int8_logit_error(model_dir)` gives the logit error against the unquantized model.
Tests: tests/test_gpu_weights.py.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from gpu_kernels import int8_matmul, quantize_weight_8bit
from gpu_kernels.int8_matmul import FORMATS

# module names (relative to KimiForCausalLM) whose nn.Linear is accelerator-side and quantizable
QUANTIZABLE = re.compile(r"model\.layers\.\d+\.(self_attn\.\w+|mlp\.(gate_proj|up_proj|down_proj)"
                         r"|mlp\.shared_experts\.(gate_proj|up_proj|down_proj))$")


class Int8Linear(nn.Module):
    """y = x . (q * scale[:, None])^T with q int8 (or float8_e4m3fn) [N, K] and fp32 scale [N]; no bias."""

    def __init__(self, in_features: int, out_features: int, fmt: str = "int8",
                 dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"8-bit format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
        self.in_features, self.out_features, self.fmt, self.dtype = in_features, out_features, fmt, dtype
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=FORMATS[fmt][0], device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "int8") -> "Int8Linear":
        assert linear.bias is None, "the model has no biases; Int8Linear does not store one"
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, fmt, dtype=w.dtype, device="meta")
        q, scale = quantize_weight_8bit(w, fmt)
        m.weight_q, m.weight_scale = q, scale
        return m

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [N, K] in the original dtype, for code that reads `.weight`
        (the absorbed MLA form takes W_UK / W_UV from kv_b_proj.weight)."""
        return (self.weight_q.float() * self.weight_scale[:, None]).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.weight_q.numel() * self.weight_q.element_size() + self.weight_scale.numel() * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.weight_q, self.weight_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def quantize_model_linears(model: nn.Module, fmt: str = "int8", lm_head: bool = True) -> dict:
    """Replace the accelerator-side nn.Linear modules of a KimiForCausalLM in place.

    Swapped: every Linear in self_attn, the dense MLP (layers < first_k_dense_replace), the shared
    experts, and lm_head when `lm_head`. Returns {"swapped": n, "bytes_before": b0, "bytes_after": b1}.
    """
    if fmt == "bf16":
        return {"swapped": 0, "bytes_before": 0, "bytes_after": 0}
    if fmt not in FORMATS:
        raise ValueError(f"gpu weight format {fmt!r} is not supported; choose bf16, {', '.join(FORMATS)}")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and (QUANTIZABLE.match(n) or (lm_head and n == "lm_head"))]
    before = after = 0
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        new = Int8Linear.from_linear(old, fmt)
        before += old.weight.numel() * old.weight.element_size()
        after += new.nbytes
        setattr(parent, attr, new)
    return {"swapped": len(names), "bytes_before": before, "bytes_after": after}


def logit_error(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Figures comparing two logit tensors [T, V]."""
    ref, got = ref.float(), got.float()
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30))
    lp_ref, lp_got = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (lp_ref.exp() * (lp_ref - lp_got)).sum(-1)
    return {
        "positions": ref.shape[0],
        "argmax_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
        "rel_l2_max": float(rel.max()),
        "rel_l2_mean": float(rel.mean()),
        "max_abs": float((got - ref).abs().max()),
        "kl_mean": float(kl.mean()),
    }


def measure_int8_logit_error(model_dir: str | Path, fmt: str = "int8", n_tokens: int = 64, seed: int = 0,
                             lm_head: bool = True, dtype: torch.dtype = torch.float32) -> dict:
    """Logits of the checkpoint with 8-bit accelerator-side weights vs the same model unquantized.

    Loads MODEL_DIR (torch expert backend: the routed experts are the exact reference on both sides),
    scores `n_tokens` random ids, quantizes in place, scores again. The reference is the model in
    `dtype` (fp32 on the CPU: the checkpoint's bf16 weights widened exactly). Returned figures:
      free:   the quantized model run as is (a router near a tie may pick other experts);
      frozen: the routers replay the reference's expert choices and weights, which isolates the
              error of the quantized Linears from routing flips;
      bf16_baseline: the unquantized model computed in bf16 against the fp32 reference, the noise
              floor a bf16 GPU run already has on the same checkpoint.
    """
    from .llm import LLM
    from .moe import Router
    llm = LLM(model_dir, device="cpu", dtype=dtype, expert_backend="torch", progress=False)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, llm.config.vocab_size, (n_tokens,), generator=g).tolist()
    routes: dict[str, list] = {}
    replay = {"on": False}

    def hook(name):
        def f(module, args, out):
            if replay["on"]:
                return routes[name].pop(0)
            routes.setdefault(name, []).append(out)
        return f
    handles = [m.register_forward_hook(hook(n)) for n, m in llm.model.named_modules() if isinstance(m, Router)]
    ref = llm.score(ids)
    info = quantize_model_linears(llm.model, fmt, lm_head=lm_head)
    replay["on"] = True
    frozen = llm.score(ids)
    for h in handles:
        h.remove()
    free = llm.score(ids)
    bf16 = LLM(model_dir, device="cpu", dtype=torch.bfloat16, expert_backend="torch", progress=False).score(ids)
    return {"format": fmt, "lm_head_quantized": lm_head, "free": logit_error(ref, free),
            "frozen": logit_error(ref, frozen), "bf16_baseline": logit_error(ref, bf16), **info}
