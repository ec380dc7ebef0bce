"""Synthetic checkpoints in exactly the real Kimi-K2.6 layout (or K2-Thinking / DeepSeek-V3 layouts).

What is written is what Hugging Face ships: config.json (K2.6: the kimi_k25 wrapper with
text_config, the real quantization_config and a vision_config), generation_config.json,
model.safetensors.index.json, several shards, routed experts as compressed-tensors INT4
(weight_packed / weight_scale / weight_shape), everything else bf16 (e_score_correction_bias fp32),
and the tokenizer files. Layouts (LAYOUTS):
    k2.6         the above, plus a MoonViT vision tower and projector (`vision_tower.*`, `mm_projector.*`, bf16)
    k2-thinking  the same weights, K2-Thinking's flat config (model_type kimi_k2)
    deepseek-v3  DeepSeek-V3's config (model_type deepseek_v3) and FP8 128x128 blocks for every Linear but
                 the router and lm_head (routed experts included; .weight float8_e4m3fn + .weight_scale_inv)
    bf16         DeepSeek-V3's config without quantization_config and every Linear (routed experts
                 included) in bf16, like a community bf16 conversion of DeepSeek-V3
Random weights are scaled (std 1/sqrt(fan_in), norms near 1, router logits ~N(0,1)) so activations stay
finite and routing stays non-degenerate through every layer.
`tools/make_checkpoint.py` is the command line; `hybrid demo` and the tests call `write_checkpoint`.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from hybrid.formats import quantize_fp8_block

QUANT_CONFIG = {
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "kv_cache_scheme": None,
    "config_groups": {"group_0": {
        "targets": ["Linear"], "input_activations": None, "output_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
                    "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
                    "observer_kwargs": {}}}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
}
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}

# Architecture sizes per preset; any key can be overridden.
PRESETS = {
    "tiny": dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
                 first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
                 n_group=1, topk_group=1, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, num_attention_heads=4, vocab_size=2304,
                 max_position_embeddings=4096, rope_factor=64.0, beta_fast=32.0, shards=3,
                 vt_hidden_size=64, vt_num_hidden_layers=2, vt_num_attention_heads=4, vt_intermediate_size=96,
                 init_pos_emb_height=8, init_pos_emb_width=8),
    "k2-slice": dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=4,
                     first_k_dense_replace=1, n_routed_experts=64, num_experts_per_tok=8, n_shared_experts=1,
                     n_group=1, topk_group=1, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128, num_attention_heads=64, vocab_size=16640,
                     max_position_embeddings=262144, rope_factor=64.0, beta_fast=32.0, shards=8,
                     vt_hidden_size=1152, vt_num_hidden_layers=27, vt_num_attention_heads=16,
                     vt_intermediate_size=4304, init_pos_emb_height=64, init_pos_emb_width=64),
}
LAYOUTS = ("k2.6", "k2-thinking", "deepseek-v3", "bf16")
DEEPSEEK_LAYOUTS = ("deepseek-v3", "bf16")   # model_type deepseek_v3
N_SPECIAL = 256  # special tokens after the ordinary ones, as in the real tokenizer (163584 + 256)


def text_config(s: dict, layout: str) -> dict:
    """The DeepseekV3-style text config for sizes `s` (keys and fixed values as in the real files)."""
    n_ord = s["vocab_size"] - N_SPECIAL
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModel": "modeling_deepseek.DeepseekV3Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
        "aux_loss_alpha": 0.001, "bos_token_id": n_ord, "eos_token_id": n_ord + 1, "ep_size": 1,
        "first_k_dense_replace": s["first_k_dense_replace"], "hidden_act": "silu",
        "hidden_size": s["hidden_size"], "initializer_range": 0.02, "intermediate_size": s["intermediate_size"],
        "kv_lora_rank": s["kv_lora_rank"], "max_position_embeddings": s["max_position_embeddings"],
        "model_type": "deepseek_v3" if layout in DEEPSEEK_LAYOUTS else "kimi_k2",
        "moe_intermediate_size": s["moe_intermediate_size"], "moe_layer_freq": 1, "n_group": s["n_group"],
        "n_routed_experts": s["n_routed_experts"], "n_shared_experts": s["n_shared_experts"],
        "norm_topk_prob": True, "num_attention_heads": s["num_attention_heads"],
        "num_experts_per_tok": s["num_experts_per_tok"], "num_hidden_layers": s["num_hidden_layers"],
        "num_key_value_heads": s["num_attention_heads"], "num_nextn_predict_layers": 0,
        "pad_token_id": n_ord + 255, "pretraining_tp": 1, "q_lora_rank": s["q_lora_rank"],
        "qk_nope_head_dim": s["qk_nope_head_dim"], "qk_rope_head_dim": s["qk_rope_head_dim"],
        "rms_norm_eps": 1e-05, "rope_theta": 50000.0,
        "rope_scaling": {"beta_fast": s["beta_fast"], "beta_slow": 1.0, "factor": s["rope_factor"], "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
        "routed_scaling_factor": 2.827, "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False,
        "topk_group": s["topk_group"], "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "use_cache": True,
        "v_head_dim": s["v_head_dim"], "vocab_size": s["vocab_size"],
    }
    if s["rope_factor"] <= 1:
        cfg["rope_scaling"] = None
    if layout != "bf16":                                  # bf16: no quantization_config at all
        cfg["quantization_config"] = copy.deepcopy(FP8_CONFIG if layout == "deepseek-v3" else QUANT_CONFIG)
    return cfg


def full_config(s: dict, layout: str) -> dict:
    text = text_config(s, layout)
    if layout != "k2.6":
        if layout == "k2-thinking":
            text["eos_token_id"] = text["eos_token_id"] + 1  # <|im_end|>, as K2-Thinking
        return text
    n_ord = s["vocab_size"] - N_SPECIAL
    return {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_kimi_k25.KimiK25Config",
                     "AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_kimi_k25.KimiK25ForConditionalGeneration"},
        "bos_token_id": n_ord, "dtype": "bfloat16", "eos_token_id": n_ord + 1, "ignore_index": -100,
        "media_placeholder_token_id": n_ord + 21, "model_type": "kimi_k25", "pad_token_id": n_ord + 255,
        "quantization_config": copy.deepcopy(QUANT_CONFIG), "text_config": text, "tie_word_embeddings": False,
        "use_unified_vision_chunk": True, "video_placeholder": "<|kimi_k25_video_placeholder|>",
        "vision_config": vision_config(s),
    }


def vision_config(s: dict) -> dict:
    """K2.6's `vision_config`, every key of the published file (tests/fixtures/kimi-k2.6), sizes from `s`."""
    return {"init_pos_emb_height": s["init_pos_emb_height"], "init_pos_emb_time": 4,
            "init_pos_emb_width": s["init_pos_emb_width"], "merge_kernel_size": [2, 2], "merge_type": "sd2_tpool",
            "mm_hidden_size": s["vt_hidden_size"], "mm_projector_type": "patchmerger", "patch_size": 14,
            "pos_emb_type": "divided_fixed", "projector_hidden_act": "gelu", "projector_ln_eps": 1e-05,
            "text_hidden_size": s["hidden_size"], "video_attn_type": "spatial_temporal",
            "vt_hidden_size": s["vt_hidden_size"], "vt_intermediate_size": s["vt_intermediate_size"],
            "vt_num_attention_heads": s["vt_num_attention_heads"], "vt_num_hidden_layers": s["vt_num_hidden_layers"]}


