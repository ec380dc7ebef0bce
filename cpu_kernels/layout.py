"""INT4 expert weight layout: compressed-tensors -> kernel layout, and back.

On disk (compressed-tensors "pack-quantized", KIMI_K2_SPEC.md §2.3), a Linear with N outputs and
K inputs is ``packed`` int32 [N, K/8] (column 8j+i in bits 4i..4i+3 of word j, u in [0, 15],
q = u - 8) plus ``scale`` bf16 [N, K/32] (one per row and group of 32 inputs).

Kernel layout (what ``moe_int4.py`` streams), per matrix, G = K/32 groups per row:

    w  uint8  [N, 16*G]   row r holds its G groups as 16-byte halves of 32-byte *pairs*:
                          for pair p (groups 2p and 2p+1), byte 32p+b (b = 0..31) is
                              u[r, 64p + b]  |  u[r, 64p + 32 + b] << 4
                          so one 32-byte load, masked with 0x0F, gives the 32 unsigned weights of
                          group 2p in column order, and shifted right by 4 those of group 2p+1;
                          both line up with 32 consecutive int8 activations (vpmaddubsw).
                          If G is odd the last group is alone in 16 bytes at offset 32*(G//2):
                          byte b (0..15) = u[r, 32g + b] | u[r, 32g + 16 + b] << 4.
    s  uint16 [N, G]      the bf16 scales, bit for bit (bf16 -> fp32 is a 16-bit shift).

Bytes: 16*G + 2*G per row = exactly the on-disk bytes (packed + scale), for any K that is a
multiple of 32, so the 1.05x memory bound holds with room to spare. Weights stay unsigned
(u = q + 8); the kernels subtract 8 * sum(activations) per group instead.

Dequantization used everywhere in this package: W[r, c] = float32(u - 8) * float32(scale), which
is exact in fp32 (4-bit times 8-bit mantissa). compressed-tensors rounds that product to bf16;
the two differ by at most half a bf16 ulp (2^-9 relative) on some elements.

Checked by tests/test_cpu_kernels.py (round trip against an independent unpack, byte sizes).
"""
import numpy as np
import torch

GROUP = 32           # inputs per scale group (compressed-tensors group_size)
BYTES_PER_GROUP = 16  # 32 nibbles
# A group of the layout is 16 weight bytes + one 2-byte scale: same as on disk.
LAYOUT_BYTES_PER_GROUP = BYTES_PER_GROUP + 2


def to_numpy_int32(packed):
    if isinstance(packed, torch.Tensor):
        packed = packed.detach().cpu()
        assert packed.dtype == torch.int32, f"weight_packed must be int32, got {packed.dtype}"
        return packed.numpy()
    packed = np.asarray(packed)
    assert packed.dtype in (np.int32, np.uint32), f"weight_packed must be int32, got {packed.dtype}"
    return packed.view(np.int32)


def bf16_bits(scale) -> np.ndarray:
    """Scales as bf16 bit patterns (uint16). fp32 input is rounded to nearest-even bf16."""
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().cpu()
        if scale.dtype != torch.bfloat16:
            scale = scale.float().to(torch.bfloat16)
        return scale.contiguous().view(torch.int16).numpy().view(np.uint16)
    scale = np.ascontiguousarray(scale, dtype=np.float32)
    return torch.from_numpy(scale).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def unpack_compressed(packed) -> np.ndarray:
    """compressed-tensors int32 [N, K/8] -> unsigned nibbles u uint8 [N, K]."""
    p = to_numpy_int32(packed).view(np.uint32)
    n, kw = p.shape
    shifts = (4 * np.arange(8, dtype=np.uint32))
    return ((p[:, :, None] >> shifts) & 0xF).astype(np.uint8).reshape(n, kw * 8)


