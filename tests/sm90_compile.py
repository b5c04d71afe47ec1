"""Compile the Gluon kernels for sm_90 without a GPU (Triton's bundled ptxas) and print what the tests check, as
JSON: ``gemm`` (:mod:`viditq.kernels.ws_gemm`, for ``tests/test_ws_gemm.py``), ``attention``
(:mod:`viditq.kernels.ws_attention`, for ``tests/test_ws_attention.py``) or ``tl_attention`` (the ``tl`` kernel
of :mod:`viditq.kernels.attention`, for ``tests/test_attention.py``). Run in a subprocess by the tests
(``offline.sm90_compiles`` swaps Triton's active driver, and the compile must not see ``TRITON_INTERPRET``)."""
import json
import re
import sys

import torch
import triton

from viditq.kernels import attention, offline, ws_attention, ws_gemm


def gemm():
    m, n, k = 1000, 392, 640
    out = {}
    residual = dict(residual=torch.randn(m, n).bfloat16(), gate=torch.randn(2, n).bfloat16())
    with offline.sm90_compiles(ws_gemm._gemm_ws_kernel) as compiled:
        for codes in (torch.float8_e4m3fn, torch.int8):
            a = torch.randn(m, k).mul(20).clamp(-127, 127).to(codes)
            w = torch.randn(n, k).mul(20).clamp(-127, 127).to(codes)
            a_scale, w_scale, bias = torch.rand(m), torch.rand(n), torch.randn(n).bfloat16()
            for name, extra in {"plain": {}, "residual": residual, "group": None}.items():
                if extra is None:  # q, k and v in one launch
                    ws_gemm.linear_group(a, a_scale, [(w, w_scale, bias, torch.empty(m, n, dtype=torch.bfloat16))
                                                      for _ in range(3)], programs=132, pdl=True)
                else:
                    ws_gemm.linear(a, a_scale, w, w_scale, bias, torch.empty(m, n, dtype=torch.bfloat16),
                                   programs=132, pdl=True, **extra)
                c = compiled[-1]
                ptx = c.asm["ptx"]
                kind = "e4m3.e4m3" if codes == torch.float8_e4m3fn else "s32.s8.s8"
                out[f"{name} {str(codes).removeprefix('torch.')}"] = dict(
                    shared=c.metadata.shared, setmaxnreg="setmaxnreg" in ptx,
                    wgmma=len(re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n128k32\.\w*\.?{kind}", ptx)),
                    griddepcontrol="griddepcontrol.wait" in ptx,
                    tma_loads=len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.shared::\w+\.global", ptx)))
    return out


def _fp8_operands(bh: int, n: int, head_d: int, block_m: int, block_n: int) -> attention.QuantizedOperands:
    """Operands of the fp8 mode as ``attention.quantize_operands`` lays them out (``n`` tokens padded to whole Q /
    K blocks); the values do not matter for a compile."""
    nq_pad, nkv_pad = triton.cdiv(n, block_m) * block_m, triton.cdiv(n, block_n) * block_n
    return attention.QuantizedOperands(
        q8=torch.zeros(bh, nq_pad, head_d, dtype=torch.int8), q_scale=torch.rand(bh, nq_pad // block_m),
        k8=torch.zeros(bh, nkv_pad, head_d, dtype=torch.int8), k_scale=torch.rand(bh, nkv_pad // block_n),
        v=torch.zeros(bh, head_d, nkv_pad).to(torch.float8_e4m3fn), v_scale=torch.rand(bh, head_d), bias=None)


def attention_kernel():
    """fp8 operands as ``attention.quantize_operands`` lays them out, per padded head dim and key block; the
    ping-pong order at the CogVideoX tile."""
    out = {}
    b, h, n = 1, 2, 300
    with offline.sm90_compiles(ws_attention._attn_fp8_ws_kernel) as compiled:
        variants = [(d, bn, False) for d in ws_attention.HEAD_DS for bn in ws_attention.BLOCK_NS] + [(64, 128, True)]
        for head_d, block_n, pingpong in variants:
            ops = _fp8_operands(b * h, n, head_d, ws_attention.BLOCK_M, block_n)
            ws_attention.attention(ops, torch.empty(b, n, h, head_d, dtype=torch.bfloat16).transpose(1, 2), n,
                                   block_n, pingpong=pingpong)
            c = compiled[-1]
            ptx = c.asm["ptx"]
            out[f"d{head_d} n{block_n}{' pingpong' if pingpong else ''}"] = dict(
                shared=c.metadata.shared, setmaxnreg="setmaxnreg" in ptx,
                qk=len(re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{block_n}k32\.s32\.s8\.s8", ptx)),
                pv=len(re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{head_d}k32\.f32\.e4m3\.e4m3", ptx)),
                tma_loads=len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.shared::\w+\.global", ptx)),
                **offline.ptxas_report(c), loops=offline.mma_loops(c))
    return out


def tl_attention():
    """The ``tl`` kernel of :mod:`attention` in fp8 mode at its default tiles (head dims 64 and 128): the SASS
    loops."""
    out = {}
    b, h, n = 1, 2, 300
    with offline.sm90_compiles(attention._attn_fwd_kernel) as compiled:
        for head_d in (64, 128):
            for config in {attention.default_config(head_d, "fp8"), attention.default_config(head_d, "fp8", 120)}:
                ops = _fp8_operands(b * h, n, head_d, config.block_m, config.block_n)
                attention.attention_from_operands(
                    ops, torch.empty(b, n, h, head_d, dtype=torch.bfloat16).transpose(1, 2), n, config)
                out[f"d{head_d} m{config.block_m} n{config.block_n} w{config.num_warps}"] = dict(
                    loops=offline.mma_loops(compiled[-1]))
    return out


if __name__ == "__main__":
    json.dump({"gemm": gemm, "attention": attention_kernel, "tl_attention": tl_attention}[sys.argv[1]](), sys.stdout)
