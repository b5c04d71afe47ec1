"""Fused producers in quantized models: the norm + adaLN modulation that feeds the quantized linear layers, and
the GELU that follows a quantized feed-forward up-projection.

:func:`fuse_ada_norm_single` goes one step further in PixArt-style blocks (diffusers ``BasicTransformerBlock``
with ``norm_type="ada_norm_single"``): their two LayerNorm + modulations feed quantized layers only (q/k/v of the
self-attention, the feed-forward up-projection), so one kernel computes the norm, the modulation *and* those
layers' per-token quantization (``kernels.norm.layer_norm_modulate_quant``) and hands the codes to the layers
through their input cache (:meth:`viditq.layers.SharedInputCache.prime`): the quantization pass that would read
the activation again goes (nor is the float output written, where only those layers read it). The layers that
end the residual branches (attention output projections, feed-forward down-projection) add the gated residual
in their GEMM epilogue (``QuantLinear(x, residual, gate)``), so the pass that reads their output and the
residual again goes too. On CUDA, eager and under ``torch.compile`` (custom ops); elsewhere diffusers' forward.

CogVideoX's ``CogVideoXLayerNormZero`` (two per block) runs a LayerNorm, a multiply and an add over the whole
activation, three passes through memory (13 % of CogVideoX-2B's bf16 forward on an H100 is the LayerNorm alone).
:func:`fuse_norms` gives those modules a forward that does it in one Triton kernel (``kernels.norm``) on CUDA.
Parameters, state dict and checkpoints are unchanged (the module's class is swapped for a subclass), and the
original forward runs wherever the kernel does not apply: CPU, ``VIDITQ_BACKEND=reference``, under
``torch.compile`` (Inductor fuses these ops itself). In quantized CogVideoX blocks :func:`fuse_cogvideox_blocks`
goes further, as :func:`fuse_ada_norm_single` does for PixArt: the attention and the feed-forward read the joint
sequence [text, video] of the two norms' outputs only through q/k/v and the up-projection, so one launch
normalizes, modulates (each part with its own scale and shift) and quantizes both parts into those layers' codes
(``kernels.norm``'s ``prefix``), and neither the norm outputs, nor their concatenation, nor a quantization pass
over it touches memory (eager and compiled); the output projection and the feed-forward down-projection add the
text and video residuals, each with its own gate, in their GEMM epilogues, and 8-bit attention applies the q / k
LayerNorms and rotary embedding as its preparation reads q and k.

:func:`fuse_gelu` moves the tanh GELU of diffusers' ``GELU`` activation modules into the int8 GEMM epilogue of
their (quantized) projection, which saves one read and one write of the widest activation of every block
(``QuantLinear.fused_activation``; the PyTorch path applies the same GELU in float32).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.normalization import CogVideoXLayerNormZero
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from torch import nn

from .config import FLOAT_ACT_BITS
from .kernels import dispatch
from .layers import QuantLinear, SharedInputCache, add_residual, forward_group


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


class FusedFeedForward(FeedForward):
    """diffusers' ``FeedForward`` (``FusedGELU``, dropouts, a QuantLinear down-projection, dropouts) whose
    up-projection epilogue also quantizes the hidden state to fp8 for the down-projection, per token with a
    scale from a bound on the row (``QuantLinear.forward_quantized_out``, ``reference.output_range``: the widest
    activation of a block is neither written in 16 bits nor read back by a quantization pass), where
    :func:`_hand_off_ready` holds; else diffusers' forward. The bound is a property of the weights, computed
    when the hand-off is installed and again whenever a state dict is loaded (the up-projection's non-persistent
    buffer ``_hand_off_range``)."""

    def forward(self, hidden_states, *args, **kwargs):
        if args or kwargs or not _hand_off_ready(self):
            return super().forward(hidden_states, *args, **kwargs)
        net = list(self.net)
        down = [m for m in net if not isinstance(m, nn.Dropout)][1]
        hidden_states = down(_hand_off(self, hidden_states))
        for module in net[net.index(down) + 1:]:
            hidden_states = module(hidden_states)
        return hidden_states


def _hand_off(ff: FusedFeedForward, x):
    """A FusedFeedForward up to its down-projection's input: the up-projection's stand-in output, its
    quantization primed in the down-projection's cache. The dropouts between are identities
    (:func:`_hand_off_ready`) and not called: the down-projection must get the very stand-in (a traced
    dropout would be a new tensor to ``torch.compile``, and the cache would miss)."""
    net = list(ff.net)
    up = net[0].proj
    return up.forward_quantized_out(x, [m for m in net if not isinstance(m, nn.Dropout)][1], up._hand_off_range)


def _set_hand_off_range(ff: FusedFeedForward, *_) -> None:
    """(Re)compute the bound the up-projection quantizes the hidden state with (also the state-dict post-hook of
    both projections, so that loading weights at any level refreshes it)."""
    layers = [m for m in ff.net if not isinstance(m, nn.Dropout)]
    up = layers[0].proj
    bound = up.output_range(layers[1].smooth_inv)  # a (3,) tensor: one compiled graph for all blocks
    # a buffer of the QuantLinear (re-registering replaces it): it moves with the model and keeps float32 through
    # model.to(torch.bfloat16); non-persistent: derived from the weights, not in the state dict
    up.register_buffer("_hand_off_range", bound, persistent=False)


def _gemm_per_channel(layer: QuantLinear) -> bool:
    s = layer.spec
    return s.packed_int4 or (s.group_size == s.in_features and layer.weight_zero is None)


def _hand_off_ok(up: QuantLinear, down: nn.Module) -> bool:
    """Whether ``down`` can take its input as ``up``'s epilogue quantizes it: plain dynamic fp8 activations (no
    rotation, no static scale; the bound-based scale would cost int8 its bits), 16-byte rows (the TMA kernel),
    per-channel (or packed int4) weights on ``up``, ``down`` reading no shared input."""
    if type(down) is not QuantLinear:
        return False
    u, d = up.spec, down.spec
    return (not u.weight_only and not d.weight_only and not d.act_static and d.fp8
            and down.rot_signs is None and down.rot_matrix is None and u.out_features == d.in_features
            and d.in_features % 16 == 0 and u.in_features % 16 == 0 and _gemm_per_channel(up)
            and (down._input_cache is None or down._input_cache.members == 1))


def _hand_off_ready(ff: nn.Module) -> bool:
    """At call time: a FusedFeedForward whose dropouts are identities (eval mode or p = 0), its down-projection's
    cache in place, no hook on the modules that would see the stand-in output (the GELU, its projection, the
    dropouts before the down-projection, the down-projection)."""
    if not isinstance(ff, FusedFeedForward):
        return False
    net = list(ff.net)
    layers = [m for m in net if not isinstance(m, nn.Dropout)]
    if len(layers) != 2 or net[0] is not layers[0] or not isinstance(layers[0], FusedGELU):
        return False
    up, down = layers[0].proj, layers[1]
    cache = down._input_cache
    return (cache is not None and cache.members == 1 and _hand_off_ok(up, down)
            and all(not m.training or m.p == 0 for m in net if isinstance(m, nn.Dropout))
            and not any(_hooked(m) for m in (up, *net[:net.index(down) + 1])))


def fuse_gelu(model: nn.Module, hand_off: bool = True) -> int:
    """Fuse the tanh GELU of every diffusers ``GELU`` module whose ``proj`` is a QuantLinear into that layer's
    GEMM epilogue, and (``hand_off``) in a ``FeedForward`` whose down-projection qualifies (:func:`_hand_off_ok`),
    that layer's input quantization too (:class:`FusedFeedForward`; the down-projection gets an input cache of
    its own; ``hand_off=False`` turns FusedFeedForwards back into diffusers' forward) (idempotent). Returns how
    many GELU modules are fused."""
    count = 0
    for module in model.modules():
        if (type(module) is GELU and module.approximate == "tanh" and type(module.proj) is QuantLinear
                and module.proj.fused_activation is None):
            module.proj.fused_activation = "gelu_tanh"
            module.__class__ = FusedGELU
        count += isinstance(module, FusedGELU)
    for module in model.modules():
        if not hand_off and type(module) is FusedFeedForward:
            module.__class__ = FeedForward
        elif hand_off and type(module) is FeedForward:
            layers = [m for m in module.net if not isinstance(m, nn.Dropout)]  # [GELU, down], dropouts around
            if len(layers) == 2 and module.net[0] is layers[0] and isinstance(layers[0], FusedGELU) \
                    and _hand_off_ok(layers[0].proj, layers[1]):
                down = layers[1]
                if down._input_cache is None:
                    down._input_cache, down._input_index = SharedInputCache(1), 0
                module.__class__ = FusedFeedForward
                first = "_hand_off_range" not in layers[0].proj._buffers  # hooks once, also after hand_off=False
                _set_hand_off_range(module)
                for layer in (layers[0].proj, down) if first else ():
                    layer.register_load_state_dict_post_hook(functools.partial(_set_hand_off_range, module))
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


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` does more than its class's forward: hooks (its own or global) or a replaced
    ``forward`` (diffusers' HookRegistry). The fused block then calls it as it is instead of running its parts."""
    from torch.nn.modules import module as torch_module

    return bool(module._forward_pre_hooks or module._forward_hooks or "forward" in module.__dict__
                or torch_module._global_forward_pre_hooks or torch_module._global_forward_hooks)


