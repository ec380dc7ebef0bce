"""Images in a chat: OpenAI-style content parts -> template stubs + image sources; one `<|media_pad|>` per image
-> as many placeholder rows as the image has merged patches.

Parts accepted (in a message's content list):
  {"type": "image_url", "image_url": {"url": DATA_URL | http(s) URL | PATH}}   (OpenAI)
  {"type": "image_url", "image_url": DATA_URL | PATH}                         (shorthand)
  {"type": "image", "image": DATA_URL | PATH | bytes | PIL image}             (transformers / Kimi style)
`video_url` / `video` parts are refused (VideoNotSupported: not supported yet). Each image part is replaced,
before rendering, by a light stub of the same type, so the chat template renders K2.5/K2.6's
`<|media_begin|>image<|media_content|><|media_pad|><|media_end|>` for it without seeing megabytes of base64.
Expansion is what transformers' Kimi_K25Processor.replace_image_token does: the pad becomes
grid_h * grid_w / 4 pads. Checked by tests/test_vision_media.py and tests/test_vision_model.py.
"""
from __future__ import annotations

from hybrid.media.image import MediaError, TooManyImages, VideoNotSupported

IMAGE_TYPES = ("image", "image_url", "input_image")
VIDEO_TYPES = ("video", "video_url", "input_video")


def _part_source(part: dict, where: str):
    kind = part.get("type")
    if kind in ("image_url", "input_image") or (kind is None and "image_url" in part):
        v = part.get("image_url")
        if isinstance(v, dict):
            v = v.get("url")
        if v is None:
            raise MediaError(where, "image_url part needs {'image_url': {'url': ...}}")
        return v
    v = part.get("image")
    if v is None:
        raise MediaError(where, "image part needs an 'image' value (data URL, path, bytes or PIL image)")
    return v


def split_media(messages) -> tuple[list, list[tuple[str, object]]]:
    """(messages with each image part replaced by a stub, [(where, source), ...] in prompt order)."""
    if not isinstance(messages, list):
        return messages, []
    out, sources = [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, dict):
                kind = part.get("type")
                if kind in VIDEO_TYPES or (kind is None and ("video_url" in part or "video" in part)):
                    raise VideoNotSupported(where, "video input is not supported yet; send images "
                                                   "(image_url parts)")
                if kind in IMAGE_TYPES or (kind is None and ("image_url" in part or "image" in part)):
                    sources.append((where, _part_source(part, where)))
                    parts.append({"type": "image_url" if kind != "image" else "image",
                                  "image_url": {"url": f"<image {len(sources)}>"}, "image": f"<image {len(sources)}>"})
                    continue
            parts.append(part)
        m = {k: v for k, v in m.items() if k != "content"}
        m["content"] = parts
        out.append(m)
    return out, sources


def check_count(n: int, max_images: int, where: str = "messages") -> None:
    if n > max_images:
        raise TooManyImages(where, f"{n} images in one request; the limit is {max_images}")


def expand_placeholders(ids: list[int], pad_id: int, counts: list[int], where: str = "prompt"
                        ) -> tuple[list[int], list[int]]:
    """Each of the len(counts) pads of `ids` becomes counts[k] pads; returns (new ids, start row of each image).
    The number of pads must equal the number of images (a pad the caller typed as text is not a pad)."""
    found = [t for t, tok in enumerate(ids) if tok == pad_id]
    if len(found) != len(counts):
        raise MediaError(where, f"{len(found)} <|media_pad|> placeholder(s) (id {pad_id}) for {len(counts)} image(s)")
    out: list[int] = []
    starts: list[int] = []
    last = 0
    for pos, n in zip(found, counts):
        out.extend(ids[last:pos])
        starts.append(len(out))
        out.extend([pad_id] * n)
        last = pos + 1
    out.extend(ids[last:])
    return out, starts

