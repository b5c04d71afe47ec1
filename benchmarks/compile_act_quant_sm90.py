"""Compile the activation-quantization kernels for sm_90 without a GPU and print registers / spills / shared
memory per launch shape (Triton's bundled ptxas + cuobjdump). Used to prune the H100 sweep before the device run.

    python benchmarks/compile_act_quant_sm90.py [--rotate-only | --plain-only]
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from viditq.kernels import act_quant as aq  # noqa: E402
from viditq.kernels import offline  # noqa: E402
from viditq.quant.hadamard import hadamard_factors  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
COMMON = dict(QMAX=127.0, MIN_S=1e-8, FP8=False, CUDA_SCALAR_DIV=True, FAST_ROUND=True)


def resources(compiled) -> str:
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", offline.cuobjdump(compiled, "-res-usage"))
    return f"reg {m[1]:>3} stack {m[2]:>4} smem {int(m[3]) + compiled.metadata.shared:>6} local {m[4]}"


def compile_plain(k, cfg, smooth):
    ka, kb = aq.split_width(k)
    sig = {"x_ptr": "*bf16", "smooth_ptr": "*fp32", "codes_ptr": "*i8", "scale_ptr": "*fp32", "M": "i32",
           "stride_xm": "i32", "stride_cm": "i32", "num_programs": "i32"}
    const = dict(K=k, KA=ka, KB=kb, HAS_SMOOTH=smooth, BLOCK_M=cfg.block_m, PERSISTENT=cfg.persistent,
                 NUM_STAGES=cfg.num_stages, **COMMON)
    sig.update({n: "constexpr" for n in const})
    src = ASTSource(aq._act_quant_plain_kernel, signature=sig, constexprs=const,
                    attrs={(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 5, 6)})
    return triton.compile(src, target=TARGET, options={"num_warps": cfg.num_warps})


def compile_rotate(k, cfg, smooth, rot_block=0):
    """The rotate kernel: a full-width rotation, or (``rot_block``) runs of rot_block channels."""
    rot_m = 1 if rot_block else hadamard_factors(k)[0]
    m, p = aq._kernel_factors(k, rot_m, rot_block)
    m_pad = triton.next_power_of_2(m) if m > 1 else 1
    sig = {"x_ptr": "*bf16", "smooth_ptr": "*fp32", "signs_ptr": "*fp32", "hp_ptr": "*bf16", "hm_ptr": "*bf16",
           "codes_ptr": "*i8", "scale_ptr": "*fp32", "M": "i32", "stride_xm": "i32", "stride_cm": "i32",
           "out_mult": "fp32", "num_programs": "i32"}
    const = dict(HAS_SMOOTH=smooth, M_H=m, M_PAD=m_pad, P=p, BLOCK_M=cfg.block_m, SPLIT_X=smooth, EXACT_FP32=False,
                 PERSISTENT=cfg.persistent, NUM_STAGES=cfg.num_stages, MIX_M=not rot_block, **COMMON)
    sig.update({n: "constexpr" for n in const})
    src = ASTSource(aq._act_quant_rotate_kernel, signature=sig, constexprs=const,
                    attrs={(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)})
    return triton.compile(src, target=TARGET, options={"num_warps": cfg.num_warps})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rotate-only", action="store_true")
    ap.add_argument("--plain-only", action="store_true")
    ap.add_argument("--rot-block", type=int, default=0, help="rotated kernels: block rotation of this many channels")
    ap.add_argument("--k", type=int, nargs="*", default=[1152, 4608, 1920, 7680])
    args = ap.parse_args()
    for k in args.k:
        for rotate in ([False] if args.plain_only else [True] if args.rotate_only else [False, True]):
            for smooth in (False, True):
                cfgs = ([aq.ActQuantConfig(bm, w) for bm in (1, 2, 4) for w in (4, 8)] if rotate and k > 2000 else
                        [aq.ActQuantConfig(bm, w) for bm in (2, 4, 8) for w in (4, 8)] if rotate else
                        [aq.ActQuantConfig(bm, w) for bm in (1, 2, 4, 8, 16) for w in (4, 8)])
                cfgs.append(aq.ActQuantConfig(cfgs[2].block_m, 8, persistent=True))
                for cfg in cfgs:
                    fn = compile_rotate if rotate else compile_plain
                    try:
                        info = resources(fn(k, cfg, smooth, args.rot_block) if rotate else fn(k, cfg, smooth))
                    except Exception as e:  # noqa: BLE001
                        info = f"FAILED {type(e).__name__}: {str(e)[:200]}"
                    print(f"K={k:5d} {'rot' if rotate else 'plain':5s} smooth={int(smooth)} bm={cfg.block_m:2d} "
                          f"w={cfg.num_warps} pers={int(cfg.persistent)}: {info}", flush=True)


if __name__ == "__main__":
    main()
