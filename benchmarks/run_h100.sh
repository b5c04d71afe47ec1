#!/usr/bin/env bash
# One short device call (the shared budget was nearly spent): act-quant correctness, the act-quant and one GEMM
# table with a W4A8 mode sweep at the PixArt attention shape, then end to end with CUDA graphs and a profile.
# Usage (repo root, results under $OUT): bash benchmarks/run_h100.sh
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
timeout 30 python -m pytest -q -p no:cacheprovider tests/test_kernels.py --tb=line -k "act_quant" 2>&1 \
    | tail -20 > "$OUT/pytest.txt"
tail -6 "$OUT/pytest.txt"
timeout 60 python benchmarks/bench_gemm.py --out "$OUT/gemm.json" --sweep --sweep-kinds w4a8_g64 \
    --sweep-shapes pixart_qkvo --best-w4-out "$OUT/best_w4.txt" --shapes pixart_qkvo > "$OUT/gemm_log.txt" 2>&1
grep -v "^ERROR sweep\|^    \|^kern" "$OUT/gemm_log.txt" | head -40
if [ -s "$OUT/best_w4.txt" ]; then export VIDITQ_W4_CONFIG=$(cat "$OUT/best_w4.txt"); fi
echo "VIDITQ_W4_CONFIG=${VIDITQ_W4_CONFIG:-default}"
VIDITQ_PROFILE=1 timeout 75 python benchmarks/bench_e2e.py --models pixart --variants bf16_graph,w8a8_graph,w4a8_graph \
    --iters 10 --timeout 40 --out "$OUT/e2e_pixart.json" 2>&1 | tail -8
VIDITQ_PROFILE=1 timeout 80 python benchmarks/bench_e2e.py --models cogvideox --variants bf16_graph,w8a8_graph \
    --iters 5 --timeout 60 --out "$OUT/e2e_cogvideox.json" 2>&1 | tail -6
