"""Integer quantizers: pure tensor math, no modules, no I/O.

Conventions used everywhere in viditq (kernels included):

* Codes are *signed* integers held in ``int8`` tensors. A symmetric ``b``-bit quantizer uses codes in
  ``[-(2^(b-1)-1), 2^(b-1)-1]`` and dequantizes as ``code * scale``. An asymmetric one uses
  ``[-2^(b-1), 2^(b-1)-1]`` with a signed integer zero point: ``(code - zero) * scale``. Keeping asymmetric
  codes signed lets one int8 GEMM serve both (the zero point becomes ``zero * rowsum(x_codes)``).
* Weights ``(N, K)`` are quantized per output channel (``group_size=None``) or per group of ``group_size``
  consecutive input channels, giving scales of shape ``(N, K // group_size)``.
* Activations are quantized per token (one scale per row of the flattened ``(M, K)`` input), at run time.
* 4-bit codes are packed two per byte along K: byte ``j`` of a row holds code ``2j`` in its low nibble and
  code ``2j+1`` in its high nibble (two's complement nibbles).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Smallest scale we allow: an all-zero row/channel/group must not divide by zero (and must dequantize to 0).
MIN_SCALE = 1e-8


def signed_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Code range of a signed ``bits``-bit quantizer (restricted to be symmetric when ``symmetric``)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if symmetric else -qmax - 1), qmax


# ----------------------------------------------------------------------------------------- activations
def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token quantization of ``x`` (..., K) → (int8 codes (..., K), float32 scales (..., 1))."""
    lo, qmax = signed_range(bits, symmetric=True)
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(MIN_SCALE)
    codes = torch.round(xf / scale).clamp_(lo, qmax).to(torch.int8)
    return codes, scale


def fake_quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Quantize-dequantize per token; returns float32."""
    codes, scale = quantize_per_token(x, bits)
    return codes.float() * scale


FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp8: ``x`` (..., K) → float8_e4m3fn values (..., K), float32 scales (..., 1) = ``absmax / 448``.

    Values are ``x * (1 / scale)`` (a float32 reciprocal, then a product: what the kernel computes, so codes agree
    exactly), rounded to nearest even by the cast."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX).clamp_min(MIN_SCALE)
    return fp8_codes(xf, scale), scale


def fp8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 / scale)`` in float32, saturated to ±448 and cast (nearest even) to float8_e4m3fn."""
    return (x.float() * scale.reciprocal()).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_per_tensor_static(x: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric per-tensor quantization with a calibrated (static) scale → int8 codes (clamped)."""
    lo, qmax = signed_range(bits, symmetric=True)
    return torch.round(x.float() / scale).clamp_(lo, qmax).to(torch.int8)


# ----------------------------------------------------------------------------------------- weights
@dataclass
class QuantizedWeight:
    """Integer codes of a weight matrix with their scales (and zero points when asymmetric).

    codes: int8 (N, K) unpacked codes; scale: (N, G) float; zero: int8 (N, G) or None; G = K // group_size.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int  # == K for per-output-channel

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.codes, self.scale, self.zero, self.group_size)


def resolve_group_size(in_features: int, group_size: int | None) -> int:
    """The group size actually used for a layer: ``group_size`` if it divides K, else per-channel (K)."""
    if group_size is None or group_size >= in_features or in_features % group_size != 0:
        return in_features
    return group_size


def quantize_weight(
    w: torch.Tensor, bits: int, symmetric: bool = True, group_size: int | None = None
) -> QuantizedWeight:
    """MinMax quantization of ``w`` (N, K) per output channel or per group along K (no clipping error)."""
    n, k = w.shape
    g = resolve_group_size(k, group_size)
    lo, hi = signed_range(bits, symmetric)
    wg = w.detach().float().reshape(n, k // g, g)  # (N, G, group)
    if symmetric:
        scale = (wg.abs().amax(-1) / hi).clamp_min(MIN_SCALE)  # (N, G)
        zero = None
        codes = torch.round(wg / scale[..., None]).clamp_(lo, hi)
    else:
        wmin = wg.amin(-1).clamp(max=0.0)
        wmax = wg.amax(-1).clamp(min=0.0)
        scale = ((wmax - wmin) / (hi - lo)).clamp_min(MIN_SCALE)
        zero = torch.round(lo - wmin / scale).clamp_(lo, hi)  # w == (code - zero) * scale
        codes = torch.round(wg / scale[..., None] + zero[..., None]).clamp_(lo, hi)
        zero = zero.to(torch.int8)
    return QuantizedWeight(codes.reshape(n, k).to(torch.int8), scale, zero, bits, g)


def quantize_weight_fp8(w: torch.Tensor) -> QuantizedWeight:
    """fp8 e4m3 weights (N, K) with one float32 scale per output channel (``absmax / 448``)."""
    codes, scale = quantize_per_token_fp8(w.detach())  # a weight row is quantized like a token
    return QuantizedWeight(codes, scale, None, 8, w.shape[1])


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Float32 weight (N, K) from int8 (or fp8) codes (N, K), scales (N, G) and optional zero points (N, G)."""
    n, k = codes.shape
    c = codes.float().reshape(n, k // group_size, group_size)
    if zero is not None:
        c = c - zero.float()[..., None]
    return (c * scale.float()[..., None]).reshape(n, k)


def fake_quantize_weight(w: torch.Tensor, bits: int, symmetric: bool = True, group_size: int | None = None):
    """Quantize-dequantize ``w``; returns float32."""
    return quantize_weight(w, bits, symmetric, group_size).dequantize()


# ----------------------------------------------------------------------------------------- int4 packing
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in [-8, 7] of shape (N, K) (K even) into uint8 (N, K // 2)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of input channels, got {codes.shape[-1]}")
    if codes.numel() and (codes.min() < -8 or codes.max() > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (N, K // 2) → int8 codes (N, K)."""
    p = packed.to(torch.int16)
    low, high = p & 0xF, (p >> 4) & 0xF
    both = torch.stack([low, high], dim=-1).flatten(-2)  # (N, K) interleaved back
    return torch.where(both >= 8, both - 16, both).to(torch.int8)
