#!/usr/bin/env bash
# The first device call of the session after 25 (one H100, ~330 s), from the repo root, with
#   here:  python benchmarks/ab_attention.py prepare old=95fa78f new=HEAD
#   there: carry [".whl", ".ab"]; python3 -m pip install ... --target /tmp/site .whl/*.whl (run_gpu.sh's header);
#          OUT=$OUT bash benchmarks/exp/session26_call.sh
# Times session 25's fused CogVideoX blocks (the two norms quantizing the joint [text, video] sequence, q/k/v in
# one launch; NOTES § Session 25, item 4) against the package before them, each variant a package copy in its own
# process on the same machine, and PixArt's forward (its norm kernel now takes per-row scale / shift pointers),
# after the new code's GPU tests. Prediction: CogVideoX 367 -> ~356 ms; PixArt unchanged (25.8 ms).
set -u
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > "$OUT/gpu.txt" 2>&1
PYTHONPATH=$PWD/src:/tmp/site timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_fusion.py \
  tests/test_compile.py -k "prefix or cogvideox or falls_back or norm_kernel" > "$OUT/tests.txt" 2>&1
run() {  # run PACKAGE MODEL VARIANT
  PYTHONPATH=$PWD/.ab/$1:/tmp/site timeout 120 python3 benchmarks/bench_e2e.py --models "$2" --variants "$3" \
    --iters 5 --timeout 115 --out "$OUT/e2e_$2_$1_$4.json" > "$OUT/e2e_$2_$1_$4.txt" 2>&1
}
run old cogvideox w8a8_fp8_attn_blocks_graph 1
run new cogvideox w8a8_fp8_attn_blocks_graph 1
run old cogvideox w8a8_fp8_attn_blocks_graph 2
run new cogvideox w8a8_fp8_attn_blocks_graph 2
run new pixart w8a8_fp8_blocks_graph 1
run old pixart w8a8_fp8_blocks_graph 1
echo "== gpu"; cat "$OUT/gpu.txt"
echo "== tests"; tail -2 "$OUT/tests.txt"
echo "== e2e"
for f in "$OUT"/e2e_*.txt; do echo "$(basename "$f" .txt): $(grep -hE '^(cogvideox|pixart) ' "$f" | cut -c1-80)"; done
