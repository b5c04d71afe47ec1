"""Context-parallel (Ulysses) forward of a quantized CogVideoX-2B-shaped transformer on 1, 2, 4 GPUs of one host.

What it measures, per GPU count N (random bf16 weights give real timings; see docs/multi_gpu.md):
  * median latency of one transformer forward (CFG batch 2, 49 frames 480x720 → 17 550 video + 226 text tokens),
    speed-up vs N = 1;
  * agreement with the N = 1 quantized output of the same checkpoint and inputs: max |diff|, SQNR in dB, and
    the SQNR of a single bf16 rounding of the N = 1 output as the "bf16 noise" yardstick.

The model is quantized once (W8A8 + INT8 attention by default) in a one-GPU subprocess and saved; every rank of
every N then loads that checkpoint (viditq.load_quantized), so all runs use the same integer weights. Each N runs
in fresh processes (viditq.parallel.launch: NCCL, one GPU per rank). Results: JSON (--out) and a table on stdout.

    python benchmarks/bench_parallel.py --gpus 1,2,4 --out benchmarks/results/parallel_h100_<date>.json
    python benchmarks/bench_parallel.py --device cpu --tiny --gpus 1,2       # CPU (gloo) smoke test of the script
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

LATENTS = (2, 13, 16, 60, 90)  # CFG batch, latent frames, channels, height, width (CogVideoX-2B, 49 x 480 x 720)
TEXT_TOKENS, TEXT_DIM = 226, 4096
# 10 heads: on 3 or 4 processes the heads and tokens split unevenly, as CogVideoX-2B's 30 heads do on 4 GPUs.
TINY_CONFIG = dict(num_layers=2, num_attention_heads=10, attention_head_dim=32, text_embed_dim=64, sample_height=16,
                   sample_width=16, sample_frames=5, max_text_seq_length=8)
TINY_LATENTS, TINY_TEXT = (2, 2, 16, 16, 16), (8, 64)


# ----------------------------------------------------------------------------------------- model and inputs
def build_model(tiny: bool, dtype: torch.dtype):
    """CogVideoX-2B (diffusers defaults) or a tiny one, random weights (seeded: the same on every process)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(**(TINY_CONFIG if tiny else {})).to(dtype).eval()


