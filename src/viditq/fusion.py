"""Fused producers in quantized models: the norm + adaLN modulation that feeds the quantized linear layers.

CogVideoX's ``CogVideoXLayerNormZero`` (two per block) runs a LayerNorm, a multiply and an add over the whole
activation, three passes through memory (13 % of CogVideoX-2B's bf16 forward on an H100 is the LayerNorm alone).
:func:`fuse_norms` gives those modules a forward that does it in one Triton kernel (``kernels.norm``) on CUDA.
Parameters, state dict and checkpoints are unchanged (the module's class is swapped for a subclass), and the
original forward runs wherever the kernel does not apply: CPU, ``VIDITQ_BACKEND=reference``, under
``torch.compile`` (Inductor fuses these ops itself).
"""
from __future__ import annotations

import torch
from torch import nn

from .kernels import dispatch


def _fused_ok(*tensors: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or not all(dispatch.use_triton(t) for t in tensors):
        return False
    from .kernels import norm

    return all(norm.supported(t) for t in tensors)


def _fused_class(base: type) -> type:
    class FusedLayerNormZero(base):
        """``CogVideoXLayerNormZero`` with LayerNorm + modulation in one kernel (see ``viditq.fusion``)."""

        def forward(self, hidden_states, encoder_hidden_states, temb):
            norm = self.norm
            if not (isinstance(norm, nn.LayerNorm) and _fused_ok(hidden_states, encoder_hidden_states)):
                return super().forward(hidden_states, encoder_hidden_states, temb)
            from .kernels.norm import layer_norm_modulate

            shift, scale, gate, enc_shift, enc_scale, enc_gate = self.linear(self.silu(temb)).chunk(6, dim=1)
            hidden_states = layer_norm_modulate(hidden_states, norm.weight, norm.bias, scale, shift, norm.eps)
            encoder_hidden_states = layer_norm_modulate(encoder_hidden_states, norm.weight, norm.bias, enc_scale,
                                                        enc_shift, norm.eps)
            return hidden_states, encoder_hidden_states, gate[:, None, :], enc_gate[:, None, :]

    FusedLayerNormZero.__name__ = FusedLayerNormZero.__qualname__ = f"Fused{base.__name__}"
    return FusedLayerNormZero


_FUSED: dict[type, type] = {}


def fuse_norms(model: nn.Module) -> int:
    """Give every ``CogVideoXLayerNormZero`` in ``model`` the fused forward (idempotent). Returns how many."""
    from diffusers.models.normalization import CogVideoXLayerNormZero

    count = 0
    for module in model.modules():
        cls = type(module)
        if cls is CogVideoXLayerNormZero:
            module.__class__ = _FUSED.setdefault(cls, _fused_class(cls))
        if isinstance(module, CogVideoXLayerNormZero):
            count += 1
    return count
