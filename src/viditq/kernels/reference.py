"""PyTorch reference implementations of every kernel entry point (any device, float32 math).

These define the numerics; the Triton kernels must match them. Shapes:
  x (M, K) float; act codes int8 or float8_e4m3fn (M, K); act scale float32 (M, 1);
  weight codes int8 / float8_e4m3fn (N, K) or packed int4 uint8 (N, K // 2); weight scale (N, G);
  weight zero int8 (N, G) | None. Packed int4 weights are staged as per-channel int8 before the product
  (:func:`stage_int4`), as the GPU path does.
"""
from __future__ import annotations

import torch

from ..quant.hadamard import hadamard_rotate
from ..quant.quantizers import (
    MIN_SCALE, dequantize_weight, quantize_per_token, quantize_per_token_fp8, unpack_int4,
)


def balance_activation(
    x: torch.Tensor, smooth_inv: torch.Tensor | None, rot_signs: torch.Tensor | None, rot_m: int, rot_block: int = 0
) -> torch.Tensor:
    """Activation side of channel balancing: ``(x * smooth_inv) @ R`` in float32."""
    y = x.float()
    if smooth_inv is not None:
        y = y * smooth_inv
    if rot_signs is not None:
        y = hadamard_rotate(y, rot_signs, rot_m, rot_block)
    return y


def quantize_activation(
    x: torch.Tensor,
    bits: int,
    smooth_inv: torch.Tensor | None = None,
    rot_signs: torch.Tensor | None = None,
    rot_m: int = 1,
    rot_block: int = 0,
    fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balance then quantize per token: (M, K) → int8 codes (M, K) (fp8 e4m3 values if ``fp8``; ``bits`` is then
    ignored), float32 scales (M, 1)."""
    y = balance_activation(x, smooth_inv, rot_signs, rot_m, rot_block)
    return quantize_per_token_fp8(y) if fp8 else quantize_per_token(y, bits)


def unpack_weight_codes(w: torch.Tensor, packed_int4: bool) -> torch.Tensor:
    return unpack_int4(w) if packed_int4 else w


def stage_int4(
    w: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed int4 (N, K // 2) with scales (N, G) [and zero points] → per-channel int8 codes (N, K) and float32
    scales (N, 1): the weights the integer product of a packed int4 layer uses.

    Per channel (G = 1) this is exact: codes ``q - zero`` (in [-15, 15]) with the layer's scale. With groups, the
    dequantized row ``(q - zero) * scale`` (exact in float32) is requantized per channel to int8: step
    ``absmax / 127`` and codes ``round_half_even(deq / step)``, both divisions IEEE in float64 (tensor by tensor:
    PyTorch on CUDA turns a division by a Python scalar into a product with its reciprocal); the float32 scale
    is the step rounded, floored at ``MIN_SCALE``. An error of at most half an int8 step of the row's absmax per
    weight, against the int4 group step it sits on."""
    codes = unpack_int4(w)
    n, k = codes.shape
    if group_size == k:
        staged = codes if w_zero is None else codes - w_zero.to(torch.int8)
        return staged.to(torch.int8), w_scale.float().reshape(n, 1)
    deq = dequantize_weight(codes, w_scale, w_zero, group_size)
    row_max = deq.abs().amax(dim=1, keepdim=True).double()  # (N, 1)
    div127 = torch.full_like(row_max, 127.0)
    step = torch.where(row_max > 0, row_max, 1.0) / div127
    staged = torch.round(deq.double() / step).clamp_(-127, 127).to(torch.int8)
    return staged, (row_max / div127).float().clamp_min(MIN_SCALE)


def int_linear(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    group_size: int,
    packed_int4: bool,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str | None = None,
) -> torch.Tensor:
    """``y = (x_codes * x_scale) @ dequant(W)^T + bias`` → (M, N) in ``out_dtype``; ``activation="gelu_tanh"``:
    then ``F.gelu(y, approximate="tanh")``, in float32 before the cast. Packed int4 ``w`` is staged first."""
    if packed_int4:
        w, w_scale = stage_int4(w, w_scale, w_zero, group_size)
        w_zero, group_size = None, x_codes.shape[1]
    wf = dequantize_weight(w, w_scale, w_zero, group_size)
    y = (x_codes.float() @ wf.t()) * x_scale
    if bias is not None:
        y = y + bias.float()
    return apply_activation(y, activation).to(out_dtype)


def apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The activation a GEMM epilogue may fuse: None or ``"gelu_tanh"``."""
    if activation is None:
        return y
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(y, approximate="tanh")
    raise ValueError(f"unknown fused activation {activation!r} (None or 'gelu_tanh')")


# ----------------------------------------------------------------------------------------- fp8 e4m3 variant
# ``int_linear`` takes fp8 codes as they are (``codes.float()``); ``quantize_per_token_fp8`` is the quantizer.


def quantize_activation_fp8(
    x: torch.Tensor, smooth_inv: torch.Tensor | None = None, rot_signs: torch.Tensor | None = None, rot_m: int = 1,
    rot_block: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balance then quantize per token to fp8 e4m3 (the fp8 twin of :func:`quantize_activation`)."""
    return quantize_activation(x, 8, smooth_inv, rot_signs, rot_m, rot_block, fp8=True)


def fp8_linear(
    a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(a * a_scale) @ (w * w_scale)^T + bias`` for fp8 a (M, K), w (N, K), scales (M, 1) and (N, 1)."""
    return int_linear(a, a_scale, w, w_scale.reshape(-1, 1), None, a.shape[1], False, bias, out_dtype)
