"""The fp8 mode of :mod:`attention` for Hopper in Triton's Gluon dialect, structured as FlashAttention-3.

Same operands and numerics as the ``tl`` kernel of :mod:`attention` (fp8 mode, no bias): int8 Q·Kᵀ with per-block
scales, the online softmax on ``exp2`` with the row max taken on the integer scores, P shifted so its row max is
448 and cast to fp8 e4m3, P·V on fp8 tensor cores with V's per-channel scales applied at the end.

Structure, per program: one head (b·h) and two query tiles of ``BLOCK_M`` = 64 rows. One *producer* warp loads
both Q tiles, then streams the head's K blocks (``BLOCK_N`` x D int8) and Vᵀ blocks (D x ``BLOCK_N`` fp8) by TMA
through a ring of ``STAGES`` shared-memory stages; both *consumer* warpgroups read every stage (a stage is free
once both have arrived on ``empty``), each for its own query tile: S = Q·K(j)ᵀ, the softmax, O += P·V(j).
``pingpong``: the two groups issue their wgmma in turns (mbarriers ``turn``), as FA3 orders its warpgroups with
named barriers, so that one group's softmax runs while the other's wgmma do.

Status (NOTES.md, sessions 18-19, H100, CogVideoX's (2, 30, 17776, 64)): correct (the GPU tests: within
0.001-0.003 of the ``tl`` kernel) but **slower than the tl kernel**, so off by default (``VIDITQ_WS_ATTENTION=1``
turns it on). Session 18 found the masked last key block as a runtime branch in the loop (both sides' exp2
evaluated on every block: 130 ``MUFU.EX2`` per trip instead of 66) and split it off; measured in session 19:
9.12 ms against the tl kernel's 8.66 (ping-pong order 10.26). With P relabeled into the P·V operand's order
instead of shuffled (V's keys stored in that order, :func:`attention._pv_key_position`; 437 instead of 486
instructions per trip) it measured 10.61 ms against 9.20 before, on one machine — slower for a reason the SASS
does not show; the tl kernel, given the same change and TMA loads, went from 8.74 to 7.73 ms.

Gluon has no CPU interpreter: CI compiles the kernel for sm_90 (``tests/test_ws_attention.py``); on an H100 /
H200 the tests compare it with the ``tl`` kernel and the reference. :func:`applies` says when
:func:`attention.attention_from_operands` dispatches here.
"""
import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate

from .ws_gemm import _device, _tma_load

# (no ``from __future__ import annotations``: the aggregate's field annotations must be classes, not strings)

BLOCK_M = 64  # query rows per consumer warpgroup (one m64 wgmma row block)
BLOCK_NS = (64, 128)  # key blocks the kernel takes (the K quantization block of the operands)
HEAD_DS = (32, 64, 128)  # padded head dims: the accumulators of a 64-row tile fit the consumers' registers
STAGES = 3
ENABLED_BY_DEFAULT = False  # slower than the tl kernel on the H100 (docstring); VIDITQ_WS_ATTENTION=1 turns it on
PINGPONG = False  # the consumers' wgmma issue in turns (H100: slower than the plain order, 10.26 vs 9.12 ms)
REGS = (232, 40)  # registers per thread: consumers, producer
P_SHIFT = gl.constexpr(8.807354922057604)  # log2(448): P's row max lands on 448


