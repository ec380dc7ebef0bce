"""Lazy reader of a Hugging Face safetensors checkpoint (index + shards), as shipped.

* `model.safetensors.index.json` (or a single `model.safetensors`) maps tensor names to shards;
  each shard's header is parsed and checked against the file size when the checkpoint opens, and
  tensors are read through a memory map, so looking at one tensor of a 600 GB checkpoint reads
  only that tensor's pages.
* Names: the multimodal wrapper's `language_model.` prefix is stripped; `vision_tower.*` and
  `mm_projector.*` are ignored (text-only runtime).
* Linear weights come in three formats, detected per module: dense bf16/fp16/fp32 `.weight`,
  compressed-tensors INT4 (`weight_packed` / `weight_scale` / `weight_shape`), and FP8 blocks
  (`.weight` float8_e4m3fn + `.weight_scale_inv`).
Every problem is a CheckpointError naming the file and the tensor. Untrusted input is confined: the
index's shard names must be plain file names in the model folder (no `..`, no absolute path, no
sub-folder); every shard must be a regular file (a directory, FIFO or device is named as such, and never
opened); header offsets must be integers, inside the data section and not overlapping; floating-point
tensors read for the model (tensor / linear / vector) are checked for NaN/Inf, naming the tensor
(`check_finite`; the routed experts' INT4 scales read by `int4` are not: those are the CPU side).
Checked by tests/test_checkpoint.py (one test per kind of bad input).
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from hybrid.config import ModelConfig
from hybrid.formats import dequantize_fp8_block, dequantize_int4

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
IGNORED_PREFIXES = ("vision_tower.", "mm_projector.", "multi_modal_projector.")

# safetensors dtype -> (numpy storage dtype, torch dtype it is viewed as)
DTYPES = {
    "BF16": (np.int16, torch.bfloat16),
    "F16": (np.float16, torch.float16),
    "F32": (np.float32, torch.float32),
    "F64": (np.float64, torch.float64),
    "I8": (np.int8, torch.int8),
    "U8": (np.uint8, torch.uint8),
    "I16": (np.int16, torch.int16),
    "I32": (np.int32, torch.int32),
    "I64": (np.int64, torch.int64),
    "BOOL": (np.bool_, torch.bool),
    "F8_E4M3": (np.uint8, torch.float8_e4m3fn),
    "F8_E5M2": (np.uint8, torch.float8_e5m2),
}
TORCH_TO_ST = {t: name for name, (_, t) in DTYPES.items()}
TORCH_TO_ST[torch.bfloat16] = "BF16"


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, malformed, or not what the config says."""


FINITE_CHUNK = 1 << 24              # elements checked at once (bounds the temporary bool tensor)


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """CheckpointError naming `name` if a floating-point `tensor` holds NaN or +-Inf (any device;
    checked in chunks, so a 1 G-element embedding needs no 1 GB temporary). Integer tensors pass."""
    if not tensor.is_floating_point():
        return
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), FINITE_CHUNK):       # (an empty tensor: no chunk)
        chunk = flat[start:start + FINITE_CHUNK]
        if chunk.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            chunk = chunk.float()
        lo, hi = chunk.aminmax()        # NaN propagates; ~20x faster than isfinite().all() on CPU bf16
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            ok = torch.isfinite(chunk)
            bad = (~ok).nonzero()
            first = start + int(bad[0])
            value = float(chunk[int(bad[0])])
            n = int(bad.numel()) + sum(int((~torch.isfinite(flat[s:s + FINITE_CHUNK].float())).sum())
                                       for s in range(start + FINITE_CHUNK, flat.numel(), FINITE_CHUNK))
            raise CheckpointError(f"{name}: {n} non-finite value(s) (NaN/Inf), the first {value} at flat index "
                                  f"{first} of shape {list(tensor.shape)}: the checkpoint is corrupt "
                                  "(re-download this shard)")


