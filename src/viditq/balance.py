"""Static-dynamic channel balancing (ViDiT-Q): smoothing scales from calibration, then a Hadamard rotation.

The static part of the channel imbalance (from the pretrained adaLN scale-shift table) is moved into the weights
by per-channel smoothing ``s = max|X|^alpha / max|W|^(1-alpha)``; what varies with the timestep is spread across
channels by a randomized Hadamard rotation. Each layer keeps the rotation where it cuts the calibration output error
by at least ``BalanceSpec.rotate_min_gain`` (it costs a transform per call at run time), then we try
every candidate alpha (and no smoothing) and keep the one whose quantized layer reproduces the float layer best on
the calibration rows -- measured with the very QuantLinear that will be deployed, so the search optimizes the real
numerics.
"""
from __future__ import annotations

import dataclasses
import zlib

import torch
from torch import nn

from .calibrate import LayerStats
from .config import BalanceSpec
from .layers import LayerSpec, QuantLinear
from .quant.hadamard import hadamard_factors, random_orthogonal, random_signs, rotation_block

# Channels whose calibration range (or weight column) is exactly zero would give 0/0 scales; they get this floor.
MIN_CHANNEL_RANGE = 1e-5
# Keep smoothing factors within a sane dynamic range so that neither side overflows fp16/bf16.
MAX_SMOOTH = 1e4


def smoothing_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel smoothing factors (K,): activations are divided by them, weight columns multiplied."""
    a = act_absmax.float().clamp_min(MIN_CHANNEL_RANGE)
    w = weight.detach().float().abs().amax(0).clamp_min(MIN_CHANNEL_RANGE)  # (K,) column absmax
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    return s.clamp(1.0 / MAX_SMOOTH, MAX_SMOOTH)


def layer_seed(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) + 1_000_003 * seed) % (2**31)


def make_rotation(in_features: int, seed: int, max_block: int | None = None) -> tuple[torch.Tensor, int, int]:
    """(signs (K,), m, block) of a randomized Hadamard rotation (block-diagonal with ``block`` > 0, see
    ``quant.hadamard``), or (dense orthogonal (K, K), 0, 0) if none exists."""
    block = rotation_block(in_features, max_block)
    if block:
        return random_signs(in_features, seed), 1, block
    factors = hadamard_factors(in_features)
    if factors is None:
        return random_orthogonal(in_features, seed), 0, 0
    return random_signs(in_features, seed), factors[0], 0


def static_act_scale(layer: QuantLinear, rows: torch.Tensor) -> torch.Tensor:
    """Per-tensor activation scale from the calibration rows (after balancing), for the static baseline."""
    qmax = 2 ** (layer.spec.act_bits - 1) - 1
    return (layer.balance(rows).abs().amax() / qmax).clamp_min(1e-8)


def concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One linear with the members' output rows stacked (N = sum of N_i), for a joint balancing search."""
    first = linears[0]
    n = sum(lin.out_features for lin in linears)
    has_bias = any(lin.bias is not None for lin in linears)
    cat = nn.Linear(first.in_features, n, bias=has_bias, device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        cat.weight.copy_(torch.cat([lin.weight.detach() for lin in linears]))
        if has_bias:
            cat.bias.copy_(torch.cat([lin.bias.detach() if lin.bias is not None else
                                      torch.zeros(lin.out_features, device=first.weight.device,
                                                  dtype=first.weight.dtype) for lin in linears]))
    return cat


PER_ROW_BUFFERS = ("weight_codes", "weight_scale", "weight_zero", "bias", "stage_scale")


def split_quant_linear(layer: QuantLinear, linears: list[nn.Linear], group: str) -> list[QuantLinear]:
    """Cut a QuantLinear built on :func:`concat_linears` back into one layer per member (rows of the weight
    codes, scales, zero points and bias), each with the shared balancing tensors and ``input_group=group``.

    Weights are quantized per output row (or per row group along K), so every member keeps exactly the codes the
    joint layer had."""
    out, row = [], 0
    for lin in linears:
        n = lin.out_features
        spec = dataclasses.replace(layer.spec, out_features=n, bias=lin.bias is not None, input_group=group)
        part = QuantLinear(spec, out_dtype=layer.float_dtype, device=layer.weight_codes.device)
        with torch.no_grad():
            for name, buf in part.named_buffers():
                src = getattr(layer, name)
                buf.copy_(src[row:row + n] if name in PER_ROW_BUFFERS else src)
        out.append(part)
        row += n
    return out


def build_quant_linear(
    linear: nn.Linear, spec: LayerSpec, stats: LayerStats, balance: BalanceSpec | None, name: str, seed: int
) -> QuantLinear:
    """Quantize ``linear`` with balancing chosen on the calibration rows (see module docstring)."""
    rows = stats.sample.to(linear.weight.device)
    rotation, rot_m, rot_block = (None, 1, 0)
    if balance is not None and balance.rotate:
        rotation, rot_m, rot_block = make_rotation(linear.in_features, layer_seed(name, seed), balance.rotate_block)
        rotation = rotation.to(linear.weight.device)

    with torch.no_grad():
        reference = linear(rows.to(linear.weight.dtype)).float()

        def candidate(alpha: float | None, rotate: bool) -> tuple[QuantLinear, float]:
            smooth = None if alpha is None else smoothing_scales(stats.absmax.to(rows.device), linear.weight, alpha)
            cand_spec = dataclasses.replace(spec, smooth=smooth is not None, rotate=rotate,
                                            rot_m=rot_m if rotate else 1, rot_block=rot_block if rotate else 0,
                                            alpha=alpha)
            layer = QuantLinear.from_linear(linear, cand_spec, smooth=smooth, rotation=rotation if rotate else None)
            if cand_spec.act_static:
                layer.act_scale.copy_(static_act_scale(layer, rows))
            err = (layer(rows.to(linear.weight.dtype)).float() - reference).pow(2).mean().item()
            return layer, err

        # The rotation costs an online transform per call, so a layer keeps it only where it cuts the calibration
        # output error by at least ``rotate_min_gain`` (outlier channels: 90 % and more; Gaussian-like weights
        # and activations: about nothing).
        best, best_err = candidate(None, False)
        rotate = False
        if rotation is not None:
            rotated, rotated_err = candidate(None, True)
            if rotated_err < best_err * (1.0 - balance.rotate_min_gain):
                best, best_err, rotate = rotated, rotated_err, True
        if balance is not None and balance.smooth:
            for alpha in balance.alphas:
                layer, err = candidate(alpha, rotate)
                if err < best_err:
                    best, best_err = layer, err
    return best
