"""Error-compensating rounding of weights (GPTQ, Frantar et al. 2023) from calibration activations.

Round-to-nearest quantizes every weight independently. GPTQ quantizes the input channels one at a time and pushes
each column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
output error ``H = X^T X`` (X: calibration inputs), so that ``X @ W_q^T`` stays close to ``X @ W^T``. Scales and
zero points are the same min-max ones as :func:`viditq.quant.quantizers.quantize_weight` (per output channel, or
per group of input channels, computed when the group is reached), so the result packs into the same QuantLinear.

In viditq the weight is first balanced (smoothing + rotation), so GPTQ runs on ``W' = (W * s) @ R`` with the
Hessian of the balanced inputs ``H' = R^T D H D R`` (``D = diag(1/s)``): exactly the matrix the kernel multiplies.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .quant.quantizers import QuantizedWeight, quantize_weight, resolve_group_size, signed_range

# Dampening added to the Hessian's diagonal, as a fraction of its mean (GPTQ's default): keeps the Cholesky
# factorization stable when calibration rows do not span every input direction.
DEFAULT_DAMP = 0.01
# Columns are processed in blocks so that the error update of the remaining columns is one matmul per block.
DEFAULT_BLOCK = 128


def _quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, lo: int, hi: int):
    """Codes (N,) and dequantized values (N,) of one column ``w`` (N,) with per-row scale/zero (N,)."""
    z = 0.0 if zero is None else zero
    codes = torch.round(w / scale + z).clamp_(lo, hi)
    return codes, (codes - z) * scale


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` (K, K) after dampening; dead channels get a unit diagonal."""
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h_inv, upper=True).float()


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    group_size: int | None = None,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK,
) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` (N, K) given the input Hessian ``hessian`` (K, K) ∝ X^T X.

    Group-wise scales (``group_size`` dividing K) are computed from the error-updated columns of each group when
    it is reached; group scales are rounded through float16 as QuantLinear stores them.
    """
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be ({k}, {k}) for a weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}")
    g = resolve_group_size(k, group_size)
    lo, hi = signed_range(bits, symmetric)
    block_size = max(g, block_size // g * g) if g < k else block_size
    u = _inverse_hessian_factor(hessian.to(weight.device), damp)
    w = weight.detach().float().clone()
    codes = torch.zeros(n, k, dtype=torch.int8, device=w.device)
    scales, zeros = [], []
    if g == k:  # per output channel: parameters from the whole original row
        whole = quantize_weight(w, bits, symmetric)
        scale, zero = whole.scale[:, 0], None if whole.zero is None else whole.zero[:, 0].float()
        scales, zeros = [whole.scale], [whole.zero]
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        wb, ub = w[:, b0:b1].clone(), u[b0:b1, b0:b1]  # (N, B), (B, B)
        err = torch.zeros_like(wb)
        for i in range(b1 - b0):
            if g < k and (b0 + i) % g == 0:  # new group: min-max parameters of its (already updated) columns
                qg = quantize_weight(wb[:, i:i + g], bits, symmetric)
                scale_dtype = torch.float16
                scale = qg.scale[:, 0].to(scale_dtype).float()
                zero = None if qg.zero is None else qg.zero[:, 0].float()
                scales.append(scale[:, None])
                zeros.append(None if qg.zero is None else qg.zero)
            col_codes, col_deq = _quantize_column(wb[:, i], scale, zero, lo, hi)
            codes[:, b0 + i] = col_codes.to(torch.int8)
            e = (wb[:, i] - col_deq) / ub[i, i]
            wb[:, i:] -= e[:, None] * ub[i, i:][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    scale_t = torch.cat(scales, 1)
    zero_t = None if symmetric else torch.cat(zeros, 1).to(torch.int8)
    return QuantizedWeight(codes, scale_t, zero_t, bits, g)


# ------------------------------------------------------------------------------------------ Hessians
@contextlib.contextmanager
def hessian_hooks(layers: dict[str, nn.Linear]):
    """While active, accumulate ``H = X^T X / rows`` (K, K) float32 of every layer's inputs; yields name → H.

    The dict is filled when the context exits (averaged over all rows seen).
    """
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, module.in_features).float()  # (tokens, K)
            if name not in sums:
                sums[name] = torch.zeros(module.in_features, module.in_features, device=x.device)
                rows[name] = 0
            sums[name].addmm_(x.T, x)
            rows[name] += x.shape[0]

        return hook

    result: dict[str, torch.Tensor] = {}
    handles = [layer.register_forward_pre_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
        result.update({name: s / max(rows[name], 1) for name, s in sums.items()})


def balanced_weight(layer, linear: nn.Linear) -> torch.Tensor:
    """The float weight (N, K) that ``layer`` (a QuantLinear built from ``linear``) quantizes: ``(W * s) @ R``."""
    w = linear.weight.detach().float()
    if layer.smooth_inv is not None:
        w = w / layer.smooth_inv[None, :]
    if layer.rot_matrix is not None:
        return w @ layer.rot_matrix
    if layer.rot_signs is not None:
        from .quant.hadamard import hadamard_rotate

        return hadamard_rotate(w, layer.rot_signs, layer.spec.rot_m, layer.spec.rot_block)
    return w


def balanced_hessian(layer, hessian: torch.Tensor) -> torch.Tensor:
    """``H' = B^T H B`` for the balancing map ``x → balance(x) = x @ B`` of ``layer`` (B = diag(1/s) @ R)."""
    h = hessian.to(layer.weight_scale.device).float()
    return layer.balance(layer.balance(h).T.contiguous())


def apply_gptq(layer, linear: nn.Linear, hessian: torch.Tensor, rows: torch.Tensor | None = None) -> bool:
    """Re-quantize ``layer``'s weights with GPTQ in its balanced basis. With calibration ``rows`` (R, K), the
    GPTQ weights are kept only if they reproduce the float layer better than the current ones. Returns whether
    they were kept."""
    spec = layer.spec
    qw = gptq_quantize(balanced_weight(layer, linear), balanced_hessian(layer, hessian), spec.weight_bits,
                       spec.weight_symmetric, spec.group_size)
    if rows is None:
        layer.set_quantized_weight(qw)
        return True
    with torch.no_grad():
        x = rows.to(linear.weight.device, linear.weight.dtype)
        reference = linear(x).float()
        before = (layer(x).float() - reference).pow(2).mean()
        saved = {n: b.clone() for n, b in layer.named_buffers() if n.startswith("weight_") or n == "stage_scale"}
        layer.set_quantized_weight(qw)
        after = (layer(x).float() - reference).pow(2).mean()
        if after <= before:
            return True
        for n, b in saved.items():
            getattr(layer, n).copy_(b)
    return False
