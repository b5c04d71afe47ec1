"""Quantized GEMM (Triton): int8 x int8 (W8A8), int8 x packed int4 (W4A8) and fp8 e4m3 x fp8 e4m3.

``y = (a_codes * a_scale) @ dequant(W)^T + bias`` with a fused epilogue (per-token x per-channel scales, bias,
cast to the output dtype). A is (M, K) int8 (or fp8) row-major, W is the layer's own (N, K) buffer — K-major, which
is the layout the tensor cores want for B, so no transposed copy is needed:

* int8 codes (N, K) with per-channel scales (N, 1): int32 accumulation over all of K, scales applied once in the
  epilogue;
* group-wise scales (N, G) (fp16, group_size a multiple of BLOCK_K): an int32 product per K tile, rescaled into a
  float32 accumulator; asymmetric zero points (N, G) int8: ``zero * rowsum(a_codes)`` is subtracted from the
  integer product;
* packed int4 (N, K // 2), two codes per byte, any group size: first *staged* as per-channel int8 (fp8 e4m3 with
  fp8 activations) by :func:`stage_int4` (one memory-bound pass over the weights per call:
  ``round((code - zero) * scale * (1 / s_c))`` with ``s_c`` the layer's stored per-channel scale, the row's
  absmax / 127), then the per-channel int8 (fp8) GEMM. At DiT shapes (M ≥ 8k tokens) this beats
  unpacking in the main loop: every (BLOCK_M)-row tile would redo the unpacking and the group rescale, whose
  CUDA-core work per K step (an int → float conversion and an FMA per accumulator per 64-wide group) equals the
  tensor-core work of the step; staging does it once per weight and leaves the int8 kernel's pure int32
  accumulation (NOTES.md, session 5). The int8 requantization adds at most half an int8 step of the row's absmax
  to each weight; :func:`reference.stage_int4` defines it.

With ``persistent`` the grid is one program per SM, each walking tiles ``pid, pid + programs, ...``; tiles are
visited in groups of ``GROUP_M`` row-blocks so consecutive programs share B tiles in L2.

On sm_90, per-channel 8-bit products with a plain or residual epilogue and few waves of tiles (PixArt's shapes)
go to the warp-specialized Gluon kernel of :mod:`ws_gemm` instead (:func:`_use_ws`); it computes the same
products with the same epilogue, bit for bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import pdl, reference
from .act_quant import _round_half_even, quantize_codes

try:
    from . import ws_gemm
except (ImportError, AttributeError):  # a Triton without (this shape of) Gluon's Hopper API: the tl kernels only
    ws_gemm = None


# ----------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 128
    block_n: int = 256
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    persistent: bool = False
    tma: bool = False  # the TMA kernel (ignored where its alignment rules do not hold); one program per tile
    # unless ``persistent`` (one per SM)


SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90 (H100 / H200)


def smem_estimate(cfg: GemmConfig, out_size: int, residual: bool = False) -> int:
    """Shared memory of the TMA kernel: ``num_stages`` A and B tiles (8-bit) + the C tile of the TMA store
    (+ with the ``residual`` epilogue, the residual tile of the TMA load, as large)."""
    c_tile = cfg.block_m * cfg.block_n * out_size
    return cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k + c_tile * (2 if residual else 1)


@lru_cache(maxsize=None)
def default_config(m: int, n: int, k: int, group_size: int, fp8: bool, out_size: int = 2,
                   residual: bool = False, products: int = 1) -> GemmConfig:
    """Tile choice for DiT shapes from the H100 sweep in benchmarks/NOTES.md (no autotuning, so a first forward
    compiles each kernel once and nothing else). Packed int4 runs the per-channel int8 kernel after staging.
    ``out_size``: bytes per output element; float32 outputs take 128 x 128 tiles (the 256-wide C tile of the
    TMA store would not fit in shared memory). The ``residual`` epilogue takes 128 x 128 x 4-stage tiles (best
    of the H200 residual sweep at the PixArt shapes), dropping stages until its residual tile fits too
    (:func:`smem_estimate`). ``products`` > 1: one grouped launch (:func:`quant_linear_group`), ``n`` their sum."""
    cfg = _tile_config(m, n, k, group_size, fp8, out_size, residual, products)
    while cfg.tma and cfg.num_stages > 2 and smem_estimate(cfg, out_size, residual) > SMEM_LIMIT:
        cfg = replace(cfg, num_stages=cfg.num_stages - 1)
    return cfg


def _tile_config(m: int, n: int, k: int, group_size: int, fp8: bool, out_size: int, residual: bool,
                 products: int) -> GemmConfig:
    grouped = group_size < k
    override = os.environ.get("VIDITQ_GEMM_CONFIG")
    if override:  # "BM,BN,BK,GROUP_M,warps,stages,persistent,tma" from a benchmark sweep
        fields = [int(v) for v in override.split(",")]
        return GemmConfig(*fields[:6], bool(fields[6]), bool(fields[7]))
    if m <= 64:
        return GemmConfig(64, 128, 64 if grouped else 128, 8, 4, 4)
    if grouped:
        return GemmConfig(128, 128, min(64, group_size), 8, 8, 4)
    if residual:
        return GemmConfig(128, 128, 128, 8, 8, 4, persistent=True, tma=True)
    if products > 1 and m > 512:  # q, k, v in one launch, fp8 and int8: the best tile of the H100 group sweep
        # (session 16) at 8192 x 1152 x 1152 (fp8 70 us vs 76 for 128 x 128 x 128) and 35552 x 1920 x 1920 (706 vs 802)
        return GemmConfig(256, 128, 128, 8, 8, 3, persistent=True, tma=True)
    if m <= 512 or out_size > 2:  # few row tiles (text tokens): narrow tiles for more programs (H200, session 8)
        return GemmConfig(128, 128, 128, 8, 8, 3, persistent=True, tma=True)
    if fp8:
        return GemmConfig(128, 256, 128, 8, 8, 3, persistent=True, tma=True)
    return GemmConfig(256, 128, 128, 8, 8, 3, persistent=True, tma=True)


# ----------------------------------------------------------------------------------------- kernel
@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row-blocks sweep the columns together so their B tiles are reused from L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % num_pid_in_group) % group_size_m
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _int4_halves_f32(packed):
    """Packed bytes → (even-k codes, odd-k codes) as float32 plus 2^23 + 8: each nibble ``u`` (two's complement
    code ``(u ^ 8) - 8``) goes into the mantissa of 2^23 (``0x4B000000 | (u ^ 8)``), two integer ops and no
    int → float conversion; subtracting ``2^23 + 8 (+ zero)`` then gives the code (minus the zero point) exactly."""
    word = packed.to(tl.uint8, bitcast=True).to(tl.uint32)
    low = ((word & 0xF) ^ 0x8) | 0x4B000000
    high = ((word >> 4) ^ 0x8) | 0x4B000000
    return low.to(tl.float32, bitcast=True), high.to(tl.float32, bitcast=True)


INT4_BIAS = tl.constexpr(8388616.0)  # 2^23 + 8: what _int4_halves_f32 adds to a code


@triton.jit
def _gelu_tanh(y):
    """``F.gelu(y, approximate="tanh")`` in float32; tanh(u) = 1 - 2 / (exp(2u) + 1) (saturates cleanly)."""
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    return 0.5 * y * (2.0 - 2.0 / (tl.exp(tl.minimum(2.0 * u, 80.0)) + 1.0))


@triton.jit
def _epilogue(acc, offs_m, offs_n, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, stride_sg,
              GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr):
    """Per-token x per-channel dequantization (group scales were applied in the main loop), bias and
    (``GELU``) the tanh GELU that follows a feed-forward up-projection, in f32."""
    n_mask = offs_n < N
    y = acc.to(tl.float32)
    if not GROUPED:
        y = y * tl.load(w_scale_ptr + offs_n * stride_sg, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = y * tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if GELU:
        y = _gelu_tanh(y)
    return y


@triton.jit
def _add_residual(y, res, gate_ptr, stride_gb, tokens, gate_prefix, offs_m, offs_n, M, N, HAS_GATE: tl.constexpr,
                  TILE_GATE: tl.constexpr, SPLIT_GATE: tl.constexpr):
    """The block's residual connection ``res + gate[row // tokens] * y`` (``HAS_GATE``; else ``res + y``) in f32;
    ``TILE_GATE``: the tile's rows share one batch row (``tokens`` a multiple of BLOCK_M), one gate vector;
    ``SPLIT_GATE``: two gate rows per batch row, the first for its first ``gate_prefix`` tokens (CogVideoX's text
    and video tokens in one sequence)."""
    n_mask = offs_n < N
    if HAS_GATE:
        if TILE_GATE:
            batch = (tl.min(offs_m) // tokens).to(tl.int64)
            gate = tl.load(gate_ptr + batch * stride_gb + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        else:
            batch = (offs_m // tokens).to(tl.int64)
            if SPLIT_GATE:
                batch = 2 * batch + (offs_m % tokens >= gate_prefix).to(tl.int64)
            mask = (offs_m < M)[:, None] & n_mask[None, :]
            gate = tl.load(gate_ptr + batch[:, None] * stride_gb + offs_n[None, :], mask=mask, other=0.0)
        y = y * gate.to(tl.float32)
    return y + res.to(tl.float32)


@triton.jit
def _gemm_tile(
    tile_id, a_ptr, a_scale_ptr, b_ptr, w_scale_ptr, w_zero_ptr, bias_ptr, c_ptr,
    M, N, K, stride_am, stride_bn, stride_cm, stride_sg, group_size, res_ptr, stride_rb, stride_rm, res0_ptr,
    stride_r0b, stride_r0m, gate_ptr, stride_gb, tokens, prefix,
    GROUPED: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GELU: tl.constexpr, RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, SPLIT_GATE: tl.constexpr,
    RES_PARTS: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile: main loop over K, then the fused epilogue."""
    pid_m, pid_n = _tile_coords(tile_id, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m[:, None] < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_k[:, None] + offs_n[None, :] * stride_bn  # (BLOCK_K, BLOCK_N), K-major
    if FP8 or GROUPED:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)  # sum of a codes, for int8 zero points
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_mask & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if FP8:
            acc = tl.dot(a, b, acc)
        elif GROUPED:
            g = k0 // group_size
            part = tl.dot(a, b, out_dtype=tl.int32)
            if HAS_ZERO:
                z = tl.load(w_zero_ptr + offs_n * stride_sg + g, mask=n_mask, other=0).to(tl.int32)
                part -= tl.sum(a.to(tl.int32), axis=1)[:, None] * z[None, :]
            s = tl.load(w_scale_ptr + offs_n * stride_sg + g, mask=n_mask, other=0.0).to(tl.float32)
            acc += part.to(tl.float32) * s[None, :]
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            if HAS_ZERO:
                rowsum += tl.sum(a.to(tl.int32), axis=1)
        b_ptrs += BLOCK_K
        a_ptrs += BLOCK_K

    if not GROUPED and not FP8 and HAS_ZERO:
        z = tl.load(w_zero_ptr + offs_n * stride_sg, mask=n_mask, other=0).to(tl.int32)
        acc -= rowsum[:, None] * z[None, :]
    y = _epilogue(acc, offs_m, offs_n, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, stride_sg, GROUPED, HAS_BIAS, GELU)
    if RESIDUAL:
        if RES_PARTS:  # row (b, t) of the sequence: res0[b, t] for t < prefix, else res[b, t - prefix]
            batch = (offs_m // tokens).to(tl.int64)
            t = (offs_m % tokens).to(tl.int64)
            rows = tl.where(t < prefix, res0_ptr + batch * stride_r0b + t * stride_r0m,
                            res_ptr + batch * stride_rb + (t - prefix) * stride_rm)
        else:
            rows = res_ptr + offs_m.to(tl.int64) * stride_rm
        res = tl.load(rows[:, None] + offs_n[None, :], mask=m_mask & n_mask[None, :], other=0.0)
        y = _add_residual(y, res, gate_ptr, stride_gb, tokens, prefix, offs_m, offs_n, M, N, HAS_GATE, False,
                          SPLIT_GATE)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=m_mask & n_mask[None, :])


