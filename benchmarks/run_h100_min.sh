#!/usr/bin/env bash
# Minimal device call (under a minute of budget): PixArt end to end, bf16 vs W8A8, CUDA graphs, with a profile.
set -u
export PYTHONUNBUFFERED=1
VIDITQ_PROFILE=1 timeout 70 python benchmarks/bench_e2e.py --models pixart --variants w8a8_graph,bf16_graph,w4a8_graph \
    --iters 10 --timeout 34 --out "$OUT/e2e_pixart.json" 2>&1 | tail -8
