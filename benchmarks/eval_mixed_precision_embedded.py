r"""FP vs W8A8 vs W4A8 vs W4A8-mp vs W4A4 on the embedded tiny T2I / T2V models, on every metric, with noise.

    python benchmarks/eval_mixed_precision_embedded.py --kinds t2i --n 32 --steps 8 --calib-prompts 4 --low-only \
        --out benchmarks/results/mixed_precision_embedded_v2/t2i_n32_steps8
    python benchmarks/eval_mixed_precision_embedded.py --kinds t2v --n-video 24 --steps 10 --calib-prompts 4 \
        --low-only --out benchmarks/results/mixed_precision_embedded_v2/t2v_n24_steps10

Rows are written to ``OUT/results_<kind>.json`` as they finish. Videos: the T2V pipeline keeps samples as
(B, 3, F, H, W); CogVideoX (the shipped T2V model) takes and returns (B, F, 3, H, W), Latte (the first shipped
model) (B, 3, F, H, W) — the calibration records hold the transformer's own layout, handled by ``_x0_frames``.

W4A8-mp is run twice: the output-MSE proxy (the ``w4a8-mp`` preset's metric, allocated from the same
sensitivity table), and the metric-decoupled method: sensitivity of
every (block, role) group x 4 timestep ranges on alignment (probe log-probability of the prompt's attributes),
visual quality (probe-feature distance to the float prediction) and, for video, temporal consistency (frame
consistency), scored on the one-step denoised predictions of the calibration calls (training-split prompts, never
the evaluation prompts), then :func:`allocate` over those three families at 5 executed / 6 stored bits.
Run-to-run noise: the float model evaluated on the same prompts with a second set of seeds.
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
from viditq.mixed_precision import OutputMetric, allocate, measure_sensitivity, plot_sensitivity
from viditq.models import load_t2i_pipeline, load_t2v_pipeline

NOISE_SEED = 1000
PROMPT_SEED = 4242  # held-out evaluation prompts (the demo's)
CALIB_SEED = 99  # calibration prompts (training split)
SENS_SEED = 106  # sensitivity prompts (training split, another draw)
GUIDANCE = 4.0
COLUMNS = {"t2i": ["attribute_accuracy", "all_correct", "fd_probe", "psnr_vs_fp", "ssim_vs_fp", "weight_mib"],
           "t2v": ["attribute_accuracy", "all_correct", "direction_accuracy", "speed_accuracy", "frame_consistency",
                   "flicker", "fd_probe", "psnr_vs_fp", "ssim_vs_fp", "weight_mib"]}


def _x0_frames(velocity: torch.Tensor, sample: dict, frames_first: bool = False) -> torch.Tensor:
    """One-step denoised prediction of a CFG calibration call, as frames in [0, 1]: (B, 3, H, W) or (B, F, 3, H, W).

    Flow matching: x_t = x0 + sigma * v with sigma = t / 1000; the batch is [uncond; cond] (guided like the
    pipeline). ``frames_first``: the transformer's own video layout is already (B, F, C, H, W) (CogVideoX);
    otherwise videos are (B, C, F, H, W) (Latte) and are permuted."""
    x = sample["hidden_states"].float()
    if x.shape != velocity.shape:
        raise ValueError(f"hidden_states {tuple(x.shape)} and transformer output {tuple(velocity.shape)} differ")
    x = x.chunk(2)[1]
    uncond, cond = velocity.float().chunk(2)
    sigma = float(sample["timestep"].reshape(-1)[0]) / 1000
    x0 = ((x - sigma * (uncond + GUIDANCE * (cond - uncond))).clamp(-1, 1) + 1) / 2
    if x0.ndim == 5 and not frames_first:
        x0 = x0.permute(0, 2, 1, 3, 4)  # Latte: (B, C, F, H, W) -> (B, F, C, H, W)
    if x0.ndim == 5 and x0.shape[2] != 3:
        raise ValueError(f"expected (B, F, 3, H, W) frames, got {tuple(x0.shape)}")
    return x0


def _frames_first(pipe) -> bool:
    """Whether the pipeline's transformer takes videos as (B, F, C, H, W) (CogVideoX) rather than (B, C, F, H, W)."""
    return bool(getattr(pipe, "_frames_first", False))


