r"""Where the embedded T2V's extra flicker under quantization comes from: paired generation ablations.

    python benchmarks/eval_flicker_sources.py --n-video 8 --steps 10 \
        --out benchmarks/results/mixed_precision_embedded_v3/flicker_sources_n8_steps10.json

Every row generates the same held-out prompts with the same seeds as the float model and reports the flicker
(mean |second temporal difference| of pixel values) change relative to the float videos, with its standard error
over videos (paired). A row is a base config plus rules ``PATTERN@LO-HI:LEVEL`` (``LEVEL`` = ``fp`` or ``w8a8``;
timesteps in [LO, HI]; the DPM-Solver schedule of 10 steps calls the model at t = 999, 899, ..., 99). Row
``weights only`` runs the W8A8 layers with float activations (balanced input times the dequantized weight): the
weight error alone; rows ``float activations in the last step`` do that only at t < 150 (a prototype of a
weight-only final step: the quantized weights, no second copy; the library has no such level yet).

    python benchmarks/eval_flicker_sources.py --per-step w8a8,w4a8-gptq \
        --out benchmarks/results/mixed_precision_embedded_v3/flicker_per_step_prediction.json

scores instead the one-step denoised prediction of every calibration call (teacher-forced, no sampling): its
flicker change per timestep, i.e. what a flicker score taken at every step would attribute to each step.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import time
from pathlib import Path

import torch

import viditq
from viditq.calibrate import capture_calibration
from viditq.config import resolve_config
from viditq.gptq import video_token_layout
from viditq.kernels import reference
from viditq.layers import QuantLinear, current_timestep
from viditq.metrics.evaluate import evaluate_samples, generate
from viditq.metrics.probe import load_probe
from viditq.mixed_precision import level_rule
from viditq.models import load_t2v_pipeline
from viditq.models.data import model_scenes

PROMPT_SEED, CALIB_SEED, GUIDANCE = 4242, 99, 4.0  # as eval_mixed_precision_embedded.py
MP_V2 = "benchmarks/results/mixed_precision_embedded_v2/t2v_n24_steps10/w4a8_mp_decoupled_t2v.yaml"
MP_V5 = "benchmarks/results/mixed_precision_embedded_v5/t2v_n24_steps10/w4a8_mp_flicker_fa0.1_t2v.yaml"
# (label, base config, rules); the W4A8 + GPTQ rows pin plain GPTQ, as they were measured (the w4a8-gptq preset
# has temporal GPTQ since session 13)
ROWS = [
    ("W8A8", "w8a8", ""),
    ("W8A8 weights only (float activations)", "w8a8", "weights-only"),
    ("W8A8 at t > 450 only", "w8a8", ".*@0-450:fp"),
    ("W8A8 at t < 450 only", "w8a8", ".*@450-1000:fp"),
    ("W8A8 in the last step only (t = 99)", "w8a8", ".*@150-1000:fp"),
    ("W8A8 in all steps but the last", "w8a8", ".*@0-150:fp"),
    ("W8A8 at t < 450, attention only", "w8a8", ".*@450-1000:fp;ff@0-450:fp"),
    ("W8A8 at t < 450, FFN only", "w8a8", ".*@450-1000:fp;attn@0-450:fp"),
    ("W4A8 + GPTQ", "w4a8-gptq", "temporal-gptq=0"),
    ("W4A8 + GPTQ, 8-bit weights in the last step", "w4a8-gptq", ".*@0-150:w8a8;temporal-gptq=0"),
    ("W4A8 + GPTQ, float last step", "w4a8-gptq", ".*@0-150:fp;temporal-gptq=0"),
    ("W4A8-mp decoupled (v2)", MP_V2, ""),
    ("W4A8-mp decoupled (v2), float last step", MP_V2, ".*@0-150:fp"),
    # prototype of a level the library does not have: the same quantized weights, float activations (no copy)
    ("W8A8, float activations in the last step", "w8a8", "float-acts-last"),
    ("W4A8 + GPTQ, float activations in the last step", "w4a8-gptq", "float-acts-last;temporal-gptq=0"),
    ("W4A8-mp decoupled (v2), float activations in the last step", MP_V2, "float-acts-last"),
    # prototype: per-token activation scales shared by the tokens of one spatial position across frames
    ("W8A8, frame-shared token scales", "w8a8", "frame-scales"),
    ("W8A8-fp8, frame-shared token scales", "w8a8-fp8", "frame-scales"),
    ("W8A8-fp8", "w8a8-fp8", ""),
    ("W4A8 + GPTQ, frame-shared token scales", "w4a8-gptq", "frame-scales;temporal-gptq=0"),
    ("W4A8-mp decoupled (v2), frame-shared token scales", MP_V2, "frame-scales"),
    ("W8A8, frame-shared token scales in the last step", "w8a8", "frame-scales-last"),
]


def per_video_flicker(v: torch.Tensor) -> torch.Tensor:
    return (v[:, 2:] - 2 * v[:, 1:-1] + v[:, :-2]).abs().mean((1, 2, 3, 4))


def scalar_metrics(metrics: dict) -> dict:
    """The float entries of metrics.evaluate_samples (not the per-attribute breakdown)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