def file_kind(path: Path) -> str | None:
    """None for a regular file (or a link to one); otherwise what `path` is, in words."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)})"
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    if os.path.islink(path):
        kind += f" (a link to {os.readlink(path)})"
    return kind


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shard_name(index: Path, fname, users: list[str]) -> str:
    """A weight_map value must be a plain file name in the model folder: no path, no '..'."""
    where = f"{index}: weight_map entry '{users[0]}'"
    if not isinstance(fname, str) or not fname:
        raise CheckpointError(f"{where} must name a shard file (a non-empty string), got {json.dumps(fname)[:80]}")
    if os.path.isabs(fname) or fname.startswith(("/", "\\")) or (fname[1:2] == ":" and fname[0].isalpha()):
        raise CheckpointError(f"{where} points to the absolute path {fname!r}: shards must be files "
                              "inside the model folder")
    parts = fname.replace("\\", "/").split("/")
    if ".." in parts:
        raise CheckpointError(f"{where} points outside the model folder ({fname!r})")
    if len(parts) > 1 or fname in (".",):
        raise CheckpointError(f"{where} names {fname!r}: shards must be plain file names in the model folder")
    return fname


class _Shard:
    """One .safetensors file: its parsed header and a lazily created read-only memory map."""

    def __init__(self, path: Path):
        self.path = path
        self._mmap = None
        kind = file_kind(path)
        if kind is not None:
            raise CheckpointError(f"{path}: shard file " + ("not found" if kind == "missing" else
                                                          f"is {kind}, not a regular file"))
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated shard ({size} bytes, no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{path}: corrupt or truncated shard: header length {n} "
                                      f"does not fit the file ({size} bytes)")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (ValueError, RecursionError) as e:        # bad JSON or UTF-8, too deep, a huge number
            raise CheckpointError(f"{path}: corrupt shard header (not JSON: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt shard header (not a JSON object)")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries = {}
        spans = []
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = e["dtype"], list(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor '{name}': malformed header entry {str(e)[:200]}") from None
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise CheckpointError(f"{path}: tensor '{name}': unsupported dtype {str(dtype)[:40]}")
            if not all(_is_int(d) and d >= 0 for d in shape):
                raise CheckpointError(f"{path}: tensor '{name}': shape {str(shape)[:80]} is not a list of "
                                      "non-negative integers")
            if not (_is_int(begin) and _is_int(end)):
                raise CheckpointError(f"{path}: tensor '{name}': data_offsets {str(e['data_offsets'])[:80]} "
                                      "are not two integers")
            want = math.prod(shape) * np.dtype(DTYPES[dtype][0]).itemsize
            if end - begin != want or begin < 0:
                raise CheckpointError(f"{path}: tensor '{name}': data_offsets {begin}..{end} do not hold "
                                      f"{dtype}{shape} ({want} bytes)")
            if end > data_len:
                raise CheckpointError(f"{path}: truncated shard: tensor '{name}' ends at byte {end} of the "
                                      f"data section but the file holds only {data_len} (re-download the shard)")
            self.entries[name] = (dtype, shape, begin)
            if end > begin:
                spans.append((begin, end, name))
        spans.sort()
        for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise CheckpointError(f"{path}: tensors '{a}' and '{b}' overlap in the data section "
                                      f"('{b}' starts at byte {begin_b}, before '{a}' ends at {end_a}): "
                                      "corrupt header")

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin = self.entries[name]
        np_dtype, torch_dtype = DTYPES[dtype]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        count = int(np.prod(shape, dtype=np.int64))
        if not count:
            return torch.empty(shape, dtype=torch_dtype)
        arr = np.frombuffer(self._mmap, dtype=np_dtype, count=count, offset=self.data_start + begin)
        with warnings.catch_warnings():  # read-only map: torch warns that it cannot write to it
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr.reshape(shape))
        return t.view(torch_dtype) if t.dtype != torch_dtype else t


class Checkpoint:
    """Tensors of a checkpoint directory by name (prefix stripped), read lazily."""

    def __init__(self, model_dir: str | Path, config: ModelConfig):
        self.dir = Path(model_dir)
        self.config = config
        index = self.dir / INDEX_FILE
        if os.path.lexists(index):
            kind = file_kind(index)
            if kind is not None:
                raise CheckpointError(f"{index}: is {kind}, not a regular file")
            try:
                weight_map = json.loads(index.read_bytes())["weight_map"]
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object): "
                                      f"{type(e).__name__}: {str(e)[:200]}") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files")
            users: dict = {}
            for k, v in weight_map.items():
                users.setdefault(v if isinstance(v, str) else json.dumps(v), []).append(k)
            for key, names in users.items():
                _shard_name(index, weight_map[names[0]], names)
            files = sorted(users)
            for fname in files:
                kind = file_kind(self.dir / fname)
                if kind == "missing":
                    raise CheckpointError(f"{index}: names shard '{fname}' (holding e.g. '{users[fname][0]}'), "
                                          f"which is missing from {self.dir}")
                if kind is not None:
                    raise CheckpointError(f"{index}: names shard '{fname}' (holding e.g. '{users[fname][0]}'), "
                                          f"which is {kind}, not a regular file")
        elif os.path.lexists(self.dir / SINGLE_FILE):
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{self.dir}: no {INDEX_FILE} or {SINGLE_FILE}")
        self.shards = {f: _Shard(self.dir / f) for f in files}
        self._where: dict[str, tuple[_Shard, str]] = {}
        for fname, shard in self.shards.items():
            for full in shard.entries:
                if weight_map is not None and weight_map.get(full) != fname:
                    continue  # the index decides which copy counts
                name = self._strip(full)
                if name is not None:
                    self._where[name] = (shard, full)
        if weight_map is not None:
            for full, fname in weight_map.items():
                name = self._strip(full)
                if name is not None and name not in self._where:
                    raise CheckpointError(f"{self.dir / fname}: tensor '{full}' is listed in {INDEX_FILE} "
                                          "but not stored in the shard")

    def _strip(self, full: str) -> str | None:
        if full.startswith(IGNORED_PREFIXES):
            return None
        if full.startswith("language_model."):
            return full[len("language_model."):]
        return full

    def release(self) -> None:
        """Drop the shards' memory maps (they reopen on the next read). The loader calls this after
        each layer, so pages already copied out stop counting in the process's memory."""
        for shard in self.shards.values():
            shard._mmap = None

    # ---- plain tensors -------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        """The shard holding tensor `name` (KeyError if the checkpoint has no such tensor)."""
        if name not in self._where:
            raise KeyError(f"{self.dir}: no tensor {name!r}")
        return self._where[name][0].path

    def tensor(self, name: str, shape: tuple | None = None, dtypes: tuple | None = None,
               finite: bool = True) -> torch.Tensor:
        """The stored tensor (memory-mapped, read-only), checked against `shape` and `dtypes`, and
        (finite=True, floating point) for NaN/Inf."""
        if name not in self._where:
            raise CheckpointError(f"{self.dir}: tensor '{self.config.weight_prefix}{name}' not found in the "
                                  f"checkpoint (index or shards); is this the right model for its config.json?")
        shard, full = self._where[name]
        dtype, stored_shape, _ = shard.entries[full]
        if shape is not None and tuple(stored_shape) != tuple(shape):
            raise CheckpointError(f"{shard.path}: tensor '{full}' has shape {list(stored_shape)}, "
                                  f"config.json implies {list(shape)}")
        if dtypes is not None and DTYPES[dtype][1] not in dtypes:
            allowed = ", ".join(TORCH_TO_ST[d] for d in dtypes)
            raise CheckpointError(f"{shard.path}: tensor '{full}' has dtype {dtype}, expected {allowed}")
        t = shard.read(full)
        if finite and dtype not in ("F8_E4M3", "F8_E5M2"):       # FP8 is checked after dequantization
            check_finite(f"{shard.path}: tensor '{full}'", t)
        return t

    # ---- Linear weights in any of the three formats ---------------------------------------
    def weight_format(self, module: str) -> str:
        if self.has(f"{module}.weight_packed"):
            return "int4"
        if self.has(f"{module}.weight_scale_inv"):
            return "fp8"
        if self.has(f"{module}.weight"):
            return "dense"
        for suffix in ("weight_zero_point", "qweight", "weight_g_idx", "scales"):
            if self.has(f"{module}.{suffix}"):
                raise CheckpointError(f"{self.file_of(f'{module}.{suffix}')}: tensor '{module}.{suffix}': "
                                      "unknown quantization format (supported: bf16/fp16/fp32, "
                                      "compressed-tensors pack-quantized INT4 symmetric, FP8 128x128 blocks)")
        raise CheckpointError(f"{self.dir}: tensor '{self.config.weight_prefix}{module}.weight' not found "
                              "(nor an INT4 weight_packed / FP8 weight_scale_inv form)")

    def int4(self, module: str, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight_packed int32 [N, K/8], weight_scale bf16 [N, K/group]) as stored, validated."""
        g = self.config.quantization.group_size
        if self.config.quantization.method != "int4":
            raise CheckpointError(f"{self.file_of(module + '.weight_packed')}: tensor '{module}.weight_packed' is "
                                  f"INT4 but config.json quantization_config says {self.config.quantization.method!r}")
        shape = self.tensor(f"{module}.weight_shape", shape=(2,), dtypes=(torch.int32, torch.int64))
        if [int(v) for v in shape] != [out_features, in_features]:
            raise CheckpointError(f"{self.file_of(module + '.weight_shape')}: tensor '{module}.weight_shape' is "
                                  f"{[int(v) for v in shape]}, config.json implies {[out_features, in_features]}")
        packed = self.tensor(f"{module}.weight_packed", shape=(out_features, -(-in_features // 8)),
                             dtypes=(torch.int32,))
        scale = self.tensor(f"{module}.weight_scale", shape=(out_features, -(-in_features // g)),
                            dtypes=(torch.bfloat16, torch.float16, torch.float32), finite=False)
        return packed, scale

    def linear(self, module: str, out_features: int, in_features: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense weight [N, K] in `dtype`, dequantized the way the reference does if stored quantized."""
        fmt = self.weight_format(module)
        if fmt == "int4":
            packed, scale = self.int4(module, out_features, in_features)
            w = dequantize_int4(packed, scale, in_features, self.config.quantization.group_size).to(dtype)
            check_finite(f"{self.file_of(module + '.weight_scale')}: tensor '{module}.weight_scale' "
                         "(dequantized weight)", w)
            return w
        if fmt == "fp8":
            bn, bk = self.config.quantization.block_size
            w = self.tensor(f"{module}.weight", shape=(out_features, in_features),
                            dtypes=(torch.float8_e4m3fn,))
            s = self.tensor(f"{module}.weight_scale_inv", shape=(-(-out_features // bn), -(-in_features // bk)),
                            dtypes=(torch.float32, torch.bfloat16))
            w = dequantize_fp8_block(w, s, (bn, bk), dtype=torch.bfloat16).to(dtype)
            check_finite(f"{self.file_of(module + '.weight')}: tensor '{module}.weight' (FP8, dequantized)", w)
            return w
        w = self.tensor(f"{module}.weight", shape=(out_features, in_features),
                        dtypes=(torch.bfloat16, torch.float16, torch.float32))
        return w.to(dtype)

    def vector(self, name: str, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.tensor(name, shape=(size,), dtypes=(torch.bfloat16, torch.float16, torch.float32)).to(dtype)
