"""Fused producers in quantized models: the norm + adaLN modulation that feeds the quantized linear layers, and
the GELU that follows a quantized feed-forward up-projection.

:func:`fuse_ada_norm_single` goes one step further in PixArt-style blocks (diffusers ``BasicTransformerBlock``
with ``norm_type="ada_norm_single"``): their two LayerNorm + modulations feed quantized layers only (q/k/v of the
self-attention, the feed-forward up-projection), so one kernel computes the norm, the modulation *and* those
layers' per-token quantization (``kernels.norm.layer_norm_modulate_quant``) and hands the codes to the layers
through their input cache (:meth:`viditq.layers.SharedInputCache.prime`): the quantization pass that would read
the activation again goes. On CUDA, eager and under ``torch.compile`` (a custom op); elsewhere diffusers' forward.

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
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.normalization import CogVideoXLayerNormZero
from torch import nn

from .config import FLOAT_ACT_BITS
from .kernels import dispatch
from .layers import QuantLinear, SharedInputCache


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


# ------------------------------------------------------------------------------------------ norm + quantization
def _fusable(x: torch.Tensor) -> bool:
    """Whether the norm + quantization kernel may run on ``x`` (CUDA, Triton backend; eager or compiled)."""
    return dispatch.use_triton(x)


def _quantizes_own_input(layer, channels: int) -> bool:
    """A QuantLinear whose input quantization is the plain per-token kernel's (no rotation, no static scale,
    quantized activations) — what the norm kernel can compute — and, in a shared-input group, its first member."""
    if type(layer) is not QuantLinear:
        return False
    s, cache = layer.spec, layer._input_cache
    return (s.in_features == channels and not s.weight_only and not s.act_static and s.act_bits != FLOAT_ACT_BITS
            and layer.rot_signs is None and layer.rot_matrix is None
            and (cache is None or cache.members == 1 or layer._input_index == 0))


def _norm_modulate(norm: nn.LayerNorm, x, scale, shift, layer):
    """``norm(x) * (1 + scale) + shift`` (scale, shift (B, 1, C)); with ``layer`` (a QuantLinear with an input
    cache) one kernel also quantizes the result for it and primes its cache."""
    from .kernels import norm as kernels

    if layer is None or layer._input_cache is None or not 1 <= x.shape[-1] <= kernels.MAX_CHANNELS:
        return norm(x) * (1 + scale) + shift
    s = layer.spec
    args = (x.contiguous(), norm.weight, norm.bias, scale[:, 0], shift[:, 0], norm.eps, s.act_bits, layer.smooth_inv,
            s.fp8)
    if torch.compiler.is_compiling():
        y, codes, qscale = torch.ops.viditq.layer_norm_modulate_quant(*args)
    else:
        y, codes, qscale = kernels.layer_norm_modulate_quant(*args)
    layer._input_cache.prime(y, (codes, qscale))
    return y


class FusedAdaNormSingleBlock(BasicTransformerBlock):
    """PixArt-style block whose LayerNorm + modulations also quantize the inputs of q/k/v and of the
    feed-forward up-projection (see :func:`fuse_ada_norm_single`). Same arithmetic as diffusers' forward up to
    rounding: the norm and modulation round once, in the kernel."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        if cross_attention_kwargs or self._chunk_size is not None or hidden_states.dim() != 3 \
                or not _fusable(hidden_states):
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
        c = hidden_states.shape[-1]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(hidden_states.shape[0], 6, -1)).chunk(6, dim=1)
        to_q = self.attn1.to_q if _quantizes_own_input(self.attn1.to_q, c) else None
        norm_hidden_states = _norm_modulate(self.norm1, hidden_states, scale_msa, shift_msa, to_q)
        attn_output = self.attn1(norm_hidden_states, encoder_hidden_states=None, attention_mask=attention_mask)
        hidden_states = gate_msa * attn_output + hidden_states
        if self.attn2 is not None:
            hidden_states = self.attn2(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                       attention_mask=encoder_attention_mask) + hidden_states
        up = getattr(self.ff.net[0], "proj", None)
        up = up if _quantizes_own_input(up, c) else None
        norm_hidden_states = _norm_modulate(self.norm2, hidden_states, scale_mlp, shift_mlp, up)
        return gate_mlp * self.ff(norm_hidden_states) + hidden_states


def fuse_ada_norm_single(model: nn.Module) -> int:
    """Give every PixArt-style block (``BasicTransformerBlock``, ``norm_type="ada_norm_single"``, no positional
    embedding inside, self-attention on its own input) whose q/k/v or feed-forward up-projection the norm kernel
    can quantize (:func:`_quantizes_own_input`) the fused forward (idempotent). The up-projection gets an input
    cache of its own. Returns how many blocks have it."""
    count = 0
    for module in model.modules():
        if type(module) is BasicTransformerBlock and module.norm_type == "ada_norm_single" \
                and module.pos_embed is None and not module.only_cross_attention \
                and isinstance(module.norm1, nn.LayerNorm) and isinstance(module.norm2, nn.LayerNorm):
            c = module.norm1.normalized_shape[0]
            up = getattr(module.ff.net[0], "proj", None)
            if _quantizes_own_input(up, c) and up._input_cache is None:
                up._input_cache, up._input_index = SharedInputCache(1), 0
            if _quantizes_own_input(module.attn1.to_q, c) or _quantizes_own_input(up, c):
                module.__class__ = FusedAdaNormSingleBlock
        count += isinstance(module, FusedAdaNormSingleBlock)
    return count
