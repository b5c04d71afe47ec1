import pytest
import torch

from viditq.quant.quantizers import (
    FP8_E4M3_MAX, dequantize_weight, fake_quantize_per_token, pack_int4, quantize_per_token, quantize_per_token_fp8,
    quantize_weight, quantize_weight_fp8, signed_range, unpack_int4,
)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_per_token_error_is_within_half_a_step(bits):
    x = torch.randn(37, 96) * torch.rand(37, 1) * 10
    codes, scale = quantize_per_token(x, bits)
    lo, hi = signed_range(bits, True)
    assert codes.dtype == torch.int8 and codes.min() >= lo and codes.max() <= hi
    err = (codes.float() * scale - x).abs()
    assert (err <= scale / 2 + 1e-6).all()


def test_per_token_zero_rows_stay_zero_and_finite():
    x = torch.zeros(4, 16)
    x[1] = torch.randn(16)
    y = fake_quantize_per_token(x, 8)
    assert torch.isfinite(y).all() and (y[0] == 0).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group", [(8, None), (4, 64), (4, 32), (6, None), (3, 16)])
def test_weight_quantization_error_bound(bits, group, symmetric):
    w = torch.randn(48, 128)
    q = quantize_weight(w, bits, symmetric, group)
    g = q.group_size
    assert q.scale.shape == (48, 128 // g)
    lo, hi = signed_range(bits, symmetric)
    assert q.codes.min() >= lo and q.codes.max() <= hi
    err = (q.dequantize() - w).abs().reshape(48, -1, g)
    assert (err <= q.scale[..., None] / 2 + 1e-5).all()


def test_asymmetric_beats_symmetric_on_shifted_weights():
    w = torch.rand(32, 64) + 0.5  # all positive: asymmetric uses the whole range
    e_sym = (quantize_weight(w, 4, True).dequantize() - w).pow(2).mean()
    e_asym = (quantize_weight(w, 4, False).dequantize() - w).pow(2).mean()
    assert e_asym < 0.5 * e_sym


def test_group_size_falls_back_to_per_channel_when_it_does_not_divide():
    q = quantize_weight(torch.randn(4, 72), 4, group_size=64)
    assert q.group_size == 72 and q.scale.shape == (4, 1)


def test_zero_weight_channel_has_no_nan():
    w = torch.randn(8, 32)
    w[3] = 0
    for sym in (True, False):
        q = quantize_weight(w, 4, sym, 16)
        assert torch.isfinite(q.dequantize()).all() and (q.dequantize()[3] == 0).all()


def test_int4_pack_roundtrip_and_size():
    codes = torch.randint(-8, 8, (10, 64), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (10, 32)
    assert torch.equal(unpack_int4(packed), codes)
    # low nibble holds the even column
    assert int(packed[0, 0]) & 0xF == int(codes[0, 0]) & 0xF


def test_pack_rejects_out_of_range_and_odd():
    with pytest.raises(ValueError, match="\\[-8, 7\\]"):
        pack_int4(torch.full((2, 4), 9, dtype=torch.int8))
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 5, dtype=torch.int8))


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="between 2 and 8"):
        quantize_per_token(torch.randn(2, 4), bits)


def test_dequantize_matches_formula():
    codes = torch.tensor([[-3, 2, 7, -8]], dtype=torch.int8)
    scale = torch.tensor([[0.5, 0.25]])
    zero = torch.tensor([[1, -2]], dtype=torch.int8)
    out = dequantize_weight(codes, scale, zero, 2)
    assert torch.equal(out, torch.tensor([[-2.0, 0.5, 2.25, -1.5]]))


def test_fp8_per_token_relative_error_and_range():
    """e4m3 keeps 3 mantissa bits: every value within half a step (2^-4 relative) of the input once scaled so the
    row's absmax is 448, and below the smallest normal (2^-6) within half a subnormal step (2^-10)."""
    x = torch.randn(37, 96) * torch.rand(37, 1) * 10
    x[3, 5] = 1e3  # an outlier row
    codes, scale = quantize_per_token_fp8(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (37, 1)
    v = codes.float()
    assert torch.equal(v.abs().amax(-1), torch.full((37,), FP8_E4M3_MAX))  # the absmax element is exact
    scaled = x / scale
    err = (v - scaled).abs()
    assert (err <= torch.maximum(scaled.abs() * 2.0 ** -4, torch.full_like(err, 2.0 ** -10)) * 1.0001).all()
    assert torch.isfinite(v * scale).all()


def test_fp8_weight_is_per_channel_and_zero_safe():
    w = torch.randn(48, 128)
    w[7] = 0
    q = quantize_weight_fp8(w)
    assert q.codes.dtype == torch.float8_e4m3fn and q.scale.shape == (48, 1) and q.zero is None
    deq = q.dequantize()
    assert torch.isfinite(deq).all() and (deq[7] == 0).all()
    rel = ((deq - w).norm() / w.norm()).item()
    assert 0.005 < rel < 0.04  # ~2.5 % for Gaussian weights: coarser than int8 per channel (~0.4 %)
    assert rel > ((quantize_weight(w, 8).dequantize() - w).norm() / w.norm()).item()
