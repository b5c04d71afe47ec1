"""Session 24: the attention operand preparation under Nsight Compute — each of its five kernels' duration,
memory throughput, occupancy and stall reasons, on inputs in the attention processors' (B, N, H, D) layout. The
preparation runs three times; ``ncu`` takes the third:

    ncu --clock-control none -k regex:"_attn_stats|_quantize" --launch-skip 10 --launch-count 5 \\
        --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \\
        python3 benchmarks/exp/ncu_prep.py pixart_self

Shapes: a name of ``bench_attention.SHAPES`` or ``BxHxNQxNKVxD``; without a GPU, the CPU interpreter at a small
shape (a smoke test of the script).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ab_attention  # noqa: E402
import bench_attention as BA  # noqa: E402
from viditq.kernels import attention as KA  # noqa: E402

device = "cuda" if torch.cuda.is_available() else "cpu"
b, h, n_q, n_kv, d, n_masked = ab_attention.shape_of(sys.argv[1] if len(sys.argv) > 1 else "pixart_self", BA.SHAPES)
q, k, v, mask = BA.make_inputs(b, h, n_q, n_kv, d, n_masked, device=device)
q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
cfg = KA.default_config(KA.padded_head_dim(d), "fp8", n_kv)
for _ in range(3):
    ops = KA.quantize_operands(q, k, v, "fp8", d ** -0.5, BA.bias_of(mask, b, h, n_kv), cfg)
if device == "cuda":
    torch.cuda.synchronize()
print(cfg, "q scales", float(ops.q_scale.float().mean()))
