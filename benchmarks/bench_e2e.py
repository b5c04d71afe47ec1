"""End-to-end transformer forward: latency, weight bytes, peak memory, time to first forward (see NOTES.md).

Models are built from their diffusers configs with random bf16 weights (random weights give real timings):
PixArt-α 1024 (batch 2 = CFG, 4096 image + 120 text tokens), CogVideoX-2B (49 frames 480x720, 17 550 + 226
tokens) and Wan2.1-T2V-1.3B (81 frames 480x832: 32 760 tokens at head dim 128, 512 text tokens by
cross-attention). Each (model, variant) runs in its own subprocess with a timeout, so one failure or hang (a slow
compile) does not lose the table and each peak-memory number starts clean.

Variant = base + optional ``_attn`` + run mode. Bases: ``bf16``, ``torchao_fp8`` (torchao's
``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``; reported as skipped when torchao cannot be
imported), ``w8a8``, ``w4a8``, ``w8a8_dynamic``, ``w8a8_fp8``, ``w8a8_fp8_dynamic``, ``w4a8_fp8`` (viditq presets,
``_`` for ``-``), each also with ``_c8`` / ``_c4`` (``conditioning_bits=8`` / ``4``: the embedding and adaLN
linears weight-only, e.g. ``w4a8_fp8_c8``). ``_attn``: 8-bit attention, fp8 mode (``viditq.attention.apply_quantized_attention``; attention over fewer
than ``--min-kv-tokens`` keys — the text cross-attention — stays on SDPA). Run modes: ``_eager`` (or none),
``_graph`` (one forward captured in a CUDA graph and replayed), ``_compile`` (``torch.compile``), ``_compile_graph``
(``torch.compile``, then one compiled forward captured in a CUDA graph: no launch overhead on either side),
``_blocks`` / ``_blocks_graph`` (regional compilation: ``viditq.compile_blocks``, each transformer block compiled).
Examples: ``bf16_compile``, ``torchao_fp8_compile``, ``w8a8_graph``, ``w8a8_fp8_compile_graph``.
``VIDITQ_COMPILE_ACT_QUANT=inductor`` lets Inductor quantize un-rotated inputs itself under torch.compile, fused with
their producer (default: viditq's activation-quantization kernel everywhere; ``viditq.kernels.dispatch``).

    python benchmarks/bench_e2e.py --models pixart --variants bf16_eager,bf16_compile,w8a8,w4a8 --out e2e.json
    python benchmarks/bench_e2e.py --one pixart:w8a8          # a single run, JSON on stdout
    python benchmarks/bench_e2e.py --tiny --variants all      # CPU smoke test: every variant builds and runs
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

VARIANTS = ("bf16_eager", "bf16_graph", "bf16_compile", "bf16_compile_graph", "torchao_fp8_compile", "w8a8",
            "w8a8_graph", "w8a8_compile", "w8a8_compile_graph", "w4a8", "w4a8_graph", "w8a8_dynamic",
            "w8a8_dynamic_graph", "w8a8_attn", "w8a8_attn_graph", "w8a8_attn_compile", "bf16_attn_graph",
            "w8a8_fp8", "w8a8_fp8_graph", "w8a8_fp8_compile_graph", "w8a8_fp8_attn_graph",
            "w8a8_fp8_attn_compile_graph", "w8a8_fp8_dynamic_graph", "bf16_blocks_graph", "w8a8_fp8_blocks_graph",
            "w8a8_fp8_attn_blocks_graph", "w8a8_blocks_graph", "w4a8_fp8_graph", "w4a8_fp8_attn_graph",
            "w4a8_fp8_blocks_graph", "w4a8_fp8_attn_blocks_graph")
QUANT_BASES = ("w8a8", "w4a8", "w8a8_dynamic", "w8a8_fp8", "w8a8_fp8_dynamic", "w4a8_fp8")
ATTENTION_MODE = "fp8"  # mode of the "_attn" variants
MODELS = ("pixart", "cogvideox", "wan")


class VariantUnavailable(Exception):
    """The variant cannot run here (a missing optional package); reported as skipped, not as an error."""


# ----------------------------------------------------------------------------------------- models and inputs
def build_model(name: str, device: str, tiny: bool):
    """(model, forward kwargs) with random weights in bf16; ``tiny`` shrinks it for a CPU smoke test."""
    from diffusers import CogVideoXTransformer3DModel, PixArtTransformer2DModel, WanTransformer3DModel

    torch.manual_seed(0)
    dtype = torch.bfloat16
    if name == "pixart":
        cfg = dict(sample_size=128, caption_channels=4096)
        size, tokens = 128, 120
        if tiny:
            cfg.update(num_layers=2, num_attention_heads=2, attention_head_dim=32, sample_size=16, caption_channels=64,
                       cross_attention_dim=64)
            size, tokens = 16, 8
        with torch.device(device):  # random init on the GPU: seconds instead of a minute of CPU init for 2B params
            model = PixArtTransformer2DModel(**cfg)
        model = model.to(dtype).eval()
        kwargs = dict(
            hidden_states=torch.randn(2, 4, size, size, device=device, dtype=dtype),
            encoder_hidden_states=torch.randn(2, tokens, cfg["caption_channels"], device=device, dtype=dtype),
            timestep=torch.tensor([500, 500], device=device),
            added_cond_kwargs=dict(resolution=torch.tensor([[1024.0, 1024.0]] * 2, device=device, dtype=dtype),
                                   aspect_ratio=torch.tensor([[1.0]] * 2, device=device, dtype=dtype)),
            return_dict=False,
        )
        return model, kwargs
    if name == "cogvideox":
        cls, cfg = CogVideoXTransformer3DModel, {}
        latents, tokens, text_dim = (2, 13, 16, 60, 90), 226, 4096
        if tiny:
            cfg = dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, text_embed_dim=64,
                       sample_height=16, sample_width=16, sample_frames=5, max_text_seq_length=8)
            latents, tokens, text_dim = (2, 2, 16, 16, 16), 8, 64
    elif name == "wan":  # Wan2.1-T2V-1.3B, 81 frames 480x832: (16, 21, 60, 104) latents, 32 760 tokens, 512 text
        cls, cfg = WanTransformer3DModel, dict(num_attention_heads=12, ffn_dim=8960, num_layers=30)
        latents, tokens, text_dim = (2, 16, 21, 60, 104), 512, 4096
        if tiny:
            cfg = dict(num_attention_heads=2, attention_head_dim=32, text_dim=64, freq_dim=32, ffn_dim=128,
                       num_layers=2, rope_max_seq_len=32)
            latents, tokens, text_dim = (2, 16, 2, 16, 16), 8, 64
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    with torch.device(device):
        model = cls(**cfg)
    model = model.to(dtype).eval()
    kwargs = dict(
        hidden_states=torch.randn(*latents, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(2, tokens, text_dim, device=device, dtype=dtype),
        timestep=torch.tensor([500, 500], device=device),
        return_dict=False,
    )
    return model, kwargs


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a wrapper subclass (torchao's fp8 weights: codes + scales, reporting the float dtype
    it stands for) counts its inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers as stored (packed int4 counts half a byte per weight)."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b is not None]
    return sum(tensor_bytes(t) for t in tensors)


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the state dict (what a checkpoint stores: parameters and persistent buffers; not the buffers
    rebuilt at load, such as PixArt's sin-cos position table or the staged int4 scales). torchao's weight tensors
    cannot be detached under inference mode (``state_dict`` does): those are read outside it."""
    try:
        state = model.state_dict()
    except RuntimeError:
        with torch.inference_mode(False):
            state = model.state_dict()
    return sum(tensor_bytes(t) for t in state.values())