def x0_metric(kind: str, probe, scenes, frames_first: bool = False) -> OutputMetric:
    """Decoupled metric families on the one-step denoised predictions of the calibration calls (no sampling
    loop, so a probe costs one forward per calibration call of its timestep range):
    alignment = probe log-probability of the prompt's attributes; quality_dist = probe-feature distance to the
    float model's prediction (relative); temporal = cosine similarity of consecutive frames' probe features."""
    from viditq.metrics.alignment import judged_heads
    from viditq.models.data import scene_labels

    labels = [(judged_heads(s), scene_labels(s)) for s in scenes]

    @torch.no_grad()
    def fn(outputs, samples, references):
        align, dist, temporal = [], [], []
        for out, ref, sample in zip(outputs, references, samples):
            frames, ref_frames = _x0_frames(out, sample, frames_first), _x0_frames(ref, sample, frames_first)
            video = frames.ndim == 5
            flat, ref_flat = (frames.flatten(0, 1), ref_frames.flatten(0, 1)) if video else (frames, ref_frames)
            feats, ref_feats = probe.features(flat), probe.features(ref_flat)
            logits = {h: head(feats).log_softmax(-1) for h, head in probe.heads.items()}
            per_sample = flat.shape[0] // len(labels)
            for i in range(flat.shape[0]):
                heads, truth = labels[i // per_sample]
                align.append(sum(float(logits[h][i, truth[h]]) for h in heads) / len(heads))
            dist.append(float((feats - ref_feats).pow(2).sum() / ref_feats.pow(2).sum().clamp_min(1e-12)))
            if video:
                f = feats.view(*frames.shape[:2], -1)
                temporal.append(float(torch.nn.functional.cosine_similarity(f[:, 1:], f[:, :-1], dim=-1).mean()))
        result = {"alignment": sum(align) / len(align), "quality_dist": sum(dist) / len(dist)}
        if temporal:
            result["temporal"] = sum(temporal) / len(temporal)
        return result

    return OutputMetric(fn, {"alignment": True, "quality_dist": False, "temporal": True})


def configs(decoupled: viditq.QuantConfig | None, mse_allocated: viditq.QuantConfig | None = None) -> dict:
    """Configs by label; ``mse_allocated`` (the MSE column of the same sensitivity table, allocated exactly as the
    ``w4a8-mp`` preset does) saves re-measuring the table inside ``quantize``."""
    w4a4 = viditq.PRESETS["w4a4"]
    out = {"fp": None, "w8a8": "w8a8", "w4a8": "w4a8", "w4a8-gptq": "w4a8-gptq",
           "w4a8-mp (mse proxy)": mse_allocated or "w4a8-mp"}
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
    calib_scenes = model_scenes(kind, args.calib_prompts, CALIB_SEED, split="train")
    calib_prompts = [s.caption for s in calib_scenes]
    calib = capture_calibration(pipe, calib_prompts, num_inference_steps=args.steps, guidance_scale=GUIDANCE,
                                generator=[torch.Generator().manual_seed(CALIB_SEED + i) for i in range(len(calib_prompts))],
                                output_type="pt")
    float_transformer = pipe.transformer

    def evaluate(seed: int, reference=None):
        x = generate(pipe, prompts, seed=seed, num_inference_steps=args.steps, guidance_scale=GUIDANCE)
        return x, evaluate_samples(x, scenes, probe, reference=reference)

    decoupled = None
    if not args.skip_decoupled:
        t0 = time.time()
        metric = x0_metric(kind, probe, calib_scenes, _frames_first(pipe))
        table = measure_sensitivity(float_transformer, calib, {"x0": metric}, base_config="w4a8-gptq",
                                    measure_high=not args.low_only, cache=Path(args.out) / f"sensitivity_{kind}.json")
        plot_sensitivity(table, Path(args.out) / f"sensitivity_{kind}.png")
        allocation = allocate(table, "w4a8-gptq", budget_bits=5.0, memory_bits=6.0, name="w4a8-mp-decoupled",
                              metrics=[m for m in table.metrics if m != "mse"])
        print(f"{kind} sensitivity {time.time() - t0:.0f}s\n{allocation.summary()}", flush=True)
        decoupled = allocation.config
        allocation.config.save(Path(args.out) / f"w4a8_mp_decoupled_{kind}.yaml")
        mse_allocation = allocate(table, "w4a8-gptq", budget_bits=5.0, memory_bits=6.0, name="w4a8-mp",
                                  metrics=["mse"])
        print(f"{kind} MSE-proxy allocation\n{mse_allocation.summary()}", flush=True)
        mse_allocation.config.save(Path(args.out) / f"w4a8_mp_mse_{kind}.yaml")
    if args.proxy_only:
        chosen = configs(decoupled, mse_allocation.config if decoupled is not None else None)
        if args.only:
            chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
        return proxy_table(pipe, kind, probe, calib, chosen, args)
    out_file = Path(args.out) / f"results_{kind}.json"

    def save():  # after every row, so a run cut short keeps the rows it finished
        out_file.write_text(json.dumps({"settings": vars(args), kind: results}, indent=2, default=float))

    t0 = time.time()
    fp_x, fp_m = evaluate(0)
    results = {"fp": fp_m}
    print(f"{kind} fp generation + metrics {time.time() - t0:.0f}s", flush=True)
    _, results["fp (other seeds)"] = evaluate(NOISE_SEED)
    save()
    chosen = configs(decoupled, mse_allocation.config if decoupled is not None else None)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k == "fp" or k in args.only.split(",")}
    for label, cfg in chosen.items():
        if cfg is None:
            results[label].update(weight_mib=viditq.memory_report(float_transformer).total_after / 2**20)
            save()
            continue
        t0 = time.time()
        pipe.transformer = viditq.quantize(copy.deepcopy(float_transformer), cfg, calib)
        _, m = evaluate(0, reference=fp_x)
        m["weight_mib"] = viditq.memory_report(pipe.transformer).total_after / 2**20
        results[label] = m
        save()
        pipe.transformer = float_transformer
        print(f"{kind} {label:<28} " + " ".join(f"{c}={m.get(c, float('nan')):.4f}" for c in COLUMNS[kind])
              + f" ({time.time() - t0:.0f}s)", flush=True)
    return results


