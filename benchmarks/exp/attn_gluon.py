"""Experiment (session 17, compiled for sm_90 here, NOT yet run on a GPU): the fp8 attention kernel of
``viditq.kernels.attention`` restructured as FA3 is, in Triton's Gluon dialect, on the skeleton of
``viditq.kernels.ws_gemm`` (which works on the H100).

Per program: one head (b·h) and two query tiles of ``BLOCK_M`` rows; one producer warp loads both Q tiles, then
streams the head's K blocks (``BLOCK_N`` x D int8) and Vᵀ blocks (D x ``BLOCK_N`` fp8) by TMA through a ring of
``STAGES`` stages that both consumer warpgroups read (a stage is free once both have arrived on ``empty``); each
consumer warpgroup owns one query tile: S = Q·Kᵀ (int8 wgmma, int32), the online softmax of the shipped kernel
(row max on the integers, one FFMA + one exp2 per score, P shifted so its row max is 448), P·V (P in fp8 from
registers, Vᵀ from shared memory). The two groups' softmax and wgmma interleave on the SM, which the ``tl`` kernel
(one warpgroup waiting on its own wgmma, 2-3 CTAs per SM) cannot schedule (NOTES.md, "8-bit attention").

Operands: ``attention.quantize_operands`` with the fp8 mode's layouts (no bias); the number of query blocks must
be even (pairs). Output (B, H, Nq, D) any strides, as ``attention.attention_from_operands``.

    PYTHONPATH=src python benchmarks/exp/attn_gluon.py --compile     # sm_90 compile check, no GPU
    PYTHONPATH=src python benchmarks/exp/attn_gluon.py               # GPU: vs the tl kernel and SDPA
"""
import argparse
import os
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
os.environ["VIDITQ_WS_ATTENTION"] = "0"  # attention_from_operands: the tl kernel (this file times its own)
from viditq.kernels.ws_gemm import _tma_load  # noqa: E402

P_SHIFT = gl.constexpr(8.807354922057604)  # log2(448): P's row max lands on 448


