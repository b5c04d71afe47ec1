"""Frozen copy of the v3 kernels (commit 29f3781), the baseline of benchmarks/tune_act_quant.py.

Fused per-token activation quantization (Triton): smoothing, online Hadamard rotation, absmax, round.

Programs walk blocks of ``BLOCK_M`` whole rows (grid-stride, next block prefetched); each row is read once from
device memory (bf16/fp16/fp32),
multiplied by ``smooth_inv * signs``, rotated by ``(H_m ⊗ H_p) / sqrt(K)`` in registers, reduced to its absmax and
written as int8 codes (or fp8 e4m3 values) plus one float32 scale. Numerics follow
``reference.quantize_activation`` (round half to even, ``MIN_SCALE`` floor, scale = absmax times the float32
reciprocal of qmax as PyTorch does on CUDA; codes equal to rounding the IEEE quotient, see ``_round_quotient``).

The rotation of a row seen as an ``(m, p)`` matrix ``X`` is ``H_m^T X H_p`` (see ``quant.hadamard``): two small
tensor-core products, ``(rows·m, p) @ H_p`` then ``(rows·p, m) @ H_m``, with ``m`` zero-padded to a power of two.
Operands are split into bf16 high + low halves (±1 matrices are exact in bf16), which keeps ~16 mantissa bits:
far below the int8 step, so codes match the float32 reference except for rare ties at a rounding boundary.
"""
from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from viditq.quant.hadamard import paley_hadamard
from viditq.quant.quantizers import MIN_SCALE, signed_range

FP8_E4M3_MAX = 448.0
MAX_ROW_ELEMENTS = 8192  # one row (padded to powers of two) must fit a program's registers


# ----------------------------------------------------------------------------------------- configs
PROGRAMS_PER_SM = 4  # grid-stride programs per SM; each prefetches its next row block while it computes
_FAST_ROUND_OK = [True]  # cleared if this Triton cannot build the rint + FMA rounding (see quantize_activation)


def _plain_config(k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps): ~8k elements per row block, 16-byte loads along K."""
    block_k = triton.next_power_of_2(k)
    block_m = max(1, min(16, 8192 // block_k))
    return block_m, block_k, 8 if block_k >= 2048 else 4


def _rotate_config(m_pad: int, p: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps): ~8k padded elements per row block, and at least 16 rows in each tensor-core product."""
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
def _store_codes(codes_ptrs, y, scale, mask, QMAX: tl.constexpr, FP8: tl.constexpr, FAST_ROUND: tl.constexpr):
    """Store ``y / scale`` as int8 (rounded half to even, clamped) or fp8 e4m3 (round to nearest even)."""
    inv_scale = 1.0 / scale
    if FP8:
        tl.store(codes_ptrs, tl.clamp(y * inv_scale, -QMAX, QMAX).to(tl.float8e4nv), mask=mask)
    else:
        codes = tl.clamp(_round_quotient(y, scale, inv_scale, FAST_ROUND), -QMAX, QMAX)
        tl.store(codes_ptrs, codes.to(tl.int8), mask=mask)


