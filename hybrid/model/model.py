"""The forward pass, top to bottom: embed -> decoder layers (MLA, dense MLP or MoE) -> norm -> lm_head.

Module names are the checkpoint's tensor names (model.layers.{i}.self_attn.q_a_proj, ...), so the
loader (hybrid/model/loader.py) is a loop over parameters. The math is DeepSeek-V3's (docs/kimi_k2.md
§4; transformers' modeling_deepseek_v3.py): MLA attention (attention.py), a SwiGLU dense MLP in the
first layer(s), then MoE blocks whose noaux_tc router and shared expert run here on the accelerator
while the routed experts run on the CPU behind submit/wait (hybrid/experts/offload.py).
Checked against transformers' DeepseekV3ForCausalLM by tests/test_model.py.
T tokens (all sequences of a step packed), D hidden, V vocabulary, E experts, K top-k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid.config import ModelConfig
from hybrid.model.attention import MLAttention, RMSNorm, Rope, Step


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
        self.experts = None  # the layer's ExpertOffload (hybrid/experts/offload.py), attached by the loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        self.experts.submit(x, ids, weights)          # CPU side starts on the routed experts ...
        shared = self.shared_experts(x)               # ... while the accelerator runs the shared expert
        routed = self.experts.wait()                  # [T, D] fp32: sum_k w_k * expert_k(x)
        return routed.to(device=x.device, dtype=x.dtype) + shared


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, i: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAttention(config, i)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(i) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, h, cos, sin, step, cache, absorb):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, step, cache, absorb)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class KimiForCausalLM(nn.Module):
    """DeepSeek-V3 / Kimi K2 language model. `forward` returns float32 logits [T, V]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = Rope(config)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, step: Step, cache=None, absorb: bool | None = None,
                logits_for: torch.Tensor | None = None, embeds=None) -> torch.Tensor:
        """input_ids [T] of the sequences in `step`; logits only at rows `logits_for` if given.
        embeds: (rows LongTensor [r], values [r, D]) -- these rows' input embeddings are replaced (image
        features from hybrid/model/vision.py in place of their placeholder tokens)."""
        h = self.model.embed_tokens(input_ids)                              # [T, D]
        if embeds is not None:
            rows, values = embeds
            if len(rows):
                h[rows.to(h.device)] = values.to(device=h.device, dtype=h.dtype)
        cos, sin = self.rope.cos_sin(step.positions, h.dtype)               # [T, P]
        for layer in self.model.layers:
            h = layer(h, cos, sin, step, cache, absorb)
        if logits_for is not None:
            h = h[logits_for]
        h = self.model.norm(h)
        return self.lm_head(h).float()                                      # [T, V]
