"""Metric deltas of weight-only text-encoder quantization on the embedded T2I pipeline (CPU is enough).

    python benchmarks/eval_text_encoder.py --n 64 --steps 10 --out benchmarks/results/text_encoder_cpu.json

Only the text encoder is quantized (the transformer stays float), so the deltas are the text encoder's alone.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from viditq.metrics import load_probe
from viditq.metrics.evaluate import evaluate_samples, generate
from viditq.models import load_t2i_pipeline
from viditq.models.data import model_scenes
from viditq.pipeline import embedding_cosine, encode_text, quantize_weights_only


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/text_encoder_cpu.json")
    args = ap.parse_args()
    scenes = model_scenes("t2i", args.n, 4242 + args.seed, split="test")
    prompts = [s.caption for s in scenes]
    probe = load_probe()
    rows, reference, ref_emb = {}, None, None
    for bits in (None, 8, 4):
        pipe = load_t2i_pipeline()
        if bits is not None:
            quantize_weights_only(pipe.text_encoder, bits, group_size=64)
        emb = encode_text(pipe.text_encoder, pipe.tokenizer, prompts, 32)
        t0 = time.time()
        samples = generate(pipe, prompts, seed=args.seed, num_inference_steps=args.steps)
        m = evaluate_samples(samples, scenes, probe, reference=reference)
        m.pop("per_attribute")
        if bits is None:
            reference, ref_emb = samples, emb
        else:
            m["text_embedding_cosine"] = embedding_cosine(ref_emb, emb)
        m["generate_s"] = round(time.time() - t0, 1)
        rows["fp" if bits is None else f"text_encoder_w{bits}"] = m
        print(rows)
    result = {"what": "embedded T2I, text encoder weight-only quantized, transformer float", "n": args.n,
              "steps": args.steps, "seed": args.seed, "device": "cpu", "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
