"""Backend choice for the quantized linear path: Triton kernels on CUDA, the PyTorch reference elsewhere.

``VIDITQ_BACKEND=reference`` forces the reference everywhere (for debugging and A/B checks).
"""
from __future__ import annotations

import os

import torch

from . import reference


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("VIDITQ_BACKEND", "auto") != "reference"


def quantize_activation(x, bits, smooth_inv=None, rot_signs=None, rot_m=1):
    return reference.quantize_activation(x, bits, smooth_inv, rot_signs, rot_m)


def int_linear(x_codes, x_scale, w, w_scale, w_zero, group_size, packed_int4, bias, out_dtype):
    return reference.int_linear(x_codes, x_scale, w, w_scale, w_zero, group_size, packed_int4, bias, out_dtype)
