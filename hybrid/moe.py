"""The MoE block: noaux_tc router and shared expert on the accelerator side, routed experts handed
to a CPU backend through submit/wait so both sides work at the same time (KIMI_K2_SPEC.md §4.7-4.8).

Routed-expert backends share one interface (load_expert / load_expert_dense / submit / wait):
`TorchExperts` here is the plain reference path (dequantized weights, torch matmuls);
the Numba INT4 kernels live in cpu_kernels/. tests/test_model.py runs the model on each.
T tokens, E experts, K top-k, D hidden, I expert intermediate.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .quant import dequantize_int4


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The dense layers and the shared expert."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid scores; correction bias for selection only; group-limited top-k; renormalised and scaled."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.weight = nn.Parameter(torch.zeros(c.n_routed_experts, c.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts))
        self.top_k, self.n_group, self.topk_group = c.num_experts_per_tok, c.n_group, c.topk_group
        self.norm_topk_prob, self.scaling = c.norm_topk_prob, c.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())                   # [T, E] in fp32
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        T, E = choice.shape
        if self.n_group > 1:
            grouped = choice.view(T, self.n_group, E // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)            # [T, G]
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~mask[:, :, None], float("-inf")).view(T, E)
        ids = choice.topk(self.top_k, dim=-1).indices                        # [T, K]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling                                  # [T, K] int64, [T, K] fp32


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
        self.experts = None  # a routed-expert backend, attached by the loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        self.experts.submit(x, ids, weights)          # CPU side starts on the routed experts ...
        shared = self.shared_experts(x)               # ... while the accelerator runs the shared expert
        routed = self.experts.wait()                  # [T, D] fp32: sum_k w_k * expert_k(x)
        return routed.to(device=x.device, dtype=x.dtype) + shared


class TorchExperts:
    """Reference routed experts: weights dequantized exactly as the reference does, torch matmuls,
    run in a worker thread so submit() returns at once (torch releases the GIL in its kernels)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, group_size: int = 32,
                 dtype: torch.dtype = torch.float32, num_threads: int | None = None):
        self.E, self.D, self.I, self.group = num_experts, hidden_size, intermediate_size, group_size
        self.dtype = dtype
        self.w_gate = torch.zeros(num_experts, intermediate_size, hidden_size, dtype=dtype)
        self.w_up = torch.zeros_like(self.w_gate)
        self.w_down = torch.zeros(num_experts, hidden_size, intermediate_size, dtype=dtype)
        self._thread = None
        self._result = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w_gate, self.w_up, self.w_down))

    def load_expert(self, e, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale):
        self.w_gate[e] = dequantize_int4(gate_packed, gate_scale, self.D, self.group).to(self.dtype)
        self.w_up[e] = dequantize_int4(up_packed, up_scale, self.D, self.group).to(self.dtype)
        self.w_down[e] = dequantize_int4(down_packed, down_scale, self.I, self.group).to(self.dtype)

    def load_expert_dense(self, e, w_gate, w_up, w_down):
        self.w_gate[e], self.w_up[e], self.w_down[e] = w_gate, w_up, w_down

    def dequantized(self, e):
        return self.w_gate[e].float(), self.w_up[e].float(), self.w_down[e].float()

    def _run(self, x, ids, weights):
        try:
            self._result = self._compute(x, ids, weights)
        except BaseException as e:  # handed to the caller of wait()
            self._result = e

    def _compute(self, x, ids, weights):
        out = torch.zeros(x.shape[0], self.D, dtype=torch.float32)
        for e in ids.unique().tolist():
            tok, k = torch.where(ids == e)
            xe = x[tok].to(self.dtype)
            h = F.silu(xe @ self.w_gate[e].T) * (xe @ self.w_up[e].T)
            y = (h @ self.w_down[e].T).float()
            out.index_add_(0, tok, y * weights[tok, k, None])
        return out

    def submit(self, x, topk_ids, topk_weights):
        assert self._thread is None, "submit() called twice without wait()"
        args = (x.detach().to("cpu"), topk_ids.to("cpu"), topk_weights.to("cpu", torch.float32))
        self._thread = threading.Thread(target=self._run, args=args, daemon=True)
        self._thread.start()

    def wait(self) -> torch.Tensor:
        self._thread.join()
        self._thread = None
        out, self._result = self._result, None
        if isinstance(out, BaseException):
            raise RuntimeError("routed experts failed in the worker thread") from out
        return out

    def forward(self, x, topk_ids, topk_weights):
        """Synchronous: the scheduler already calls this from its worker thread, so no thread of our own."""
        return self._compute(x.detach().to("cpu"), topk_ids.to("cpu"), topk_weights.to("cpu", torch.float32))
