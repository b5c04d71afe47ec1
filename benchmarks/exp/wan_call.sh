#!/usr/bin/env bash
# A device call for Wan2.1-T2V-1.3B (one H100, ~500 s), from the repo root, after session27_call.sh (it uses the
# same .ab/new copy):
#   here:  python benchmarks/ab_attention.py prepare new=HEAD
#   there: carry [".whl", ".ab"]; the install line of run_gpu.sh's header; OUT=$OUT bash benchmarks/exp/wan_call.sh
# 1. The 8-bit attention at Wan's self-attention shape (2, 12, 32760, 128): head dim 128, never timed before. Tiles
#    (bench_attention.TILES["wan_self"]): 64 x 128 at 171 registers gives 2 programs per SM, 64 x 64 (130) 3, the
#    8-warp tiles 1; and the Gluon kernel (two consumer warpgroups), which holds its 8 warps per SM at any head dim.
#    Prediction: the fp8 kernel at 1.4-1.7x of cuDNN (half the exponentials per FLOP of head dim 64, where it is at
#    1.49x alone); the best tile is 64 x 64 or 64 x 128.
# 2. Wan's forward end to end: bf16 and W8A8-fp8 + fp8 attention, regional compile + CUDA graph.
#    Prediction: ~1.0 s bf16 (attention ~2/3), 1.3-1.5x with both.
set -u
mkdir -p "$OUT"
start=$SECONDS
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > "$OUT/gpu.txt" 2>&1
timeout 200 python3 benchmarks/ab_attention.py run new "new:VIDITQ_WS_ATTENTION=1" --shapes wan_self \
  --timeout 95 --out "$OUT/ab_wan.json" > "$OUT/ab_wan.txt" 2>&1
left=$(( 560 - (SECONDS - start) ))
PYTHONPATH=$PWD/src:/tmp/site timeout "$left" python3 benchmarks/bench_e2e.py --models wan \
  --variants bf16_blocks_graph,w8a8_fp8_attn_blocks_graph --iters 5 --timeout 170 --deadline $(( left - 5 )) \
  --out "$OUT/e2e_wan.json" > "$OUT/e2e_wan.txt" 2>&1
echo "== gpu"; cat "$OUT/gpu.txt"
echo "== attention"; tail -12 "$OUT/ab_wan.txt"
echo "== e2e ($((SECONDS - start)) s)"; grep -E "^wan |timed out|error" "$OUT/e2e_wan.txt" | cut -c1-160
