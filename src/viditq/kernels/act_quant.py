"""Fused per-token activation quantization (Triton): smoothing, online Hadamard rotation, absmax, round.

v4. Each program step handles ``block_m`` whole rows in registers, read once from device memory
(bf16/fp16/fp32) and written once as int8 codes (or fp8 e4m3 values) plus one float32 scale per row:

* plain: a row of K channels is held as a power-of-two main tile plus a power-of-two tail tile
  (1152 = 1024 + 128, 4608 = 4096 + 512), so no lane is masked at DiT widths (v3 padded 1152 to 2048);
* rotated: the row seen as an ``(m, p)`` matrix ``X`` is rotated as ``H_m^T X H_p`` (see ``quant.hadamard``) with
  two small tensor-core products, ``(rows·m, p) @ H_p`` then ``(rows·p, m) @ H_m``, ``m`` zero-padded to a power
  of two. A block rotation (runs of ``p = rot_block`` channels, ``m = K / p`` runs) is the first product alone. The Hadamard operands are re-read from L1/L2 inside the loop instead of being held in registers
  (v3 kept them live: 255 registers, spills, one program per SM). Without smoothing, ``x · signs`` of a bf16
  input is exact in bf16 and the first product is a single bf16 product; otherwise float32 operands are split
  into bf16 high + low halves (±1 matrices are exact in bf16), which keeps ~16 mantissa bits: codes match the
  float32 reference except for rare ties at a rounding boundary. ``1/sqrt(K)`` is applied last, as the
  reference does.

Programs are one per row block, or (``ActQuantConfig.persistent``) a few per SM walking the blocks grid-stride.
Numerics follow ``reference.quantize_activation`` (round half to even, ``MIN_SCALE`` floor, scale = absmax times
the float32 reciprocal of qmax as PyTorch does on CUDA; codes equal to rounding the IEEE quotient, see
``_round_quotient``). Launch shapes per width come from the sweeps in ``benchmarks/tune_act_quant.py``
(``default_config``); ``VIDITQ_ACT_QUANT_CONFIG="block_m,num_warps[,persistent,programs_per_sm,num_stages]"``
overrides them.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..quant.hadamard import paley_hadamard
from ..quant.quantizers import MIN_SCALE, signed_range
from . import pdl
from .triton_compat import interpreted

FP8_E4M3_MAX = 448.0
MAX_ROW_ELEMENTS = 8192  # one row (padded to powers of two) must fit a program's registers
_FAST_ROUND_OK = [True]  # cleared if this Triton cannot build the rint + FMA rounding (see quantize_activation)


# ----------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class ActQuantConfig:
    """Launch shape of one activation-quantization call.

    block_m: rows per program step (a power of two); num_warps: warps per program; persistent: a grid of
    ``programs_per_sm`` programs per SM walking the row blocks grid-stride (the next block's loads issued
    before this block's math, ``num_stages``); otherwise one program per row block.
    """

    block_m: int
    num_warps: int
    persistent: bool = False
    programs_per_sm: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.block_m < 1 or self.block_m & (self.block_m - 1):
            raise ValueError(f"ActQuantConfig.block_m must be a power of two >= 1, got {self.block_m}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"ActQuantConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.programs_per_sm < 1 or self.num_stages < 1:
            raise ValueError("ActQuantConfig.programs_per_sm and num_stages must be >= 1")


# Best launch shapes where they differ from the rule in default_config, keyed by (kind, K) with kind "plain" (no
# rotation, no smoothing), "smooth" (no rotation, smoothing), "full" (one rotation of the width) or "block" (runs of
# 128 channels, with or without smoothing). smooth: the H200 sweep of benchmarks/tune_act_quant.py (session 13;
# plain rows follow the rule, session 14, NOTES.md); full / block: the H100 sweep (2026-11-25, with smoothing), the
# block entries being the shapes that compile without register spills for sm_90 (compile_act_quant_sm90.py).
TUNED_CONFIGS: dict[tuple[str, int], ActQuantConfig] = {
    ("smooth", 4608): ActQuantConfig(1, 4, persistent=True, programs_per_sm=8, num_stages=3),  # 49.5 us (rule: 65)
    ("smooth", 1920): ActQuantConfig(1, 4),  # 35552 rows: 89.1 us, 2.30 TB/s (rule, 2 warps: 90.2)
    ("full", 1152): ActQuantConfig(2, 4, persistent=True, programs_per_sm=8),  # H100: 47.8 us (v3: 49.1)
    ("full", 4608): ActQuantConfig(1, 4),  # 304 us (v3: 375)
    ("full", 1920): ActQuantConfig(2, 4, persistent=True, programs_per_sm=8),  # 196 us (v3: 198)
    ("full", 7680): ActQuantConfig(1, 4),  # 1359 us (v3: 1648)
    ("block", 1152): ActQuantConfig(4, 4),  # 187 registers, no spills
    ("block", 4608): ActQuantConfig(1, 8),  # 199
    ("block", 1920): ActQuantConfig(1, 4),  # 198
    ("block", 7680): ActQuantConfig(1, 8),  # 199
}


def split_width(k: int) -> tuple[int, int]:
    """(KA, KB): ``k`` channels as a power-of-two main tile plus a power-of-two tail tile (KB = 0: none).

    Exact where ``k`` is a sum of two powers of two (1152 = 1024 + 128, 4608 = 4096 + 512); otherwise the tail
    is padded (1920 = 1024 + 1024): never more lanes than one next_power_of_2(k) tile."""
    ka = 1 << (k.bit_length() - 1)
    if ka == k:
        return k, 0
    return ka, triton.next_power_of_2(k - ka)


def _config_from_env() -> ActQuantConfig | None:
    spec = os.environ.get("VIDITQ_ACT_QUANT_CONFIG")
    if not spec:
        return None
    try:
        fields = [int(v) for v in spec.split(",")]
        if not 2 <= len(fields) <= 5:
            raise ValueError("2 to 5 integers")
        return ActQuantConfig(fields[0], fields[1], *([bool(fields[2])] + fields[3:] if len(fields) > 2 else []))
    except ValueError as e:
        raise ValueError(f"VIDITQ_ACT_QUANT_CONFIG={spec!r}: expected 'block_m,num_warps[,persistent,"
                         f"programs_per_sm,num_stages]' ({e})") from None


def default_config(k: int, rot_m: int | None, rot_block: int = 0, smooth: bool = False) -> ActQuantConfig:
    """Launch shape for rows of ``k`` channels (``rot_m``: the rotation's Paley factor, None: no rotation;
    ``rot_block``: block rotation; ``smooth``: with a smoothing vector): the tuned entry (TUNED_CONFIGS), else the
    rule the sweeps suggest."""
    env = _config_from_env()
    if env is not None:
        return env
    kind = ("smooth" if smooth else "plain") if rot_m is None else "block" if rot_block else "full"
    tuned = TUNED_CONFIGS.get((kind, k))
    if tuned is not None:
        return tuned
    if kind == "block":  # one product per step: ~8k padded elements, 8 warps from 8k (no spills at DiT widths)
        m, p = _kernel_factors(k, 1, rot_block)
        row = triton.next_power_of_2(m) * p
        block_m = max(1, min(4, 8192 // row))
        return ActQuantConfig(block_m, 8 if block_m * row >= 8192 and block_m == 1 else 4)
    if rot_m is not None:  # H100: 4 warps, ~4k padded elements per step; persistent for short rows
        m, p = _kernel_factors(k, rot_m)
        row = (triton.next_power_of_2(m) if m > 1 else 1) * p
        block_m = 1 << max(0, min(5, (4096 // row).bit_length() - 1))
        return ActQuantConfig(block_m, 4, persistent=row <= 2048, programs_per_sm=8)
    row = sum(split_width(k))
    # H200 sweeps (no rotation): one row per program, about 32 elements per thread — plain 13.8 / 47.4 / 80.0 /
    # 327.5 us at 8192 x 1152 / 8192 x 4608 / 35552 x 1920 / 35552 x 7680 (2.06-2.56 TB/s), smoothed 13.7 us at 1152
    if row >= 1024:
        return ActQuantConfig(1, 1 << max(0, min(4, round(math.log2(row / 1024)))))
    block_m = 1 << max(0, min(5, (4096 // row).bit_length() - 1))  # short rows: up to 32 per step, 4 warps
    return ActQuantConfig(block_m, 4)


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _round_half_even(v):
    """torch.round semantics, exact for any float32 (``v - floor(v)`` is exact; no ``v + 0.5`` rounding)."""
    r = tl.floor(v)
    frac = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, r + 1.0, r)
@triton.jit
def _row_scale(absmax, QMAX: tl.constexpr, MIN_S: tl.constexpr, CUDA_SCALAR_DIV: tl.constexpr):
    """``max(absmax / qmax, MIN_SCALE)`` exactly as the reference computes it: PyTorch on CUDA multiplies by the
    float32 reciprocal of a scalar divisor, on the CPU it divides."""
    if CUDA_SCALAR_DIV:
        return tl.maximum(absmax * (1.0 / QMAX), MIN_S)
    return tl.maximum(tl.math.div_rn(absmax, QMAX), MIN_S)


@triton.jit
def _round_quotient(y, scale, inv_scale, FAST_ROUND: tl.constexpr):
    """``round_half_even(fl(y / scale))`` — what the reference computes, IEEE quotient then rounding — without a
    division per element.

    ``v = y * (1/scale)`` is within a few ulps of the true quotient q, so the answer is one of the two integers
    around ``t``, the half-integer nearest to v. ``y - t * scale`` (one FMA, rounded once, so its sign is exact)
    says on which side of t q lies. If q is within half an ulp of t, the IEEE quotient *is* t and the reference
    rounds that tie to even (bf16 inputs hit exact and near ties often). The CPU interpreter has no fused
    multiply-add, so there the quotient is divided and rounded directly."""
    if not FAST_ROUND:
        return _round_half_even(tl.math.div_rn(y, scale))
    v = y * inv_scale
    r = libdevice.rint(v)
    t = r + tl.where(v >= r, 0.5, -0.5)
    residual = tl.fma(-t, scale, y)
    t_abs = tl.abs(t)
    ulp = (t_abs.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True) - t_abs
    is_tie = tl.abs(residual) < 0.5 * ulp * scale
    return tl.where(is_tie, libdevice.rint(t), tl.where(residual > 0, t + 0.5, t - 0.5))


@triton.jit
def quantize_codes(y, scale, QMAX: tl.constexpr, FP8: tl.constexpr, FAST_ROUND: tl.constexpr):
    """``y / scale`` as int8 (rounded half to even, clamped) or fp8 e4m3: ``y * (1 / scale)`` with the
    reciprocal rounded exactly (one per row), cast to nearest even, as ``quantize_per_token_fp8`` does."""
    if FP8:
        inv_scale = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        codes = tl.clamp(y * inv_scale, -QMAX, QMAX).to(tl.float8e4nv)
    else:
        codes = tl.clamp(_round_quotient(y, scale, 1.0 / scale, FAST_ROUND), -QMAX, QMAX).to(tl.int8)
    return codes


@triton.jit
def _store_codes(codes_ptrs, y, scale, mask, QMAX: tl.constexpr, FP8: tl.constexpr, FAST_ROUND: tl.constexpr):
    """Store :func:`quantize_codes` of ``y``."""
    tl.store(codes_ptrs, quantize_codes(y, scale, QMAX, FP8, FAST_ROUND), mask=mask)


@triton.jit
def _plain_block(
    x_ptr, codes_ptr, scale_ptr, smooth_a, smooth_b, block, M, stride_xm, stride_cm,
    K: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, HAS_SMOOTH: tl.constexpr, QMAX: tl.constexpr,
    MIN_S: tl.constexpr, FP8: tl.constexpr, CUDA_SCALAR_DIV: tl.constexpr, FAST_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Quantize rows ``block * BLOCK_M ...``: main tile (BLOCK_M, KA) + tail tile (BLOCK_M, KB), one pass."""
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    c_rows = codes_ptr + offs_m.to(tl.int64)[:, None] * stride_cm
    offs_a = tl.arange(0, KA)
    ya = tl.load(x_rows + offs_a[None, :], mask=row_ok[:, None], other=0.0,
                 eviction_policy="evict_first").to(tl.float32)
    if HAS_SMOOTH:
        ya = ya * smooth_a[None, :]
    absmax = tl.max(tl.abs(ya), axis=1)
    if KB > 0:
        offs_b = KA + tl.arange(0, KB)
        mask_b = row_ok[:, None] & (offs_b[None, :] < K)
        yb = tl.load(x_rows + offs_b[None, :], mask=mask_b, other=0.0, eviction_policy="evict_first").to(tl.float32)
        if HAS_SMOOTH:
            yb = yb * smooth_b[None, :]
        absmax = tl.maximum(absmax, tl.max(tl.abs(yb), axis=1))
    scale = _row_scale(absmax, QMAX, MIN_S, CUDA_SCALAR_DIV)  # (BLOCK_M,)
    _store_codes(c_rows + offs_a[None, :], ya, scale[:, None], row_ok[:, None], QMAX, FP8, FAST_ROUND)
    if KB > 0:
        _store_codes(c_rows + offs_b[None, :], yb, scale[:, None], mask_b, QMAX, FP8, FAST_ROUND)
    tl.store(scale_ptr + offs_m, scale, mask=row_ok)


@triton.jit(do_not_specialize=["M", "num_programs"])
def _act_quant_plain_kernel(
    x_ptr, smooth_ptr, codes_ptr, scale_ptr, M, stride_xm, stride_cm, num_programs,
    K: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, HAS_SMOOTH: tl.constexpr, QMAX: tl.constexpr,
    MIN_S: tl.constexpr, FP8: tl.constexpr, CUDA_SCALAR_DIV: tl.constexpr, FAST_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr, PERSISTENT: tl.constexpr, NUM_STAGES: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl.enter(PDL)
    offs_a = tl.arange(0, KA)
    offs_b = KA + tl.arange(0, KB if KB > 0 else 1)
    if HAS_SMOOTH:
        smooth_a = tl.load(smooth_ptr + offs_a)
        smooth_b = tl.load(smooth_ptr + offs_b, mask=offs_b < K, other=0.0)
    else:
        smooth_a = tl.zeros([KA], dtype=tl.float32)
        smooth_b = tl.zeros([KB if KB > 0 else 1], dtype=tl.float32)
    if PERSISTENT:
        for block in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_programs, num_stages=NUM_STAGES):
            _plain_block(x_ptr, codes_ptr, scale_ptr, smooth_a, smooth_b, block, M, stride_xm, stride_cm,
                         K, KA, KB, HAS_SMOOTH, QMAX, MIN_S, FP8, CUDA_SCALAR_DIV, FAST_ROUND, BLOCK_M)
    else:
        _plain_block(x_ptr, codes_ptr, scale_ptr, smooth_a, smooth_b, tl.program_id(0), M, stride_xm, stride_cm,
                     K, KA, KB, HAS_SMOOTH, QMAX, MIN_S, FP8, CUDA_SCALAR_DIV, FAST_ROUND, BLOCK_M)


@triton.jit
def _dot_split(a, b_bf16, EXACT_FP32: tl.constexpr):
    """``a @ b`` for float32 ``a`` and a bf16-exact ``b``: two bf16 products (high and low half of ``a``)
    accumulated in float32.

    ``EXACT_FP32`` uses one float32 product instead: the CPU interpreter mis-multiplies bf16 operands.
    """
    if EXACT_FP32:
        return tl.dot(a, b_bf16.to(tl.float32), input_precision="ieee")
    hi = a.to(tl.bfloat16)
    lo = (a - hi.to(tl.float32)).to(tl.bfloat16)
    return tl.dot(lo, b_bf16, tl.dot(hi, b_bf16))


@triton.jit
def _rotate_block(
    x_ptr, codes_ptr, scale_ptr, hp_ptr, hm_ptr, v, offs_k, mask_k, block, M, stride_xm, stride_cm, out_mult,
    QMAX: tl.constexpr, MIN_S: tl.constexpr, FP8: tl.constexpr, CUDA_SCALAR_DIV: tl.constexpr,
    FAST_ROUND: tl.constexpr, M_PAD: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr,
    SPLIT_X: tl.constexpr, EXACT_FP32: tl.constexpr, MIX_M: tl.constexpr,
):
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    mask = row_ok[:, None, None] & mask_k[None, :, :]
    x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None, None] * stride_xm + offs_k[None, :, :], mask=mask, other=0.0,
                eviction_policy="evict_first")
    x = x.to(tl.float32) * v[None, :, :]  # (BM, M_PAD, P): smoothing and signs
    offs_p = tl.arange(0, P)
    hp = tl.load(hp_ptr + offs_p[:, None] * P + offs_p[None, :])  # re-read (L1) instead of held in registers
    x = tl.reshape(x, (BLOCK_M * M_PAD, P))
    # X H_p: rows of length P times the (P, P) Sylvester matrix.
    if SPLIT_X:
        y = _dot_split(x, hp, EXACT_FP32)
    elif EXACT_FP32:
        y = tl.dot(x, hp.to(tl.float32), input_precision="ieee")
    else:  # x * (±1) of a bf16 input is exact in bf16: one product, exact products, float32 sums
        y = tl.dot(x.to(tl.bfloat16), hp)
    if M_PAD > 1 and MIX_M:  # (without MIX_M: a block rotation, each run of P channels on its own)
        # H_m^T Y: move the Paley axis last, then (rows * P, M_PAD) @ H_m (zero-padded rows/cols).
        offs_i = tl.arange(0, M_PAD)
        hm = tl.load(hm_ptr + offs_i[:, None] * M_PAD + offs_i[None, :])
        y = tl.permute(tl.reshape(y, (BLOCK_M, M_PAD, P)), (0, 2, 1))
        y = _dot_split(tl.reshape(y, (BLOCK_M * P, M_PAD)), hm, EXACT_FP32)
        y = tl.permute(tl.reshape(y, (BLOCK_M, P, M_PAD)), (0, 2, 1))
    y = tl.reshape(y, (BLOCK_M, M_PAD, P)) * out_mult
    absmax = tl.max(tl.max(tl.abs(y), axis=2), axis=1)  # padded channels are exactly 0
    scale = _row_scale(absmax, QMAX, MIN_S, CUDA_SCALAR_DIV)  # (BLOCK_M,)
    c_ptrs = codes_ptr + offs_m.to(tl.int64)[:, None, None] * stride_cm + offs_k[None, :, :]
    _store_codes(c_ptrs, y, scale[:, None, None], mask, QMAX, FP8, FAST_ROUND)
    tl.store(scale_ptr + offs_m, scale, mask=row_ok)


