#!/usr/bin/env bash
# One device call (one H100 / H200), in steps that each run under their own timeout, the whole script ending
# within BUDGET_S (default 560) seconds of its start:
#   tests      the GPU kernel tests (TESTS_K: a pytest -k filter; empty = all of test_kernels/ws_gemm/ws_attention/attention/fusion;
#              TESTS_S: their timeout, default 170 s)
#   gemm       bench_gemm.py: ceilings, act-quant table, GEMM table (bf16 cuBLAS, fp8 _scaled_mm, ours);
#              GEMM_ARGS: extra arguments (e.g. --shapes pixart_qkvo,pixart_ff_up)
#   attention  bench_attention.py (ATTENTION_ARGS, default: the tile sweep at the CogVideoX and PixArt self-attention
#              shapes): SDPA vs the 8-bit kernel, its operand preparation and statistics pass
#   offload    CPU-offload check on quantized pipelines
#   pixart     end to end PixArt-α 1024 (PIXART_VARIANTS), random bf16 weights, CFG batch 2
#   cogvideox  end to end CogVideoX-2B 49x480x720 (COGVIDEOX_VARIANTS)
#   wan        end to end Wan2.1-T2V-1.3B 81x480x832 (WAN_VARIANTS; not in the default STEPS)
#   tune       the act-quant launch-shape sweep
#   torchao    torchao fp8 rowwise + torch.compile on both models (TORCHAO_VARIANTS), with whatever time is left
# Each (model, variant) of bench_e2e runs in its own subprocess with its own timeout. Results in $OUT:
#   log.txt, tests.txt, gemm.json, attention.json, offload.json, e2e_pixart.json, e2e_cogvideox.json, e2e_torchao.json, summary.txt
#
# Usage, from the repo root (the wheels in .whl/ — diffusers, torchao — are installed to /tmp/site if needed):
#   STEPS=tests,gemm,pixart bash benchmarks/run_gpu.sh
# Time plan (NOTES.md): python + import ~6 s per subprocess; PixArt eager 12 s, compile ~70 s, quantized + graph
# 35-45 s, quantized + regional compile + graph ~60 s; CogVideoX eager ~20 s, whole-model compile > 120 s, regional
# compile ~40 s, quantized + graph ~45-50 s, fp8 + fp8 attention + regional compile + graph ~60 s (H200, 2026-12-01/02).
set -u
BUDGET_S=${BUDGET_S:-560}
STEPS=${STEPS:-tests,gemm,pixart,cogvideox,torchao}  # which steps run (comma list; also: offload, tune)
TESTS_K=${TESTS_K:-}
# (regional compilation, _blocks: the whole-model compile of quantized PixArt did not finish in 97 s on an H200)
PIXART_VARIANTS=${PIXART_VARIANTS:-bf16_eager,bf16_compile,bf16_blocks_graph,w8a8_graph,w8a8_fp8_graph,w8a8_fp8_blocks_graph,w4a8_graph}
COGVIDEOX_VARIANTS=${COGVIDEOX_VARIANTS:-bf16_eager,bf16_blocks_graph,w8a8_fp8_graph,w8a8_fp8_attn_blocks_graph,w4a8_graph}
WAN_VARIANTS=${WAN_VARIANTS:-bf16_blocks_graph,w8a8_fp8_blocks_graph,w8a8_fp8_attn_blocks_graph}
TORCHAO_VARIANTS=${TORCHAO_VARIANTS:-torchao_fp8_compile}
TORCHAO_MODELS=${TORCHAO_MODELS:-pixart,cogvideox}
RESERVE_S=12  # kept for the summary table
OUT=${OUT:-out/final}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - RESERVE_S - $(elapsed) )); }

wanted() { case ",$STEPS," in *",$1,"*) return 0 ;; esac; return 1; }