SUMMARY_KEYS = ("flicker_vs_fp", "attribute_accuracy", "all_correct", "frame_consistency", "fd_probe", "psnr_vs_fp")


def seed_summary(rows: dict) -> dict:
    """Mean and standard deviation over the quantization seeds of each row label (", seed N" removed)."""
    groups: dict[str, list[dict]] = {}
    for label, row in rows.items():
        groups.setdefault(re.sub(r", seed \d+$", "", label), []).append(row)
    summary = {}
    for label, group in groups.items():
        stats = {"n": len(group)}
        for k in SUMMARY_KEYS:
            if k in group[0]:
                v = torch.tensor([r[k] for r in group], dtype=torch.float64)
                stats[k], stats[k + "_sd"] = float(v.mean()), float(v.std()) if len(v) > 1 else 0.0
        summary[label] = stats
    return summary


def sweep_bases(configs: list[str]) -> list[tuple[str, str]]:
    """(label, config) of each --sweep-configs entry: presets by name (W4A8 + GPTQ as in the earlier tables), config
    files as "W4A8-mp <file name>", with the results directory where two files share a name."""
    stems = [Path(c).stem for c in configs]
    out = []
    for config, stem in zip(configs, stems):
        if config == "w4a8-gptq":
            out.append(("W4A8 + GPTQ", config))
        elif Path(config).suffix in (".yaml", ".yml", ".json"):
            out.append((f"W4A8-mp {Path(config).parent.parent.name + '/' if stems.count(stem) > 1 else ''}{stem}",
                        config))
        else:
            out.append((config, config))
    return out


def with_rules(base: str, rules: str) -> viditq.QuantConfig:
    config = resolve_config(base)
    extra = []
    for rule in filter(None, rules.split(";")):
        if rule in ("weights-only", "float-acts-last", "frame-scales", "frame-scales-last") \
                or rule.startswith(("temporal-gptq", "seed=")):
            continue
        pattern, rest = rule.split("@")
        span, level = rest.split(":")
        lo, hi = (float(v) for v in span.split("-"))
        extra.append(level_rule(level, pattern, (lo, hi)))
    if "temporal-gptq=" in rules:  # GPTQ's Hessian with the inputs' frame-to-frame differences
        lam = float(rules.split("temporal-gptq=")[1].split(";")[0])
        config = dataclasses.replace(config, weight=dataclasses.replace(config.weight, gptq_temporal=lam))
    if "seed=" in rules:
        config = dataclasses.replace(config, seed=int(rules.split("seed=")[1].split(";")[0]))
    if "frame-scales" in rules:  # the prototype patches the layers' own input quantization, not the FF hand-off
        config = dataclasses.replace(config, ff_hand_off=False)
    return dataclasses.replace(config, rules=config.rules + tuple(extra))


def float_activations(model, below: float | None = None) -> None:
    """Every QuantLinear computes balance(x) @ dequantized W (the weight error without activation quantization);
    with ``below``, only in calls whose timestep is below it (the model's ``timestep`` argument)."""
    now = {"t": None}
    model.register_forward_pre_hook(lambda mod, args, kwargs: now.update(t=current_timestep(args, kwargs, None)),
                                    with_kwargs=True)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            quantized_forward = m.forward

            def forward(x, m=m, quantized_forward=quantized_forward):
                if below is not None and (now["t"] is None or now["t"] >= below):
                    return quantized_forward(x)
                y = torch.nn.functional.linear(m.balance(x.reshape(-1, m.spec.in_features)),
                                               m.dequantized_weight().to(x.dtype),
                                               None if m.bias is None else m.bias.to(x.dtype))
                y = reference.apply_activation(y, getattr(m, "fused_activation", None))  # fused GELU of FF-up
                return y.reshape(*x.shape[:-1], m.spec.out_features)
            m.forward = forward


def _video_layout(model) -> dict:
    """The model's current timestep and token layout (viditq.gptq.video_token_layout), kept by a pre-hook."""
    layout = {}

    def pre(mod, args, kwargs):
        text, frames, pos = video_token_layout(mod, args, kwargs)
        layout.update(t=current_timestep(args, kwargs, None), text=text, frames=frames, pos=pos)
    model.register_forward_pre_hook(pre, with_kwargs=True)
    return layout