def _plain_attention(attn) -> bool:
    """diffusers' plain processor (wrapped by 8-bit attention or not) with no residual, group or spatial norm,
    no output rescaling and no hooks: it reads its input through q/k/v only and returns ``to_out``'s output."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    processor = attn.processor
    processor = getattr(processor, "processor", processor)  # viditq.attention.QuantizedAttnProcessor
    return (type(processor) is AttnProcessor2_0 and not attn.residual_connection and attn.group_norm is None
            and attn.spatial_norm is None and attn.rescale_output_factor == 1.0 and not _hooked(attn))


def _qkv_read_codes(attn) -> bool:
    """Whether q, k and v of ``attn`` share one input cache, ``to_q`` first, and no hooks."""
    cache = attn.to_q._input_cache
    return (cache is not None and cache.members == 3 and attn.to_k._input_cache is cache
            and attn.to_v._input_cache is cache and not any(_hooked(m) for m in (attn.to_q, attn.to_k, attn.to_v)))


def _codes_only_attention(attn, to_q) -> bool:
    """Whether the self-attention ``attn`` reads its input only through q/k/v (one input cache with ``to_q``
    first): then the norm kernel need not write the float input at all (only its shape is read)."""
    return _plain_attention(attn) and attn.to_q is to_q and _qkv_read_codes(attn)


def _sdpa_route(attn):
    """The context ``attn``'s processor runs its SDPA in: 8-bit attention where it is a QuantizedAttnProcessor."""
    from .attention import QuantizedAttnProcessor, SDPARouter

    processor = attn.processor
    if isinstance(processor, QuantizedAttnProcessor):
        return SDPARouter(processor.mode, processor.min_kv_tokens, processor.counts)
    return contextlib.nullcontext()


