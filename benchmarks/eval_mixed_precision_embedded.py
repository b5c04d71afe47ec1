r"""FP vs W8A8 vs W4A8 vs W4A8-mp vs W4A4 on the embedded tiny T2I / T2V models, on every metric, with noise.

    python benchmarks/eval_mixed_precision_embedded.py --kinds t2i --n 32 --steps 8 --calib-prompts 4 --low-only \
        --out benchmarks/results/mixed_precision_embedded_v2/t2i_n32_steps8
    python benchmarks/eval_mixed_precision_embedded.py --kinds t2v --n-video 24 --steps 10 --calib-prompts 4 \
        --fp-seeds 0,1000,2000 --float-final-step "w8a8,w4a8-mp (decoupled + flicker)" \
        --out benchmarks/results/mixed_precision_embedded_v3/t2v_n24_steps10

Rows are written to ``OUT/results_<kind>.json`` as they finish; a later run with the same sample settings (e.g.
``--only`` other rows, ``--fp-seeds 0``) adds its rows to the file, so a long table can be measured in parts.
``--device cuda`` runs pipeline, probe and quantized models on the GPU (samples are drawn from CPU generators,
so the seeds mean the same videos up to kernel numerics). Videos: the T2V pipeline keeps samples as
(B, 3, F, H, W); CogVideoX (the shipped T2V model) takes and returns (B, F, 3, H, W), Latte (the first shipped
model) (B, 3, F, H, W) — the calibration records hold the transformer's own layout, handled by ``_x0_frames``.

Noise: the float model on the same prompts with further seed sets (``--fp-seeds``: the first is the reference
every quantized row is generated with). Quantized rows share prompts and seeds with the reference, so for video
each also gets ``flicker_vs_fp``: the flicker change relative to the float videos, with its standard error over
videos (``flicker_vs_fp_se``, the paired noise).

W4A8-mp rows, all allocated from one sensitivity table (every (block, role) group x 4 timestep ranges, W4A8 + GPTQ
and W8A8 both probed unless ``--low-only``; training-split calibration prompts, never the evaluation prompts):
* ``mse proxy``: the output-MSE proxy, allocated as the ``w4a8-mp`` preset does;
* ``decoupled metrics``: alignment (probe log-probability of the prompt's attributes), visual quality
  (probe-feature distance to the float prediction) and, for video, temporal consistency (frame consistency), on
  the one-step denoised predictions of the calibration calls;
* ``decoupled + flicker`` (video): those plus :func:`viditq.mixed_precision.flicker_metric` on the final step's
  denoised prediction (frame-to-frame noise vs float);
at 5 executed / 6 stored bits (``--budget-bits``, ``--memory-bits``; ``--extra-budget`` adds rows at other
budgets, ``--allow-fp`` lets them keep cells in float). ``--float-final-step LABELS`` adds, for those rows, a
variant that keeps every layer float in the last denoising step (the float copy is stored and counted): a
diagnostic of how much of the flicker the final step's 8-bit activations cause.

Float activations (v4): ``--float-acts-last LABELS`` adds ``<label> + float acts last step`` rows: the config
with ``float_final_steps=1`` (every quantized layer runs the last step with float activations on its quantized
weights, no second copy; ``"w8a8"`` gives the ``w8a8-float-last`` preset). ``--float-act-budget B[,B...]`` probes
the float-activation levels too (``measure_sensitivity(float_acts=True)``) and adds, per budget, a
``decoupled + flicker`` allocation allowed to run that share of the executed weights with float activations
(``allocate(float_act_budget=B)``).

The last step as a range of its own (v5): ``--ranges 5 --final-range-steps 1`` measures the table with t <= 149
(the last of 10 steps) as its first range and four even ranges for the other nine
(``measure_sensitivity(final_range_steps=1)``), so float activations / 8-bit weights can be bought for the last
step alone. ``--extra-budget EXECUTED:STORED:SHARE`` gives an extra-budget row a float-activation share. Labels
with a comma (the extra-budget rows) are passed to ``--only`` separated by ``;``::

    python benchmarks/eval_mixed_precision_embedded.py --kinds t2v --n-video 24 --steps 10 --calib-prompts 4 \
        --fp-seeds 0 --ranges 5 --final-range-steps 1 --float-act-budget 0.1,0.2,0.3 --sensitivity-only \
        --out benchmarks/results/mixed_precision_embedded_v5/t2v_n24_steps10
    python benchmarks/eval_mixed_precision_embedded.py --kinds t2v --n-video 24 --steps 10 --calib-prompts 4 \
        --fp-seeds 0 --ranges 5 --final-range-steps 1 --float-act-budget 0.1,0.2,0.3 \
        --only "w4a8-mp (decoupled + flicker),w4a8-mp (decoupled + flicker + float acts 0.1),w4a8-mp (decoupled + flicker + float acts 0.2),w4a8-mp (decoupled + flicker + float acts 0.3)" \
        --out benchmarks/results/mixed_precision_embedded_v5/t2v_n24_steps10
    python benchmarks/eval_mixed_precision_embedded.py --kinds t2v --n-video 24 --steps 10 --calib-prompts 4 \
        --fp-seeds 0 --ranges 5 --final-range-steps 1 --float-act-budget 0.1,0.2,0.3 \
        --extra-budget 6:7:0.1 --extra-budget 7:8:0.1 \
        --only "w4a8-mp (decoupled + flicker, 6/7 bits + float acts 0.1);w4a8-mp (decoupled + flicker, 7/8 bits + float acts 0.1)" \
        --out benchmarks/results/mixed_precision_embedded_v5/t2v_n24_steps10
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
from viditq.mixed_precision import (
    OutputMetric, allocate, flicker_metric, level_rule, measure_sensitivity, plot_sensitivity,
)
from viditq.models import load_t2i_pipeline, load_t2v_pipeline

NOISE_SEED = 1000
PROMPT_SEED = 4242  # held-out evaluation prompts (the demo's)
CALIB_SEED = 99  # calibration prompts (training split)
SENS_SEED = 106  # sensitivity prompts (training split, another draw)
GUIDANCE = 4.0
COLUMNS = {"t2i": ["attribute_accuracy", "all_correct", "fd_probe", "psnr_vs_fp", "ssim_vs_fp", "weight_mib"],
           "t2v": ["attribute_accuracy", "all_correct", "direction_accuracy", "speed_accuracy", "frame_consistency",
                   "flicker", "flicker_vs_fp", "flicker_vs_fp_se", "fd_probe", "psnr_vs_fp", "ssim_vs_fp",
                   "weight_mib"]}


def _x0_frames(velocity: torch.Tensor, sample: dict, frames_first: bool = False) -> torch.Tensor:
    """One-step denoised prediction of a CFG calibration call, as frames in [0, 1]: (B, 3, H, W) or (B, F, 3, H, W).

    Flow matching: x_t = x0 + sigma * v with sigma = t / 1000; the batch is [uncond; cond] (guided like the
    pipeline). ``frames_first``: the transformer's own video layout is already (B, F, C, H, W) (CogVideoX);
    otherwise videos are (B, C, F, H, W) (Latte) and are permuted."""
    x = sample["hidden_states"].to(velocity.device).float()
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


def configs(allocated: dict[str, viditq.QuantConfig]) -> dict:
    """Configs by label; ``allocated``: the mixed-precision rows allocated from one sensitivity table (the MSE
    column allocated exactly as the ``w4a8-mp`` preset does, so ``quantize`` need not re-measure it)."""
    w4a4 = viditq.PRESETS["w4a4"]
    out = {"fp": None, "w8a8": "w8a8", "w8a8-fp8": "w8a8-fp8", "w4a8": "w4a8", "w4a8-fp8": "w4a8-fp8",
           "w4a8-fp8-float-last": "w4a8-fp8-float-last", "w4a8-gptq": "w4a8-gptq",
           "w4a8-fp8-gptq": "w4a8-fp8-gptq",
           "w4a8-mp (mse proxy)": allocated.get("w4a8-mp (mse proxy)", "w4a8-mp")}
    out.update({k: v for k, v in allocated.items() if k != "w4a8-mp (mse proxy)"})
    out.update({"w4a4 naive": dataclasses.replace(w4a4, balance=None), "w4a4": "w4a4", "w4a4-gptq": "w4a4-gptq"})
    for preset in ("w8a8", "w4a8", "w4a8-fp8", "w8a8-fp8"):  # the conditioning layers weight-only as well
        for bits in (8, 4):
            out[f"{preset} + conditioning w{bits}"] = dataclasses.replace(viditq.PRESETS[preset],
                                                                          conditioning_bits=bits)
    return out


def per_video_flicker(videos: torch.Tensor) -> torch.Tensor:
    """Flicker (mean |second temporal difference|) of each video (B, F, 3, H, W) -> (B,)."""
    v = videos.float()
    return (v[:, 2:] - 2 * v[:, 1:-1] + v[:, :-2]).abs().mean((1, 2, 3, 4))


def paired_flicker(x: torch.Tensor, reference: torch.Tensor) -> dict:
    """Flicker change vs the float samples of the same seeds, relative to the float flicker, with its standard
    error over videos (the paired noise: both rows share prompts and seeds)."""
    diff = per_video_flicker(x) - per_video_flicker(reference)
    ref = float(per_video_flicker(reference).mean())
    return {"flicker_vs_fp": float(diff.mean()) / ref, "flicker_vs_fp_se": float(diff.std()) / len(diff) ** 0.5 / ref}


def sensitivity_metrics(kind: str, probe, calib_scenes, calib, frames_first: bool, flicker_mode: str | None) -> dict:
    """The decoupled metric families: one-step alignment / quality / frame consistency, and for video the flicker
    family (temporal second difference of the final step's denoised prediction vs float)."""
    metrics = {"x0": x0_metric(kind, probe, calib_scenes, frames_first)}
    if kind == "t2v" and flicker_mode:
        metrics["flicker"] = flicker_metric(calib, frame_dim=1, mode=flicker_mode,
                                            frames=lambda out, sample: _x0_frames(out, sample, frames_first))
    return metrics


def allocations(kind: str, table, args) -> dict[str, viditq.QuantConfig]:
    """Mixed-precision rows from one sensitivity table: the MSE proxy, the three one-step families (the v2
    allocation), and those plus flicker (video), at the main budget and at every ``--extra-budget``."""
    out_dir = Path(args.out)
    budget = dict(budget_bits=args.budget_bits, memory_bits=args.memory_bits)
    families = [m for m in table.metrics if m not in ("mse", "flicker")]
    plans = [("w4a8-mp (mse proxy)", "w4a8-mp", ["mse"], budget, False),
             ("w4a8-mp (decoupled metrics)", "w4a8-mp-decoupled", families, budget, False)]
    if "flicker" in table.metrics:
        plans.append(("w4a8-mp (decoupled + flicker)", "w4a8-mp-flicker", families + ["flicker"], budget,
                      args.allow_fp))
        for extra in args.extra_budget:
            parts = [float(v) for v in extra.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError(f"--extra-budget takes EXECUTED:STORED[:FLOAT_ACT_SHARE], got {extra!r}")
            executed, memory, share = (parts + [0.0])[:3]
            tail, suffix = (f" + float acts {share:g}", f"-fa{share:g}") if share else ("", "")
            plans.append((f"w4a8-mp (decoupled + flicker, {executed:g}/{memory:g} bits{tail})",
                          f"w4a8-mp-flicker-{executed:g}-{memory:g}{suffix}", families + ["flicker"],
                          dict(budget_bits=executed, memory_bits=memory, float_act_budget=share), args.allow_fp))
        for share in args.float_act_budget:
            plans.append((f"w4a8-mp (decoupled + flicker + float acts {share:g})", f"w4a8-mp-flicker-fa{share:g}",
                          families + ["flicker"], dict(budget, float_act_budget=share), args.allow_fp))
    chosen = {}
    for label, name, metrics, bits, allow_fp in plans:
        allocation = allocate(table, args.base, name=name, metrics=metrics, allow_fp=allow_fp, **bits)
        print(f"{kind} {label}\n{allocation.summary()}", flush=True)
        allocation.config.save(out_dir / f"{name.replace('-', '_')}_{kind}.yaml")
        chosen[label] = allocation.config
    return chosen


def only_labels(only: str) -> set[str]:
    """Labels of ``--only``: separated by ``;`` if there is one (labels of ``--extra-budget`` rows have commas),
    else by ``,``."""
    return set(filter(None, only.split(";" if ";" in only else ",")))


def float_acts_last(chosen: dict, labels: str) -> dict:
    """``<label> + float acts last step`` rows: the config of ``label`` with ``float_final_steps=1`` (float
    activations on the quantized weights in the last denoising step; nothing stored)."""
    rows = {}
    for label in filter(None, labels.split(",")):
        base = viditq.config.resolve_config(chosen[label])
        name = "w8a8-float-last" if base == viditq.PRESETS["w8a8"] else f"{base.name}-float-last"
        rows[f"{label} + float acts last step"] = dataclasses.replace(base, name=name, float_final_steps=1)
    return rows


def temporal_gptq(chosen: dict, spec: str) -> dict:
    """``<label> + temporal GPTQ <lam>`` rows for ``LAM[,LAM...]:LABEL[;LABEL...]``: the config of ``label`` with
    GPTQ's Hessian also weighing the inputs' frame-to-frame differences (``WeightSpec.gptq_temporal``). A label
    that is no row of this run is read as a config file (e.g. an earlier allocation) and named after it."""
    if not spec:
        return {}
    lams, labels = spec.split(":", 1)
    rows = {}
    for label in filter(None, labels.split(";")):
        base = viditq.config.resolve_config(chosen.get(label, label))
        label = label if label in chosen else f"{base.name} ({Path(label).parent.parent.name})"
        for lam in (float(v) for v in lams.split(",")):
            rows[f"{label} + temporal GPTQ {lam:g}"] = dataclasses.replace(
                base, name=f"{base.name}-tgptq{lam:g}", weight=dataclasses.replace(base.weight, gptq_temporal=lam))
    return rows


def float_final_step(chosen: dict, calib, labels: str) -> dict:
    """``<label> + float final step`` rows: the config of ``label`` with every quantized layer kept in float (fp
    weights and activations) in the last denoising step only (the timestep range up to half-way to the second
    smallest calibration timestep). The float copy is stored next to the quantized one and counted."""
    times = sorted({float(s["timestep"].reshape(-1)[0]) for s in calib})
    cut = (times[0] + times[1]) / 2
    rows = {}
    for label in filter(None, labels.split(",")):
        base = viditq.config.resolve_config(chosen[label])
        rows[f"{label} + float final step"] = dataclasses.replace(
            base, name=f"{base.name}-fp-final", rules=base.rules + (level_rule("fp", ".*", (0.0, cut)),))
    return rows


def run(kind: str, args, probe) -> dict:
    pipe = (load_t2i_pipeline if kind == "t2i" else load_t2v_pipeline)(device=args.device)
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

    allocated = {}
    if not args.skip_decoupled:
        t0 = time.time()
        metrics = sensitivity_metrics(kind, probe, calib_scenes, calib, _frames_first(pipe), args.flicker_mode)
        table = measure_sensitivity(float_transformer, calib, metrics, base_config=args.base,
                                    timestep_ranges=args.ranges, measure_high=not args.low_only,
                                    cache=Path(args.out) / f"sensitivity_{kind}.json",
                                    float_acts=bool(args.float_act_budget), final_range_steps=args.final_range_steps)
        try:
            plot_sensitivity(table, Path(args.out) / f"sensitivity_{kind}.png")
        except ImportError as e:  # a GPU machine without matplotlib: the table (JSON) is what counts
            print(f"no heatmap: {e}", flush=True)
        print(f"{kind} sensitivity {time.time() - t0:.0f}s", flush=True)
        allocated = allocations(kind, table, args)
    if args.sensitivity_only:
        return {}
    if args.proxy_only:
        chosen = configs(allocated)
        if args.only:
            chosen = {k: v for k, v in chosen.items() if k in only_labels(args.only)}
        return proxy_table(pipe, kind, probe, calib, chosen, args)
    out_file = Path(args.out) / f"results_{kind}.json"
    settings = {k: getattr(args, k) for k in ("n", "n_video", "steps", "calib_prompts", "ranges", "low_only")}
    if args.final_range_steps:  # only when set, so the result files of earlier versions still merge
        settings["final_range_steps"] = args.final_range_steps
    results, runs = {}, []
    if out_file.is_file():  # rows of earlier invocations with the same sample settings are kept (split runs)
        previous = json.loads(out_file.read_text())
        if previous.get("sample_settings") == settings:
            results, runs = previous[kind], previous.get("runs", [])
        else:
            print(f"{out_file}: other sample settings, starting a new file", flush=True)
    runs.append(vars(args))

    def save():  # after every row, so a run cut short keeps the rows it finished
        out_file.write_text(json.dumps({"sample_settings": settings, "runs": runs, kind: results}, indent=2,
                                       default=float))

    t0 = time.time()
    fp_x, fp_m = evaluate(args.fp_seeds[0])
    if kind == "t2v":
        fp_m["flicker_per_video_se"] = float(per_video_flicker(fp_x).std()) / len(fp_x) ** 0.5
    fp_m["seed"] = args.fp_seeds[0]
    results["fp"] = fp_m
    print(f"{kind} fp generation + metrics {time.time() - t0:.0f}s", flush=True)
    for i, seed in enumerate(args.fp_seeds[1:]):
        _, m = evaluate(seed)
        m["seed"] = seed
        results["fp (other seeds)" if i == 0 else f"fp (seed set {i + 2})"] = m
    save()
    chosen = configs(allocated)
    chosen.update(float_final_step(chosen, calib, args.float_final_step))
    chosen.update(float_acts_last(chosen, args.float_acts_last))
    chosen.update(temporal_gptq(chosen, args.gptq_temporal))
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k == "fp" or k in only_labels(args.only)}
    for label, cfg in chosen.items():
        if cfg is None:
            results[label].update(weight_mib=viditq.memory_report(float_transformer).total_after / 2**20)
            save()
            continue
        t0 = time.time()
        pipe.transformer = viditq.quantize(copy.deepcopy(float_transformer), cfg, calib)
        x, m = evaluate(args.fp_seeds[0], reference=fp_x)
        if kind == "t2v":
            m.update(paired_flicker(x, fp_x))
        m["weight_mib"] = viditq.memory_report(pipe.transformer).total_after / 2**20
        m["seconds"] = time.time() - t0
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
    parser.add_argument("--device", default="cpu", help="cpu | cuda (pipeline, probe and quantized models)")
    parser.add_argument("--fp-seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, NOISE_SEED],
                        help="seed sets of the float rows: the first is the reference every quantized row is "
                             "generated with (paired), the others measure seed-to-seed noise")
    parser.add_argument("--skip-decoupled", action="store_true")
    parser.add_argument("--low-only", action="store_true",
                        help="sensitivity: probe only the W4A8 level, treat W8A8 as lossless (halves the probes; "
                             "W8A8 is not lossless for flicker: its 8-bit activations add frame-to-frame noise)")
    parser.add_argument("--ranges", type=int, default=4, help="timestep ranges of the sensitivity table")
    parser.add_argument("--final-range-steps", type=int, default=0,
                        help="the last N denoising steps get a timestep range of their own (one of --ranges; "
                             "0: all ranges even, the v2-v4 tables)")
    parser.add_argument("--flicker-mode", default="error", choices=["error", "flicker", ""],
                        help="video flicker family of the sensitivity table ('' = none, the v2 method)")
    parser.add_argument("--base", default="w4a8-gptq",
                        help="preset of the 4-bit cells: sensitivity base and allocation base (w4a8: no GPTQ)")
    parser.add_argument("--budget-bits", type=float, default=5.0, help="allocation: average executed weight bits")
    parser.add_argument("--memory-bits", type=float, default=6.0, help="allocation: average stored weight bits")
    parser.add_argument("--allow-fp", action="store_true",
                        help="flicker allocations may keep cells in float (16-bit weights, float activations)")
    parser.add_argument("--extra-budget", action="append", default=[],
                        help="EXECUTED:STORED bits of a further flicker-aware allocation row (repeatable); "
                             "EXECUTED:STORED:SHARE also lets SHARE of the executed weights run float activations")
    parser.add_argument("--float-final-step", default="",
                        help="comma-separated config labels that get a '+ float final step' row as well")
    parser.add_argument("--float-acts-last", default="",
                        help="comma-separated config labels that get a '+ float acts last step' row "
                             "(float_final_steps=1: float activations on the quantized weights, no copy)")
    parser.add_argument("--float-act-budget", type=lambda v: [float(x) for x in v.split(",")], default=[],
                        help="comma-separated shares of the executed weights that a 'decoupled + flicker' "
                             "allocation may run with float activations (one row each; probes the A16 levels)")
    parser.add_argument("--gptq-temporal", default="",
                        help="LAM[,LAM...]:LABEL[;LABEL...]: rows with WeightSpec.gptq_temporal=LAM (video)")
    parser.add_argument("--sensitivity-only", action="store_true", help="stop after the table and allocations")
    parser.add_argument("--proxy-only", action="store_true", help="teacher-forced metrics only (no sampling)")
    parser.add_argument("--only", default="",
                        help="comma-separated config labels (default: all); ';'-separated when a label has a "
                             "comma (the --extra-budget rows)")
    parser.add_argument("--n-proxy", type=int, default=8, help="held-out prompts for --proxy-only")
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1],
                        help="quantization seeds for --proxy-only (spread = run-to-run noise)")
    parser.add_argument("--out", default="benchmarks/results/mixed_precision_embedded")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    probe = load_probe(device=args.device)
    results = {kind: run(kind, args, probe) for kind in args.kinds.split(",")}
    if args.sensitivity_only:
        return
    if args.proxy_only:
        results["settings"] = vars(args)
        (Path(args.out) / f"results_{args.kinds.replace(',', '_')}_proxy.json").write_text(
            json.dumps(results, indent=2, default=float))
    for kind in args.kinds.split(","):
        columns = list(next(iter(results[kind].values()))) if args.proxy_only else COLUMNS[kind]
        print(f"\n{kind}\n{'config':<44}" + "".join(f"{c[:14]:>15}" for c in columns))
        for label, m in results[kind].items():
            print(f"{label:<44}" + "".join(f"{m.get(c, float('nan')):>15.4f}" for c in columns))


if __name__ == "__main__":
    main()