@triton.jit(do_not_specialize=["M", "num_programs"])
def _act_quant_rotate_kernel(
    x_ptr, smooth_ptr, signs_ptr, hp_ptr, hm_ptr, codes_ptr, scale_ptr,
    M, stride_xm, stride_cm, out_mult, num_programs,
    HAS_SMOOTH: tl.constexpr, QMAX: tl.constexpr, MIN_S: tl.constexpr, FP8: tl.constexpr,
    CUDA_SCALAR_DIV: tl.constexpr, FAST_ROUND: tl.constexpr, M_H: tl.constexpr, M_PAD: tl.constexpr,
    P: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_X: tl.constexpr, EXACT_FP32: tl.constexpr,
    PERSISTENT: tl.constexpr, NUM_STAGES: tl.constexpr, MIX_M: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl.enter(PDL)
    offs_i = tl.arange(0, M_PAD)  # Paley axis (padded)
    offs_j = tl.arange(0, P)  # power-of-two axis
    offs_k = offs_i[:, None] * P + offs_j[None, :]  # (M_PAD, P) channel index i * P + j
    mask_k = offs_i[:, None] < M_H
    v = tl.load(signs_ptr + offs_k, mask=mask_k, other=0.0)
    if HAS_SMOOTH:
        v = v * tl.load(smooth_ptr + offs_k, mask=mask_k, other=0.0)  # (x * s) * sign == x * (s * sign) exactly
    if PERSISTENT:
        for block in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_programs, num_stages=NUM_STAGES):
            _rotate_block(x_ptr, codes_ptr, scale_ptr, hp_ptr, hm_ptr, v, offs_k, mask_k, block, M, stride_xm,
                          stride_cm, out_mult, QMAX, MIN_S, FP8, CUDA_SCALAR_DIV, FAST_ROUND, M_PAD, P, BLOCK_M,
                          SPLIT_X, EXACT_FP32, MIX_M)
    else:
        _rotate_block(x_ptr, codes_ptr, scale_ptr, hp_ptr, hm_ptr, v, offs_k, mask_k, tl.program_id(0), M,
                      stride_xm, stride_cm, out_mult, QMAX, MIN_S, FP8, CUDA_SCALAR_DIV, FAST_ROUND, M_PAD, P,
                      BLOCK_M, SPLIT_X, EXACT_FP32, MIX_M)


