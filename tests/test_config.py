"""config.json parsing: the published configs of the four supported families, and clear errors."""
import json

import pytest

from hybrid.config import ConfigError, config_from_dict, load_config

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def test_kimi_k26_wrapper():
    c = load_config(FIXTURES / "kimi-k2.6")
    assert c.model_type == "kimi_k25" and c.weight_prefix == "language_model."
    assert (c.hidden_size, c.intermediate_size, c.moe_intermediate_size) == (7168, 18432, 2048)
    assert (c.num_hidden_layers, c.first_k_dense_replace, c.num_moe_layers) == (61, 1, 60)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts) == (384, 8, 1)
    assert (c.n_group, c.topk_group, c.routed_scaling_factor) == (1, 1, 2.827)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == \
        (1536, 512, 128, 64, 128)
    assert c.num_attention_heads == 64 and c.vocab_size == 163840 and c.rms_norm_eps == 1e-5
    assert c.rope_theta == 50000.0 and c.rope_scaling.type == "yarn" and c.rope_scaling.factor == 64.0
    assert c.quantization.method == "int4" and c.quantization.group_size == 32
    assert c.eos_token_ids == (163585, 163586)      # config eos, then generation_config's <|im_end|>
    assert c.softmax_scale == pytest.approx(0.1446796, abs=1e-7)    # 192^-0.5 * (1 + 0.1 ln 64)^2


def test_kimi_k2_thinking_flat():
    c = load_config(FIXTURES / "kimi-k2-thinking")
    assert c.model_type == "kimi_k2" and c.weight_prefix == ""
    assert c.quantization.method == "int4" and c.rope_scaling.beta_fast == 1.0
    assert c.eos_token_ids == (163586,) and c.n_routed_experts == 384


def test_fp8_families():
    k2 = load_config(FIXTURES / "kimi-k2-instruct-0905")
    assert k2.quantization.method == "fp8" and k2.quantization.block_size == (128, 128)
    v3 = load_config(FIXTURES / "deepseek-v3")
    assert v3.model_type == "deepseek_v3" and v3.num_attention_heads == 128
    assert (v3.n_routed_experts, v3.n_group, v3.topk_group, v3.first_k_dense_replace) == (256, 8, 4, 3)
    assert v3.vocab_size == 129280 and v3.routed_scaling_factor == 2.5 and v3.num_moe_layers == 58


def _text():
    return json.loads((FIXTURES / "kimi-k2-thinking" / "config.json").read_text())


@pytest.mark.parametrize("field,value,needle", [
    ("scoring_func", "softmax", "scoring_func"),
    ("topk_method", "greedy", "topk_method"),
    ("hidden_act", "gelu", "hidden_act"),
    ("num_experts_per_tok", 999, "num_experts_per_tok"),
    ("n_group", 5, "n_group"),
    ("hidden_size", "7168", "hidden_size"),
])
def test_unsupported_values_name_the_field(field, value, needle):
    raw = _text()
    raw[field] = value
    with pytest.raises(ConfigError, match=needle) as e:
        config_from_dict(raw, "some/config.json")
    assert "some/config.json" in str(e.value)


@pytest.mark.parametrize("field", ["hidden_size", "kv_lora_rank", "n_routed_experts", "rms_norm_eps", "vocab_size"])
def test_missing_field_is_named(tmp_path, field):
    raw = _text()
    del raw[field]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"missing field '{field}'") as e:
        load_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_unknown_quantization_is_named():
    raw = _text()
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ConfigError, match="quant_method"):
        config_from_dict(raw, "x/config.json")
    raw["quantization_config"] = json.loads(json.dumps(_text()["quantization_config"]))
    raw["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    with pytest.raises(ConfigError, match="symmetric"):
        config_from_dict(raw, "x/config.json")


def test_wrapper_without_text_config_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="text_config"):
        config_from_dict({"model_type": "kimi_k25"}, "w/config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nowhere")


def test_rope_parameters_spelling():
    raw = _text()
    rs = raw.pop("rope_scaling")
    theta = raw.pop("rope_theta")
    raw["rope_parameters"] = {**{k: v for k, v in rs.items() if k != "type"}, "rope_type": "yarn", "rope_theta": theta}
    c = config_from_dict(raw, "t5/config.json")
    assert c.rope_scaling.type == "yarn" and c.rope_scaling.factor == 64.0 and c.rope_theta == theta
