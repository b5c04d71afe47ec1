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
from diffusers.models.activations import GELU
from diffusers.models.normalization import CogVideoXLayerNormZero
from torch import nn

from .kernels import dispatch
from .layers import QuantLinear


def _kernel_ok(x: torch.Tensor) -> bool:
    """Whether the Triton norm kernel may run on ``x`` (CUDA, Triton backend, not under torch.compile)."""
    return not torch.compiler.is_compiling() and dispatch.use_triton(x)


class FusedCogVideoXLayerNormZero(CogVideoXLayerNormZero):
    """``CogVideoXLayerNormZero`` with LayerNorm + modulation in one kernel (see ``viditq.fusion``)."""

    def forward(self, hidden_states, encoder_hidden_states, temb):
        from .kernels import norm as kernels

        norm = self.norm
        if not (isinstance(norm, nn.LayerNorm) and _kernel_ok(hidden_states)
                and kernels.supported(hidden_states) and kernels.supported(encoder_hidden_states)):
            return super().forward(hidden_states, encoder_hidden_states, temb)
        shift, scale, gate, enc_shift, enc_scale, enc_gate = self.linear(self.silu(temb)).chunk(6, dim=1)
        hidden_states = kernels.layer_norm_modulate(hidden_states, norm.weight, norm.bias, scale, shift, norm.eps)
        encoder_hidden_states = kernels.layer_norm_modulate(encoder_hidden_states, norm.weight, norm.bias,
                                                            enc_scale, enc_shift, norm.eps)
        return hidden_states, encoder_hidden_states, gate[:, None, :], enc_gate[:, None, :]


class FusedLayerNorm(nn.LayerNorm):
    """A per-head (q/k) ``nn.LayerNorm`` run by the Triton kernel on CUDA: PyTorch's LayerNorm kernel reaches
    0.23 TB/s on CogVideoX-2B's 64-wide q/k norms (1.2 ms a call, 72 ms a forward on an H100)."""

    def forward(self, x):
        from .kernels import norm

        if not (_kernel_ok(x) and norm.layer_norm_supported(x)):
            return super().forward(x)
        return norm.layer_norm(x, self.weight, self.bias, self.eps)


SMALL_NORM_CHANNELS = 256  # LayerNorms this narrow (per-head q/k norms) get the fused kernel


def fuse_norms(model: nn.Module) -> int:
    """Give every ``CogVideoXLayerNormZero`` in ``model`` the fused norm + modulation forward, and every narrow
    (``<= SMALL_NORM_CHANNELS``, per-head q/k) ``nn.LayerNorm`` the fused LayerNorm (idempotent). Returns how
    many modules have a fused forward."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if cls is CogVideoXLayerNormZero:
            module.__class__ = FusedCogVideoXLayerNormZero
        elif cls is nn.LayerNorm and len(module.normalized_shape) == 1 and \
                module.normalized_shape[0] <= SMALL_NORM_CHANNELS:
            module.__class__ = FusedLayerNorm
        count += isinstance(module, (CogVideoXLayerNormZero, FusedLayerNorm))
    return count


class FusedGELU(GELU):
    """diffusers' ``GELU`` whose projection is a QuantLinear with the GELU in its epilogue (see ``fuse_gelu``)."""

    def forward(self, hidden_states):
        return self.proj(hidden_states)


def fuse_gelu(model: nn.Module) -> int:
    """Fuse the tanh GELU of every diffusers ``GELU`` module whose ``proj`` is a QuantLinear into that layer's
    GEMM epilogue (idempotent). Returns how many modules are fused."""
    count = 0
    for module in model.modules():
        if (type(module) is GELU and module.approximate == "tanh" and type(module.proj) is QuantLinear
                and module.proj.fused_activation is None):
            module.proj.fused_activation = "gelu_tanh"
            module.__class__ = FusedGELU
        count += isinstance(module, FusedGELU)
    return count