def _project(layer: nn.Module, x, residual, gate=None, residual_prefix=None):
    """``residual + gate * layer(x)`` (gate (B, 1, C) or None; with ``residual_prefix`` the residual in two parts
    and gate (B, 2, C), see :func:`viditq.layers.add_residual`): a QuantLinear adds it in its GEMM epilogue (not
    when hooked: a forward hook sees the layer's own output)."""
    if type(layer) is QuantLinear and not _hooked(layer):
        return layer(x, residual, gate, residual_prefix)
    return layer(x) if residual is None else add_residual(layer(x), residual, gate, residual_prefix)


def _eval_tail(module: nn.Module, layers) -> list | None:
    """``layers`` without its trailing dropouts (identities in eval mode), or None in training mode."""
    layers = list(layers)
    while layers and isinstance(layers[-1], nn.Dropout):
        layers.pop()
    return layers if layers and not module.training else None


def _heads(attn, batch: int, query, key, value):
    """q, k, v (B, N, heads · D) → (B, heads, N, D), with ``attn``'s per-head q / k norms."""
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def _attend(attn, x, residual, gate=None, context=None, mask=None, group=False):
    """``residual + gate * attn(x, context, mask)``, diffusers' ``AttnProcessor2_0`` arithmetic for a plain
    attention (:func:`_plain_attention`) run here so that the output projection adds the residual (the
    processor's trailing ``/ rescale_output_factor`` would cost a pass over the output: Inductor keeps a division
    by 1 after a custom op). Through 8-bit attention where the processor is a QuantizedAttnProcessor. ``group``:
    a self-attention's q, k and v run as one GEMM launch where they can (:func:`viditq.layers.forward_group`)."""
    tail = _eval_tail(attn, attn.to_out)
    if not _plain_attention(attn) or tail is None or len(tail) != 1:
        return add_residual(attn(x, encoder_hidden_states=context, attention_mask=mask), residual, gate)
    batch = x.shape[0]
    if mask is not None:
        mask = attn.prepare_attention_mask(mask, (x if context is None else context).shape[1], batch)
        mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
    projections = (attn.to_q, attn.to_k, attn.to_v)
    qkv = forward_group(projections, x) if group and context is None and not any(map(_hooked, projections)) \
        else None
    if qkv is not None:
        query, key, value = qkv
    else:
        query = attn.to_q(x)
        if context is None:
            context = x
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
    query, key, value = _heads(attn, batch, query, key, value)
    with _sdpa_route(attn):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
    return _project(tail[0], out, residual, gate)


