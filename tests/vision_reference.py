"""Independent reference for the vision tests: transformers' Kimi_K25ForConditionalGeneration (float32,
eager attention) holding a synthetic K2.6 checkpoint's weights, and a plain re-statement of transformers'
Kimi-K2.5 image processor steps (that processor imports torchvision, which has no wheel for our torch
build, so it cannot run here).

Weights: the vision tower and projector go through transformers' own loading (from_pretrained on a folder
holding the checkpoint's ORIGINAL vision tensors, so its conversion_mapping "kimi_k25" renames them,
unfuses wqkv and permutes q/k for its rotary layout); the language model is tests/hf_reference.py's
DeepseekV3ForCausalLM (compressed-tensors' own INT4 unpacker). No hybrid loading code is used.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from hf_reference import build_hf_model


def hf_kimi_config(model_dir: Path):
    """transformers' Kimi_K25Config for the checkpoint: its text_config, and the vision_config's original
    keys (vt_hidden_size, init_pos_emb_height, ...) spelled the way transformers names them."""
    from transformers import Kimi_K25Config
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    text = dict(raw["text_config"])
    text.pop("quantization_config", None)
    text.pop("auto_map", None)
    vc = raw["vision_config"]
    vision = dict(patch_size=vc["patch_size"], hidden_size=vc["vt_hidden_size"],
                  num_hidden_layers=vc["vt_num_hidden_layers"], num_attention_heads=vc["vt_num_attention_heads"],
                  intermediate_size=vc["vt_intermediate_size"], pos_emb_height=vc["init_pos_emb_height"],
                  pos_emb_width=vc["init_pos_emb_width"], pos_emb_time=vc["init_pos_emb_time"],
                  merge_kernel_size=list(vc["merge_kernel_size"]))
    return Kimi_K25Config(text_config=text, vision_config=vision, projection_hidden_size=vc["mm_hidden_size"],
                          projection_layer_norm_eps=vc["projector_ln_eps"],
                          image_token_id=raw["media_placeholder_token_id"], tie_word_embeddings=False)


def build_hf_kimi(model_dir: Path, work_dir: Path, experts_int4=None):
    """Kimi_K25ForConditionalGeneration (float32, eager) with the checkpoint's weights."""
    from transformers import Kimi_K25ForConditionalGeneration
    model_dir, work_dir = Path(model_dir), Path(work_dir)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    vision = {}
    for name, shard in index.items():
        if name.startswith(("vision_tower.", "mm_projector.")):
            with safe_open(str(model_dir / shard), framework="pt") as f:
                vision[name] = f.get_tensor(name)
    work_dir.mkdir(parents=True, exist_ok=True)
    config = hf_kimi_config(model_dir)
    config.save_pretrained(work_dir)
    save_file(vision, str(work_dir / "model.safetensors"), metadata={"format": "pt"})
    model = Kimi_K25ForConditionalGeneration.from_pretrained(work_dir, dtype=torch.float32,
                                                             attn_implementation="eager")
    text = build_hf_model(model_dir, experts_int4=experts_int4)
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.weight.data.copy_(text.lm_head.weight.data)
    # the vision weights must be the checkpoint's (bf16 -> fp32 exactly), not a fresh init
    pe = model.model.vision_tower.patch_embed.proj.weight
    assert torch.equal(pe, vision["vision_tower.patch_embed.proj.weight"].float()), "vision weights not loaded"
    return model.eval()


# ---------------------------------------------------------------- image processor, step by step
PATCH, MERGE, MAX_PATCHES, MAX_SIDE = 14, 2, 16384, 512   # Kimi_K25ImageProcessor defaults


def reference_navit_resize(height, width, patch=PATCH, merge=MERGE, max_patches=MAX_PATCHES, max_side=MAX_SIDE):
    """transformers.models.kimi_k25.image_processing_kimi_k25.navit_resize, restated."""
    nh, nw = max(1.0, height // patch), max(1.0, width // patch)
    scale = min(1.0, math.sqrt(max_patches / (nh * nw)), max_side * patch / height, max_side * patch / width)
    new_h, new_w = max(1, int(height * scale)), max(1, int(width * scale))
    new_h, new_w = min(new_h, max_side * patch), min(new_w, max_side * patch)
    f = merge * patch
    return (new_h, new_w), ((f - new_h % f) % f + new_h, (f - new_w % f) % f + new_w)


def reference_pixels(pil_image, **limits):
    """(pixel_values [N, 3, 14, 14] float32, (grid_h, grid_w)) as Kimi_K25ImageProcessor makes them on a CPU:
    RGB (alpha composited on white) uint8 CHW -> torchvision resize (bicubic, antialias; on a CPU uint8 tensor
    torchvision calls torch's interpolate on uint8 directly; skipped at equal size) -> zero pad bottom/right ->
    float32, normalize with mean = std = 0.5 * 255 (rescale fused into normalize) -> patchify raster order."""
    from PIL import Image
    img = pil_image
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img).convert("RGB")
    else:
        img = img.convert("RGB")
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()         # uint8 [3, H, W]
    (rh, rw), (ph, pw) = reference_navit_resize(x.shape[1], x.shape[2], **limits)
    if (rh, rw) != tuple(x.shape[1:]):
        x = F.interpolate(x[None], size=[rh, rw], mode="bicubic", align_corners=False, antialias=True)[0]
    x = F.pad(x, (0, pw - rw, 0, ph - rh), value=0)
    mean = torch.tensor([0.5] * 3) * (1.0 / (1 / 255))
    std = torch.tensor([0.5] * 3) * (1.0 / (1 / 255))
    x = (x.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
    gh, gw = ph // PATCH, pw // PATCH
    patches = x.reshape(3, gh, PATCH, gw, PATCH).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, PATCH, PATCH)
    return patches, (gh, gw)
