"""8-bit attention (Triton, Hopper): INT8 Q·Kᵀ with per-block scales and K smoothing, online softmax, FP8/BF16 P·V.

``out = softmax(scale * Q Kᵀ + bias) V`` for ``q (B, H, Nq, D)``, ``k, v (B, H, Nkv, D)``, SageAttention-style:

1. **K smoothing**: ``K -= mean_tokens(K)`` per (batch, head, channel). Softmax is invariant to adding the same
   ``q · mean`` to every score of a row, and removing the common mean (large in DiTs) shrinks K's int8 range.
   **Channel balancing**: ``Q *= lam``, ``K /= lam`` per channel (exact for Q·Kᵀ), ``lam`` equalizing the
   channel ranges, so that an outlier channel of Q or K does not coarsen the other channels' int8 step.
2. **Per-block int8 Q and K**: one absmax scale per ``BLOCK_M`` query tokens / ``BLOCK_N`` key tokens and head.
   ``scale * LOG2E`` is folded into the Q scales so the softmax runs on ``exp2``.
3. **Online softmax** in float32 over key blocks (the flash-attention recurrence).
4. **P·V**: mode ``"fp8"``: P and V in fp8 e4m3 (V with per-channel scales, P shifted by ``log2(448)`` so its
   largest entry per row is 448 and small probabilities stay out of fp8's subnormal range); mode ``"int8"``:
   P and V in bf16 (only Q·Kᵀ is 8-bit).

On sm_90 the preparation's five launches (statistics, their finish per head, the Q, K and V quantization) and the
attention kernel chain by programmatic dependent launch (:mod:`pdl`); K's and V's quantization run alongside Q's.
The preparation can also apply the model's per-head q / k LayerNorms (``qk_norm``) and rotary embedding (``rope``)
as it reads q and k (CogVideoX's attention: ``viditq.fusion``), so the transformed q and k are never written.

Head dims up to 256 are padded to a power of two (72 → 128) in the quantized copies; sequence lengths are padded
to whole blocks and padded keys are masked. ``bias`` is an optional additive key-padding bias (B, H, Nkv), the
form text-padding masks take in cross-attention; masks that vary over queries are not supported here (the
integration in :mod:`viditq.attention` leaves those to the model's own SDPA).

:func:`quantized_attention_reference` is the PyTorch definition of the numerics (fake-quantized in float32, whole
softmax rows at once instead of online); :func:`quantized_attention_triton` is the kernel. Layout of the kernel's
quantized operands (all contiguous, padded):
  q codes (B·H, Nq_pad, D_pad) int8, q scales (B·H, Nq_pad / BLOCK_M) float32 (include ``scale * LOG2E``);
  k codes (B·H, Nkv_pad, D_pad) int8, k scales (B·H, Nkv_pad / BLOCK_N) float32;
  v: fp8 mode (B·H, D_pad, Nkv_pad) e4m3 (transposed: fp8 tensor cores want P·V's reduction dim contiguous;
     the keys of each 32 in the order P's registers hold them, :func:`_pv_key_position`)
     + per-channel scales (B·H, D_pad) float32; int8 mode (B·H, Nkv_pad, D_pad) bf16.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import pdl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a Triton without host-side tensor descriptors: pointer loads only
    TensorDescriptor = None
try:  # the FA3-structured fp8 kernel for sm_90 (Gluon); without its Hopper API, the tl kernel runs everything
    from . import ws_attention
except (ImportError, AttributeError):
    ws_attention = None

MODES = ("int8", "fp8")
LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)
INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
LOG2_FP8_E4M3_MAX = math.log2(FP8_E4M3_MAX)  # P = exp2(s - m + this) puts each row's largest P at 448
MASKED_SCORE = -1.0e30  # finite "minus infinity": a fully masked key block gives exp2(0) terms, not NaN
QUERY_CHUNK = 1024  # reference: query rows per chunk, to bound the (chunk, Nkv) score matrix
QKNorm = tuple  # (q_weight, q_bias, k_weight, k_bias, eps): per-head LayerNorms of q and k, weights (D,)
Rope = tuple  # (cos, sin, start): rotary embedding (S, D) tables of q's and k's tokens [start, start + S)


# ------------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class AttentionConfig:
    """Tile shape of the attention kernel; the quantization blocks of Q and K follow BLOCK_M / BLOCK_N."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    max_registers: int | None = None  # per thread (Triton's ``maxnreg``; with TMA loads): fewer, more programs per SM


def default_config(head_dim_padded: int, mode: str, n_kv: int = 4096) -> AttentionConfig:
    """Tiles measured best on an H100 for DiT shapes (benchmarks/NOTES.md, "8-bit attention"); no autotuning,
    so each shape compiles once."""
    if n_kv <= 256:  # cross-attention to text: one or two key blocks
        return AttentionConfig(128, 64, 8, 3)
    if mode == "fp8":  # at head dim <= 64, 128 registers: 4 programs per SM instead of 3 (7.73 vs 7.90 ms, H100)
        return AttentionConfig(64, 128, 4, 3, 128 if head_dim_padded <= 64 else None)
    return AttentionConfig(128, 128, 8, 3) if head_dim_padded >= 128 else AttentionConfig(128, 64, 4, 3)


def padded_head_dim(d: int) -> int:
    """Power of two >= max(d, 32) (32: int8 tensor-core K step)."""
    return max(32, triton.next_power_of_2(d))


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