@triton.jit
def _quant_gemm_kernel(
    a_ptr, a_scale_ptr, b_ptr, w_scale_ptr, w_zero_ptr, bias_ptr, c_ptr,
    M, N, K, stride_am, stride_bn, stride_cm, stride_sg, group_size, num_programs,
    res_ptr, stride_rb, stride_rm, res0_ptr, stride_r0b, stride_r0m, gate_ptr, stride_gb, tokens, prefix,
    GROUPED: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr,
    SPLIT_GATE: tl.constexpr = False, RES_PARTS: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pdl.enter(PDL)
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile_id in range(tl.program_id(0), num_tiles, num_programs):
            _gemm_tile(tile_id, a_ptr, a_scale_ptr, b_ptr, w_scale_ptr, w_zero_ptr, bias_ptr, c_ptr,
                       M, N, K, stride_am, stride_bn, stride_cm, stride_sg, group_size,
                       res_ptr, stride_rb, stride_rm, res0_ptr, stride_r0b, stride_r0m, gate_ptr, stride_gb, tokens,
                       prefix, GROUPED, HAS_ZERO, HAS_BIAS, FP8, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, GELU, RESIDUAL,
                       HAS_GATE, SPLIT_GATE, RES_PARTS)
    else:
        _gemm_tile(tl.program_id(0), a_ptr, a_scale_ptr, b_ptr, w_scale_ptr, w_zero_ptr, bias_ptr, c_ptr,
                   M, N, K, stride_am, stride_bn, stride_cm, stride_sg, group_size,
                   res_ptr, stride_rb, stride_rm, res0_ptr, stride_r0b, stride_r0m, gate_ptr, stride_gb, tokens,
                   prefix, GROUPED, HAS_ZERO, HAS_BIAS, FP8, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, GELU, RESIDUAL,
                   HAS_GATE, SPLIT_GATE, RES_PARTS)


@triton.jit
def _quantize_out(y, offs_m, offs_n, M, N, pid_n, a_scale_ptr, smooth_ptr, q_scale_ptr, bound_ptr,
                  HAS_SMOOTH: tl.constexpr):
    """The output tile quantized to fp8 for the next layer with the per-token scale ``max(c1 * a_scale + c2,
    c3)`` (``bound_ptr``: c1, c2, c3; ``reference.range_scale``: a bound on the output row, so no row
    reduction; the tiles of column 0 store it), (smoothed) codes returned."""
    if HAS_SMOOTH:
        y = y * tl.load(smooth_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    c1, c2, c3 = tl.load(bound_ptr), tl.load(bound_ptr + 1), tl.load(bound_ptr + 2)
    scale = tl.maximum(tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=1.0) * c1 + c2, c3)
    tl.store(q_scale_ptr + offs_m, scale, mask=offs_m < tl.where(pid_n == 0, M, 0))
    return quantize_codes(y, scale[:, None], 448.0, True, False)


@triton.jit
def _residual_tile(r_desc, r0_desc, row, col, tokens, prefix, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   RES_PARTS: tl.constexpr):
    """The residual tile at (row, col) by TMA. ``RES_PARTS``: the sequence's rows (b, t) are ``r0[b, t]`` for t <
    ``prefix`` and ``r[b, t - prefix]`` after (3-D descriptors of the two parts, any batch stride); each part is
    loaded where the tile has rows of it, its other rows arriving as zeros (TMA fills what is out of bounds,
    negative coordinates included), and the loads are summed. A tile meets at most two batch entries (``tokens``
    >= BLOCK_M: the launcher's condition)."""
    if RES_PARTS:
        b = row // tokens
        t = row - b * tokens
        res = tl.zeros((1, BLOCK_M, BLOCK_N), r_desc.dtype)
        if t < prefix:
            res += r0_desc.load([b, t, col])
        if t + BLOCK_M > prefix:
            res += r_desc.load([b, t - prefix, col])
        if t + BLOCK_M > tokens:  # the tile's last rows open entry b + 1 (zeros past the last entry)
            res += r0_desc.load([b + 1, t - tokens, col])
            if t + BLOCK_M > tokens + prefix:
                res += r_desc.load([b + 1, t - tokens - prefix, col])
        return tl.reshape(res, (BLOCK_M, BLOCK_N))
    else:
        return r_desc.load([row, col])


@triton.jit
def _quant_gemm_tma_kernel(
    a_desc, b_desc0, b_desc1, b_desc2, c_desc0, c_desc1, c_desc2, r_desc, r0_desc, a_ptr, a_scale_ptr, w_scale_ptrs,
    bias_ptrs,
    M, ns, K, stride_am, stride_sg, group_size, num_programs, gate_ptr, stride_gb, tokens, prefix,
    smooth_ptr, q_scale_ptr, bound_ptr,
    GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
    FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GELU: tl.constexpr, RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, TILE_GATE: tl.constexpr,
    QUANT_OUT: tl.constexpr = False, HAS_SMOOTH: tl.constexpr = False, PDL: tl.constexpr = False,
    NUM: tl.constexpr = 1, SPLIT_GATE: tl.constexpr = False, RES_PARTS: tl.constexpr = False,
):
    """Persistent variant: A and B arrive by TMA (bulk tensor copies, zero-filled at the edges); the tile loop is
    flattened with the K loop so the next tile's loads overlap this tile's epilogue; C leaves by TMA. No zero
    points (int8 zero points need A in registers for the row sums: pointer kernel).

    ``NUM`` (≤ 3) weights (descriptors ``b_desc0..2`` / ``c_desc0..2``, tuples ``w_scale_ptrs``, ``bias_ptrs``,
    ``ns``) multiply the same A in one launch (q, k and v of a self-attention): their tiles are numbered one weight
    after the other and the programs walk them all grid-stride, so the last wave of one product fills with tiles
    of the next. (Triton 3.6's launcher takes no descriptors inside tuples: hence three named ones.)

    ``QUANT_OUT``: C is the output quantized to fp8 per token (:func:`_quantize_out`) for the next layer, its
    scales in ``q_scale_ptr``."""
    pdl.enter(PDL)
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    k_tiles = tl.cdiv(K, BLOCK_K)
    start = 0  # the first tile of weight g in the numbering of all NUM products
    for g in tl.static_range(NUM):
        b_desc = b_desc0 if g == 0 else b_desc1 if g == 1 else b_desc2
        c_desc = c_desc0 if g == 0 else c_desc1 if g == 1 else c_desc2
        w_scale_ptr, bias_ptr, N = w_scale_ptrs[g], bias_ptrs[g], ns[g]
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_tiles = num_pid_m * num_pid_n
        first = start + (pid - start % num_programs + num_programs) % num_programs  # this program's first of them
        for t in tl.range(first, start + num_tiles, num_programs, flatten=True):
            pid_m, pid_n = _tile_coords(t - start, num_pid_m, num_pid_n, GROUP_M)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            if FP8 or GROUPED:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for ki in range(k_tiles):
                k0 = ki * BLOCK_K
                a = a_desc.load([pid_m * BLOCK_M, k0])
                b = b_desc.load([pid_n * BLOCK_N, k0])
                if FP8:
                    acc = tl.dot(a, tl.trans(b), acc)
                elif GROUPED:
                    part = tl.dot(a, tl.trans(b), out_dtype=tl.int32)
                    s = tl.load(w_scale_ptr + offs_n * stride_sg + k0 // group_size, mask=n_mask, other=0.0)
                    acc += part.to(tl.float32) * s.to(tl.float32)[None, :]
                else:
                    acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
            y = _epilogue(acc, offs_m, offs_n, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, stride_sg, GROUPED,
                          HAS_BIAS, GELU)
            if RESIDUAL:  # the residual tile arrives by TMA too (a pointer load in the MMA layout stalled the epilogue)
                res = _residual_tile(r_desc, r0_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, tokens, prefix, BLOCK_M,
                                     BLOCK_N, RES_PARTS)
                y = _add_residual(y, res, gate_ptr, stride_gb, tokens, prefix, offs_m, offs_n, M, N, HAS_GATE,
                                  TILE_GATE, SPLIT_GATE)
            if QUANT_OUT:
                y = _quantize_out(y, offs_m, offs_n, M, N, pid_n, a_scale_ptr, smooth_ptr, q_scale_ptr, bound_ptr,
                                  HAS_SMOOTH)
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], y.to(c_desc.dtype))
        start += num_tiles


