#!/usr/bin/env bash
# Train the attribute probe, the T2I and the T2V model side by side on one GPU, then evaluate them.
#   bash src/viditq/models/train_all.sh OUT_DIR [DIFFUSION_BUDGET_S=400] [PROBE_BUDGET_S=150]
# Writes OUT_DIR/{probe,t2i,t2v}.safetensors, train_log.jsonl (JSON lines of all runs), eval.json and stdout.txt.
set -u
OUT=${1:?usage: train_all.sh OUT_DIR [DIFFUSION_BUDGET_S] [PROBE_BUDGET_S]}
BUDGET=${2:-400}
PROBE_BUDGET=${3:-150}
PY=${PYTHON:-python3}
EXTRA=${TRAIN_ARGS:-}  # e.g. TRAIN_ARGS="--batch-size 4 --workers 1" for a quick CPU check
EVAL_EXTRA=${EVAL_ARGS:-}
mkdir -p "$OUT"
LOG="$OUT/train_log.jsonl"
# A hard stop 90 s past each budget: the runs save snapshots as they go, so a stopped run still leaves weights.
timeout $((PROBE_BUDGET + 90)) $PY -m viditq.models.train --model probe --time-budget "$PROBE_BUDGET" --out "$OUT" --log "$LOG" $EXTRA >>"$OUT/stdout.txt" 2>&1 &
timeout $((BUDGET + 90)) $PY -m viditq.models.train --model t2i --time-budget "$BUDGET" --out "$OUT" --log "$LOG" $EXTRA >>"$OUT/stdout.txt" 2>&1 &
timeout $((BUDGET + 90)) $PY -m viditq.models.train --model t2v --time-budget "$BUDGET" --out "$OUT" --log "$LOG" $EXTRA >>"$OUT/stdout.txt" 2>&1 &
wait
timeout 150 $PY -m viditq.models.train --model eval --out "$OUT" --log "$LOG" $EVAL_EXTRA >>"$OUT/stdout.txt" 2>&1
rm -f "$OUT"/*.tmp
grep -h '"done": true' "$LOG" | cut -c1-400
grep -h '"guidance"' "$LOG" | cut -c1-400
