"""PyTorch reference implementations of every kernel entry point (any device, float32 math).

These define the numerics; the Triton kernels must match them. Shapes:
  x (M, K) float; act codes int8 or float8_e4m3fn (M, K); act scale float32 (M, 1);
  weight codes int8 / float8_e4m3fn (N, K) or packed int4 uint8 (N, K // 2); weight scale (N, G);
  weight zero int8 (N, G) | None. Packed int4 weights are staged as per-channel int8 (fp8 e4m3 with fp8
  activations) before the product (:func:`stage_int4`), as the GPU path does.
"""
from __future__ import annotations

import torch

from ..quant.hadamard import hadamard_rotate
from ..quant.quantizers import (
    FP8_E4M3_MAX, MIN_SCALE, dequantize_weight, fp8_codes, quantize_per_token, quantize_per_token_fp8, unpack_int4,
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


def int4_stage_scale(
    w: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, group_size: int, fp8: bool = False
) -> torch.Tensor:
    """Per-channel scale (N, 1) float32 of a packed int4 weight staged for the GEMM: the row absmax of the
    dequantized weights over 127 (int8 staging) or 448 (fp8 e4m3), floored at ``MIN_SCALE``; per channel (G = 1)
    the layer's own scale. A property of the stored weights: QuantLinear computes it once and keeps it."""
    if group_size == w.shape[1] * 2:
        return w_scale.float().reshape(-1, 1)
    row_max = dequantize_weight(unpack_int4(w), w_scale, w_zero, group_size).abs().amax(dim=1, keepdim=True)
    qmax = torch.full_like(row_max, FP8_E4M3_MAX if fp8 else 127.0)  # tensor / tensor: IEEE on any device
    return (row_max / qmax).clamp_min(MIN_SCALE)


def stage_int4(
    w: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, group_size: int,
    stage_scale: torch.Tensor | None = None, fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed int4 (N, K // 2) with scales (N, G) [and zero points] → per-channel int8 codes (N, K) (fp8 e4m3
    values if ``fp8``) and float32 scales (N, 1): the weights the product of a packed int4 layer uses.

    Per channel (G = 1) this is exact: codes ``q - zero`` (in [-15, 15], exact in e4m3 too) with the layer's
    scale. With groups, the dequantized row ``(q - zero) * scale`` (exact in float32) is requantized per channel
    with ``stage_scale`` (:func:`int4_stage_scale`, computed here if not given): ``deq * (1 / stage_scale)``, a
    float32 product with the exactly rounded reciprocal (what the kernel computes, so codes agree bit for bit),
    rounded half to even and clamped to ±127, or cast to e4m3 (nearest even). At most half an int8 step of the
    row's absmax per weight (fp8: half an e4m3 ulp of the weight), against the int4 group step it sits on."""
    codes = unpack_int4(w)
    n, k = codes.shape
    if group_size == k:
        staged = (codes if w_zero is None else codes - w_zero.to(torch.int8)).to(torch.int8)
        return (staged.float().to(torch.float8_e4m3fn) if fp8 else staged), w_scale.float().reshape(n, 1)
    if stage_scale is None:
        stage_scale = int4_stage_scale(w, w_scale, w_zero, group_size, fp8)
    v = dequantize_weight(codes, w_scale, w_zero, group_size)
    if fp8:
        return fp8_codes(v, stage_scale), stage_scale
    return torch.round(v * stage_scale.reciprocal()).clamp_(-127, 127).to(torch.int8), stage_scale


def gemm_weight(w, w_scale, w_zero, group_size, packed_int4, fp8, stage_scale=None) -> torch.Tensor:
    """The float32 (N, K) weight a GEMM multiplies by: packed int4 staged first (to fp8 for ``fp8`` activations,
    see :func:`stage_int4`), then dequantized."""
    if packed_int4:
        w, w_scale = stage_int4(w, w_scale, w_zero, group_size, stage_scale, fp8)
        w_zero, group_size = None, w.shape[1]
    return dequantize_weight(w, w_scale, w_zero, group_size)


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
    stage_scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    residual_prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = (x_codes * x_scale) @ dequant(W)^T + bias`` → (M, N) in ``out_dtype``; ``activation="gelu_tanh"``:
    then ``F.gelu(y, approximate="tanh")``, in float32 before the cast; ``residual`` (M, N): then
    ``residual + gate[row // (M // B)] * y`` (``gate`` (B, N)) or ``residual + y``, still in float32;
    ``residual_prefix`` (B, T, N): the residual is ``torch.cat([residual_prefix, residual], dim=1)`` and ``gate``
    may be (B, 2, N): ``gate[:, 0]`` for each batch entry's first T rows, ``gate[:, 1]`` for the rest. Packed int4
    ``w`` is staged first (to fp8 when ``x_codes`` are fp8), with ``stage_scale`` if given (see
    :func:`stage_int4`)."""
    wf = gemm_weight(w, w_scale, w_zero, group_size, packed_int4, x_codes.dtype == torch.float8_e4m3fn, stage_scale)
    y = (x_codes.float() @ wf.t()) * x_scale
    if bias is not None:
        y = y + bias.float()
    y = apply_activation(y, activation)
    if residual is None and (gate is not None or residual_prefix is not None):
        raise ValueError("a gate needs a residual" if gate is not None else "a residual prefix needs a residual")
    if gate is not None and gate.dim() == 3 and residual_prefix is None:
        raise ValueError(f"a (B, 2, N) gate needs a residual prefix, got gate {tuple(gate.shape)}")
    if residual_prefix is not None:
        residual = torch.cat([residual_prefix, residual], dim=1).reshape(y.shape)
    if residual is not None:
        if gate is not None:
            g = gate.float()
            if g.dim() == 3:  # (B, 2, N) with a residual prefix → one gate row per token
                rows = torch.arange(y.shape[0] // g.shape[0], device=y.device)[None, :, None]
                g = torch.where(rows < residual_prefix.shape[1], g[:, :1], g[:, 1:])
            else:
                g = g[:, None, :]
            y = (y.view(gate.shape[0], -1, y.shape[-1]) * g).view(y.shape)
        y = y + residual.float()
    return y.to(out_dtype)


GELU_TANH_MIN = 0.17  # |gelu_tanh(y)| <= max(y, 0.17) (its minimum is -0.16997 at y = -0.7518)


def output_range(wf: torch.Tensor, bias: torch.Tensor | None, in_qmax: float, activation: str | None,
                 smooth_inv: torch.Tensor | None) -> torch.Tensor:
    """Constants ``(c1, c2, c3)`` (a float32 tensor (3,) on ``wf``'s device: a tensor, so that compiled code does
    not specialize on each layer's values) of a per-token fp8 scale for a GEMM's output, ``max(c1 * x_scale + c2, c3)``
    (:func:`range_scale`), from a bound on the output row rather than its maximum: with input codes
    ``|q| <= in_qmax`` and per-token scale ``s``, ``|y_mn| <= in_qmax * s * ||W_n||_1 + |b_n|`` (Hölder), the tanh
    GELU keeps ``|y| <= max(y, 0.17)``, ``smooth_inv`` multiplies by at most its maximum. The scale maps the bound
    to 448, so the epilogue quantizes with no row reduction. fp8 only: e4m3 rounds to 2^-4 of each value wherever
    it lies in its normal range (2^-6 .. 448), so a scale ~25x above the row maximum (K = 1152, Gaussian data)
    costs ~1 % of the quantization error (``tests/test_kernels.py``); int8 would lose those bits outright.
    ``wf``: the (N, K) float weight the GEMM multiplies by (:func:`gemm_weight`)."""
    l1 = wf.double().abs().sum(dim=1).max().item() if wf.numel() else 0.0
    b = 0.0 if bias is None or bias.numel() == 0 else bias.double().abs().max().item()
    floor = GELU_TANH_MIN if activation == "gelu_tanh" else 0.0
    s = 1.0 if smooth_inv is None else smooth_inv.double().max().item()
    margin = 1.0 + 2.0 ** -10  # float32 rounding of the GEMM's sums and of the scale itself
    return torch.tensor([in_qmax * l1 * s * margin / FP8_E4M3_MAX, b * s * margin / FP8_E4M3_MAX,
                         max(floor * s * margin / FP8_E4M3_MAX, MIN_SCALE)], dtype=torch.float32, device=wf.device)


def range_scale(x_scale: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """The per-token output scale ``max(c1 * x_scale + c2, c3)`` (M, 1) float32 of :func:`output_range`."""
    bound = bound.to(x_scale.device, torch.float32)
    return torch.maximum(x_scale.float().reshape(-1, 1) * bound[0] + bound[1], bound[2])


def int_linear_quant_out(x_codes, x_scale, w, w_scale, w_zero, group_size, packed_int4, bias, activation,
                         stage_scale, smooth_inv, bound):
    """:func:`int_linear` (float32), times ``smooth_inv`` if given, quantized to fp8 e4m3 per token with the
    :func:`range_scale` scales (saturating): what the GEMM with a quantized output computes → codes (M, N),
    scales (M, 1)."""
    y = int_linear(x_codes, x_scale, w, w_scale, w_zero, group_size, packed_int4, bias, torch.float32, activation,
                   stage_scale)
    if smooth_inv is not None:
        y = y * smooth_inv
    scale = range_scale(x_scale, bound)
    return fp8_codes(y, scale), scale


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
