r"""8-bit attention on / off on the embedded tiny T2V (CogVideoX) and T2I (PixArt) models, on every demo metric.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 taskset -c 1 python benchmarks/eval_attention_embedded.py \
        --kinds t2v --n-video 16 --steps 10 --calib-prompts 4 --repeat-fp \
        --out benchmarks/results/attention_embedded_metrics_cpu_2026-11-25.json
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 taskset -c 1 python benchmarks/eval_attention_embedded.py \
        --kinds t2i --n 64 --steps 10 --calib-prompts 4 --repeat-fp --t2i-min-kv-tokens 0 \
        --out benchmarks/results/attention_embedded_metrics_cpu_2026-11-25.json

Each invocation replaces the rows of its kinds in ``--out`` and keeps the others (results and tables:
``benchmarks/results/attention_embedded_metrics.md``).

Rows, all generated from the same held-out prompts (the demo's prompt seed) and the same sampling seed, except the
noise row:

* ``fp``: the float model (its own SDPA);
* ``fp + int8 attention`` / ``fp + fp8 attention``: the float model with every attention call routed through
  :func:`viditq.attention.apply_quantized_attention` (INT8 Q·Kᵀ with K smoothing, BF16 resp. FP8 P·V);
* ``w8a8``: ``viditq.quantize(..., "w8a8")`` (attention in float);
* ``w8a8 + fp8 attention`` (and optionally ``w8a8 + int8 attention``): the W8A8 preset with the config's
  ``attention`` field set, i.e. the path a user gets from ``QuantConfig(attention="fp8")``;
* ``fp (other seeds)``: the float model with a second set of seeds — run-to-run (seed-to-seed) noise;
* ``fp (repeat)`` (``--repeat-fp``): the float model again with the first seeds — a determinism check (PSNR 100 dB
  = identical samples).

PSNR / SSIM compare each row with the ``fp`` samples of the same seeds; ``flicker_vs_fp`` is the paired per-video
flicker change relative to ``fp`` (with its standard error over videos). Every metric comes from
:func:`viditq.metrics.evaluate.evaluate_samples` (the demo's). ``attention_calls`` are
:func:`viditq.attention.attention_call_counts` after the row's generation: how many SDPA calls ran the 8-bit path
(``quantized``), stayed on SDPA for having fewer keys than ``min_kv_tokens`` (``short_kv_sdpa``) or fell back.

Thresholds: CogVideoX attends over 32 text + 1024 video tokens, above the default ``MIN_KV_TOKENS`` (512), so the
T2V rows use the default. PixArt's self-attention has 256 tokens and its cross-attention 32 text tokens, both below
512, so the T2I rows pass ``min_kv_tokens`` (``--t2i-min-kv-tokens``, default 0: self- *and* cross-attention run
8-bit; 64 would quantize only the self-attention, as the default does at PixArt-α 1024's 4096 tokens).

On CPU the 8-bit attention runs :func:`viditq.kernels.attention.quantized_attention_reference`, the PyTorch
definition of the Triton kernel's numerics (fake-quantized operands in float32; it differs from the GPU kernel
only in rounding order). The models run in float32, so "fp" attention here is float32 SDPA.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import viditq
from viditq.attention import MIN_KV_TOKENS, apply_quantized_attention, attention_call_counts
from viditq.calibrate import capture_calibration
from viditq.metrics.evaluate import evaluate_samples, generate
from viditq.metrics.probe import load_probe
from viditq.metrics.temporal import flicker
from viditq.models import load_t2i_pipeline, load_t2v_pipeline
from viditq.models.data import model_scenes

PROMPT_SEED = 4242  # held-out evaluation prompts (the demo's)
CALIB_SEED = 99  # calibration prompts (training split, the demo's)
NOISE_SEED = 1000  # second seed set of the noise row (eval_mixed_precision_embedded.py's)
GUIDANCE = 4.0
NOISE_ROW = "fp (other seeds)"
REPEAT_ROW = "fp (repeat)"
# label -> (quantization preset or None, attention mode or None)
VARIANTS = {
    "fp": (None, None),
    "fp + int8 attention": (None, "int8"),
    "fp + fp8 attention": (None, "fp8"),
    "w8a8": ("w8a8", None),
    "w8a8 + int8 attention": ("w8a8", "int8"),
    "w8a8 + fp8 attention": ("w8a8", "fp8"),
}
DEFAULT_VARIANTS = ("fp", "fp + int8 attention", "fp + fp8 attention", "w8a8", "w8a8 + fp8 attention")
COLUMNS = {
    "t2i": ["attribute_accuracy", "all_correct", "background_accuracy", "fd_probe", "psnr_vs_fp", "ssim_vs_fp"],
    "t2v": ["attribute_accuracy", "all_correct", "direction_accuracy", "speed_accuracy", "frame_consistency",
            "flicker", "flicker_vs_fp", "fd_probe", "psnr_vs_fp", "ssim_vs_fp"],
}


def paired_flicker(x: torch.Tensor, reference: torch.Tensor) -> dict:
    """Per-video flicker (:func:`viditq.metrics.temporal.flicker` of each video) minus the float model's for the
    same seed, mean and standard error over videos, both relative to the float model's flicker."""
    diff = torch.tensor([flicker(a[None]) - flicker(b[None]) for a, b in zip(x, reference)], dtype=torch.float64)
    ref = flicker(reference)
    se = float(diff.std()) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return {"flicker_vs_fp": float(diff.mean()) / ref, "flicker_vs_fp_se": se / ref}