# ----------------------------------------------------------------------------------------- variants
def parse_variant(variant: str) -> tuple[str, bool, str]:
    """``w8a8_attn_graph`` → ("w8a8", True, "graph"): (base, 8-bit attention, run mode eager|graph|compile|
    compile_graph|blocks|blocks_graph)."""
    run_mode = "eager"
    for mode in ("eager", "compile_graph", "blocks_graph", "graph", "compile", "blocks"):
        if variant.endswith("_" + mode):
            variant, run_mode = variant.removesuffix("_" + mode), mode
            break
    attn = variant.endswith("_attn")
    base = variant.removesuffix("_attn")
    if base not in ("bf16", "bf16_fused", "torchao_fp8") + QUANT_BASES and split_conditioning(base)[1] is None:
        raise ValueError(f"unknown variant base {base!r}")
    return base, attn, run_mode


def split_conditioning(base: str) -> tuple[str, int | None]:
    """``w4a8_fp8_c8`` → ("w4a8_fp8", 8): a quantized base with ``conditioning_bits`` (weight-only embedding /
    adaLN layers); (base, None) otherwise."""
    for bits in (8, 4):
        if base.endswith(f"_c{bits}") and base.removesuffix(f"_c{bits}") in QUANT_BASES:
            return base.removesuffix(f"_c{bits}"), bits
    return base, None