@triton.jit
def _stage_int4_kernel(
    w_ptrs, s_ptrs, z_ptrs, stage_ptrs, out_ptrs, ns, ks, tile_starts, k_tiles,
    NUM: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, FP8: tl.constexpr,
    CUDA_RINT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, HALF_P2: tl.constexpr,
    EVEN: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """Stage ``NUM`` packed int4 weights of one kind in one launch (a block's layers: one launch instead of one
    per layer): the tuples hold each weight's pointers and sizes, its tiles are programs ``tile_starts[i] ...
    tile_starts[i + 1] - 1`` (``k_tiles[i]`` tiles along a row), and each program stages its tile with
    :func:`_stage_tile`."""
    pdl.enter(PDL)
    pid = tl.program_id(0)
    for i in tl.static_range(NUM):
        if (pid >= tile_starts[i]) & (pid < tile_starts[i + 1]):
            t = pid - tile_starts[i]
            _stage_tile(w_ptrs[i], s_ptrs[i], z_ptrs[i], stage_ptrs[i], out_ptrs[i], ns[i], ks[i], t // k_tiles[i],
                        t % k_tiles[i], HAS_ZERO, GROUP, PER_CHANNEL, FP8, CUDA_RINT, BLOCK_N, BLOCK_G, HALF_P2, EVEN)


@triton.jit
def _stage_tile(
    w_ptr, s_ptr, z_ptr, stage_ptr, out_ptr, N, K, pid_n, pid_k,
    HAS_ZERO: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, FP8: tl.constexpr,
    CUDA_RINT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, HALF_P2: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Packed int4 (N, K // 2) + scales (N, G) [+ zero points] → per-channel int8 codes (N, K) (fp8 e4m3 if
    ``FP8``), contiguous rows: tile (``pid_n``, ``pid_k``) of BLOCK_N rows x BLOCK_G runs of ``GROUP`` codes (a
    run: one scale group, or per channel a stretch of ``GROUP`` codes of the row), held as (BLOCK_N, BLOCK_G,
    HALF_P2) packed bytes (HALF_P2: GROUP / 2 rounded up to a power of two, lanes past GROUP / 2 masked), so each
    scale and zero point is loaded once per run and a row's bytes load contiguously.

    Per channel (one group): codes ``q - zero`` (in [-15, 15], exact in e4m3 too). Grouped: ``deq * (1 / stage)``
    with ``deq = (q - zero) * scale`` (exact in float32) and the reciprocal rounded exactly, then rounded half to
    even (or cast to e4m3 by ``cvt.rn.satfinite``: values past 448 by rounding saturate, as the reference's
    clamp does) — the float32 ops of ``reference.stage_int4``, so codes agree bit for bit. On the GPU the
    rounding is ``rint`` of the rounded product: the floor-based ``_round_half_even`` would let ptxas contract the
    product into its ``v - floor(v)`` (an FMA: the tie test then sees the exact product, not the rounded one); the
    CPU interpreter has no FMA and no libdevice."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    kh = K // 2
    runs = K // GROUP  # runs of GROUP codes per row
    g = pid_k * BLOCK_G + tl.arange(0, BLOCK_G)
    jj = tl.arange(0, HALF_P2)
    rows = offs_n[:, None, None].to(tl.int64)
    run_mask = n_mask[:, None] & (g < runs)[None, :]  # (BLOCK_N, BLOCK_G)
    if 2 * HALF_P2 == GROUP:  # a tile's bytes are one contiguous span per row: 2-D (vector) loads and stores
        span = pid_k * (BLOCK_G * HALF_P2) + tl.arange(0, BLOCK_G * HALF_P2)
        byte_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * kh + span[None, :]
        if EVEN:  # whole tiles: no mask
            byte = tl.load(byte_ptrs)
        else:
            byte = tl.load(byte_ptrs, mask=n_mask[:, None] & (span < kh)[None, :], other=0)
        byte = tl.reshape(byte, (BLOCK_N, BLOCK_G, HALF_P2))
    else:
        byte = tl.load(w_ptr + rows * kh + g[None, :, None] * (GROUP // 2) + jj[None, None, :],
                       mask=run_mask[:, :, None] & (jj < GROUP // 2)[None, None, :], other=0)
    lo_f, hi_f = _int4_halves_f32(byte)
    if HAS_ZERO:  # (code - zero) in one exact subtraction
        if PER_CHANNEL:
            z = tl.load(z_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[:, None, None]
        else:
            z = tl.load(z_ptr + offs_n[:, None] * runs + g[None, :], mask=run_mask, other=0).to(tl.float32)[:, :, None]
        lo_f, hi_f = lo_f - (z + INT4_BIAS), hi_f - (z + INT4_BIAS)
    else:
        lo_f, hi_f = lo_f - INT4_BIAS, hi_f - INT4_BIAS
    if not PER_CHANNEL:
        s = tl.load(s_ptr + offs_n[:, None] * runs + g[None, :], mask=run_mask, other=0.0).to(tl.float32)
        stage = tl.load(stage_ptr + offs_n, mask=n_mask, other=1.0)
        inv = tl.math.div_rn(tl.full(stage.shape, 1.0, tl.float32), stage)[:, None, None]
        lo_f, hi_f = (lo_f * s[:, :, None]) * inv, (hi_f * s[:, :, None]) * inv
        if not FP8:
            if CUDA_RINT:
                lo_f, hi_f = libdevice.rint(lo_f), libdevice.rint(hi_f)
            else:
                lo_f, hi_f = _round_half_even(lo_f), _round_half_even(hi_f)
            lo_f, hi_f = tl.clamp(lo_f, -127.0, 127.0), tl.clamp(hi_f, -127.0, 127.0)
        elif not CUDA_RINT:  # the interpreter's fp8 cast does not saturate
            lo_f, hi_f = tl.clamp(lo_f, -448.0, 448.0), tl.clamp(hi_f, -448.0, 448.0)
    dtype = out_ptr.dtype.element_ty
    v = tl.reshape(tl.join(lo_f.to(dtype), hi_f.to(dtype)), (BLOCK_N, BLOCK_G, 2 * HALF_P2))  # codes 2j, 2j + 1
    if 2 * HALF_P2 == GROUP:
        span = pid_k * (BLOCK_G * GROUP) + tl.arange(0, BLOCK_G * GROUP)
        out_ptrs = out_ptr + offs_n[:, None].to(tl.int64) * K + span[None, :]
        v = tl.reshape(v, (BLOCK_N, BLOCK_G * GROUP))
        if EVEN:
            tl.store(out_ptrs, v)
        else:
            tl.store(out_ptrs, v, mask=n_mask[:, None] & (span < K)[None, :])
    else:
        kk = tl.arange(0, 2 * HALF_P2)
        tl.store(out_ptr + rows * K + g[None, :, None] * GROUP + kk[None, None, :], v,
                 mask=run_mask[:, :, None] & (kk < GROUP)[None, None, :])


# ----------------------------------------------------------------------------------------- launcher
_SM_COUNT: dict[int, int] = {}
INTERPRETER_PROGRAMS = 3  # persistent grid size off-GPU (CPU interpreter): several tiles per program


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _tma_aligned(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base and strides (but the last)."""
    return t.data_ptr() % 16 == 0 and all((st * t.element_size()) % 16 == 0 for st in t.stride()[:-1])


def _tma_ok(a, w, c, w_zero, res=None, block_m: int = 0) -> bool:
    """The TMA kernels' operands: aligned (:func:`_tma_aligned`), no int8 zero points (they need the pointer
    kernel's row sums), and a residual in two parts only with ``block_m`` rows or more per batch entry (a tile
    then meets at most two: :func:`_residual_tile`) and rows in both parts (a descriptor has no empty dims)."""
    tensors = [a, w, c] + ([] if res is None else [t for t in (res["residual"], res["prefix_part"]) if t is not None])
    parts_ok = res is None or not res["RES_PARTS"] or (res["tokens"] >= block_m and 0 < res["prefix"] < res["tokens"])
    return w_zero is None and parts_ok and all(_tma_aligned(t) for t in tensors)


MAX_GROUP = 3  # products of one TMA launch (quant_linear_group)


def _launch_tma(a, a_scale, products, group_size, cfg, fp8, gelu, res, quant=None):
    """One launch of the TMA kernel: ``products`` = [(w, w_scale, bias, c), ...] share A (bias all or none)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = a.shape
    a_desc = TensorDescriptor.from_tensor(a, [cfg.block_m, cfg.block_k])
    if not 1 <= len(products) <= MAX_GROUP:
        raise ValueError(f"one launch takes 1 to {MAX_GROUP} products, got {len(products)}")
    b_descs = [TensorDescriptor.from_tensor(w, [cfg.block_n, cfg.block_k]) for w, _, _, _ in products]
    c_descs = [TensorDescriptor.from_tensor(c, [cfg.block_m, cfg.block_n]) for _, _, _, c in products]
    pad = [None] * (MAX_GROUP - len(products))  # unused descriptor arguments (never read: NUM is a constexpr)
    b_descs, c_descs = b_descs + pad, c_descs + pad
    residual, gate, stride_gb, tokens, prefix = (res[key] for key in ("residual", "gate", "stride_gb", "tokens",
                                                                       "prefix"))
    r_desc = r0_desc = None
    if res["RES_PARTS"]:  # 3-D descriptors of the two parts (B, S, N) and (B, T, N), tiles of one batch entry
        r_desc, r0_desc = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, cfg.block_m, cfg.block_n])
                           for t in (residual, res["prefix_part"]))
    elif residual is not None:
        r_desc = TensorDescriptor.from_tensor(residual, [cfg.block_m, cfg.block_n])
    ns = tuple(w.shape[0] for w, _, _, _ in products)
    num_tiles = sum(triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n) for n in ns)
    programs = min(num_tiles, _num_sms(a.device)) if cfg.persistent else num_tiles  # else one tile a program
    q_scale, smooth, bound = a_scale, a_scale, a_scale  # dummy pointers unless the output is quantized
    if quant is not None:
        q_scale, bound = quant["scale"], quant["bound"]
        smooth = a_scale if quant["smooth_inv"] is None else quant["smooth_inv"]
    has_bias = products[0][2] is not None
    _quant_gemm_tma_kernel[(programs,)](
        a_desc, *b_descs, *c_descs, r_desc, r0_desc, a, a_scale, tuple(s for _, s, _, _ in products),
        tuple(bias if has_bias else a_scale for _, _, bias, _ in products),
        m, ns, k, a.stride(0), products[0][1].stride(0), group_size, programs, gate, stride_gb, tokens, prefix,
        smooth, q_scale, bound, QUANT_OUT=quant is not None,
        HAS_SMOOTH=quant is not None and quant["smooth_inv"] is not None,
        GROUPED=group_size < k, HAS_BIAS=has_bias, FP8=fp8,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        GELU=gelu, RESIDUAL=residual is not None, HAS_GATE=res["HAS_GATE"],
        TILE_GATE=tokens % cfg.block_m == 0 and not res["SPLIT_GATE"], SPLIT_GATE=res["SPLIT_GATE"],
        RES_PARTS=res["RES_PARTS"], NUM=len(products), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl.launch_options(a.device),
    )


STAGE_BLOCK_N, STAGE_TILE_CODES = 32, 256  # a program's tile: 32 rows x 256 codes (4 KiB of packed bytes)
STAGE_MAX_LAYERS = 16  # weights per staging launch (the kernel holds one branch per weight)


def stage_int4(w: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, group_size: int,
               stage_scale: torch.Tensor | None = None, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed int4 (N, K // 2) + scales (N, G) [+ zero points (N, G)] → per-channel int8 codes (N, K) (fp8 e4m3
    if ``fp8``) and float32 scales (N, 1), exactly as ``reference.stage_int4``. ``stage_scale`` (N, 1) is the
    layer's stored ``reference.int4_stage_scale`` (computed here if not given: a second pass)."""
    return stage_int4_many([(w, w_scale, w_zero, group_size, stage_scale)], fp8)[0]


def stage_int4_many(weights: list, fp8: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`stage_int4` of several weights ``(w, w_scale, w_zero, group_size, stage_scale)`` (one device) in as
    few launches as their kinds allow: one per (zero points or not, grouped or per channel) and
    ``STAGE_MAX_LAYERS`` weights. Returns ``(codes, scale)`` per weight, in order."""
    prepared, kinds = [], {}
    for i, (w, w_scale, w_zero, group_size, stage_scale) in enumerate(weights):
        n, kh = w.shape
        k = 2 * kh
        if group_size % 2 or k % group_size or w_scale.shape != (n, k // group_size):
            raise ValueError(f"int4 staging needs an even group size dividing K={k} and ({n}, K / group) scales, "
                             f"got group size {group_size}, scales {tuple(w_scale.shape)}")
        per_channel = group_size == k
        if per_channel or stage_scale is None:  # per channel: the layer's own scale
            stage_scale = reference.int4_stage_scale(w, w_scale, w_zero, group_size, fp8)
        codes = torch.empty(n, k, device=w.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
        prepared.append((codes, stage_scale.contiguous()))
        if n and k:
            run = group_size if not per_channel else min(STAGE_TILE_CODES, _largest_pow2_divisor(k))
            kinds.setdefault((w_zero is not None, per_channel, run), []).append(
                (w.contiguous(), w_scale.contiguous(), None if w_zero is None else w_zero.contiguous(), i))
    for (has_zero, per_channel, run), group in kinds.items():
        for first in range(0, len(group), STAGE_MAX_LAYERS):
            _launch_stage(group[first:first + STAGE_MAX_LAYERS], prepared, has_zero, per_channel, run, fp8)
    return prepared


def _largest_pow2_divisor(k: int) -> int:
    return k & -k


def _launch_stage(group, prepared, has_zero, per_channel, run, fp8) -> None:
    """One launch for weights of one kind: runs of ``run`` codes (the scale group, or per channel a power of two
    dividing K), ``STAGE_TILE_CODES // run`` runs (at least one) per tile."""
    half_p2 = triton.next_power_of_2(run // 2)
    block_g = max(1, STAGE_TILE_CODES // (2 * half_p2))
    ws, scales, zeros, outs, stages, ns, ks, k_tiles, starts = [], [], [], [], [], [], [], [], [0]
    for w, w_scale, w_zero, i in group:
        codes, stage_scale = prepared[i]
        n, kh = w.shape
        ws.append(w)
        scales.append(w_scale)
        zeros.append(w_scale if w_zero is None else w_zero)  # a dummy pointer without zero points
        stages.append(stage_scale)
        outs.append(codes)
        ns.append(n)
        ks.append(2 * kh)
        k_tiles.append(triton.cdiv(2 * kh // run, block_g))
        starts.append(starts[-1] + triton.cdiv(n, STAGE_BLOCK_N) * k_tiles[-1])
    device = group[0][0].device
    even = 2 * half_p2 == run and all(n % STAGE_BLOCK_N == 0 and (k // run) % block_g == 0 for n, k in zip(ns, ks))
    _stage_int4_kernel[(starts[-1],)](
        tuple(ws), tuple(scales), tuple(zeros), tuple(stages), tuple(outs), tuple(ns), tuple(ks), tuple(starts),
        tuple(k_tiles), NUM=len(group), HAS_ZERO=has_zero, GROUP=run, PER_CHANNEL=per_channel, FP8=fp8,
        CUDA_RINT=device.type == "cuda", BLOCK_N=STAGE_BLOCK_N, BLOCK_G=block_g, HALF_P2=half_p2, EVEN=even,
        num_warps=4,
        **pdl.launch_options(device),
    )


def supported(k: int, group_size: int, packed_int4: bool, config: GemmConfig | None = None) -> bool:
    """Shapes the kernel handles: K tiles must not straddle a scale group; packed int4 (staged to per-channel
    int8) needs an even K and an even group size."""
    if packed_int4:
        return k % 2 == 0 and group_size % 2 == 0 and k % group_size == 0
    if group_size < k:
        block_k = config.block_k if config else min(64, group_size)
        return group_size % block_k == 0 and k % group_size == 0 and block_k >= 32
    return True


def quant_linear(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    group_size: int,
    packed_int4: bool,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: GemmConfig | None = None,
    activation: str | None = None,
    stage_scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    quant_out: dict | None = None,
    residual_prefix: torch.Tensor | None = None,
):
    """``(a * a_scale) @ dequant(w)^T + bias`` → (M, N) ``out_dtype``; ``activation="gelu_tanh"`` applies
    ``F.gelu(·, approximate="tanh")`` in the epilogue; ``residual`` (M, N) adds a residual connection there,
    ``residual + gate[row // (M // B)] * y`` with ``gate`` (B, N) (contiguous channels) or ``residual + y``.
    ``residual_prefix`` (B, T, N): the residual comes in two parts, of each batch entry's first T rows and
    (``residual``, (B, S, N)) of its other S (M = B (T + S); any batch strides, contiguous rows: e.g. the text and
    video parts of one sequence), and ``gate`` may be (B, 2, N), ``gate[:, 0]`` for the first T rows and
    ``gate[:, 1]`` for the rest (CogVideoX's text and video tokens, each with its own gate).

    a: (M, K) int8 codes or fp8 e4m3; a_scale: (M, 1) f32; w: (N, K) int8 / fp8, or (N, K // 2) uint8 packed int4
    (staged to per-channel int8 — fp8 for fp8 ``a`` — first, with ``stage_scale`` (N, 1) if given, see
    :func:`stage_int4`); w_scale: (N, G); w_zero: (N, G) int8 or None; bias: (N,) or None.

    ``quant_out={"smooth_inv", "bound"}``: instead of y, return y (times ``smooth_inv`` (N,) if given)
    quantized to fp8 e4m3 per token for the next layer with the scales ``reference.range_scale(a_scale,
    bound)`` — codes (M, N) and float32 scales (M, 1), ``reference.int_linear_quant_out`` — in the epilogue (the
    activation never goes through memory in 16 bits); the TMA kernel, 16-byte aligned rows.
    """
    m, k = a.shape
    n = w.shape[0]
    fp8 = a.dtype == torch.float8_e4m3fn
    if fp8 and not packed_int4 and (w.dtype != torch.float8_e4m3fn or group_size != k or w_zero is not None):
        raise ValueError("the fp8 GEMM takes fp8 e4m3 (or packed int4) weights with per-channel scales and no "
                         "zero point")
    if w.shape[1] != (k // 2 if packed_int4 else k):
        raise ValueError(f"weight shape {tuple(w.shape)} does not match K={k} (packed_int4={packed_int4})")
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"unknown fused activation {activation!r} (None or 'gelu_tanh')")
    if a_scale.numel() != m:
        raise ValueError(f"activation scales must be per token, ({m}, 1), got {tuple(a_scale.shape)}")
    if packed_int4:
        if not supported(k, group_size, True):
            raise ValueError(f"unsupported packed int4 GEMM: K={k}, group_size={group_size}")
        w, w_scale = stage_int4(w, w_scale, w_zero, group_size, stage_scale, fp8)
        w_zero, group_size = None, k
    gelu = activation == "gelu_tanh"
    if quant_out is not None and w_zero is not None:
        raise ValueError("a quantized output takes weights without zero points (the TMA kernel)")
    out_size = 1 if quant_out is not None else out_dtype.itemsize
    cfg = config or default_config(m, n, k, group_size, fp8, out_size, residual is not None)
    if quant_out is not None and not cfg.tma:
        cfg = replace(cfg, persistent=True, tma=True)
    if not supported(k, group_size, False, cfg):
        raise ValueError(f"unsupported quantized GEMM: K={k}, group_size={group_size}, block_k={cfg.block_k}")
    a, w, w_scale = a.contiguous(), w.contiguous(), w_scale.contiguous()
    a_scale = a_scale.reshape(m, 1).contiguous()
    res = _residual_args(residual, gate, m, n, a_scale, out_dtype, residual_prefix)
    quant = None
    if quant_out is not None:
        c = torch.empty(m, n, device=a.device, dtype=torch.float8_e4m3fn)
        quant = dict(quant_out, scale=torch.empty(m, 1, device=a.device, dtype=torch.float32))
        bound = quant_out["bound"]
        if not (torch.is_tensor(bound) and bound.shape == (3,) and bound.dtype == torch.float32
                and bound.device == a.device):
            raise ValueError(f"quant_out bound must be a float32 tensor (c1, c2, c3) on {a.device}, got {bound!r}")
        quant["bound"] = bound.contiguous()
        smooth = quant_out.get("smooth_inv")
        if smooth is not None and (smooth.shape != (n,) or smooth.dtype != torch.float32):
            raise ValueError(f"quant_out smooth_inv must be a float32 vector of {n} channels, got "
                             f"{tuple(smooth.shape)} {smooth.dtype}")
        quant["smooth_inv"] = None if smooth is None else smooth.contiguous()
    else:
        c = torch.empty(m, n, device=a.device, dtype=out_dtype)
    if m == 0:
        return c if quant is None else (c, quant["scale"])
    tma_ok = _tma_ok(a, w, c, w_zero, res, cfg.block_m)
    plain_gate = not (res["SPLIT_GATE"] or res["RES_PARTS"])  # the Gluon kernel: one residual, a gate row a batch
    if plain_gate and _use_ws(config, quant, gelu, tma_ok and group_size == k, a, [w], [c]):
        ws_gemm.linear(a, a_scale.view(-1), w, w_scale.view(-1), bias, c, residual,
                       res["gate"] if res["HAS_GATE"] else None, pdl=pdl.enabled(a.device))
        return c
    if cfg.tma and tma_ok:
        _launch_tma(a, a_scale, [(w, w_scale, bias, c)], group_size, cfg, fp8, gelu, res, quant)
        return c if quant is None else (c, quant["scale"])
    if quant is not None:
        raise ValueError("a quantized output needs 16-byte aligned rows (TMA)")
    num_tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    programs = min(num_tiles, _num_sms(a.device)) if cfg.persistent else num_tiles
    _quant_gemm_kernel[(programs,)](
        a, a_scale, w, w_scale, w_zero if w_zero is not None else w_scale, bias if bias is not None else a_scale, c,
        m, n, k, a.stride(0), w.stride(0), c.stride(0), w_scale.stride(0), group_size, programs, *res["args"],
        GROUPED=group_size < k, HAS_ZERO=w_zero is not None, HAS_BIAS=bias is not None, FP8=fp8,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        PERSISTENT=cfg.persistent, GELU=gelu, RESIDUAL=residual is not None, HAS_GATE=res["HAS_GATE"],
        SPLIT_GATE=res["SPLIT_GATE"], RES_PARTS=res["RES_PARTS"], num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl.launch_options(a.device),
    )
    return c


def _use_ws(config, quant, gelu, tma_per_channel, a, ws, outs, group=False) -> bool:
    """The warp-specialized Gluon kernel (:mod:`ws_gemm`) for per-channel 8-bit products with TMA-ready operands
    (``tma_per_channel``: :func:`_tma_ok`, no scale groups) and a plain or residual epilogue, where
    ``ws_gemm.applies``, unless a tile config is given (argument or ``VIDITQ_GEMM_CONFIG``: the tl kernel's
    sweeps); grouped q/k/v launches unless ``VIDITQ_WS_GROUP=0``."""
    if ws_gemm is None or config is not None or os.environ.get("VIDITQ_GEMM_CONFIG"):
        return False
    if group and os.environ.get("VIDITQ_WS_GROUP", "1") == "0":
        return False
    return tma_per_channel and quant is None and not gelu and ws_gemm.applies(a, ws, outs)


def group_supported(a: torch.Tensor, weights: list, out_dtype: torch.dtype) -> bool:
    """Whether :func:`quant_linear_group` runs ``weights`` = [(w, w_scale, bias), ...] (per-channel weights of A's
    dtype and K: what it accepts) in one launch: 2 to MAX_GROUP of them, bias on all or none, TMA-aligned."""
    if not 2 <= len(weights) <= MAX_GROUP or len({b is None for _, _, b in weights}) > 1:
        return False

    return _tma_aligned(a) and all(_tma_aligned(w) and w.shape[0] > 0 and (w.shape[0] * out_dtype.itemsize) % 16 == 0
                                   for w, _, _ in weights)


def quant_linear_group(a: torch.Tensor, a_scale: torch.Tensor, weights: list, out_dtype: torch.dtype,
                       config: GemmConfig | None = None) -> list[torch.Tensor]:
    """:func:`quant_linear` of one input with several weights ``[(w, w_scale, bias), ...]`` (per-channel int8
    or fp8 codes (N_i, K), scales (N_i, 1), bias (N_i,) or None) in one launch of the TMA kernel — q, k and v of a
    self-attention: 3 x 576 tiles over 132 SMs fill 13.1 waves where each product alone fills 4.4 — one (M, N_i)
    output each (the warp-specialized Gluon kernel's launch where :func:`_use_ws` says so). Where
    :func:`group_supported` says no, one launch per weight."""
    m, k = a.shape
    if a.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"the grouped GEMM takes int8 or fp8 e4m3 activation codes, got {a.dtype}")
    for w, s, _ in weights:
        if w.dim() != 2 or w.dtype != a.dtype or w.shape[1] != k or s.numel() != w.shape[0]:
            raise ValueError(f"the grouped GEMM takes per-channel {a.dtype} weights (N, {k}) with (N, 1) scales, got "
                             f"{w.dtype} {tuple(w.shape)} with scales {tuple(s.shape)}")
    a = a.contiguous()
    a_scale = a_scale.reshape(m, 1).contiguous()
    weights = [(w.contiguous(), s.reshape(-1, 1).contiguous(), b) for w, s, b in weights]
    if not group_supported(a, weights, out_dtype):
        return [quant_linear(a, a_scale, w, s, None, k, False, b, out_dtype, config) for w, s, b in weights]
    outs = [torch.empty(m, w.shape[0], device=a.device, dtype=out_dtype) for w, _, _ in weights]
    if m and _use_ws(config, None, False, True, a, [w for w, _, _ in weights], outs, group=True):
        ws_gemm.linear_group(a, a_scale.view(-1), [(w, s.view(-1), b, c) for (w, s, b), c in zip(weights, outs)],
                             pdl=pdl.enabled(a.device))
    elif m:
        fp8 = a.dtype == torch.float8_e4m3fn
        cfg = config or default_config(m, sum(w.shape[0] for w, _, _ in weights), k, k, fp8, out_dtype.itemsize,
                                       products=len(weights))
        cfg = replace(cfg, persistent=True, tma=True)
        res = _residual_args(None, None, m, 0, a_scale, out_dtype)
        _launch_tma(a, a_scale, [(w, s, b, c) for (w, s, b), c in zip(weights, outs)], k, cfg, fp8, False, res)
    return outs


def _residual_args(residual, gate, m, n, dummy, out_dtype, residual_prefix=None) -> dict:
    """The residual epilogue's operands, checked (:func:`quant_linear`): the tensors (``residual``,
    ``prefix_part``, ``gate`` as (B, N) or (2B, N) rows), tokens per batch entry and prefix rows, the constexpr
    flags, and the pointer kernel's arguments (``args``)."""
    res = dict(residual=residual, prefix_part=residual_prefix, gate=dummy, stride_gb=0, tokens=1, prefix=0,
               HAS_GATE=gate is not None, SPLIT_GATE=False, RES_PARTS=residual_prefix is not None)
    if residual is None:
        if gate is not None or residual_prefix is not None:
            raise ValueError("a gate needs a residual" if gate is not None else "a residual prefix needs a residual")
        return dict(res, args=(dummy, 0, 0, dummy, 0, 0, dummy, 0, 1, 0))
    batch = None
    if residual_prefix is not None:
        parts = (residual_prefix, residual)
        if not all(t.dim() == 3 and t.shape[0] == residual.shape[0] and t.shape[2] == n
                   and t.stride(2) == 1 and (t.shape[1] == 1 or t.stride(1) == n) and t.dtype == out_dtype
                   and t.device == residual.device for t in parts) \
                or residual.shape[0] * (residual.shape[1] + residual_prefix.shape[1]) != m:
            raise ValueError(f"a residual in two parts must be (B, T, {n}) and (B, S, {n}) {out_dtype} tensors with "
                             f"contiguous rows and B (T + S) = M = {m}, got {tuple(residual_prefix.shape)} "
                             f"strides {residual_prefix.stride()} {residual_prefix.dtype} and {tuple(residual.shape)} "
                             f"strides {residual.stride()} {residual.dtype}")
        batch, res["prefix"] = residual.shape[0], residual_prefix.shape[1]
        res["tokens"] = residual_prefix.shape[1] + residual.shape[1]
        args = (residual, residual.stride(0), residual.stride(1), residual_prefix, residual_prefix.stride(0),
                residual_prefix.stride(1))
    elif residual.shape != (m, n) or residual.stride(-1) != 1 or residual.dtype != out_dtype:
        raise ValueError(f"residual must be ({m}, {n}) {out_dtype} with contiguous rows (the output's dtype: its "
                         f"tile is sized so), got {tuple(residual.shape)} {residual.dtype} strides "
                         f"{residual.stride()}")
    else:
        args = (residual, 0, residual.stride(0), dummy, 0, 0)
    if gate is not None:
        res["SPLIT_GATE"] = split = batch is not None and gate.dim() == 3
        batch_ok = gate.shape[0] >= 1 and m % gate.shape[0] == 0 if batch is None else gate.shape[0] == batch
        if gate.dim() != (3 if split else 2) or gate.shape[-1] != n or not batch_ok or (split and gate.shape[1] != 2):
            shape = f"({'B' if batch is None else batch}, {n})" + ("" if batch is None else f" or ({batch}, 2, {n})")
            raise ValueError(f"gate must be {shape} with B dividing M={m}, got {tuple(gate.shape)}")
        if batch is None:  # (with parts: their rows per entry)
            res["tokens"] = m // gate.shape[0]
        gate = gate.reshape(-1, n)  # (2B, N) split: rows 2b, 2b + 1 (a view wherever the rows have one stride)
        if gate.stride(-1) != 1:
            raise ValueError(f"gate must have contiguous channels, got strides {gate.stride()}")
        res["gate"], res["stride_gb"] = gate, gate.stride(0)
    return dict(res, args=args + (res["gate"], res["stride_gb"], res["tokens"], res["prefix"]))
