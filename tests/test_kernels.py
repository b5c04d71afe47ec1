"""Triton kernels vs their PyTorch references, on fresh random shapes (odd sizes too).

Without CUDA the kernels run under Triton's CPU interpreter: this module sets ``TRITON_INTERPRET=1`` before
triton is first imported (so run it in its own process, or first, when CUDA is absent) and patches an interpreter
incompatibility with NumPy >= 2.4 (``kernels.triton_compat``). Interpreter cases are small; the GPU adds DiT-sized
cases (``gpu_only``). Numerics: plain quantization must match the reference code for code; the rotated path
(bf16 hi/lo tensor-core products on the GPU) may flip a rare code at a rounding tie; GEMMs are checked by the
relative error norm against the float32 reference.
"""
from __future__ import annotations

import itertools
import os
from unittest import mock

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from viditq.kernels import act_quant, dispatch, int_gemm, reference  # noqa: E402
from viditq.kernels.triton_compat import patch_interpreter  # noqa: E402
from viditq.quant.hadamard import hadamard_factors, random_signs  # noqa: E402
from viditq.quant.quantizers import (  # noqa: E402
    dequantize_weight, pack_int4, quantize_weight, quantize_weight_fp8, unpack_int4,
)

patch_interpreter()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="DiT-sized case: GPU only (too slow for the CPU interpreter)")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    assert torch.isfinite(y).all()
    return ((y - ref).norm() / ref.norm()).item()


def assert_codes_close(codes, ref_codes, max_flips):
    """Codes equal except rare one-step flips at rounding ties (the kernel multiplies by 1/scale)."""
    diff = (codes.int() - ref_codes.int()).abs()
    assert diff.max().item() <= 1, "a code differs by more than a rounding tie"
    assert diff.float().mean().item() <= max_flips


# ----------------------------------------------------------------------------------------- activation quantization
ACT_PLAIN = [(5, 96), (3, 200), (17, 64)] + [pytest.param(*s, marks=gpu_only) for s in [(4096, 1152), (333, 4608),
                                                                                       (1001, 7680), (77, 1921)]]


@pytest.mark.parametrize("m,k", ACT_PLAIN)
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_act_quant_plain_matches_reference(m, k, smooth, bits):
    g = torch.Generator().manual_seed(m * k + bits)
    x = (torch.randn(m, k, generator=g) * 3).to(DEVICE, torch.bfloat16)
    smooth_inv = (torch.rand(k, generator=g) + 0.5).to(DEVICE) if smooth else None
    codes, scale = act_quant.quantize_activation(x, bits, smooth_inv)
    ref_codes, ref_scale = reference.quantize_activation(x, bits, smooth_inv)
    assert codes.dtype == torch.int8 and scale.shape == (m, 1)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    assert_codes_close(codes, ref_codes, max_flips=0)


ACT_ROT = [(3, 1152), (2, 640), (5, 64), (2, 2048), (3, 256)] + [pytest.param(*s, marks=gpu_only) for s in [(4096, 1152), (1001, 4608),
                                                                                      (517, 1920), (300, 7680),
                                                                                      (64, 2048)]]