def _feed_forward(ff, x, residual=None, gate=None, residual_prefix=None):
    """``residual + gate * ff(x)`` (diffusers' FeedForward: its modules in turn, or the quantized hand-off of a
    FusedFeedForward), the down-projection adding it (``residual_prefix``: :func:`_project`); ``ff(x)`` without a
    residual."""
    tail = _eval_tail(ff, ff.net)
    if tail is None or _hooked(ff):
        return ff(x) if residual is None else add_residual(ff(x), residual, gate, residual_prefix)
    if _hand_off_ready(ff):
        x = _hand_off(ff, x)
    else:
        for module in tail[:-1]:
            x = module(x)
    return _project(tail[-1], x, residual, gate, residual_prefix)


def _codes_only_ff(ff, up) -> bool:
    """Whether the feed-forward reads its input only through ``up`` (diffusers' GELU projection first)."""
    first, cache = ff.net[0], up._input_cache
    return (type(first) in (GELU, FusedGELU) and first.proj is up and cache is not None and cache.members == 1
            and not any(_hooked(m) for m in (ff, first, up)))


def _norm_modulate(norm: nn.LayerNorm, x, scale, shift, layer, codes_only=False, prefix=None):
    """``norm(x) * (1 + scale) + shift`` (scale, shift (B, 1, C)); with ``layer`` (a QuantLinear with an input
    cache) one kernel also quantizes the result for it and primes its cache; ``codes_only``: every reader of the
    result takes the codes, so the kernel does not write the result (an uninitialized tensor of its shape).
    ``prefix = (x0, scale0, shift0)``: the same for ``torch.cat([x0, x], dim=1)``, x0 with its own modulation
    (one kernel over both, no concatenation)."""
    from .kernels import norm as kernels

    if layer is None or layer._input_cache is None or not 1 <= x.shape[-1] <= kernels.MAX_CHANNELS:
        y = norm(x) * (1 + scale) + shift
        return y if prefix is None else torch.cat([norm(prefix[0]) * (1 + prefix[1]) + prefix[2], y], dim=1)
    s = layer.spec
    if prefix is None:
        x, extra = x.contiguous(), ()
    else:  # the kernel reads either part with its own batch stride (views of one sequence)
        x, x0 = (t if kernels.rows_contiguous(t) else t.contiguous() for t in (x, prefix[0]))
        extra = (x0, prefix[1][:, 0], prefix[2][:, 0])
    args = (x, norm.weight, norm.bias, scale[:, 0], shift[:, 0], norm.eps, s.act_bits, layer.smooth_inv, s.fp8,
            not codes_only) + extra
    if torch.compiler.is_compiling():
        y, codes, qscale = torch.ops.viditq.layer_norm_modulate_quant(*args)
    else:
        y, codes, qscale = kernels.layer_norm_modulate_quant(*args[:10], prefix=args[10:] or None)
    layer._input_cache.prime(y, (codes, qscale))
    return y


