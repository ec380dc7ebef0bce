"""The forward pass, top to bottom: embed -> decoder layers (MLA, dense MLP or MoE) -> norm -> lm_head.

Module names are the checkpoint's tensor names (model.layers.{i}.self_attn.q_a_proj, ...), so the
loader (hybrid/loader.py) is a loop over parameters. The math is KIMI_K2_SPEC.md §4; checked
against transformers' DeepseekV3ForCausalLM by tests/test_model.py.
T tokens (all sequences of a step packed), D hidden, V vocabulary.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import Batch, MLAttention, RMSNorm, Rope
from .config import ModelConfig
from .moe import MLP, MoE


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, i: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAttention(config, i)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(i) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, h, cos, sin, batch, cache, absorb):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, batch, cache, absorb)
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
    def forward(self, input_ids: torch.Tensor, batch: Batch, cache=None, absorb: bool | None = None,
                logits_for: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T] of the sequences in `batch`; logits only at rows `logits_for` if given."""
        h = self.model.embed_tokens(input_ids)                              # [T, D]
        cos, sin = self.rope.cos_sin(batch.positions, h.dtype)              # [T, P]
        for layer in self.model.layers:
            h = layer(h, cos, sin, batch, cache, absorb)
        if logits_for is not None:
            h = h[logits_for]
        h = self.model.norm(h)
        return self.lm_head(h).float()                                      # [T, V]
