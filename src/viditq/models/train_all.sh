#!/usr/bin/env bash
# Train the T2I and the T2V model side by side on one GPU (and the attribute probe, unless told to reuse one),
# then evaluate them on held-out prompts.
#   bash src/viditq/models/train_all.sh OUT_DIR [DIFFUSION_BUDGET_S=400] [PROBE_BUDGET_S=150]
# PROBE_BUDGET_S=0 reuses the shipped probe. INIT=DIR continues the runs from DIR/{t2i,t2v}.safetensors.
# Writes OUT_DIR/{probe,t2i,t2v}.safetensors, train_log.jsonl (JSON lines of all runs), eval.json and stdout.txt.
set -u
OUT=${1:?usage: train_all.sh OUT_DIR [DIFFUSION_BUDGET_S] [PROBE_BUDGET_S]}
BUDGET=${2:-400}
PROBE_BUDGET=${3:-150}
PY=${PYTHON:-python3}
EXTRA=${TRAIN_ARGS:-}  # e.g. TRAIN_ARGS="--batch-size 4 --workers 1" for a quick CPU check
EVAL_EXTRA=${EVAL_ARGS:-}
MODELS=${MODELS:-t2i t2v}
mkdir -p "$OUT"
LOG="$OUT/train_log.jsonl"
# A hard stop 120 s past each budget (compilation comes first): the runs save snapshots as they go, so a stopped
# run still leaves weights.
if [ "$PROBE_BUDGET" -gt 0 ]; then
  timeout $((PROBE_BUDGET + 90)) $PY -m viditq.models.train --model probe --time-budget "$PROBE_BUDGET" --out "$OUT" --log "$LOG" $EXTRA >>"$OUT/stdout.txt" 2>&1 &
else
  cp "$(dirname "$0")/weights/probe.safetensors" "$OUT/probe.safetensors"
fi
for m in $MODELS; do
  init=()
  if [ -n "${INIT:-}" ]; then init=(--init "$INIT/$m.safetensors"); fi
  timeout $((BUDGET + 120)) $PY -m viditq.models.train --model "$m" --time-budget "$BUDGET" --out "$OUT" --log "$LOG" "${init[@]}" $EXTRA >>"$OUT/stdout.txt" 2>&1 &
done
wait
timeout 150 $PY -m viditq.models.train --model eval --out "$OUT" --log "$LOG" $EVAL_EXTRA >>"$OUT/stdout.txt" 2>&1
rm -f "$OUT"/*.tmp
grep -h '"done": true' "$LOG" | cut -c1-400
grep -h 'compile_failed' "$LOG" | cut -c1-400
grep -h '"guidance"' "$LOG" | cut -c1-600
