"""The checkpoints' weight formats, defined once: pack, unpack, dequantize, quantize, bytes.

INT4 is compressed-tensors `pack-quantized` (symmetric, group 32; docs/kimi_k2.md §2 and
compressed-tensors' `pack_to_int32` / `unpack_from_int32`): signed q in [-8, 7] stored as u = q + 8,
eight nibbles per int32 along the input dimension, column 8j+i in bits 4i..4i+3 of word j; one bf16
scale per row and group of `group` inputs; W = bf16(q * scale), rounded to bf16 as compressed-tensors'
own dequantization does.
FP8 is DeepSeek-V3's block format: float8_e4m3fn weights, one fp32 `weight_scale_inv` per 128x128
block; W = bf16(w * scale_inv[block]).

The CPU-only format of the accelerator-side Linears (LLM(cpu_weights=), `hybrid plan --cpu-weights`)
is chosen once, here: `choose_cpu_weights`.

Every runtime path uses these: the checkpoint reader, every routed-expert backend (bf16/FP8 experts
are quantized with `quantize_int4` at load, whatever the backend), the memory plan, streaming and the
tools (`int4_expert_nbytes`). The kernel packages (cpu_kernels/, gpu_kernels/) import nothing from
hybrid/: they take the unpacked nibbles (CPU repack) or read the words themselves (Triton), and their
tests check them against this module and against compressed-tensors' own unpacker.
Checked by tests/test_formats.py.
"""
from __future__ import annotations

import numpy as np
import torch

INT4_GROUP = 32             # inputs per bf16 scale (compressed-tensors group_size of K2.x)
FP8_BLOCK = (128, 128)      # DeepSeek-V3 weight_block_size


# ---- INT4 pack-quantized ---------------------------------------------------------------------
def unpack_int4_u(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [N, ceil(K/8)] -> unsigned nibbles u = q + 8, uint8 [N, K]."""
    words = packed.to(torch.int32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    u = (words.unsqueeze(-1) >> shifts) & 0xF                     # [N, K/8, 8], logical after the mask
    return u.reshape(words.shape[0], -1)[:, :in_features].to(torch.uint8)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [N, ceil(K/8)] -> int8 q [N, K] in [-8, 7]."""
    return (unpack_int4_u(packed, in_features).to(torch.int16) - 8).to(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 q [N, K] in [-8, 7] -> int32 [N, ceil(K/8)], K zero-padded (u = 0) to a multiple of 8."""
    n, k = q.shape
    assert int(q.min()) >= -8 and int(q.max()) <= 7, "int4 values must lie in [-8, 7]"
    u = (q.to(torch.int64) + 8)
    pad = (-k) % 8
    if pad:
        u = torch.cat([u, torch.zeros(n, pad, dtype=torch.int64)], dim=1)
    u = u.view(n, -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (u << shifts).sum(-1)                                   # < 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, in_features: int, group: int = INT4_GROUP,
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The reference dequantization: bf16(q) * bf16 scale, rounded to bf16, then cast to `dtype`."""
    q = unpack_int4(packed, in_features)
    s = scale.to(torch.bfloat16).repeat_interleave(group, dim=1)[:, :in_features]
    return (q.to(torch.bfloat16) * s).to(dtype)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even."""
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _bits_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [N, K] (any float dtype) -> (packed int32 [N, K/8], scale bf16 [N, K/group]).

    The one quantizer of the runtime (bf16 and FP8 experts at load, every backend): round to nearest,
    symmetric, per group. The scale is max(max(w)/7, -min(w)/8) rounded *up* to bf16, so no value is
    clipped and every error is <= scale/2 (compressed-tensors' absmax/7.5 clips a group's largest
    positive value by half a step: 0.095 vs 0.092 relative rms error on Gaussian weights)."""
    w = w.detach().cpu().float().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, np.float32)
    n, k = w.shape
    assert k % group == 0, f"in_features {k} must be a multiple of the group {group}"
    wg = w.reshape(n, k // group, group)
    scale = np.maximum(np.maximum(wg.max(axis=2) / 7.0, -wg.min(axis=2) / 8.0), np.finfo(np.float32).tiny)
    bits = _bf16_bits(scale)
    bits = np.where(_bits_f32(bits) < scale, bits + 1, bits).astype(np.uint16)     # round up
    q = np.clip(np.rint(wg / _bits_f32(bits)[:, :, None]), -8, 7).astype(np.int8).reshape(n, k)
    return pack_int4(torch.from_numpy(q)), torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


def int4_nbytes(out_features: int, in_features: int, group: int = INT4_GROUP) -> int:
    """Bytes of one INT4 Linear as stored: packed nibbles + bf16 scales."""
    return out_features * -(-in_features // 8) * 4 + out_features * -(-in_features // group) * 2


def int4_expert_nbytes(hidden: int, intermediate: int, group: int = INT4_GROUP) -> int:
    """Bytes of one routed expert (gate, up [I, D] and down [D, I]) in INT4 + scales: what the CPU
    kernels keep in RAM, what streaming copies, what the plan counts (24.77 MB for K2.6)."""
    return 2 * int4_nbytes(intermediate, hidden, group) + int4_nbytes(hidden, intermediate, group)


# ---- FP8 128x128 blocks ----------------------------------------------------------------------
def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple = FP8_BLOCK,
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """float8_e4m3fn [N, K] and fp32 scale_inv [ceil(N/bn), ceil(K/bk)] -> dense [N, K]."""
    n, k = weight.shape
    bn, bk = block
    s = scale_inv.float().repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    return (weight.float() * s).to(dtype)


def quantize_fp8_block(w: torch.Tensor, block: tuple = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [N, K] -> (float8_e4m3fn [N, K], fp32 scale_inv per block) with amax/448 scales."""
    n, k = w.shape
    bn, bk = block
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.zeros(nb * bn, kb * bk)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / 448.0
    q = (blocks / scale_inv[:, None, :, None]).view(nb * bn, kb * bk)[:n, :k]
    return q.to(torch.float8_e4m3fn), scale_inv.float()


# ---- the accelerator side's Linears on a CPU-only machine (hybrid/model/cpu_linear.py) ---------------
CPU_WEIGHTS = ("auto", "off", "bf16", "int8")


def choose_cpu_weights(requested: str, on_cpu: bool, gpu_weights: str = "bf16") -> tuple[str, str]:
    """(format, why) for LLM(cpu_weights=requested) and the plan: "auto" is "bf16" (the checkpoint's bf16
    values through our kernels) when the accelerator side runs on the CPU without gpu_weights quantization,
    else "off" (torch's Linears); an explicit "bf16" / "int8" where it cannot apply, or an unknown value,
    is an error. hybrid/model/cpu_linear.resolve_cpu_weights adds the runtime's one fallback."""
    if requested not in CPU_WEIGHTS:
        raise ValueError(f"cpu_weights {requested!r}: choose one of {', '.join(CPU_WEIGHTS)}")
    if requested == "auto":
        if not on_cpu:
            return "off", "the accelerator side runs on the GPU"
        if gpu_weights != "bf16":
            return "off", f"gpu_weights={gpu_weights} quantizes those Linears already"
        return "bf16", "auto: CPU-only, the checkpoint's bf16 values through our kernels, half the bytes of float32"
    if requested != "off" and (not on_cpu or gpu_weights != "bf16"):
        raise ValueError("cpu_weights applies when the accelerator side runs on the CPU (device='cpu'), "
                         "without gpu_weights")
    return requested, "requested" if requested != "off" else "off: torch's Linears"
