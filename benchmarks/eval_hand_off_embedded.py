"""The feed-forward hand-off (``viditq.fusion.FusedFeedForward``: the FF-up epilogue quantizes the hidden state to
fp8 with a bound-based per-token scale) on the embedded models' metrics: each fp8 preset quantized once, sampled
with the hand-off on and off (the same weights, prompts and seeds: paired), against the float model (CPU,
reference numerics — the kernels compute the same scales).

    python benchmarks/eval_hand_off_embedded.py --out benchmarks/results/hand_off_embedded_cpu.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from viditq import quantize  # noqa: E402
from viditq.demo import FULL_SIZE, GUIDANCE, PROMPT_SEED, _calibration  # noqa: E402
from viditq.fusion import FusedFeedForward, fuse_gelu  # noqa: E402
from viditq.metrics.evaluate import evaluate_samples, generate  # noqa: E402
from viditq.metrics.probe import load_probe  # noqa: E402
from viditq.models import load_t2i_pipeline, load_t2v_pipeline  # noqa: E402
from viditq.models.data import model_scenes  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="t2v,t2i")
    ap.add_argument("--presets", default="w8a8-fp8,w4a8-fp8")
    ap.add_argument("--images", type=int, default=FULL_SIZE.images)
    ap.add_argument("--videos", type=int, default=FULL_SIZE.videos)
    ap.add_argument("--steps", type=int, default=FULL_SIZE.steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    probe = load_probe()
    size = FULL_SIZE
    results = {"settings": vars(args)}
    for kind in args.kinds.split(","):
        pipe = (load_t2i_pipeline if kind == "t2i" else load_t2v_pipeline)()
        pipe.set_progress_bar_config(disable=True)
        n = args.images if kind == "t2i" else args.videos
        scenes = model_scenes(kind, n, args.seed + PROMPT_SEED, split="test")
        prompts = [s.caption for s in scenes]
        calib = _calibration(pipe, kind, size, args.seed)
        float_transformer = pipe.transformer

        def sample():
            return generate(pipe, prompts, seed=args.seed, num_inference_steps=args.steps, guidance_scale=GUIDANCE,
                            batch_size=size.batch_size)

        fp = sample()
        rows = {"fp": evaluate_samples(fp, scenes, probe)}
        for preset in args.presets.split(","):
            pipe.transformer = quantize(copy.deepcopy(float_transformer), preset, calib=calib)
            handed = sum(isinstance(m, FusedFeedForward) for m in pipe.transformer.modules())
            for hand_off in (True, False):
                fuse_gelu(pipe.transformer, hand_off=hand_off)
                t0 = time.perf_counter()
                x = sample()
                m = evaluate_samples(x, scenes, probe, reference=fp)
                m.update(hand_offs=handed if hand_off else 0, gen_s=time.perf_counter() - t0)
                rows[f"{preset}{'' if hand_off else ' (no hand-off)'}"] = m
                print(kind, preset, "hand-off" if hand_off else "no hand-off",
                      {k: round(v, 4) for k, v in m.items() if isinstance(v, float)}, flush=True)
        pipe.transformer = float_transformer
        results[kind] = rows
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