@torch.no_grad()
def proxy_table(pipe, kind: str, probe, calib, configs: dict, args) -> dict:
    """Every config on held-out prompts, teacher-forced: the float model's sampling trajectories are recorded and
    each quantized model predicts from the same inputs; scored with the output-MSE proxy and the three one-step
    metric families. Spread over quantization seeds 0 and 1 = run-to-run noise."""
    from viditq.testing import forward_output

    scenes = model_scenes(kind, args.n_proxy, PROMPT_SEED, split="test")
    records = capture_calibration(pipe, [s.caption for s in scenes], num_inference_steps=args.steps,
                                  guidance_scale=GUIDANCE, output_type="pt",
                                  generator=[torch.Generator().manual_seed(i) for i in range(len(scenes))])
    metric = x0_metric(kind, probe, scenes, _frames_first(pipe))
    float_transformer = pipe.transformer
    refs = [forward_output(float_transformer, r) for r in records]
    power = sum(float(r.pow(2).mean()) for r in refs)
    results = {"fp": {**metric.fn(refs, records, refs), "rel_mse": 0.0,
                      "weight_mib": viditq.memory_report(float_transformer).total_after / 2**20}}
    for label, cfg in configs.items():
        if cfg is None:
            continue
        runs = []
        for seed in args.seeds:
            t0 = time.time()
            cfg_seeded = dataclasses.replace(viditq.config.resolve_config(cfg), seed=seed)
            q = viditq.quantize(copy.deepcopy(float_transformer), cfg_seeded, calib)
            outs = [forward_output(q, r) for r in records]
            m = metric.fn(outs, records, refs)
            m["rel_mse"] = sum(float((o - r).pow(2).mean()) for o, r in zip(outs, refs)) / power
            m["weight_mib"] = viditq.memory_report(q).total_after / 2**20
            runs.append(m)
            print(f"{kind} {label:<28} seed {seed} " + " ".join(f"{k}={v:.5f}" for k, v in m.items())
                  + f" ({time.time() - t0:.0f}s)", flush=True)
        results[label] = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        results[label].update({f"{k}_spread": max(r[k] for r in runs) - min(r[k] for r in runs) for k in runs[0]})
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kinds", default="t2i,t2v")
    parser.add_argument("--n", type=int, default=64, help="evaluation images")
    parser.add_argument("--n-video", type=int, default=16, help="evaluation videos")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--calib-prompts", type=int, default=8)
    parser.add_argument("--skip-decoupled", action="store_true")
    parser.add_argument("--low-only", action="store_true",
                        help="sensitivity: probe only the W4A8 level, treat W8A8 as lossless (halves the probes)")
    parser.add_argument("--proxy-only", action="store_true", help="teacher-forced metrics only (no sampling)")
    parser.add_argument("--only", default="", help="comma-separated config labels (default: all)")
    parser.add_argument("--n-proxy", type=int, default=8, help="held-out prompts for --proxy-only")
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1],
                        help="quantization seeds for --proxy-only (spread = run-to-run noise)")
    parser.add_argument("--out", default="benchmarks/results/mixed_precision_embedded")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    probe = load_probe()
    results = {kind: run(kind, args, probe) for kind in args.kinds.split(",")}
    results["settings"] = vars(args)
    (Path(args.out) / f"results_{args.kinds.replace(',', '_')}{'_proxy' if args.proxy_only else ''}.json").write_text(
        json.dumps(results, indent=2, default=float))
    for kind in args.kinds.split(","):
        columns = list(next(iter(results[kind].values()))) if args.proxy_only else COLUMNS[kind]
        print(f"\n{kind}\n{'config':<30}" + "".join(f"{c[:14]:>15}" for c in columns))
        for label, m in results[kind].items():
            print(f"{label:<30}" + "".join(f"{m.get(c, float('nan')):>15.4f}" for c in columns))


if __name__ == "__main__":
    main()
