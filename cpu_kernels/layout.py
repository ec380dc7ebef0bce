"""INT4 expert weight layout of the CPU kernels: unsigned nibbles + bf16 scales -> kernel layout, and back.

Input (what ``repack`` takes): a Linear with N outputs and K inputs as unsigned nibbles
``u`` uint8 [N, K] (u = q + 8 in [0, 15], q the signed INT4 value) and ``scale`` bf16 [N, K/32]
(one per row and group of 32 inputs). Unpacking the checkpoint's int32 words into ``u`` is the
runtime's job (hybrid/formats.py, the one definition of the on-disk format); this package imports
nothing from hybrid/.

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

Checked by tests/test_cpu_kernels.py (round trip, byte sizes).
"""
import numpy as np
import torch

LAYOUT_VERSION = 1  # bump when the byte layout below changes (invalidates cached repacked files)
GROUP = 32          # inputs per scale group (compressed-tensors group_size)
TILE = 8            # output rows per tile (one AVX2 register of fp32 / int32 lanes)
BLOCK_BYTES = 144   # per (tile, group): 8 rows x 32 nibbles = 128 bytes + 8 bf16 scales


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


def layout_shape(n: int, k: int) -> tuple[int, int, int]:
    assert n % TILE == 0, f"N={n} is not a multiple of the row tile {TILE}"
    assert k % GROUP == 0, f"K={k} is not a multiple of the group size {GROUP}"
    return (n // TILE, k // GROUP, BLOCK_BYTES)


def repack(u, scale, out=None) -> np.ndarray:
    """(nibbles u uint8 [N, K], scale bf16 [N, K/32]) -> kernel layout w uint8 [N/8, K/32, 144].

    Writes into ``out`` when given (a preallocated buffer)."""
    u = u.numpy() if isinstance(u, torch.Tensor) else np.asarray(u)
    assert u.dtype == np.uint8 and u.ndim == 2, f"u must be uint8 [N, K] nibbles, got {u.dtype} {u.shape}"
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