def _vision_tensors(s: dict, rnd: "_Weights") -> dict:
    """MoonViT tower + patch-merger projector under K2.6's original tensor names (329 + 6 tensors at full
    depth; docs/kimi_k2.md §6), bf16. Biases and LayerNorm shifts are non-zero so every one is exercised."""
    d, i, p = s["vt_hidden_size"], s["vt_intermediate_size"], 14
    m, out = 4 * d, s["hidden_size"]
    g = rnd.g

    def bias(n: int, std: float = 0.05) -> torch.Tensor:
        return (std * torch.randn(n, generator=g)).to(torch.bfloat16)
    t = {"vision_tower.patch_embed.proj.weight": (torch.randn(d, 3, p, p, generator=g) / (3 * p * p) ** 0.5
                                                 ).to(torch.bfloat16),
         "vision_tower.patch_embed.proj.bias": bias(d),
         "vision_tower.patch_embed.pos_emb.weight": (0.5 * torch.randn(
             s["init_pos_emb_height"], s["init_pos_emb_width"], d, generator=g)).to(torch.bfloat16)}
    for k in range(s["vt_num_hidden_layers"]):
        B = f"vision_tower.encoder.blocks.{k}"
        for norm in ("norm0", "norm1"):
            t[f"{B}.{norm}.weight"], t[f"{B}.{norm}.bias"] = rnd.norm(d), bias(d)
        t[f"{B}.wqkv.weight"], t[f"{B}.wqkv.bias"] = rnd.dense(3 * d, d, gain=2.0), bias(3 * d)
        t[f"{B}.wo.weight"], t[f"{B}.wo.bias"] = rnd.dense(d, d), bias(d)
        t[f"{B}.mlp.fc0.weight"], t[f"{B}.mlp.fc0.bias"] = rnd.dense(i, d), bias(i)
        t[f"{B}.mlp.fc1.weight"], t[f"{B}.mlp.fc1.bias"] = rnd.dense(d, i), bias(d)
    t["vision_tower.encoder.final_layernorm.weight"] = rnd.norm(d)
    t["vision_tower.encoder.final_layernorm.bias"] = bias(d)
    t["mm_projector.pre_norm.weight"], t["mm_projector.pre_norm.bias"] = rnd.norm(d), bias(d)
    t["mm_projector.proj.0.weight"], t["mm_projector.proj.0.bias"] = rnd.dense(m, m), bias(m)
    t["mm_projector.proj.2.weight"], t["mm_projector.proj.2.bias"] = rnd.dense(out, m, gain=2.0), bias(out)
    return t


