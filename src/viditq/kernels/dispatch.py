"""Backend choice for the quantized linear path: Triton kernels on CUDA, the PyTorch reference elsewhere.

``VIDITQ_BACKEND=reference`` forces the reference everywhere (for debugging and A/B checks).

Eager calls launch the Triton kernels directly (no custom-op overhead on the hot path). Under ``torch.compile``
the same kernels are reached through the ``viditq::quantize_activation`` / ``viditq::int_linear`` custom ops
(:mod:`.ops`), which the compiler treats as opaque nodes with known output shapes, so compiled graphs and CUDA
graphs work. Triton is imported lazily: a machine without it simply uses the reference.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch

from . import ops, reference


@lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("VIDITQ_BACKEND", "auto") != "reference" and triton_available()


def _act_kernel_supports(k: int, rot_signs: torch.Tensor | None, rot_m: int, rot_block: int) -> bool:
    from . import act_quant

    if rot_signs is None:
        return act_quant.plain_supported(k)
    return act_quant.rotation_supported(k, rot_m, rot_block)


def inductor_quantizes(rot_signs) -> bool:
    """Under ``torch.compile``, whether activation quantization is left to Inductor as plain PyTorch ops (the
    reference) so that it fuses into the op that produces the activation: un-rotated inputs with
    ``VIDITQ_COMPILE_ACT_QUANT=inductor``. By default every input keeps viditq's kernel as an opaque custom op:
    on PixArt (H200) Inductor's fused LayerNorm + modulation + quantization reductions cost 2.2 ms more device
    time per forward than Inductor's LayerNorm + modulation followed by the kernel (benchmarks/NOTES.md, session 6)."""
    return rot_signs is None and os.environ.get("VIDITQ_COMPILE_ACT_QUANT", "kernel") == "inductor"


def quantize_activation(x, bits, smooth_inv=None, rot_signs=None, rot_m=1, rot_block=0, fp8=False):
    """(M, K) float → int8 codes (fp8 e4m3 if ``fp8``) (M, K), float32 per-token scales (M, 1); see
    ``reference.quantize_activation``."""
    args = (bits, smooth_inv, rot_signs, rot_m, rot_block, fp8)
    if not (use_triton(x) and _act_kernel_supports(x.shape[-1], rot_signs, rot_m, rot_block)):
        return reference.quantize_activation(x, *args)
    if torch.compiler.is_compiling():
        if inductor_quantizes(rot_signs):
            return reference.quantize_activation(x, *args)
        return torch.ops.viditq.quantize_activation(x.contiguous(), *args)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return ops.quantize_activation_impl(x, *args)


def int_linear(x_codes, x_scale, w, w_scale, w_zero, group_size, packed_int4, bias, out_dtype, activation=None,
               stage_scale=None, residual=None, gate=None, residual_prefix=None):
    """``act((x_codes * x_scale) @ dequant(w)^T + bias)`` → (M, N) ``out_dtype`` [+ a residual connection]; see
    ``reference.int_linear``."""
    args = (x_codes, x_scale, w, w_scale, w_zero, group_size, packed_int4, bias, out_dtype, activation, stage_scale,
            residual, gate, residual_prefix)
    if not (use_triton(x_codes) and ops.gemm_supported(x_codes.shape[-1], group_size, packed_int4)):
        return reference.int_linear(*args)
    if torch.compiler.is_compiling():
        return torch.ops.viditq.int_linear(*args)
    return ops.int_linear_impl(*args)


def int_linear_group(x_codes, x_scale, w, w_scale, bias, out_dtype):
    """:func:`int_linear` of one input with several per-channel weights (lists ``w``, ``w_scale``, ``bias``) →
    one (M, N_i) output each, in one kernel launch on CUDA (``int_gemm.quant_linear_group``)."""
    k = x_codes.shape[-1]
    if not use_triton(x_codes):
        return [reference.int_linear(x_codes, x_scale, wi, si, None, k, False, bi, out_dtype)
                for wi, si, bi in zip(w, w_scale, bias)]
    if torch.compiler.is_compiling():
        return torch.ops.viditq.int_linear_group(x_codes, x_scale, list(w), list(w_scale), list(bias), out_dtype)
    return ops.int_linear_group_impl(x_codes, x_scale, w, w_scale, bias, out_dtype)


def stage_int4_many(w, w_scale, w_zero, group_size, stage_scale, fp8):
    """Packed int4 weights (lists, one entry per layer, on one CUDA device) → their per-channel int8 codes (fp8
    e4m3 if ``fp8``) (N, K), staged in one launch per kind (``int_gemm.stage_int4_many``); the caller checks
    :func:`use_triton` on the weights first."""
    args = (list(w), list(w_scale), list(w_zero), list(group_size), list(stage_scale), fp8)
    if torch.compiler.is_compiling():
        return torch.ops.viditq.stage_int4_many(*args)
    return ops.stage_int4_many_impl(*args)


def int_linear_quant_out(x_codes, x_scale, w, w_scale, w_zero, group_size, packed_int4, bias, activation, stage_scale,
                         smooth_inv, bound):
    """``act((x_codes * x_scale) @ dequant(w)^T + bias)`` (times ``smooth_inv``) quantized to fp8 per token for
    the next layer with the scales ``reference.range_scale(x_scale, bound)`` → codes (M, N), scales (M, 1); see
    ``reference.int_linear_quant_out`` (the GEMM epilogue does it on CUDA)."""
    args = (x_codes, x_scale, w, w_scale, w_zero, group_size, packed_int4, bias, activation, stage_scale, smooth_inv,
            bound)
    if not (use_triton(x_codes) and ops.gemm_supported(x_codes.shape[-1], group_size, packed_int4)):
        return reference.int_linear_quant_out(*args)
    if torch.compiler.is_compiling():
        return torch.ops.viditq.int_linear_quant_out(*args)
    return ops.int_linear_quant_out_impl(*args)
