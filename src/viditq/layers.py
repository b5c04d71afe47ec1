"""QuantLinear: integer weights (int8 or packed int4) + per-token dynamic activation quantization.

The layer computes ``y = Q_act(balance(x)) @ Q_w(W')^T + b`` where ``balance(x) = (x * smooth_inv) @ R`` and
``W' = (W * smooth) @ R`` was folded offline (R: randomized Hadamard rotation, see ``quant.hadamard``). The
forward dispatches to Triton kernels on CUDA and to the PyTorch reference elsewhere (``kernels.dispatch``).
"""
from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .config import FLOAT_ACT_BITS
from .kernels import dispatch, reference
from .quant.hadamard import hadamard_rotate
from .quant.quantizers import (
    FP8_E4M3_MAX, dequantize_weight, pack_int4, quantize_per_tensor_static, quantize_weight, quantize_weight_fp8,
    resolve_group_size, signed_range,
)


@dataclass(frozen=True)
class LayerSpec:
    """Everything needed to rebuild an empty QuantLinear (saved in the checkpoint's JSON)."""

    in_features: int
    out_features: int
    bias: bool
    weight_bits: int
    weight_symmetric: bool
    group_size: int  # resolved: == in_features for per-output-channel / per-tensor
    act_bits: int
    weight_per_tensor: bool = False
    act_static: bool = False
    weight_only: bool = False  # no activation quantization (act_bits 16, text encoders): dequantized W, float matmul
    smooth: bool = False
    rotate: bool = False
    rot_m: int = 1  # Paley factor of the rotation (0: dense random orthogonal matrix)
    rot_block: int = 0  # block-diagonal rotation of runs of this many channels (0: the whole width)
    alpha: float | None = None  # chosen smoothing strength (informational)
    # Layers with the same input_group read the same input (q/k/v of one attention) and share their smoothing
    # and rotation: the quantized activation is computed once per forward and reused (install_input_sharing).
    input_group: str | None = None
    # Per-token fp8 e4m3 activations instead of integers, with fp8 e4m3 weights (8 bits, per-channel scales) or
    # packed int4 weights (staged to per-channel fp8 for the product)
    fp8: bool = False

    def __post_init__(self):
        fp8_capable = (self.weight_bits == 8 and self.weight_symmetric and self.group_size == self.in_features
                       and not self.weight_per_tensor)
        if self.fp8 and not ((fp8_capable or self.packed_int4) and (self.act_bits == 8 or self.weight_only)
                             and not self.act_static):
            raise ValueError(f"fp8 layer spec must be 8-bit symmetric per-channel (or packed int4) weights with "
                             f"dynamic 8-bit (or float) activations, got {self}")

    @property
    def packed_int4(self) -> bool:
        return self.weight_bits <= 4 and self.in_features % 2 == 0

    @property
    def fp8_weights(self) -> bool:
        return self.fp8 and not self.packed_int4

    @property
    def staged_grouped_int4(self) -> bool:
        """Packed int4 with group scales: requantized per channel for the product, with a stored scale."""
        return self.packed_int4 and self.group_size < self.in_features

    def to_dict(self) -> dict:
        return asdict(self)


