"""Work-arounds for Triton's CPU interpreter (``TRITON_INTERPRET=1``), used by the CI tests of the kernels.

Triton 3.6's interpreter turns a scalar into an index with ``int(array)``, which NumPy >= 2.4 refuses for the
1-element arrays it holds scalars in ("only 0-dimensional arrays can be converted to Python scalars"): every
``range(0, K, BLOCK_K)`` over a run-time ``K`` fails. :func:`patch_interpreter_scalar_index` makes the index
conversion take the single element instead. It touches nothing when the interpreter is not in use.

The interpreter's float → fp8 e4m3 cast also rounds wrongly (a carry out of the 3-bit mantissa is OR-ed into the
exponent, and ties round up, not to even: 7.77 becomes 4, 168 becomes 176), where the GPU rounds to nearest even
(``cvt.rn.satfinite``). :func:`patch_interpreter_fp8_cast` routes that cast through PyTorch's ``float8_e4m3fn``
conversion, which rounds like the GPU for the finite, in-range values the kernels store.
"""
from __future__ import annotations

import os


def interpreted() -> bool:
    """Whether Triton kernels run on the CPU interpreter (no inline PTX, no fused multiply-add) in this process."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def patch_interpreter_scalar_index() -> None:
    """Idempotent: wrap ``triton.runtime.interpreter._patch_lang_tensor`` so ``__index__`` reads ``.item()``."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_viditq_index_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._viditq_index_patched = True


def patch_interpreter_fp8_cast() -> None:
    """Idempotent: float32/bf16/fp16 → fp8 e4m3 (round to nearest even) in the interpreter via PyTorch."""
    import numpy as np
    import torch
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    if getattr(interpreter, "_viditq_fp8_patched", False):
        return
    original = interpreter._convert_float

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if output_dtype == tl.float8e4nv and rounding_mode == ir.ROUNDING_MODE.RTNE and input_dtype in (
                tl.float32, tl.float16, tl.bfloat16):
            if input_dtype == tl.bfloat16:  # NumPy has no bfloat16: the interpreter holds its bits as uint16
                values = torch.from_numpy(input.view(np.uint16).astype(np.int32) << 16).view(torch.float32)
            else:
                values = torch.from_numpy(np.ascontiguousarray(input).astype(np.float32))
            return values.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(input.shape)
        return original(input, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert
    interpreter._viditq_fp8_patched = True


def patch_interpreter() -> None:
    """Every interpreter work-around of this module (idempotent)."""
    patch_interpreter_scalar_index()
    patch_interpreter_fp8_cast()
