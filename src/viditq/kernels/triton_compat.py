"""Work-arounds for Triton's CPU interpreter (``TRITON_INTERPRET=1``), used by the CI tests of the kernels.

Triton 3.6's interpreter turns a scalar into an index with ``int(array)``, which NumPy >= 2.4 refuses for the
1-element arrays it holds scalars in ("only 0-dimensional arrays can be converted to Python scalars"): every
``range(0, K, BLOCK_K)`` over a run-time ``K`` fails. :func:`patch_interpreter_scalar_index` makes the index
conversion take the single element instead. It touches nothing when the interpreter is not in use.
"""
from __future__ import annotations


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