def _torchao_fp8_rowwise():
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except Exception as e:  # noqa: BLE001 — ImportError, or a torchao built for another torch
        raise VariantUnavailable(f"torchao not importable: {type(e).__name__}: {str(e)[:200]}") from None
    if not torch.cuda.is_available():
        raise VariantUnavailable("torchao fp8 quantization needs a CUDA GPU of compute capability >= 8.9")
    return quantize_, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def prepare(variant: str, model, kwargs, min_kv_tokens: int | None = None):
    """Apply the variant to ``model``; returns (callable forward, notes)."""
    base, attn, run_mode = parse_variant(variant)
    notes = {}
    preset, conditioning_bits = split_conditioning(base)
    if preset in QUANT_BASES:
        import dataclasses

        import viditq

        t0 = time.perf_counter()
        config = dataclasses.replace(viditq.PRESETS[preset.replace("_", "-")], conditioning_bits=conditioning_bits)
        viditq.quantize(model, config, calib=[kwargs])
        _sync()
        notes["quantize_s"] = time.perf_counter() - t0
        notes["quantized_layers"] = sum(type(m).__name__ == "QuantLinear" for m in model.modules())
        if os.environ.get("BENCH_BLOCK_STAGING", "1") == "0":  # A/B: each W4 layer stages its own weights
            viditq.layers.install_weight_staging(model, enable=False)
        if os.environ.get("BENCH_HAND_OFF", "1") == "0":  # A/B: the FF-down quantizes its own input
            viditq.fusion.fuse_gelu(model, hand_off=False)
        if os.environ.get("BENCH_GROUP_QKV", "1") == "0":  # A/B: q, k and v in three GEMM launches
            viditq.fusion.fuse_ada_norm_single(model, group_qkv=False)
            viditq.fusion.fuse_cogvideox_blocks(model, group_qkv=False)
        notes["hand_offs"] = sum(type(m).__name__ == "FusedFeedForward" for m in model.modules())
        notes["staged_blocks"] = sum(getattr(m, "_viditq_weight_staging", None) is not None for m in model.modules())
        notes["pdl"] = os.environ.get("VIDITQ_PDL", "1") != "0"
        notes["group_qkv"] = os.environ.get("BENCH_GROUP_QKV", "1") != "0"
    elif base == "bf16_fused":  # the bf16 model with viditq's fused norm + modulation only (no quantization)
        from viditq.fusion import fuse_norms

        notes["fused_norms"] = fuse_norms(model)
    elif base == "torchao_fp8":
        quantize_, config = _torchao_fp8_rowwise()
        with torch.inference_mode(False), torch.no_grad():  # torchao's usual setting: weights stay normal tensors
            quantize_(model, config)
    if attn:
        from viditq.attention import MIN_KV_TOKENS, apply_quantized_attention

        min_kv_tokens = MIN_KV_TOKENS if min_kv_tokens is None else min_kv_tokens
        notes["attention"] = dict(mode=ATTENTION_MODE, min_kv_tokens=min_kv_tokens,
                                  modules=apply_quantized_attention(model, ATTENTION_MODE, min_kv_tokens))
    if run_mode in ("compile", "compile_graph"):
        return torch.compile(model), notes
    if run_mode in ("blocks", "blocks_graph"):
        from viditq import compile_blocks

        notes["compiled_blocks"] = compile_blocks(model)
    return model, notes


