#!/usr/bin/env bash
# Session 27's second device call (one H100, ~440 s), not run (no machine): here `python benchmarks/ab_attention.py prepare new=a2cb338
# ff=975a435` (or ff=HEAD); there carry [".whl", ".ab"], the install line, `OUT=$OUT bash benchmarks/exp/session27_call2.sh`.
# 1. CogVideoX W8A8-fp8 + fp8 attention, new (feed-forward residual in the GEMM epilogue) vs ff (as a separate
#    Inductor pass), twice each. Prediction: ff 1-2 ms faster (call 1's kernel table: 0.73 vs 0.67 ms x 30).
# 2. The fp8 attention at Wan2.1-1.3B's self-attention (2, 12, 32760, 128): bench_attention.TILES["wan_self"].
# 3. Wan end to end, bf16 and W8A8-fp8 + fp8 attention, with what is left (exp/wan_call.sh's predictions).
set -u
mkdir -p "$OUT"
start=$SECONDS
left() { echo $(( 430 - (SECONDS - start) )); }
for pkg in new ff new ff; do
  PYTHONPATH=$PWD/.ab/$pkg:/tmp/site timeout 100 python3 benchmarks/bench_e2e.py --models cogvideox \
    --variants w8a8_fp8_attn_blocks_graph --iters 5 --timeout 95 --out "$OUT/e2e_cogvideox_$pkg.json" \
    >> "$OUT/e2e_cogvideox_$pkg.txt" 2>&1
done
timeout 110 python3 benchmarks/ab_attention.py run ff --shapes wan_self --timeout 105 --out "$OUT/ab_wan.json" \
  > "$OUT/ab_wan.txt" 2>&1
t=$(left)
if (( t > 60 )); then
  PYTHONPATH=$PWD/src:/tmp/site timeout "$t" python3 benchmarks/bench_e2e.py --models wan \
    --variants bf16_blocks_graph,w8a8_fp8_attn_blocks_graph --iters 3 --timeout 150 --deadline $(( t - 5 )) \
    --out "$OUT/e2e_wan.json" > "$OUT/e2e_wan.txt" 2>&1
fi
echo "== cogvideox"; grep -H "^cogvideox " "$OUT"/e2e_cogvideox_*.txt | sed "s|.*/e2e_||" | cut -c1-120
echo "== attention"; tail -15 "$OUT/ab_wan.txt"
echo "== wan ($((SECONDS - start)) s)"; grep -E "^wan |ERROR|timed out|deadline" "$OUT/e2e_wan.txt" | cut -c1-150
