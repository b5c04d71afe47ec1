#!/usr/bin/env bash
# One device call: GPU correctness subset, GEMM + quantization tables with a W4A8 sweep, then end to end.
# Usage (repo root, results under $OUT): bash benchmarks/run_h100.sh
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
timeout 75 python -m pytest -q -p no:cacheprovider tests/test_kernels.py --tb=line \
    -k "act_quant or w4a8_modes or persistent or quantlinear or fp8" 2>&1 | tail -40 > "$OUT/pytest.txt"
tail -15 "$OUT/pytest.txt"
timeout 150 python benchmarks/bench_gemm.py --out "$OUT/gemm.json" --sweep --sweep-kinds w4a8_g64 \
    --sweep-shapes pixart_qkvo,pixart_ff_up,cogvideox_ff_up --best-w4-out "$OUT/best_w4.txt" \
    --shapes pixart_qkvo,pixart_ff_up,pixart_ff_down,cogvideox_qkvo,cogvideox_ff_up,cogvideox_ff_down \
    > "$OUT/gemm_log.txt" 2>&1
grep -v "^ERROR sweep\|^    \|^kern" "$OUT/gemm_log.txt" | head -90
if [ -s "$OUT/best_w4.txt" ]; then export VIDITQ_W4_CONFIG=$(cat "$OUT/best_w4.txt"); fi
echo "VIDITQ_W4_CONFIG=${VIDITQ_W4_CONFIG:-default}"
VIDITQ_PROFILE=1 timeout 100 python benchmarks/bench_e2e.py --models pixart --variants bf16_graph,w8a8_graph,w4a8_graph,w8a8 \
    --iters 10 --timeout 45 --out "$OUT/e2e_pixart.json" 2>&1 | tail -8
VIDITQ_PROFILE=1 timeout 175 python benchmarks/bench_e2e.py --models cogvideox --variants bf16_graph,w8a8_graph,w4a8_graph \
    --iters 5 --timeout 80 --out "$OUT/e2e_cogvideox.json" 2>&1 | tail -8
timeout 40 python benchmarks/bench_e2e.py --models pixart --variants torchao_fp8 \
    --iters 10 --timeout 38 --out "$OUT/e2e_torchao.json" 2>&1 | tail -4
