"""Pixels for the vision tower, the way transformers' Kimi-K2.5 image processor
(models/kimi_k25/image_processing_kimi_k25.py, `Kimi_K25ImageProcessor`) makes them on a CPU:

1. RGB: images with alpha (or a transparency key) are composited on white, others converted.
2. navit_resize: scale = min(1, sqrt(max_patches / (H//14 * W//14)), 512*14/H, 512*14/W) (never upscale),
   new size int(H*scale) x int(W*scale) (at least 1, at most 512*14), then zero padding at the bottom/right
   up to multiples of 28 (patch 14 x merge 2).
3. Resize of the uint8 CHW tensor: bicubic, antialias, align_corners False (torchvision's resize, which on a
   CPU uint8 tensor calls torch's interpolate in uint8 directly); skipped when the size is unchanged.
4. float32, (x - 127.5) / 127.5 (rescale 1/255 fused into normalize with mean = std = 0.5).
5. 14 x 14 patches in raster order -> pixel_values [gh * gw, 3, 14, 14], grid (gh, gw);
   the language model sees gh * gw / 4 tokens.
That processor imports torchvision (no wheel for our torch build); tests/test_vision_media.py checks this
file against a plain restatement of its steps (tests/vision_reference.py).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ProcessorConfig:
    patch_size: int = 14
    merge_size: int = 2
    max_patches: int = 16384          # in_patch_limit
    max_side_patches: int = 512       # patch_limit_on_one_side (size.max_height)


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor        # float32 [gh * gw, 3, p, p]
    grid: tuple                       # (gh, gw) in patches
    key: str                          # content hash (pixels + grid): the vision cache key

    @property
    def n_tokens(self) -> int:
        gh, gw = self.grid
        return gh * gw // 4


def navit_resize(height: int, width: int, cfg: ProcessorConfig = ProcessorConfig()):
    """((resized_h, resized_w), (padded_h, padded_w))."""
    p = cfg.patch_size
    nh, nw = max(1.0, height // p), max(1.0, width // p)
    scale = min(1.0, math.sqrt(cfg.max_patches / (nh * nw)), cfg.max_side_patches * p / height,
                cfg.max_side_patches * p / width)
    rh = min(max(1, int(height * scale)), cfg.max_side_patches * p)
    rw = min(max(1, int(width * scale)), cfg.max_side_patches * p)
    f = cfg.merge_size * p
    return (rh, rw), (rh + (f - rh % f) % f, rw + (f - rw % f) % f)


def tokens_for_size(height: int, width: int, cfg: ProcessorConfig = ProcessorConfig()) -> int:
    """Placeholder tokens an image of this size becomes (what the plan and prompt budgets need)."""
    _, (ph, pw) = navit_resize(height, width, cfg)
    return (ph // cfg.patch_size) * (pw // cfg.patch_size) // cfg.merge_size ** 2


def to_rgb_array(img) -> np.ndarray:
    from PIL import Image
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(bg, rgba).convert("RGB"))
    return np.array(img.convert("RGB"))


def preprocess(img, cfg: ProcessorConfig = ProcessorConfig()) -> ProcessedImage:
    x = torch.from_numpy(to_rgb_array(img)).permute(2, 0, 1).contiguous()      # uint8 [3, H, W]
    (rh, rw), (ph, pw) = navit_resize(x.shape[1], x.shape[2], cfg)
    if (rh, rw) != tuple(x.shape[1:]):
        x = F.interpolate(x[None], size=[rh, rw], mode="bicubic", align_corners=False, antialias=True)[0]
    if (ph, pw) != (rh, rw):
        x = F.pad(x, (0, pw - rw, 0, ph - rh), value=0)
    x = (x.to(torch.float32) - 127.5) / 127.5
    p = cfg.patch_size
    gh, gw = ph // p, pw // p
    patches = x.reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, p, p).contiguous()
    h = hashlib.sha256(f"{gh}x{gw}:".encode())
    h.update(patches.numpy().tobytes())
    return ProcessedImage(patches, (gh, gw), h.hexdigest()[:32])