@pytest.mark.parametrize("m,k", ACT_ROT)
@pytest.mark.parametrize("smooth", [False, True])
def test_act_quant_rotated_matches_reference(m, k, smooth):
    g = torch.Generator().manual_seed(m + k)
    rot_m, _ = hadamard_factors(k)
    assert act_quant.rotation_supported(k, rot_m)
    x = torch.randn(m, k, generator=g)
    x[:, :: max(1, k // 7)] *= 30  # outlier channels, the case the rotation exists for
    x = x.to(DEVICE, torch.bfloat16)
    smooth_inv = (torch.rand(k, generator=g) + 0.5).to(DEVICE) if smooth else None
    signs = random_signs(k, seed=k).to(DEVICE)
    codes, scale = act_quant.quantize_activation(x, 8, smooth_inv, signs, rot_m)
    ref_codes, ref_scale = reference.quantize_activation(x, 8, smooth_inv, signs, rot_m)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-4, atol=0)
    # ~1e-4 of the codes flip at DiT shapes (H100); a tiny case may hold one such tie
    assert_codes_close(codes, ref_codes, max_flips=max(1e-3, 1.5 / codes.numel()))


ACT_BLOCK_ROT = [(3, 384, 128), (5, 320, 64), (2, 96, 32), (17, 1152, 128)] + [
    pytest.param(*s, marks=gpu_only) for s in [(4096, 1152, 128), (1001, 4608, 128), (517, 1920, 128),
                                               (300, 7680, 128), (333, 4608, 64)]]


@pytest.mark.parametrize("m,k,block", ACT_BLOCK_ROT)
@pytest.mark.parametrize("smooth", [False, True])
def test_act_quant_block_rotated_matches_reference(m, k, block, smooth):
    """Block-diagonal rotation (runs of ``block`` channels, padded to a power-of-two count) against the float32
    reference, under several launch shapes."""
    g = torch.Generator().manual_seed(m + k + block)
    assert act_quant.rotation_supported(k, 1, block) and not act_quant.rotation_supported(k, 3, block)
    x = torch.randn(m, k, generator=g)
    x[:, :: max(1, k // 7)] *= 30
    x = x.to(DEVICE, torch.bfloat16)
    smooth_inv = (torch.rand(k, generator=g) + 0.5).to(DEVICE) if smooth else None
    signs = random_signs(k, seed=k).to(DEVICE)
    ref_codes, ref_scale = reference.quantize_activation(x, 8, smooth_inv, signs, 1, block)
    for config in (None, act_quant.ActQuantConfig(1, 4), act_quant.ActQuantConfig(2, 4, persistent=True)):
        # block_m 1 with few runs: the launcher raises it to the product's 16 rows
        codes, scale = act_quant.quantize_activation(x, 8, smooth_inv, signs, 1, block, config=config)
        torch.testing.assert_close(scale, ref_scale, rtol=1e-4, atol=0)
        assert_codes_close(codes, ref_codes, max_flips=max(1e-3, 1.5 / codes.numel()))
    # the rotation really mixed the outliers in: the reference without it quantizes differently
    plain_codes, _ = reference.quantize_activation(x, 8, smooth_inv)
    assert (plain_codes != ref_codes).float().mean() > 0.5


def test_block_rotation_support_and_config():
    assert act_quant.rotation_supported(1152, 1, 128) and act_quant.rotation_supported(7680, 1, 128)
    assert not act_quant.rotation_supported(1000, 1, 128)  # not a multiple of the block
    assert not act_quant.rotation_supported(1024, 1, 256)  # runs longer than one 128-wide product
    assert not act_quant.rotation_supported(13824, 1, 128)  # 108 runs padded to 128: over the row limit
    for k in (1152, 4608, 1920, 7680, 384, 3072):
        cfg = act_quant.default_config(k, 1, 128)
        m_pad = 1 << (k // 128 - 1).bit_length()
        assert cfg.block_m * m_pad * 128 <= 8192 * 4


@pytest.mark.parametrize("config", [act_quant.ActQuantConfig(1, 4), act_quant.ActQuantConfig(4, 2),
                                    act_quant.ActQuantConfig(2, 4, persistent=True, programs_per_sm=1),
                                    act_quant.ActQuantConfig(8, 4, persistent=True)])
@pytest.mark.parametrize("k", [96, 200, 64])  # 64 + 32, 128 + 72 (padded tail), one tile
def test_act_quant_launch_shapes_give_identical_codes(config, k):
    """Every launch shape (rows per step, persistent grid-stride, ragged last block, main + tail tiles) gives the
    codes of the default launch, plain and rotated."""
    g = torch.Generator().manual_seed(k)
    m = 13
    x = (torch.randn(m, k, generator=g) * 4).to(DEVICE, torch.bfloat16)
    smooth_inv = (torch.rand(k, generator=g) + 0.5).to(DEVICE)
    codes, scale = act_quant.quantize_activation(x, 8, smooth_inv, config=config)
    ref_codes, ref_scale = reference.quantize_activation(x, 8, smooth_inv)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
    if k == 64:
        signs = random_signs(k, 1).to(DEVICE)
        codes, scale = act_quant.quantize_activation(x, 8, None, signs, 1, config=config)
        ref_codes, ref_scale = reference.quantize_activation(x, 8, None, signs, 1)
        torch.testing.assert_close(scale, ref_scale, rtol=1e-5, atol=0)
        assert_codes_close(codes, ref_codes, max_flips=1e-3)


def test_act_quant_split_width_and_defaults():
    assert act_quant.split_width(1152) == (1024, 128)
    assert act_quant.split_width(4608) == (4096, 512)
    assert act_quant.split_width(1920) == (1024, 1024)
    assert act_quant.split_width(2048) == (2048, 0)
    assert act_quant.split_width(1) == (1, 0)
    for k, rot_m in [(1152, None), (4608, None), (1920, None), (7680, None), (1152, 36), (7680, 60)]:
        cfg = act_quant.default_config(k, rot_m)
        assert isinstance(cfg, act_quant.ActQuantConfig) and cfg.block_m >= 1
    # without rotation, from 1024 padded channels: one row per program, ~32 channels per thread (the H200 sweeps)
    C = act_quant.ActQuantConfig
    assert [act_quant.default_config(k, None) for k in (1152, 1920, 4608, 7680)] == [C(1, 1), C(1, 2), C(1, 4), C(1, 8)]
    assert act_quant.default_config(96, None) == C(32, 4)  # short rows: several per program
    assert act_quant.default_config(4608, None, smooth=True) == C(1, 4, True, 8, 3)  # a smoothed entry of the table
    assert act_quant.default_config(1152, None, smooth=True) == C(1, 1)


def test_act_quant_rejects_bad_input(monkeypatch):
    x = torch.randn(4, 64).to(DEVICE, torch.bfloat16)
    with pytest.raises(ValueError, match="2-D tensor"):
        act_quant.quantize_activation(x.reshape(2, 2, 64), 8)
    with pytest.raises(ValueError, match="smooth_inv must be a contiguous float32 vector of 64"):
        act_quant.quantize_activation(x, 8, torch.ones(32, device=DEVICE))
    with pytest.raises(ValueError, match="rot_signs must be"):
        act_quant.quantize_activation(x, 8, None, torch.ones(64, device=DEVICE, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="no fused rotation"):
        act_quant.quantize_activation(x[:, :48].contiguous(), 8, None, torch.ones(48, device=DEVICE), 3)
    with pytest.raises(ValueError, match="power of two"):
        act_quant.ActQuantConfig(3, 4)
    with pytest.raises(ValueError, match="num_warps"):
        act_quant.ActQuantConfig(2, 3)
    monkeypatch.setenv("VIDITQ_ACT_QUANT_CONFIG", "2,4,1,3")
    assert act_quant.default_config(1152, None) == act_quant.ActQuantConfig(2, 4, True, 3)
    monkeypatch.setenv("VIDITQ_ACT_QUANT_CONFIG", "2")
    with pytest.raises(ValueError, match="VIDITQ_ACT_QUANT_CONFIG"):
        act_quant.default_config(1152, None)


@pytest.mark.parametrize("m,k,rotate", [(37, 96, False), (21, 200, False), (19, 64, True),
                                        pytest.param(513, 1152, False, marks=gpu_only),
                                        pytest.param(513, 1152, True, marks=gpu_only)])
@pytest.mark.parametrize("smooth", [False, True])
def test_act_quant_fp8_matches_reference(m, k, rotate, smooth):
    g = torch.Generator().manual_seed(m + k)
    x = (torch.randn(m, k, generator=g) * 5).to(DEVICE, torch.bfloat16)
    smooth_inv = (torch.rand(k, generator=g) + 0.5).to(DEVICE) if smooth else None
    factors = hadamard_factors(k) if rotate else (1, k)
    signs = random_signs(k, 5).to(DEVICE) if rotate else None
    codes, scale = act_quant.quantize_activation(x, 8, smooth_inv, signs, factors[0], fp8=True)
    ref_codes, ref_scale = reference.quantize_activation(x, 8, smooth_inv, signs, factors[0], fp8=True)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape
    torch.testing.assert_close(scale, ref_scale, rtol=1e-5 if rotate else 1e-6, atol=0)
    diff = (codes.float() - ref_codes.float()).abs()
    # x * (1/scale) on the GPU vs x / scale in the reference (and the rotation's bf16 products) can move a value
    # that sits at a rounding boundary by one e4m3 step; anything more is a bug
    assert (diff <= ref_codes.float().abs() / 8 + 2.0 ** -9).all(), "fp8 values differ by more than one e4m3 step"
    assert (diff > 0).float().mean().item() < (5e-3 if rotate else 1e-3)


def test_fast_rounding_algorithm_equals_division():
    """The GPU rounding in ``act_quant._round_quotient`` (reciprocal multiply, the sign of ``y - t * scale`` at the
    nearest half-integer t, and the half-ulp test for quotients that round to t) equals rounding the IEEE
    quotient, ties and near ties included. Emulated in float64, where ``t * scale`` is exact like the FMA."""
    g = torch.Generator().manual_seed(0)
    scale = (torch.rand(4096, 1, generator=g) * 0.1 + 1e-3).float()
    k = torch.randint(-127, 127, (4096, 64), generator=g).float()
    ties = ((k + 0.5) * scale).float()  # many exact or near ties
    y = torch.cat([ties, (torch.randn(4096, 64, generator=g) * 127 * scale).float()], dim=1)
    v = y * (1.0 / scale)
    r = torch.round(v)
    t = r + torch.where(v >= r, 0.5, -0.5)
    residual = (y.double() - t.double() * scale.double()).float()
    ulp = (t.abs().view(torch.int32) + 1).view(torch.float32) - t.abs()
    is_tie = residual.abs() < 0.5 * ulp * scale
    fast = torch.where(is_tie, torch.round(t), torch.where(residual > 0, t + 0.5, t - 0.5))
    assert (fast != torch.round(v)).any(), "the test must contain cases where rounding v alone is wrong"
    assert torch.equal(fast, torch.round(y / scale))


# ----------------------------------------------------------------------------------------- GEMMs
SMALL_CFG = int_gemm.GemmConfig(32, 32, 32, 4, 4, 2)
SMALL_CFG_G64 = int_gemm.GemmConfig(32, 32, 64, 4, 4, 2)
TMA_CFG = int_gemm.GemmConfig(128, 128, 128, 8, 8, 3, persistent=True, tma=True) if CUDA else \
    int_gemm.GemmConfig(32, 32, 32, 4, 4, 2, persistent=True, tma=True)
TMA_CFG_G64 = int_gemm.GemmConfig(128, 128, 64, 8, 8, 3, persistent=True, tma=True) if CUDA else \
    int_gemm.GemmConfig(32, 32, 64, 4, 4, 2, persistent=True, tma=True)

GEMM_VARIANTS = [  # (weight bits, symmetric, group_size)
    (8, True, None), (8, False, None), (4, True, None), (4, False, 64), (8, False, 64), (4, True, 128),
]
GEMM_SHAPES = [(37, 45, 128), (20, 33, 256), (1, 16, 64), (45, 40, 192)] + [
    pytest.param(*s, marks=gpu_only) for s in [(333, 1152, 1152), (1000, 4608, 1152), (517, 1152, 4608),
                                               (4096, 1920, 1920)]
]


def _make_weight(n, k, bits, symmetric, group_size, g):
    qw = quantize_weight(torch.randn(n, k, generator=g), bits, symmetric, group_size)
    packed = bits <= 4
    codes = pack_int4(qw.codes) if packed else qw.codes
    scale = qw.scale if qw.group_size == k else qw.scale.half()
    zero = qw.zero.to(DEVICE) if qw.zero is not None else None
    return codes.to(DEVICE), scale.to(DEVICE), zero, qw.group_size, packed


@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
@pytest.mark.parametrize("bits,symmetric,group_size", GEMM_VARIANTS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tma", [False, True])
def test_int_linear_matches_reference(m, n, k, bits, symmetric, group_size, out_dtype, tma):
    g = torch.Generator().manual_seed(m * n + k + bits)
    if group_size is not None and k % group_size:
        pytest.skip("group must divide K")
    w, w_scale, w_zero, gs, packed = _make_weight(n, k, bits, symmetric, group_size, g)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(DEVICE)
    a_scale = (torch.rand(m, 1, generator=g) + 0.1).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE, out_dtype)
    if tma:
        config = TMA_CFG_G64 if gs < k else TMA_CFG
        b = torch.empty(n, k, device=DEVICE, dtype=torch.int8) if packed else w  # packed int4 is staged first
        if not int_gemm._tma_ok(a, b, torch.empty(m, n, device=DEVICE, dtype=out_dtype), None if packed else w_zero):
            pytest.skip("shape breaks TMA alignment (the launcher falls back to the pointer kernel)")
    else:  # the pointer kernel (the GPU default for int8 / fp8 is the TMA one)
        config = int_gemm.GemmConfig(128, 128, 64 if gs < k else 128, 8, 8, 3) if CUDA else \
            (SMALL_CFG_G64 if gs < k else SMALL_CFG)
    y = int_gemm.quant_linear(a, a_scale, w, w_scale, w_zero, gs, packed, bias, out_dtype, config)
    ref = reference.int_linear(a, a_scale, w, w_scale, w_zero, gs, packed, bias, torch.float32)
    assert y.shape == (m, n) and y.dtype == out_dtype
    # float32 out: only summation order differs; bf16 out: one output rounding (the CPU interpreter truncates).
    assert rel_err(y, ref) < (1e-5 if out_dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("m,n,k,bits,group_size,tma", [(33, 48, 64, 8, None, False), (33, 48, 128, 4, 64, False)] + [
    pytest.param(*s, marks=gpu_only) for s in [(4096, 4608, 1152, 8, None, True), (4096, 4608, 1152, 8, None, False),
                                               (1000, 4608, 1152, 4, 64, True), (517, 7680, 1920, 8, None, True)]])
def test_int_linear_gelu_epilogue(m, n, k, bits, group_size, tma):
    """``activation="gelu_tanh"``: the feed-forward GELU in the GEMM epilogue, against the reference."""
    g = torch.Generator().manual_seed(m + n + k)
    w, w_scale, w_zero, gs, packed = _make_weight(n, k, bits, bits == 8, group_size, g)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(DEVICE)
    a_scale = (torch.rand(m, 1, generator=g) * 0.05).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE, torch.bfloat16)
    if CUDA:
        config = (TMA_CFG_G64 if gs < k else TMA_CFG) if tma else int_gemm.GemmConfig(128, 128, 64, 8, 8, 3)
    else:
        config = SMALL_CFG_G64 if gs < k else SMALL_CFG
    y = int_gemm.quant_linear(a, a_scale, w, w_scale, w_zero, gs, packed, bias, torch.float32, config,
                              activation="gelu_tanh")
    ref = reference.int_linear(a, a_scale, w, w_scale, w_zero, gs, packed, bias, torch.float32, "gelu_tanh")
    plain = reference.int_linear(a, a_scale, w, w_scale, w_zero, gs, packed, bias, torch.float32)
    torch.testing.assert_close(ref, torch.nn.functional.gelu(plain, approximate="tanh"))
    assert (ref - plain).abs().max() > 0.1  # negative pre-activations really were squashed
    assert rel_err(y, ref) < 1e-5
    with pytest.raises(ValueError, match="fused activation"):
        int_gemm.quant_linear(a, a_scale, w, w_scale, w_zero, gs, packed, bias, torch.float32, activation="relu")


@pytest.mark.parametrize("m,n,k,bits,group_size,tma,batch", [
    (34, 48, 64, 8, None, False, 2), (33, 48, 128, 4, 64, False, 3), (32, 32, 64, 8, None, True, 1),
    (40, 48, 64, 8, None, True, None), (68, 48, 64, 8, None, True, 2), (64, 48, 64, 8, None, True, 2)] + [
    pytest.param(*s, marks=gpu_only) for s in [(8192, 1152, 1152, 8, None, True, 2), (8192, 1152, 4608, 4, 64, True, 2),
                                               (240, 1152, 1152, 8, None, True, None),
                                               (517, 1152, 1152, 8, None, False, 11)]])
def test_int_linear_residual_epilogue(m, n, k, bits, group_size, tma, batch):
    """``residual`` / ``gate``: the block's (gated) residual connection added in the GEMM epilogue, in float32
    before the one rounding, against the reference; bad shapes are refused."""
    g = torch.Generator().manual_seed(m + n + k + 1)
    w, w_scale, w_zero, gs, packed = _make_weight(n, k, bits, bits == 8, group_size, g)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(DEVICE)
    a_scale = (torch.rand(m, 1, generator=g) * 0.05).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE, torch.bfloat16)
    residual = torch.randn(m, n, generator=g).to(DEVICE, torch.bfloat16)
    gate = None if batch is None else torch.randn(batch, 3 * n, generator=g).to(DEVICE, torch.bfloat16)[:, n:2 * n]
    if tma:
        config = TMA_CFG_G64 if gs < k else TMA_CFG
    else:
        config = int_gemm.GemmConfig(128, 128, 64 if gs < k else 128, 8, 8, 3) if CUDA else \
            (SMALL_CFG_G64 if gs < k else SMALL_CFG)
    y = int_gemm.quant_linear(a, a_scale, w, w_scale, w_zero, gs, packed, bias, torch.bfloat16, config,
                              residual=residual, gate=gate)
    plain = reference.int_linear(a, a_scale, w, w_scale, w_zero, gs, packed, bias, torch.float32)
    gated = plain if gate is None else (plain.view(batch, -1, n) * gate.float()[:, None]).view(m, n)
    expected = gated + residual.float()
    ref = reference.int_linear(a, a_scale, w, w_scale, w_zero, gs, packed, bias, torch.bfloat16, None, None,
                               residual, gate)
    assert rel_err(ref, expected) < 4e-3 and (expected - plain).abs().max() > 0.5
    assert y.dtype == torch.bfloat16 and rel_err(y, expected) < 8e-3
    with pytest.raises(ValueError, match="residual must be"):
        int_gemm.quant_linear(a, a_scale, w, w_scale, w_zero, gs, packed, bias, torch.bfloat16, residual=residual.t())
    with pytest.raises(ValueError, match="gate"):
        int_gemm.quant_linear(a, a_scale, w, w_scale, w_zero, gs, packed, bias, torch.bfloat16, residual=residual,
                              gate=torch.ones(5 if m % 5 else 7, n, device=DEVICE))
    with pytest.raises(ValueError, match="residual must be"):  # its tile is sized by the output's dtype
        int_gemm.quant_linear(a, a_scale, w, w_scale, w_zero, gs, packed, bias, torch.bfloat16,
                              residual=residual.float())
    one_gate = torch.ones(1, n, device=DEVICE)
    for fn in (int_gemm.quant_linear, reference.int_linear):  # both backends refuse a gate alone
        with pytest.raises(ValueError, match="a gate needs a residual"):
            fn(a, a_scale, w, w_scale, w_zero, gs, packed, bias, torch.bfloat16, gate=one_gate)


def test_residual_epilogues_compile_for_sm90(sm90_compile):
    """The TMA GEMM's residual epilogue at CogVideoX's out-projection and FF down-projection shapes, fp8 and int8,
    compiles for the H100 (Triton's bundled ptxas, no GPU): the residual in two parts loads them by 3-D TMA
    descriptors, in the shared memory of one residual tile (the loads share a buffer), without spills or
    serialized wgmma."""
    out = sm90_compile("residual_gemm")
    assert len(out) == 8
    for name, report in out.items():
        assert report["spill_stores"] == report["spill_loads"] == 0 and not report["wgmma_serialized"], (name, report)
        assert report["shared"] <= int_gemm.SMEM_LIMIT, (name, report)
        assert (report["tma_3d"] > 0) == name.endswith("parts=True"), (name, report)
        if name.endswith("parts=True"):
            assert report["shared"] == out[name.replace("parts=True", "parts=False")]["shared"], name


@pytest.mark.parametrize("batch,tokens,prefix,tma,fp8", [
    (2, 34, 5, False, False), (3, 40, 39, True, False), (2, 70, 9, True, True), (1, 40, 1, True, True),
    (3, 20, 7, True, False), (2, 40, 0, True, False)] + [  # (20 tokens < the 32-row tile, no text: pointers)
    pytest.param(*s, marks=gpu_only) for s in [(2, 18002, 226, True, True), (2, 18002, 226, True, False),
                                               (2, 1000, 77, False, False), (2, 300, 200, True, True)]])
def test_int_linear_residual_in_two_parts(batch, tokens, prefix, tma, fp8, monkeypatch):
    """``residual_prefix``: the residual of each batch entry's first ``prefix`` rows and ``residual`` that of the
    rest, both views of one sequence with its batch stride (CogVideoX's text and video tokens), with a (B, 2, N)
    gate, a row for each part — in the epilogue as in the reference, tiles straddling the parts and the batch
    entries (TMA: each part a 3-D descriptor, rows outside it filled with zeros)."""
    m, n, k = batch * tokens, 48, 64
    g = torch.Generator().manual_seed(m + prefix)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    if fp8:
        a, w = (t.float().div(4).to(torch.float8_e4m3fn) for t in (a, w))
    a, w = a.to(DEVICE), w.to(DEVICE)
    a_scale = (torch.rand(m, 1, generator=g) * 0.05).to(DEVICE)
    w_scale = (torch.rand(n, 1, generator=g) * 0.05).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE, torch.bfloat16)
    joint = torch.randn(batch, tokens, n, generator=g).to(DEVICE, torch.bfloat16)
    text, video = joint[:, :prefix], joint[:, prefix:]
    gate = torch.randn(batch, 2, n, generator=g).to(DEVICE, torch.bfloat16)
    config = (TMA_CFG if tma else (SMALL_CFG if not CUDA else None))
    launches, real_launch = [], int_gemm._launch_tma
    monkeypatch.setattr(int_gemm, "_launch_tma", lambda *a, **kw: launches.append(1) or real_launch(*a, **kw))
    y = int_gemm.quant_linear(a, a_scale, w, w_scale, None, k, False, bias, torch.bfloat16, config, residual=video,
                              gate=gate, residual_prefix=text)
    if config is not None:  # the TMA kernel where a tile meets at most two batch entries and both parts have rows
        assert len(launches) == (tma and tokens >= config.block_m and prefix > 0)
    plain = reference.int_linear(a, a_scale, w, w_scale, None, k, False, bias, torch.float32).view(batch, tokens, n)
    per_token = torch.cat([gate[:, :1].expand(-1, prefix, -1), gate[:, 1:].expand(-1, tokens - prefix, -1)], 1)
    expected = (plain * per_token.float() + joint.float()).view(m, n)
    ref = reference.int_linear(a, a_scale, w, w_scale, None, k, False, bias, torch.bfloat16, None, None, video,
                               gate, text)
    assert rel_err(ref, expected) < 4e-3
    assert y.dtype == torch.bfloat16 and rel_err(y, expected) < 8e-3
    row_err = (y.float() - expected).norm(dim=1) / expected.norm(dim=1).clamp_min(1e-3)
    assert row_err.max() < 0.03  # every row from its own part and batch entry (a whole-tensor error hides rows)
    one_gate = (plain * gate[:, 1:].float() + joint.float()).view(m, n)
    assert prefix == 0 or rel_err(y, one_gate) > 0.02  # the first gate really applied
    ungated = int_gemm.quant_linear(a, a_scale, w, w_scale, None, k, False, bias, torch.bfloat16, config,
                                    residual=video.contiguous(), residual_prefix=text.contiguous())
    assert rel_err(ungated, (plain + joint.float()).view(m, n)) < 8e-3  # contiguous parts, no gate
    with pytest.raises(ValueError, match="two parts must be"):
        int_gemm.quant_linear(a, a_scale, w, w_scale, None, k, False, bias, torch.bfloat16, residual=video,
                              gate=gate, residual_prefix=text[:, :, :-1])
    with pytest.raises(ValueError, match=r"gate must be"):
        int_gemm.quant_linear(a, a_scale, w, w_scale, None, k, False, bias, torch.bfloat16, residual=video,
                              gate=gate[:, :1], residual_prefix=text)
    for fn in (int_gemm.quant_linear, reference.int_linear):  # both backends: a prefix alone, a split gate alone
        with pytest.raises(ValueError, match="a residual prefix needs a residual"):
            fn(a, a_scale, w, w_scale, None, k, False, bias, torch.bfloat16, residual_prefix=text)
        with pytest.raises(ValueError, match="gate"):
            fn(a, a_scale, w, w_scale, None, k, False, bias, torch.bfloat16, residual=joint.view(m, n), gate=gate)


@gpu_only
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("m,n,k", [(8192, 1152, 1152), (8192, 1152, 4608), (35552, 1920, 7680)])
def test_residual_epilogue_default_configs(m, n, k, fp8):
    """The default tiles with the residual epilogue launch at DiT shapes (the 3-stage 128 x 256 fp8 tile once
    overflowed shared memory: 245 784 > 232 448 bytes) and match the reference."""
    g = torch.Generator(device="cuda").manual_seed(m + k)
    x = torch.randn(m, k, device="cuda", generator=g)
    w = torch.randn(n, k, device="cuda", generator=g) * k**-0.5
    if fp8:
        (a, a_scale), (wq, w_scale) = reference.quantize_per_token_fp8(x), reference.quantize_per_token_fp8(w)
    else:
        (a, a_scale), q = reference.quantize_activation(x, 8), quantize_weight(w, 8)
        wq, w_scale = q.codes, q.scale
    residual = torch.randn(m, n, device="cuda", generator=g).to(torch.bfloat16)
    gate = torch.randn(2, n, device="cuda", generator=g).to(torch.bfloat16)
    cfg = int_gemm.default_config(m, n, k, k, fp8, 2, True)
    assert int_gemm.smem_estimate(cfg, 2, True) <= int_gemm.SMEM_LIMIT
    y = int_gemm.quant_linear(a, a_scale, wq, w_scale, None, k, False, None, torch.bfloat16,
                              residual=residual, gate=gate)
    ref = reference.int_linear(a, a_scale, wq, w_scale, None, k, False, None, torch.float32, None, None,
                               residual, gate)
    assert rel_err(y, ref) < 8e-3


@pytest.mark.parametrize("m,ns,k,fp8,bias", [
    (37, (48, 32, 48), 64, False, True), (20, (32, 32), 96, True, False), (0, (16, 16), 32, False, True),
] + [pytest.param(*s, marks=gpu_only) for s in [(8192, (1152,) * 3, 1152, True, True),
                                                (8192, (1152,) * 3, 1152, False, True),
                                                (4000, (1920, 1920, 1920), 1920, True, False)]])
def test_int_linear_group_matches_separate_products(m, ns, k, fp8, bias):
    """q, k and v in one launch (``quant_linear_group``): each output equals the reference of its own product;
    tiles of different weights land on one program (the interpreter's 3-program grid, 32 x 32 tiles)."""
    g = torch.Generator(device=DEVICE).manual_seed(m + k + len(ns))
    x = torch.randn(m, k, device=DEVICE, generator=g)
    a, a_scale = reference.quantize_per_token_fp8(x) if fp8 else reference.quantize_activation(x, 8)
    weights = []
    for n in ns:
        w = torch.randn(n, k, device=DEVICE, generator=g) * k**-0.5
        if fp8:
            wq, w_scale = reference.quantize_per_token_fp8(w)
        else:
            q = quantize_weight(w, 8)
            wq, w_scale = q.codes, q.scale
        weights.append((wq, w_scale, torch.randn(n, device=DEVICE, generator=g).bfloat16() if bias else None))
    assert int_gemm.group_supported(a, weights, torch.bfloat16)
    cfg = None if CUDA else TMA_CFG
    outs = int_gemm.quant_linear_group(a, a_scale, weights, torch.bfloat16, cfg)
    for y, (wq, w_scale, b) in zip(outs, weights):
        ref = reference.int_linear(a, a_scale, wq, w_scale, None, k, False, b, torch.float32)
        assert y.shape == (m, wq.shape[0]) and y.dtype == torch.bfloat16
        assert m == 0 or rel_err(y, ref) < 8e-3


def test_int_linear_group_falls_back_where_one_launch_cannot_run():
    """Bias on some weights only, or a 16-byte misaligned output row: one launch per weight, same results; weights
    the GEMM cannot take (group-wise scales, another dtype than the codes) are refused by name."""
    g = torch.Generator(device=DEVICE).manual_seed(5)
    a, a_scale = reference.quantize_activation(torch.randn(9, 64, device=DEVICE, generator=g), 8)
    q = quantize_weight(torch.randn(20, 64, device=DEVICE, generator=g), 8)
    bias = torch.randn(20, device=DEVICE, generator=g)
    for weights, out_dtype in (([(q.codes, q.scale, bias), (q.codes, q.scale, None)], torch.float32),
                               ([(q.codes, q.scale, None)] * 2, torch.bfloat16)):  # 40-byte bf16 rows
        assert not int_gemm.group_supported(a, weights, out_dtype)
        outs = int_gemm.quant_linear_group(a, a_scale, weights, out_dtype, SMALL_CFG)
        for y, (_, _, b) in zip(outs, weights):
            ref = reference.int_linear(a, a_scale, q.codes, q.scale, None, 64, False, b, torch.float32)
            assert y.dtype == out_dtype and rel_err(y, ref) < 8e-3
    grouped = quantize_weight(torch.randn(20, 64, device=DEVICE, generator=g), 8, group_size=32)
    with pytest.raises(ValueError, match="per-channel"):
        int_gemm.quant_linear_group(a, a_scale, [(q.codes, q.scale, None), (grouped.codes, grouped.scale, None)],
                                    torch.float32)
    with pytest.raises(ValueError, match="int8 or fp8"):
        int_gemm.quant_linear_group(a.float(), a_scale, [(q.codes, q.scale, None)] * 2, torch.float32)


STAGE_SHAPES = [(45, 128), (9, 192), (16, 1024), (3, 64)] + [pytest.param(*s, marks=gpu_only)
                                                             for s in [(1152, 1152), (4608, 1152), (1920, 7680)]]


@pytest.mark.parametrize("n,k", STAGE_SHAPES)
@pytest.mark.parametrize("symmetric,group_size", [(False, 64), (True, 128), (False, 32), (False, None), (True, None)])
@pytest.mark.parametrize("fp8", [False, True])
def test_stage_int4_matches_reference_exactly(n, k, symmetric, group_size, fp8):
    """Packed int4 → per-channel int8 (or fp8 e4m3) staging: the kernel's codes and scales equal the reference
    bit for bit, on any device, and the staged weight is within half an int8 step (half an e4m3 ulp) of the int4
    group dequantization it replaces."""
    g = torch.Generator().manual_seed(n * 7 + k)
    w, w_scale, w_zero, gs, _ = _make_weight(n, k, 4, symmetric, group_size, g)
    stage = reference.int4_stage_scale(w, w_scale, w_zero, gs, fp8)
    codes, scale = int_gemm.stage_int4(w, w_scale, w_zero, gs, stage, fp8)
    ref_codes, ref_scale = reference.stage_int4(w, w_scale, w_zero, gs, stage, fp8)
    assert codes.dtype == (torch.float8_e4m3fn if fp8 else torch.int8) and codes.shape == (n, k)
    assert scale.shape == (n, 1)
    cpu_zero = None if w_zero is None else w_zero.cpu()
    cpu_codes, cpu_scale = reference.stage_int4(w.cpu(), w_scale.cpu(), cpu_zero, gs, fp8=fp8)  # scale computed
    assert torch.equal(ref_codes.cpu().view(torch.int8), cpu_codes.view(torch.int8))  # same on any device
    assert torch.equal(ref_scale.cpu(), cpu_scale)
    assert torch.equal(codes.view(torch.int8), ref_codes.view(torch.int8)) and torch.equal(scale, ref_scale)
    unstaged = int_gemm.stage_int4(w, w_scale, w_zero, gs, fp8=fp8)[0]  # the scale computed by the launcher
    assert torch.equal(unstaged.view(torch.int8), codes.view(torch.int8))
    exact = dequantize_weight(unpack_int4(w), w_scale, w_zero, gs)
    staged = codes.float() * scale
    if gs == k:  # per channel: staging only subtracts the zero point
        assert torch.equal(staged, exact)
        return
    err = (staged - exact).abs()
    assert err.max() > 0  # groups really were requantized
    if fp8:
        v = (exact / scale).abs()  # e4m3 spacing: 2^(e - 3) for normal values, 2^-9 below 2^-6
        ulp = torch.exp2(torch.floor(torch.log2(v.clamp_min(2.0 ** -6))) - 3)
        assert (err <= 0.5 * ulp * scale * (1 + 1e-5) + 1e-7).all()
        assert (codes.float().abs().amax(dim=1) == 448).all()
    else:
        assert (err <= 0.5 * scale + 1e-6).all()  # float rounding of the products
        assert (codes.abs().amax(dim=1) == 127).all()  # each row uses the full int8 range


@pytest.mark.parametrize("fp8", [False, True])
def test_stage_int4_many_equals_one_launch_per_weight(fp8):
    """Several weights of mixed kinds (zero points or not, grouped or per channel, odd sizes) staged together:
    each result equals staging that weight alone, bit for bit (one launch per kind, not per weight)."""
    g = torch.Generator().manual_seed(11)
    specs = [(45, 128, False, 64), (9, 192, True, 32), (33, 64, False, None), (16, 1024, False, 64), (3, 64, True, None),
             (7, 192, False, 96), (5, 6, False, None)]  # a group of 96 codes (lanes masked), K = 6 per channel
    weights = []
    for n, k, symmetric, group_size in specs:
        w, w_scale, w_zero, gs, _ = _make_weight(n, k, 4, symmetric, group_size, g)
        stage = reference.int4_stage_scale(w, w_scale, w_zero, gs, fp8) if gs < k else None
        weights.append((w, w_scale, w_zero, gs, stage))
    launches = []
    original = int_gemm._launch_stage
    with mock.patch.object(int_gemm, "_launch_stage", lambda *a: launches.append(len(a[0])) or original(*a)):
        together = int_gemm.stage_int4_many(weights, fp8)
    assert sorted(launches) == [1, 1, 1, 1, 1, 2]  # one per kind (zero points, group or run): two share one
    for (codes, scale), (w, w_scale, w_zero, gs, stage) in zip(together, weights):
        ref_codes, ref_scale = reference.stage_int4(w, w_scale, w_zero, gs, stage, fp8)
        assert torch.equal(codes.view(torch.int8), ref_codes.view(torch.int8)) and torch.equal(scale, ref_scale)


def test_int4_layer_output_within_staging_error_of_group_dequant():
    """A packed int4 GEMM (staged) against the product with the exact int4 group dequantization: the extra error
    is the int8 requantization only (< 1 % of the output), not a layout slip (which would be ~100 %)."""
    g = torch.Generator().manual_seed(11)
    m, n, k = 40, 48, 256
    w, w_scale, w_zero, gs, _ = _make_weight(n, k, 4, False, 64, g)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(DEVICE)
    a_scale = (torch.rand(m, 1, generator=g) + 0.1).to(DEVICE)
    y = int_gemm.quant_linear(a, a_scale, w, w_scale, w_zero, gs, True, None, torch.float32, SMALL_CFG)
    exact = (a.float() @ dequantize_weight(unpack_int4(w), w_scale, w_zero, gs).t()) * a_scale
    assert 1e-4 < rel_err(y, exact) < 1e-2
    with pytest.raises(ValueError, match="packed int4"):
        int_gemm.quant_linear(a[:, :255], a_scale, w[:, :-1].contiguous(), w_scale, w_zero, 255, True, None,
                              torch.float32)


@pytest.mark.parametrize("persistent,tma", [(False, False), (True, False), (False, True), (True, True)])
def test_int_linear_persistent_grid_covers_every_tile(persistent, tma):
    """One program per tile or per SM (the interpreter's 3), pointer or TMA kernel, with and without the gated
    residual epilogue: every tile written."""
    g = torch.Generator().manual_seed(7)
    m, n, k = (700, 912, 256) if CUDA else (70, 96, 64)
    w, w_scale, _, gs, packed = _make_weight(n, k, 8, True, None, g)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(DEVICE)
    a_scale = (torch.rand(m, 1, generator=g) + 0.1).to(DEVICE)
    cfg = int_gemm.GemmConfig(64, 64, 32, 4, 4, 3, persistent=persistent, tma=tma)
    ref = reference.int_linear(a, a_scale, w, w_scale, None, gs, packed, None, torch.float32)
    y = int_gemm.quant_linear(a, a_scale, w, w_scale, None, gs, packed, None, torch.float32, cfg)
    assert rel_err(y, ref) < 1e-5
    residual = torch.randn(m, n, generator=g).to(DEVICE, torch.bfloat16)
    y = int_gemm.quant_linear(a, a_scale, w, w_scale, None, gs, packed, None, torch.bfloat16, cfg, residual=residual)
    assert rel_err(y, ref + residual.float()) < 8e-3


@pytest.mark.parametrize("m,n,k", [pytest.param(333, 1152, 1152, marks=gpu_only), (77, 45, 96)])
def test_fp8_linear_matches_reference(m, n, k):
    x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
    a, a_scale = reference.quantize_per_token_fp8(x)
    w, w_scale = reference.quantize_per_token_fp8(torch.randn(n, k, device=DEVICE))
    bias = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
    y = int_gemm.quant_linear(a, a_scale, w, w_scale, None, k, False, bias, torch.bfloat16)
    assert rel_err(y, reference.fp8_linear(a, a_scale, w, w_scale, bias, torch.float32)) < 8e-3


@pytest.mark.parametrize("m,n,k,group_size", [(37, 45, 128, 64), (20, 33, 256, None)] + [
    pytest.param(*s, marks=gpu_only) for s in [(333, 1152, 1152, 64), (1000, 4608, 1152, 64), (517, 1152, 4608, 128)]])
def test_fp8_act_int4_linear_matches_reference(m, n, k, group_size):
    """fp8 activations x packed int4 weights (staged to per-channel fp8, then the fp8 GEMM) against the
    reference, with the layer's stored stage scale and without (computed by the launcher)."""
    g = torch.Generator().manual_seed(m + n + k)
    w, w_scale, w_zero, gs, packed = _make_weight(n, k, 4, False, group_size, g)
    a, a_scale = reference.quantize_per_token_fp8(torch.randn(m, k, generator=g).to(DEVICE))
    bias = torch.randn(n, generator=g).to(DEVICE, torch.bfloat16)
    stage = reference.int4_stage_scale(w, w_scale, w_zero, gs, fp8=True)
    ref = reference.int_linear(a, a_scale, w, w_scale, w_zero, gs, packed, bias, torch.float32, stage_scale=stage)
    for stage_scale in (stage, None):
        y = int_gemm.quant_linear(a, a_scale, w, w_scale, w_zero, gs, packed, bias, torch.float32,
                                  None if CUDA else SMALL_CFG, stage_scale=stage_scale)
        # The staged codes are exact (test above). Hopper's fp8 MMA accumulates with fewer bits: 0.07-1.2e-3
        # measured (H200, K up to 4608), 20x below the fp8 quantization error itself (0.027, as torch._scaled_mm).
        assert rel_err(y, ref) < (3e-3 if CUDA else 1e-5)
    exact = (a.float() * a_scale) @ dequantize_weight(unpack_int4(w), w_scale, w_zero, gs).t() + bias.float()
    assert rel_err(ref, exact) < (0.04 if gs < k else 1e-6)  # the fp8 requantization of the int4 groups


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_default_gemm_configs_fit_in_shared_memory(fp8, out_dtype):
    """The TMA configs chosen for DiT shapes fit the sm_90 shared memory with either output dtype (a float32
    model once got the bf16 tiles: 273 KiB, refused at launch), with or without the residual epilogue."""
    size = torch.empty(0, dtype=out_dtype).element_size()
    for (m, n, k), residual in itertools.product(
            [(8192, 1152, 1152), (8192, 4608, 1152), (35552, 1920, 7680), (35552, 7680, 1920)], [False, True]):
        cfg = int_gemm.default_config(m, n, k, k, fp8, size, residual)
        assert cfg.tma and int_gemm.smem_estimate(cfg, size, residual) <= int_gemm.SMEM_LIMIT
        assert cfg.num_stages >= 2
    assert int_gemm.smem_estimate(int_gemm.GemmConfig(128, 256, 128, 8, 8, 3, True, True), 4) > int_gemm.SMEM_LIMIT


def test_quant_linear_rejects_bad_shapes():
    w = torch.zeros(8, 32, dtype=torch.uint8, device=DEVICE)
    a = torch.zeros(4, 96, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="does not match"):
        int_gemm.quant_linear(a, torch.ones(4, 1, device=DEVICE), w, torch.ones(8, 1, device=DEVICE), None, 96, True,
                              None, torch.float32)


# ----------------------------------------------------------------------------------------- dispatch (GPU)
@gpu_only
@pytest.mark.parametrize("preset_bits", [(8, True, None, False), (4, False, 64, False), (8, True, None, True),
                                         (4, False, 64, True)])
def test_quantlinear_triton_path_matches_reference_path(preset_bits, monkeypatch):
    from viditq.layers import LayerSpec, QuantLinear

    bits, symmetric, group, fp8 = preset_bits
    k, n = 1152, 4608
    linear = torch.nn.Linear(k, n, device=DEVICE, dtype=torch.bfloat16)
    spec = LayerSpec(k, n, True, bits, symmetric, group or k, 8, smooth=True, rotate=True, rot_m=36, fp8=fp8)
    layer = QuantLinear.from_linear(linear, spec, smooth=torch.rand(k, device=DEVICE) + 0.5,
                                    rotation=random_signs(k, 3).to(DEVICE))
    x = torch.randn(2, 513, k, device=DEVICE, dtype=torch.bfloat16)
    y = layer(x)
    monkeypatch.setenv("VIDITQ_BACKEND", "reference")
    assert not dispatch.use_triton(x)
    assert rel_err(y, layer(x)) < 1e-2


# ----------------------------------------------------------------------------------------- custom ops (compile)
def test_custom_ops_pass_opcheck():
    """``viditq::quantize_activation`` / ``viditq::int_linear`` / ``viditq::int_linear_group`` (what torch.compile
    sees): schema, fake-tensor shapes and dtypes agree with the real kernels (run here on the interpreter or the GPU)."""
    from viditq.kernels import ops  # noqa: F401 — registers the ops

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 64, generator=g).to(DEVICE, torch.bfloat16)
    signs = random_signs(64, 1).to(DEVICE)
    for rot_block, fp8 in ((0, False), (32, False), (0, True)):
        torch.library.opcheck(torch.ops.viditq.quantize_activation.default, (x, 8, None, signs, 1, rot_block, fp8),
                              test_utils=("test_schema", "test_faketensor"))
    w, w_scale, w_zero, gs, packed = _make_weight(16, 64, 4, False, None, g)
    codes, scale = reference.quantize_activation(x, 8)
    bias = torch.randn(16, generator=g).to(DEVICE, torch.bfloat16)
    for activation in (None, "gelu_tanh"):
        torch.library.opcheck(torch.ops.viditq.int_linear.default,
                              (codes, scale, w, w_scale, w_zero, gs, packed, bias, torch.bfloat16, activation, None),
                              test_utils=("test_schema", "test_faketensor"))
    w, w_scale, w_zero, gs, packed = _make_weight(16, 64, 4, False, 32, g)
    stage = reference.int4_stage_scale(w, w_scale, w_zero, gs)
    torch.library.opcheck(torch.ops.viditq.int_linear.default,
                          (codes, scale, w, w_scale, w_zero, gs, packed, bias, torch.bfloat16, None, stage),
                          test_utils=("test_schema", "test_faketensor"))
    residual = torch.randn(5, 16, generator=g).to(DEVICE, torch.bfloat16)
    gate = torch.randn(1, 16, generator=g).to(DEVICE, torch.bfloat16)
    torch.library.opcheck(torch.ops.viditq.int_linear.default,
                          (codes, scale, w, w_scale, w_zero, gs, packed, bias, torch.bfloat16, None, stage, residual,
                           gate), test_utils=("test_schema", "test_faketensor"))
    q = [quantize_weight(torch.randn(n, 64, generator=g), 8) for n in (16, 32)]
    for biases in ([bias, torch.randn(32, generator=g).to(DEVICE, torch.bfloat16)], [None, None]):
        torch.library.opcheck(torch.ops.viditq.int_linear_group.default,
                              (codes, scale, [t.codes.to(DEVICE) for t in q], [t.scale.to(DEVICE) for t in q],
                               biases, torch.bfloat16), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("mode", ["kernel", "inductor"])
def test_inductor_compiled_quantlinear_matches_eager(fp8, mode, monkeypatch):
    """Under torch.compile (Inductor), activation quantization goes to the kernel custom op (the default), or with
    ``VIDITQ_COMPILE_ACT_QUANT=inductor`` a plain input's is left to Inductor as PyTorch ops (so it can fuse into
    the producer) and only a rotated input's goes to the kernel; the GEMM is always the custom op. Here the Triton
    path is forced onto CPU tensors (the interpreter), so both routes run as on the GPU."""
    from torch import nn

    from viditq.kernels import ops
    from viditq.layers import LayerSpec, QuantLinear

    if mode == "inductor":
        monkeypatch.setenv("VIDITQ_COMPILE_ACT_QUANT", "inductor")
    else:
        monkeypatch.delenv("VIDITQ_COMPILE_ACT_QUANT", raising=False)
    monkeypatch.setattr(dispatch, "use_triton", lambda x: True)
    kernel_calls = []
    real_impl = ops.quantize_activation_impl
    monkeypatch.setattr(ops, "quantize_activation_impl", lambda *a: kernel_calls.append(a[3] is not None)
                        or real_impl(*a))
    g = torch.Generator().manual_seed(11)
    k, n = 64, 48

    def layer(linear: nn.Linear, rotate: bool) -> QuantLinear:
        spec = LayerSpec(k, n, True, 8, True, k, 8, smooth=True, rotate=rotate, rot_m=1, fp8=fp8)
        return QuantLinear.from_linear(linear, spec, smooth=torch.rand(k, generator=g) + 0.5,
                                       rotation=random_signs(k, 2) if rotate else None)

    class Block(nn.Module):
        def __init__(self, plain, rotated):
            super().__init__()
            self.norm = nn.LayerNorm(k, elementwise_affine=False)
            self.plain, self.rotated = plain, rotated

        def forward(self, x):
            h = self.norm(x) * 1.5 + 0.25  # the producer Inductor may fuse the plain quantization into
            return self.plain(h) + self.rotated(h)

    linears = [nn.Linear(k, n).to(torch.bfloat16) for _ in range(2)]
    float_block = Block(*linears)
    block = Block(layer(linears[0], False), layer(linears[1], True)).to(DEVICE)
    float_block.to(DEVICE)
    x = torch.randn(2, 9, k, generator=g).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        ref, eager = float_block(x).float(), block(x).float()
        kernel_calls.clear()
        torch._dynamo.reset()
        compiled = torch.compile(block, backend="inductor", fullgraph=True)(x).float()
    if mode == "inductor":
        assert kernel_calls == [True], "compiled: only the rotated input goes to the kernel custom op"
    else:
        assert sorted(kernel_calls) == [False, True], "compiled: both inputs go to the kernel custom op"
    # Inductor keeps the fused producer in float32 where eager rounds it to bf16, so the quantized inputs differ
    # slightly: compiled must be as close to the float block as eager is
    assert rel_err(compiled, ref) < 1.25 * rel_err(eager, ref) + 1e-3
    assert rel_err(compiled, eager) < 2 * rel_err(eager, ref)


def test_pdl_launch_options_follow_the_device(monkeypatch):
    """Programmatic dependent launch only on CUDA devices of sm_90+ and not with VIDITQ_PDL=0 (the interpreter
    has no inline PTX: its kernels get PDL=False)."""
    from viditq.kernels import pdl

    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}
    if CUDA:
        on = torch.cuda.get_device_capability()[0] >= 9
        assert pdl.launch_options(torch.device("cuda")) == ({"PDL": True, "launch_pdl": True} if on else
                                                            {"PDL": False})
        monkeypatch.setenv("VIDITQ_PDL", "0")
        assert pdl.launch_options(torch.device("cuda")) == {"PDL": False}


@gpu_only
def test_pdl_kernel_chain_in_a_cuda_graph_equals_serial_launches(monkeypatch):
    """A chain of dependent viditq kernels (norm + quantization → GEMM with residual → quantization → staged W4
    GEMM → GEMM ...), each reading the one before, launched with PDL and replayed from a CUDA graph: the output
    equals the same chain launched without PDL, bit for bit, on every replay (a kernel that started before its
    input was written would show)."""
    from viditq.kernels import norm

    g = torch.Generator(device="cuda").manual_seed(3)
    m, c, h = 4096, 1152, 4608
    x = torch.randn(2, m // 2, c, device="cuda", generator=g).to(torch.bfloat16)
    scale, shift = (torch.randn(2, c, device="cuda", generator=g) * 0.1 for _ in range(2))
    w1 = quantize_weight(torch.randn(h, c, device="cuda", generator=g), 8).codes
    w1_scale = torch.full((h, 1), 1e-2, device="cuda")
    w2, w2_scale, w2_zero, gs, _ = _make_weight(c, h, 4, False, 64, torch.Generator().manual_seed(4))

    def chain(inp):
        y = inp
        for _ in range(3):
            _, codes, qs = norm.layer_norm_modulate_quant(y, None, None, scale, shift, 1e-6, 8, None, False, False)
            up = int_gemm.quant_linear(codes, qs, w1, w1_scale, None, c, False, None, torch.bfloat16,
                                       activation="gelu_tanh")
            a, a_s = act_quant.quantize_activation(up, 8)
            y = int_gemm.quant_linear(a, a_s, w2, w2_scale, w2_zero, gs, True, None, torch.bfloat16,
                                      residual=y.reshape(m, c)).reshape(2, m // 2, c)
        return y

    monkeypatch.setenv("VIDITQ_PDL", "0")
    serial = chain(x)
    monkeypatch.setenv("VIDITQ_PDL", "1")
    assert torch.equal(chain(x), serial)
    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(static)
    for i in range(3):
        static.copy_(x if i != 1 else x * 0.5)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, serial if i != 1 else chain(x * 0.5))


@pytest.mark.parametrize("fp8,w_bits", [(True, 8), (True, 4), (False, 8)])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("m,k,h,n", [(70, 256, 384, 192), pytest.param(8192, 1152, 4608, 1152, marks=gpu_only)])
def test_quantized_output_feeds_the_next_gemm(fp8, w_bits, smooth, m, k, h, n):
    """An up-projection whose epilogue applies the GELU and quantizes its output to fp8 per token with a scale
    from a bound on the row (``quant_out``, ``reference.output_range``) feeding the plain fp8 down-projection:
    the GEMM matches its reference (``reference.int_linear_quant_out``), the bound holds (no code saturates),
    and the chain is as accurate as quantizing the float hidden state per token with its row maximum (fp8
    rounds relative to each value: within 5 %)."""
    g = torch.Generator().manual_seed(5 + w_bits + 2 * fp8)
    x = torch.randn(m, k, generator=g) * (torch.rand(m, 1, generator=g) * 3 + 0.1)
    w1, w2 = torch.randn(h, k, generator=g) / k ** 0.5, torch.randn(n, h, generator=g) / h ** 0.5
    bias1 = (torch.randn(h, generator=g) * 0.5).to(DEVICE)
    smooth_inv = (torch.rand(h, generator=g) + 0.5).to(DEVICE) if smooth else None
    if w_bits == 8 and fp8:
        q = quantize_weight_fp8(w1)
        w1q, s1, z1, g1, p1 = q.codes.to(DEVICE), q.scale.to(DEVICE), None, k, False
    else:
        q = quantize_weight(w1, w_bits, True, None)
        w1q = (pack_int4(q.codes) if w_bits == 4 else q.codes).to(DEVICE)
        s1, z1, g1, p1 = q.scale.to(DEVICE), None, k, w_bits == 4
    stage1 = reference.int4_stage_scale(w1q, s1, z1, g1, fp8) if p1 else None
    a, a_s = reference.quantize_activation(x.to(DEVICE), 8, fp8=fp8)
    wf1 = reference.gemm_weight(w1q, s1, z1, g1, p1, fp8, stage1)
    bound = reference.output_range(wf1, bias1, 448.0 if fp8 else 127.0, "gelu_tanh", smooth_inv)
    quant = dict(smooth_inv=smooth_inv, bound=bound)
    codes, scales = int_gemm.quant_linear(a, a_s, w1q, s1, z1, g1, p1, bias1, torch.bfloat16,
                                          activation="gelu_tanh", stage_scale=stage1, quant_out=quant)
    ref_codes, ref_scales = reference.int_linear_quant_out(a, a_s, w1q, s1, z1, g1, p1, bias1, "gelu_tanh", stage1,
                                                           smooth_inv, bound)
    assert codes.dtype == ref_codes.dtype == torch.float8_e4m3fn and scales.shape == ref_scales.shape == (m, 1)
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)
    # the f32 sums agree but for their order, so a code may round the other way (one fp8 step: ~6 % of it); on
    # Hopper the fp8 MMA also accumulates with fewer bits (see the fp8 x int4 test)
    tol = 1e-2 if CUDA and fp8 else 5e-3
    assert rel_err(codes.float() * scales, ref_codes.float() * ref_scales) < tol
    assert codes.float().abs().amax() < 448  # the bound held: nothing saturated
    # the chain against float hidden states quantized per token with their row maximum
    w2f = quantize_weight_fp8(w2).dequantize().to(DEVICE)
    hidden = reference.int_linear(a, a_s, w1q, s1, z1, g1, p1, bias1, torch.float32, "gelu_tanh", stage1)
    exact = hidden.double() @ w2f.double().t()
    unsmooth = smooth_inv if smooth else 1.0
    per_token = reference.quantize_activation(hidden * unsmooth, 8, fp8=True)
    token_err = rel_err((per_token[0].float() * per_token[1] / unsmooth).double() @ w2f.double().t(), exact)
    bound_err = rel_err((codes.float() * scales / unsmooth).double() @ w2f.double().t(), exact)
    assert bound_err < token_err * 1.05  # 1.01-1.03 measured here (the scale 14-17x above the row maximum)
    again = int_gemm.quant_linear(a, a_s, w1q, s1, z1, g1, p1, bias1, torch.bfloat16, activation="gelu_tanh",
                                  stage_scale=stage1, quant_out=quant)
    assert torch.equal(again[0].view(torch.uint8), codes.view(torch.uint8)) and torch.equal(again[1], scales)


def test_quantized_outputs_refuse_bad_arguments():
    a = torch.zeros(8, 256, dtype=torch.int8, device=DEVICE)
    w = torch.zeros(128, 256, dtype=torch.int8, device=DEVICE)
    ws = torch.ones(128, 1, device=DEVICE)
    with pytest.raises(ValueError, match="activation scales must be per token"):
        int_gemm.quant_linear(a, torch.ones(8, 3, device=DEVICE), w, ws, None, 256, False, None, torch.float32)
    with pytest.raises(ValueError, match="bound must be"):
        int_gemm.quant_linear(a, torch.ones(8, 1, device=DEVICE), w, ws, None, 256, False, None, torch.float32,
                              quant_out=dict(smooth_inv=None, bound=(1.0, 0.0, 1e-8)))  # floats, not a tensor
    with pytest.raises(ValueError, match="smooth_inv must be"):
        int_gemm.quant_linear(a, torch.ones(8, 1, device=DEVICE), w, ws, None, 256, False, None, torch.float32,
                              quant_out=dict(smooth_inv=torch.ones(64, device=DEVICE),
                                             bound=torch.tensor([1.0, 0.0, 1e-8], device=DEVICE)))


def test_output_range_bounds_the_gelu_output():
    """``reference.output_range``: the scale it gives is at least the row maximum over 448 (of the GELU output,
    smoothed) for any input codes, and tight (up to the bias) for adversarial ones: the signs of the weight row
    with the largest L1 norm, at full code range."""
    g = torch.Generator().manual_seed(2)
    w, bias = torch.randn(96, 64, generator=g), torch.randn(96, generator=g) * 0.1
    codes = torch.cat([torch.sign(w[w.abs().sum(1).argmax()])[None] * 448,
                       torch.randn(5, 64, generator=g).clamp(-3, 3) * 100])
    x_scale = torch.rand(6, 1, generator=g) + 0.01
    y = torch.nn.functional.gelu(codes * x_scale @ w.t() + bias, approximate="tanh")
    for smooth in (None, torch.rand(96, generator=g) + 0.5):
        ys = y if smooth is None else y * smooth
        scale = reference.range_scale(x_scale, reference.output_range(w, bias, 448.0, "gelu_tanh", smooth))
        assert (scale >= ys.abs().amax(1, keepdim=True) / 448).all()
    tight = reference.range_scale(x_scale, reference.output_range(w, bias, 448.0, "gelu_tanh", None))
    ratio = (tight[0] * 448 / y[0].abs().max()).item()
    assert 1 <= ratio < 1 + 2 * bias.abs().max().item() / y[0].abs().max().item() + 2e-3
    zero = reference.range_scale(torch.zeros(1, 1), reference.output_range(w, bias, 448.0, "gelu_tanh", None))
    assert zero >= torch.nn.functional.gelu(bias, approximate="tanh").abs().max() / 448  # GELU(bias) bounded
