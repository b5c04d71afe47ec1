"""Session 21 (prepared, not yet run: no device time left): the fp8 attention kernel under Nsight Compute, for its
stall reasons and per-instruction samples. This script prepares a shape's operands once and launches the kernel
three times; ``ncu`` selects the third launch:

    ncu --clock-control none -k regex:_attn_fwd_kernel --launch-skip 2 --launch-count 1 --set full \\
        --import-source no -o $OUT/attn python3 benchmarks/exp/ncu_attention.py cogvideox_self
    ncu --import $OUT/attn.ncu-rep --page details > $OUT/details.txt
    ncu --import $OUT/attn.ncu-rep --page source --csv --print-source sass > $OUT/sass.csv

Shapes: a name of ``bench_attention.SHAPES`` or ``BxHxNQxNKVxD``. Without a GPU it runs on the CPU interpreter
(``TRITON_INTERPRET=1``; a smoke test of the script, at a small shape).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ab_attention  # noqa: E402
import bench_attention as BA  # noqa: E402
from viditq.kernels import attention as KA  # noqa: E402

device = "cuda" if torch.cuda.is_available() else "cpu"
b, h, n_q, n_kv, d, n_masked = ab_attention.shape_of(sys.argv[1] if len(sys.argv) > 1 else "cogvideox_self",
                                                     BA.SHAPES)
q, k, v, mask = BA.make_inputs(b, h, n_q, n_kv, d, n_masked, device=device)
cfg = KA.default_config(KA.padded_head_dim(d), "fp8", n_kv)
ops = KA.quantize_operands(q, k, v, "fp8", d ** -0.5, BA.bias_of(mask, b, h, n_kv), cfg)
out = torch.empty(b, n_q, h, d, dtype=torch.bfloat16, device=device).transpose(1, 2)
for _ in range(3):
    KA.attention_from_operands(ops, out, n_kv, cfg)
if device == "cuda":
    torch.cuda.synchronize()
print(cfg, "mean |out|", float(out.float().abs().mean()))