@triton.jit
def _act_quant_plain_kernel(
    x_ptr, smooth_ptr, codes_ptr, scale_ptr,
    M, K, stride_xm, stride_cm, num_programs,
    HAS_SMOOTH: tl.constexpr, QMAX: tl.constexpr, MIN_S: tl.constexpr, FP8: tl.constexpr,
    CUDA_SCALAR_DIV: tl.constexpr, FAST_ROUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    if HAS_SMOOTH:
        smooth = tl.load(smooth_ptr + offs_k, mask=k_mask, other=0.0)
    # Grid-stride over row blocks: the pipeliner issues the next block's loads before this block's math.
    for block in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_programs, num_stages=NUM_STAGES):
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < M) & k_mask[None, :]
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=mask, other=0.0)
        y = x.to(tl.float32)
        if HAS_SMOOTH:
            y = y * smooth[None, :]
        scale = _row_scale(tl.max(tl.abs(y), axis=1), QMAX, MIN_S, CUDA_SCALAR_DIV)  # (BLOCK_M,)
        codes_ptrs = codes_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_k[None, :]
        _store_codes(codes_ptrs, y, scale[:, None], mask, QMAX, FP8, FAST_ROUND)
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
    M, K, stride_xm, stride_cm, inv_sqrt_k, num_programs,
    HAS_SMOOTH: tl.constexpr, QMAX: tl.constexpr, MIN_S: tl.constexpr, FP8: tl.constexpr,
    CUDA_SCALAR_DIV: tl.constexpr, FAST_ROUND: tl.constexpr, M_H: tl.constexpr, M_PAD: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, EXACT_FP32: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    offs_i = tl.arange(0, M_PAD)  # Paley axis (padded)
    offs_j = tl.arange(0, P)  # power-of-two axis
    offs_k = offs_i[:, None] * P + offs_j[None, :]  # (M_PAD, P) channel index i * P + j
    mask_k = offs_i[:, None] < M_H
    v = tl.load(signs_ptr + offs_k, mask=mask_k, other=0.0) * inv_sqrt_k
    if HAS_SMOOTH:
        v = v * tl.load(smooth_ptr + offs_k, mask=mask_k, other=0.0)
    hp = tl.load(hp_ptr + offs_j[:, None] * P + offs_j[None, :])
    hm = tl.load(hm_ptr + offs_i[:, None] * M_PAD + offs_i[None, :])
    for block in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_programs, num_stages=NUM_STAGES):
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None, None] < M) & mask_k[None, :, :]
        row_off = offs_m[:, None, None].to(tl.int64) * stride_xm
        x = tl.load(x_ptr + row_off + offs_k[None, :, :], mask=mask, other=0.0).to(tl.float32)  # (BM, M_PAD, P)
        x = x * v[None, :, :]
        # X H_p: rows of length P times the (P, P) Sylvester matrix.
        y = _dot_split(tl.reshape(x, (BLOCK_M * M_PAD, P)), hp, EXACT_FP32)
        if M_PAD > 1:
            # H_m^T Y: move the Paley axis last, then (rows * P, M_PAD) @ H_m (zero-padded rows/cols).
            y = tl.permute(tl.reshape(y, (BLOCK_M, M_PAD, P)), (0, 2, 1))
            y = _dot_split(tl.reshape(y, (BLOCK_M * P, M_PAD)), hm, EXACT_FP32)
            y = tl.permute(tl.reshape(y, (BLOCK_M, P, M_PAD)), (0, 2, 1))
        y = tl.reshape(y, (BLOCK_M, M_PAD, P))
        absmax = tl.max(tl.max(tl.abs(y), axis=2), axis=1)  # padded channels are exactly 0
        scale = _row_scale(absmax, QMAX, MIN_S, CUDA_SCALAR_DIV)  # (BLOCK_M,)
        out_off = offs_m[:, None, None].to(tl.int64) * stride_cm
        _store_codes(codes_ptr + out_off + offs_k[None, :, :], y, scale[:, None, None], mask, QMAX, FP8,
                     FAST_ROUND)
        tl.store(scale_ptr + offs_m, scale, mask=offs_m < M)


# ----------------------------------------------------------------------------------------- launcher
_HADAMARD_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    return h


def _kernel_factors(k: int, rot_m: int) -> tuple[int, int]:
    """(m, p) as the kernel applies them. A power-of-two width (rot_m == 1) wider than 128 is split as
    H_k = H_(k/p) ⊗ H_p (Sylvester matrices nest), so both products stay small: p <= 128, m >= 16."""
    p = k // rot_m
    if rot_m == 1 and p > 128:
        p_inner = 128 if p >= 2048 else p // 16
        return p // p_inner, p_inner
    return rot_m, p