def build_model(float_transformer, preset: str | None, mode: str | None, calib, min_kv_tokens: int | None):
    """The transformer of one variant (a deep copy; the float model is never modified). ``min_kv_tokens`` None:
    the library default (:data:`MIN_KV_TOKENS`)."""
    if preset is None:
        if mode is None:
            return float_transformer
        model = copy.deepcopy(float_transformer)
        apply_quantized_attention(model, mode, min_kv_tokens=min_kv_tokens)
        return model
    config = dataclasses.replace(viditq.config.resolve_config(preset), attention=mode or "bf16")
    model = viditq.quantize(copy.deepcopy(float_transformer), config, calib=calib)
    if mode is not None and min_kv_tokens is not None:  # the config path installs the default threshold
        apply_quantized_attention(model, mode, min_kv_tokens=min_kv_tokens)
    return model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def evaluate_attention(kind: str, n: int, steps: int, calib_prompts: int = 4, seeds=(0, NOISE_SEED),
                       variants=DEFAULT_VARIANTS, min_kv_tokens: int | None = None, repeat_fp: bool = False,
                       probe=None, device: str = "cpu", on_row=None, log=print) -> dict:
    """Metrics of every variant for ``kind`` ("t2i" | "t2v"): ``{label: metrics}`` with ``attention_calls``,
    ``gen_s`` and for quantized rows ``quant_s``. ``seeds[0]`` generates every variant; ``seeds[1:]`` generate the
    float model again (noise rows). ``on_row(label, metrics)`` is called as each row finishes."""
    probe = probe or load_probe(device=device)
    pipe = (load_t2i_pipeline if kind == "t2i" else load_t2v_pipeline)(device=device)
    pipe.set_progress_bar_config(disable=True)
    scenes = model_scenes(kind, n, PROMPT_SEED, split="test")
    prompts = [s.caption for s in scenes]
    calib = None
    if any(VARIANTS[v][0] for v in variants):
        calib_scenes = model_scenes(kind, calib_prompts, CALIB_SEED, split="train")
        calib = capture_calibration(pipe, [s.caption for s in calib_scenes], num_inference_steps=steps,
                                    guidance_scale=GUIDANCE, output_type="pt",
                                    generator=[torch.Generator().manual_seed(CALIB_SEED + i)
                                               for i in range(len(calib_scenes))])
    float_transformer = pipe.transformer
    results: dict = {}
    reference = None
    quantized_plain: dict[str, torch.nn.Module] = {}

    def row(label: str, model, seed: int, quant_s: float | None = None, extra: dict | None = None):
        nonlocal reference
        pipe.transformer = model
        attention_call_counts(model, reset=True)
        t0 = time.perf_counter()
        x = generate(pipe, prompts, seed=seed, num_inference_steps=steps, guidance_scale=GUIDANCE)
        gen_s = time.perf_counter() - t0
        paired = reference is not None and seed == seeds[0]
        m = evaluate_samples(x, scenes, probe, reference=reference if paired else None)
        if paired and kind == "t2v":
            m.update(paired_flicker(x, reference))
        m.update(seed=seed, attention_calls=attention_call_counts(model), gen_s=gen_s, **(extra or {}))
        if quant_s is not None:
            m["quant_s"] = quant_s
        pipe.transformer = float_transformer
        results[label] = m
        if reference is None:
            reference = x
        log(f"{kind} {label:<24} " + " ".join(f"{c}={m[c]:.4f}" for c in COLUMNS[kind] if c in m)
            + f" calls={m['attention_calls']} ({gen_s:.0f}s)")
        if on_row:
            on_row(label, m)
        return x

    if variants[0] != "fp":
        raise ValueError("the first variant must be 'fp' (the reference of PSNR / SSIM)")
    for label in variants:
        preset, mode = VARIANTS[label]
        t0 = time.perf_counter()
        model = build_model(float_transformer, preset, mode, calib, min_kv_tokens)
        quant_s = time.perf_counter() - t0 if preset else None
        extra = {"attention": mode or "float (model's own SDPA)",
                 "min_kv_tokens": (MIN_KV_TOKENS if min_kv_tokens is None else min_kv_tokens) if mode else None}
        if preset and mode is None:
            quantized_plain[preset] = model
        elif preset in quantized_plain:  # the attention is the only difference from the plain row
            extra["same_weights_as_" + preset] = _same_weights(model, quantized_plain[preset])
        row(label, model, seeds[0], quant_s, extra)
        if label == "fp" and repeat_fp:
            row(REPEAT_ROW, float_transformer, seeds[0])
    for i, seed in enumerate(seeds[1:]):
        row(NOISE_ROW if i == 0 else f"fp (seed set {i + 2})", float_transformer, seed)
    return results