# ----------------------------------------------------------------------------------------- launcher
_HADAMARD_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    return h


def _kernel_factors(k: int, rot_m: int, rot_block: int = 0) -> tuple[int, int]:
    """(m, p) as the kernel applies them. A power-of-two width (rot_m == 1) wider than 128 is split as
    H_k = H_(k/p) ⊗ H_p (Sylvester matrices nest), so both products stay small: p <= 128, m >= 16.
    A block rotation is m = k / rot_block runs of p = rot_block channels."""
    if rot_block:
        return k // rot_block, rot_block
    p = k // rot_m
    if rot_m == 1 and p > 128:
        p_inner = 128 if p >= 2048 else p // 16
        return p // p_inner, p_inner
    return rot_m, p


def _hadamard_operands(
    k: int, rot_m: int, device: torch.device, rot_block: int = 0
) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """bf16 ``H_p`` (p, p), zero-padded ``H_m`` (m_pad, m_pad; a 1 x 1 placeholder for a block rotation), m,
    m_pad, p; cached per device."""
    m, p = _kernel_factors(k, rot_m, rot_block)
    m_pad = triton.next_power_of_2(m) if m > 1 else 1
    key = (k, rot_m, rot_block, str(device))
    if key not in _HADAMARD_CACHE:
        if rot_block:
            hm = torch.ones(1, 1, dtype=torch.float64)
        else:
            hm = torch.zeros(m_pad, m_pad, dtype=torch.float64)
            hm[:m, :m] = paley_hadamard(m) if rot_m > 1 else _sylvester(m)
        _HADAMARD_CACHE[key] = (_sylvester(p).to(device, torch.bfloat16), hm.to(device, torch.bfloat16))
    hp, hm = _HADAMARD_CACHE[key]
    return hp, hm, m, m_pad, p