@aggregate
class Cfg:
    BLOCK_M: gl.constexpr
    BLOCK_N: gl.constexpr
    HEAD_D: gl.constexpr
    STAGES: gl.constexpr
    PIPELINE: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, BLOCK_M, BLOCK_N, HEAD_D, STAGES, PIPELINE):
        self.BLOCK_M = gl.constexpr(BLOCK_M)
        self.BLOCK_N = gl.constexpr(BLOCK_N)
        self.HEAD_D = gl.constexpr(HEAD_D)
        self.STAGES = gl.constexpr(STAGES)
        self.PIPELINE = gl.constexpr(PIPELINE)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, ready, empty, NQ_PAD, NKV_PAD, N_KV, cfg):
    bh = gl.program_id(1)
    row_q = bh * NQ_PAD + gl.program_id(0) * (2 * cfg.BLOCK_M)
    for c in gl.static_range(2):
        mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
        _tma_load(q_desc, [row_q + c * cfg.BLOCK_M, 0], q_ready.index(c), q_bufs.index(c))
    for j in range(gl.cdiv(N_KV, cfg.BLOCK_N)):
        s = j % cfg.STAGES
        mbarrier.wait(empty.index(s), ((j // cfg.STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [bh * NKV_PAD + j * cfg.BLOCK_N, 0], ready.index(s), k_bufs.index(s))
        _tma_load(v_desc, [bh * cfg.HEAD_D, j * cfg.BLOCK_N], ready.index(s), v_bufs.index(s))


@gluon.jit
def _softmax_block(qk, j, m_i, q_scale, k_scales, N_KV, cfg, s_layout: gl.constexpr):
    """One key block's online-softmax step on the int32 scores: (P shifted so its row max is 448, new row max,
    the rescale factor of the running sums)."""
    qk_scale = q_scale * gl.load(k_scales + j)
    if (j + 1) * cfg.BLOCK_N > N_KV:  # the last, partial key block: padded keys masked
        offs_n = j * cfg.BLOCK_N + gl.arange(0, cfg.BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        sc = gl.where((offs_n < N_KV)[None, :], qk.to(gl.float32) * qk_scale, -1.0e30)
        m_new = gl.maximum(m_i, gl.max(sc, axis=1))
        p = gl.exp2(sc - (m_new - P_SHIFT)[:, None])
    else:  # row max on the integers, one FFMA + one exp2 per score
        m_new = gl.maximum(m_i, gl.max(qk, axis=1).to(gl.float32) * qk_scale)
        p = gl.exp2(qk.to(gl.float32) * qk_scale - (m_new - P_SHIFT)[:, None])
    return p, m_new, gl.exp2(m_i - m_new)


@gluon.jit
def _consumer(CID: gl.constexpr, q_bufs, k_bufs, v_bufs, q_ready, ready, empty, QScale, KScale, VScale, Out,
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
    q_scale = gl.load(QScale + bh * (NQ_PAD // BLOCK_M) + m_block)
    k_scales = KScale + bh * (NKV_PAD // BLOCK_N)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, o_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)
    mbarrier.wait(q_ready.index(CID), 0)
    q_smem = q_bufs.index(CID)
    n_blocks = gl.cdiv(N_KV, BLOCK_N)
    if cfg.PIPELINE:  # FA3's intra-warpgroup overlap: block j's softmax runs while P(j-1)·V(j-1) is in flight
        mbarrier.wait(ready.index(0), 0)
        qk = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(0, deps=(qk,))
        p, m_i, alpha = _softmax_block(qk, 0, m_i, q_scale, k_scales, N_KV, cfg, s_layout)
        l_i = gl.sum(p, axis=1)
        p8 = gl.convert_layout(p.to(gl.float8e4nv), p_layout)
        for j in range(1, n_blocks):
            s = j % cfg.STAGES
            s_prev = (j - 1) % cfg.STAGES
            mbarrier.wait(ready.index(s), (j // cfg.STAGES) & 1)
            qk = warpgroup_mma(q_smem, k_bufs.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            # (P, a register operand, cannot be a wait dep in Triton 3.6 (8-bit); ptxas keeps it alive)
            acc = warpgroup_mma(p8, v_bufs.index(s_prev).permute((1, 0)), acc, is_async=True)
            qk = warpgroup_mma_wait(1, deps=(qk,))
            p, m_i, alpha = _softmax_block(qk, j, m_i, q_scale, k_scales, N_KV, cfg, s_layout)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            p8 = gl.convert_layout(p.to(gl.float8e4nv), p_layout)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(empty.index(s_prev))
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        s_last = (n_blocks - 1) % cfg.STAGES
        acc = warpgroup_mma(p8, v_bufs.index(s_last).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index(s_last))
    else:
        for j in range(n_blocks):
            s = j % cfg.STAGES
            mbarrier.wait(ready.index(s), (j // cfg.STAGES) & 1)
            qk = warpgroup_mma(q_smem, k_bufs.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(0, deps=(qk,))
            p, m_i, alpha = _softmax_block(qk, j, m_i, q_scale, k_scales, N_KV, cfg, s_layout)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            p8 = gl.convert_layout(p.to(gl.float8e4nv), p_layout)
            acc = warpgroup_mma(p8, v_bufs.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(empty.index(s))
    offs_m = m_block * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    out = out * gl.load(VScale + bh * HEAD_D + offs_d)[None, :]
    b = bh // H
    h = bh % H
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    gl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m < N_Q)[:, None] & (offs_d < D)[None, :])


@gluon.jit
def _consumer0(q_bufs, k_bufs, v_bufs, q_ready, ready, empty, QScale, KScale, VScale, Out,
               stride_ob, stride_oh, stride_on, stride_od, H, N_Q, N_KV, D, NQ_PAD, NKV_PAD, cfg):
    _consumer(0, q_bufs, k_bufs, v_bufs, q_ready, ready, empty, QScale, KScale, VScale, Out,
              stride_ob, stride_oh, stride_on, stride_od, H, N_Q, N_KV, D, NQ_PAD, NKV_PAD, cfg)


@gluon.jit
def _consumer1(q_bufs, k_bufs, v_bufs, q_ready, ready, empty, QScale, KScale, VScale, Out,
               stride_ob, stride_oh, stride_on, stride_od, H, N_Q, N_KV, D, NQ_PAD, NKV_PAD, cfg):
    _consumer(1, q_bufs, k_bufs, v_bufs, q_ready, ready, empty, QScale, KScale, VScale, Out,
              stride_ob, stride_oh, stride_on, stride_od, H, N_Q, N_KV, D, NQ_PAD, NKV_PAD, cfg)


@gluon.jit
def attn_fp8_ws_kernel(q_desc, k_desc, v_desc, QScale, KScale, VScale, Out, stride_ob, stride_oh, stride_on,
                       stride_od, H, N_Q, N_KV, D, NQ_PAD, NKV_PAD, STAGES: gl.constexpr, PIPELINE: gl.constexpr,
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
    for c in gl.static_range(2):
        mbarrier.init(q_ready.index(c), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # both consumer groups read every K / V stage
    fence_async_shared()
    cfg = Cfg(BLOCK_M, BLOCK_N, HEAD_D, STAGES, PIPELINE)
    consumer_args = (q_bufs, k_bufs, v_bufs, q_ready, ready, empty, QScale, KScale, VScale, Out,
                     stride_ob, stride_oh, stride_on, stride_od, H, N_Q, N_KV, D, NQ_PAD, NKV_PAD, cfg)
    gl.warp_specialize([
        (_consumer0, consumer_args),
        (_consumer1, consumer_args),
        (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, ready, empty, NQ_PAD, NKV_PAD, N_KV,
                     cfg)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def attention_from_operands_ws(ops, out, n_kv, block_m=64, block_n=128, stages=3, regs=(232, 40), pipeline=True):
    """``attention.attention_from_operands`` for the fp8 mode without bias, by the Gluon kernel."""
    b, h, n_q, d = out.shape
    bh, nq_pad, head_d = ops.q8.shape
    nkv_pad = ops.k8.shape[1]
    if ops.v_scale is None or ops.bias is not None or (nq_pad // block_m) % 2:
        raise ValueError("the experiment takes fp8 operands without bias and an even number of query blocks")
    i8, f8 = gl.int8, gl.float8e4nv
    q_desc = TensorDescriptor.from_tensor(ops.q8.view(bh * nq_pad, head_d), [block_m, head_d],
                                          gl.NVMMASharedLayout.get_default_for([block_m, head_d], i8))
    k_desc = TensorDescriptor.from_tensor(ops.k8.view(bh * nkv_pad, head_d), [block_n, head_d],
                                          gl.NVMMASharedLayout.get_default_for([block_n, head_d], i8))
    v_desc = TensorDescriptor.from_tensor(ops.v.view(bh * head_d, nkv_pad), [head_d, block_n],
                                          gl.NVMMASharedLayout.get_default_for([head_d, block_n], f8))
    grid = (nq_pad // (2 * block_m), bh)
    attn_fp8_ws_kernel[grid](q_desc, k_desc, v_desc, ops.q_scale, ops.k_scale, ops.v_scale, out, *out.stride(), h,
                             n_q, n_kv, d, nq_pad, nkv_pad, STAGES=stages, PIPELINE=pipeline, CONSUMER_REGS=regs[0],
                             PRODUCER_REGS=regs[1], num_warps=4)
    return out


def _compile_check():
    from viditq.kernels import attention as A, offline

    b, h, n, d = 1, 2, 300, 64
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    ops_args = dict(q8=torch.zeros(b * h, 384, d, dtype=torch.int8), q_scale=torch.rand(b * h, 6),
                    k8=torch.zeros(b * h, 384, d, dtype=torch.int8), k_scale=torch.rand(b * h, 3),
                    v=torch.zeros(b * h, d, 384).to(torch.float8_e4m3fn), v_scale=torch.rand(b * h, d), bias=None)
    ops = A.QuantizedOperands(**ops_args)
    for pipeline in (False, True):
        with offline.sm90_compiles(attn_fp8_ws_kernel) as compiled:
            attention_from_operands_ws(ops, torch.empty(b, n, h, d, dtype=torch.bfloat16).transpose(1, 2), n,
                                       pipeline=pipeline)
        c = compiled[-1]
        ptx = c.asm["ptx"]
        print(f"pipeline={pipeline}: shared {c.metadata.shared} B, wgmma {ptx.count('wgmma.mma_async')}, setmaxnreg "
              f"{'setmaxnreg' in ptx}, ex2 {ptx.count('ex2.approx')}")
    del q, k, v


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--configs", default="128x3p,128x3", help="comma list of BLOCK_NxSTAGES[p] of the Gluon "
                        "kernel (p: the intra-warpgroup pipelined loop)")
    parser.add_argument("--shapes", default="cogvideox,pixart")
    args = parser.parse_args()
    if args.compile:
        return _compile_check()
    import torch.nn.functional as F
    from triton.testing import do_bench

    from viditq.kernels import attention as A

    shapes = {"small": (1, 2, 1000, 64), "cogvideox": (2, 30, 17776, 64), "pixart": (2, 16, 4096, 72)}
    configs = [(*(int(x) for x in c.rstrip("p").split("x")), c.endswith("p")) for c in args.configs.split(",")]
    for name in args.shapes.split(","):
        b, h, n, d = shapes[name]
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        cfg = A.AttentionConfig(64, 128, 4, 3)
        ops = A.quantize_operands(q, k, v, "fp8", d ** -0.5, None, cfg)
        out_tl = torch.empty(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        A.attention_from_operands(ops, out_tl, n, cfg)
        ref = F.scaled_dot_product_attention(q, k, v)
        err = lambda y: ((y.float() - ref.float()).norm() / ref.float().norm()).item()  # noqa: E731
        t_tl = do_bench(lambda: A.attention_from_operands(ops, out_tl, n, cfg), return_mode="median")
        t_sdpa = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), return_mode="median")
        print(f"{name}: sdpa {t_sdpa:.3f} ms | tl {t_tl:.3f} ms err {err(out_tl):.4f}", flush=True)
        for block_n, stages, pipeline in configs:
            if block_n != cfg.block_n:  # the K scales are per key block of the operands' tile
                ops_n = A.quantize_operands(q, k, v, "fp8", d ** -0.5, None, A.AttentionConfig(64, block_n, 4, 3))
            else:
                ops_n = ops
            out_ws = torch.full_like(out_tl, float("nan"))
            run = lambda: attention_from_operands_ws(ops_n, out_ws, n, block_n=block_n, stages=stages,  # noqa: E731
                                                     pipeline=pipeline)
            run()
            torch.cuda.synchronize()
            t_ws = do_bench(run, return_mode="median")
            print(f"  ws {block_n}x{stages}{'p' if pipeline else ''}: {t_ws:.3f} ms ({t_sdpa / t_ws:.2f}x sdpa, {t_tl / t_ws:.2f}x tl) "
                  f"err {err(out_ws):.4f} max |ws-tl| {(out_ws.float() - out_tl.float()).abs().max():.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
