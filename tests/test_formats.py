"""hybrid/formats.py: INT4 pack/unpack against the compressed-tensors package's own packer and unpacker,
the one quantizer's error bound, expert bytes, FP8 blocks."""
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from hybrid.formats import (dequantize_fp8_block, dequantize_int4, int4_expert_nbytes, pack_int4, quantize_fp8_block,
                            quantize_int4, unpack_int4)


@pytest.mark.parametrize("n,k", [(1, 8), (3, 32), (17, 96), (64, 7168 // 16)])
def test_pack_matches_compressed_tensors(n, k):
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    ours = pack_int4(q)
    theirs = pack_to_int32(q, 4)
    assert ours.dtype == torch.int32 and torch.equal(ours, theirs)
    assert torch.equal(unpack_int4(theirs, k), q)
    assert torch.equal(unpack_from_int32(ours, 4, torch.Size([n, k])).to(torch.int8), q)


def test_nibble_order_is_column_8j_plus_i_in_bits_4i():
    q = torch.full((1, 8), -8, dtype=torch.int8)
    q[0, 0] = 7        # u = 15 in the least significant nibble
    q[0, 7] = -7       # u = 1 in the most significant nibble
    assert pack_int4(q).item() == (1 << 28) | 0xF


HALF_STEP = 0.5          # round to nearest: at most half a quantization step ...
BF16_PRODUCT = 2 ** -8   # ... plus the bf16 rounding of q * scale (relative, |q| <= 8)


@pytest.mark.parametrize("n,k,seed", [(64, 256, 0), (7, 96, 1), (1, 32, 2)])
def test_quantize_never_clips_and_errs_at_most_half_a_step(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[0, 0] = 0.5                                     # an outlier: its group's scale must cover it
    packed, scale = quantize_int4(w, 32)
    assert packed.dtype == torch.int32 and packed.shape == (n, k // 8)
    assert scale.dtype == torch.bfloat16 and scale.shape == (n, k // 32)
    q = unpack_from_int32(packed, 4, torch.Size([n, k])).float()    # compressed-tensors' own unpacker
    step = scale.float().repeat_interleave(32, 1)
    assert ((q * step - w).abs() <= HALF_STEP * step * (1 + 1e-6)).all()
    deq = dequantize_int4(packed, scale, k, 32, torch.float32)
    assert ((deq - w).abs() <= HALF_STEP * step + BF16_PRODUCT * deq.abs() + 1e-12).all()


def test_quantize_round_trips_representable_weights():
    q = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    q[:, ::32] = 7                          # each group holds +7 so that scale = max/7 exactly
    w = q.float() * 0.125
    packed, scale = quantize_int4(w)
    assert torch.equal(unpack_int4(packed, 64), q) and torch.all(scale.float() == 0.125)


def test_expert_bytes_of_k2_6():
    # gate and up: 2048 rows x (7168 / 2 bytes + 224 bf16 scales); down: 7168 rows x (1024 + 64 x 2) bytes
    assert int4_expert_nbytes(7168, 2048) == 2 * 2048 * (3584 + 448) + 7168 * (1024 + 128) == 24_772_608


def test_fp8_block_roundtrip():
    w = torch.randn(200, 300)
    q, s = quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    back = dequantize_fp8_block(q, s, dtype=torch.float32)
    assert ((back - w).abs() / w.abs().clamp(min=0.05)).max() < 0.2     # e4m3: 3 mantissa bits
