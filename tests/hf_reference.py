"""Independent reference for the model tests: transformers' DeepseekV3ForCausalLM built from the same
checkpoint files, read with the safetensors package and dequantized with compressed-tensors' own
unpacker (INT4) or a plain block multiply (FP8) — none of hybrid's loading code is used here."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


def _read_all(model_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(model_dir / shard), framework="pt") as f:
            for name in f.keys():
                key = name.removeprefix("language_model.")
                if not key.startswith(("vision_tower.", "mm_projector.")):
                    out[key] = f.get_tensor(name)
    return out


def _dense(raw: dict, module: str, group: int) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    if f"{module}.weight_packed" in raw:
        n, k = raw[f"{module}.weight_shape"].tolist()
        q = unpack_from_int32(raw[f"{module}.weight_packed"], 4, torch.Size([n, k]))   # int8 in [-8, 7]
        scale = raw[f"{module}.weight_scale"].repeat_interleave(group, dim=1)
        return (q.to(torch.bfloat16) * scale).float()
    if f"{module}.weight_scale_inv" in raw:
        w, s = raw[f"{module}.weight"].float(), raw[f"{module}.weight_scale_inv"].float()
        s = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
        return (w * s).to(torch.bfloat16).float()
    return raw[f"{module}.weight"].float()


def build_hf_model(model_dir: str | Path):
    """DeepseekV3ForCausalLM (float32, eager attention) holding the checkpoint's weights."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    text = dict(cfg.get("text_config", cfg))
    text.pop("quantization_config", None)
    text.pop("auto_map", None)
    config = DeepseekV3Config(**text)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    model = model.to_empty(device="cpu").float()
    model.model.rotary_emb.__init__(config)     # its inv_freq buffer was made on the meta device
    raw = _read_all(model_dir)
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            prefix = name.rsplit(".", 1)[0]
            E = p.shape[0]
            if name.endswith("gate_up_proj"):
                sd[name] = torch.stack([torch.cat([_dense(raw, f"{prefix}.{e}.gate_proj", 32),
                                                   _dense(raw, f"{prefix}.{e}.up_proj", 32)]) for e in range(E)])
            else:
                sd[name] = torch.stack([_dense(raw, f"{prefix}.{e}.down_proj", 32) for e in range(E)])
        elif name.endswith(".weight") and (name not in raw or name[:-7] + ".weight_scale_inv" in raw):
            sd[name] = _dense(raw, name[: -len(".weight")], 32)
        elif name in raw:
            sd[name] = raw[name].float()
        else:
            continue   # buffers computed by the model itself (rope)
    missing = set(model.state_dict()) - set(sd)
    missing = {m for m in missing if "rotary_emb" not in m}
    assert not missing, f"reference model has weights we did not fill: {sorted(missing)[:5]}"
    model.load_state_dict(sd, strict=False)
    return model.eval()


@torch.no_grad()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([token_ids])).logits[0].float()