class FusedAdaNormSingleBlock(BasicTransformerBlock):
    """PixArt-style block whose LayerNorm + modulations also quantize the inputs of q/k/v and of the
    feed-forward up-projection, and whose attention output projections and feed-forward down-projection add the
    (gated) residual connections in their GEMM epilogues (see :func:`fuse_ada_norm_single`). Same arithmetic as
    diffusers' forward up to rounding: the norm and modulation round once, in the kernel, and so do the
    projections with their residual."""

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
        norm_hidden_states = _norm_modulate(self.norm1, hidden_states, scale_msa, shift_msa, to_q,
                                            to_q is not None and _codes_only_attention(self.attn1, to_q))
        hidden_states = _attend(self.attn1, norm_hidden_states, hidden_states, gate_msa, mask=attention_mask,
                                group=getattr(self, "_viditq_group_qkv", True))
        if self.attn2 is not None:
            hidden_states = _attend(self.attn2, hidden_states, hidden_states, context=encoder_hidden_states,
                                    mask=encoder_attention_mask)
        up = getattr(self.ff.net[0], "proj", None)
        up = up if _quantizes_own_input(up, c) else None
        norm_hidden_states = _norm_modulate(self.norm2, hidden_states, scale_mlp, shift_mlp, up,
                                            up is not None and _codes_only_ff(self.ff, up))
        return _feed_forward(self.ff, norm_hidden_states, hidden_states, gate_mlp)


def fuse_ada_norm_single(model: nn.Module, group_qkv: bool = True) -> int:
    """Give every PixArt-style block (``BasicTransformerBlock``, ``norm_type="ada_norm_single"``, no positional
    embedding inside, self-attention on its own input) whose q/k/v or feed-forward up-projection the norm kernel
    can quantize (:func:`_quantizes_own_input`) the fused forward (idempotent). The up-projection gets an input
    cache of its own. ``group_qkv``: the self-attention's q, k and v run as one GEMM launch where the kernel can
    (False: one launch each). Returns how many blocks have it."""
    def layer_norm(block):
        ok = (block.norm_type == "ada_norm_single" and block.pos_embed is None and not block.only_cross_attention
              and isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm))
        return block.norm1 if ok else None

    return _fuse_blocks(model, BasicTransformerBlock, FusedAdaNormSingleBlock, layer_norm, False, group_qkv)


