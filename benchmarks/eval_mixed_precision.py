"""Does mixed precision / GPTQ / rotation help? Output SQNR of tiny random-weight diffusers transformers (MSE proxy).

    python benchmarks/eval_mixed_precision.py --models pixart,cogvideox,latte --seeds 0,1,2

Every config is quantized with each seed (the seed changes the Hadamard signs and the calibration rows kept),
so the spread over seeds is the run-to-run noise. Models get injected channel outliers (viditq.testing).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

import viditq
from viditq.config import ActSpec, MixedPrecisionSpec, QuantConfig, WeightSpec
from viditq.testing import calibration_set, forward_output, inject_outliers, sqnr_db, tiny_inputs, tiny_model


def configs() -> dict[str, QuantConfig]:
    w4a8, w4a4 = viditq.PRESETS["w4a8"], viditq.PRESETS["w4a4"]
    gptq4 = WeightSpec(4, False, 64, gptq=True)
    return {
        "W8A8": viditq.PRESETS["w8a8"],
        "W4A8": w4a8,
        "W4A8 +GPTQ": dataclasses.replace(w4a8, weight=gptq4),
        "W4A8-mp (5 bits)": viditq.PRESETS["w4a8-mp"],
        "W4A8-mp (5 bits, per group)": dataclasses.replace(
            w4a8, mixed_precision=MixedPrecisionSpec(budget_bits=5.0, timestep_aware=False)),
        "W4A8-mp +GPTQ": dataclasses.replace(viditq.PRESETS["w4a8-mp"], weight=gptq4),
        "W4A4 naive (no balancing)": dataclasses.replace(w4a4, balance=None),
        "W4A4 smooth only": dataclasses.replace(w4a4, balance=viditq.BalanceSpec(rotate=False)),
        "W4A4 smooth+rotate": w4a4,
        "W4A4 smooth+rotate +GPTQ": dataclasses.replace(w4a4, weight=gptq4),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="pixart,cogvideox,latte")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default="", help="comma-separated config names (default: all)")
    parser.add_argument("--out", default="benchmarks/results/mixed_precision_tiny.json")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = {k: v for k, v in configs().items() if not args.only or k in args.only.split(",")}
    results = {}
    for name in args.models.split(","):
        model = tiny_model(name)
        inject_outliers(model)
        calib = calibration_set(name, n=8)
        evals = [tiny_inputs(name, seed=s) for s in (1, 2, 3, 4)]
        refs = [forward_output(model, x) for x in evals]
        for label, cfg in chosen.items():
            scores = []
            for seed in seeds:
                t0 = time.time()
                q = viditq.quantize(copy.deepcopy(model), dataclasses.replace(cfg, seed=seed), calib)
                score = sum(sqnr_db(r, forward_output(q, x)) for r, x in zip(refs, evals)) / len(evals)
                mem = viditq.memory_report(q)
                scores.append(score)
                print(f"{name:<10} {label:<30} seed {seed}: {score:6.2f} dB  {mem.total_after / 1024:8.1f} KiB "
                      f"({time.time() - t0:.0f}s)", flush=True)
            results.setdefault(name, {})[label] = {
                "sqnr_db_mean": statistics.mean(scores),
                "sqnr_db_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "sqnr_db": scores, "weight_bytes": mem.total_after}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n{'config':<32}" + "".join(f"{m:>18}" for m in results))
    for label in chosen:
        print(f"{label:<32}" + "".join(f"{results[m][label]['sqnr_db_mean']:>11.2f} ± {results[m][label]['sqnr_db_std']:.2f}"
                                         for m in results))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