_SM_COUNT: dict[int, int] = {}


def _num_programs(device: torch.device, num_blocks: int, config: ActQuantConfig) -> int:
    """One program per row block, or (persistent) a few per SM; at most 3 under the CPU interpreter."""
    if device.type != "cuda":
        return max(1, min(num_blocks, 3)) if config.persistent else num_blocks
    if not config.persistent:
        return num_blocks
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return max(1, min(num_blocks, _SM_COUNT[index] * config.programs_per_sm))


def rotation_supported(k: int, rot_m: int, rot_block: int = 0) -> bool:
    """Whether the fused kernel can apply the rotation of width ``k`` (else use the reference): ``(H_m ⊗ H_p)``,
    or with ``rot_block`` the block-diagonal one (``rot_m`` = 1)."""
    if rot_block:
        return (rot_m == 1 and 16 <= rot_block <= 128 and not rot_block & (rot_block - 1) and k % rot_block == 0
                and triton.next_power_of_2(k // rot_block) * rot_block <= MAX_ROW_ELEMENTS)
    if rot_m < 1 or k % rot_m or (k // rot_m) & (k // rot_m - 1):
        return False
    m, p = _kernel_factors(k, rot_m)
    m_pad = triton.next_power_of_2(m) if m > 1 else 1
    return 16 <= p <= 128 and (m_pad == 1 or m_pad >= 16) and m_pad * p <= MAX_ROW_ELEMENTS


def plain_supported(k: int) -> bool:
    return k >= 1 and sum(split_width(k)) <= MAX_ROW_ELEMENTS


def quantize_activation(
    x: torch.Tensor,
    bits: int,
    smooth_inv: torch.Tensor | None = None,
    rot_signs: torch.Tensor | None = None,
    rot_m: int = 1,
    rot_block: int = 0,
    fp8: bool = False,
    config: ActQuantConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``quantize_per_token(balance(x))``: x (M, K) → codes (M, K) int8 (fp8 e4m3 if ``fp8``), scale (M, 1) f32.

    ``bits`` is ignored when ``fp8`` (scale = absmax / 448). The caller checks ``*_supported`` first.
    ``config`` overrides the launch shape (``default_config``).
    """
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be a 2-D tensor with contiguous rows, got shape {tuple(x.shape)}")
    m_rows, k = x.shape
    for name, vec in (("smooth_inv", smooth_inv), ("rot_signs", rot_signs)):
        if vec is not None and (vec.shape != (k,) or vec.dtype != torch.float32 or not vec.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous float32 vector of {k} channels, got "
                             f"{tuple(vec.shape)} {vec.dtype}")
    if rot_signs is not None and not rotation_supported(k, rot_m, rot_block):
        raise ValueError(f"no fused rotation for K={k}, rot_m={rot_m}, rot_block={rot_block}; check "
                         f"rotation_supported first")
    if rot_signs is None and not plain_supported(k):
        raise ValueError(f"K={k} is too wide for the fused kernel; check plain_supported first")
    qmax = FP8_E4M3_MAX if fp8 else float(signed_range(bits, symmetric=True)[1])
    codes = torch.empty(m_rows, k, device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    scale = torch.empty(m_rows, 1, device=x.device, dtype=torch.float32)
    if m_rows == 0:
        return codes, scale
    config = config or default_config(k, None if rot_signs is None else rot_m, rot_block, smooth_inv is not None)
    on_gpu = x.device.type == "cuda"
    common = dict(HAS_SMOOTH=smooth_inv is not None, QMAX=qmax, MIN_S=MIN_SCALE, FP8=fp8,
                  CUDA_SCALAR_DIV=on_gpu, FAST_ROUND=on_gpu and _FAST_ROUND_OK[0])
    smooth = smooth_inv if smooth_inv is not None else scale  # dummy pointer when unused
    try:
        _launch(x, smooth, rot_signs, rot_m, rot_block, codes, scale, common, config)
    except triton.CompilationError:
        if not common["FAST_ROUND"]:
            raise
        # If this Triton cannot build the fast rounding (libdevice rint + FMA tie check), use the division path
        # (same codes, slower) from now on.
        warnings.warn("viditq act_quant: fast rounding failed to compile; using IEEE division", stacklevel=2)
        _FAST_ROUND_OK[0] = False
        _launch(x, smooth, rot_signs, rot_m, rot_block, codes, scale, dict(common, FAST_ROUND=False), config)
    return codes, scale


def _launch(x, smooth, rot_signs, rot_m, rot_block, codes, scale, common, config: ActQuantConfig) -> None:
    m_rows, k = x.shape
    block_m = config.block_m
    if rot_block:  # the product needs 16 rows: block_m * m_pad >= 16
        block_m = max(block_m, 16 // triton.next_power_of_2(k // rot_block))
    programs = _num_programs(x.device, triton.cdiv(m_rows, block_m), config)
    launch = dict(BLOCK_M=block_m, PERSISTENT=config.persistent, NUM_STAGES=config.num_stages,
                  num_warps=config.num_warps, **common, **pdl.launch_options(x.device))
    if rot_signs is None:
        ka, kb = split_width(k)
        _act_quant_plain_kernel[(programs,)](
            x, smooth, codes, scale, m_rows, x.stride(0), codes.stride(0), programs, K=k, KA=ka, KB=kb, **launch,
        )
        return
    hp, hm, m_h, m_pad, p = _hadamard_operands(k, rot_m, x.device, rot_block)
    split_x = common["HAS_SMOOTH"] or x.dtype != torch.bfloat16
    _act_quant_rotate_kernel[(programs,)](
        x, smooth, rot_signs, hp, hm, codes, scale, m_rows, x.stride(0), codes.stride(0),
        1.0 / math.sqrt(rot_block or k), programs, M_H=m_h, M_PAD=m_pad, P=p, SPLIT_X=split_x,
        EXACT_FP32=interpreted(), MIX_M=not rot_block, **launch,
    )