def _fuse_blocks(model: nn.Module, block_cls, fused_cls, layer_norm, both: bool, group_qkv: bool) -> int:
    """Swap ``block_cls`` blocks to ``fused_cls`` where ``layer_norm(block)`` (the first norm's LayerNorm, or
    None: not fusable) gives the width and the norm kernel can quantize the input of q/k/v and (``both``) or the
    feed-forward up-projection, which gets an input cache of its own; set the fused blocks' ``group_qkv``."""
    count = 0
    for module in model.modules():
        norm = layer_norm(module) if type(module) in (block_cls, fused_cls) else None
        if norm is not None:
            c = norm.normalized_shape[0]
            up = getattr(module.ff.net[0], "proj", None)
            qkv, ff = _quantizes_own_input(module.attn1.to_q, c), _quantizes_own_input(up, c)
            if (qkv and ff) if both else (qkv or ff):
                module.__class__ = fused_cls
                if ff and up._input_cache is None:
                    up._input_cache, up._input_index = SharedInputCache(1), 0
        if isinstance(module, fused_cls):
            module._viditq_group_qkv = group_qkv
            count += 1
    return count


# ------------------------------------------------------------------------------------------ CogVideoX blocks
def _joint_output_projection(attn) -> nn.Module | None:
    """The output projection of ``attn`` if it runs CogVideoX's processor (wrapped by 8-bit attention or not) in
    self-attention over the joint [text, video] sequence, through one projection and no hooks — what
    :func:`_attend_joint` computes; else None."""
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    from .attention import QuantizedAttnProcessor

    processor = attn.processor
    if isinstance(processor, QuantizedAttnProcessor):  # (its SDPA routing: _sdpa_route)
        processor = processor.processor
    tail = _eval_tail(attn, attn.to_out)
    ok = (type(processor) is CogVideoXAttnProcessor2_0 and not attn.is_cross_attention and not _hooked(attn)
          and tail is not None and len(tail) == 1)
    return tail[0] if ok else None


def _qk_norm_args(attn, n_kv: int, head_dim: int):
    """``qk_norm`` for :func:`viditq.kernels.attention.quantized_attention` where ``attn`` runs 8-bit attention
    over these ``n_kv`` keys and its q / k norms are per-head LayerNorms with weight and bias (CogVideoX's): the
    kernels' preparation applies them as it reads q and k. Else None (the norms run as modules)."""
    from .attention import MAX_HEAD_DIM, QuantizedAttnProcessor

    processor, norms = attn.processor, (attn.norm_q, attn.norm_k)
    if not isinstance(processor, QuantizedAttnProcessor) or n_kv < processor.min_kv_tokens \
            or head_dim > MAX_HEAD_DIM:
        return None
    if not all(isinstance(n, nn.LayerNorm) and n.normalized_shape == (head_dim,) and n.weight is not None
               and n.bias is not None and n.eps == norms[0].eps and not _hooked(n) for n in norms):
        return None
    return attn.norm_q.weight, attn.norm_q.bias, attn.norm_k.weight, attn.norm_k.bias, attn.norm_q.eps


def _rope_args(image_rotary_emb, n_video: int, head_dim: int, text_len: int, device) -> tuple[bool, tuple | None]:
    """(Whether 8-bit attention can apply CogVideoX's ``image_rotary_emb`` — none, or (cos, sin) of the video
    tokens as (N, D) float tables with contiguous channels — and its ``rope`` argument for
    :func:`viditq.kernels.attention.quantized_attention`.)"""
    if image_rotary_emb is None:
        return True, None
    tables = image_rotary_emb if isinstance(image_rotary_emb, (tuple, list)) else ()
    ok = len(tables) == 2 and all(isinstance(t, torch.Tensor) and t.shape == (n_video, head_dim) and t.device == device
                                  and t.is_floating_point() and t.stride() == tables[0].stride() and t.stride(-1) == 1
                                  for t in tables)
    return ok, ((*tables, text_len) if ok else None)


def _quantizes_output_of_attention(out_proj, channels: int) -> bool:
    """Whether the attention's fp8 epilogue can quantize ``out_proj``'s input for it: a QuantLinear with fp8
    activations quantized per token by the plain kernel (:func:`_quantizes_own_input`), an input cache of its own,
    no hooks."""
    return (_quantizes_own_input(out_proj, channels) and out_proj.spec.fp8 and out_proj._input_cache is not None
            and out_proj._input_cache.members == 1 and not _hooked(out_proj))


