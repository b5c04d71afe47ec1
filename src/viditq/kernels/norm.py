"""LayerNorm + adaLN modulation in one pass (Triton), and its PyTorch reference.

``y = (LN(x) * weight + bias) * (1 + scale[b]) + shift[b]`` for x (B, N, C): what CogVideoX's
``CogVideoXLayerNormZero`` computes with three kernels (LayerNorm, multiply, add), each reading and writing the
whole activation. Statistics and arithmetic in float32, one rounding to x's dtype at the end (the eager model
rounds after the LayerNorm and after each elementwise op, so the two agree to bf16 rounding).

One program per ``BLOCK_M`` rows of C channels held in registers (C as a power-of-two main tile plus a
power-of-two tail, ``act_quant.split_width``; at most 16384).
:func:`layer_norm_modulate_quant` also quantizes the rounded output per token for the quantized layer it feeds
(the codes of ``act_quant``'s plain kernel), while the row is in registers. ``prefix``: rows of a second input
with its own modulation go first in each batch entry — the norm of a concatenation (CogVideoX's text and video
tokens) without the concatenation.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..quant.quantizers import MIN_SCALE, signed_range
from . import pdl
from .act_quant import FP8_E4M3_MAX, _FAST_ROUND_OK, _row_scale, _store_codes, split_width

MAX_CHANNELS = 16384
Prefix = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # x0 (B, N0, C), its scale and shift


def layer_norm_modulate_reference(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, scale: torch.Tensor | None,
    shift: torch.Tensor | None, eps: float, prefix: Prefix | None = None,
) -> torch.Tensor:
    """x (B, N, C); weight, bias (C,) or None; scale, shift (B, C) or None → (B, N, C) in x's dtype.
    ``prefix = (x0, scale0, shift0)``: the result for ``torch.cat([x0, x], dim=1)``, x0 with its own modulation."""
    if prefix is not None:
        x0, scale0, shift0 = prefix
        return torch.cat([layer_norm_modulate_reference(x0, weight, bias, scale0, shift0, eps),
                          layer_norm_modulate_reference(x, weight, bias, scale, shift, eps)], dim=1)
    y = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], None if weight is None else weight.float(),
                                       None if bias is None else bias.float(), eps)
    if scale is not None:
        y = y * (1.0 + scale.float()[:, None, :])
    if shift is not None:
        y = y + shift.float()[:, None, :]
    return y.to(x.dtype)


def layer_norm_modulate_quant_reference(x, weight, bias, scale, shift, eps, bits, smooth_inv, fp8, prefix=None):
    """:func:`layer_norm_modulate_reference`, then ``reference.quantize_activation`` of its output (rows)."""
    from .reference import quantize_activation

    y = layer_norm_modulate_reference(x, weight, bias, scale, shift, eps, prefix)
    codes, qscale = quantize_activation(y.reshape(-1, y.shape[-1]), bits, smooth_inv, None, 1, 0, fp8)
    return y, codes, qscale


@triton.jit
def _modulate_part(xc, rstd, offs_c, c_ok, mask, w_ptr, b_ptr, scale_rows, shift_rows,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Channels ``offs_c`` of the normalized rows: ``(xc * rstd * w + b) * (1 + scale) + shift``, float32, with
    each row's scale and shift vectors at ``scale_rows`` / ``shift_rows`` (pointers, one per row)."""
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        y = y * (1.0 + tl.load(scale_rows[:, None] + offs_c[None, :], mask=mask, other=0.0).to(tl.float32))
    if HAS_SHIFT:
        y = y + tl.load(shift_rows[:, None] + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _ln_modulate_kernel(
    x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, y_ptr, rows, tokens, stride_sb, stride_hb, eps,
    smooth_ptr, codes_ptr, qscale_ptr, x0_ptr, scale0_ptr, shift0_ptr, prefix, stride_s0b, stride_h0b, stride_xb,
    stride_x0b,
    C: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BLOCK_M: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, WRITE_Y: tl.constexpr = True,
    QUANT: tl.constexpr = False, HAS_SMOOTH: tl.constexpr = False,
    QMAX: tl.constexpr = 127.0, MIN_S: tl.constexpr = 1e-8, FP8: tl.constexpr = False,
    CUDA_SCALAR_DIV: tl.constexpr = False, FAST_ROUND: tl.constexpr = False, PDL: tl.constexpr = False,
    HAS_PREFIX: tl.constexpr = False,
):
    """Rows ``BLOCK_M`` at a time, their C channels as a main tile of KA lanes and a tail tile of KB (0: none;
    ``act_quant.split_width``: 1152 = 1024 + 128 instead of 2048 padded lanes). Outputs are (rows, C) with
    ``tokens`` rows per batch entry; ``HAS_PREFIX``: the first ``prefix`` of them come from ``x0`` (with
    ``scale0`` / ``shift0``), the rest from ``x`` — the norm of ``torch.cat([x0, x], dim=1)``; x0 and x then have
    batch strides ``stride_x0b`` / ``stride_xb`` (contiguous rows: they may be the two parts of one sequence)."""
    pdl.enter(PDL)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows
    rows_x = offs_m.to(tl.int64)[:, None] * C
    batch = (offs_m // tokens).to(tl.int64)
    scale_rows = scale_ptr + batch * stride_sb
    shift_rows = shift_ptr + batch * stride_hb
    if HAS_PREFIX:  # row (batch, t): x0[batch, t] for t < prefix, else x[batch, t - prefix]
        t = (offs_m % tokens).to(tl.int64)
        first = t < prefix
        in_rows = tl.where(first, x0_ptr + batch * stride_x0b + t * C,
                           x_ptr + batch * stride_xb + (t - prefix) * C)[:, None]
        scale_rows = tl.where(first, scale0_ptr + batch * stride_s0b, scale_rows)
        shift_rows = tl.where(first, shift0_ptr + batch * stride_h0b, shift_rows)
    else:
        in_rows = x_ptr + rows_x
    offs_a = tl.arange(0, KA)
    a_ok = offs_a < C
    mask_a = row_ok[:, None] & a_ok[None, :]
    xa = tl.load(in_rows + offs_a[None, :], mask=mask_a, other=0.0, eviction_policy="evict_first")
    xa = xa.to(tl.float32)
    total = tl.sum(xa, axis=1)
    if KB > 0:
        offs_b = KA + tl.arange(0, KB)
        b_ok = offs_b < C
        mask_b = row_ok[:, None] & b_ok[None, :]
        xb = tl.load(in_rows + offs_b[None, :], mask=mask_b, other=0.0, eviction_policy="evict_first")
        xb = xb.to(tl.float32)
        total += tl.sum(xb, axis=1)
    mean = total / C
    xa = tl.where(mask_a, xa - mean[:, None], 0.0)
    sq = tl.sum(xa * xa, axis=1)
    if KB > 0:
        xb = tl.where(mask_b, xb - mean[:, None], 0.0)
        sq += tl.sum(xb * xb, axis=1)
    rstd = 1.0 / tl.sqrt(sq / C + eps)
    ya = _modulate_part(xa, rstd, offs_a, a_ok, mask_a, w_ptr, b_ptr, scale_rows, shift_rows,
                        HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT).to(y_ptr.dtype.element_ty)
    if WRITE_Y:
        tl.store(y_ptr + rows_x + offs_a[None, :], ya, mask=mask_a)
    if KB > 0:
        yb = _modulate_part(xb, rstd, offs_b, b_ok, mask_b, w_ptr, b_ptr, scale_rows, shift_rows,
                            HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT).to(y_ptr.dtype.element_ty)
        if WRITE_Y:
            tl.store(y_ptr + rows_x + offs_b[None, :], yb, mask=mask_b)
    if QUANT:  # per-token quantization of the rounded output, as act_quant's plain kernel computes it
        qa = ya.to(tl.float32)
        if HAS_SMOOTH:
            qa = qa * tl.load(smooth_ptr + offs_a, mask=a_ok, other=0.0)[None, :]
        absmax = tl.max(tl.abs(qa), axis=1)
        if KB > 0:
            qb = yb.to(tl.float32)
            if HAS_SMOOTH:
                qb = qb * tl.load(smooth_ptr + offs_b, mask=b_ok, other=0.0)[None, :]
            absmax = tl.maximum(absmax, tl.max(tl.abs(qb), axis=1))
        qscale = _row_scale(absmax, QMAX, MIN_S, CUDA_SCALAR_DIV)
        _store_codes(codes_ptr + rows_x + offs_a[None, :], qa, qscale[:, None], mask_a, QMAX, FP8, FAST_ROUND)
        if KB > 0:
            _store_codes(codes_ptr + rows_x + offs_b[None, :], qb, qscale[:, None], mask_b, QMAX, FP8, FAST_ROUND)
        tl.store(qscale_ptr + offs_m, qscale, mask=row_ok)


def launch_shape(c: int) -> tuple[int, int]:
    """(rows per program, warps) for rows of ``c`` channels: ``VIDITQ_NORM_CONFIG="block_m,num_warps"`` (a
    benchmark sweep), else one warp per row at 1024-1152 lanes (PixArt's width), other widths ~4k lanes per
    program."""
    env = os.environ.get("VIDITQ_NORM_CONFIG")
    if env:
        block_m, num_warps = (int(v) for v in env.split(","))
        return block_m, num_warps
    lanes = sum(split_width(c))
    if 1024 <= lanes <= 1152:  # one warp per row: H200 sweep at 8192 x 1152 (session 9), 14.2 us vs 18.2 for
        return 1, 1            # (2, 4); narrow rows (per-head q/k norms, 64 wide) keep many rows per program
    block_m = 1 << max(0, min(4, (4096 // lanes).bit_length() - 1))  # power of two, at most 16
    return block_m, 4 if block_m * lanes <= 4096 else 8


def supported(x: torch.Tensor) -> bool:
    return x.dim() == 3 and x.is_contiguous() and 1 <= x.shape[-1] <= MAX_CHANNELS


def rows_contiguous(x: torch.Tensor) -> bool:
    """(B, N, C) whose N x C rows are contiguous in each batch entry (any batch stride): what a prefix call takes,
    e.g. the text and the video part of one sequence (views, not copies)."""
    return x.dim() == 3 and x.stride(2) == 1 and (x.shape[1] <= 1 or x.stride(1) == x.shape[2]) \
        and 1 <= x.shape[-1] <= MAX_CHANNELS


def _row_major_order(x: torch.Tensor) -> list[int] | None:
    """A permutation of x's leading dims (last dim kept last) under which x is contiguous, or None."""
    order = sorted(range(x.dim() - 1), key=lambda d: -x.stride(d)) + [x.dim() - 1]
    return order if x.permute(order).is_contiguous() else None


def layer_norm_supported(x: torch.Tensor) -> bool:
    return x.dim() >= 2 and 1 <= x.shape[-1] <= MAX_CHANNELS and _row_major_order(x) is not None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.layer_norm`` over the last dim with the fused kernel, for any x whose leading dims are a permutation of
    a contiguous layout (per-head q/k norms see (B, H, N, D) views of (B, N, H, D) tensors): the rows are
    normalized where they lie and the result has x's layout."""
    order = _row_major_order(x)
    if order is None or not 1 <= x.shape[-1] <= MAX_CHANNELS:
        raise ValueError(f"layer_norm: no row-major order of shape {tuple(x.shape)} strides {x.stride()}")
    xp = x.permute(order)
    y = layer_norm_modulate(xp.reshape(1, -1, x.shape[-1]), weight, bias, None, None, eps)
    inverse = [order.index(d) for d in range(x.dim())]
    return y.view(xp.shape).permute(inverse)


def layer_norm_modulate(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, scale: torch.Tensor | None,
    shift: torch.Tensor | None, eps: float, prefix: Prefix | None = None,
) -> torch.Tensor:
    """The fused kernel; same arguments and result as :func:`layer_norm_modulate_reference`. ``scale`` and
    ``shift`` may be strided views (chunks of one projection) as long as their channels are contiguous.
    ``prefix = (x0, scale0, shift0)``: the result is that of ``torch.cat([x0, x], dim=1)``, x0's rows modulated
    by its own scale and shift (CogVideoX's text and video tokens), without the concatenation's copy; x0 and x may
    then have any batch stride (:func:`rows_contiguous`: e.g. the two parts of one sequence)."""
    return _launch(x, weight, bias, scale, shift, eps, prefix=prefix)[0]


def layer_norm_modulate_quant(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, scale: torch.Tensor | None,
    shift: torch.Tensor | None, eps: float, bits: int, smooth_inv: torch.Tensor | None, fp8: bool,
    write_y: bool = True, prefix: Prefix | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`layer_norm_modulate` and the per-token quantization of its output in the same pass: (y (B, N, C)
    in x's dtype, codes (B·N, C) int8 — fp8 e4m3 if ``fp8`` — , scales (B·N, 1) float32), the codes being what
    ``act_quant.quantize_activation(y.view(-1, C), bits, smooth_inv, fp8=fp8)`` gives for this y: the producer
    of a quantized layer's input writes its codes too, and the quantization pass that would read y again goes.
    ``write_y=False`` skips the store of y (40 % of the traffic): the returned y is then *uninitialized*, for
    callers whose every reader of y takes the codes instead (``viditq.fusion``). ``prefix``: as in
    :func:`layer_norm_modulate` (then N counts x0's tokens too)."""
    c = x.shape[-1]
    if smooth_inv is not None and (smooth_inv.shape != (c,) or smooth_inv.dtype != torch.float32
                                   or not smooth_inv.is_contiguous()):
        raise ValueError(f"smooth_inv must be a contiguous float32 vector of {c} channels, got "
                         f"{tuple(smooth_inv.shape)} {smooth_inv.dtype}")
    return _launch(x, weight, bias, scale, shift, eps, quant=(bits, smooth_inv, fp8), write_y=write_y, prefix=prefix)


def _check_modulation(name: str, t: torch.Tensor | None, b: int, c: int) -> int:
    """``t``'s batch stride, after checking it is None or (b, c) with contiguous channels."""
    if t is None:
        return 0
    if t.shape != (b, c) or t.stride(-1) != 1:
        raise ValueError(f"{name} must be ({b}, {c}) with contiguous channels, got {tuple(t.shape)} "
                         f"strides {t.stride()}")
    return t.stride(0)


def _launch(x, weight, bias, scale, shift, eps, quant=None, write_y=True, prefix=None):
    if not (supported(x) or (prefix is not None and rows_contiguous(x))):
        raise ValueError(f"layer_norm_modulate needs a contiguous (B, N, C) tensor with C <= {MAX_CHANNELS} (with a "
                         f"prefix: contiguous rows), got shape {tuple(x.shape)} strides {x.stride()}")
    b, n, c = x.shape
    strides = [_check_modulation("scale", scale, b, c), _check_modulation("shift", shift, b, c)] * 2
    x0, scale0, shift0, n0 = x, scale, shift, 0  # (no prefix: placeholders the kernel does not read)
    if prefix is not None:
        x0, scale0, shift0 = prefix
        if not rows_contiguous(x0) or x0.shape[0] != b or x0.shape[2] != c or x0.dtype != x.dtype \
                or x0.device != x.device:
            raise ValueError(f"the prefix must be a ({b}, N0, {c}) {x.dtype} tensor with contiguous rows on "
                             f"{x.device} like x, got shape {tuple(x0.shape)} strides {x0.stride()} {x0.dtype} on "
                             f"{x0.device}")
        if (scale0 is None) != (scale is None) or (shift0 is None) != (shift is None):
            raise ValueError("the prefix needs a scale and a shift where x has them, and only there")
        for name, t, t0 in (("scale", scale, scale0), ("shift", shift, shift0)):
            if t is not None and (t0.dtype != t.dtype or t0.device != t.device):
                raise ValueError(f"the prefix's {name} must be {t.dtype} on {t.device} like x's, got "
                                 f"{t0.dtype} on {t0.device}")
        n0 = x0.shape[1]
        strides[2:] = _check_modulation("prefix scale", scale0, b, c), _check_modulation("prefix shift", shift0, b, c)
    tokens = n0 + n
    y = torch.empty(b, tokens, c, device=x.device, dtype=x.dtype)
    rows = b * tokens
    codes = qscale = smooth = None
    extra = {}
    if quant is not None:
        bits, smooth, fp8 = quant
        codes = torch.empty(rows, c, device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
        qscale = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
        on_gpu = x.device.type == "cuda"
        extra = dict(QUANT=True, HAS_SMOOTH=smooth is not None, MIN_S=MIN_SCALE, FP8=fp8,
                     QMAX=FP8_E4M3_MAX if fp8 else float(signed_range(bits, symmetric=True)[1]),
                     CUDA_SCALAR_DIV=on_gpu, FAST_ROUND=on_gpu and _FAST_ROUND_OK[0])
    if rows == 0:
        return y, codes, qscale
    ka, kb = split_width(c)
    block_m, num_warps = launch_shape(c)
    dummy = y
    _ln_modulate_kernel[(triton.cdiv(rows, block_m),)](
        x, dummy if weight is None else weight, dummy if bias is None else bias,
        dummy if scale is None else scale, dummy if shift is None else shift, y, rows, tokens, strides[0],
        strides[1], eps, dummy if smooth is None else smooth, dummy if codes is None else codes,
        dummy if qscale is None else qscale, x0, dummy if scale0 is None else scale0,
        dummy if shift0 is None else shift0, n0, strides[2], strides[3], x.stride(0), x0.stride(0),
        C=c, KA=ka, KB=kb, BLOCK_M=block_m, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, WRITE_Y=write_y, HAS_PREFIX=prefix is not None,
        num_warps=num_warps, **extra, **pdl.launch_options(x.device),
    )
    return y, codes, qscale