# step NAME MAX_S CMD...: CMD under `timeout min(MAX_S, time left)`; skipped when under 15 s are left.
# {T} in CMD is replaced by that timeout minus 5 s (bench_e2e --deadline: its runs end before the timeout).
step() {
    local name=$1 max=$2 t
    shift 2
    t=$(left)
    [ "$t" -gt "$max" ] && t=$max
    if [ "$t" -lt 15 ]; then
        echo "== $name: not run (budget: $(elapsed) s elapsed)"
        return
    fi
    local args=()
    for a in "$@"; do args+=("${a//\{T\}/$((t - 5))}"); done
    echo "== $name (timeout ${t} s, at $(elapsed) s)"
    timeout --kill-after=3 "$t" "${args[@]}"
    echo "== $name: rc=$? at $(elapsed) s"
}

main() {
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv,noheader
    if [ -d .whl ] && [ ! -d /tmp/site/diffusers ]; then  # the carried wheels (diffusers, torchao, ...)
        step "install wheels" 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl
    fi
    timeout 60 python3 -c "
import torch, triton, diffusers, accelerate
try:
    import torchao; ao = torchao.__version__
except Exception as e:  # the torchao variants report it themselves
    ao = repr(e)[:120]
print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__,
      'accelerate', accelerate.__version__, 'torchao', ao)" 2>&1 | tail -3

    # the kernel tests on the GPU (real DiT shapes included: the gpu_only cases)
    wanted tests && step "gpu kernel tests" "${TESTS_S:-170}" sh -c "python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_ws_gemm.py tests/test_ws_attention.py tests/test_attention.py tests/test_fusion.py ${TESTS_K:+-k '$TESTS_K'} --tb=short > '$OUT/tests.txt' 2>&1; tail -4 '$OUT/tests.txt'"

    wanted gemm && step "gemm + act quant tables" 120 sh -c "python3 benchmarks/bench_gemm.py --out '$OUT/gemm.json' ${GEMM_ARGS:-} > '$OUT/gemm_log.txt' 2>&1; grep -v '^kern' '$OUT/gemm_log.txt' | tail -45"

    wanted attention && step "attention kernels" "${ATTENTION_STEP_S:-150}" sh -c "python3 benchmarks/bench_attention.py ${ATTENTION_ARGS:---sweep --shapes cogvideox_self,pixart_self} --out '$OUT/attention.json' > '$OUT/attention_log.txt' 2>&1; tail -12 '$OUT/attention_log.txt'"

    wanted offload && step "offload check" 100 python3 benchmarks/check_offload.py --out "$OUT/offload.json" --steps 8

    wanted pixart && step "e2e pixart" "${PIXART_STEP_S:-300}" python3 benchmarks/bench_e2e.py --models pixart \
        --variants "$PIXART_VARIANTS" --iters 10 --timeout "${PIXART_TIMEOUT:-60}" \
        --variant-timeout bf16_compile=110 --variant-timeout w8a8_attn_graph=80 --variant-timeout w4a8_graph=75 --variant-timeout w4a8_blocks_graph=150 \
        --variant-timeout w8a8_fp8_compile_graph=120 --variant-timeout w8a8_compile_graph=120 \
        --variant-timeout bf16_blocks_graph=120 --variant-timeout w8a8_fp8_blocks_graph=150 \
        --variant-timeout w8a8_blocks_graph=150 --variant-timeout w8a8_fp8_attn_blocks_graph=150 \
        --variant-timeout w4a8_fp8_blocks_graph=150 --variant-timeout w4a8_fp8_c8_blocks_graph=150 \
        --variant-timeout w8a8_fp8_c8_blocks_graph=150 --deadline "{T}" --out "$OUT/e2e_pixart.json"

    wanted cogvideox && step "e2e cogvideox" "${COGVIDEOX_STEP_S:-300}" python3 benchmarks/bench_e2e.py --models cogvideox \
        --variants "$COGVIDEOX_VARIANTS" --iters 5 --timeout "${COGVIDEOX_TIMEOUT:-85}" \
        --variant-timeout bf16_eager=50 --variant-timeout bf16_compile=120 --variant-timeout w8a8_attn_graph=95 \
        --variant-timeout bf16_blocks_graph=120 --variant-timeout w8a8_fp8_blocks_graph=150 \
        --variant-timeout w8a8_fp8_attn_blocks_graph=150 --variant-timeout w4a8_fp8_attn_blocks_graph=150 \
        --deadline "{T}" --out "$OUT/e2e_cogvideox.json"

    # (not measured yet: the timeouts assume ~2x CogVideoX's forward — 32 760 tokens at head dim 128)
    wanted wan && step "e2e wan" "${WAN_STEP_S:-400}" python3 benchmarks/bench_e2e.py --models wan \
        --variants "$WAN_VARIANTS" --iters 5 --timeout "${WAN_TIMEOUT:-180}" --deadline "{T}" \
        --out "$OUT/e2e_wan.json"

    # the launch-shape sweep of the fused activation quantization (its sweep stops 25 s before the step's timeout)
    wanted tune && step "act quant tune" "${TUNE_STEP_S:-200}" python3 benchmarks/tune_act_quant.py --out "$OUT/act_quant.json" ${TUNE_ARGS:-} \
        --budget-s "{T}"

    # torchao last, with the rest of the budget: PixArt first, then CogVideoX if at least 10 s remain after it
    wanted torchao && step "e2e torchao" 600 python3 benchmarks/bench_e2e.py --models "$TORCHAO_MODELS" \
        --variants "$TORCHAO_VARIANTS" --iters 5 --timeout 600 --deadline "{T}" --out "$OUT/e2e_torchao.json"

    echo "== summary (at $(elapsed) s)"
    timeout 10 python3 - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys

out = sys.argv[1]
runs, problems = [], []
for name in ("e2e_pixart.json", "e2e_cogvideox.json", "e2e_wan.json", "e2e_torchao.json"):
    try:
        with open(os.path.join(out, name)) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        problems.append(f"{name}: {e}")
        continue
    runs += res.get("runs", [])
    problems += [f"{k}: {m[:300]}" for k in ("timed_out", "skipped", "errors") for m in res.get(k, [])]
# the ratio's baseline: bf16 torch.compile, else bf16 compile_blocks + graph (the one most calls run)
base = {r["model"]: r.get("ms_median") for r in runs if r["variant"] == "bf16_blocks_graph"}
base.update({r["model"]: r.get("ms_median") for r in runs if r["variant"] == "bf16_compile"})
print(f"{'model':10s} {'variant':20s} {'ms':>8s} {'x bf16c':>7s} {'weights':>9s} {'peak':>8s} {'ready':>6s} "
      f"{'quant':>6s} {'err':>7s}  attention calls (q/short/fallback)")
for r in runs:
    ms, b = r.get("ms_median") or float("nan"), base.get(r["model"])
    speed = f"{b / ms:.2f}x" if b and ms == ms else "-"
    att = r.get("attention", {}).get("calls_per_forward")
    if not att:
        att = ""
    elif not any(att.values()):  # CUDA-graph replays and compiled calls are not counted
        att = "not counted (graph / compiled)"
    else:
        att = f"{att['quantized']}/{att['short_kv_sdpa']}/{att['fallback_sdpa']}"
    print(f"{r['model']:10s} {r['variant']:20s} {ms:8.2f} {speed:>7s} {r['weight_bytes'] / 2**20:7.0f}MB "
          f"{r.get('peak_bytes', 0) / 2**30:6.2f}GB {r['ready_s']:6.1f} {r.get('quantize_s', 0):6.1f} "
          f"{r['rel_err_vs_bf16']:7.4f}  {att}")
for p in problems:
    print("  not measured:", p.splitlines()[0][:200])
try:
    with open(os.path.join(out, "offload.json")) as f:
        off = json.load(f)
    for r in off["runs"]:
        o, q = r["offload"], r["offload_then_quantize"]
        print(f"offload {r['pipeline']:13s} ok={r['ok']} max|d| {o['max_abs_diff']:.2e} (then-quantize "
              f"{q['max_abs_diff']:.2e})  peak {r['resident']['peak_allocated'] / 2**20:.1f} -> "
              f"{o['peak_allocated'] / 2**20:.1f} MiB  resident after call {r['resident']['allocated_after'] / 2**20:.1f}"
              f" -> {o['allocated_after'] / 2**20:.1f} MiB")
    for e in off["errors"]:
        print("offload ERROR", e.splitlines()[0][:200])
except (OSError, ValueError, KeyError) as e:
    print("offload: no result", e)
EOF
    echo "== done at $(elapsed) s"
}

main 2>&1 | tee "$OUT/log.txt"