def _attend_joint(attn, out_proj, x, text_len: int, image_rotary_emb, group: bool, hidden, enc, gates):
    """``[enc, hidden] + gates * attn(x)`` (B, T + N, C) for ``CogVideoXAttnProcessor2_0``'s arithmetic (no mask)
    on the joint sequence ``x`` = [text, video] that the norm kernel produced (q, k and v read its codes), through
    8-bit attention where the processor is wrapped, ``out_proj`` (:func:`_joint_output_projection`) adding the
    text and video residuals with their gates (B, 2, C) in its epilogue. There the 8-bit attention applies the
    q / k LayerNorms (:func:`_qk_norm_args`) and the video tokens' rotary embedding itself, and in fp8 mode
    writes its output as the projection's fp8 codes (:func:`_quantizes_output_of_attention`)."""
    from diffusers.models.embeddings import apply_rotary_emb

    from .kernels.attention import quantized_attention, quantized_attention_quant_out

    batch = x.shape[0]
    projections = (attn.to_q, attn.to_k, attn.to_v)
    qkv = forward_group(projections, x) if group and not any(map(_hooked, projections)) else None
    query, key, value = qkv if qkv is not None else (p(x) for p in projections)
    head_dim = key.shape[-1] // attn.heads
    qk_norm = _qk_norm_args(attn, x.shape[1], head_dim)
    rope_ok, rope = _rope_args(image_rotary_emb, x.shape[1] - text_len, head_dim, text_len, x.device)
    if qk_norm is not None and rope_ok:
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if not torch.compiler.is_compiling():
            attn.processor.counts["quantized"] += 1
        if attn.processor.mode == "fp8" and _quantizes_output_of_attention(out_proj, attn.heads * head_dim):
            # the attention's epilogue quantizes its output for the projection, which reads the codes only
            codes = quantized_attention_quant_out(query, key, value, qk_norm=qk_norm, rope=rope,
                                                  smooth=out_proj.smooth_inv)
            out = query.new_empty(()).expand(batch, x.shape[1], attn.heads * head_dim)  # (no storage of its own)
            out_proj._input_cache.prime(out, codes)
            return _project(out_proj, out, hidden, gates, enc)
        out = quantized_attention(query, key, value, attn.processor.mode, qk_norm=qk_norm, rope=rope)
    else:
        query, key, value = _heads(attn, batch, query, key, value)
        if image_rotary_emb is not None:  # the video tokens only
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)
        with _sdpa_route(attn):
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
    return _project(out_proj, out, hidden, gates, enc)


def _norm_modulate_joint(norm_zero, hidden, enc, temb, layer, codes_only):
    """``CogVideoXLayerNormZero(hidden, enc, temb)`` as one joint sequence ``[enc, hidden]`` (the concatenation
    the attention and the feed-forward read), quantized for ``layer`` by the norm kernel (:func:`_norm_modulate`)
    → (joint y, the text and video gates (B, 2, C))."""
    shift, scale, gate, enc_shift, enc_scale, enc_gate = norm_zero.linear(norm_zero.silu(temb)).chunk(6, dim=1)
    y = _norm_modulate(norm_zero.norm, hidden, scale[:, None], shift[:, None], layer, codes_only,
                       prefix=(enc, enc_scale[:, None], enc_shift[:, None]))
    return y, torch.stack([enc_gate, gate], dim=1)


