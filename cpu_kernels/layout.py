"""INT4 expert weight layout: compressed-tensors -> kernel layout, and back.

On disk (compressed-tensors "pack-quantized", KIMI_K2_SPEC.md §2.3), a Linear with N outputs and
K inputs is ``packed`` int32 [N, K/8] (column 8j+i in bits 4i..4i+3 of word j, u in [0, 15],
q = u - 8) plus ``scale`` bf16 [N, K/32] (one per row and group of 32 inputs).

Kernel layout (what ``moe_int4.py`` streams): tiles of 8 output rows ("vertical SIMD": the 8
lanes of an fp32/int32 AVX2 register are 8 rows), G = K/32 groups, one 144-byte block per
(tile, group), blocks in (tile, group) order so a tile is one sequential stream:

    w uint8 [N/8, G, 144]
      bytes   0..127: 4 vectors of 32 bytes; in vector j (0..3), byte 4*r + kk (row r of the tile,
                      kk = 0..3) holds  u[r, 32g + 4j + kk]  |  u[r, 32g + 16 + 4j + kk] << 4
                      so (v & 0x0F) and (v >> 4) each give 8 rows x 4 consecutive inputs, to be
                      multiplied (vpmaddubsw) by those 4 int8 activations broadcast 8 times;
      bytes 128..143: the tile's 8 bf16 scales of group g, row order (bit for bit from disk).

Bytes: 144 per 8 rows x 32 inputs = 128 nibble bytes + 16 scale bytes: exactly the on-disk
bytes (packed + scale) for every shape whose N is a multiple of 8 and K of 32 (K2.6: all), so
the 1.05x memory bound holds with room to spare. Weights stay unsigned (u = q + 8); the kernels
subtract 8 * sum(activations) per group instead.

Dequantization used everywhere in this package: W[r, c] = float32(u - 8) * float32(scale), which
is exact in fp32 (4-bit times 8-bit mantissa). compressed-tensors rounds that product to bf16;
the two differ by at most half a bf16 ulp (2^-9 relative) on some elements.

Checked by tests/test_cpu_kernels.py (round trip against an independent unpack, byte sizes).
"""
import numpy as np
import torch

LAYOUT_VERSION = 1  # bump when the byte layout below changes (invalidates cached repacked files)
GROUP = 32          # inputs per scale group (compressed-tensors group_size)
TILE = 8            # output rows per tile (one AVX2 register of fp32 / int32 lanes)
BLOCK_BYTES = 144   # per (tile, group): 8 rows x 32 nibbles = 128 bytes + 8 bf16 scales


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


def layout_shape(n: int, k: int) -> tuple[int, int, int]:
    assert n % TILE == 0, f"N={n} is not a multiple of the row tile {TILE}"
    assert k % GROUP == 0, f"K={k} is not a multiple of the group size {GROUP}"
    return (n // TILE, k // GROUP, BLOCK_BYTES)


def repack(packed, scale, out=None) -> np.ndarray:
    """compressed-tensors (packed int32 [N, K/8], scale bf16 [N, K/32]) -> kernel layout w.

    Writes into ``out`` uint8 [N/8, K/32, 144] when given (a preallocated buffer)."""
    u = unpack_compressed(packed)
    n, k = u.shape
    shape = layout_shape(n, k)
    t8, g = shape[0], shape[1]
    s = bf16_bits(scale)
    assert s.shape == (n, g), f"scale shape {tuple(s.shape)} does not match packed {(n, k // 8)}"
    if out is None:
        out = np.empty(shape, np.uint8)
    assert out.shape == shape and out.dtype == np.uint8, (out.shape, shape)
    # column c = 32g + 16*half + 4j + kk ; row = 8*tile + r
    uu = u.reshape(t8, TILE, g, 2, 4, 4).transpose(0, 2, 3, 4, 1, 5)  # [tile, g, half, j, r, kk]
    out[:, :, :128] = (uu[:, :, 0] | (uu[:, :, 1] << 4)).reshape(t8, g, 128)
    out[:, :, 128:] = s.reshape(t8, TILE, g).transpose(0, 2, 1).copy().view(np.uint8).reshape(t8, g, 16)
    return out


def unpack_layout(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kernel layout w [N/8, G, 144] -> (nibbles u uint8 [N, 32G] in column order, bf16 bits [N, G])."""
    t8, g, _ = w.shape
    b = w[:, :, :128].reshape(t8, g, 1, 4, TILE, 4)  # [tile, g, -, j, r, kk]
    uu = np.concatenate([b & 0xF, b >> 4], axis=2)   # [tile, g, half, j, r, kk]
    u = uu.transpose(0, 4, 1, 2, 3, 5).reshape(t8 * TILE, g * GROUP)
    s = w[:, :, 128:].copy().view(np.uint16).reshape(t8, g, TILE).transpose(0, 2, 1).reshape(t8 * TILE, g)
    return u, s


def dequantize_layout(w: np.ndarray) -> np.ndarray:
    """Kernel layout -> float32 [N, K] = float32(u - 8) * float32(scale), exactly the kernel's weights."""
    u, s = unpack_layout(w)
    q = u.astype(np.float32) - 8.0
    n, k = q.shape
    return (q.reshape(n, k // GROUP, GROUP) * bf16_bits_to_f32(s)[:, :, None]).reshape(n, k)


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
