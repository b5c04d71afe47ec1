"""QuantLinear: integer weights (int8 or packed int4) + per-token dynamic activation quantization.

The layer computes ``y = Q_act(balance(x)) @ Q_w(W')^T + b`` where ``balance(x) = (x * smooth_inv) @ R`` and
``W' = (W * smooth) @ R`` was folded offline (R: randomized Hadamard rotation, see ``quant.hadamard``). The
forward dispatches to Triton kernels on CUDA and to the PyTorch reference elsewhere (``kernels.dispatch``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .kernels import dispatch, reference
from .quant.hadamard import hadamard_rotate
from .quant.quantizers import pack_int4, quantize_per_tensor_static, quantize_weight, resolve_group_size


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
    smooth: bool = False
    rotate: bool = False
    rot_m: int = 1  # Paley factor of the rotation (0: dense random orthogonal matrix)
    alpha: float | None = None  # chosen smoothing strength (informational)

    @property
    def packed_int4(self) -> bool:
        return self.weight_bits <= 4 and self.in_features % 2 == 0

    def to_dict(self) -> dict:
        return asdict(self)


class QuantLinear(nn.Module):
    def __init__(self, spec: LayerSpec, out_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = spec.in_features, spec.out_features
        n, k = spec.out_features, spec.in_features
        groups = k // spec.group_size
        # Per-channel scales stay float32; group-wise ones are float16 so they cost 1/4 bit per weight at g64.
        scale_dtype = torch.float32 if groups == 1 else torch.float16
        if spec.packed_int4:
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
                w = hadamard_rotate(w, rotation, spec.rot_m)
                layer.rot_signs.copy_(rotation)
        layer._set_weight(w)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        if act_scale is not None:
            layer.act_scale.copy_(act_scale)
        return layer

    def _set_weight(self, w: torch.Tensor) -> None:
        spec = self.spec
        if spec.weight_per_tensor:  # naive baseline: one scale per tensor
            qw = quantize_weight(w.reshape(1, -1), spec.weight_bits, spec.weight_symmetric)
            codes = qw.codes.reshape(w.shape)
            scale = qw.scale.expand(w.shape[0], 1)
            zero = None if qw.zero is None else qw.zero.expand(w.shape[0], 1)
        else:
            qw = quantize_weight(w, spec.weight_bits, spec.weight_symmetric, spec.group_size)
            codes, scale, zero = qw.codes, qw.scale, qw.zero
        self.weight_codes.copy_(pack_int4(codes) if spec.packed_int4 else codes)
        self.weight_scale.copy_(scale)
        if zero is not None:
            self.weight_zero.copy_(zero)

    # -- run -----------------------------------------------------------------------------------------
    def balance(self, x2d: torch.Tensor) -> torch.Tensor:
        y = reference.balance_activation(x2d, self.smooth_inv, self.rot_signs, self.spec.rot_m)
        return y @ self.rot_matrix if self.rot_matrix is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        x2d = x.reshape(-1, spec.in_features)  # (M, K), M = batch * tokens
        if spec.act_static or self.rot_matrix is not None:
            xb = self.balance(x2d)
            if spec.act_static:
                codes = quantize_per_tensor_static(xb, self.act_scale, spec.act_bits)
                scale = self.act_scale.float().expand(x2d.shape[0], 1)
            else:
                codes, scale = reference.quantize_per_token(xb, spec.act_bits)
        else:
            codes, scale = dispatch.quantize_activation(
                x2d, spec.act_bits, self.smooth_inv, self.rot_signs, spec.rot_m
            )
        y = dispatch.int_linear(
            codes, scale, self.weight_codes, self.weight_scale, self.weight_zero,
            spec.group_size, spec.packed_int4, self.bias, x.dtype,
        )
        return y.reshape(*x.shape[:-1], spec.out_features)  # (..., N)

    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        s = self.spec
        g = "per-channel" if s.group_size == s.in_features else f"g{s.group_size}"
        bal = "+".join(n for n, on in (("smooth", s.smooth), ("rotate", s.rotate)) if on) or "none"
        act = "static" if s.act_static else "per-token"
        return (f"in={s.in_features}, out={s.out_features}, W{s.weight_bits}({g}, "
                f"{'sym' if s.weight_symmetric else 'asym'}), A{s.act_bits}({act}), balance={bal}")


def make_layer_spec(linear: nn.Linear, weight, act, *, smooth=False, rotate=False, rot_m=1, alpha=None):
    """LayerSpec for ``linear`` from a config's WeightSpec / ActSpec."""
    k = linear.in_features
    group = k if weight.per_tensor else resolve_group_size(k, weight.group_size)
    return LayerSpec(
        in_features=k, out_features=linear.out_features, bias=linear.bias is not None,
        weight_bits=weight.bits, weight_symmetric=weight.symmetric, group_size=group,
        act_bits=act.bits, weight_per_tensor=weight.per_tensor, act_static=act.granularity == "per_tensor_static",
        smooth=smooth, rotate=rotate, rot_m=rot_m, alpha=alpha,
    )
