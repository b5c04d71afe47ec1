"""LayerNorm + adaLN modulation in one pass (Triton), and its PyTorch reference.

``y = (LN(x) * weight + bias) * (1 + scale[b]) + shift[b]`` for x (B, N, C): what CogVideoX's
``CogVideoXLayerNormZero`` computes with three kernels (LayerNorm, multiply, add), each reading and writing the
whole activation. Statistics and arithmetic in float32, one rounding to x's dtype at the end (the eager model
rounds after the LayerNorm and after each elementwise op, so the two agree to bf16 rounding).

One program per ``BLOCK_M`` rows of C channels held in registers (C padded to a power of two, at most 16384).
:func:`layer_norm_modulate_quant` also quantizes the rounded output per token for the quantized layer it feeds
(the codes of ``act_quant``'s plain kernel), while the row is in registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.quantizers import MIN_SCALE, signed_range
from .act_quant import FP8_E4M3_MAX, _FAST_ROUND_OK, _row_scale, _store_codes

MAX_CHANNELS = 16384


def layer_norm_modulate_reference(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, scale: torch.Tensor | None,
    shift: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    """x (B, N, C); weight, bias (C,) or None; scale, shift (B, C) or None → (B, N, C) in x's dtype."""
    y = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], None if weight is None else weight.float(),
                                       None if bias is None else bias.float(), eps)
    if scale is not None:
        y = y * (1.0 + scale.float()[:, None, :])
    if shift is not None:
        y = y + shift.float()[:, None, :]
    return y.to(x.dtype)


def layer_norm_modulate_quant_reference(x, weight, bias, scale, shift, eps, bits, smooth_inv, fp8):
    """:func:`layer_norm_modulate_reference`, then ``reference.quantize_activation`` of its output (rows)."""
    from .reference import quantize_activation

    y = layer_norm_modulate_reference(x, weight, bias, scale, shift, eps)
    codes, qscale = quantize_activation(y.reshape(-1, y.shape[-1]), bits, smooth_inv, None, 1, 0, fp8)
    return y, codes, qscale


@triton.jit
def _ln_modulate_kernel(
    x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, y_ptr, rows, tokens, stride_sb, stride_hb, eps,
    smooth_ptr, codes_ptr, qscale_ptr,
    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, QUANT: tl.constexpr = False, HAS_SMOOTH: tl.constexpr = False,
    QMAX: tl.constexpr = 127.0, MIN_S: tl.constexpr = 1e-8, FP8: tl.constexpr = False,
    CUDA_SCALAR_DIV: tl.constexpr = False, FAST_ROUND: tl.constexpr = False,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    row_ok = offs_m < rows
    c_ok = offs_c < C
    mask = row_ok[:, None] & c_ok[None, :]
    ptrs = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    x = tl.load(x_ptr + ptrs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    batch = (offs_m // tokens).to(tl.int64)
    if HAS_SCALE:
        s = tl.load(scale_ptr + batch[:, None] * stride_sb + offs_c[None, :], mask=mask, other=0.0)
        y = y * (1.0 + s.to(tl.float32))
    if HAS_SHIFT:
        h = tl.load(shift_ptr + batch[:, None] * stride_hb + offs_c[None, :], mask=mask, other=0.0)
        y = y + h.to(tl.float32)
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + ptrs, y, mask=mask)
    if QUANT:  # per-token quantization of the rounded output, as act_quant's plain kernel computes it
        yq = y.to(tl.float32)
        if HAS_SMOOTH:
            yq = yq * tl.load(smooth_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
        qscale = _row_scale(tl.max(tl.abs(yq), axis=1), QMAX, MIN_S, CUDA_SCALAR_DIV)
        _store_codes(codes_ptr + ptrs, yq, qscale[:, None], mask, QMAX, FP8, FAST_ROUND)
        tl.store(qscale_ptr + offs_m, qscale, mask=row_ok)


def supported(x: torch.Tensor) -> bool:
    return x.dim() == 3 and x.is_contiguous() and 1 <= x.shape[-1] <= MAX_CHANNELS


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
    shift: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    """The fused kernel; same arguments and result as :func:`layer_norm_modulate_reference`. ``scale`` and
    ``shift`` may be strided views (chunks of one projection) as long as their channels are contiguous."""
    return _launch(x, weight, bias, scale, shift, eps)[0]


def layer_norm_modulate_quant(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, scale: torch.Tensor | None,
    shift: torch.Tensor | None, eps: float, bits: int, smooth_inv: torch.Tensor | None, fp8: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`layer_norm_modulate` and the per-token quantization of its output in the same pass: (y (B, N, C)
    in x's dtype, codes (B·N, C) int8 — fp8 e4m3 if ``fp8`` — , scales (B·N, 1) float32), the codes being what
    ``act_quant.quantize_activation(y.view(-1, C), bits, smooth_inv, fp8=fp8)`` gives for this y: the producer
    of a quantized layer's input writes its codes too, and the quantization pass that would read y again goes."""
    c = x.shape[-1]
    if smooth_inv is not None and (smooth_inv.shape != (c,) or smooth_inv.dtype != torch.float32
                                   or not smooth_inv.is_contiguous()):
        raise ValueError(f"smooth_inv must be a contiguous float32 vector of {c} channels, got "
                         f"{tuple(smooth_inv.shape)} {smooth_inv.dtype}")
    return _launch(x, weight, bias, scale, shift, eps, quant=(bits, smooth_inv, fp8))


def _launch(x, weight, bias, scale, shift, eps, quant=None):
    if not supported(x):
        raise ValueError(f"layer_norm_modulate needs a contiguous (B, N, C) tensor with C <= {MAX_CHANNELS}, "
                         f"got shape {tuple(x.shape)}")
    b, n, c = x.shape
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and (t.shape != (b, c) or t.stride(-1) != 1):
            raise ValueError(f"{name} must be ({b}, {c}) with contiguous channels, got {tuple(t.shape)} "
                             f"strides {t.stride()}")
    y = torch.empty_like(x)
    rows = b * n
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
    block_c = triton.next_power_of_2(c)
    block_m = max(1, min(16, 4096 // block_c))
    dummy = y
    _ln_modulate_kernel[(triton.cdiv(rows, block_m),)](
        x, dummy if weight is None else weight, dummy if bias is None else bias,
        dummy if scale is None else scale, dummy if shift is None else shift, y, rows, n,
        0 if scale is None else scale.stride(0), 0 if shift is None else shift.stride(0), eps,
        dummy if smooth is None else smooth, dummy if codes is None else codes, dummy if qscale is None else qscale,
        C=c, BLOCK_C=block_c, BLOCK_M=block_m, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, num_warps=4 if block_m * block_c <= 4096 else 8,
        **extra,
    )
    return y, codes, qscale