def frame_shared_scales(model, below: float | None = None) -> None:
    """Prototype: every dynamic per-token activation quantizer of a CogVideoX-style model (sequence = text tokens,
    then frames x positions) uses, for a video token, the largest per-token scale of its spatial position over
    the frames, so that nearly equal values in consecutive frames round the same way (text tokens: their own).
    With ``below``, only in calls whose timestep is below it."""
    from viditq.quant.quantizers import FP8_E4M3_MAX, MIN_SCALE, fp8_codes, quantize_per_tensor_static, signed_range

    layout = _video_layout(model)
    for m in model.modules():
        if isinstance(m, QuantLinear) and not m.spec.weight_only and not m.spec.act_static:
            def quantize_2d(x2d, m=m):
                s = m.spec
                y = reference.balance_activation(x2d, m.smooth_inv, m.rot_signs, s.rot_m, s.rot_block).float()
                amax = y.abs().amax(dim=-1, keepdim=True)  # (M, 1)
                t, f, p = layout["text"], layout["frames"], layout["pos"]
                if (below is None or (layout["t"] is not None and layout["t"] < below)) \
                        and amax.shape[0] % (t + f * p) == 0:
                    a = amax.view(-1, t + f * p)
                    video = a[:, t:].reshape(a.shape[0], f, p).amax(dim=1, keepdim=True).expand(-1, f, -1)
                    amax = torch.cat([a[:, :t], video.reshape(a.shape[0], f * p)], dim=1).reshape(-1, 1)
                qmax = FP8_E4M3_MAX if s.fp8 else signed_range(s.act_bits, symmetric=True)[1]
                scale = (amax / qmax).clamp_min(MIN_SCALE)
                codes = fp8_codes(y, scale) if s.fp8 else quantize_per_tensor_static(y, scale, s.act_bits)
                return codes, scale
            m._quantize_2d = quantize_2d