def pack_compressed(u: np.ndarray) -> np.ndarray:
    """Unsigned nibbles u uint8 [N, K] -> compressed-tensors int32 [N, K/8]."""
    n, k = u.shape
    assert k % 8 == 0
    words = u.reshape(n, k // 8, 8).astype(np.uint32) << (4 * np.arange(8, dtype=np.uint32))
    return np.bitwise_or.reduce(words, axis=2).view(np.int32)


def repack(packed, scale, out_w=None, out_s=None):
    """compressed-tensors (packed int32 [N, K/8], scale bf16 [N, K/32]) -> kernel layout (w, s).

    Writes into out_w uint8 [N, 16*G] / out_s uint16 [N, G] when given (preallocated buffers)."""
    u = unpack_compressed(packed)
    n, k = u.shape
    s = bf16_bits(scale)
    assert k % GROUP == 0, f"K={k} is not a multiple of the group size {GROUP}"
    g = k // GROUP
    assert s.shape == (n, g), f"scale shape {s.shape} does not match packed {(n, k // 8)}"
    if out_w is None:
        out_w = np.empty((n, BYTES_PER_GROUP * g), np.uint8)
    if out_s is None:
        out_s = np.empty((n, g), np.uint16)
    assert out_w.shape == (n, BYTES_PER_GROUP * g) and out_w.dtype == np.uint8, out_w.shape
    assert out_s.shape == (n, g) and out_s.dtype == np.uint16, out_s.shape
    npair = g // 2
    pairs = u[:, :64 * npair].reshape(n, npair, 2, 32)
    out_w[:, :32 * npair] = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 32 * npair)
    if g % 2:
        last = u[:, 64 * npair:].reshape(n, 2, 16)
        out_w[:, 32 * npair:] = last[:, 0] | (last[:, 1] << 4)
    out_s[:] = s
    return out_w, out_s


def unpack_layout(w: np.ndarray) -> np.ndarray:
    """Kernel layout w uint8 [N, 16*G] -> unsigned nibbles u uint8 [N, 32*G] in column order."""
    n, nb = w.shape
    g = nb // BYTES_PER_GROUP
    npair = g // 2
    u = np.empty((n, 32 * g), np.uint8)
    pw = w[:, :32 * npair].reshape(n, npair, 1, 32)
    u[:, :64 * npair] = np.concatenate([pw & 0xF, pw >> 4], axis=2).reshape(n, 64 * npair)
    if g % 2:
        lw = w[:, 32 * npair:].reshape(n, 1, 16)
        u[:, 64 * npair:] = np.concatenate([lw & 0xF, lw >> 4], axis=1).reshape(n, 32)
    return u


def dequantize_layout(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Kernel layout -> float32 [N, K] = float32(u - 8) * float32(scale), exactly the kernel's weights."""
    q = unpack_layout(w).astype(np.float32) - 8.0
    sf = bf16_bits_to_f32(s)
    n, k = q.shape
    return (q.reshape(n, k // GROUP, GROUP) * sf[:, :, None]).reshape(n, k)


def quantize_rtn(w) -> tuple[np.ndarray, torch.Tensor]:
    """Dense [N, K] (float/bf16) -> compressed-tensors (packed int32 [N, K/8], scale bf16 [N, K/32]).

    Round-to-nearest, symmetric, group 32. The scale is max(max(w)/7, -min(w)/8) rounded *up* to
    bf16, so no value is clipped and every error is <= scale/2 (compressed-tensors' absmax/7.5
    clips the group's largest positive value by half a step: 0.095 vs 0.092 relative rms error
    on Gaussian weights)."""
    if isinstance(w, torch.Tensor):
        w = w.detach().cpu().float().numpy()
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    assert k % GROUP == 0, f"K={k} is not a multiple of the group size {GROUP}"
    wg = w.reshape(n, k // GROUP, GROUP)
    scale = np.maximum(np.maximum(wg.max(axis=2) / 7.0, -wg.min(axis=2) / 8.0), np.finfo(np.float32).tiny)
    bits = bf16_bits(scale)
    bits = np.where(bf16_bits_to_f32(bits) < scale, bits + 1, bits).astype(np.uint16)  # round up
    sf = bf16_bits_to_f32(bits)
    q = np.clip(np.rint(wg / sf[:, :, None]), -8, 7).astype(np.int16)
    u = (q + 8).astype(np.uint8).reshape(n, k)
    return pack_compressed(u), torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