def make_inputs(tiny: bool, device: torch.device, dtype: torch.dtype, seed: int = 1) -> dict:
    """Forward kwargs, drawn on the CPU from ``seed`` so that every rank holds the same tensors."""
    latents, (tokens, text_dim) = (TINY_LATENTS, TINY_TEXT) if tiny else (LATENTS, (TEXT_TOKENS, TEXT_DIM))
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(*latents, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(latents[0], tokens, text_dim, generator=g).to(device, dtype),
        timestep=torch.full((latents[0],), 500, device=device),
        return_dict=False,  # diffusers' context-parallel hooks expect tuple outputs
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------- per-process workers
def quantize_worker(rank, world_size, device, tiny: bool, preset: str, attention: str, ckpt: str, info_file: str):
    """One process: build, quantize with one random calibration sample, save the checkpoint."""
    import viditq
    from viditq.config import resolve_config

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(tiny, dtype).to(device)
    config = dataclasses.replace(resolve_config(preset), attention=attention)
    t0 = time.perf_counter()
    with torch.inference_mode():
        calib = {k: v for k, v in make_inputs(tiny, device, dtype, seed=100).items() if k != "return_dict"}
        viditq.quantize(model, config, calib=[calib])
    _sync(device)
    quantize_s = time.perf_counter() - t0
    viditq.save_quantized(model, ckpt)
    Path(info_file).write_text(json.dumps(dict(quantize_s=quantize_s, config=config.name, attention=attention)))


def forward_worker(rank, world_size, device, tiny: bool, ckpt: str, warmup: int, iters: int, out_dir: str):
    """Every rank: load the checkpoint, enable Ulysses over ``world_size`` ranks, time the forward; rank 0 saves
    the (gathered) output and its timings."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    import viditq
    from viditq.attention import quantized_attention_mode
    from viditq.parallel import enable_context_parallel

    model = viditq.load_quantized(ckpt, device=device)
    if world_size > 1:
        enable_context_parallel(model, world_size)  # uneven split (30 heads on 4 GPUs) is switched on by itself
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    kwargs = make_inputs(tiny, device, dtype)
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            out = model(**kwargs)[0]
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    if rank == 0:
        save_file({"out": out.float().cpu().contiguous()}, f"{out_dir}/out_{world_size}.safetensors")
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        Path(f"{out_dir}/timing_{world_size}.json").write_text(json.dumps(dict(
            ms_median=statistics.median(times), ms_all=times, peak_bytes_rank0=peak,
            attention=quantized_attention_mode(model),
            quant_linears=sum(type(m).__name__ == "QuantLinear" for m in model.modules()))))


# ----------------------------------------------------------------------------------------- driver
def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    noise = (reference - approx).pow(2).mean().clamp_min(1e-30)
    return float(10 * torch.log10(reference.pow(2).mean() / noise))


def compare(reference: torch.Tensor, out: torch.Tensor) -> dict:
    """Agreement with the first GPU count's output (on the reference itself: 0 and a clamped ~295 dB)."""
    return dict(max_abs_diff=float((out - reference).abs().max()), sqnr_db_vs_1gpu=sqnr_db(reference, out),
                reference_absmax=float(reference.abs().max()))


def run(gpu_counts: list[int], device: str, tiny: bool, preset: str, attention: str, warmup: int, iters: int) -> dict:
    from safetensors.torch import load_file

    from viditq.parallel import launch

    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    result = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), card=card, device=device,
                  model="CogVideoX-2B-shaped (random weights)" if not tiny else "tiny CogVideoX",
                  latents=list(TINY_LATENTS if tiny else LATENTS), preset=preset, attention=attention,
                  engine="diffusers context parallelism, Ulysses (native SDPA backend)", runs=[])
    with tempfile.TemporaryDirectory(prefix="viditq-bench-parallel-") as tmp:
        ckpt, info = f"{tmp}/ckpt", f"{tmp}/quantize.json"
        launch(quantize_worker, 1, tiny, preset, attention, ckpt, info, device=device)
        result.update(json.loads(Path(info).read_text()))
        reference = None
        for n in gpu_counts:
            launch(forward_worker, n, tiny, ckpt, warmup, iters, tmp, device=device)
            out = load_file(f"{tmp}/out_{n}.safetensors")["out"]
            run_n = dict(gpus=n, **json.loads(Path(f"{tmp}/timing_{n}.json").read_text()))
            if reference is None:
                reference = out
                result["bf16_noise_sqnr_db"] = sqnr_db(out, out.bfloat16().float())
            run_n.update(compare(reference, out))
            result["runs"].append(run_n)
    base = result["runs"][0]["ms_median"]
    for r in result["runs"]:
        r["speedup_vs_first"] = base / r["ms_median"]
    return result


def print_table(result: dict) -> None:
    print(f"{result['model']} on {result['card']}, {result['preset']} + {result['attention']} attention "
          f"(bf16-rounding SQNR of the 1-GPU output: {result['bf16_noise_sqnr_db']:.1f} dB)")
    print(f"{'GPUs':>4} {'ms':>9} {'speed-up':>8} {'max|diff|':>10} {'SQNR dB':>8}")
    for i, r in enumerate(result["runs"]):
        agreement = f"{'reference':>19}" if i == 0 else f"{r['max_abs_diff']:>10.2e} {r['sqnr_db_vs_1gpu']:>8.1f}"
        print(f"{r['gpus']:>4} {r['ms_median']:>9.2f} {r['speedup_vs_first']:>8.2f} {agreement}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,2,4", help="comma-separated GPU counts; the first is the reference")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test of the script)")
    parser.add_argument("--preset", default="w8a8")
    parser.add_argument("--attention", default="int8", choices=("bf16", "int8", "fp8"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="JSON results path")
    args = parser.parse_args()
    gpu_counts = [int(n) for n in args.gpus.split(",")]
    skipped = []
    if args.device == "cuda":
        skipped = [n for n in gpu_counts if n > torch.cuda.device_count()]
        gpu_counts = [n for n in gpu_counts if n not in skipped]
        if not gpu_counts:
            raise SystemExit(f"no GPU count of {args.gpus} fits the {torch.cuda.device_count()} visible GPU(s)")
    result = run(gpu_counts, args.device, args.tiny, args.preset, args.attention, args.warmup, args.iters)
    result["skipped_gpu_counts"] = skipped  # more than the visible GPUs
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print_table(result)


if __name__ == "__main__":
    main()