@torch.no_grad()
def per_step_prediction_flicker(pipe, calib, configs: list[str]) -> dict:
    """Relative flicker change of the one-step denoised prediction, per calibration timestep, of each config vs
    float (teacher-forced on the float trajectories of the calibration prompts): what a flicker family scored on
    every step, rather than the final one, would see."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from eval_mixed_precision_embedded import _frames_first, _x0_frames
    from viditq.testing import forward_output

    float_transformer = pipe.transformer
    refs = [forward_output(float_transformer, s) for s in calib]
    out = {}
    for name in configs:
        model = viditq.quantize(copy.deepcopy(float_transformer), name, calib)
        rows: dict[float, list[float]] = {}
        for sample, ref in zip(calib, refs):
            frames = _x0_frames(forward_output(model, sample), sample, _frames_first(pipe))
            ref_frames = _x0_frames(ref, sample, _frames_first(pipe))
            change = float(per_video_flicker(frames).mean() / per_video_flicker(ref_frames).mean() - 1)
            rows.setdefault(float(sample["timestep"].reshape(-1)[0]), []).append(change)
        out[name] = {f"{t:g}": sum(v) / len(v) for t, v in sorted(rows.items())}
        print(name, " ".join(f"t={t}: {100 * v:+.1f} %" for t, v in out[name].items()), flush=True)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-video", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--calib-prompts", type=int, default=4)
    parser.add_argument("--only", default="", help="comma-separated row numbers (0-based; default: all)")
    parser.add_argument("--per-step", default="",
                        help="comma-separated presets: only the per-step prediction flicker on the calibration calls")
    parser.add_argument("--out", default="benchmarks/results/mixed_precision_embedded_v3/flicker_sources.json")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (noise from CPU generators: same videos up to "
                                                          "kernel numerics)")
    parser.add_argument("--temporal-sweep", default="",
                        help="LAM[,LAM...]: instead of ROWS, each --sweep-configs entry at each "
                             "WeightSpec.gptq_temporal (0 = plain GPTQ; configs without GPTQ: one row)")
    parser.add_argument("--sweep-configs", default=f"w4a8-gptq,{MP_V5}",
                        help="--temporal-sweep: presets or config files (W4A8-mp allocations), comma-separated")
    parser.add_argument("--full-metrics", action="store_true",
                        help="every row also scored on alignment, FD, frame consistency, motion and PSNR vs FP "
                             "(metrics.evaluate_samples with the shipped probe)")
    parser.add_argument("--fp-noise-seeds", default="",
                        help="SEED[,SEED...]: the float model also sampled from these seed sets (unpaired noise rows; "
                             "flicker change relative to the seed-0 videos)")
    parser.add_argument("--quant-seeds", default="0", help="--temporal-sweep: QuantConfig.seed values (Hadamard "
                                                            "signs, kept calibration rows) per config")
    args = parser.parse_args()
    pipe = load_t2v_pipeline(device=args.device)
    pipe.set_progress_bar_config(disable=True)
    scenes = model_scenes("t2v", args.n_video, PROMPT_SEED, split="test")
    prompts = [s.caption for s in scenes]
    probe = load_probe(device=args.device) if args.full_metrics else None
    calib_prompts = [s.caption for s in model_scenes("t2v", args.calib_prompts, CALIB_SEED, split="train")]
    calib = capture_calibration(pipe, calib_prompts, num_inference_steps=args.steps, guidance_scale=GUIDANCE,
                                generator=[torch.Generator().manual_seed(CALIB_SEED + i) for i in range(len(calib_prompts))],
                                output_type="pt")
    float_transformer = pipe.transformer
    if args.per_step:
        result = {"settings": vars(args), "per_step": per_step_prediction_flicker(pipe, calib, args.per_step.split(","))}
        Path(args.out).write_text(json.dumps(result, indent=2))
        return

    def sample(seed: int = 0):
        return generate(pipe, prompts, seed=seed, num_inference_steps=args.steps, guidance_scale=GUIDANCE)

    fp = sample()
    fp_flicker = per_video_flicker(fp)
    out = Path(args.out)
    results = {"settings": vars(args), "fp_flicker": float(fp_flicker.mean()), "rows": {}}
    if probe is not None:
        results["fp_metrics"] = scalar_metrics(evaluate_samples(fp, scenes, probe))
    for seed in (int(v) for v in filter(None, args.fp_noise_seeds.split(","))):
        x = sample(seed)
        flicker = per_video_flicker(x).mean()
        row = {"flicker": float(flicker), "flicker_vs_fp": float(flicker / fp_flicker.mean() - 1)}
        if probe is not None:
            row.update(scalar_metrics(evaluate_samples(x, scenes, probe)))
        results.setdefault("fp_noise", {})[f"seed {seed}"] = row
        print(f"FP, seed set {seed}: flicker vs seed set 0 {100 * row['flicker_vs_fp']:+.1f} %", flush=True)
    rows = ROWS
    if args.temporal_sweep:
        seeds = [int(v) for v in args.quant_seeds.split(",")]
        rows = []
        for name, base in sweep_bases(args.sweep_configs.split(",")):
            gptq = resolve_config(base).weight.gptq
            for lam in [float(v) for v in args.temporal_sweep.split(",")] if gptq else [None]:
                rows += [(name + ("" if lam is None else f", temporal Hessian {lam:g}")
                          + (f", seed {seed}" if len(seeds) > 1 else ""), base,
                          ("" if lam is None else f"temporal-gptq={lam:g};") + f"seed={seed}") for seed in seeds]
    if len({label for label, _, _ in rows}) < len(rows):
        raise ValueError("two rows have the same label (the same --sweep-configs entry twice?)")
    chosen = [int(i) for i in args.only.split(",")] if args.only else range(len(rows))
    for i in chosen:
        label, base, rules = rows[i]
        t0 = time.time()
        model = viditq.quantize(copy.deepcopy(float_transformer), with_rules(base, rules), calib)
        if "weights-only" in rules:
            float_activations(model)
        if "float-acts-last" in rules:
            float_activations(model, below=150.0)
        if "frame-scales" in rules:
            frame_shared_scales(model, below=150.0 if "frame-scales-last" in rules else None)
        pipe.transformer = model
        x = sample()
        pipe.transformer = float_transformer
        diff = per_video_flicker(x) - fp_flicker
        ref = float(fp_flicker.mean())
        row = {"base": base, "rules": rules, "flicker": float(per_video_flicker(x).mean()),
               "flicker_vs_fp": float(diff.mean()) / ref, "flicker_vs_fp_se": float(diff.std()) / len(diff) ** 0.5 / ref,
               "rms_vs_fp": float((x - fp).pow(2).mean().sqrt())}
        if probe is not None:
            row.update(scalar_metrics(evaluate_samples(x, scenes, probe, reference=fp)))
        results["rows"][label] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"{label:<48} flicker {row['flicker']:.5f}  vs FP {100 * row['flicker_vs_fp']:+.1f} % "
              f"± {100 * row['flicker_vs_fp_se']:.1f}  ({time.time() - t0:.0f} s)", flush=True)
    results["summary"] = seed_summary(results["rows"])
    out.write_text(json.dumps(results, indent=2))
    keys = [k for k in SUMMARY_KEYS if any(k in v for v in results["summary"].values())]
    print("mean ± sd over seeds: " + ", ".join(keys))
    for label, m in [("FP", {**results.get("fp_metrics", {}), "flicker_vs_fp": 0.0})] + \
            [(f"FP, {k} (noise)", v) for k, v in results.get("fp_noise", {}).items()]:
        print(f"{label:<64} " + "  ".join(f"{m[k]:.4f}" for k in keys if k in m))
    for label, stats in results["summary"].items():
        print(f"{label:<64} n={stats['n']} " + "  ".join(f"{stats[k]:.4f}±{stats[k + '_sd']:.4f}" for k in keys))


if __name__ == "__main__":
    main()
