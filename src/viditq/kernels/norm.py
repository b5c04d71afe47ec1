"""LayerNorm + adaLN modulation in one pass (Triton), and its PyTorch reference.

``y = (LN(x) * weight + bias) * (1 + scale[b]) + shift[b]`` for x (B, N, C): what CogVideoX's
``CogVideoXLayerNormZero`` computes with three kernels (LayerNorm, multiply, add), each reading and writing the
whole activation. Statistics and arithmetic in float32, one rounding to x's dtype at the end (the eager model
rounds after the LayerNorm and after each elementwise op, so the two agree to bf16 rounding).

One program per ``BLOCK_M`` rows of C channels held in registers (C padded to a power of two, at most 16384).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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


@triton.jit
def _ln_modulate_kernel(
    x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, y_ptr, rows, tokens, stride_sb, stride_hb, eps,
    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
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
    tl.store(y_ptr + ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


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
    if rows == 0:
        return y
    block_c = triton.next_power_of_2(c)
    block_m = max(1, min(16, 4096 // block_c))
    dummy = y
    _ln_modulate_kernel[(triton.cdiv(rows, block_m),)](
        x, dummy if weight is None else weight, dummy if bias is None else bias,
        dummy if scale is None else scale, dummy if shift is None else shift, y, rows, n,
        0 if scale is None else scale.stride(0), 0 if shift is None else shift.stride(0), eps,
        C=c, BLOCK_C=block_c, BLOCK_M=block_m, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, num_warps=4 if block_m * block_c <= 4096 else 8,
    )
    return y
