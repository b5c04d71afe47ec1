"""``torch.library`` custom ops around the Triton kernels, so ``torch.compile`` and CUDA graphs can hold them.

Registering an op only records a schema and two Python functions (no Triton import, no GPU work); the kernel
modules are imported on the first real call.
"""
from __future__ import annotations

from typing import Optional

import torch


def gemm_supported(k: int, group_size: int, packed_int4: bool) -> bool:
    from . import int_gemm

    return int_gemm.supported(k, group_size, packed_int4)


def quantize_activation_impl(
    x: torch.Tensor, bits: int, smooth_inv: Optional[torch.Tensor], rot_signs: Optional[torch.Tensor], rot_m: int,
    rot_block: int, fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    from . import act_quant

    return act_quant.quantize_activation(x, bits, smooth_inv, rot_signs, rot_m, rot_block, fp8=fp8)


def int_linear_impl(
    x_codes: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
    w_zero: Optional[torch.Tensor], group_size: int, packed_int4: bool, bias: Optional[torch.Tensor],
    out_dtype: torch.dtype, activation: Optional[str] = None, stage_scale: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
    residual_prefix: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    from . import int_gemm

    return int_gemm.quant_linear(x_codes, x_scale, w, w_scale, w_zero, group_size, packed_int4, bias, out_dtype,
                                 activation=activation, stage_scale=stage_scale, residual=residual, gate=gate,
                                 residual_prefix=residual_prefix)


@torch.library.custom_op("viditq::quantize_activation", mutates_args=())
def _quantize_activation_op(
    x: torch.Tensor, bits: int, smooth_inv: Optional[torch.Tensor], rot_signs: Optional[torch.Tensor], rot_m: int,
    rot_block: int, fp8: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_activation_impl(x, bits, smooth_inv, rot_signs, rot_m, rot_block, fp8)


@_quantize_activation_op.register_fake
def _(x, bits, smooth_inv, rot_signs, rot_m, rot_block, fp8):
    codes_dtype = torch.float8_e4m3fn if fp8 else torch.int8
    return x.new_empty(x.shape, dtype=codes_dtype), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@torch.library.custom_op("viditq::int_linear", mutates_args=())
def _int_linear_op(
    x_codes: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
    w_zero: Optional[torch.Tensor], group_size: int, packed_int4: bool, bias: Optional[torch.Tensor],
    out_dtype: torch.dtype, activation: Optional[str], stage_scale: Optional[torch.Tensor],
    residual: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
    residual_prefix: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return int_linear_impl(x_codes, x_scale, w, w_scale, w_zero, group_size, packed_int4, bias, out_dtype, activation,
                           stage_scale, residual, gate, residual_prefix)


@_int_linear_op.register_fake
def _(x_codes, x_scale, w, w_scale, w_zero, group_size, packed_int4, bias, out_dtype, activation, stage_scale,
      residual=None, gate=None, residual_prefix=None):
    return x_codes.new_empty((x_codes.shape[0], w.shape[0]), dtype=out_dtype)


def int_linear_quant_out_impl(
    x_codes: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
    w_zero: Optional[torch.Tensor], group_size: int, packed_int4: bool, bias: Optional[torch.Tensor],
    activation: Optional[str], stage_scale: Optional[torch.Tensor], smooth_inv: Optional[torch.Tensor],
    bound: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    from . import int_gemm

    return int_gemm.quant_linear(x_codes, x_scale, w, w_scale, w_zero, group_size, packed_int4, bias, torch.float32,
                                 activation=activation, stage_scale=stage_scale,
                                 quant_out=dict(smooth_inv=smooth_inv, bound=bound))


@torch.library.custom_op("viditq::int_linear_quant_out", mutates_args=())
def _int_linear_quant_out_op(
    x_codes: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
    w_zero: Optional[torch.Tensor], group_size: int, packed_int4: bool, bias: Optional[torch.Tensor],
    activation: Optional[str], stage_scale: Optional[torch.Tensor], smooth_inv: Optional[torch.Tensor],
    bound: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return int_linear_quant_out_impl(x_codes, x_scale, w, w_scale, w_zero, group_size, packed_int4, bias, activation,
                                     stage_scale, smooth_inv, bound)


@_int_linear_quant_out_op.register_fake
def _(x_codes, x_scale, w, w_scale, w_zero, group_size, packed_int4, bias, activation, stage_scale, smooth_inv,
      bound):
    m, n = x_codes.shape[0], w.shape[0]
    return (x_codes.new_empty((m, n), dtype=torch.float8_e4m3fn),
            x_codes.new_empty((m, 1), dtype=torch.float32))


def int_linear_group_impl(
    x_codes: torch.Tensor, x_scale: torch.Tensor, w: list[torch.Tensor], w_scale: list[torch.Tensor],
    bias: list[Optional[torch.Tensor]], out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    from . import int_gemm

    return int_gemm.quant_linear_group(x_codes, x_scale, list(zip(w, w_scale, bias)), out_dtype)


@torch.library.custom_op("viditq::int_linear_group", mutates_args=())
def _int_linear_group_op(
    x_codes: torch.Tensor, x_scale: torch.Tensor, w: list[torch.Tensor], w_scale: list[torch.Tensor],
    bias: list[Optional[torch.Tensor]], out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    return int_linear_group_impl(x_codes, x_scale, w, w_scale, bias, out_dtype)


@_int_linear_group_op.register_fake
def _(x_codes, x_scale, w, w_scale, bias, out_dtype):
    return [x_codes.new_empty((x_codes.shape[0], t.shape[0]), dtype=out_dtype) for t in w]


def stage_int4_many_impl(
    w: list[torch.Tensor], w_scale: list[torch.Tensor], w_zero: list[Optional[torch.Tensor]], group_size: list[int],
    stage_scale: list[Optional[torch.Tensor]], fp8: bool,
) -> list[torch.Tensor]:
    from . import int_gemm

    staged = int_gemm.stage_int4_many(list(zip(w, w_scale, w_zero, group_size, stage_scale)), fp8)
    return [codes for codes, _ in staged]


@torch.library.custom_op("viditq::stage_int4_many", mutates_args=())
def _stage_int4_many_op(
    w: list[torch.Tensor], w_scale: list[torch.Tensor], w_zero: list[Optional[torch.Tensor]], group_size: list[int],
    stage_scale: list[Optional[torch.Tensor]], fp8: bool,
) -> list[torch.Tensor]:
    return stage_int4_many_impl(w, w_scale, w_zero, group_size, stage_scale, fp8)


@_stage_int4_many_op.register_fake
def _(w, w_scale, w_zero, group_size, stage_scale, fp8):
    dtype = torch.float8_e4m3fn if fp8 else torch.int8
    return [t.new_empty((t.shape[0], 2 * t.shape[1]), dtype=dtype) for t in w]


@torch.library.custom_op("viditq::layer_norm_modulate_quant", mutates_args=())
def _layer_norm_modulate_quant_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor], eps: float, bits: int, smooth_inv: Optional[torch.Tensor], fp8: bool,
    write_y: bool, x0: Optional[torch.Tensor] = None, scale0: Optional[torch.Tensor] = None,
    shift0: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import norm

    return norm.layer_norm_modulate_quant(x, weight, bias, scale, shift, eps, bits, smooth_inv, fp8, write_y,
                                          None if x0 is None else (x0, scale0, shift0))


@_layer_norm_modulate_quant_op.register_fake
def _(x, weight, bias, scale, shift, eps, bits, smooth_inv, fp8, write_y, x0=None, scale0=None, shift0=None):
    b, n, c = x.shape
    n += 0 if x0 is None else x0.shape[1]
    codes = x.new_empty((b * n, c), dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    return x.new_empty((b, n, c)), codes, x.new_empty((b * n, 1), dtype=torch.float32)
