"""Images -> projected embeddings, with a content-keyed cache: ImageEncoder owns the VisionModel
(hybrid/model/vision.py) on the accelerator device, loads and preprocesses sources (image.py,
preprocess.py), runs the not-yet-cached images through the tower in as few calls as the patch budget
allows (several images per call, attention kept per image), and keeps the last results keyed by content
hash, so an image repeated across the turns of a chat is encoded once. Checked by
tests/test_vision_model.py (outputs, cache hits).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from hybrid.media.image import ImageLimits, load_image
from hybrid.media.preprocess import ProcessedImage, ProcessorConfig, preprocess

PATCHES_PER_CALL = 32768     # one tower call holds at most this many patches (two images at the full budget)


class ImageEncoder:
    def __init__(self, vision, device: torch.device, dtype: torch.dtype, limits: ImageLimits | None = None,
                 processor: ProcessorConfig | None = None, cache_bytes: int = 256 * 2**20):
        self.vision, self.device, self.dtype = vision, device, dtype
        self.limits = limits or ImageLimits()
        self.processor = processor or ProcessorConfig(patch_size=vision.config.patch_size,
                                                      merge_size=vision.config.merge_kernel_size[0])
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_bytes, self._held = cache_bytes, 0
        self.stats = {"encoded": 0, "cache_hits": 0}
        self._lock = threading.Lock()          # request threads of the server may encode at the same time

    def process(self, sources: list[tuple[str, object]]) -> list[ProcessedImage]:
        """(where, source) pairs -> preprocessed images (MediaError naming `where` on a bad one)."""
        return [preprocess(load_image(src, where, self.limits), self.processor) for where, src in sources]

    def encode(self, images: list[ProcessedImage]) -> list[torch.Tensor]:
        """One [n_tokens, text hidden] tensor (model dtype, device) per image."""
        with self._lock:
            return self._encode(images)

    def clear(self) -> None:
        with self._lock:
            self.cache.clear()
            self._held = 0

    def _encode(self, images: list[ProcessedImage]) -> list[torch.Tensor]:
        todo = [im for im in images if im.key not in self.cache]
        unique = list({im.key: im for im in todo}.values())
        self.stats["cache_hits"] += len(images) - len(todo)
        batch: list[ProcessedImage] = []
        for im in unique + [None]:
            if batch and (im is None or sum(b.pixel_values.shape[0] for b in batch) + im.pixel_values.shape[0]
                          > PATCHES_PER_CALL):
                pv = torch.cat([b.pixel_values for b in batch]).to(self.device, self.dtype)
                for b, e in zip(batch, self.vision.encode(pv, [b.grid for b in batch])):
                    self._put(b.key, e)
                self.stats["encoded"] += len(batch)
                batch = []
            if im is not None:
                batch.append(im)
        out = []
        for im in images:
            e = self.cache.get(im.key)
            if e is None:           # evicted within this very call (a cache smaller than the request)
                e = self.vision.encode(im.pixel_values.to(self.device, self.dtype), [im.grid])[0]
            else:
                self.cache.move_to_end(im.key)
            out.append(e)
        return out

    def _put(self, key: str, e: torch.Tensor) -> None:
        self.cache[key] = e
        self._held += e.numel() * e.element_size()
        while self._held > self.cache_bytes and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self._held -= old.numel() * old.element_size()