def graph_forward(fn, kwargs):
    """Capture one forward in a CUDA graph (after warm-up on a side stream) and return a replay callable."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(**kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(**kwargs)
    return lambda **_: (graph.replay(), out)[1]


KERNEL_CATEGORIES = (  # first match wins; names of cuBLAS / cuDNN / Triton / PyTorch kernels seen on H100
    ("act_quant", ("_act_quant",)),
    ("w4_stage", ("_stage_int4",)),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "_quant_gemm", "matmul")),
    ("attention_prep", ("_attn_stats", "_quantize_blocks", "_quantize_v_fp8")),  # 8-bit attention's preparation
    ("norm", ("norm", "_ln_modulate")),  # (before attention: Inductor names q/k norms "..._quantized_attention_...")
    ("attention", ("_attn_fwd", "_attn_fp8_ws", "flash", "fmha", "attention", "sdpa")),
    ("elementwise", ("triton_poi", "triton_red", "triton_per", "elementwise_kernel")),  # Inductor / ATen passes
)


def kernel_category(name: str) -> str:
    """:data:`KERNEL_CATEGORIES`' category of a kernel name, else "other"."""
    name = name.lower()
    return next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "other")


def kernel_profile(fn, kwargs, top: int = 25) -> tuple[dict[str, float], list[tuple[str, int, float]]]:
    """Device time (ms) of one forward by kernel category, and the ``top`` kernels (name, calls, ms), from the
    PyTorch profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(**kwargs)
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    kernels = []
    for event in prof.key_averages():
        category = kernel_category(event.key)
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        totals[category] = totals.get(category, 0.0) + device_us / 1e3
        kernels.append((event.key[:120], event.count, device_us / 1e3))
    kernels.sort(key=lambda k: -k[2])
    return totals, kernels[:top]


def time_forward(fn, kwargs, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(**kwargs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


_T0 = time.perf_counter()


def _log(msg: str) -> None:
    """Progress on stderr (kept in the results when a run times out)."""
    print(f"[{time.perf_counter() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def run_one(model_name: str, variant: str, iters: int, tiny: bool, min_kv_tokens: int | None = None) -> dict:
    """Build, prepare, check against the bf16 output, time. Without CUDA (smoke test) it stops after the check.
    A variant that cannot run here (torchao missing) returns ``{"skipped": reason}``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parse_variant(variant)  # unknown names fail before the model is built
    t0 = time.perf_counter()
    model, kwargs = build_model(model_name, device, tiny)
    _sync()
    _log(f"{model_name}:{variant} built")
    result = dict(model=model_name, variant=variant, build_s=time.perf_counter() - t0,
                  device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    with torch.inference_mode():
        ref = model(**kwargs)[0].float()
        t1 = time.perf_counter()
        try:
            fn, notes = prepare(variant, model, kwargs, min_kv_tokens)
        except VariantUnavailable as e:
            return {**result, "skipped": str(e)}
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        _sync()
        result.update(notes, prepare_s=time.perf_counter() - t1, weight_bytes=module_bytes(model),
                      state_dict_bytes=state_bytes(model),
                      allocated_after_prepare=torch.cuda.memory_allocated() if device == "cuda" else 0)
        _log(f"prepared in {result['prepare_s']:.1f} s")
        t2 = time.perf_counter()
        out = fn(**kwargs)[0].float()
        _sync()
        _log("first forward done")
        result["first_forward_s"] = time.perf_counter() - t2
        result["ready_s"] = result["prepare_s"] + result["first_forward_s"]
        if "attention" in notes:  # routing of one eager forward's attention calls (compiled code and CUDA-graph
            # replays are not counted: all zeros for the compiled variants)
            from viditq.attention import attention_call_counts

            result["attention"]["calls_per_forward"] = attention_call_counts(model, reset=True)
        result["rel_err_vs_bf16"] = ((out - ref).norm() / ref.norm()).item()
        del ref, out
        if device != "cuda":
            return result
        if os.environ.get("VIDITQ_PROFILE") == "1":
            try:
                result["profile_ms"], result["profile_top"] = kernel_profile(fn, kwargs)
            except Exception as e:  # noqa: BLE001 — the profile is optional
                result["profile_error"] = repr(e)[:300]
        if variant.endswith("_graph"):
            fn = graph_forward(fn, kwargs)
            _log("graph captured")
        time_forward(fn, kwargs, 3)  # warm-up (compiled variants may recompile once)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = time_forward(fn, kwargs, iters)
        result.update(ms_median=sorted(times)[len(times) // 2], ms_all=times,
                      peak_bytes=torch.cuda.max_memory_allocated())
    return result


# ----------------------------------------------------------------------------------------- driver
def run_all(models, variants, iters, timeout_s, out_path, tiny, min_kv_tokens=None, timeouts=None, deadline_s=None):
    """Every (model, variant) in its own subprocess. ``timeouts``: per-variant overrides of ``timeout_s``;
    ``deadline_s``: no run may end later than this many seconds after the start (each timeout is cut to fit;
    a run with under 10 s left is not started)."""
    start = time.perf_counter()
    results = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), runs=[], errors=[], skipped=[],
                   timed_out=[])
    timeouts = timeouts or {}
    for model_name in models:
        for variant in variants:
            cmd = [sys.executable, __file__, "--one", f"{model_name}:{variant}", "--iters", str(iters)]
            if tiny:
                cmd.append("--tiny")
            if min_kv_tokens is not None:
                cmd += ["--min-kv-tokens", str(min_kv_tokens)]
            limit = timeouts.get(variant, timeout_s)
            if deadline_s is not None:
                limit = min(limit, deadline_s - (time.perf_counter() - start))
                if limit < 10:
                    results["timed_out"].append(f"{model_name}:{variant}: not started (deadline)")
                    print(f"{model_name:10s} {variant:22s} not started: deadline", flush=True)
                    continue
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=os.environ)
            except subprocess.TimeoutExpired as e:
                stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
                progress = " | ".join([line for line in stderr.splitlines() if line.startswith("[")][-4:])
                results["timed_out"].append(f"{model_name}:{variant}: timed out after {limit:.0f} s ({progress})")
                print(f"{model_name:10s} {variant:22s} timed out after {limit:.0f} s", flush=True)
                _save(results, out_path)
                continue
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                results["errors"].append(f"{model_name}:{variant}: rc={proc.returncode} {proc.stderr[-1500:]}")
                print(f"{model_name:10s} {variant:22s} ERROR rc={proc.returncode}", flush=True)
                _save(results, out_path)
                continue
            run = json.loads(lines[-1])
            run["wall_s"] = time.perf_counter() - t0
            if run.get("skipped"):
                results["skipped"].append(f"{model_name}:{variant}: {run['skipped']}")
                print(f"{model_name:10s} {variant:22s} skipped: {run['skipped']}", flush=True)
                _save(results, out_path)
                continue
            results["runs"].append(run)
            run.setdefault("ms_median", float("nan"))
            run.setdefault("peak_bytes", 0)
            print(f"{model_name:10s} {variant:22s} {run['ms_median']:9.2f} ms  weights {run['weight_bytes']/2**20:8.1f}"
                  f" MiB  peak {run['peak_bytes']/2**30:6.2f} GiB  ready {run['ready_s']:6.1f} s"
                  f"  err {run['rel_err_vs_bf16']:.4f}", flush=True)
            if run.get("profile_ms"):
                print("   profile (ms):", {k: round(v, 2) for k, v in run["profile_ms"].items()}, flush=True)
            if run.get("attention"):
                print("   attention:", run["attention"], flush=True)
            _save(results, out_path)
    _save(results, out_path)
    for e in results["errors"]:
        print("ERROR", e[:1500])
    return results


