"""Fused per-token activation quantization (Triton): smoothing, online Hadamard rotation, absmax, round.

One program quantizes ``BLOCK_M`` whole rows: the row is read once from device memory (bf16/fp16/fp32),
multiplied by ``smooth_inv * signs``, rotated by ``(H_m ⊗ H_p) / sqrt(K)`` in registers, reduced to its absmax and
written as int8 codes (or fp8 e4m3 values) plus one float32 scale. Numerics follow
``reference.quantize_activation`` (round half to even, IEEE division, ``MIN_SCALE`` floor).

The rotation of a row seen as an ``(m, p)`` matrix ``X`` is ``H_m^T X H_p`` (see ``quant.hadamard``): two small
tensor-core products, ``(rows·m, p) @ H_p`` then ``(rows·p, m) @ H_m``, with ``m`` zero-padded to a power of two.
Operands are split into bf16 high + low halves (±1 matrices are exact in bf16), which keeps ~16 mantissa bits:
far below the int8 step, so codes match the float32 reference except for rare ties at a rounding boundary.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..quant.hadamard import paley_hadamard
from ..quant.quantizers import MIN_SCALE, signed_range

FP8_E4M3_MAX = 448.0
MAX_ROW_ELEMENTS = 8192  # one row (padded to powers of two) must fit a program's registers


# ----------------------------------------------------------------------------------------- configs
def _plain_config(k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps): ~8k elements per program, 16-byte loads along K."""
    block_k = triton.next_power_of_2(k)
    block_m = max(1, min(16, 8192 // block_k))
    return block_m, block_k, 8 if block_k >= 2048 else 4


def _rotate_config(m_pad: int, p: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps): ~8k padded elements per program, and at least 16 rows in each tensor-core product."""
    row = m_pad * p
    block_m = max(1, 8192 // row)
    block_m = max(block_m, triton.cdiv(16, min(m_pad, p)))
    return block_m, 8


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
def _round_codes(y, scale, QMAX: tl.constexpr, FP8: tl.constexpr):
    """Codes of ``y / scale``: int8 rounded half-to-even and clamped, or fp8 e4m3 (round to nearest even)."""
    v = tl.math.div_rn(y, scale)
    if FP8:
        return tl.clamp(v, -QMAX, QMAX).to(tl.float8e4nv)
    return tl.clamp(_round_half_even(v), -QMAX, QMAX).to(tl.int8)


@triton.jit
def _act_quant_plain_kernel(
    x_ptr, smooth_ptr, codes_ptr, scale_ptr,
    M, K, stride_xm, stride_cm,
    HAS_SMOOTH: tl.constexpr, QMAX: tl.constexpr, MIN_S: tl.constexpr, FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    y = x.to(tl.float32)
    if HAS_SMOOTH:
        y = y * tl.load(smooth_ptr + offs_k, mask=offs_k < K, other=0.0)[None, :]
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(y), axis=1), QMAX), MIN_S)  # (BLOCK_M,)
    codes = _round_codes(y, scale[:, None], QMAX, FP8)
    tl.store(codes_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_k[None, :], codes, mask=mask)
    tl.store(scale_ptr + offs_m, scale, mask=offs_m < M)


@triton.jit
def _dot_split(a, b_bf16, EXACT_FP32: tl.constexpr):
    """``a @ b`` for float32 ``a`` and a bf16-exact ``b``: two bf16 products (high and low half of ``a``).

    ``EXACT_FP32`` uses one float32 product instead: the CPU interpreter mis-multiplies bf16 operands.
    """
    if EXACT_FP32:
        return tl.dot(a, b_bf16.to(tl.float32), input_precision="ieee")
    hi = a.to(tl.bfloat16)
    lo = (a - hi.to(tl.float32)).to(tl.bfloat16)
    return tl.dot(hi, b_bf16) + tl.dot(lo, b_bf16)


@triton.jit
def _act_quant_rotate_kernel(
    x_ptr, smooth_ptr, signs_ptr, hp_ptr, hm_ptr, codes_ptr, scale_ptr,
    M, K, stride_xm, stride_cm, inv_sqrt_k,
    HAS_SMOOTH: tl.constexpr, QMAX: tl.constexpr, MIN_S: tl.constexpr, FP8: tl.constexpr,
    M_H: tl.constexpr, M_PAD: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, EXACT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = tl.arange(0, M_PAD)  # Paley axis (padded)
    offs_j = tl.arange(0, P)  # power-of-two axis
    offs_k = offs_i[:, None] * P + offs_j[None, :]  # (M_PAD, P) channel index i * P + j
    mask_k = offs_i[:, None] < M_H
    mask = (offs_m[:, None, None] < M) & mask_k[None, :, :]
    row_off = offs_m[:, None, None].to(tl.int64) * stride_xm
    x = tl.load(x_ptr + row_off + offs_k[None, :, :], mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, M_PAD, P)
    v = tl.load(signs_ptr + offs_k, mask=mask_k, other=0.0) * inv_sqrt_k
    if HAS_SMOOTH:
        v = v * tl.load(smooth_ptr + offs_k, mask=mask_k, other=0.0)
    x = x * v[None, :, :]

    # X H_p: rows of length P times the (P, P) Sylvester matrix.
    hp = tl.load(hp_ptr + offs_j[:, None] * P + offs_j[None, :])
    y = _dot_split(tl.reshape(x, (BLOCK_M * M_PAD, P)), hp, EXACT_FP32)
    if M_PAD > 1:
        # H_m^T Y: move the Paley axis last, then (rows * P, M_PAD) @ H_m (zero-padded rows/cols).
        y = tl.permute(tl.reshape(y, (BLOCK_M, M_PAD, P)), (0, 2, 1))
        hm = tl.load(hm_ptr + offs_i[:, None] * M_PAD + offs_i[None, :])
        y = _dot_split(tl.reshape(y, (BLOCK_M * P, M_PAD)), hm, EXACT_FP32)
        y = tl.permute(tl.reshape(y, (BLOCK_M, P, M_PAD)), (0, 2, 1))
    y = tl.reshape(y, (BLOCK_M, M_PAD, P))

    absmax = tl.max(tl.max(tl.abs(y), axis=2), axis=1)  # padded channels are exactly 0
    scale = tl.maximum(tl.math.div_rn(absmax, QMAX), MIN_S)  # (BLOCK_M,)
    codes = _round_codes(y, scale[:, None, None], QMAX, FP8)
    out_off = offs_m[:, None, None].to(tl.int64) * stride_cm
    tl.store(codes_ptr + out_off + offs_k[None, :, :], codes, mask=mask)
    tl.store(scale_ptr + offs_m, scale, mask=offs_m < M)


# ----------------------------------------------------------------------------------------- launcher
_HADAMARD_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _hadamard_operands(m: int, p: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """bf16 ``H_p`` (p, p) and zero-padded ``H_m`` (m_pad, m_pad), cached per device (built once, off the hot path)."""
    m_pad = triton.next_power_of_2(m) if m > 1 else 1
    key = (m, p, str(device))
    if key not in _HADAMARD_CACHE:
        hp = torch.ones(1, 1, dtype=torch.float64)
        while hp.shape[0] < p:
            hp = torch.kron(hp, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
        hm = torch.zeros(max(m_pad, 1), max(m_pad, 1), dtype=torch.float64)
        hm[:m, :m] = paley_hadamard(m)
        _HADAMARD_CACHE[key] = (hp.to(device, torch.bfloat16), hm.to(device, torch.bfloat16))
    hp, hm = _HADAMARD_CACHE[key]
    return hp, hm, m_pad


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def rotation_supported(k: int, rot_m: int) -> bool:
    """Whether the fused kernel can apply the ``(H_m ⊗ H_p)`` rotation of width ``k`` (else use the reference)."""
    if rot_m < 1 or k % rot_m:
        return False
    p = k // rot_m
    m_pad = triton.next_power_of_2(rot_m) if rot_m > 1 else 1
    return p >= 16 and p & (p - 1) == 0 and (m_pad == 1 or m_pad >= 16) and m_pad * p <= MAX_ROW_ELEMENTS


def plain_supported(k: int) -> bool:
    return triton.next_power_of_2(k) <= MAX_ROW_ELEMENTS


def quantize_activation(
    x: torch.Tensor,
    bits: int,
    smooth_inv: torch.Tensor | None = None,
    rot_signs: torch.Tensor | None = None,
    rot_m: int = 1,
    fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``quantize_per_token(balance(x))``: x (M, K) → codes (M, K) int8 (fp8 e4m3 if ``fp8``), scale (M, 1) f32.

    ``bits`` is ignored when ``fp8`` (scale = absmax / 448). The caller checks ``*_supported`` first.
    """
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be a 2-D tensor with contiguous rows, got shape {tuple(x.shape)}")
    m_rows, k = x.shape
    qmax = FP8_E4M3_MAX if fp8 else float(signed_range(bits, symmetric=True)[1])
    codes = torch.empty(m_rows, k, device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    scale = torch.empty(m_rows, 1, device=x.device, dtype=torch.float32)
    smooth = smooth_inv if smooth_inv is not None else scale  # dummy pointer when unused
    common = dict(HAS_SMOOTH=smooth_inv is not None, QMAX=qmax, MIN_S=MIN_SCALE, FP8=fp8)
    if rot_signs is None:
        block_m, block_k, warps = _plain_config(k)
        grid = (triton.cdiv(m_rows, block_m),)
        _act_quant_plain_kernel[grid](
            x, smooth, codes, scale, m_rows, k, x.stride(0), codes.stride(0),
            BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps, **common,
        )
        return codes, scale
    p = k // rot_m
    hp, hm, m_pad = _hadamard_operands(rot_m, p, x.device)
    block_m, warps = _rotate_config(m_pad, p)
    grid = (triton.cdiv(m_rows, block_m),)
    _act_quant_rotate_kernel[grid](
        x, smooth, rot_signs, hp, hm, codes, scale, m_rows, k, x.stride(0), codes.stride(0), 1.0 / math.sqrt(k),
        M_H=rot_m, M_PAD=m_pad, P=p, BLOCK_M=block_m, EXACT_FP32=_interpreted(), num_warps=warps, **common,
    )
    return codes, scale
