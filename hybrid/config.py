"""ModelConfig: the one frozen config object, built from a checkpoint's config.json.

Accepts the four shapes of config.json this architecture ships in:
  * Kimi-K2.6 / K2.5: multimodal wrapper (model_type kimi_k25), the language model under `text_config`,
    tensors prefixed `language_model.`;
  * Kimi-K2-Thinking / K2-Instruct: flat DeepseekV3ForCausalLM, model_type kimi_k2;
  * DeepSeek-V3: flat, model_type deepseek_v3.
Every field the math needs is read here and validated; a missing or unsupported value is a
ConfigError that names the field and the file. Checked by tests/test_config.py on the published
configs in tests/fixtures/.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3", "kimi_k25")
SUPPORTED_TOPK_METHODS = ("noaux_tc",)
SUPPORTED_SCORING = ("sigmoid",)
SUPPORTED_ACTS = ("silu",)


class ConfigError(ValueError):
    """config.json is missing a field or holds a value this runtime does not support."""


@dataclass(frozen=True)
class Quantization:
    """How the checkpoint stores its quantized Linear weights.

    method: "none" | "int4" (compressed-tensors pack-quantized, symmetric, grouped) | "fp8" (block).
    """
    method: str = "none"
    group_size: int = 32            # int4: inputs per scale
    block_size: tuple = (128, 128)  # fp8: [out, in] block of one weight_scale_inv
    ignore: tuple = ()              # compressed-tensors module names / "re:" patterns kept in bf16


@dataclass(frozen=True)
class RopeScaling:
    type: str                       # "yarn" or "none"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class VisionConfig:
    """K2.5/K2.6 `vision_config` (MoonViT tower + patch-merger projector), read from the real keys
    (vt_hidden_size, vt_num_hidden_layers, init_pos_emb_height, ...; transformers' Kimi_K25VisionConfig
    names -- hidden_size, num_hidden_layers, pos_emb_height -- are accepted too). docs/kimi_k2.md §6."""
    patch_size: int = 14
    hidden_size: int = 1152
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    intermediate_size: int = 4304
    pos_emb_height: int = 64
    pos_emb_width: int = 64
    pos_emb_time: int = 4
    merge_kernel_size: tuple = (2, 2)
    mm_hidden_size: int = 1152          # projector pre_norm width (= hidden_size)
    text_hidden_size: int = 7168
    projector_ln_eps: float = 1e-5
    rope_theta: float = 10000.0         # MoonViT's 2D rope base (transformers' default rope_parameters)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def merge_area(self) -> int:
        return self.merge_kernel_size[0] * self.merge_kernel_size[1]

    def weight_count(self) -> int:
        """Parameters of tower + projector (all bf16 in the checkpoint: bytes = 2 x this)."""
        d, i, p, m = self.hidden_size, self.intermediate_size, self.patch_size, self.mm_hidden_size * self.merge_area
        per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (i * d + i) + (d * i + d)
        tower = 3 * p * p * d + d + self.pos_emb_height * self.pos_emb_width * d + self.num_hidden_layers * per_layer + 2 * d
        projector = 2 * self.mm_hidden_size + m * m + m + self.text_hidden_size * m + self.text_hidden_size
        return tower + projector

    def flops(self, grid_h: int, grid_w: int) -> float:
        """Multiply-adds x 2 of one image of grid_h x grid_w patches through tower + projector (the plan's cost
        figure; norms, rope and softmax left out). 448x448 px (32x32 patches) ~0.9 TFLOP at K2.6's sizes."""
        n, d, i, p = grid_h * grid_w, self.hidden_size, self.intermediate_size, self.patch_size
        m, k = n // self.merge_area, self.mm_hidden_size * self.merge_area
        layer = 2 * n * (4 * d * d + 2 * d * i) + 4 * n * n * d       # qkv + wo + MLP, then QK^T and PV
        return 2 * n * 3 * p * p * d + self.num_hidden_layers * layer + 2 * m * (k * k + k * self.text_hidden_size)

    def activation_bytes(self, n_patches: int, bytes_per_value: int = 2) -> int:
        """Peak transient memory of one tower call over n_patches (fused attention, no N^2 scores kept):
        residual + normed input + qkv + MLP hidden, with a 2x margin for temporaries."""
        d, i = self.hidden_size, self.intermediate_size
        return 2 * n_patches * (5 * d + i) * bytes_per_value