class _Weights:
    """Random tensors with the scales described in the module docstring."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def dense(self, out_f: int, in_f: int, gain: float = 1.0) -> torch.Tensor:
        w = torch.randn(out_f, in_f, generator=self.g) * (gain / in_f ** 0.5)
        return w.to(torch.bfloat16)

    def norm(self, n: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, generator=self.g)).to(torch.bfloat16)

    def int4(self, out_f: int, in_f: int, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniformly random nibbles (random int32 words; std of q ~4.6) and per-group bf16 scales
        giving weights of std ~1/sqrt(in_f)."""
        words = torch.randint(-2**31, 2**31, (out_f, in_f // 8), generator=self.g, dtype=torch.int64)
        spread = 0.5 + torch.rand(out_f, in_f // group, generator=self.g)
        scale = (spread / (4.6 * in_f ** 0.5)).to(torch.bfloat16)
        return words.to(torch.int32), scale


def _linear(tensors: dict, name: str, w: torch.Tensor, fp8: bool) -> None:
    if fp8:
        q, s = quantize_fp8_block(w.float())
        tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"] = q, s
    else:
        tensors[f"{name}.weight"] = w


def _layer_tensors(i: int, s: dict, rnd: _Weights, layout: str) -> dict:
    d, h = s["hidden_size"], s["num_attention_heads"]
    nope, rope, vd = s["qk_nope_head_dim"], s["qk_rope_head_dim"], s["v_head_dim"]
    fp8 = layout == "deepseek-v3"
    L = f"model.layers.{i}"
    t: dict[str, torch.Tensor] = {}
    t[f"{L}.input_layernorm.weight"] = rnd.norm(d)
    t[f"{L}.post_attention_layernorm.weight"] = rnd.norm(d)
    A = f"{L}.self_attn"
    if s["q_lora_rank"]:
        _linear(t, f"{A}.q_a_proj", rnd.dense(s["q_lora_rank"], d), fp8)
        t[f"{A}.q_a_layernorm.weight"] = rnd.norm(s["q_lora_rank"])
        _linear(t, f"{A}.q_b_proj", rnd.dense(h * (nope + rope), s["q_lora_rank"]), fp8)
    else:
        _linear(t, f"{A}.q_proj", rnd.dense(h * (nope + rope), d), fp8)
    _linear(t, f"{A}.kv_a_proj_with_mqa", rnd.dense(s["kv_lora_rank"] + rope, d), fp8)
    t[f"{A}.kv_a_layernorm.weight"] = rnd.norm(s["kv_lora_rank"])
    _linear(t, f"{A}.kv_b_proj", rnd.dense(h * (nope + vd), s["kv_lora_rank"]), fp8)
    _linear(t, f"{A}.o_proj", rnd.dense(d, h * vd), fp8)
    M = f"{L}.mlp"
    if i < s["first_k_dense_replace"]:
        inter = s["intermediate_size"]
        _linear(t, f"{M}.gate_proj", rnd.dense(inter, d), fp8)
        _linear(t, f"{M}.up_proj", rnd.dense(inter, d), fp8)
        _linear(t, f"{M}.down_proj", rnd.dense(d, inter), fp8)
        return t
    e_n, inter = s["n_routed_experts"], s["moe_intermediate_size"]
    t[f"{M}.gate.weight"] = rnd.dense(e_n, d, gain=2.0)
    t[f"{M}.gate.e_score_correction_bias"] = (0.05 * torch.randn(e_n, generator=rnd.g)).float()
    sh = inter * s["n_shared_experts"]
    _linear(t, f"{M}.shared_experts.gate_proj", rnd.dense(sh, d), fp8)
    _linear(t, f"{M}.shared_experts.up_proj", rnd.dense(sh, d), fp8)
    _linear(t, f"{M}.shared_experts.down_proj", rnd.dense(d, sh), fp8)
    for e in range(e_n):
        P = f"{M}.experts.{e}"
        for proj, (n_out, n_in) in (("gate_proj", (inter, d)), ("up_proj", (inter, d)), ("down_proj", (d, inter))):
            if layout in DEEPSEEK_LAYOUTS:                 # FP8 blocks, or plain bf16
                _linear(t, f"{P}.{proj}", rnd.dense(n_out, n_in), fp8)
            else:
                packed, scale = rnd.int4(n_out, n_in)
                t[f"{P}.{proj}.weight_packed"] = packed
                t[f"{P}.{proj}.weight_scale"] = scale
                t[f"{P}.{proj}.weight_shape"] = torch.tensor([n_out, n_in], dtype=torch.int32)
    return t


def write_checkpoint(out_dir: str | Path, preset: str = "tiny", layout: str = "k2.6", seed: int = 0,
                     progress: bool = False, tokenizer: bool = True, **overrides) -> Path:
    """Write a synthetic checkpoint; `overrides` replace any preset size (e.g. n_routed_experts=8)."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} unknown; choose one of {', '.join(PRESETS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} unknown; choose one of {', '.join(LAYOUTS)}")
    s = dict(PRESETS[preset])
    for k, v in overrides.items():
        if k not in s:
            raise ValueError(f"unknown size {k!r}; known: {', '.join(s)}")
        s[k] = v
    if s["vocab_size"] <= N_SPECIAL + 256:
        raise ValueError(f"vocab_size must exceed {N_SPECIAL + 256} (256 bytes + {N_SPECIAL} special tokens)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = "language_model." if layout == "k2.6" else ""
    rnd = _Weights(seed)
    n_layers = s["num_hidden_layers"]
    n_shards = max(1, min(s["shards"], n_layers + 1))
    # layer i goes to shard i * n_shards // (n_layers + 1); embeddings first, norm + lm_head last
    groups: list[list] = [[] for _ in range(n_shards)]
    groups[0].append("embed")
    for i in range(n_layers):
        groups[(i + 1) * n_shards // (n_layers + 1)].append(i)
    groups[-1].append("head")
    weight_map = {}
    total = 0
    names = [f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors" for k in range(n_shards)]
    it = range(n_shards)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"writing {out.name}", unit="shard")
    for k in it:
        tensors: dict[str, torch.Tensor] = {}
        for item in groups[k]:
            if item == "embed":
                tensors["model.embed_tokens.weight"] = (torch.randn(s["vocab_size"], s["hidden_size"],
                                                                    generator=rnd.g)).to(torch.bfloat16)
            elif item == "head":
                tensors["model.norm.weight"] = rnd.norm(s["hidden_size"])
                tensors["lm_head.weight"] = rnd.dense(s["vocab_size"], s["hidden_size"], gain=2.0)
            else:
                tensors.update(_layer_tensors(item, s, rnd, layout))
        tensors = {prefix + name: t.contiguous() for name, t in tensors.items()}
        if k == 0 and layout == "k2.6":         # the vision side: top-level names, no language_model. prefix
            tensors.update(_vision_tensors(s, _Weights(seed + 1)))
        save_file(tensors, str(out / names[k]), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = names[k]
            total += t.numel() * t.element_size()
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(full_config(s, layout), indent=2))
    n_ord = s["vocab_size"] - N_SPECIAL
    (out / "generation_config.json").write_text(json.dumps(
        {"max_length": s["max_position_embeddings"], "eos_token_id": n_ord + 2}, indent=2))
    if tokenizer:
        from hybrid.synthetic.tokenizer_files import write_tokenizer_files
        write_tokenizer_files(out, s["vocab_size"])
    return out
