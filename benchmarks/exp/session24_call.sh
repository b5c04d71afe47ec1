#!/usr/bin/env bash
# Session 24's device call (one H100), from the repo root with .ab/ prepared here (old pdl overlap joint1k v8)
# and PYTHONPATH=$PWD/src:/tmp/site; every step under its own timeout, a short table printed last.
#   1. A/B of the attention preparation: PDL on every preparation kernel and the attention kernel (pdl), K / V
#      quantization alongside Q's (overlap), the statistics pass in one Q / K / V loop (joint1k)
#      and V's quantization at 8 warps (v8)
#   2. the Gluon GEMM's tiles at PixArt's shapes (benchmarks/exp/ws_tiles.py)
#   3. Nsight Compute: the preparation's five kernels at PixArt (old and this tree)
#   4. the attention GPU tests on this tree
set -u
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > "$OUT/gpu.txt" 2>&1
timeout 150 python3 benchmarks/ab_attention.py run old pdl overlap joint1k v8 --out "$OUT/ab.json" \
  --shapes pixart_self,cogvideox_self --tiles "cogvideox_self=64,128,4,3,128 pixart_self=64,128,4,3" --timeout 100 \
  > "$OUT/ab.txt" 2>&1
timeout 80 python3 benchmarks/exp/ws_tiles.py --out "$OUT/ws_tiles.json" > "$OUT/ws_tiles.txt" 2>&1
NCU_PREP=(ncu --clock-control none -k "regex:_attn_stats|_quantize" --launch-skip 10 --launch-count 5
  --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats)
PYTHONPATH=$PWD/.ab/old:$PYTHONPATH timeout 35 "${NCU_PREP[@]}" python3 benchmarks/exp/ncu_prep.py pixart_self \
  > "$OUT/ncu_prep_old.txt" 2>&1
timeout 35 "${NCU_PREP[@]}" python3 benchmarks/exp/ncu_prep.py pixart_self > "$OUT/ncu_prep_new.txt" 2>&1
timeout 35 python3 -m pytest -q -x tests/test_attention.py -p no:cacheprovider > "$OUT/tests.txt" 2>&1
echo "== gpu"; cat "$OUT/gpu.txt"
echo "== tests"; tail -2 "$OUT/tests.txt"
echo "== ws tiles"; grep -v "^ *$" "$OUT/ws_tiles.txt" | tail -12
echo "== ncu prep (duration us)"; for f in old new; do echo "-- $f"; grep -E "^  _|Duration" "$OUT/ncu_prep_$f.txt" | head -20; done
echo "== ab"; grep -v "^ *$" "$OUT/ab.txt" | tail -30
