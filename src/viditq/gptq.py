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
# diffusers video transformers whose 5-D input and output put the frames second: (B, C, F, H, W)
_CHANNELS_FIRST_VIDEO = ("WanTransformer3D", "LatteTransformer3D", "HunyuanVideoTransformer3D",
                         "MochiTransformer3D")


def video_frame_dim(model: nn.Module) -> int | None:
    """The frame axis of a video transformer's 5-D input and output: 1 for CogVideoX (B, F, C, H, W), 2 for Wan,
    Latte, HunyuanVideo and Mochi (B, C, F, H, W); None for other models."""
    name = type(model).__name__
    return 1 if name.startswith("CogVideoXTransformer3D") else 2 if name.startswith(_CHANNELS_FIRST_VIDEO) else None


def temporal_second_difference(x: torch.Tensor, frame_dim: int = 1) -> torch.Tensor:
    """``x[f+1] - 2 x[f] + x[f-1]`` along the frame axis ``frame_dim`` (zero for frames that change at a constant
    rate; frame-to-frame noise shows up at full size)."""
    n = x.shape[frame_dim]
    if n < 3:
        raise ValueError(f"need at least 3 frames along dim {frame_dim}, got shape {tuple(x.shape)}")
    return x.narrow(frame_dim, 2, n - 2) - 2 * x.narrow(frame_dim, 1, n - 2) + x.narrow(frame_dim, 0, n - 2)


def video_token_layout(model: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
    """(prefix tokens, frames, positions per frame) of the token sequence the blocks of a video transformer see
    in the call ``model(*args, **kwargs)`` — frame-major video tokens after ``prefix`` text tokens — or None for
    models whose layout is not known here (then no temporal term: plain GPTQ)."""
    name, cfg = type(model).__name__, getattr(model, "config", None)
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 5 or cfg is None:
        return None
    if name.startswith("CogVideoXTransformer3D"):  # (B, F, C, H, W), text tokens first in the joint sequence
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        p, pt = cfg.patch_size, getattr(cfg, "patch_size_t", None) or 1
        if not isinstance(text, torch.Tensor):
            return None
        return text.shape[1], -(-hidden.shape[1] // pt), (hidden.shape[3] // p) * (hidden.shape[4] // p)
    if name.startswith("WanTransformer3D"):  # (B, C, F, H, W), text through cross-attention
        pt, ph, pw = cfg.patch_size
        return 0, hidden.shape[2] // pt, (hidden.shape[3] // ph) * (hidden.shape[4] // pw)
    return None


def temporal_differences(x: torch.Tensor, layout: tuple[int, int, int] | None) -> torch.Tensor | None:
    """Second frame-to-frame differences ``x[f+1] - 2 x[f] + x[f-1]`` (rows, K) of the video tokens of a layer
    input ``x`` (B, S, K) laid out as ``layout`` (S = prefix + frames * positions, or frames * positions), or None
    where it does not match (or has fewer than 3 frames)."""
    if layout is None or x.dim() != 3:
        return None
    prefix, frames, positions = layout
    video = frames * positions
    if frames < 3 or x.shape[1] not in (prefix + video, video):
        return None
    v = x[:, x.shape[1] - video:].reshape(x.shape[0], frames, positions, x.shape[2])
    return temporal_second_difference(v, 1).reshape(-1, x.shape[2])


@contextlib.contextmanager
def hessian_hooks(layers: dict[str, nn.Linear], model: nn.Module | None = None, temporal: float = 0.0):
    """While active, accumulate ``H = X^T X / rows`` (K, K) float32 of every layer's inputs; yields name → H.

    With ``temporal`` > 0 and a video ``model`` (:func:`video_token_layout`), ``H`` also weighs the second
    frame-to-frame differences D of the inputs (:func:`temporal_differences`):
    ``H = X^T X / n + temporal * tr(X^T X / n) / tr(D^T D / m) * D^T D / m``, so that GPTQ's rounding also keeps
    how the outputs change from frame to frame (which flicker scores), not only the outputs. The dict is filled
    when the context exits (averaged over all rows seen).
    """
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    diff_sums: dict[str, torch.Tensor] = {}
    diff_rows: dict[str, int] = {}
    layout: list = [None]

    def accumulate(store, counts, name, x):
        if name not in store:
            store[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            counts[name] = 0
        store[name].addmm_(x.T, x)
        counts[name] += x.shape[0]

    def make_hook(name: str):
        def hook(module, args):
            x = args[0].detach().float()
            accumulate(sums, rows, name, x.reshape(-1, module.in_features))  # (tokens, K)
            d = temporal_differences(x, layout[0]) if temporal else None
            if d is not None:
                accumulate(diff_sums, diff_rows, name, d)

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(name)) for name, layer in layers.items()]
    if temporal and model is not None:
        handles.append(model.register_forward_pre_hook(
            lambda mod, args, kwargs: layout.__setitem__(0, video_token_layout(mod, args, kwargs)), with_kwargs=True))
    result: dict[str, torch.Tensor] = {}
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
        for name, s in sums.items():
            h = s / max(rows[name], 1)
            if name in diff_sums:
                dd = diff_sums[name] / diff_rows[name]
                h = h + temporal * (torch.trace(h) / torch.trace(dd).clamp_min(1e-30)) * dd
            result[name] = h


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
