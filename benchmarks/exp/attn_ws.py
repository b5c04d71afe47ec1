"""Experiment: the fp8 attention kernel with TMA descriptor loads, with and without Triton's Hopper warp
specialization, against the shipped kernel (same operands). Prints a table; JSON to argv[1]."""
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from attn_ws_kernel import _attn_ws_kernel  # noqa: E402

from viditq.kernels import attention as A  # noqa: E402

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
rows = []
for name, (b, h, n, d) in {"cogvideox": (2, 30, 17792, 64), "pixart": (2, 16, 4096, 72)}.items():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    base_cfg = A.default_config(A.padded_head_dim(d), "fp8", n)
    ops = A.quantize_operands(q, k, v, "fp8", d ** -0.5, None, base_cfg)
    out0 = torch.empty((b, n, h, d), dtype=q.dtype, device="cuda").transpose(1, 2)
    A.attention_from_operands(ops, out0, n, base_cfg)
    t0 = triton.testing.do_bench(lambda: A.attention_from_operands(ops, out0, n, base_cfg), return_mode="median")
    sdpa = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                                   return_mode="median")
    rows.append(dict(shape=name, variant="shipped", ms=t0, sdpa_ms=sdpa, err=0.0))
    print(f"{name:10s} shipped {base_cfg}  {t0:.3f} ms  sdpa {sdpa:.3f}", flush=True)
    for ws in (False, True):
        for bm in (64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    if ws and warps == 8:
                        continue
                    cfg = A.AttentionConfig(bm, 128, warps, stages)
                    try:
                        o = A.quantize_operands(q, k, v, "fp8", d ** -0.5, None, cfg)
                        out = torch.empty_like(out0)
                        nkv_pad = o.k8.shape[1]

                        def run():
                            _attn_ws_kernel[(o.q8.shape[1] // bm, b * h)](
                                o.q8, o.k8, o.v, o.q_scale, o.k_scale, o.v_scale, out, *out.stride(), h, n, n,
                                nkv_pad, d, o.q8.shape[1], nkv_pad, BLOCK_M=bm, BLOCK_N=128, HEAD_D=o.q8.shape[2],
                                WS=ws, num_warps=warps, num_stages=stages)
                        run()
                        torch.cuda.synchronize()
                        err = ((out.float() - out0.float()).norm() / out0.float().norm()).item()
                        ms = triton.testing.do_bench(run, return_mode="median")
                    except Exception as e:  # noqa: BLE001
                        print(f"{name:10s} ws={int(ws)} bm={bm} w={warps} s={stages}: FAILED {str(e)[:160]}", flush=True)
                        continue
                    rows.append(dict(shape=name, variant=f"tma ws={int(ws)} bm={bm} w={warps} s={stages}", ms=ms,
                                     err=err))
                    print(f"{name:10s} ws={int(ws)} bm={bm} w={warps} s={stages}: {ms:.3f} ms ({t0 / ms:.2f}x shipped, "
                          f"{sdpa / ms:.2f}x sdpa) err {err:.2e}", flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(rows, f, indent=1)
