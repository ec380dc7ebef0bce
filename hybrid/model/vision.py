"""K2.5/K2.6 vision side: the MoonViT tower and the patch-merger projector, from pixels to rows of the
language model's input embeddings (docs/kimi_k2.md §6; transformers' models/kimi_k25/modeling_kimi_k25.py
is the executable reference, tests/test_vision_model.py checks us against it on the same weights).

Module names are the checkpoint's ORIGINAL tensor names (vision_tower.patch_embed.proj,
vision_tower.encoder.blocks.{i}.wqkv, mm_projector.proj.0, ...), so loading is a loop over parameters
(load_vision below). Per image of G = h x w patches (14 x 14 pixels each, raster order):
  patch embed (a 3*14*14 -> D linear map, i.e. the stride-14 conv) + the learned position table
  [pos_h, pos_w, D] resampled bicubically to (h, w) (align_corners False; used as is when equal);
  L pre-LN blocks: x += wo(attn(norm0(x))), x += fc1(gelu_tanh(fc0(norm1(x)))), attention full
  (bidirectional) within the image only, fused wqkv, 2D rotary on q/k in the checkpoint's own
  interleaved-pair layout: pair j of a head rotates by col * f[j//2] (j even) or row * f[j//2]
  (j odd), f[k] = theta^(-4k/head_dim);
  final LayerNorm; 2x2 merge (row-major neighbourhoods -> [h/2 * w/2, 4 * D]);
  projector: LayerNorm(D) per patch, Linear(4D, 4D), GELU (erf), Linear(4D, text hidden).
Several images go through one call (attention kept per image). Images only: video frames (t > 1) are
not supported here. Same code on CPU and GPU; weights in the model dtype, norms/rope math in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid.config import VisionConfig

VISION_PREFIXES = ("vision_tower.", "mm_projector.")


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(),
                        norm.eps).to(x.dtype)


class PosEmb(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(c.pos_emb_height, c.pos_emb_width, c.hidden_size))

    def grid(self, h: int, w: int) -> torch.Tensor:
        """[h * w, D] for an image of h x w patches (raster order)."""
        table = self.weight
        if (h, w) != tuple(table.shape[:2]):
            t = table.float().permute(2, 0, 1)[None]
            table = F.interpolate(t, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
        return table.reshape(h * w, -1)


class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)
        self.pos_emb = PosEmb(c)


class Mlp(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc0 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc1 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = c.num_attention_heads, c.head_dim
        self.norm0 = nn.LayerNorm(c.hidden_size, eps=1e-5)
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=1e-5)
        self.wqkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.wo = nn.Linear(c.hidden_size, c.hidden_size)
        self.mlp = Mlp(c)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.wqkv(x).view(N, 3, self.heads, self.head_dim).unbind(1)      # [N, H, hd] each
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out, start = [], 0
        for n in lengths:                      # full attention inside each image, none across images
            sl = slice(start, start + n)
            out.append(F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1),
                                                      v[sl].transpose(0, 1)).transpose(0, 1))
            start += n
        return self.wo(torch.cat(out).reshape(N, -1))

    def forward(self, x, cos, sin, lengths):
        x = x + self.attention(_layer_norm(x, self.norm0), cos, sin, lengths)
        return x + self.mlp(_layer_norm(x, self.norm1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs (x[2j], x[2j+1]) rotated by angle[j]; x [N, H, hd], cos/sin [N, hd/2] (fp32)."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[:, None], sin[:, None]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).to(x.dtype)


class Encoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(c.hidden_size, eps=1e-5)


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.encoder = Encoder(c)

    def rope(self, grids: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        hd = self.config.head_dim
        freqs = self.config.rope_theta ** (-torch.arange(0, hd, 4, dtype=torch.float32, device=device)[: hd // 4] / hd)
        angles = []
        for h, w in grids:
            rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
            cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
            # pair 2k: column (x) * f[k]; pair 2k+1: row (y) * f[k]
            angles.append(torch.stack((cols[:, None] * freqs, rows[:, None] * freqs), dim=-1).flatten(1))
        a = torch.cat(angles)
        return a.cos(), a.sin()

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """pixel_values [sum h*w, 3, p, p] (images one after another), grids [(h, w)] in patches ->
        merged features [sum h*w/4, 4 * D]."""
        c, pe = self.config, self.patch_embed
        x = F.linear(pixel_values.to(pe.proj.weight.dtype).flatten(1), pe.proj.weight.flatten(1), pe.proj.bias)
        pos = torch.cat([pe.pos_emb.grid(h, w) for h, w in grids])
        x = x + pos.to(x.dtype)
        cos, sin = self.rope(grids, x.device)
        lengths = [h * w for h, w in grids]
        for block in self.encoder.blocks:
            x = block(x, cos, sin, lengths)
        x = _layer_norm(x, self.encoder.final_layernorm)
        kh, kw = c.merge_kernel_size
        merged, start = [], 0
        for h, w in grids:
            img = x[start:start + h * w].view(h // kh, kh, w // kw, kw, -1).permute(0, 2, 1, 3, 4)
            merged.append(img.reshape((h // kh) * (w // kw), kh * kw, -1))
            start += h * w
        return torch.cat(merged)                                       # [M, kh*kw, D]


class Projector(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        m = c.mm_hidden_size * c.merge_area
        self.pre_norm = nn.LayerNorm(c.mm_hidden_size, eps=c.projector_ln_eps)
        self.proj = nn.Sequential(nn.Linear(m, m), nn.GELU(), nn.Linear(m, c.text_hidden_size))

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        return self.proj(_layer_norm(merged, self.pre_norm).flatten(1))


class VisionModel(nn.Module):
    """Tower + projector. `encode(pixel_values, grids)` -> one [h*w/4, text hidden] tensor per image."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.vision_tower = VisionTower(c)
        self.mm_projector = Projector(c)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        kh, kw = self.config.merge_kernel_size
        for h, w in grids:
            if h % kh or w % kw:
                raise ValueError(f"image grid {h}x{w} patches is not a multiple of the merge kernel {kh}x{kw}")
        if pixel_values.shape[0] != sum(h * w for h, w in grids):
            raise ValueError(f"{pixel_values.shape[0]} patches for grids {grids}")
        out = self.mm_projector(self.vision_tower(pixel_values, grids))
        return list(out.split([h * w // (kh * kw) for h, w in grids]))


def vision_nbytes(c: VisionConfig, bytes_per_param: int = 2) -> int:
    """Bytes of the tower + projector weights (bf16 in the checkpoint and on a GPU: 2 per parameter)."""
    return c.weight_count() * bytes_per_param


def load_vision(checkpoint_dir, c: VisionConfig, device: torch.device, dtype: torch.dtype) -> VisionModel:
    """Build the VisionModel on `device` in `dtype` from the checkpoint's vision_tower.* / mm_projector.* tensors
    (read with safetensors; the names and shapes must be exactly the model's)."""
    import json
    from pathlib import Path

    from safetensors import safe_open
    d = Path(checkpoint_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    with torch.device("meta"):
        model = VisionModel(c)
    model = model.to_empty(device=device).to(dtype)
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in weight_map]
    if missing:
        raise ValueError(f"{d}: vision tensor '{missing[0]}' not found ({len(missing)} of {len(params)} missing); "
                         "config.json has a vision_config but the checkpoint lacks its weights")
    by_file: dict[str, list[str]] = {}
    for n in params:
        by_file.setdefault(weight_map[n], []).append(n)
    for fname, names in by_file.items():
        with safe_open(str(d / fname), framework="pt") as f:
            for n in names:
                t = f.get_tensor(n)
                if tuple(t.shape) != tuple(params[n].shape):
                    raise ValueError(f"{d / fname}: tensor '{n}' has shape {list(t.shape)}, the vision_config "
                                     f"implies {list(params[n].shape)}")
                with torch.no_grad():
                    params[n].copy_(t)
    return model.eval()


def has_vision_weights(checkpoint_dir) -> bool:
    """Whether the checkpoint stores the vision tower (a K2.6 config without it: a text-only conversion)."""
    import json
    from pathlib import Path
    d = Path(checkpoint_dir)
    name = "vision_tower.patch_embed.proj.weight"
    if (d / "model.safetensors.index.json").is_file():
        return name in json.loads((d / "model.safetensors.index.json").read_text()).get("weight_map", {})
    if (d / "model.safetensors").is_file():
        from safetensors import safe_open
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            return name in f.keys()
    return False
