"""8-bit GEMM for Hopper in Triton's Gluon dialect, warp-specialized so the epilogue overlaps the main loop.

``y = (a * a_scale) @ (w * w_scale)^T + bias`` [``residual + gate[row // tokens] * y``]: a (M, K) fp8 e4m3 (or
int8) codes with per-token float32 scales, w (N, K) codes of the same dtype (the layer's K-major buffer) with
per-channel scales; float32 (int32 for int8) accumulation; a 16-bit output (bf16 / fp16; the residual of the same
dtype).

Structure ("ping-pong", as CUTLASS's sm90 kernels and FA3): a persistent grid, one program per SM; in each, one
*producer* warp issues every TMA load — the A / B tiles through a ring of ``STAGES`` shared-memory stages
(mbarriers ``ready`` / ``empty``) and, for the residual epilogue, the residual tile straight into the consumer's
C buffer — and two *consumer* warpgroups take the program's output tiles in turn (tile i to group i % 2). A group
runs its asynchronous wgmma main loop, hands the tensor cores to the other group (mbarriers ``turn``), then does
its epilogue (dequantization, bias, gate and residual, the 16-bit store by TMA) while the other group's main
loop runs. The Triton ``tl`` kernel (:mod:`int_gemm`) runs its epilogue in the warps that issue the MMAs; at
DiT shapes with K = 1152 the epilogue is a large share of a tile (NOTES.md, session 17, H100, fp8: 8192 x 1152 x
1152 with the gated residual 36.2 → 29.8-30.2 µs, 8192 x 1152 x 4608 90.8-91.9 → 84.6-85.8 µs; int8 41.1 → 29.1
and 105.1 → 80.8 µs).

Up to three weights can share one launch (q, k and v: :func:`linear_group`), their tiles numbered one product
after the other (H100, session 17: PixArt's q/k/v 0.070 → 0.065 ms in fp8, 0.075 → 0.062 ms in int8).

Why the turns: a consumer waits on the ring's mbarriers by phase parity, which cannot tell fill n of a stage
from fill n + 2; if the second group waited while the first still consumed, it could take the first group's
data. With the turns, a group starts waiting only once the other group has waited for all of its stages.

Gluon has no CPU interpreter: CI compiles the kernel for sm_90 (``tests/test_ws_gemm.py``), the GPU tests compare
it with the ``tl`` kernel, whose results it reproduces bit for bit (same products, same f32 epilogue order).
:func:`applies` says when :func:`int_gemm.quant_linear` dispatches here.
"""
import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate

# (no ``from __future__ import annotations``: the aggregate's field annotations must be classes, not strings)

# Names that changed after Triton 3.6 (the GPU image's); Triton 3.9 (CI's) has the second ones.
_thread_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global


@aggregate
class Cfg:
    """The compile-time choices, passed to the partitions as one aggregate (constexprs inside
    ``warp_specialize``'s argument tuples arrive as tensors in Triton 3.6)."""
    BLOCK_M: gl.constexpr
    BLOCK_N: gl.constexpr
    BLOCK_K: gl.constexpr
    GROUP_M: gl.constexpr
    STAGES: gl.constexpr
    HAS_BIAS: gl.constexpr
    RESIDUAL: gl.constexpr
    HAS_GATE: gl.constexpr
    TILE_GATE: gl.constexpr
    INT8: gl.constexpr
    NUM: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES, HAS_BIAS, RESIDUAL, HAS_GATE, TILE_GATE, INT8,
                 NUM):
        self.BLOCK_M = gl.constexpr(BLOCK_M)
        self.BLOCK_N = gl.constexpr(BLOCK_N)
        self.BLOCK_K = gl.constexpr(BLOCK_K)
        self.GROUP_M = gl.constexpr(GROUP_M)
        self.STAGES = gl.constexpr(STAGES)
        self.HAS_BIAS = gl.constexpr(HAS_BIAS)
        self.RESIDUAL = gl.constexpr(RESIDUAL)
        self.HAS_GATE = gl.constexpr(HAS_GATE)
        self.TILE_GATE = gl.constexpr(TILE_GATE)
        self.INT8 = gl.constexpr(INT8)
        self.NUM = gl.constexpr(NUM)


