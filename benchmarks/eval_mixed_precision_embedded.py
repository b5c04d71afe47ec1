"""FP vs W8A8 vs W4A8 vs W4A8-mp vs W4A4 on the embedded tiny T2I / T2V models, on every metric, with noise.

    python benchmarks/eval_mixed_precision_embedded.py --kinds t2i,t2v --n 64 --steps 10

W4A8-mp is run twice: the ``w4a8-mp`` preset (output-MSE proxy), and the full metric-decoupled method: sensitivity
of every (block, role) group x 4 timestep ranges on alignment (probe attribute accuracy), visual quality
(Fréchet distance in probe features) and, for video, temporal consistency (frame consistency), measured on
generated samples of *training-split* prompts (never the evaluation prompts), then :func:`allocate` at 5 executed
/ 6 stored bits. Run-to-run noise: the float model evaluated on the same prompts with a second set of seeds.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

import viditq
from viditq.calibrate import capture_calibration
from viditq.models.data import model_scenes
from viditq.metrics.evaluate import evaluate_samples, generate
from viditq.metrics.probe import load_probe
from viditq.mixed_precision import Metric, allocate, measure_sensitivity, plot_sensitivity
from viditq.models import load_t2i_pipeline, load_t2v_pipeline

NOISE_SEED = 1000
PROMPT_SEED = 4242  # held-out evaluation prompts (the demo's)
CALIB_SEED = 99  # calibration prompts (training split)
SENS_SEED = 106  # sensitivity prompts (training split, another draw)
GUIDANCE = 4.0
COLUMNS = {"t2i": ["attribute_accuracy", "all_correct", "fd_probe", "psnr_vs_fp", "ssim_vs_fp", "weight_mib"],
           "t2v": ["attribute_accuracy", "direction_accuracy", "speed_accuracy", "frame_consistency", "flicker",
                   "fd_probe", "psnr_vs_fp", "weight_mib"]}


def sensitivity_metric(pipe, kind: str, probe, n: int, steps: int) -> Metric:
    """One generation per probe, scored on the three metric families (decoupled in the allocation)."""
    scenes = model_scenes(kind, n, SENS_SEED, split="train")
    prompts = [s.caption for s in scenes]

    def score(model):
        float_transformer, pipe.transformer = pipe.transformer, model
        try:
            x = generate(pipe, prompts, seed=CALIB_SEED, num_inference_steps=steps, guidance_scale=GUIDANCE)
        finally:
            pipe.transformer = float_transformer
        m = evaluate_samples(x, scenes, probe)
        out = {"alignment": m["attribute_accuracy"], "quality_fd": m["fd_probe"]}
        if kind == "t2v":
            out["temporal"] = m["frame_consistency"]
        return out

    return Metric(score, {"alignment": True, "quality_fd": False, "temporal": True})


def configs(decoupled: viditq.QuantConfig | None) -> dict:
    w4a4 = viditq.PRESETS["w4a4"]
    out = {"fp": None, "w8a8": "w8a8", "w4a8": "w4a8", "w4a8-gptq": "w4a8-gptq", "w4a8-mp (mse proxy)": "w4a8-mp"}
    if decoupled is not None:
        out["w4a8-mp (decoupled metrics)"] = decoupled
    out.update({"w4a4 naive": dataclasses.replace(w4a4, balance=None), "w4a4": "w4a4", "w4a4-gptq": "w4a4-gptq"})
    return out


def run(kind: str, args, probe) -> dict:
    pipe = (load_t2i_pipeline if kind == "t2i" else load_t2v_pipeline)()
    pipe.set_progress_bar_config(disable=True)
    n = args.n if kind == "t2i" else args.n_video
    scenes = model_scenes(kind, n, PROMPT_SEED, split="test")
    prompts = [s.caption for s in scenes]
    calib_prompts = [s.caption for s in model_scenes(kind, args.calib_prompts, CALIB_SEED, split="train")]
    calib = capture_calibration(pipe, calib_prompts, num_inference_steps=args.steps, guidance_scale=GUIDANCE,
                                generator=[torch.Generator().manual_seed(CALIB_SEED + i) for i in range(len(calib_prompts))],
                                output_type="pt")
    float_transformer = pipe.transformer

    def evaluate(seed: int, reference=None):
        x = generate(pipe, prompts, seed=seed, num_inference_steps=args.steps, guidance_scale=GUIDANCE)
        return x, evaluate_samples(x, scenes, probe, reference=reference)

    fp_x, fp_m = evaluate(0)
    _, noise_m = evaluate(NOISE_SEED)
    results = {"fp": fp_m, "fp (other seeds)": noise_m}
    decoupled = None
    if not args.skip_decoupled:
        t0 = time.time()
        metric = sensitivity_metric(pipe, kind, probe, args.sens_n if kind == "t2i" else max(args.sens_n // 2, 4),
                                    args.steps)
        table = measure_sensitivity(float_transformer, calib, {"eval": metric}, base_config="w4a8-gptq",
                                    measure_high=False, cache=Path(args.out) / f"sensitivity_{kind}.json")
        plot_sensitivity(table, Path(args.out) / f"sensitivity_{kind}.png")
        allocation = allocate(table, "w4a8-gptq", budget_bits=5.0, memory_bits=6.0, name="w4a8-mp-decoupled")
        print(f"{kind} sensitivity {time.time() - t0:.0f}s\n{allocation.summary()}", flush=True)
        decoupled = allocation.config
        allocation.config.save(Path(args.out) / f"w4a8_mp_decoupled_{kind}.yaml")
    for label, cfg in configs(decoupled).items():
        if cfg is None:
            results[label].update(weight_mib=viditq.memory_report(float_transformer).total_after / 2**20)
            continue
        t0 = time.time()
        pipe.transformer = viditq.quantize(copy.deepcopy(float_transformer), cfg, calib)
        _, m = evaluate(0, reference=fp_x)
        m["weight_mib"] = viditq.memory_report(pipe.transformer).total_after / 2**20
        results[label] = m
        pipe.transformer = float_transformer
        print(f"{kind} {label:<28} " + " ".join(f"{c}={m.get(c, float('nan')):.4f}" for c in COLUMNS[kind])
              + f" ({time.time() - t0:.0f}s)", flush=True)
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kinds", default="t2i,t2v")
    parser.add_argument("--n", type=int, default=64, help="evaluation images")
    parser.add_argument("--n-video", type=int, default=16, help="evaluation videos")
    parser.add_argument("--sens-n", type=int, default=16, help="samples per sensitivity probe (videos: half)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--calib-prompts", type=int, default=8)
    parser.add_argument("--skip-decoupled", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/mixed_precision_embedded")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    probe = load_probe()
    results = {kind: run(kind, args, probe) for kind in args.kinds.split(",")}
    results["settings"] = vars(args)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2, default=float))
    for kind in args.kinds.split(","):
        print(f"\n{kind}\n{'config':<30}" + "".join(f"{c[:14]:>15}" for c in COLUMNS[kind]))
        for label, m in results[kind].items():
            print(f"{label:<30}" + "".join(f"{m.get(c, float('nan')):>15.4f}" for c in COLUMNS[kind]))


if __name__ == "__main__":
    main()