@dataclass(frozen=True)
class ModelConfig:
    model_type: str                 # kimi_k25 | kimi_k2 | deepseek_v3 (of the file's top level)
    hidden_size: int
    intermediate_size: int          # dense MLP (layers < first_k_dense_replace)
    moe_intermediate_size: int      # per routed expert (and per shared expert)
    num_hidden_layers: int
    first_k_dense_replace: int
    moe_layer_freq: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    topk_method: str
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    q_lora_rank: int | None         # None: q_proj directly from hidden (DeepSeek-V2-Lite style)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    num_attention_heads: int
    hidden_act: str
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    rms_norm_eps: float
    vocab_size: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple            # config eos plus generation_config.json eos, in that order
    pad_token_id: int | None
    quantization: Quantization = field(default_factory=Quantization)
    weight_prefix: str = ""         # "language_model." for the multimodal wrapper
    source: str = ""                # the config.json path, for messages
    vision: VisionConfig | None = None          # K2.5/K2.6: the vision tower's config; None: text-only
    media_placeholder_token_id: int | None = None   # <|media_pad|> (K2.5/K2.6 config.json)

    # ---- derived numbers -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, i: int) -> bool:
        return (self.n_routed_experts > 0 and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    @property
    def softmax_scale(self) -> float:
        """d_qk^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (spec 4.4)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs.type == "yarn" and rs.mscale_all_dim:
            m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
            scale = scale * m * m
        return scale

    def __post_init__(self):
        def need(cond, fieldname, msg):
            if not cond:
                raise ConfigError(f"{self.source}: field '{fieldname}': {msg}")
        need(self.topk_method in SUPPORTED_TOPK_METHODS, "topk_method",
             f"{self.topk_method!r} is not supported (allowed: {', '.join(SUPPORTED_TOPK_METHODS)})")
        need(self.scoring_func in SUPPORTED_SCORING, "scoring_func",
             f"{self.scoring_func!r} is not supported (allowed: {', '.join(SUPPORTED_SCORING)})")
        need(self.hidden_act in SUPPORTED_ACTS, "hidden_act",
             f"{self.hidden_act!r} is not supported (allowed: {', '.join(SUPPORTED_ACTS)})")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_attention_heads",
                     "vocab_size", "max_position_embeddings", "moe_layer_freq", "n_group", "topk_group"):
            need(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be within 0..num_hidden_layers ({self.num_hidden_layers})")
        if self.n_routed_experts > 0:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                 f"must be within 1..n_routed_experts ({self.n_routed_experts})")
            need(self.n_routed_experts % self.n_group == 0, "n_group",
                 f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})")
            need(self.topk_group <= self.n_group, "topk_group", f"must be <= n_group ({self.n_group})")
            need(self.n_routed_experts // self.n_group >= 2 or self.n_group == 1, "n_group",
                 "each group needs at least 2 experts (group score = sum of its top-2)")
            need(self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
                 "num_experts_per_tok", "more than the experts in the kept groups")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank", "must be > 0 or null")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


_MISSING = object()


def _get(d: dict, key: str, source: str, default: Any = _MISSING, types=None):
    """d[key], checked against `types`; `default` when absent (or null); an error naming the field if required."""
    value = d.get(key)
    if value is None:
        if default is _MISSING:
            raise ConfigError(f"{source}: missing field '{key}'")
        return default
    if types is not None:
        allowed = types if isinstance(types, tuple) else (types,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join(t.__name__ for t in allowed)
            raise ConfigError(f"{source}: field '{key}' is {value!r} ({type(value).__name__}), expected {names}")
    return value


def _parse_rope(text: dict, source: str) -> tuple[float, RopeScaling]:
    rs = text.get("rope_scaling")
    rp = text.get("rope_parameters")
    theta = text.get("rope_theta")
    if rs is None and isinstance(rp, dict):
        rs = rp
        theta = rp.get("rope_theta", theta)
    if theta is None:
        raise ConfigError(f"{source}: missing field 'rope_theta'")
    if not rs:
        return float(theta), RopeScaling(type="none")
    kind = rs.get("type", rs.get("rope_type"))
    if kind in (None, "default"):
        return float(theta), RopeScaling(type="none")
    if kind != "yarn":
        raise ConfigError(f"{source}: field 'rope_scaling.type' is {kind!r}; supported: yarn, default")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in rs:
            raise ConfigError(f"{source}: missing field 'rope_scaling.{key}'")
    return float(theta), RopeScaling(
        type="yarn",
        factor=float(rs["factor"]),
        original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        beta_fast=float(rs.get("beta_fast", 32.0)),
        beta_slow=float(rs.get("beta_slow", 1.0)),
        mscale=float(rs.get("mscale", 1.0)),
        mscale_all_dim=float(rs.get("mscale_all_dim", 0.0)),
    )


def _parse_quant(qc: dict | None, source: str) -> Quantization:
    if not qc:
        return Quantization()
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        fmt = qc.get("format")
        if fmt != "pack-quantized":
            raise ConfigError(f"{source}: field 'quantization_config.format' is {fmt!r}; "
                              "supported: pack-quantized")
        groups = qc.get("config_groups") or {}
        if len(groups) != 1:
            raise ConfigError(f"{source}: field 'quantization_config.config_groups': "
                              f"expected exactly one group, found {len(groups)}")
        (gname, group), = groups.items()
        w = group.get("weights") or {}
        where = f"quantization_config.config_groups.{gname}.weights"
        checks = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
        for key, want in checks.items():
            if w.get(key) != want:
                raise ConfigError(f"{source}: field '{where}.{key}' is {w.get(key)!r}; supported: {want!r}")
        if w.get("actorder") not in (None, False):
            raise ConfigError(f"{source}: field '{where}.actorder' is {w.get('actorder')!r}; supported: null")
        if group.get("input_activations") is not None:
            raise ConfigError(f"{source}: field 'quantization_config.config_groups.{gname}.input_activations' "
                              "must be null (weight-only INT4)")
        gs = w.get("group_size")
        if not isinstance(gs, int) or gs <= 0 or gs % 8:
            raise ConfigError(f"{source}: field '{where}.group_size' is {gs!r}; needs a positive multiple of 8")
        return Quantization(method="int4", group_size=gs, ignore=tuple(qc.get("ignore") or ()))
    if method == "fp8":
        bs = qc.get("weight_block_size")
        if not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)):
            raise ConfigError(f"{source}: field 'quantization_config.weight_block_size' is {bs!r}; "
                              "expected [rows, cols]")
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ConfigError(f"{source}: field 'quantization_config.fmt' is {fmt!r}; supported: e4m3")
        return Quantization(method="fp8", block_size=tuple(bs))
    raise ConfigError(f"{source}: field 'quantization_config.quant_method' is {method!r}; "
                      "supported: compressed-tensors (pack-quantized INT4), fp8")


def _parse_vision(raw: dict, source: str, text_hidden: int) -> VisionConfig | None:
    vc = raw.get("vision_config")
    if not isinstance(vc, dict):
        return None
    where = f"{source} (vision_config)"

    def v(keys, default, types=(int,)):
        for k in keys:
            if vc.get(k) is not None:
                val = vc[k]
                if not isinstance(val, types) or isinstance(val, bool):
                    raise ConfigError(f"{where}: field '{k}' is {val!r}, expected {types[0].__name__}")
                return val
        return default
    mk = vc.get("merge_kernel_size", [2, 2])
    if not (isinstance(mk, (list, tuple)) and len(mk) == 2 and all(isinstance(x, int) and x > 0 for x in mk)):
        raise ConfigError(f"{where}: field 'merge_kernel_size' is {mk!r}, expected [kh, kw]")
    for key, allowed in (("mm_projector_type", ("patchmerger",)), ("merge_type", ("sd2_tpool",)),
                         ("pos_emb_type", ("divided_fixed",))):
        if vc.get(key) is not None and vc[key] not in allowed:
            raise ConfigError(f"{where}: field '{key}' is {vc[key]!r}; supported: {', '.join(allowed)}")
    hidden = v(("vt_hidden_size", "hidden_size"), 1152)
    rope = vc.get("rope_parameters") or {}
    cfg = VisionConfig(
        patch_size=v(("patch_size",), 14), hidden_size=hidden,
        num_hidden_layers=v(("vt_num_hidden_layers", "num_hidden_layers"), 27),
        num_attention_heads=v(("vt_num_attention_heads", "num_attention_heads"), 16),
        intermediate_size=v(("vt_intermediate_size", "intermediate_size"), 4304),
        pos_emb_height=v(("init_pos_emb_height", "pos_emb_height"), 64),
        pos_emb_width=v(("init_pos_emb_width", "pos_emb_width"), 64),
        pos_emb_time=v(("init_pos_emb_time", "pos_emb_time"), 4),
        merge_kernel_size=tuple(mk), mm_hidden_size=v(("mm_hidden_size",), hidden),
        text_hidden_size=v(("text_hidden_size",), text_hidden),
        projector_ln_eps=float(v(("projector_ln_eps",), raw.get("projection_layer_norm_eps", 1e-5), (int, float))),
        rope_theta=float(rope.get("rope_theta", 10000.0)))
    if cfg.hidden_size % cfg.num_attention_heads or cfg.head_dim % 4:
        raise ConfigError(f"{where}: vt_hidden_size / vt_num_attention_heads must be a multiple of 4 (2D rope)")
    if cfg.text_hidden_size != text_hidden:
        raise ConfigError(f"{where}: field 'text_hidden_size' is {cfg.text_hidden_size}, the language model's "
                          f"hidden_size is {text_hidden}")
    if cfg.mm_hidden_size != cfg.hidden_size:
        raise ConfigError(f"{where}: field 'mm_hidden_size' ({cfg.mm_hidden_size}) must equal vt_hidden_size")
    return cfg


def config_from_dict(raw: dict, source: str = "config.json", generation_config: dict | None = None) -> ModelConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a JSON object")
    top_type = raw.get("model_type")
    prefix = ""
    text = raw
    if top_type == "kimi_k25" or "text_config" in raw:
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: missing field 'text_config' (multimodal wrapper {top_type!r})")
        prefix = "language_model."
        source_t = f"{source} (text_config)"
    else:
        source_t = source
    mt = text.get("model_type", top_type)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{source_t}: field 'model_type' is {mt!r}; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")

    def g(key, default=_MISSING, types=None):
        return _get(text, key, source_t, default, types)

    qc = text.get("quantization_config", raw.get("quantization_config"))
    theta, rope = _parse_rope(text, source_t)
    eos = g("eos_token_id", None)
    eos_ids = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
    if generation_config and generation_config.get("eos_token_id") is not None:
        ge = generation_config["eos_token_id"]
        for e in (ge if isinstance(ge, list) else [ge]):
            if e not in eos_ids:
                eos_ids.append(e)
    num = (int, float)
    return ModelConfig(
        model_type=top_type or mt,
        hidden_size=g("hidden_size", types=int),
        intermediate_size=g("intermediate_size", types=int),
        moe_intermediate_size=g("moe_intermediate_size", types=int),
        num_hidden_layers=g("num_hidden_layers", types=int),
        first_k_dense_replace=g("first_k_dense_replace", 0, types=int),
        moe_layer_freq=g("moe_layer_freq", 1, types=int),
        n_routed_experts=g("n_routed_experts", types=int),
        n_shared_experts=g("n_shared_experts", types=int),
        num_experts_per_tok=g("num_experts_per_tok", types=int),
        n_group=g("n_group", types=int),
        topk_group=g("topk_group", types=int),
        topk_method=g("topk_method", types=str),
        scoring_func=g("scoring_func", types=str),
        norm_topk_prob=g("norm_topk_prob", types=bool),
        routed_scaling_factor=float(g("routed_scaling_factor", types=num)),
        q_lora_rank=g("q_lora_rank", None, types=int),
        kv_lora_rank=g("kv_lora_rank", types=int),
        qk_nope_head_dim=g("qk_nope_head_dim", types=int),
        qk_rope_head_dim=g("qk_rope_head_dim", types=int),
        v_head_dim=g("v_head_dim", types=int),
        num_attention_heads=g("num_attention_heads", types=int),
        hidden_act=g("hidden_act", "silu", types=str),
        rope_theta=theta,
        rope_scaling=rope,
        max_position_embeddings=g("max_position_embeddings", types=int),
        rms_norm_eps=float(g("rms_norm_eps", types=num)),
        vocab_size=g("vocab_size", types=int),
        tie_word_embeddings=bool(g("tie_word_embeddings", False, types=bool)),
        bos_token_id=g("bos_token_id", None),
        eos_token_ids=tuple(eos_ids),
        pad_token_id=g("pad_token_id", None),
        quantization=_parse_quant(qc, source),
        weight_prefix=prefix,
        source=source,
        vision=_parse_vision(raw, source, g("hidden_size", types=int)) if prefix else None,
        media_placeholder_token_id=raw.get("media_placeholder_token_id", raw.get("image_token_id")) if prefix
        else None,
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read MODEL_DIR/config.json (and generation_config.json if present)."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found (is {model_dir} a Hugging Face checkpoint directory?)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    gen = None
    gpath = model_dir / "generation_config.json"
    if gpath.is_file():
        try:
            gen = json.loads(gpath.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{gpath}: not valid JSON: {e}") from None
    return config_from_dict(raw, str(path), gen)