class QuantLinear(nn.Module):
    """A quantized ``nn.Linear``: what :func:`viditq.quantize` puts in place of each layer it quantizes.

    Stores the weights as codes (int8, two int4 per byte, or fp8 e4m3) with per-channel or group scales, and the
    layer's smoothing and rotation; ``forward`` balances and quantizes its input per token (unless the layer is
    weight-only), runs the 8-bit product (Triton kernels on CUDA, the PyTorch reference elsewhere) and returns the
    float dtype of the model around it. ``spec`` (:class:`LayerSpec`) says how; :meth:`from_linear` builds one from
    a float layer; ``dequantized_weight()`` gives the weight it stands for.
    """

    def __init__(self, spec: LayerSpec, out_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.float_dtype = out_dtype  # dtype of the float model around this layer
        n, k = spec.out_features, spec.in_features
        groups = k // spec.group_size
        # Per-channel scales stay float32; group-wise ones are float16 so they cost 1/4 bit per weight at g64.
        scale_dtype = torch.float32 if groups == 1 else torch.float16
        if spec.fp8_weights:
            self.register_buffer("weight_codes", torch.empty(n, k, dtype=torch.float8_e4m3fn, device=device))
        elif spec.packed_int4:
            self.register_buffer("weight_codes", torch.empty(n, k // 2, dtype=torch.uint8, device=device))
        else:
            self.register_buffer("weight_codes", torch.empty(n, k, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(n, groups, dtype=scale_dtype, device=device))
        zero = None if spec.weight_symmetric else torch.empty(n, groups, dtype=torch.int8, device=device)
        self.register_buffer("weight_zero", zero)
        self.register_buffer("bias", torch.empty(n, dtype=out_dtype, device=device) if spec.bias else None)
        self.register_buffer("smooth_inv", torch.empty(k, device=device) if spec.smooth else None)
        if spec.rotate and spec.rot_m == 0:
            self.register_buffer("rot_matrix", torch.empty(k, k, device=device))
            self.register_buffer("rot_signs", None)
        else:
            self.register_buffer("rot_matrix", None)
            self.register_buffer("rot_signs", torch.empty(k, device=device) if spec.rotate else None)
        self.register_buffer("act_scale", torch.empty((), device=device) if spec.act_static else None)
        # Per-channel scale of the staged weights (reference.int4_stage_scale): derived from the stored ones, so it
        # is not saved but recomputed whenever they change (_store_weight, load_state_dict)
        self.register_buffer("stage_scale", torch.empty(n, 1, device=device) if spec.staged_grouped_int4 else None,
                             persistent=False)
        self._input_cache: SharedInputCache | None = None  # set by install_input_sharing, with
        self._input_index = 0  # this layer's place in the group (call order: q, k, v)
        self._weight_staging: WeightStaging | None = None  # packed int4 staged with its block's (install_weight_staging)
        self._staging_index = 0
        # run-time only (not saved): an activation applied to the output, fused into the GEMM epilogue where the
        # kernel runs (viditq.fusion.fuse_gelu: the tanh GELU after a feed-forward up-projection)
        self.fused_activation: str | None = None

    @property
    def weight(self) -> torch.Tensor:
        """Shape/dtype stand-in for model code that inspects ``linear.weight.dtype`` (T5, some diffusers blocks).
        It lives on the meta device: the values are in ``weight_codes`` / ``dequantized_weight()``."""
        return torch.empty(self.out_features, self.in_features, dtype=self.float_dtype, device="meta")

    def _apply(self, fn, recurse=True):
        # Casting the model (model.to(torch.bfloat16), .half()) must not round the scales, zero points, smoothing
        # or rotation tensors: they keep their dtype and only move device. The bias follows the model's dtype.
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            if name != "bias" and moved.dtype != buf.dtype:
                moved = buf.to(moved.device)
            self._buffers[name] = moved
        self.float_dtype = fn(torch.empty(0, dtype=self.float_dtype)).dtype
        return self

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        spec: LayerSpec,
        smooth: torch.Tensor | None = None,
        rotation: torch.Tensor | None = None,
        act_scale: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """Quantize ``linear``. ``smooth`` (K,) divides activations; ``rotation`` is the sign vector (K,) of the
        Hadamard rotation, or a dense (K, K) orthogonal matrix when ``spec.rot_m == 0``."""
        w = linear.weight.detach().float()
        layer = cls(spec, out_dtype=linear.weight.dtype, device=w.device)
        if smooth is not None:
            w = w * smooth[None, :]
            layer.smooth_inv.copy_(1.0 / smooth)
        if rotation is not None:
            if spec.rot_m == 0:
                w = w @ rotation
                layer.rot_matrix.copy_(rotation)
            else:
                w = hadamard_rotate(w, rotation, spec.rot_m, spec.rot_block)
                layer.rot_signs.copy_(rotation)
        layer._set_weight(w)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        if act_scale is not None:
            layer.act_scale.copy_(act_scale)
        return layer

    def _set_weight(self, w: torch.Tensor) -> None:
        spec = self.spec
        if spec.fp8_weights:
            qw = quantize_weight_fp8(w)
            codes, scale, zero = qw.codes, qw.scale, None
        elif spec.weight_per_tensor:  # naive baseline: one scale per tensor
            qw = quantize_weight(w.reshape(1, -1), spec.weight_bits, spec.weight_symmetric)
            codes = qw.codes.reshape(w.shape)
            scale = qw.scale.expand(w.shape[0], 1)
            zero = None if qw.zero is None else qw.zero.expand(w.shape[0], 1)
        else:
            qw = quantize_weight(w, spec.weight_bits, spec.weight_symmetric, spec.group_size)
            codes, scale, zero = qw.codes, qw.scale, qw.zero
        self._store_weight(codes, scale, zero)

    def set_quantized_weight(self, qw: QuantizedWeight) -> None:
        """Replace the weights by already quantized ones (e.g. from GPTQ) of this layer's bits and groups."""
        spec = self.spec
        if qw.codes.shape != (spec.out_features, spec.in_features) or qw.group_size != spec.group_size:
            raise ValueError(f"quantized weight {tuple(qw.codes.shape)} g{qw.group_size} does not fit layer "
                             f"({spec.out_features}, {spec.in_features}) g{spec.group_size}")
        self._store_weight(qw.codes, qw.scale, qw.zero)

    def _store_weight(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        self.weight_codes.copy_(pack_int4(codes) if self.spec.packed_int4 else codes)
        self.weight_scale.copy_(scale)
        if zero is not None:
            self.weight_zero.copy_(zero)
        self._update_stage_scale()

    def _update_stage_scale(self) -> None:
        if self.stage_scale is not None:
            self.stage_scale.copy_(reference.int4_stage_scale(self.weight_codes, self.weight_scale, self.weight_zero,
                                                              self.spec.group_size, self.spec.fp8))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._update_stage_scale()

    # -- run -----------------------------------------------------------------------------------------
    def balance(self, x2d: torch.Tensor) -> torch.Tensor:
        y = reference.balance_activation(x2d, self.smooth_inv, self.rot_signs, self.spec.rot_m, self.spec.rot_block)
        return y @ self.rot_matrix if self.rot_matrix is not None else y

    def dequantized_weight(self) -> torch.Tensor:
        """Float32 (N, K) weight as the integer codes represent it (balancing folded in)."""
        codes = reference.unpack_weight_codes(self.weight_codes, self.spec.packed_int4)
        return dequantize_weight(codes, self.weight_scale, self.weight_zero, self.spec.group_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                gate: torch.Tensor | None = None, residual_prefix: torch.Tensor | None = None) -> torch.Tensor:
        """``y = layer(x)``; with ``residual`` (x's shape but N channels) ``residual + gate * y`` (gate (B, 1, N):
        one row per batch element of a (B, T, K) input; or None: ``residual + y``), added in the GEMM epilogue
        where the kernel runs (the block's residual connection, see :mod:`viditq.fusion`), one rounding.
        ``residual_prefix``: the residual in two parts, (B, T, N) for x's first T tokens and ``residual`` for the
        rest, gate (B, 2, N) with a row for each (CogVideoX's text and video tokens, :func:`add_residual`)."""
        spec = self.spec
        if (gate is not None or residual_prefix is not None) and residual is None:
            raise ValueError("a gate needs a residual" if gate is not None else "a residual prefix needs a residual")
        if spec.weight_only:
            y = self.forward_float_act(x)
            return y if residual is None else add_residual(y, residual, gate, residual_prefix)
        codes, scale = self._input_codes(x)
        if residual is not None:
            if residual_prefix is None:
                residual = residual.reshape(-1, spec.out_features)  # (M, N)
            else:  # two (B, ·, N) parts, each with contiguous rows (any batch stride: views of one sequence)
                residual, residual_prefix = (t if t.stride(-1) == 1 and (t.shape[1] <= 1 or t.stride(1) == t.shape[2])
                                             else t.contiguous() for t in (residual, residual_prefix))
            if gate is not None:  # (B, N), or (B, 2, N) with a prefix
                gate = gate.reshape(gate.shape[0], *(() if residual_prefix is None else (2,)), spec.out_features)
        y = dispatch.int_linear(codes, scale, *self._gemm_weight(), self.bias, x.dtype, self.fused_activation,
                                self.stage_scale, residual, gate, residual_prefix)
        return y.reshape(*x.shape[:-1], spec.out_features)  # (..., N)

    def _gemm_weight(self) -> tuple:
        """(codes, scales, zero points, group size, packed) of the product: the layer's own, or its packed int4
        weights as its block staged them (per-channel int8 / fp8 codes and their scales, see WeightStaging)."""
        spec = self.spec
        staged = None if self._weight_staging is None else self._weight_staging.take(self._staging_index)
        if staged is not None:
            return staged, self.staged_weight_scale(), None, spec.in_features, False
        return self.weight_codes, self.weight_scale, self.weight_zero, spec.group_size, spec.packed_int4

    def _per_channel_product(self) -> bool:
        """Whether :meth:`_gemm_weight` will give per-channel codes without zero points (own or staged)."""
        spec = self.spec
        if spec.packed_int4:
            return self._weight_staging is not None and self._weight_staging.ready(self._staging_index)
        return spec.group_size == spec.in_features and self.weight_zero is None

    def forward_quantized_out(self, x: torch.Tensor, consumer: QuantLinear, bound: torch.Tensor) -> torch.Tensor:
        """This layer's output as ``consumer`` (the next layer, reading it alone, fp8 activations) quantizes it —
        with its smoothing, per token with the scales ``reference.range_scale`` of ``bound``
        (``reference.output_range`` of this layer's weights: :meth:`output_range`), in this layer's GEMM epilogue
        where the kernel runs (``dispatch.int_linear_quant_out``) — handed over through ``consumer``'s input
        cache; returns a stand-in of the output's shape and dtype that holds no values (``consumer`` must be the
        only reader: see ``viditq.fusion.fuse_gelu``)."""
        codes, scale = self._input_codes(x)
        out = dispatch.int_linear_quant_out(codes, scale, *self._gemm_weight(), self.bias, self.fused_activation,
                                            self.stage_scale, consumer.smooth_inv, bound)
        y = x.new_empty(()).expand(*x.shape[:-1], self.spec.out_features)  # (..., N), no storage of its own
        consumer._input_cache.prime(y, out)
        return y

    def output_range(self, smooth_inv: torch.Tensor | None) -> torch.Tensor:
        """``reference.output_range`` of this layer's GEMM (its weights as the GEMM multiplies them, bias, input
        code range, fused activation) for a consumer smoothing by ``smooth_inv``: the bound that
        :meth:`forward_quantized_out` quantizes with. A property of the stored weights: computed once (host)."""
        spec = self.spec
        stage = self.staged_weight_scale() if spec.packed_int4 else None
        wf = reference.gemm_weight(self.weight_codes, self.weight_scale, self.weight_zero, spec.group_size,
                                   spec.packed_int4, spec.fp8, stage)
        in_qmax = FP8_E4M3_MAX if spec.fp8 else float(signed_range(spec.act_bits, symmetric=True)[1])
        return reference.output_range(wf, self.bias, in_qmax, self.fused_activation, smooth_inv)

    def staged_weight_scale(self) -> torch.Tensor:
        """Per-channel float32 scales (N, 1) of this packed int4 layer's staged weights (``stage_scale``; per
        channel the layer's own scales)."""
        if self.stage_scale is not None:
            return self.stage_scale
        return reference.int4_stage_scale(self.weight_codes, self.weight_scale, self.weight_zero,
                                          self.spec.group_size, self.spec.fp8)

    def forward_float_act(self, x: torch.Tensor) -> torch.Tensor:
        """Float (16-bit) activations on the stored quantized weights: ``balance(x) @ Q_w(W')^T + b``.

        Exact without activation quantization since ``balance(x) @ W'^T = x @ W^T``; the balanced input is cast
        to ``x.dtype`` and multiplied by the dequantized weights (a float matmul, no second weight copy). Used by
        weight-only layers and by the A16 ranges of a :class:`TimestepSwitchLinear`."""
        spec = self.spec
        if spec.smooth or spec.rotate:
            x = self.balance(x.reshape(-1, spec.in_features)).to(x.dtype).reshape(x.shape)  # (..., K)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = nn.functional.linear(x, self.dequantized_weight().to(x.dtype), bias)  # (..., N)
        return reference.apply_activation(y, self.fused_activation)

    def _input_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized (balanced) input: codes (M, K) and scales (M, 1)."""
        spec = self.spec
        x2d = x.reshape(-1, spec.in_features)  # (M, K), M = batch * tokens
        if spec.act_static:
            codes = quantize_per_tensor_static(self.balance(x2d), self.act_scale, spec.act_bits)
            return codes, self.act_scale.float().expand(x2d.shape[0], 1)
        if self.rot_matrix is not None:
            return reference.quantize_activation(self.balance(x2d), spec.act_bits, fp8=spec.fp8)
        return self._quantize_input(x, x2d)

    def _quantize_input(self, x: torch.Tensor, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic per-token quantization of the (balanced) input, reused across the layer's input group."""
        cache = self._input_cache
        if cache is None:
            return self._quantize_2d(x2d)
        if torch.compiler.is_compiling():
            return cache.traced(x, self._input_index, lambda: self._quantize_2d(x2d))
        hit = cache.lookup(x)
        if hit is not None:
            return hit
        out = self._quantize_2d(x2d)
        cache.store(x, out)
        return out

    def _quantize_2d(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        return dispatch.quantize_activation(x2d, spec.act_bits, self.smooth_inv, self.rot_signs, spec.rot_m,
                                            spec.rot_block, spec.fp8)

    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        s = self.spec
        g = "per-channel" if s.group_size == s.in_features else f"g{s.group_size}"
        bal = "+".join(n for n, on in (("smooth", s.smooth), ("rotate", s.rotate)) if on) or "none"
        act = "float" if s.weight_only else ("static" if s.act_static else "per-token")
        fmt = "fp8 e4m3, " if s.fp8 else ""
        w_fmt = fmt if s.fp8_weights else ""
        return (f"in={s.in_features}, out={s.out_features}, W{s.weight_bits}({w_fmt}{g}, "
                f"{'sym' if s.weight_symmetric else 'asym'}), A{s.act_bits}({fmt}{act}), balance={bal}")


def forward_group(layers, x: torch.Tensor) -> list[torch.Tensor] | None:
    """The outputs of ``layers`` — QuantLinears of one input group (q, k and v of a self-attention, members of
    one :class:`SharedInputCache`) — on their input ``x``, their products in one GEMM launch
    (``dispatch.int_linear_group``: the tiles of all three fill the GPU's waves together); None where the layers
    do not qualify (no kernel, weight-only or static activations, a fused activation, group-wise or un-staged
    packed weights): call them one by one."""
    cache = getattr(layers[0], "_input_cache", None)
    if not (dispatch.use_triton(x) and cache is not None and cache.members == len(layers) and all(
            type(m) is QuantLinear and m._input_cache is cache and not m.spec.weight_only and not m.spec.act_static
            and m.rot_matrix is None and m.fused_activation is None and m._per_channel_product() for m in layers)):
        return None
    inputs = [m._input_codes(x) for m in layers]  # one quantization (or the producer's codes) for the group
    weights = [m._gemm_weight() for m in layers]
    if any(i is not inputs[0] for i in inputs):  # a member re-quantized: its own codes, one product each
        ys = [dispatch.int_linear(c, s, *w, m.bias, x.dtype) for (c, s), w, m in zip(inputs, weights, layers)]
    else:
        codes, scale = inputs[0]
        ys = dispatch.int_linear_group(codes, scale, [w[0] for w in weights], [w[1] for w in weights],
                                       [m.bias for m in layers], x.dtype)
    return [y.reshape(*x.shape[:-1], m.spec.out_features) for y, m in zip(ys, layers)]


class SharedInputCache:
    """The quantized input of the last call of an input group (layers that read one tensor with one balancing).

    A call hits when it gets the very tensor object the group last quantized, unmodified since (same version
    counter; inference-mode tensors have none and are matched by identity alone), so q, k and v of a
    self-attention quantize ``hidden_states`` once. The entry is dropped once every member has used it (no
    activation outlives the forward) or on the next miss. Under CUDA-graph capture the lookup runs once at
    capture time, so the graph holds one quantization kernel per group; under ``torch.compile`` :meth:`traced`
    does the same at trace time (compilers do not merge identical custom-op calls). Never copied or pickled.
    """

    def __init__(self, members: int):
        self.members = members
        self.clear()

    def clear(self) -> None:
        self._ref, self._version, self._out, self._uses = None, None, None, 0
        self._traced_x, self._traced_out, self._primed = None, None, False

    @staticmethod
    def _version_of(x: torch.Tensor):
        return None if x.is_inference() else x._version

    def lookup(self, x: torch.Tensor):
        if self._ref is None or self._ref() is not x or self._version_of(x) != self._version:
            return None
        out = self._out
        self._uses += 1
        if self._uses >= self.members:
            self.clear()
        return out

    def traced(self, x: torch.Tensor, index: int, quantize):
        """The compiled-code twin of lookup/store, traced by Dynamo: member ``index`` of the group reuses the
        quantized ``x`` of an earlier member if it got the very same tensor (an identity test, resolved at trace
        time), else quantizes it; the last member clears the entry, so no state outlives the traced region."""
        if self._traced_x is not x or (index == 0 and not self._primed):
            self._traced_x, self._traced_out = x, quantize()
        out = self._traced_out
        if index == self.members - 1:
            self._traced_x, self._traced_out, self._primed = None, None, False
        return out

    def prime(self, x: torch.Tensor, out) -> None:
        """``x``'s producer quantized it already (``out`` = codes, scales; the norm kernel of
        :mod:`viditq.fusion`): every member's lookup (eager) or traced call (compiled) gets ``out``."""
        if torch.compiler.is_compiling():
            self._traced_x, self._traced_out, self._primed = x, out, True
        else:
            self._ref, self._version, self._out, self._uses = weakref.ref(x), self._version_of(x), out, 0

    def store(self, x: torch.Tensor, out) -> None:
        if self.members <= 1:
            return
        self._ref, self._version, self._out, self._uses = weakref.ref(x), self._version_of(x), out, 1

    def __deepcopy__(self, memo):
        return SharedInputCache(self.members)

    def __getstate__(self):
        return {"members": self.members}

    def __setstate__(self, state):
        self.__init__(state["members"])


class WeightStaging:
    """A block's packed int4 layers staged together: one launch per forward (``int_gemm.stage_int4_many``)
    instead of one per layer.

    A W4 layer's product runs on per-channel int8 (fp8) weights staged from its packed int4 codes on every call
    (kernels.int_gemm): ten layers a PixArt block, each launch too small to fill the GPU (4.8 µs a layer at 0.67
    TB/s on an H200, 1.3 ms per forward). :func:`install_weight_staging` registers :meth:`before` and
    :meth:`after` as the block's forward pre-hook and (always-called) hook: before the block runs, its layers'
    weights are staged in one launch per kind; each layer takes its entry on its first call (:meth:`take`); a
    second call, or a layer the block did not reach, stages itself as before; the entries are dropped when the
    block returns, so at most one block's staged weights are alive (the memory a layer's own staging holds, times
    the block's layer count). The staged codes equal what each layer would stage alone, bit for bit. Only where
    the kernels run (CUDA weights, Triton backend); under ``torch.compile`` the staging is a custom op and the
    entries are set and taken while tracing (the state is cleared at the block's end: nothing outlives it)."""

    def __init__(self, layers: list[QuantLinear]):
        self.layers = list(layers)
        self._staged: list | None = None

    def before(self, module, args, kwargs=None):
        layers = [layer for layer in self.layers if dispatch.use_triton(layer.weight_codes)]
        self._staged = None
        if len(layers) < 2 or len({layer.spec.fp8 for layer in layers}) != 1:
            return
        codes = dispatch.stage_int4_many(
            [layer.weight_codes for layer in layers], [layer.weight_scale for layer in layers],
            [layer.weight_zero for layer in layers], [layer.spec.group_size for layer in layers],
            [layer.stage_scale for layer in layers], layers[0].spec.fp8)
        staged = [None] * len(self.layers)
        for layer, c in zip(layers, codes):
            staged[layer._staging_index] = c
        self._staged = staged

    def after(self, module, args, *rest):
        self._staged = None

    def ready(self, index: int) -> bool:
        """Whether layer ``index``'s staged codes wait to be taken."""
        return self._staged is not None and self._staged[index] is not None

    def take(self, index: int) -> torch.Tensor | None:
        """Layer ``index``'s staged codes (once), or None."""
        staged = self._staged
        if staged is None or staged[index] is None:
            return None
        out = staged[index]
        staged[index] = None
        return out


def install_weight_staging(model: nn.Module, enable: bool = True) -> int:
    """Give each repeated block of ``model`` (``viditq.compile.repeated_blocks``) with two or more packed int4
    QuantLinears (not weight-only, not a variant of a TimestepSwitchLinear, shapes the GEMM takes) a
    :class:`WeightStaging` (idempotent: an earlier one is replaced; ``enable=False`` only removes them, each
    layer then stages its own weights). Returns the number of blocks."""
    from .compile import repeated_blocks
    from .kernels import ops

    count = 0
    for block in repeated_blocks(model):
        old = getattr(block, "_viditq_weight_staging", None)
        if old is not None:
            for handle in old:
                handle.remove()
            block._viditq_weight_staging = None
        switched = {id(m) for s in block.modules() if isinstance(s, TimestepSwitchLinear) for m in s.modules()}
        layers = []
        for m in block.modules():
            if type(m) is QuantLinear:
                m._weight_staging = None
                s = m.spec
                if (id(m) not in switched and s.packed_int4 and not s.weight_only
                        and ops.gemm_supported(s.in_features, s.group_size, True)):
                    m._staging_index = len(layers)
                    layers.append(m)
        if len(layers) < 2 or not enable:
            continue
        staging = WeightStaging(layers)
        for m in layers:
            m._weight_staging = staging
        block._viditq_weight_staging = (block.register_forward_pre_hook(staging.before, with_kwargs=True),
                                        block.register_forward_hook(staging.after, always_call=True))
        count += 1
    return count


def add_residual(y: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor | None = None,
                 residual_prefix: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + gate * y`` (``residual + y`` without a gate), in PyTorch: what the GEMM epilogue adds. y (B, L,
    N); ``residual_prefix`` (B, T, N): the residual of y's first T tokens (``residual`` that of the rest), ``gate``
    then (B, 2, N), a row for each part."""
    if residual_prefix is None:
        return residual + (y if gate is None else gate * y)
    t = residual_prefix.shape[1]
    if gate is None:
        return torch.cat([residual_prefix + y[:, :t], residual + y[:, t:]], dim=1)
    return torch.cat([residual_prefix + gate[:, :1] * y[:, :t], residual + gate[:, 1:] * y[:, t:]], dim=1)


def _same_balancing(a: QuantLinear, b: QuantLinear) -> bool:
    def same(t, u):
        return (t is None and u is None) or (t is not None and u is not None and torch.equal(t, u))

    sa, sb = a.spec, b.spec
    return (sa.in_features == sb.in_features and sa.act_bits == sb.act_bits and sa.fp8 == sb.fp8
            and sa.rot_m == sb.rot_m
            and sa.rot_block == sb.rot_block
            and not (sa.act_static or sb.act_static or sa.weight_only or sb.weight_only)
            and same(a.smooth_inv, b.smooth_inv) and same(a.rot_signs, b.rot_signs)
            and a.rot_matrix is None and b.rot_matrix is None)


def install_input_sharing(model: nn.Module) -> int:
    """Give the QuantLinears of each ``spec.input_group`` one :class:`SharedInputCache` (idempotent).

    Groups whose members do not hold identical balancing tensors (edited by hand, say) are left unshared.
    Returns the number of shared groups."""
    groups: dict[str, list[QuantLinear]] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module._input_cache = None
            if module.spec.input_group is not None:
                groups.setdefault(module.spec.input_group, []).append(module)
    shared = 0
    for members in groups.values():
        if len(members) > 1 and all(_same_balancing(members[0], m) for m in members[1:]):
            cache = SharedInputCache(len(members))
            for i, m in enumerate(members):
                m._input_cache, m._input_index = cache, i
            shared += 1
    return shared


def make_layer_spec(linear: nn.Linear, weight, act, *, smooth=False, rotate=False, rot_m=1, rot_block=0,
                    alpha=None):
    """LayerSpec for ``linear`` from a config's WeightSpec / ActSpec."""
    k = linear.in_features
    group = k if weight.per_tensor else resolve_group_size(k, weight.group_size)
    weight_only = act.bits == FLOAT_ACT_BITS
    return LayerSpec(
        in_features=k, out_features=linear.out_features, bias=linear.bias is not None,
        weight_bits=weight.bits, weight_symmetric=weight.symmetric, group_size=group,
        act_bits=act.bits, weight_per_tensor=weight.per_tensor,
        act_static=act.granularity == "per_tensor_static" and not weight_only, weight_only=weight_only,
        smooth=smooth, rotate=rotate, rot_m=rot_m, rot_block=rot_block, alpha=alpha,
        fp8=weight.format == "fp8" or (act.format == "fp8" and not weight_only),
    )


# ------------------------------------------------------------------------------ timestep-dependent precision
class TimestepSwitchLinear(nn.Module):
    """A linear layer whose precision depends on the diffusion timestep (mixed precision over the schedule).

    ``variants`` holds one module per distinct stored precision the layer needs (``QuantLinear``, or the float
    ``nn.Linear`` under the key ``"fp"``); every copy is a real buffer, so memory reports count all of them.
    ``float_act`` maps further precision keys to a stored QuantLinear variant whose weights they run with float
    activations (``{"w8a16": "w8a8"}``: :meth:`QuantLinear.forward_float_act`, nothing stored).
    ``schedule`` is a list of ``(lo, hi, key)`` closed timestep intervals, searched in order; a timestep in none
    of them (or an unknown one) uses ``default``. The current timestep is set by :func:`install_timestep_hook`
    on the top model, from its ``timestep`` forward argument.
    """

    def __init__(self, variants: dict[str, nn.Module], schedule: list[tuple[float, float, str]], default: str,
                 float_act: dict[str, str] | None = None):
        super().__init__()
        float_act = dict(float_act or {})
        bad = {k: v for k, v in float_act.items() if k in variants or not isinstance(variants.get(v), QuantLinear)}
        if bad:
            raise ValueError(f"float_act {bad} must map new precision keys to QuantLinear variants "
                             f"(variants: {sorted(variants)})")
        known = set(variants) | set(float_act)
        unknown = {key for _, _, key in schedule} - known | ({default} - known)
        if unknown:
            raise ValueError(f"timestep schedule uses precisions {sorted(unknown)} with no variant "
                             f"(variants: {sorted(known)})")
        self.variants = nn.ModuleDict(variants)
        self.float_act = float_act
        self.schedule = [(float(lo), float(hi), key) for lo, hi, key in schedule]
        self.default = default
        self.timestep: float | None = None
        first = next(iter(variants.values()))
        self.in_features, self.out_features = first.in_features, first.out_features

    def active_key(self) -> str:
        t = self.timestep
        if t is not None:
            for lo, hi, key in self.schedule:
                if lo <= t <= hi:
                    return key
        return self.default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = self.active_key()
        if key in self.float_act:
            return self.variants[self.float_act[key]].forward_float_act(x)
        return self.variants[key](x)

    def schedule_dict(self) -> dict:
        """JSON-able description (saved in checkpoints next to the variants' LayerSpecs)."""
        return {"schedule": [list(s) for s in self.schedule], "default": self.default,
                "variants": list(self.variants), "float_act": dict(self.float_act)}

    def extra_repr(self) -> str:
        spans = ", ".join(f"[{lo:g}, {hi:g}]→{key}" for lo, hi, key in self.schedule)
        views = "".join(f", {k}=float acts on {v}" for k, v in self.float_act.items())
        return f"default={self.default}, schedule=({spans}){views}"


def current_timestep(args: tuple, kwargs: dict, position: int | None) -> float | None:
    """The scalar timestep of a transformer call: its ``timestep`` argument's first element (all samples of a
    CFG batch share it), or None when the call has none."""
    t = kwargs.get("timestep")
    if t is None and position is not None and position < len(args):
        t = args[position]
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    return float(t)


def timestep_position(model: nn.Module) -> int | None:
    """Where ``timestep`` stands among ``model.forward``'s parameters (for a positional call), or None."""
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    return params.index("timestep") if "timestep" in params else None


def install_timestep_hook(model: nn.Module) -> int:
    """Make every TimestepSwitchLinear of ``model`` follow the ``timestep`` argument of ``model``'s forward.

    Idempotent (an earlier hook is replaced). Returns the number of switching layers.
    """
    old = getattr(model, "_viditq_timestep_hook", None)
    if old is not None:
        old.remove()
        model._viditq_timestep_hook = None
    switches = [m for m in model.modules() if isinstance(m, TimestepSwitchLinear)]
    if not switches:
        return 0
    position = timestep_position(model)

    def hook(module, args, kwargs):
        t = current_timestep(args, kwargs, position)
        for layer in switches:
            layer.timestep = t

    model._viditq_timestep_hook = model.register_forward_pre_hook(hook, with_kwargs=True)
    return len(switches)