# ------------------------------------------------------------------------------------------ reference
def fake_quant_per_block(x: torch.Tensor, block: int) -> torch.Tensor:
    """Symmetric int8 fake quantization of (B, H, N, D) with one absmax scale per ``block`` tokens and head."""
    b, h, n, d = x.shape
    n_pad = triton.cdiv(n, block) * block
    xp = torch.nn.functional.pad(x.float(), (0, 0, 0, n_pad - n)).view(b, h, n_pad // block, block, d)
    amax = xp.abs().amax(dim=(-2, -1), keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return (_round_half_away(xp / scale) * scale).view(b, h, n_pad, d)[:, :, :n]


def channel_balance(q: torch.Tensor, k: torch.Tensor, k_mean: torch.Tensor) -> torch.Tensor:
    """Per-channel factors ``lam`` (B, H, D) float32 with ``(q * lam) · (k / lam) = q · k`` that equalize the
    channel ranges of Q and of mean-smoothed K: ``lam = sqrt(max|k - mean| / max|q|)``. Outlier channels of Q
    (or K) then no longer set the int8 step of every other channel in their block."""
    q_amax = q.abs().amax(dim=2).float()
    k_min, k_max = torch.aminmax(k, dim=2)
    k_amax = torch.maximum(k_max.float() - k_mean, k_mean - k_min.float())
    return (k_amax.clamp_min(1e-6) / q_amax.clamp_min(1e-6)).sqrt().clamp(1e-3, 1e3)


def fake_quant_fp8(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest fp8 e4m3 value (saturating at ±448), back in float32."""
    return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()


def quantized_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: str,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    config: AttentionConfig | None = None,
    qk_norm: QKNorm | None = None,
    rope: Rope | None = None,
) -> torch.Tensor:
    """PyTorch definition of the kernel's numerics, in float32 on any device.

    q (B, H, Nq, D), k/v (B, H, Nkv, D), bias (B, H, Nkv) additive in natural-log units or None
    → (B, H, Nq, D) in q.dtype. ``qk_norm``: q and k go through their per-head LayerNorms first, in float32
    (:func:`layer_norm_heads`); ``rope``: then through that rotary embedding (:func:`rotary_heads`). Differs from
    the kernel only in rounding order: P is quantized relative to each row's final max here, to the running max
    there.
    """
    _check_inputs(q, k, v, mode, bias, qk_norm, rope)
    return _reference_float(q, k, v, mode, scale, bias, config, qk_norm, rope)[0].to(q.dtype)


def _reference_float(q, k, v, mode, scale, bias, config, qk_norm, rope):
    """:func:`quantized_attention_reference` in float32 (before the cast), and the fp8 V scales (B, H, D) (None
    in int8 mode)."""
    config = config or default_config(padded_head_dim(q.shape[-1]), mode, k.shape[2])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if qk_norm is not None:
        q, k = layer_norm_heads(q, *qk_norm[0:2], qk_norm[4]), layer_norm_heads(k, *qk_norm[2:4], qk_norm[4])
    if rope is not None:
        q, k = rotary_heads(q, *rope), rotary_heads(k, *rope)
    k_mean, balance, _, v_scale = attention_stats_reference(q, k, v if mode == "fp8" else None)
    balance = balance[:, :, None, :]  # (B, H, 1, D)
    q_dq = fake_quant_per_block(q.float() * balance, config.block_m) / balance
    k_dq = fake_quant_per_block((k.float() - k_mean[:, :, None]) / balance, config.block_n) * balance
    if mode == "fp8":
        v_scale = v_scale[:, :, None, :]  # (B, H, 1, D)
        v_dq = fake_quant_fp8(v.float() / v_scale) * v_scale
    else:
        v_dq = v.float()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for start in range(0, q.shape[2], QUERY_CHUNK):
        rows = slice(start, start + QUERY_CHUNK)
        s = (q_dq[:, :, rows] @ k_dq.transpose(-1, -2)) * (scale * LOG2E)  # (B, H, chunk, Nkv), log2 units
        if bias is not None:
            s = s + (bias.float() * LOG2E).clamp_min(MASKED_SCORE)[:, :, None, :]
        s_max = s.amax(dim=-1, keepdim=True)
        if mode == "fp8":
            p = torch.exp2(s - s_max + LOG2_FP8_E4M3_MAX)  # row max 448
            p_mma = fake_quant_fp8(p)
        else:
            p = torch.exp2(s - s_max)
            p_mma = p.to(torch.bfloat16).float()
        out[:, :, rows] = (p_mma @ v_dq) / p.sum(dim=-1, keepdim=True)
    return out, (v_scale[:, :, 0] if mode == "fp8" else None)


def layer_norm_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.layer_norm`` of (B, H, N, D) over D in float32 (a per-head q / k norm, as the kernels apply it)."""
    return torch.nn.functional.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps)


def rotary_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` (real form: pairs of adjacent channels) on tokens [start, start + S) of
    (B, H, N, D) with (S, D) ``cos`` / ``sin``, the others unchanged, in float32 (as the kernels apply it)."""
    x = x.float().clone()
    part = x[:, :, start:start + cos.shape[0]]
    rot = torch.stack([-part[..., 1::2], part[..., 0::2]], dim=-1).flatten(-2)
    x[:, :, start:start + cos.shape[0]] = part * cos.float() + rot * sin.float()
    return x


def _check_inputs(q, k, v, mode, bias, qk_norm=None, rope=None) -> None:
    if mode not in MODES:
        raise ValueError(f"quantized attention mode must be one of {MODES}, got {mode!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q, k, v of shape (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h) or k.shape[2] != v.shape[2] or k.shape[3] != d:
        raise ValueError(f"incompatible q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if v.shape[3] != d:
        raise ValueError(f"value head dim {v.shape[3]} must equal the query head dim {d}")
    if d > 256:
        raise ValueError(f"head dim must be <= 256, got {d}")
    if bias is not None and bias.shape != (b, h, k.shape[2]):
        raise ValueError(f"bias must have shape (B, H, Nkv) = {(b, h, k.shape[2])}, got {tuple(bias.shape)}")
    if qk_norm is not None:
        if len(qk_norm) != 5 or not all(isinstance(t, torch.Tensor) for t in qk_norm[:4]):
            raise ValueError("qk_norm must be (q_weight, q_bias, k_weight, k_bias, eps)")
        for name, t in zip(("q weight", "q bias", "k weight", "k bias"), qk_norm[:4]):
            if t.shape != (d,) or not t.is_floating_point() or t.device != q.device:
                raise ValueError(f"qk_norm {name} must be a float ({d},) tensor on {q.device}, got "
                                 f"{tuple(t.shape)} {t.dtype} on {t.device}")
        if not qk_norm[4] > 0:
            raise ValueError(f"qk_norm eps must be positive, got {qk_norm[4]!r}")
    if rope is not None:
        if len(rope) != 3 or not all(isinstance(t, torch.Tensor) for t in rope[:2]) or isinstance(rope[2], bool) \
                or not isinstance(rope[2], int):
            raise ValueError("rope must be (cos, sin, start)")
        cos, sin, start = rope
        if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != d or d % 2 or cos.stride(-1) != 1 \
                or sin.stride() != cos.stride() or not cos.is_floating_point() or not sin.is_floating_point() \
                or cos.device != q.device or sin.device != q.device:
            raise ValueError(f"rope cos / sin must be float (S, {d}) tables with contiguous channels on {q.device} "
                             f"(and D even), got {tuple(cos.shape)} / {tuple(sin.shape)}")
        if not 0 <= start <= min(q.shape[2], k.shape[2]) - cos.shape[0]:
            raise ValueError(f"rope start must place its {cos.shape[0]} tokens inside q's and k's "
                             f"{min(q.shape[2], k.shape[2])}, got {start}")


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _load_tile(X, stride_b, stride_h, stride_n, stride_d, pid_blk, pid_bh, H, N, D, BLOCK: tl.constexpr,
               HEAD_D: tl.constexpr):
    """Token block ``pid_blk`` of head ``pid_bh`` (= b·H + h) of a (B, H, N, D) tensor as a float32 (BLOCK, HEAD_D)
    tile, zero past N and D; with its token and channel offsets and mask."""
    offs_n = pid_blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_D)
    mask = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    ptrs = X + (pid_bh // H) * stride_b + (pid_bh % H) * stride_h + offs_n[:, None] * stride_n
    ptrs += offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), offs_n, offs_d, mask


@triton.jit
def _layer_norm_rows(x, mask, offs_d, NormW, NormB, eps, D):
    """The rows of a float32 tile (zero outside ``mask``) through a LayerNorm over their D channels with weight and
    bias (B·H-independent, (D,)): a per-head q / k norm; zero outside ``mask`` again."""
    d_ok = offs_d < D
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    w = tl.load(NormW + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    b = tl.load(NormB + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    return tl.where(mask, xc * rstd[:, None] * w[None, :] + b[None, :], 0.0)


@triton.jit
def _rotate_rows(x, offs_n, offs_d, Cos, Sin, stride_rope, rope_start, rope_len, D, HEAD_D: tl.constexpr):
    """Rotary embedding of the tile's tokens ``offs_n`` in [rope_start, rope_start + rope_len), with their rows of
    the (rope_len, D) cos / sin tables — diffusers' ``apply_rotary_emb`` (real form, pairs of adjacent channels):
    ``x * cos + rot(x) * sin``, rot(x)[2i] = -x[2i + 1], rot(x)[2i + 1] = x[2i]; other tokens as they are."""
    r = offs_n - rope_start
    ok = ((r >= 0) & (r < rope_len))[:, None] & (offs_d < D)[None, :]
    ptrs = r[:, None] * stride_rope + offs_d[None, :]
    cos = tl.load(Cos + ptrs, mask=ok, other=1.0).to(tl.float32)
    sin = tl.load(Sin + ptrs, mask=ok, other=0.0).to(tl.float32)
    even, odd = tl.split(tl.reshape(x, (x.shape[0], HEAD_D // 2, 2)))
    return x * cos + tl.reshape(tl.join(-odd, even), (x.shape[0], HEAD_D)) * sin


@triton.jit
def _prepare_rows(x, mask, offs_n, offs_d, NormW, NormB, norm_eps, Cos, Sin, stride_rope, rope_start, rope_len, D,
                  HEAD_D: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr):
    """q or k rows as the model's attention sees them: its per-head LayerNorm (``HAS_NORM``), then its rotary
    embedding (``HAS_ROPE``), in float32."""
    if HAS_NORM:
        x = _layer_norm_rows(x, mask, offs_d, NormW, NormB, norm_eps, D)
    if HAS_ROPE:
        x = _rotate_rows(x, offs_n, offs_d, Cos, Sin, stride_rope, rope_start, rope_len, D, HEAD_D)
    return x


@triton.jit
def _load_prepared(X, stride_b, stride_h, stride_n, stride_d, b, h, offs_t, offs_d, mask, NormW, NormB, norm_eps,
                   Cos, Sin, stride_rope, rope_start, rope_len, D, HEAD_D: tl.constexpr, HAS_NORM: tl.constexpr,
                   HAS_ROPE: tl.constexpr):
    """Tokens ``offs_t`` of head (b, h) of a (B, H, N, D) q or k as float32 rows through :func:`_prepare_rows`
    (zero outside ``mask``)."""
    ptrs = X + b * stride_b + h * stride_h + offs_t[:, None] * stride_n + offs_d[None, :] * stride_d
    return _prepare_rows(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), mask, offs_t, offs_d, NormW, NormB,
                         norm_eps, Cos, Sin, stride_rope, rope_start, rope_len, D, HEAD_D, HAS_NORM, HAS_ROPE)


@triton.jit
def _quantize_blocks_kernel(
    X, Mean, ChanScale, Codes, Scales, NormW, NormB, norm_eps, Cos, Sin, stride_rope, rope_start, rope_len,
    stride_xb, stride_xh, stride_xn, stride_xd,
    H, N, D, N_PAD, N_BLOCKS, multiplier,
    BLOCK: tl.constexpr, HEAD_D: tl.constexpr, HAS_MEAN: tl.constexpr, PDL: tl.constexpr, INDEPENDENT: tl.constexpr,
    HAS_NORM: tl.constexpr = False, HAS_ROPE: tl.constexpr = False,
):
    """One (BLOCK, HEAD_D) tile of one head, ``(x - mean) * chan_scale`` → int8 codes (zero in the padding) and
    one absmax scale; x through the head's LayerNorm and rotary embedding first where given
    (:func:`_prepare_rows`). ``INDEPENDENT``: runs alongside the grid before it (:func:`pdl.enter`)."""
    pdl.enter(PDL, INDEPENDENT)
    pid_blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    x, offs_n, offs_d, mask = _load_tile(X, stride_xb, stride_xh, stride_xn, stride_xd, pid_blk, pid_bh, H, N, D,
                                         BLOCK, HEAD_D)
    x = _prepare_rows(x, mask, offs_n, offs_d, NormW, NormB, norm_eps, Cos, Sin, stride_rope, rope_start, rope_len, D,
                      HEAD_D, HAS_NORM, HAS_ROPE)
    if HAS_MEAN:
        mean = tl.load(Mean + pid_bh * D + offs_d, mask=offs_d < D, other=0.0)
        x = tl.where(mask, x - mean[None, :], 0.0)
    x = x * tl.load(ChanScale + pid_bh * D + offs_d, mask=offs_d < D, other=0.0)[None, :]
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.where(amax > 0, amax / 127.0, 1.0)
    y = x / scale
    codes = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(0.5 - y))  # round half away from zero
    out_ptrs = Codes + pid_bh * N_PAD * HEAD_D + offs_n[:, None] * HEAD_D + offs_d[None, :]
    tl.store(out_ptrs, codes.to(tl.int8))
    tl.store(Scales + pid_bh * N_BLOCKS + pid_blk, scale * multiplier)
    pdl.leave(PDL, INDEPENDENT)


@triton.jit
def _pv_key_position(n):
    """Where the fp8 V operand stores key ``n``: within each 32 keys, key ``16h + 8j + 2t + p`` at ``16h + 4t +
    2j + p`` — the order in which a thread holds P's columns in the accumulator layout of the Q·Kᵀ product (per
    8 columns, 2 adjacent ones per thread) matches the k order the 8-bit P·V operand wants from it (4 adjacent
    ones per thread). :func:`_p_in_key_order` reorders P the same way, a relabeling of registers: no shuffles
    between the two products (FlashAttention-3 permutes V for the same reason)."""
    c = n % 32
    return n - c + (c & 16) + ((c >> 1) & 3) * 4 + ((c >> 3) & 1) * 2 + (c & 1)


@triton.jit
def _p_in_key_order(p, BLOCK_N: tl.constexpr):
    """P (BLOCK_M, BLOCK_N) with its columns in the fp8 V operand's key order (:func:`_pv_key_position`)."""
    tl.static_assert(BLOCK_N % 32 == 0)
    p = tl.reshape(p, (p.shape[0], BLOCK_N // 32, 2, 2, 4, 2))
    return tl.reshape(tl.permute(p, (0, 1, 2, 4, 3, 5)), (p.shape[0], BLOCK_N))


@triton.jit
def _quantize_v_fp8_kernel(
    V, VScale, Out,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, N, D, N_PAD,
    BLOCK: tl.constexpr, HEAD_D: tl.constexpr, PDL: tl.constexpr, INDEPENDENT: tl.constexpr,
):
    """One (BLOCK, HEAD_D) tile of V / per-channel scale → fp8 e4m3, stored transposed as (HEAD_D, N_PAD), the keys
    of each 32 in P·V order (:func:`_pv_key_position`). ``INDEPENDENT``: as in :func:`_quantize_blocks_kernel`."""
    pdl.enter(PDL, INDEPENDENT)
    pid_blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    v, offs_n, offs_d, _ = _load_tile(V, stride_vb, stride_vh, stride_vn, stride_vd, pid_blk, pid_bh, H, N, D,
                                      BLOCK, HEAD_D)
    v_scale = tl.load(VScale + pid_bh * HEAD_D + offs_d)
    v = tl.minimum(tl.maximum(v / v_scale[None, :], -448.0), 448.0)
    out_ptrs = Out + pid_bh * HEAD_D * N_PAD + offs_d[None, :] * N_PAD + _pv_key_position(offs_n)[:, None]
    tl.store(out_ptrs, v.to(tl.float8e4nv))
    pdl.leave(PDL, INDEPENDENT)


@triton.jit
def _attn_stats_kernel(
    Q, K, V, Part, NormQW, NormQB, NormKW, NormKB, norm_eps, Cos, Sin, stride_rope, rope_start, rope_len,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, N_Q, N_KV, D, Q_PER_SPLIT, KV_PER_SPLIT, STAT_STRIDE,
    BLOCK_T: tl.constexpr, HEAD_D: tl.constexpr, SPLITS: tl.constexpr, HAS_V: tl.constexpr, PDL: tl.constexpr,
    HAS_NORM: tl.constexpr = False, HAS_ROPE: tl.constexpr = False,
):
    """Partial per-channel statistics of one head over one token split: max|q|, sum k, min k, max k, max|v|
    → Part (5, B·H, SPLITS, HEAD_D) float32 (stat, head, split, channel). Reads Q, K, V once; (BLOCK_T, HEAD_D)
    accumulators, reduced over tokens once at the end. Of q and k through their heads' LayerNorms and rotary
    embedding where given (:func:`_prepare_rows`)."""
    pdl.enter(PDL)
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_D)
    d_ok = (offs_d < D)[None, :]
    q_amax = tl.zeros([BLOCK_T, HEAD_D], dtype=tl.float32)
    q_start = split * Q_PER_SPLIT
    q_end = tl.minimum(q_start + Q_PER_SPLIT, N_Q)
    for t in range(q_start, q_end, BLOCK_T):
        mask = ((t + offs_t) < q_end)[:, None] & d_ok
        q = _load_prepared(Q, stride_qb, stride_qh, stride_qn, stride_qd, b, h, t + offs_t, offs_d, mask, NormQW,
                           NormQB, norm_eps, Cos, Sin, stride_rope, rope_start, rope_len, D, HEAD_D, HAS_NORM,
                           HAS_ROPE)
        q_amax = tl.maximum(q_amax, tl.abs(q))
    k_sum = tl.zeros([BLOCK_T, HEAD_D], dtype=tl.float32)
    k_min = tl.full([BLOCK_T, HEAD_D], float("inf"), dtype=tl.float32)
    k_max = tl.full([BLOCK_T, HEAD_D], float("-inf"), dtype=tl.float32)
    v_amax = tl.zeros([BLOCK_T, HEAD_D], dtype=tl.float32)
    kv_start = split * KV_PER_SPLIT
    kv_end = tl.minimum(kv_start + KV_PER_SPLIT, N_KV)
    for t in range(kv_start, kv_end, BLOCK_T):
        mask = ((t + offs_t) < kv_end)[:, None] & d_ok
        k = _load_prepared(K, stride_kb, stride_kh, stride_kn, stride_kd, b, h, t + offs_t, offs_d, mask, NormKW,
                           NormKB, norm_eps, Cos, Sin, stride_rope, rope_start, rope_len, D, HEAD_D, HAS_NORM,
                           HAS_ROPE)
        k_sum += k
        k_min = tl.minimum(k_min, tl.where(mask, k, float("inf")))
        k_max = tl.maximum(k_max, tl.where(mask, k, float("-inf")))
        if HAS_V:
            ptrs = V + b * stride_vb + h * stride_vh + (t + offs_t)[:, None] * stride_vn + offs_d[None, :] * stride_vd
            v_amax = tl.maximum(v_amax, tl.abs(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)))
    out = Part + (pid_bh * SPLITS + split) * HEAD_D + offs_d
    tl.store(out, tl.max(q_amax, axis=0))
    tl.store(out + STAT_STRIDE, tl.sum(k_sum, axis=0))
    tl.store(out + 2 * STAT_STRIDE, tl.min(k_min, axis=0))
    tl.store(out + 3 * STAT_STRIDE, tl.max(k_max, axis=0))
    if HAS_V:
        tl.store(out + 4 * STAT_STRIDE, tl.max(v_amax, axis=0))


@triton.jit
def _attn_stats_finish_kernel(
    Part, Mean, Balance, InvBalance, VScale, n_kv, D, STAT_STRIDE,
    HEAD_D: tl.constexpr, SPLITS: tl.constexpr, HAS_V: tl.constexpr, PDL: tl.constexpr,
):
    """One head: the splits' statistics → K mean, balance ``lam`` and ``1 / lam`` (B·H, D) (the arithmetic of
    :func:`channel_balance`, IEEE-rounded), fp8 V scales (B·H, HEAD_D) (1 in the padding)."""
    pdl.enter(PDL)
    pid_bh = tl.program_id(0)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, HEAD_D)
    idx = Part + (pid_bh * SPLITS + offs_s)[:, None] * HEAD_D + offs_d[None, :]
    q_amax = tl.max(tl.load(idx), axis=0)
    mean = tl.math.div_rn(tl.sum(tl.load(idx + STAT_STRIDE), axis=0), tl.full([HEAD_D], n_kv, tl.float32))
    k_min = tl.min(tl.load(idx + 2 * STAT_STRIDE), axis=0)
    k_max = tl.max(tl.load(idx + 3 * STAT_STRIDE), axis=0)
    k_amax = tl.maximum(k_max - mean, mean - k_min)
    lam = tl.math.sqrt_rn(tl.math.div_rn(tl.maximum(k_amax, 1e-6), tl.maximum(q_amax, 1e-6)))
    lam = tl.minimum(tl.maximum(lam, 1e-3), 1e3)
    d_ok = offs_d < D
    tl.store(Mean + pid_bh * D + offs_d, mean, mask=d_ok)
    tl.store(Balance + pid_bh * D + offs_d, lam, mask=d_ok)
    tl.store(InvBalance + pid_bh * D + offs_d, tl.math.div_rn(tl.full([HEAD_D], 1.0, tl.float32), lam), mask=d_ok)
    if HAS_V:
        v_amax = tl.max(tl.load(idx + 4 * STAT_STRIDE), axis=0)
        v_scale = tl.maximum(tl.math.div_rn(v_amax, tl.full([HEAD_D], 448.0, tl.float32)), 1e-12)
        tl.store(VScale + pid_bh * HEAD_D + offs_d, tl.where(d_ok, v_scale, 1.0))


@triton.jit
def _softmax_pv(
    acc, m_i, l_i, qk, qk_scale, v, Bias, start_n, N_KV,
    BLOCK_N: tl.constexpr, MASK_KV: tl.constexpr, HAS_BIAS: tl.constexpr, PV_FP8: tl.constexpr,
):
    """Online-softmax update with one key/value block: integer scores qk (BLOCK_M, BLOCK_N), v (fp8: (HEAD_D,
    BLOCK_N), transposed; bf16: (BLOCK_N, HEAD_D)) → (acc, m_i, l_i). The P·V product accumulates into the
    rescaled acc (one accumulator: 9 registers fewer than ``acc * alpha + P·V`` at CogVideoX's tile).

    Scores are in log2 units after ``* qk_scale`` (scale * LOG2E is folded into the Q scales)."""
    # fp8: shift by log2(448) so that each row's largest P is 448, the top of e4m3's range (acc and l share it).
    p_shift = 8.807354922057604 if PV_FP8 else 0.0
    if MASK_KV or HAS_BIAS:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = qk.to(tl.float32) * qk_scale
        if HAS_BIAS:
            s += tl.load(Bias + offs_n)[None, :]
        if MASK_KV:
            s = tl.where((offs_n < N_KV)[None, :], s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - (m_new - p_shift)[:, None])
    else:
        # Hot path: row max on the integers (the scale is one positive scalar per tile), then one FFMA and one
        # exp2 per score.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1).to(tl.float32) * qk_scale)
        p = tl.math.exp2(qk.to(tl.float32) * qk_scale - (m_new - p_shift)[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    acc = acc * alpha[:, None]
    if PV_FP8:
        acc = tl.dot(_p_in_key_order(p.to(tl.float8e4nv), BLOCK_N), tl.trans(v), acc)
    else:
        acc = tl.dot(p.to(tl.bfloat16), v, acc)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return acc, m_new, l_i


@triton.jit
def _load_kv(K8, V, pid_bh, j, NKV_PAD, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, PV_FP8: tl.constexpr,
             TMA: tl.constexpr):
    """Key block ``j`` of head ``pid_bh``: K codes (BLOCK_N, HEAD_D) and V (module docstring's layouts), from
    tensor descriptors (``TMA``: K8 and V are descriptors of the 2-D views) or pointers. The offsets are computed
    from ``j`` each trip: 32-bit arithmetic, where advancing 64-bit pointer tensors cost registers and adds."""
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    if TMA:
        k = K8.load([pid_bh * NKV_PAD + j * BLOCK_N, 0])
        v = V.load([pid_bh * HEAD_D, j * BLOCK_N])
    else:
        k = tl.load(K8 + pid_bh * NKV_PAD * HEAD_D + offs_n[:, None] * HEAD_D + offs_d[None, :])
        if PV_FP8:
            v = tl.load(V + pid_bh * HEAD_D * NKV_PAD + offs_d[:, None] * NKV_PAD + offs_n[None, :])
        else:
            v = tl.load(V + pid_bh * NKV_PAD * HEAD_D + offs_n[:, None] * HEAD_D + offs_d[None, :])
    return k, v


@triton.jit
def _attn_fwd_kernel(
    Q8, K8, V, QScale, KScale, VScale, Bias, Out,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N_Q, N_KV, N_UNMASKED, D, NQ_PAD, NKV_PAD,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    PV_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, TMA: tl.constexpr, PDL: tl.constexpr,
    OutScale=None, Smooth=None, TokenScale=None, QUANT_OUT: tl.constexpr = False, HAS_SMOOTH: tl.constexpr = False,
):
    """One (BLOCK_M, HEAD_D) output tile of one head. Grid (Nq_pad / BLOCK_M, B·H): the query blocks of a head
    run next to each other, so that head's K and V stay in L2. ``TMA``: K8 and V are tensor descriptors."""
    pdl.enter(PDL)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    q = tl.load(Q8 + pid_bh * NQ_PAD * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :])
    q_scale = tl.load(QScale + pid_bh * (NQ_PAD // BLOCK_M) + pid_m)
    k_scales = KScale + pid_bh * (NKV_PAD // BLOCK_N)
    bias_ptr = Bias + pid_bh * NKV_PAD
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    # Key blocks [0, N_UNMASKED) need no padding mask (with a bias, padded keys already carry MASKED_SCORE).
    n_blocks = N_UNMASKED // BLOCK_N
    for j in range(0, n_blocks):
        k, v = _load_kv(K8, V, pid_bh, j, NKV_PAD, BLOCK_N, HEAD_D, PV_FP8, TMA)
        qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32)  # (BLOCK_M, BLOCK_N) exact integers
        acc, m_i, l_i = _softmax_pv(
            acc, m_i, l_i, qk, q_scale * tl.load(k_scales + j), v, bias_ptr, j * BLOCK_N, N_KV,
            BLOCK_N, False, HAS_BIAS, PV_FP8)
    if N_UNMASKED < N_KV:  # the last, partial key block
        k, v = _load_kv(K8, V, pid_bh, n_blocks, NKV_PAD, BLOCK_N, HEAD_D, PV_FP8, TMA)
        qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
        acc, m_i, l_i = _softmax_pv(
            acc, m_i, l_i, qk, q_scale * tl.load(k_scales + n_blocks), v, bias_ptr, N_UNMASKED, N_KV,
            BLOCK_N, True, HAS_BIAS, PV_FP8)
    out = acc / l_i[:, None]
    if PV_FP8:
        out = out * tl.load(VScale + pid_bh * HEAD_D + offs_d)[None, :]
    b = pid_bh // H
    h = pid_bh % H
    if QUANT_OUT:  # fp8 codes of the output (times the next layer's smoothing) with the batch entry's scale
        if HAS_SMOOTH:
            out = out * tl.load(Smooth + h * D + offs_d, mask=offs_d < D, other=0.0)[None, :]
        token_scale = tl.load(OutScale + b)
        out = tl.minimum(tl.maximum(out / token_scale, -448.0), 448.0)
        if h == 0:  # every token of the entry carries that scale
            tl.store(TokenScale + b * N_Q + offs_m, tl.zeros([BLOCK_M], tl.float32) + token_scale, mask=offs_m < N_Q)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m < N_Q)[:, None] & (offs_d < D)[None, :])


# ------------------------------------------------------------------------------------------ launchers
def attention_stats_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(k mean, balance lam, 1 / lam) (B, H, D) float32 and the fp8 V scales (B, H, D) (None without v): what
    :func:`attention_stats` computes, in PyTorch (:func:`quantized_attention_reference`'s definitions)."""
    k_mean = k.float().mean(dim=2)
    balance = channel_balance(q, k, k_mean)
    v_scale = None if v is None else (v.float().abs().amax(dim=2) / FP8_E4M3_MAX).clamp_min(1e-12)
    return k_mean, balance, 1.0 / balance, v_scale


STATS_PROGRAMS = 512  # statistics pass: about this many programs (B·H x token splits, rounded up to a power of two
# per head); elements per step: :func:`stats_tile`. From the H100 sweep of session 21; A/B in session 24 (H100, whole
# preparation in a CUDA graph): PixArt 0.144 → 0.130 ms, CogVideoX 0.468 → 0.421 ms against 1024 programs of 2048
# (ncu: those left PixArt's statistics pass at 1.55 waves, latency-bound at 35 % of DRAM bandwidth)


def stats_tile(head_dim_padded: int) -> int:
    """Elements per step of a statistics program (:func:`attention_stats`) at this padded head dim."""
    return 4096 if head_dim_padded >= 128 else 1024


def attention_stats(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, head_dim_padded: int,
    programs: int = STATS_PROGRAMS, tile: int | None = None, num_warps: int = 4, qk_norm: QKNorm | None = None,
    rope: Rope | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One pass over Q, K (and V) in token splits and a finishing launch per head: k mean, lam, 1 / lam (B·H, D)
    float32 and the fp8 V scales (B·H, head_dim_padded) (1 in the padding; None without v) —
    :func:`attention_stats_reference`, with the K sum in another order (split sums); ``qk_norm`` / ``rope``: of q
    and k through their per-head LayerNorms / rotary embedding. About ``programs`` programs of ``num_warps``
    warps, each stepping over ``tile / head_dim_padded`` tokens at a time (the launch shape swept in
    benchmarks/exp/prep_sweep.py; default :func:`stats_tile`)."""
    b, h, n_q, d = q.shape
    n_kv = k.shape[2]
    tile = tile or stats_tile(head_dim_padded)
    block_t = max(8, tile // head_dim_padded)
    splits = triton.next_power_of_2(max(1, min(triton.cdiv(programs, b * h),
                                               triton.cdiv(max(n_q, n_kv), block_t))))
    part = torch.empty((5, b * h, splits, head_dim_padded), dtype=torch.float32, device=q.device)
    stat_stride = part[0].numel()
    v_arg = v if v is not None else k

    def per_split(n):  # tokens per split, whole BLOCK_T steps
        return triton.cdiv(triton.cdiv(n, splits), block_t) * block_t

    norm_args = (part,) * 4 + (0.0,) if qk_norm is None else (*(t.contiguous() for t in qk_norm[:4]), qk_norm[4])
    _attn_stats_kernel[(splits, b * h)](
        q, k, v_arg, part, *norm_args, *_rope_args(rope, part), *q.stride(), *k.stride(), *v_arg.stride(), h, n_q,
        n_kv, d, per_split(n_q), per_split(n_kv), stat_stride, BLOCK_T=block_t, HEAD_D=head_dim_padded,
        SPLITS=splits, HAS_V=v is not None, HAS_NORM=qk_norm is not None, HAS_ROPE=rope is not None,
        num_warps=num_warps, **pdl.launch_options(q.device))
    mean, balance, inv_balance = (torch.empty((b * h, d), dtype=torch.float32, device=q.device) for _ in range(3))
    v_scale = torch.empty((b * h, head_dim_padded), dtype=torch.float32, device=q.device) if v is not None else None
    _attn_stats_finish_kernel[(b * h,)](
        part, mean, balance, inv_balance, v_scale if v_scale is not None else mean, float(n_kv), d, stat_stride,
        HEAD_D=head_dim_padded, SPLITS=splits, HAS_V=v is not None, num_warps=4, **pdl.launch_options(q.device))
    return mean, balance, inv_balance, v_scale


def _rope_args(rope: Rope | None, dummy: torch.Tensor) -> tuple:
    """The kernels' rotary-embedding arguments: cos, sin, their row stride, first token, tokens."""
    if rope is None:
        return dummy, dummy, 0, 0, 0
    cos, sin, start = rope
    return cos, sin, cos.stride(0), start, cos.shape[0]


def quantize_per_block(
    x: torch.Tensor, block: int, head_dim_padded: int, chan_scale: torch.Tensor, multiplier: float = 1.0,
    mean: torch.Tensor | None = None, independent: bool = False,
    norm: tuple[torch.Tensor, torch.Tensor, float] | None = None, rope: Rope | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, N, D) → int8 codes of ``(x - mean) * chan_scale`` (B·H, N_pad, D_pad), scales (B·H, N_pad / block)
    float32 (times multiplier). ``mean`` (B·H, D) float32 or None, ``chan_scale`` (B·H, D) float32; ``norm =
    (weight, bias, eps)``: x through that per-head LayerNorm first, ``rope``: then through that rotary embedding.
    ``independent``: the kernel launched just before reads and writes none of these tensors (this one may run
    alongside it, :func:`pdl.enter`)."""
    b, h, n, d = x.shape
    n_blocks = triton.cdiv(n, block)
    codes = torch.empty((b * h, n_blocks * block, head_dim_padded), dtype=torch.int8, device=x.device)
    scales = torch.empty((b * h, n_blocks), dtype=torch.float32, device=x.device)
    mean_arg = mean.contiguous() if mean is not None else scales
    _quantize_blocks_kernel[(n_blocks, b * h)](
        x, mean_arg, chan_scale.contiguous(), codes, scales,
        *((scales, scales, 0.0) if norm is None else (norm[0].contiguous(), norm[1].contiguous(), norm[2])),
        *_rope_args(rope, scales), *x.stride(), h, n, d, n_blocks * block, n_blocks, multiplier, BLOCK=block,
        HEAD_D=head_dim_padded, HAS_MEAN=mean is not None, INDEPENDENT=independent, HAS_NORM=norm is not None,
        HAS_ROPE=rope is not None, **pdl.launch_options(x.device))
    return codes, scales


def quantize_v_fp8(
    v: torch.Tensor, block: int, head_dim_padded: int, v_scale: torch.Tensor, independent: bool = False
) -> torch.Tensor:
    """(B, H, N, D) with per-channel scales (B·H, D_pad) → fp8 e4m3 codes (B·H, D_pad, N_pad) (transposed, keys
    in P·V order). ``independent``: as in :func:`quantize_per_block`."""
    b, h, n, d = v.shape
    n_blocks = triton.cdiv(n, block)
    codes = torch.empty((b * h, head_dim_padded, n_blocks * block), dtype=torch.float8_e4m3fn, device=v.device)
    _quantize_v_fp8_kernel[(n_blocks, b * h)](
        v, v_scale, codes, *v.stride(), h, n, d, n_blocks * block, BLOCK=block, HEAD_D=head_dim_padded,
        INDEPENDENT=independent, **pdl.launch_options(v.device))
    return codes


def _pad_v_bf16(v: torch.Tensor, block: int, head_dim_padded: int) -> torch.Tensor:
    """(B, H, N, D) → bf16 (B·H, N_pad, D_pad), zero padded."""
    b, h, n, d = v.shape
    n_pad = triton.cdiv(n, block) * block
    if n_pad == n and d == head_dim_padded and v.dtype == torch.bfloat16:
        return v.reshape(b * h, n, d).contiguous()
    out = torch.zeros((b, h, n_pad, head_dim_padded), dtype=torch.bfloat16, device=v.device)
    out[:, :, :n, :d] = v
    return out.view(b * h, n_pad, head_dim_padded)


def _bias_log2(bias: torch.Tensor, n_pad: int) -> torch.Tensor:
    """(B, H, Nkv) natural-log additive bias → (B·H, Nkv_pad) float32 in log2 units, padding masked."""
    b, h, n = bias.shape
    out = torch.full((b * h, n_pad), MASKED_SCORE, dtype=torch.float32, device=bias.device)
    out[:, :n] = (bias.float() * LOG2E).clamp_min(MASKED_SCORE).reshape(b * h, n)
    return out


@dataclass
class QuantizedOperands:
    """Padded, quantized kernel operands (layouts in the module docstring)."""

    q8: torch.Tensor
    q_scale: torch.Tensor
    k8: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor | None
    bias: torch.Tensor | None


def quantize_operands(q, k, v, mode: str, scale: float, bias, config: AttentionConfig,
                      qk_norm: QKNorm | None = None, rope: Rope | None = None) -> QuantizedOperands:
    """Step 1-2 of the module docstring (and V to fp8 / padded bf16): one statistics pass over Q, K (and V),
    then one quantization pass over each; ``qk_norm`` / ``rope``: q and k through their per-head LayerNorms and
    rotary embedding in both (the transformed q and k are never written)."""
    head_d = padded_head_dim(q.shape[-1])
    k_mean, balance, inv_balance, v_scale = attention_stats(q, k, v if mode == "fp8" else None, head_d,
                                                            qk_norm=qk_norm, rope=rope)
    q_norm = k_norm = None
    if qk_norm is not None:
        q_norm, k_norm = (*qk_norm[0:2], qk_norm[4]), (*qk_norm[2:4], qk_norm[4])
    # Q's launch waits for the statistics; K's and V's read nothing the launch before them writes, so on sm_90 the
    # three quantization grids overlap (programmatic dependent launch), each with its own registers
    q8, q_scale = quantize_per_block(q, config.block_m, head_d, balance, multiplier=scale * LOG2E, norm=q_norm,
                                     rope=rope)
    k8, k_scale = quantize_per_block(k, config.block_n, head_d, inv_balance, mean=k_mean, independent=True,
                                     norm=k_norm, rope=rope)
    if mode == "fp8":
        v_op = quantize_v_fp8(v, config.block_n, head_d, v_scale, independent=True)
    else:
        v_op, v_scale = _pad_v_bf16(v, config.block_n, head_d), None
    bias_op = _bias_log2(bias, k8.shape[1]) if bias is not None else None
    return QuantizedOperands(q8, q_scale, k8, k_scale, v_op, v_scale, bias_op)


def _tma_loads(ops: QuantizedOperands) -> bool:
    """K and V blocks by TMA (tensor descriptors): the fp8 mode on sm_90+ (and on the CPU interpreter, which runs
    the same code path); the int8 mode and older GPUs load through pointers."""
    if ops.v_scale is None or TensorDescriptor is None:
        return False
    return not ops.k8.is_cuda or pdl.sm90_plus(ops.k8.device)


def attention_from_operands(
    ops: QuantizedOperands, out: torch.Tensor, n_kv: int, config: AttentionConfig, quant_out: dict | None = None,
) -> torch.Tensor:
    """Run the attention kernel into ``out`` (B, H, Nq, D) (any strides); with ``VIDITQ_WS_ATTENTION=1`` the fp8
    mode on sm_90 goes to the warp-specialized Gluon kernel (:mod:`ws_attention`, slower so far) where it applies.
    ``quant_out = {"scale": (B,), "smooth": (H·D,) or None, "token_scale": (B·Nq,)}`` (float32): ``out`` is fp8
    e4m3 and gets the codes of ``attention * smooth / scale[b]``, ``token_scale`` each token's scale
    (:func:`quantized_attention_quant_out`)."""
    if quant_out is None and ws_attention is not None \
            and ws_attention.applies(ops, out, config.block_m, config.block_n):
        return ws_attention.attention(ops, out, n_kv, config.block_n)
    b, h, n_q, d = out.shape
    nkv_pad = ops.k8.shape[1]
    n_unmasked = nkv_pad if ops.bias is not None else (n_kv // config.block_n) * config.block_n
    grid = (ops.q8.shape[1] // config.block_m, b * h)
    dummy = ops.q_scale  # placeholder pointer for operands a mode does not use
    k_op, v_op, tma = ops.k8, ops.v, _tma_loads(ops)
    if tma:
        head_d = ops.q8.shape[2]
        k_op = TensorDescriptor.from_tensor(ops.k8.view(-1, head_d), [config.block_n, head_d])
        v_op = TensorDescriptor.from_tensor(ops.v.view(-1, nkv_pad), [head_d, config.block_n])
    _attn_fwd_kernel[grid](
        ops.q8, k_op, v_op, ops.q_scale, ops.k_scale,
        ops.v_scale if ops.v_scale is not None else dummy, ops.bias if ops.bias is not None else dummy,
        out, *out.stride(), h, n_q, n_kv, n_unmasked, d, ops.q8.shape[1], nkv_pad,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, HEAD_D=ops.q8.shape[2],
        PV_FP8=ops.v_scale is not None, HAS_BIAS=ops.bias is not None, TMA=tma,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl.launch_options(out.device),
        maxnreg=config.max_registers if tma else None,  # (the register cap was measured with the TMA loads only)
        **({} if quant_out is None else dict(
            OutScale=quant_out["scale"], Smooth=quant_out["smooth"], TokenScale=quant_out["token_scale"],
            QUANT_OUT=True, HAS_SMOOTH=quant_out["smooth"] is not None)))
    return out


def quantized_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: str,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    config: AttentionConfig | None = None,
    qk_norm: QKNorm | None = None,
    rope: Rope | None = None,
) -> torch.Tensor:
    """Triton 8-bit attention. q (B, H, Nq, D), k/v (B, H, Nkv, D) (any strides), bias (B, H, Nkv) or None,
    ``qk_norm`` and ``rope`` as in :func:`quantized_attention_reference` → (B, H, Nq, D) in q.dtype, laid out as
    (B, Nq, H, D) in memory (what attention processors reshape next)."""
    _check_inputs(q, k, v, mode, bias, qk_norm, rope)
    b, h, n_q, d = q.shape
    config = config or default_config(padded_head_dim(d), mode, k.shape[2])
    scale = d ** -0.5 if scale is None else scale
    ops = quantize_operands(q, k, v, mode, scale, bias, config, qk_norm, rope)
    out = torch.empty((b, n_q, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    return attention_from_operands(ops, out, k.shape[2], config)


# ------------------------------------------------------------------------------------------ quantized output
def output_bound(n_kv: int) -> float:
    """|attention| <= this x max|v| per channel: the output is a convex combination of V's rows, with P rounded to
    fp8 against a row sum of the unrounded P (at least 448: the row max is shifted there). A normal P rounds by at
    most 1/16 of itself; a subnormal one by at most 2^-10, X = n_kv · 2^-10 in all against a sum of at least
    448 + X (a review found the worst case: each key just above 2^-10 rounding to 2^-9): 1.10 at CogVideoX's
    17 776 keys, < 2 for any."""
    x = n_kv * 2.0 ** -10
    return 1.0 + 1.0 / 16.0 + x / (448.0 + x)


def output_scale(v_scale: torch.Tensor, smooth: torch.Tensor | None, d: int, n_kv: int) -> torch.Tensor:
    """(B,) float32 fp8 scales of the attention output of each batch entry (times ``smooth`` (H·D,)) over
    ``n_kv`` keys: a bound on it (:func:`output_bound`) from V's per-channel fp8 scales ``v_scale`` (B, H, ≥ D),
    so no pass over the output is needed to quantize it. (fp8 keeps its relative precision under a loose scale,
    down to about 1/10 000 of it.)"""
    b, h = v_scale.shape[:2]
    amax = v_scale[:, :, :d].float()
    if smooth is not None:
        amax = amax * smooth.float().abs().view(1, h, d)
    return (amax.amax(dim=(1, 2)) * output_bound(n_kv)).clamp_min(1e-12)


def _check_quant_out(q, mode, smooth):
    if mode != "fp8":
        raise ValueError(f"a quantized attention output needs the fp8 mode (V's scales bound it), got {mode!r}")
    c = q.shape[1] * q.shape[3]
    if smooth is not None and (smooth.shape != (c,) or smooth.dtype != torch.float32 or smooth.device != q.device):
        raise ValueError(f"smooth must be a float32 vector of the {c} output channels on {q.device}, got "
                         f"{tuple(smooth.shape)} {smooth.dtype} on {smooth.device}")


def quantized_attention_quant_out_reference(q, k, v, scale=None, qk_norm=None, rope=None, smooth=None,
                                            config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantized_attention_quant_out` in PyTorch: the float32 reference attention, times ``smooth``,
    quantized to fp8 with :func:`output_scale`."""
    _check_inputs(q, k, v, "fp8", None, qk_norm, rope)
    _check_quant_out(q, "fp8", smooth)
    b, h, n, d = q.shape
    out, v_scale = _reference_float(q, k, v, "fp8", scale, None, config, qk_norm, rope)
    out = out.transpose(1, 2).reshape(b * n, h * d)
    if smooth is not None:
        out = out * smooth
    s = output_scale(v_scale, smooth, d, k.shape[2])  # (B,)
    token_scale = s.repeat_interleave(n).view(b * n, 1)
    return fake_quant_fp8(out / token_scale).to(torch.float8_e4m3fn), token_scale


def quantized_attention_quant_out_triton(q, k, v, scale=None, qk_norm=None, rope=None, smooth=None,
                                         config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantized_attention_quant_out` with the kernel: its epilogue writes the fp8 codes."""
    _check_inputs(q, k, v, "fp8", None, qk_norm, rope)
    _check_quant_out(q, "fp8", smooth)
    b, h, n_q, d = q.shape
    config = config or default_config(padded_head_dim(d), "fp8", k.shape[2])
    scale = d ** -0.5 if scale is None else scale
    ops = quantize_operands(q, k, v, "fp8", scale, None, config, qk_norm, rope)
    codes = torch.empty((b, n_q, h, d), dtype=torch.float8_e4m3fn, device=q.device)
    token_scale = torch.empty((b * n_q, 1), dtype=torch.float32, device=q.device)
    quant = dict(scale=output_scale(ops.v_scale.view(b, h, -1), smooth, d, k.shape[2]),
                 smooth=None if smooth is None else smooth.contiguous(), token_scale=token_scale)
    attention_from_operands(ops, codes.transpose(1, 2), k.shape[2], config, quant)
    return codes.view(b * n_q, h * d), token_scale


# ------------------------------------------------------------------------------------------ entry point
@torch.library.custom_op("viditq::quantized_attention", mutates_args=())
def _quantized_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, mode: str, scale: float,
    q_norm_weight: torch.Tensor | None = None, q_norm_bias: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None, k_norm_bias: torch.Tensor | None = None, norm_eps: float = 0.0,
    rope_cos: torch.Tensor | None = None, rope_sin: torch.Tensor | None = None, rope_start: int = 0,
) -> torch.Tensor:
    qk_norm = None if q_norm_weight is None else (q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, norm_eps)
    rope = None if rope_cos is None else (rope_cos, rope_sin, rope_start)
    if q.is_cuda and os.environ.get("VIDITQ_BACKEND", "auto") != "reference":
        return quantized_attention_triton(q, k, v, mode, scale, bias, qk_norm=qk_norm, rope=rope)
    out = quantized_attention_reference(q, k, v, mode, scale, bias, qk_norm=qk_norm, rope=rope)
    return out.transpose(1, 2).contiguous().transpose(1, 2)  # same (B, Nq, H, D) memory layout as the kernel


@_quantized_attention_op.register_fake
def _(q, k, v, bias, mode, scale, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None, k_norm_bias=None,
      norm_eps=0.0, rope_cos=None, rope_sin=None, rope_start=0):
    b, h, n_q, d = q.shape
    return q.new_empty((b, n_q, h, d)).transpose(1, 2)


def quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: str,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    qk_norm: QKNorm | None = None,
    rope: Rope | None = None,
) -> torch.Tensor:
    """8-bit attention: the Triton kernel on CUDA, the PyTorch reference elsewhere (or with
    ``VIDITQ_BACKEND=reference``). A ``torch.library`` op, so ``torch.compile`` keeps it as one opaque call.

    q (B, H, Nq, D), k/v (B, H, Nkv, D), bias (B, H, Nkv) additive or None → (B, H, Nq, D) in q.dtype.
    ``qk_norm = (q_weight, q_bias, k_weight, k_bias, eps)``: the attention of ``LayerNorm(q)`` and
    ``LayerNorm(k)`` over each head's D channels (weights (D,); CogVideoX's per-head q / k norms); ``rope = (cos,
    sin, start)``: then rotated (diffusers' ``apply_rotary_emb``, real form) on tokens [start, start + S) by the
    (S, D) tables (CogVideoX's video tokens after the text). The preparation kernels apply both as they read q and
    k — the transformed tensors are never written.
    """
    _check_inputs(q, k, v, mode, bias, qk_norm, rope)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    norm = (None,) * 4 + (0.0,) if qk_norm is None else (*qk_norm[:4], float(qk_norm[4]))
    return _quantized_attention_op(q, k, v, bias, mode, scale, *norm, *((None, None, 0) if rope is None else rope))