class FusedCogVideoXBlock(CogVideoXBlock):
    """CogVideoX block whose two LayerNormZero also quantize the inputs of q/k/v and of the feed-forward
    up-projection: one kernel normalizes, modulates and quantizes the text and the video tokens as the joint
    sequence those layers read (:func:`fuse_cogvideox_blocks`), so neither the norms' outputs, nor their
    concatenation, nor the quantization passes that would read them again touch memory. The residual stream
    runs as one [text, video] sequence too: the attention's output projection adds the text and video residuals,
    each with its own gate, in its GEMM epilogue (reading the two parts where they lie) and writes the joint
    result, the second norm and the feed-forward reads its two parts as views, and the block returns the video and
    text parts of the feed-forward's residual sum (views). Same arithmetic as diffusers' forward up to rounding
    (the norm and modulation round once, in the kernel, and so does the output projection with its residual).

    ``ff_residual_in_epilogue``: the feed-forward's down-projection adds its residual in the GEMM epilogue too.
    Off: on the H100 (session 27) that epilogue at K = 5120 took 0.73 ms against 0.67 for the GEMM and a separate
    gated-residual pass (Inductor's, under ``compile_blocks``), where at the output projection's K = 1920 it wins
    (0.33 vs 0.36 ms)."""

    ff_residual_in_epilogue = False

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
        attn, c = self.attn1, hidden_states.shape[-1]
        up = getattr(self.ff.net[0], "proj", None)
        out_proj = _joint_output_projection(attn)
        if attention_kwargs or hidden_states.dim() != 3 or encoder_hidden_states.dtype != hidden_states.dtype \
                or not _fusable(hidden_states) or out_proj is None \
                or not _quantizes_own_input(attn.to_q, c) or not _quantizes_own_input(up, c) \
                or any(map(_hooked, (self.norm1, self.norm1.norm, self.norm2, self.norm2.norm, self.ff))):
            return super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs)
        text_len = encoder_hidden_states.shape[1]
        x, gates = _norm_modulate_joint(self.norm1, hidden_states, encoder_hidden_states, temb, attn.to_q,
                                        _qkv_read_codes(attn))
        joint = _attend_joint(attn, out_proj, x, text_len, image_rotary_emb, getattr(self, "_viditq_group_qkv", True),
                              hidden_states, encoder_hidden_states, gates)  # the residual stream [text, video]
        hidden_states, encoder_hidden_states = joint[:, text_len:], joint[:, :text_len]
        x, gates = _norm_modulate_joint(self.norm2, hidden_states, encoder_hidden_states, temb, up,
                                        _codes_only_ff(self.ff, up))
        if self.ff_residual_in_epilogue:
            joint = _feed_forward(self.ff, x, hidden_states, gates, encoder_hidden_states)
        else:
            joint = add_residual(_feed_forward(self.ff, x), hidden_states, gates, encoder_hidden_states)
        return joint[:, text_len:], joint[:, :text_len]


def fuse_cogvideox_blocks(model: nn.Module, group_qkv: bool = True) -> int:
    """Give every CogVideoX block (diffusers ``CogVideoXBlock``) whose q/k/v and feed-forward up-projection the
    norm kernel can quantize (:func:`_quantizes_own_input`) the fused forward (idempotent); the up-projection and
    the attention's output projection get an input cache of their own. ``group_qkv``: q, k and v in one GEMM
    launch where the kernel can. Returns how many blocks have it."""
    def layer_norm(block):
        ok = isinstance(block.norm1.norm, nn.LayerNorm) and isinstance(block.norm2.norm, nn.LayerNorm)
        return block.norm1.norm if ok else None

    count = _fuse_blocks(model, CogVideoXBlock, FusedCogVideoXBlock, layer_norm, True, group_qkv)
    for block in model.modules():  # the output projection reads the attention's fp8 codes through a cache of its own
        out_proj = block.attn1.to_out[0] if isinstance(block, FusedCogVideoXBlock) else None
        if type(out_proj) is QuantLinear and _quantizes_own_input(out_proj, out_proj.spec.in_features) \
                and out_proj._input_cache is None:
            out_proj._input_cache, out_proj._input_index = SharedInputCache(1), 0
    return count
