#!/usr/bin/env bash
# The first device call of the next session with a GPU (one H100, ~560 s), from the repo root, with
#   here:  python benchmarks/ab_attention.py prepare old=95fa78f fused=628c122 qknorm=0b77714 resid=f1085b2 new=HEAD
#   there: carry [".whl", ".ab"]; python3 -m pip install ... --target /tmp/site .whl/*.whl (run_gpu.sh's header);
#          OUT=$OUT bash benchmarks/exp/session27_call.sh
# Times CogVideoX-2B's forward (W8A8-fp8 + fp8 attention, compiled blocks in a CUDA graph) with five package
# copies, each in its own process on the same machine (NOTES § Session 26): old = before the fused blocks,
# fused = session 25's fused blocks (the norms quantize the joint [text, video] sequence), qknorm = + the q / k
# LayerNorms in the 8-bit attention's preparation, resid = + the text and video residuals added in the output
# projections' GEMM epilogues with their gates, new = + the attention writing the output projection's fp8 codes;
# PixArt's forward new / old if time is left (its GEMM and norm kernels changed signature, not behaviour), after
# the new code's GPU tests.
# Predictions: CogVideoX old 367 -> fused ~356 -> qknorm ~352 -> resid ~343 -> new ~340 ms; PixArt 25.8 ms.
set -u
mkdir -p "$OUT"
start=$SECONDS
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > "$OUT/gpu.txt" 2>&1
PYTHONPATH=$PWD/src:/tmp/site timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_fusion.py \
  tests/test_compile.py tests/test_kernels.py tests/test_attention.py \
  -k "prefix or cogvideox or falls_back or norm_kernel or two_parts or residual or qk_transform or rotates \
or next_layer" \
  > "$OUT/tests.txt" 2>&1
run() {  # run PACKAGE MODEL VARIANT TAG [PROFILE]: skipped once the call has used 470 s (the limit is 600)
  if (( SECONDS - start > 470 )); then echo "skipped (time)" > "$OUT/e2e_$2_$1_$4.txt"; return; fi
  VIDITQ_PROFILE=${5:-0} PYTHONPATH=$PWD/.ab/$1:/tmp/site timeout 110 python3 benchmarks/bench_e2e.py \
    --models "$2" --variants "$3" --iters 5 --timeout 105 --out "$OUT/e2e_$2_$1_$4.json" > "$OUT/e2e_$2_$1_$4.txt" 2>&1
}
for pkg in old fused qknorm resid new; do run "$pkg" cogvideox w8a8_fp8_attn_blocks_graph 1; done
# the changes at the kernel level (the preparation with / without the norms, the attention's fp8 output, the
# two-part residual epilogue)
PYTHONPATH=$PWD/src:/tmp/site timeout 120 python3 benchmarks/exp/session26_kernels.py --out "$OUT/kernels.json" \
  > "$OUT/kernels.txt" 2>&1
run new cogvideox w8a8_fp8_attn_blocks_graph 2 1  # with the kernel profile (json: profile_top)
run resid cogvideox w8a8_fp8_attn_blocks_graph 2
run new pixart w8a8_fp8_blocks_graph 1
run old pixart w8a8_fp8_blocks_graph 1
echo "== gpu"; cat "$OUT/gpu.txt"
echo "== tests"; tail -2 "$OUT/tests.txt"
echo "== kernels"; tail -20 "$OUT/kernels.txt"
echo "== e2e ($((SECONDS - start)) s)"
for f in "$OUT"/e2e_*.txt; do echo "$(basename "$f" .txt): $(grep -hE '^(cogvideox|pixart) |skipped' "$f" | cut -c1-80)"; done
