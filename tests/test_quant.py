"""INT4 pack/unpack against the compressed-tensors package's own packer and unpacker; FP8 blocks."""
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from hybrid.formats import (dequantize_fp8_block, dequantize_int4, pack_int4, quantize_fp8_block, quantize_int4,
                          unpack_int4)


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


def test_quantize_dequantize_error():
    w = torch.randn(64, 256) * 0.02
    q, packed, scale = quantize_int4(w, 32)
    assert scale.dtype == torch.bfloat16 and scale.shape == (64, 8)
    deq = dequantize_int4(packed, scale, 256, 32, torch.float32)
    step = scale.float().repeat_interleave(32, 1)
    # round-to-nearest: half a step, plus the bf16 rounding of the scale (+-0.4%, x7.5) and of the product
    assert ((deq - w).abs() <= 0.56 * step).all()
    assert (deq - w).abs().mean() < 0.3 * step.mean()


def test_fp8_block_roundtrip():
    w = torch.randn(200, 300)
    q, s = quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    back = dequantize_fp8_block(q, s, dtype=torch.float32)
    assert ((back - w).abs() / w.abs().clamp(min=0.05)).max() < 0.2     # e4m3: 3 mantissa bits
