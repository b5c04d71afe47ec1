"""PyTorch reference implementations of every kernel entry point (any device, float32 math).

These define the numerics; the Triton kernels must match them. Shapes:
  x (M, K) float; act codes int8 or float8_e4m3fn (M, K); act scale float32 (M, 1);
  weight codes int8 / float8_e4m3fn (N, K) or packed int4 uint8 (N, K // 2); weight scale (N, G);
  weight zero int8 (N, G) | None.
"""
from __future__ import annotations

import torch

from ..quant.hadamard import hadamard_rotate
from ..quant.quantizers import dequantize_weight, quantize_per_token, quantize_per_token_fp8, unpack_int4


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
    then ``F.gelu(y, approximate="tanh")``, in float32 before the cast."""
    wf = dequantize_weight(unpack_weight_codes(w, packed_int4), w_scale, w_zero, group_size)
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
