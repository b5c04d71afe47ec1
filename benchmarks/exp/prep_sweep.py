"""Session 21: the attention operand preparation in CUDA graphs: the whole preparation (in the processors' (B, N, H,
D) memory layout and contiguous) and the statistics pass over its launch shape (``attention_stats``' programs,
tile, warps). Session 21's run also timed a one-launch Q / K / V quantization (since removed: slower); results and
conclusions in benchmarks/NOTES.md § Session 21.

    python benchmarks/exp/prep_sweep.py --out prep.json
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_attention as BA  # noqa: E402
from viditq.kernels import attention as KA  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="prep_sweep.json")
parser.add_argument("--shapes", default="pixart_self,cogvideox_self")
args = parser.parse_args()
result = {"card": torch.cuda.get_device_name(), "shapes": {}}
for name in args.shapes.split(","):
    b, h, n_q, n_kv, d, n_masked = BA.SHAPES[name]
    q, k, v, mask = BA.make_inputs(b, h, n_q, n_kv, d, n_masked, device="cuda")
    d_pad = KA.padded_head_dim(d)
    cfg = KA.default_config(d_pad, "fp8", n_kv)
    r = result["shapes"][name] = {"bytes_qkv": 3 * q.numel() * q.element_size()}
    r["prep contiguous"] = BA.graph_bench(lambda: KA.quantize_operands(q, k, v, "fp8", d ** -0.5, None, cfg))
    # the layout the attention processors hand over: (B, N, H, D) in memory
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    r["prep"] = BA.graph_bench(lambda: KA.quantize_operands(q, k, v, "fp8", d ** -0.5, None, cfg))
    for programs in (512, 1024, 2048, 4096):
        for tile in (1024, 2048, 4096, 8192):
            for warps in (4, 8):
                key = f"stats p{programs} t{tile} w{warps}"
                try:
                    r[key] = BA.graph_bench(lambda: KA.attention_stats(q, k, v, d_pad, programs, tile, warps))
                except Exception as e:  # noqa: BLE001 (out of resources: recorded)
                    r[key] = f"{type(e).__name__}: {str(e)[:100]}"
    best = min((t, key) for key, t in r.items() if key.startswith("stats") and isinstance(t, float))
    print(f"{name}: prep {r['prep']:.4f} ms (contiguous {r['prep contiguous']:.4f}); stats default "
          f"{r['stats p1024 t2048 w4']:.4f}, best {best[0]:.4f} ({best[1]})", flush=True)
    del q, k, v
    torch.cuda.empty_cache()
with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