@torch.library.custom_op("viditq::quantized_attention_quant_out", mutates_args=())
def _quantized_attention_quant_out_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    q_norm_weight: torch.Tensor | None, q_norm_bias: torch.Tensor | None, k_norm_weight: torch.Tensor | None,
    k_norm_bias: torch.Tensor | None, norm_eps: float, rope_cos: torch.Tensor | None, rope_sin: torch.Tensor | None,
    rope_start: int, smooth: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    qk_norm = None if q_norm_weight is None else (q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, norm_eps)
    rope = None if rope_cos is None else (rope_cos, rope_sin, rope_start)
    if q.is_cuda and os.environ.get("VIDITQ_BACKEND", "auto") != "reference":
        return quantized_attention_quant_out_triton(q, k, v, scale, qk_norm, rope, smooth)
    return quantized_attention_quant_out_reference(q, k, v, scale, qk_norm, rope, smooth)


@_quantized_attention_quant_out_op.register_fake
def _(q, k, v, scale, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, norm_eps, rope_cos, rope_sin,
      rope_start, smooth):
    b, h, n_q, d = q.shape
    return q.new_empty((b * n_q, h * d), dtype=torch.float8_e4m3fn), q.new_empty((b * n_q, 1), dtype=torch.float32)


def quantized_attention_quant_out(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    qk_norm: QKNorm | None = None,
    rope: Rope | None = None,
    smooth: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantized_attention` (fp8 mode) whose output comes quantized for the layer that reads it, the
    attention's output projection: fp8 e4m3 codes (B·Nq, H·D) of ``attention * smooth`` (``smooth``: that layer's
    ``smooth_inv``, or None) in the (B, Nq, H·D) order the projection reads, and float32 scales (B·Nq, 1) — one
    value per batch entry, :func:`output_scale`'s bound (fp8 keeps its relative precision under a loose scale), so
    the kernel's epilogue writes the codes and no quantization pass reads the output again. Kernel on CUDA,
    reference elsewhere; one custom op under ``torch.compile``."""
    _check_inputs(q, k, v, "fp8", None, qk_norm, rope)
    _check_quant_out(q, "fp8", smooth)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    norm = (None,) * 4 + (0.0,) if qk_norm is None else (*qk_norm[:4], float(qk_norm[4]))
    return _quantized_attention_quant_out_op(q, k, v, scale, *norm, *((None, None, 0) if rope is None else rope),
                                             smooth)
