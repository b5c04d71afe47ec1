"""Session 24: the warp-specialized Gluon GEMM (kernels/ws_gemm.py) over its tile shape, stage count and group
size at PixArt's shapes — is there a tile for the 1152-wide product (8192 x 1152 x 1152, 4.4 waves of 128 x 128
tiles on 132 SMs) that beats the default by the 2 % issue 6's int8 target needs (1.58x of bf16 → 1.6x)?

    python benchmarks/exp/ws_tiles.py --out ws_tiles.json

Operands cycled through ``COPIES`` buffers (HBM, as bench_gemm's residual table); CUDA-graph medians per product.
Answer (H100, results/gemm_ws_tiles_h100_2026-12-07_session24_call1.json): no — 1.47x default, 1.51x at 5 stages;
narrower tiles 20-80 % slower (benchmarks/NOTES.md, session 24).
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from viditq.kernels import reference, ws_gemm  # noqa: E402

SHAPES = {"pixart_qkvo": (8192, 1152, 1152), "pixart_ff_up": (8192, 4608, 1152), "pixart_ff_down": (8192, 1152, 4608)}
COPIES = 4
TILES = [(128, 128, 128), (128, 128, 64), (128, 64, 128), (128, 64, 64)]
CONFIGS = [(tile, stages, 8) for tile in TILES for stages in (4, 5)] + [((128, 128, 128), 4, g) for g in (4, 16)]


def operands(m, n, k, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(torch.bfloat16)
    a, a_scale = reference.quantize_activation(x, 8)
    w8, w_scale = reference.quantize_activation(w, 8)  # per output channel (rows of w)
    fa, fa_scale = reference.quantize_per_token_fp8(x)
    fw, fw_scale = reference.quantize_per_token_fp8(w)
    return dict(x=x, w=w, int8=(a, a_scale.view(-1), w8, w_scale.view(-1)),
                fp8=(fa, fa_scale.view(-1), fw, fw_scale.view(-1)), out=torch.empty(m, n, device="cuda",
                                                                                    dtype=torch.bfloat16))


def per_product_ms(fn, sets):
    return do_bench_cudagraph(lambda: [fn(o) for o in sets], rep=100, return_mode="median") / len(sets)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="ws_tiles.json")
    args = parser.parse_args()
    default = (ws_gemm.BLOCK, ws_gemm.STAGES, ws_gemm.GROUP_M)
    result = {"card": torch.cuda.get_device_name(), "default": default, "rows": [], "errors": []}
    for name, (m, n, k) in SHAPES.items():
        sets = [operands(m, n, k, i) for i in range(COPIES)]
        bf16 = per_product_ms(lambda o: F.linear(o["x"], o["w"]), sets)
        result["rows"].append(dict(shape=name, method="bf16_cublas", ms=bf16))
        print(f"{name}: bf16 {bf16 * 1e3:.1f} us", flush=True)
        for kind in ("int8", "fp8"):
            ref = None
            for tile, stages, group in CONFIGS:
                ws_gemm.BLOCK, ws_gemm.GROUP_M = tile, group
                try:
                    def fn(o, stages=stages):
                        a, sa, w, sw = o[kind]
                        return ws_gemm.linear(a, sa, w, sw, None, o["out"], stages=stages)

                    y = fn(sets[0]).float()
                    ref = y if ref is None else ref
                    t = per_product_ms(fn, sets)
                except Exception as e:  # noqa: BLE001 (out of shared memory and the like: recorded)
                    result["errors"].append(f"{name} {kind} {tile} s{stages} g{group}: {type(e).__name__}: {e}"[:200])
                    continue
                finally:
                    ws_gemm.BLOCK, _, ws_gemm.GROUP_M = default
                row = dict(shape=name, method=f"{kind}_ws", tile=tile, stages=stages, group_m=group, ms=t,
                           vs_bf16=bf16 / t, max_diff_vs_first=float((y - ref).abs().max()))
                result["rows"].append(row)
            best = min((r for r in result["rows"] if r["shape"] == name and r["method"] == f"{kind}_ws"),
                       key=lambda r: r["ms"])
            dflt = [r for r in result["rows"] if r["shape"] == name and r["method"] == f"{kind}_ws"
                    and tuple(r["tile"]) == default[0] and r["stages"] == default[1] and r["group_m"] == default[2]]
            print(f"  {kind}: default {dflt[0]['ms'] * 1e3:.1f} us ({dflt[0]['vs_bf16']:.3f}x), best "
                  f"{best['ms'] * 1e3:.1f} us ({best['vs_bf16']:.3f}x) at {best['tile']} s{best['stages']} "
                  f"g{best['group_m']}", flush=True)
        del sets
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:  # after each shape: a timeout keeps what was measured
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