def _hadamard_operands(k: int, rot_m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """bf16 ``H_p`` (p, p), zero-padded ``H_m`` (m_pad, m_pad), m, m_pad, p; cached per device."""
    m, p = _kernel_factors(k, rot_m)
    m_pad = triton.next_power_of_2(m) if m > 1 else 1
    key = (k, rot_m, str(device))
    if key not in _HADAMARD_CACHE:
        hm = torch.zeros(m_pad, m_pad, dtype=torch.float64)
        hm[:m, :m] = paley_hadamard(m) if rot_m > 1 else _sylvester(m)
        _HADAMARD_CACHE[key] = (_sylvester(p).to(device, torch.bfloat16), hm.to(device, torch.bfloat16))
    hp, hm = _HADAMARD_CACHE[key]
    return hp, hm, m, m_pad, p


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_SM_COUNT: dict[int, int] = {}


def _grid_size(device: torch.device, num_blocks: int) -> int:
    """Grid-stride programs: a few per SM on the GPU; several blocks per program under the interpreter."""
    if device.type != "cuda":
        return max(1, min(num_blocks, 3))
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return max(1, min(num_blocks, _SM_COUNT[index] * PROGRAMS_PER_SM))


def rotation_supported(k: int, rot_m: int) -> bool:
    """Whether the fused kernel can apply the ``(H_m ⊗ H_p)`` rotation of width ``k`` (else use the reference)."""
    if rot_m < 1 or k % rot_m or (k // rot_m) & (k // rot_m - 1):
        return False
    m, p = _kernel_factors(k, rot_m)
    m_pad = triton.next_power_of_2(m) if m > 1 else 1
    return 16 <= p <= 128 and (m_pad == 1 or m_pad >= 16) and m_pad * p <= MAX_ROW_ELEMENTS


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
    on_gpu = x.device.type == "cuda"
    common = dict(HAS_SMOOTH=smooth_inv is not None, QMAX=qmax, MIN_S=MIN_SCALE, FP8=fp8,
                  CUDA_SCALAR_DIV=on_gpu, FAST_ROUND=on_gpu and _FAST_ROUND_OK[0])
    if m_rows == 0:
        return codes, scale
    try:
        _launch(x, smooth, rot_signs, rot_m, codes, scale, common)
    except triton.CompilationError:
        if not common["FAST_ROUND"]:
            raise
        # The fast rounding (libdevice rint + FMA tie check) was added after the last H100 run; if this Triton
        # cannot build it, use the division path measured there (same codes, slower) from now on.
        warnings.warn("viditq act_quant: fast rounding failed to compile; using IEEE division", stacklevel=2)
        _FAST_ROUND_OK[0] = False
        _launch(x, smooth, rot_signs, rot_m, codes, scale, dict(common, FAST_ROUND=False))
    return codes, scale


def _launch(x, smooth, rot_signs, rot_m, codes, scale, common) -> None:
    m_rows, k = x.shape
    if rot_signs is None:
        block_m, block_k, warps = _plain_config(k)
        programs = _grid_size(x.device, triton.cdiv(m_rows, block_m))
        _act_quant_plain_kernel[(programs,)](
            x, smooth, codes, scale, m_rows, k, x.stride(0), codes.stride(0), programs,
            BLOCK_M=block_m, BLOCK_K=block_k, NUM_STAGES=2, num_warps=warps, **common,
        )
        return
    hp, hm, m_h, m_pad, p = _hadamard_operands(k, rot_m, x.device)
    block_m, warps = _rotate_config(m_pad, p)
    programs = _grid_size(x.device, triton.cdiv(m_rows, block_m))
    _act_quant_rotate_kernel[(programs,)](
        x, smooth, rot_signs, hp, hm, codes, scale, m_rows, k, x.stride(0), codes.stride(0), 1.0 / math.sqrt(k),
        programs, M_H=m_h, M_PAD=m_pad, P=p, BLOCK_M=block_m, EXACT_FP32=_interpreted(), NUM_STAGES=2,
        num_warps=warps, **common,
    )
