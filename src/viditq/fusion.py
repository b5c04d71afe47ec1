"""Fused producers in quantized models: the norm + adaLN modulation that feeds the quantized linear layers, and
the GELU that follows a quantized feed-forward up-projection.

CogVideoX's ``CogVideoXLayerNormZero`` (two per block) runs a LayerNorm, a multiply and an add over the whole
activation, three passes through memory (13 % of CogVideoX-2B's bf16 forward on an H100 is the LayerNorm alone).
:func:`fuse_norms` gives those modules a forward that does it in one Triton kernel (``kernels.norm``) on CUDA.
Parameters, state dict and checkpoints are unchanged (the module's class is swapped for a subclass), and the
original forward runs wherever the kernel does not apply: CPU, ``VIDITQ_BACKEND=reference``, under
``torch.compile`` (Inductor fuses these ops itself).

:func:`fuse_gelu` moves the tanh GELU of diffusers' ``GELU`` activation modules into the int8 GEMM epilogue of
their (quantized) projection, which saves one read and one write of the widest activation of every block
(``QuantLinear.fused_activation``; the PyTorch path applies the same GELU in float32).
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


class FusedLayerNorm(nn.LayerNorm):
    """A per-head (q/k) ``nn.LayerNorm`` run by the Triton kernel on CUDA: PyTorch's LayerNorm kernel reaches
    0.23 TB/s on CogVideoX-2B's 64-wide q/k norms (1.2 ms a call, 72 ms a forward on an H100)."""

    def forward(self, x):
        if torch.compiler.is_compiling() or not dispatch.use_triton(x):
            return super().forward(x)
        from .kernels import norm

        if not norm.layer_norm_supported(x):
            return super().forward(x)
        return norm.layer_norm(x, self.weight, self.bias, self.eps)


SMALL_NORM_CHANNELS = 256  # LayerNorms this narrow (per-head q/k norms) get the fused kernel
_FUSED: dict[type, type] = {}


def fuse_norms(model: nn.Module) -> int:
    """Give every ``CogVideoXLayerNormZero`` in ``model`` the fused norm + modulation forward, and every narrow
    (``<= SMALL_NORM_CHANNELS``, per-head q/k) ``nn.LayerNorm`` the fused LayerNorm (idempotent). Returns how
    many modules have a fused forward."""
    from diffusers.models.normalization import CogVideoXLayerNormZero

    count = 0
    for module in model.modules():
        cls = type(module)
        if cls is CogVideoXLayerNormZero:
            module.__class__ = _FUSED.setdefault(cls, _fused_class(cls))
        elif cls is nn.LayerNorm and len(module.normalized_shape) == 1 and \
                module.normalized_shape[0] <= SMALL_NORM_CHANNELS:
            module.__class__ = FusedLayerNorm
        if isinstance(module, (CogVideoXLayerNormZero, FusedLayerNorm)):
            count += 1
    return count


class FusedGELU(nn.Module):
    """diffusers' ``GELU`` whose projection is a QuantLinear with the GELU in its epilogue (see ``fuse_gelu``)."""

    def forward(self, hidden_states):
        return self.proj(hidden_states)


def fuse_gelu(model: nn.Module) -> int:
    """Fuse the tanh GELU of every diffusers ``GELU`` module whose ``proj`` is a QuantLinear into that layer's
    GEMM epilogue (idempotent). Returns how many modules are fused."""
    from diffusers.models.activations import GELU

    from .layers import QuantLinear

    count = 0
    for module in model.modules():
        if (type(module) is GELU and module.approximate == "tanh" and type(module.proj) is QuantLinear
                and module.proj.fused_activation is None):
            module.proj.fused_activation = "gelu_tanh"
            module.__class__ = _FUSED.setdefault(GELU, type("FusedGELU", (FusedGELU, GELU), {}))
        count += isinstance(module, FusedGELU)
    return count