def _save(results: dict, out_path: str) -> None:
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="pixart,cogvideox")
    parser.add_argument("--variants", default="bf16_eager,bf16_compile,w8a8,w4a8", help="comma list, or 'all'")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per (model, variant) subprocess")
    parser.add_argument("--variant-timeout", action="append", default=[], metavar="VARIANT=S",
                        help="per-variant timeout override, e.g. torchao_fp8_compile=150 (repeatable)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds from the start by which every run must have ended (timeouts are cut to fit)")
    parser.add_argument("--min-kv-tokens", type=int, default=None,
                        help="_attn variants: attention over fewer keys stays on SDPA (default: viditq's 512)")
    parser.add_argument("--out", default="e2e.json")
    parser.add_argument("--one", help="model:variant, run in this process, print JSON")
    parser.add_argument("--tiny", action="store_true", help="tiny models (smoke test of this script)")
    args = parser.parse_args()
    if args.one:
        model_name, variant = args.one.split(":")
        print(json.dumps(run_one(model_name, variant, args.iters, args.tiny, args.min_kv_tokens)))
        return
    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    for v in variants:
        parse_variant(v)
    timeouts = {k: float(v) for k, v in (item.split("=") for item in args.variant_timeout)}
    run_all(args.models.split(","), variants, args.iters, args.timeout, args.out, args.tiny, args.min_kv_tokens,
            timeouts, args.deadline)


if __name__ == "__main__":
    main()