@aggregate
class Cfg:
    """Compile-time choices for the partitions (constexprs in ``warp_specialize``'s argument tuples arrive as
    tensors in Triton 3.6)."""
    BLOCK_M: gl.constexpr
    BLOCK_N: gl.constexpr
    HEAD_D: gl.constexpr
    STAGES: gl.constexpr
    PINGPONG: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, BLOCK_M, BLOCK_N, HEAD_D, STAGES, PINGPONG):
        self.BLOCK_M = gl.constexpr(BLOCK_M)
        self.BLOCK_N = gl.constexpr(BLOCK_N)
        self.HEAD_D = gl.constexpr(HEAD_D)
        self.STAGES = gl.constexpr(STAGES)
        self.PINGPONG = gl.constexpr(PINGPONG)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, ready, empty, NQ_PAD, NKV_PAD, N_KV, cfg):
    bh = gl.program_id(1)
    row_q = bh * NQ_PAD + gl.program_id(0) * (2 * cfg.BLOCK_M)
    for c in gl.static_range(2):  # (past the head's last tile, TMA reads the next head's rows or zeros: unused)
        mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
        _tma_load(q_desc, [row_q + c * cfg.BLOCK_M, 0], q_ready.index(c), q_bufs.index(c))
    for j in range(gl.cdiv(N_KV, cfg.BLOCK_N)):
        s = j % cfg.STAGES
        mbarrier.wait(empty.index(s), ((j // cfg.STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [bh * NKV_PAD + j * cfg.BLOCK_N, 0], ready.index(s), k_bufs.index(s))
        _tma_load(v_desc, [bh * cfg.HEAD_D, j * cfg.BLOCK_N], ready.index(s), v_bufs.index(s))


@gluon.jit
def _take_turn(turn, CID: gl.constexpr, t, cfg):
    """Ping-pong: before its wgmma issue number ``t``, a consumer waits for the other's issue ``t - 1 + CID``
    (group 0 goes first), so the two groups issue S(0), S(0), PV(0), PV(0), S(1)... in turn and one group's
    softmax runs while the other's wgmma do."""
    if cfg.PINGPONG:
        if CID == 1 or t > 0:
            mbarrier.wait(turn.index(CID), (t + CID - 1) & 1)


@gluon.jit
def _pass_turn(turn, CID: gl.constexpr, cfg):
    if cfg.PINGPONG:
        mbarrier.arrive(turn.index(1 - CID))


@gluon.jit
def _key_block(j, MASKED: gl.constexpr, q_smem, k_bufs, v_bufs, ready, empty, turn, CID: gl.constexpr, zero_s,
               m_i, l_i, acc, qk_scale, N_KV, cfg, s_layout: gl.constexpr, o_layout: gl.constexpr,
               p_layout: gl.constexpr):
    """One key block: S = Q·K(j)ᵀ (int32), the online softmax (P shifted so its row max is 448), O += P·V(j).
    ``MASKED``: the last, partial block, whose padded keys are masked — a separate instantiation, as in the tl
    kernel: a runtime branch inside the loop made the compiler evaluate both sides' exp2 on every block."""
    s = j % cfg.STAGES
    mbarrier.wait(ready.index(s), (j // cfg.STAGES) & 1)
    _take_turn(turn, CID, 2 * j, cfg)
    qk = warpgroup_mma(q_smem, k_bufs.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    _pass_turn(turn, CID, cfg)
    qk = warpgroup_mma_wait(0, deps=(qk,))
    if MASKED:
        offs_n = j * cfg.BLOCK_N + gl.arange(0, cfg.BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        sc = gl.where((offs_n < N_KV)[None, :], qk.to(gl.float32) * qk_scale, -1.0e30)
        m_new = gl.maximum(m_i, gl.max(sc, axis=1))
        p = gl.exp2(sc - (m_new - P_SHIFT)[:, None])
    else:  # row max on the integers, one FFMA + one exp2 per score
        m_new = gl.maximum(m_i, gl.max(qk, axis=1).to(gl.float32) * qk_scale)
        p = gl.exp2(qk.to(gl.float32) * qk_scale - (m_new - P_SHIFT)[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    # P's columns in the V operand's key order (attention._pv_key_position): a relabeling of registers
    p8 = gl.reshape(p.to(gl.float8e4nv), [cfg.BLOCK_M, cfg.BLOCK_N // 32, 2, 2, 4, 2])
    p8 = gl.convert_layout(gl.reshape(gl.permute(p8, [0, 1, 2, 4, 3, 5]), [cfg.BLOCK_M, cfg.BLOCK_N]), p_layout)
    _take_turn(turn, CID, 2 * j + 1, cfg)
    acc = warpgroup_mma(p8, v_bufs.index(s).permute((1, 0)), acc, is_async=True)
    _pass_turn(turn, CID, cfg)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(empty.index(s))
    return m_new, l_i, acc


@gluon.jit
def _consumer(CID: gl.constexpr, q_bufs, k_bufs, v_bufs, q_ready, ready, empty, turn, QScale, KScale, VScale, Out,
              stride_ob, stride_oh, stride_on, stride_od, H, N_Q, N_KV, D, NQ_PAD, NKV_PAD, cfg):
    BLOCK_M: gl.constexpr = cfg.BLOCK_M
    BLOCK_N: gl.constexpr = cfg.BLOCK_N
    HEAD_D: gl.constexpr = cfg.HEAD_D
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 32])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    bh = gl.program_id(1)
    m_block = gl.program_id(0) * 2 + CID
    nq_blocks = NQ_PAD // BLOCK_M  # odd: the last program's second tile is past the end (nothing stored)
    q_scale = gl.load(QScale + bh * nq_blocks + m_block, mask=m_block < nq_blocks, other=0.0)
    k_scales = KScale + bh * (NKV_PAD // BLOCK_N)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, o_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)
    mbarrier.wait(q_ready.index(CID), 0)
    q_smem = q_bufs.index(CID)
    n_full = N_KV // BLOCK_N
    for j in range(n_full):
        m_i, l_i, acc = _key_block(j, False, q_smem, k_bufs, v_bufs, ready, empty, turn, CID, zero_s, m_i, l_i, acc,
                                   q_scale * gl.load(k_scales + j), N_KV, cfg, s_layout, o_layout, p_layout)
    if n_full * BLOCK_N < N_KV:
        m_i, l_i, acc = _key_block(n_full, True, q_smem, k_bufs, v_bufs, ready, empty, turn, CID, zero_s, m_i, l_i,
                                   acc, q_scale * gl.load(k_scales + n_full), N_KV, cfg, s_layout, o_layout,
                                   p_layout)

    offs_m = m_block * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    out = out * gl.load(VScale + bh * HEAD_D + offs_d)[None, :]
    b = bh // H
    h = bh % H
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    gl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m < N_Q)[:, None] & (offs_d < D)[None, :])


@gluon.jit
def _consumer0(q_bufs, k_bufs, v_bufs, q_ready, ready, empty, turn, QScale, KScale, VScale, Out,
               stride_ob, stride_oh, stride_on, stride_od, H, N_Q, N_KV, D, NQ_PAD, NKV_PAD, cfg):
    _consumer(0, q_bufs, k_bufs, v_bufs, q_ready, ready, empty, turn, QScale, KScale, VScale, Out,
              stride_ob, stride_oh, stride_on, stride_od, H, N_Q, N_KV, D, NQ_PAD, NKV_PAD, cfg)


@gluon.jit
def _consumer1(q_bufs, k_bufs, v_bufs, q_ready, ready, empty, turn, QScale, KScale, VScale, Out,
               stride_ob, stride_oh, stride_on, stride_od, H, N_Q, N_KV, D, NQ_PAD, NKV_PAD, cfg):
    _consumer(1, q_bufs, k_bufs, v_bufs, q_ready, ready, empty, turn, QScale, KScale, VScale, Out,
              stride_ob, stride_oh, stride_on, stride_od, H, N_Q, N_KV, D, NQ_PAD, NKV_PAD, cfg)


@gluon.jit
def _attn_fp8_ws_kernel(q_desc, k_desc, v_desc, QScale, KScale, VScale, Out, stride_ob, stride_oh, stride_on,
                        stride_od, H, N_Q, N_KV, D, NQ_PAD, NKV_PAD, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                        CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(2):
        mbarrier.init(q_ready.index(c), count=1)
        mbarrier.init(turn.index(c), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # both consumer groups read every K / V stage
    fence_async_shared()
    cfg = Cfg(BLOCK_M, BLOCK_N, HEAD_D, STAGES, PINGPONG)
    consumer_args = (q_bufs, k_bufs, v_bufs, q_ready, ready, empty, turn, QScale, KScale, VScale, Out,
                     stride_ob, stride_oh, stride_on, stride_od, H, N_Q, N_KV, D, NQ_PAD, NKV_PAD, cfg)
    gl.warp_specialize([
        (_consumer0, consumer_args),
        (_consumer1, consumer_args),
        (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, ready, empty, NQ_PAD, NKV_PAD, N_KV,
                     cfg)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def applies(ops, out: torch.Tensor, block_m: int, block_n: int) -> bool:
    """Whether :func:`attention` should run these operands (quantized with Q / K blocks ``block_m`` /
    ``block_n``): fp8 mode without bias on an sm_90 GPU, 64-row Q blocks, a key block and padded head dim the
    kernel takes, and switched on (``VIDITQ_WS_ATTENTION``, default ``ENABLED_BY_DEFAULT``)."""
    if out.device.type != "cuda" or os.environ.get("VIDITQ_WS_ATTENTION", "01"[ENABLED_BY_DEFAULT]) != "1":
        return False
    if ops.v_scale is None or ops.bias is not None or block_m != BLOCK_M or block_n not in BLOCK_NS:
        return False
    return ops.q8.shape[2] in HEAD_DS and _device(out.device)[0] == (9, 0)


def attention(ops, out: torch.Tensor, n_kv: int, block_n: int, stages: int = STAGES,
              pingpong: bool | None = None) -> torch.Tensor:
    """Write the attention of the quantized operands ``ops`` (``attention.QuantizedOperands``, fp8 mode, Q in
    64-row blocks, K / V in ``block_n``-key blocks) over the first ``n_kv`` keys into ``out`` (B, H, Nq, D), any
    strides. ``pingpong``: the wgmma issue order (default: the module's ``PINGPONG``)."""
    b, h, n_q, d = out.shape
    bh, nq_pad, head_d = ops.q8.shape
    nkv_pad = ops.k8.shape[1]
    i8, f8 = gl.int8, gl.float8e4nv
    q_desc = TensorDescriptor.from_tensor(ops.q8.view(bh * nq_pad, head_d), [BLOCK_M, head_d],
                                          gl.NVMMASharedLayout.get_default_for([BLOCK_M, head_d], i8))
    k_desc = TensorDescriptor.from_tensor(ops.k8.view(bh * nkv_pad, head_d), [block_n, head_d],
                                          gl.NVMMASharedLayout.get_default_for([block_n, head_d], i8))
    v_desc = TensorDescriptor.from_tensor(ops.v.view(bh * head_d, nkv_pad), [head_d, block_n],
                                          gl.NVMMASharedLayout.get_default_for([head_d, block_n], f8))
    grid = ((nq_pad // BLOCK_M + 1) // 2, bh)
    _attn_fp8_ws_kernel[grid](q_desc, k_desc, v_desc, ops.q_scale, ops.k_scale, ops.v_scale, out, *out.stride(), h,
                              n_q, n_kv, d, nq_pad, nkv_pad, STAGES=stages,
                              PINGPONG=PINGPONG if pingpong is None else pingpong, CONSUMER_REGS=REGS[0],
                              PRODUCER_REGS=REGS[1], num_warps=4)
    return out
