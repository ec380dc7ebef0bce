"""Independent reference for the model tests: transformers' DeepseekV3ForCausalLM built from the same
checkpoint files, read with the safetensors package and dequantized with compressed-tensors' own
unpacker (INT4) or a plain block multiply (FP8) — none of hybrid's loading code is used here.

The runtime stores every routed expert in INT4: bf16 / FP8 experts are quantized at load. For such a
checkpoint `build_hf_model(dir, experts_int4=f)` puts f(W) in place of each dense routed expert matrix W
(the tests pass hybrid.formats' quantize -> dequantize round trip, tested on its own in test_formats.py).
`hf_routes` records transformers' expert choices; `freeze_routing` makes another model (ours: its
router modules carry the same names) replay them."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

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


def build_hf_model(model_dir: str | Path, experts_int4: Callable | None = None):
    """DeepseekV3ForCausalLM (float32, eager attention) holding the checkpoint's weights; with
    `experts_int4`, the routed experts not stored in INT4 are replaced by experts_int4(W [N, K]) (dense)."""
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

    def expert(module: str) -> torch.Tensor:
        w = _dense(raw, module, 32)
        if experts_int4 is not None and f"{module}.weight_packed" not in raw:
            w = experts_int4(w).float()
        return w
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            prefix = name.rsplit(".", 1)[0]
            E = p.shape[0]
            if name.endswith("gate_up_proj"):
                sd[name] = torch.stack([torch.cat([expert(f"{prefix}.{e}.gate_proj"),
                                                   expert(f"{prefix}.{e}.up_proj")]) for e in range(E)])
            else:
                sd[name] = torch.stack([expert(f"{prefix}.{e}.down_proj") for e in range(E)])
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


@torch.no_grad()
def hf_routes(model, token_ids: list[int]) -> tuple[torch.Tensor, dict[str, tuple]]:
    """(logits, routes): routes[gate module name] = (topk ids int64 [T, K], weights fp32 [T, K], already
    scaled by routed_scaling_factor), as transformers' DeepseekV3TopkRouter chose them."""
    routes, handles = {}, []
    for name, m in model.named_modules():
        if type(m).__name__ == "DeepseekV3TopkRouter":
            def record(module, args, out, name=name):
                _, weights, ids = out                                    # (router_logits, weights, ids)
                routes[name] = (ids.long().clone(), weights.float().clone())
            handles.append(m.register_forward_hook(record))
    try:
        return hf_logits(model, token_ids), routes
    finally:
        for h in handles:
            h.remove()


@contextmanager
def freeze_routing(model, routes: dict[str, tuple]):
    """Within the block, each module of `model` named in `routes` (our Router: model.layers.{i}.mlp.gate,
    returning (ids, weights)) returns the recorded choice instead of its own; one forward of len(ids) tokens."""
    modules = dict(model.named_modules())
    assert routes and set(routes) <= set(modules), f"router names differ: {sorted(set(routes) - set(modules))[:3]}"
    handles = []
    for name, (ids, weights) in routes.items():
        def replay(module, args, out, ids=ids, weights=weights, name=name):
            assert out[0].shape == ids.shape, f"{name}: {tuple(out[0].shape)} vs recorded {tuple(ids.shape)}"
            return ids.to(out[0].device), weights.to(out[1].device)
        handles.append(modules[name].register_forward_hook(replay))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