def markdown(results: dict, kind: str) -> str:
    """Results of one kind as a markdown table (PSNR in dB; counts of quantized / SDPA attention calls)."""
    cols = COLUMNS[kind]
    head = "| variant | " + " | ".join(cols) + " | 8-bit / SDPA attention calls |"
    lines = [head, "|---|" + "---|" * (len(cols) + 1)]
    for label, m in results.items():
        cells = []
        for c in cols:
            v = m.get(c)
            if v is None:
                cells.append("–")
            elif c == "fd_probe":
                cells.append(f"{v:.1f}")
            elif c == "psnr_vs_fp":
                cells.append(f"{v:.1f} dB")
            elif c == "flicker_vs_fp":
                cells.append(f"{100 * v:+.1f} % ± {100 * m['flicker_vs_fp_se']:.1f}")
            elif c in ("frame_consistency", "ssim_vs_fp", "flicker"):
                cells.append(f"{v:.4f}")
            else:
                cells.append(f"{v:.3f}")
        calls = m["attention_calls"]
        cells.append(f"{calls['quantized']} / {calls['short_kv_sdpa'] + calls['fallback_sdpa']}"
                     if any(calls.values()) else "0 (not wrapped: model's own SDPA)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="t2v,t2i")
    parser.add_argument("--n", type=int, default=32, help="T2I prompts (one image each)")
    parser.add_argument("--n-video", type=int, default=16, help="T2V prompts (one video each)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--calib-prompts", type=int, default=4)
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, NOISE_SEED],
                        help="first: every variant; others: the float model again (noise rows)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, first 'fp'; from {list(VARIANTS)}")
    parser.add_argument("--t2i-min-kv-tokens", type=int, default=0,
                        help="min_kv_tokens for the T2I rows (PixArt's 256 / 32 keys are below the default 512)")
    parser.add_argument("--repeat-fp", action="store_true", help="add the determinism row (fp, same seeds again)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/attention_embedded_metrics_cpu.json")
    args = parser.parse_args()
    variants = args.variants.split(",")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Kinds may run as separate invocations into one file: the other kinds' rows and settings are kept.
    data = json.loads(out.read_text()) if out.is_file() else {}
    data.setdefault("settings", {})
    common = {"prompt_seed": PROMPT_SEED, "calib_seed": CALIB_SEED, "guidance": GUIDANCE, "torch": torch.__version__,
              "platform": platform.platform(), "threads": torch.get_num_threads(),
              "attention_backend": "PyTorch reference (quantized_attention_reference)" if args.device == "cpu"
              else "Triton kernel"}
    start = time.perf_counter()
    probe = load_probe(device=args.device)

    def save():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=float))
        tmp.replace(out)

    for kind in args.kinds.split(","):
        n = args.n if kind == "t2i" else args.n_video
        min_kv = args.t2i_min_kv_tokens if kind == "t2i" else None
        data[kind] = {}
        settings = data["settings"][kind] = {
            **common, "n": n, "steps": args.steps, "calib_prompts": args.calib_prompts, "seeds": args.seeds,
            "variants": variants, "repeat_fp": args.repeat_fp, "device": args.device,
            "min_kv_tokens": MIN_KV_TOKENS if min_kv is None else min_kv, "argv": sys.argv[1:]}
        t0 = time.perf_counter()

        def on_row(label, m, kind=kind):
            data[kind][label] = m
            settings["elapsed_s"] = time.perf_counter() - t0
            save()

        evaluate_attention(kind, n, args.steps, args.calib_prompts, args.seeds, variants, min_kv, args.repeat_fp,
                           probe, args.device, on_row=on_row)
        settings["elapsed_s"] = time.perf_counter() - t0
        save()
    for kind in args.kinds.split(","):
        print(f"\n{kind}\n{markdown(data[kind], kind)}")
    print(f"\n{out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