@gluon.jit
def _tile_coords(t, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
    in_group = GROUP_M * num_pid_n
    first_m = (t // in_group) * GROUP_M
    size_m = gl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (t % in_group) % size_m, (t % in_group) // size_m


@gluon.jit
def _first_tile(start, P):
    """This program's first tile at or after ``start`` in the grid-stride walk ``program_id, + P, ...``."""
    return start + (gl.program_id(0) - start % P + P) % P


@gluon.jit
def _producer(a_desc, b_descs, r_desc, a_bufs, b_bufs, c_bufs, ready, empty, r_ready, r_empty, M, ns, K, cfg):
    """One warp: the TMA loads of every tile of this program, in tile order (the ``NUM`` products' tiles numbered
    one product after the other), through the ``STAGES`` ring; the residual tile of local tile i into consumer
    (i % 2)'s C buffer once that consumer's previous store has left it."""
    BLOCK_M: gl.constexpr = cfg.BLOCK_M
    BLOCK_N: gl.constexpr = cfg.BLOCK_N
    BLOCK_K: gl.constexpr = cfg.BLOCK_K
    STAGES: gl.constexpr = cfg.STAGES
    P = gl.num_programs(0)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    k_tiles = gl.cdiv(K, BLOCK_K)
    it = 0
    i = 0
    start = 0
    for g in gl.static_range(cfg.NUM):
        b_desc = b_descs[g]
        num_pid_n = gl.cdiv(ns[g], BLOCK_N)
        for t in range(_first_tile(start, P), start + num_pid_m * num_pid_n, P):
            pid_m, pid_n = _tile_coords(t - start, num_pid_m, num_pid_n, cfg.GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            for ki in range(k_tiles):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                _tma_load(a_desc, [off_m, ki * BLOCK_K], ready.index(s), a_bufs.index(s))
                _tma_load(b_desc, [off_n, ki * BLOCK_K], ready.index(s), b_bufs.index(s))
                it += 1
                if cfg.RESIDUAL:
                    if ki == 0:  # after the tile's first stage, so its main loop can start
                        c = i % 2
                        mbarrier.wait(r_empty.index(c), ((i // 2) & 1) ^ 1)
                        mbarrier.expect(r_ready.index(c), r_desc.block_type.nbytes)
                        _tma_load(r_desc, [off_m, off_n], r_ready.index(c), c_bufs.index(c))
            i += 1
        start += num_pid_m * num_pid_n


@gluon.jit
def _epilogue(acc, c_buf, c_desc, off_m, off_n, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, gate_ptr, stride_gb,
              tokens, r_ready, r_empty, r_phase, layout: gl.constexpr, cfg):
    """A consumer's tile after its main loop: per-token x per-channel dequantization, bias, [gate x y + the
    residual tile, which the producer loaded into ``c_buf``], the 16-bit store by TMA from ``c_buf``."""
    offs_m = off_m + gl.arange(0, cfg.BLOCK_M, layout=gl.SliceLayout(1, layout))
    offs_n = off_n + gl.arange(0, cfg.BLOCK_N, layout=gl.SliceLayout(0, layout))
    n_mask = offs_n < N
    y = acc.to(gl.float32) * gl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)[None, :]
    y = y * gl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if cfg.HAS_BIAS:
        y += gl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)[None, :]
    if cfg.RESIDUAL:
        if cfg.HAS_GATE:
            if cfg.TILE_GATE:  # the tile's rows share one batch row
                gate = gl.load(gate_ptr + (off_m // tokens) * stride_gb + offs_n, mask=n_mask, other=0.0)
                y = y * gate.to(gl.float32)[None, :]
            else:
                gate_ptrs = gate_ptr + (offs_m // tokens)[:, None] * stride_gb + offs_n[None, :]
                gate = gl.load(gate_ptrs, mask=(offs_m < M)[:, None] & n_mask[None, :], other=0.0)
                y = y * gate.to(gl.float32)
        mbarrier.wait(r_ready, r_phase)
        y = y + c_buf.load(layout).to(gl.float32)
        _thread_barrier()
    else:
        tma.store_wait(0)  # this warpgroup's previous store has left c_buf
    c_buf.store(y.to(c_desc.dtype))
    fence_async_shared()
    _tma_store(c_desc, [off_m, off_n], c_buf)
    if cfg.RESIDUAL:  # c_buf is the next residual's buffer: free once the store has read it (the group waits for
        # its turn next, so this wait is hidden behind the other group's main loop)
        tma.store_wait(0)
        _thread_barrier()
        mbarrier.arrive(r_empty)


@gluon.jit
def _consumer(CID: gl.constexpr, a_bufs, b_bufs, c_bufs, ready, empty, r_ready, r_empty, turn, c_descs,
              a_scale_ptr, w_scale_ptrs, bias_ptrs, gate_ptr, stride_gb, tokens, M, ns, K, cfg):
    """One warpgroup: the program's local tiles CID, CID + 2, ...: asynchronous wgmma over the ring (one in
    flight, the stage before it released), then :func:`_epilogue` from its own C buffer."""
    BLOCK_M: gl.constexpr = cfg.BLOCK_M
    BLOCK_N: gl.constexpr = cfg.BLOCK_N
    BLOCK_K: gl.constexpr = cfg.BLOCK_K
    STAGES: gl.constexpr = cfg.STAGES
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                     instr_shape=[16, BLOCK_N, 32])
    P = gl.num_programs(0)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    k_tiles = gl.cdiv(K, BLOCK_K)
    c_buf = c_bufs.index(CID)
    i = 0
    start = 0
    for g in gl.static_range(cfg.NUM):
        c_desc = c_descs[g]
        w_scale_ptr = w_scale_ptrs[g]
        bias_ptr = bias_ptrs[g]
        N = ns[g]
        num_pid_n = gl.cdiv(N, BLOCK_N)
        for t in range(_first_tile(start, P), start + num_pid_m * num_pid_n, P):
            if i % 2 == CID:
                pid_m, pid_n = _tile_coords(t - start, num_pid_m, num_pid_n, cfg.GROUP_M)
                off_m = pid_m * BLOCK_M
                off_n = pid_n * BLOCK_N
                it = i * k_tiles
                j = i // 2  # this warpgroup's j-th tile
                # Main loops alternate between the two groups (the ring's parity waits must not see another
                # group's fills): wait for the other group's last main loop to have issued.
                mbarrier.wait(turn.index(CID), (j - CID) & 1 ^ 1, pred=(j > 0) | (CID == 1))
                acc = gl.zeros((BLOCK_M, BLOCK_N), gl.int32 if cfg.INT8 else gl.float32, layout)
                for ki in range(k_tiles):
                    s = it % STAGES
                    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                    acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
                    acc = warpgroup_mma_wait(1, deps=(acc,))
                    if ki > 0:
                        mbarrier.arrive(empty.index((it - 1) % STAGES))
                    it += 1
                mbarrier.arrive(turn.index(1 - CID))
                acc = warpgroup_mma_wait(0, deps=(acc,))
                mbarrier.arrive(empty.index((it - 1) % STAGES))

                _epilogue(acc, c_buf, c_desc, off_m, off_n, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, gate_ptr,
                          stride_gb, tokens, r_ready.index(CID), r_empty.index(CID), (i // 2) & 1, layout, cfg)
            i += 1
        start += num_pid_m * num_pid_n
    tma.store_wait(0)


@gluon.jit
def _consumer0(a_bufs, b_bufs, c_bufs, ready, empty, r_ready, r_empty, turn, c_descs, a_scale_ptr, w_scale_ptrs,
               bias_ptrs, gate_ptr, stride_gb, tokens, M, ns, K, cfg):
    _consumer(0, a_bufs, b_bufs, c_bufs, ready, empty, r_ready, r_empty, turn, c_descs, a_scale_ptr, w_scale_ptrs,
              bias_ptrs, gate_ptr, stride_gb, tokens, M, ns, K, cfg)


@gluon.jit
def _consumer1(a_bufs, b_bufs, c_bufs, ready, empty, r_ready, r_empty, turn, c_descs, a_scale_ptr, w_scale_ptrs,
               bias_ptrs, gate_ptr, stride_gb, tokens, M, ns, K, cfg):
    _consumer(1, a_bufs, b_bufs, c_bufs, ready, empty, r_ready, r_empty, turn, c_descs, a_scale_ptr, w_scale_ptrs,
              bias_ptrs, gate_ptr, stride_gb, tokens, M, ns, K, cfg)


@gluon.jit
def _gemm_ws_kernel(a_desc, b_desc0, b_desc1, b_desc2, c_desc0, c_desc1, c_desc2, r_desc, a_scale_ptr, w_scale_ptrs,
                    bias_ptrs, gate_ptr, stride_gb, tokens, M, ns, K, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                    HAS_BIAS: gl.constexpr, RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, TILE_GATE: gl.constexpr,
                    PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, PDL: gl.constexpr, NUM: gl.constexpr):
    """``NUM`` (≤ 3) weights multiply the same A (q, k and v: one launch; their tiles numbered one product after
    the other, so one product's last wave fills with the next one's tiles); descriptors ``b_desc0..2`` /
    ``c_desc0..2`` (Triton 3.6's launcher takes no descriptors inside tuples), tuples ``w_scale_ptrs``,
    ``bias_ptrs``, ``ns``. The residual epilogue takes one product."""
    if PDL:  # programmatic dependent launch, as pdl.enter: wait for the previous grid, let the next one launch
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
    BLOCK_M: gl.constexpr = c_desc0.block_type.shape[0]
    BLOCK_N: gl.constexpr = c_desc0.block_type.shape[1]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc0.dtype, [STAGES] + b_desc0.block_type.shape, b_desc0.layout)
    c_bufs = gl.allocate_shared_memory(c_desc0.dtype, [2] + c_desc0.block_type.shape, c_desc0.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    r_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    r_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    for c in gl.static_range(2):
        mbarrier.init(r_ready.index(c), count=1)
        mbarrier.init(r_empty.index(c), count=1)
        mbarrier.init(turn.index(c), count=1)
    fence_async_shared()
    cfg = Cfg(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES, HAS_BIAS, RESIDUAL, HAS_GATE, TILE_GATE,
              a_desc.dtype == gl.int8, NUM)
    b_descs = (b_desc0, b_desc1, b_desc2)
    c_descs = (c_desc0, c_desc1, c_desc2)
    consumer_args = (a_bufs, b_bufs, c_bufs, ready, empty, r_ready, r_empty, turn, c_descs,
                     a_scale_ptr, w_scale_ptrs, bias_ptrs, gate_ptr, stride_gb, tokens, M, ns, K, cfg)
    gl.warp_specialize([
        (_consumer0, consumer_args),
        (_consumer1, consumer_args),
        (_producer, (a_desc, b_descs, r_desc, a_bufs, b_bufs, c_bufs, ready, empty, r_ready, r_empty, M, ns, K, cfg)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


BLOCK = (128, 128, 128)  # (BLOCK_M, BLOCK_N, BLOCK_K) of a consumer's tile (its 128 x 128 f32 accumulator: 128
# registers a thread in one warpgroup)
STAGES = 4  # H100 sweep (session 17): 4 and 5 stages alike at PixArt's shapes, 4 better at CogVideoX's; 3 slower
GROUP_M = 8
REGS = (232, 40)  # registers per thread: consumer warpgroups, producer warp (setmaxnreg)
CODES = {torch.float8_e4m3fn: gl.float8e4nv, torch.int8: gl.int8}  # 8-bit codes: f32 / int32 accumulation
OUT_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
MIN_ROWS = 513  # below this (text tokens) the tl kernel's narrow tiles fill more SMs
MAX_WAVES = 24  # tiles per SM above which the tl kernel's wider tiles win. H100 (session 17), fp8, operands through
# HBM, µs tl → ws: PixArt 8192 x 1152 x 1152 (4.4 waves) 36.2 → 29.8 with the gated residual, 27.7 → 24.4 plain;
# 8192 x 1152 x 4608 90.8 → 84.6 / 85.0 → 79.4; 8192 x 4608 x 1152 (17.5 waves) 85.7 → 84.4; CogVideoX 35552 x
# 1920 x 1920 (31.6 waves) 303.8 → 318.1 / 238.4 → 246.4


_DEVICES: dict[int, tuple[tuple[int, int], int]] = {}  # CUDA index → (compute capability, SM count)


def _device(device: torch.device) -> tuple[tuple[int, int], int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICES:
        props = torch.cuda.get_device_properties(index)
        _DEVICES[index] = ((props.major, props.minor), props.multi_processor_count)
    return _DEVICES[index]


def applies(a: torch.Tensor, ws: list[torch.Tensor], outs: list[torch.Tensor]) -> bool:
    """Whether :func:`linear` / :func:`linear_group` should run these products (weights ``ws``, outputs ``outs``):
    fp8 or int8 codes on an sm_90 GPU, M > 512 rows, at most ``MAX_WAVES`` tiles per SM, 16-bit outputs, and not
    switched off by ``VIDITQ_WS_GEMM=0``. TMA alignment is the caller's check (``int_gemm._tma_ok``)."""
    if a.device.type != "cuda" or os.environ.get("VIDITQ_WS_GEMM", "1") == "0":
        return False
    if a.dtype not in CODES or any(w.dtype != a.dtype for w in ws) or a.shape[0] < MIN_ROWS:
        return False
    capability, sms = _device(a.device)
    if capability != (9, 0) or {c.dtype for c in outs} - {outs[0].dtype} or outs[0].dtype not in OUT_DTYPES:
        return False
    tiles = sum(triton.cdiv(a.shape[0], BLOCK[0]) * triton.cdiv(w.shape[0], BLOCK[1]) for w in ws)
    return tiles <= MAX_WAVES * sms


def linear(a, a_scale, w, w_scale, bias, out, residual=None, gate=None, stages=STAGES, pdl=False, programs=None):
    """Write ``(a * a_scale) @ (w * w_scale)^T + bias`` [``residual + gate[row // (M // B)] * y``] into ``out``
    (M, N); ``a_scale`` (M,) / ``w_scale`` (N,) float32, contiguous; ``gate`` (B, N) with B dividing M.
    Arguments as :func:`int_gemm.quant_linear` validates them. ``programs``: the persistent grid (default: one
    per SM, at most one per tile)."""
    _launch(a, a_scale, [(w, w_scale, bias, out)], residual, gate, stages, pdl, programs)
    return out


def linear_group(a, a_scale, products, stages=STAGES, pdl=False, programs=None):
    """:func:`linear` of one A with 2-3 weights in one launch: ``products`` = [(w, w_scale, bias, out), ...]
    (bias on all or none), as :func:`int_gemm.quant_linear_group` validates them."""
    _launch(a, a_scale, products, None, None, stages, pdl, programs)
    return [out for _, _, _, out in products]


def _launch(a, a_scale, products, residual, gate, stages, pdl, programs):
    m, k = a.shape
    bm, bn, bk = BLOCK
    out_dtype = products[0][3].dtype
    codes, out_gl = CODES[a.dtype], OUT_DTYPES[out_dtype]
    if not 1 <= len(products) <= 3 or (residual is not None and len(products) > 1):
        raise ValueError(f"one launch takes 1 to 3 products (one with a residual), got {len(products)}")
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], codes))
    b_layout = gl.NVMMASharedLayout.get_default_for([bn, bk], codes)
    c_layout = gl.NVMMASharedLayout.get_default_for([bm, bn], out_gl)
    b_descs = [TensorDescriptor.from_tensor(w, [bn, bk], b_layout) for w, _, _, _ in products]
    c_descs = [TensorDescriptor.from_tensor(c, [bm, bn], c_layout) for _, _, _, c in products]
    pad = [None] * (3 - len(products))  # unused descriptor arguments (never read: NUM is a constexpr)
    r_desc = TensorDescriptor.from_tensor(residual, [bm, bn], c_layout) if residual is not None else c_descs[0]
    has_bias = products[0][2] is not None
    ns = tuple(w.shape[0] for w, _, _, _ in products)
    tokens = m // gate.shape[0] if gate is not None else 1
    if programs is None:
        programs = _device(a.device)[1]
    programs = max(1, min(programs, sum(triton.cdiv(m, bm) * triton.cdiv(n, bn) for n in ns)))
    _gemm_ws_kernel[(programs,)](
        a_desc, *(b_descs + pad), *(c_descs + pad), r_desc, a_scale, tuple(s for _, s, _, _ in products),
        tuple(b if has_bias else a_scale for _, _, b, _ in products), gate if gate is not None else a_scale,
        gate.stride(0) if gate is not None else 0, tokens, m, ns, k,
        GROUP_M=GROUP_M, STAGES=stages, HAS_BIAS=has_bias, RESIDUAL=residual is not None,
        HAS_GATE=gate is not None, TILE_GATE=tokens % bm == 0, PRODUCER_REGS=REGS[1], CONSUMER_REGS=REGS[0],
        PDL=pdl, NUM=len(products), num_warps=4, **(dict(launch_pdl=True) if pdl else {}))
