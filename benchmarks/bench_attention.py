"""8-bit attention vs bf16 SDPA (flash backend) on the GPU: correctness at real shapes, speed, a tile sweep.

    PYTHONUNBUFFERED=1 python benchmarks/bench_attention.py --out $OUT/attention.json [--sweep]

Shapes: CogVideoX-2B (2, 30, 17776, 64) self-attention (226 text + 17550 video tokens); PixArt-α 1024
(2, 16, 4096, 72) self-attention and cross-attention to 120 text tokens (with a key-padding mask: 30 of the
120 tokens padded). Data: Gaussian with outlier channels in Q and K and a large common K mean (the statistics
that make K smoothing and channel balancing matter). Times: median of CUDA events (triton.testing.do_bench) after
warm-up; quality vs float32 attention on the first ``--ref-rows`` queries of each batch/head.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from viditq.kernels import attention as KA
from viditq.testing import capture_sdpa_inputs

START = time.time()
SHAPES = {
    # name: (B, H, Nq, Nkv, D, masked text tokens)
    "cogvideox_self": (2, 30, 17776, 17776, 64, 0),
    "pixart_self": (2, 16, 4096, 4096, 72, 0),
    "pixart_cross": (2, 16, 4096, 120, 72, 30),
    "wan_self": (2, 12, 32760, 32760, 128, 0),  # Wan2.1-T2V-1.3B, 81 frames 480x832
}
TILES = {  # (block_m, block_n, num_warps, num_stages[, max_registers]) tried per shape
    # (CogVideoX's 2-stage, 64 x 64 and 128 x 64 / 4-warp tiles: 6-12 % slower in the H100 sweep, dropped; 4 stages
    # no faster than 3 in sessions 16-19)
    "cogvideox_self": [(64, 128, 4, 3, 128), (64, 128, 4, 3), (128, 64, 8, 3)],
    "pixart_self": [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3)],
    "pixart_cross": [(128, 64, 8, 3), (64, 64, 4, 3)],
    # head dim 128 (sm_90a, Triton 3.6): 64 x 128 171 registers (2 programs per SM), 64 x 64 130 (3 programs),
    # 128 x 128 / 8 warps 178 and 128 x 64 / 8 warps 130 (1 program); 64 x 128 capped at 168: 3 programs, the wgmma
    # serialized (as CogVideoX's capped tile, which the fourth program per SM still made faster)
    "wan_self": [(64, 128, 4, 3), (64, 128, 4, 3, 168), (64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3)],
}


def make_inputs(b, h, n_q, n_kv, d, n_masked, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    q = randn(b, h, n_q, d) * 1.5
    k = randn(b, h, n_kv, d) + 2.0 * randn(1, h, 1, d)  # large common mean over tokens
    v = randn(b, h, n_kv, d)
    q[..., :2] *= 6.0  # outlier channels
    k[..., 5] *= 4.0
    mask = None
    if n_masked:
        mask = torch.ones(b, 1, 1, n_kv, dtype=torch.bool, device=device)
        mask[..., n_kv - n_masked:] = False
    return q.bfloat16(), k.bfloat16(), v.bfloat16(), mask


def metrics(out, ref):
    out, ref = out.double().flatten(), ref.double().flatten()
    return {"cos": float(out @ ref / (out.norm() * ref.norm())), "rel_l2": float((out - ref).norm() / ref.norm()),
            "finite": bool(torch.isfinite(out).all())}


def bias_of(mask, b, h, n_kv):
    if mask is None:
        return None
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf")).expand(b, h, 1, n_kv)[:, :, 0]


def sdpa_bf16(q, k, v, mask):
    backend = SDPBackend.FLASH_ATTENTION if mask is None else SDPBackend.EFFICIENT_ATTENTION
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def check_quality(name, q, k, v, mask, ref_rows):
    b, h, n_q, d = q.shape
    rows = slice(0, min(ref_rows, n_q))
    ref = F.scaled_dot_product_attention(q[:, :, rows].float(), k.float(), v.float(), attn_mask=mask)
    res = {"sdpa_bf16": metrics(sdpa_bf16(q, k, v, mask)[:, :, rows], ref)}
    bias = bias_of(mask, b, h, k.shape[2])
    for mode in KA.MODES:
        out = KA.quantized_attention_triton(q, k, v, mode, bias=bias)
        res[mode] = metrics(out[:, :, rows], ref)
        res[mode]["all_rows_finite"] = bool(torch.isfinite(out).all())
        if n_q * k.shape[2] <= 4096 * 4096:  # reference at full size where memory allows
            res[mode]["vs_reference"] = metrics(out, KA.quantized_attention_reference(q, k, v, mode, bias=bias))
    return res


def bench(fn):
    return do_bench(fn, warmup=30, rep=200, return_mode="median")


def graph_bench(fn):
    """Median of CUDA-graph replays of ``fn``: its device time without the host's launch cost (what a
    CUDA-graph forward pays)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def config_key(mode, cfg, kernel=""):
    regs = f"_r{cfg.max_registers}" if cfg.max_registers else ""
    tile = f"{mode}_m{cfg.block_m}_n{cfg.block_n}_w{cfg.num_warps}_s{cfg.num_stages}{regs}"
    return f"{tile}_{kernel}" if kernel else tile


WS_KERNELS = ("tl", "ws", "ws_pingpong")  # the fp8 tiles the Gluon kernel takes run on each of these


@contextlib.contextmanager
def fp8_kernel(kernel: str):
    """The tl kernel or the Gluon one (kernels/ws_attention.py, plain or ping-pong order) for the fp8 mode."""
    old = os.environ.get("VIDITQ_WS_ATTENTION"), KA.ws_attention.PINGPONG
    os.environ["VIDITQ_WS_ATTENTION"] = "0" if kernel == "tl" else "1"
    KA.ws_attention.PINGPONG = kernel == "ws_pingpong"
    try:
        yield
    finally:
        KA.ws_attention.PINGPONG = old[1]
        if old[0] is None:
            del os.environ["VIDITQ_WS_ATTENTION"]
        else:
            os.environ["VIDITQ_WS_ATTENTION"] = old[0]


def time_config(q, k, v, bias, mode, cfg, flops, sdpa_ms):
    """Total (prep + kernel), kernel-only and prep-only medians for one tile config."""
    b, h, n_q, d = q.shape
    try:
        total = bench(lambda: KA.quantized_attention_triton(q, k, v, mode, bias=bias, config=cfg))
        ops = KA.quantize_operands(q, k, v, mode, d ** -0.5, bias, cfg)
        out = torch.empty((b, n_q, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
        kernel = bench(lambda: KA.attention_from_operands(ops, out, k.shape[2], cfg))
        prep = bench(lambda: KA.quantize_operands(q, k, v, mode, d ** -0.5, bias, cfg))
        prep_graph = graph_bench(lambda: KA.quantize_operands(q, k, v, mode, d ** -0.5, bias, cfg))
        v_stats = v if mode == "fp8" else None
        stats = graph_bench(lambda: KA.attention_stats(q, k, v_stats, KA.padded_head_dim(d)))
        stats_torch = graph_bench(lambda: KA.attention_stats_reference(q, k, v_stats))
    except Exception as e:  # a tile shape that does not compile (shared memory, registers) is skipped
        return {"error": repr(e)[:300]}
    return {"total_ms": total, "kernel_ms": kernel, "prep_ms": prep, "prep_graph_ms": prep_graph,
            "stats_graph_ms": stats, "stats_torch_graph_ms": stats_torch, "speedup_vs_sdpa": sdpa_ms / total,
            "kernel_tflops": flops / kernel / 1e9}


def time_shape(name, q, k, v, mask, configs):
    """SDPA (flash, default backend, cuDNN), then every tile config."""
    b, h, n_q, d = q.shape
    n_kv = k.shape[2]
    flops = 4.0 * b * h * n_q * n_kv * d
    bias = bias_of(mask, b, h, n_kv)
    res = {"shape": [b, h, n_q, n_kv, d], "flop": flops, "sdpa_bf16_ms": bench(lambda: sdpa_bf16(q, k, v, mask))}
    res["sdpa_bf16_tflops"] = flops / res["sdpa_bf16_ms"] / 1e9
    res["sdpa_default_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            res["sdpa_cudnn_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    except RuntimeError as e:
        res["sdpa_cudnn_ms"] = repr(e)[:200]
    res["configs"] = {}
    for mode in KA.MODES:
        timed = {}
        for cfg in configs:
            ws = KA.ws_attention
            if ws is not None and mode == "fp8" and bias is None and cfg.block_m == ws.BLOCK_M:
                for kernel in WS_KERNELS:
                    with fp8_kernel(kernel):
                        timed[cfg, kernel] = time_config(q, k, v, bias, mode, cfg, flops, res["sdpa_bf16_ms"])
            else:
                timed[cfg, ""] = time_config(q, k, v, bias, mode, cfg, flops, res["sdpa_bf16_ms"])
        for c, r in timed.items():
            res["configs"][config_key(mode, *c)] = r
        ok = [c for c in timed if "total_ms" in timed[c]]
        if ok:
            best = min(ok, key=lambda c: timed[c]["total_ms"])
            res[f"best_{mode}"] = {"config": config_key(mode, *best), **timed[best]}
        print(f"  {name} {mode} (total / kernel / prep in a graph / stats vs torch stats, ms): " + ", ".join(
            f"{config_key(mode, *c)} {r.get('total_ms', float('nan')):.3f} / {r.get('kernel_ms', float('nan')):.3f}"
            f" / {r.get('prep_graph_ms', float('nan')):.3f} / {r.get('stats_graph_ms', float('nan')):.3f} vs "
            f"{r.get('stats_torch_graph_ms', float('nan')):.3f}" for c, r in timed.items()), flush=True)
    return res


def model_checks(device="cuda", compile_model=True):
    """Tiny random-weight diffusers models in bf16: 8-bit attention vs the model's own, eager and compiled."""
    from viditq.attention import apply_quantized_attention
    from viditq.testing import tiny_inputs, tiny_model

    res = {}
    for name in ("pixart", "cogvideox", "latte", "wan"):
        model = tiny_model(name).to(device, torch.bfloat16)
        kw = {k_: (v_.to(device, torch.bfloat16) if torch.is_tensor(v_) and v_.is_floating_point() else
                   v_.to(device) if torch.is_tensor(v_) else v_) for k_, v_ in tiny_inputs(name).items()}
        if name == "pixart":  # text padding mask: the cross-attention key-padding path
            mask = torch.ones(kw["encoder_hidden_states"].shape[:2], device=device)
            mask[:, -3:] = 0
            kw["encoder_attention_mask"] = mask
        with torch.no_grad():
            ref = model(**kw).sample.float()
            res[name] = {}
            for mode in KA.MODES:
                n = apply_quantized_attention(model, mode, min_kv_tokens=0)  # tiny: every call has < 512 keys
                out = model(**kw).sample.float()
                res[name][mode] = {"converted": n, **metrics(out, ref)}
                if compile_model and name in ("cogvideox", "wan"):  # compile time: the two that matter most
                    torch._dynamo.reset()
                    out_c = torch.compile(model)(**kw).sample.float()
                    res[name][mode]["compiled_vs_eager"] = metrics(out_c, out)
            apply_quantized_attention(model, "bf16")
        print(name, json.dumps(res[name]), flush=True)
    return res


def build_model(name, device="cuda", tiny=False):
    """Random-weight diffusers transformer in bf16 + forward kwargs: CogVideoX-2B (49 frames 480x720, 226 text
    tokens) or PixArt-α 1024 (120 text tokens, the last 100 padded). ``tiny``: 1 layer, small latents (CPU check)."""
    import diffusers

    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16)

    with torch.device(device):
        if name == "cogvideox_2b":
            extra = dict(num_layers=1, sample_width=8, sample_height=8, sample_frames=5) if tiny else {}
            model = diffusers.CogVideoXTransformer3DModel(**extra)
            frames, h, w = (2, 8, 8) if tiny else (13, 60, 90)
            kwargs = dict(hidden_states=randn(2, frames, 16, h, w), encoder_hidden_states=randn(2, 226, 4096),
                          timestep=torch.tensor([500, 500], device=device))
        elif name == "pixart_1024":
            model = diffusers.PixArtTransformer2DModel(sample_size=128, caption_channels=4096,
                                                       **(dict(num_layers=1) if tiny else {}))
            size = 16 if tiny else 128
            mask = torch.zeros(2, 120, device=device)
            mask[:, :20] = 1
            kwargs = dict(hidden_states=randn(2, 4, size, size), encoder_hidden_states=randn(2, 120, 4096),
                          encoder_attention_mask=mask, timestep=torch.tensor([500, 500], device=device),
                          added_cond_kwargs={"resolution": torch.tensor([[1024.0, 1024.0]] * 2, device=device),
                                             "aspect_ratio": torch.tensor([[1.0]] * 2, device=device)})
        else:
            raise ValueError(f"unknown model {name!r}")
    return model.to(torch.bfloat16).eval(), kwargs


def time_forward(model, kwargs, reps):
    """Median forward time (ms) over ``reps`` runs after two warm-up runs, CUDA events."""
    times = []
    with torch.no_grad():
        for i in range(reps + 2):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**kwargs)
            end.record()
            torch.cuda.synchronize()
            if i >= 2:
                times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def end_to_end(res, save, names=("pixart_1024", "cogvideox_2b"), compile_deadline_s=330.0, min_kv_tokens=None):
    """bf16 model with its own SDPA vs the same model with 8-bit attention, eager, then compiled while less than
    ``compile_deadline_s`` have passed since the script started. Fills ``res`` and calls ``save`` per model.
    Attention over fewer than ``min_kv_tokens`` keys (default ``viditq.attention.MIN_KV_TOKENS``) stays on SDPA."""
    from viditq.attention import MIN_KV_TOKENS, apply_quantized_attention, attention_call_counts

    min_kv_tokens = MIN_KV_TOKENS if min_kv_tokens is None else min_kv_tokens

    for name in names:
        model, kwargs = build_model(name)
        reps = 5 if name.startswith("cogvideox") else 20
        entry = {}
        with torch.no_grad():
            ref = model(**kwargs).sample.float()
        for mode in ("bf16",) + KA.MODES:
            apply_quantized_attention(model, mode, min_kv_tokens)
            with torch.no_grad():
                out = model(**kwargs).sample.float()
            calls = attention_call_counts(model)  # one forward's routing (before the timed runs)
            entry[mode] = {"eager_ms": time_forward(model, kwargs, reps), **metrics(out, ref),
                           "calls_per_forward": calls, "min_kv_tokens": min_kv_tokens}
        res[name] = entry
        save()
        for mode in ("bf16", "fp8"):
            if time.time() - START > compile_deadline_s:
                entry[mode]["compiled_ms"] = "skipped: time"
                continue
            apply_quantized_attention(model, mode, min_kv_tokens)
            torch._dynamo.reset()
            compiled = torch.compile(model)
            entry[mode]["compiled_ms"] = time_forward(compiled, kwargs, reps)
        apply_quantized_attention(model, "bf16")
        for mode in KA.MODES:
            entry[mode]["eager_speedup"] = entry["bf16"]["eager_ms"] / entry[mode]["eager_ms"]
        if all(isinstance(entry[m].get("compiled_ms"), float) for m in ("bf16", "fp8")):
            entry["fp8"]["compiled_speedup"] = entry["bf16"]["compiled_ms"] / entry["fp8"]["compiled_ms"]
        save()
        print(name, json.dumps(entry), flush=True)
        del model
        torch.cuda.empty_cache()


def activation_quality(which):
    """8-bit attention (the PyTorch reference, bit-for-bit the kernel's numerics up to P rounding order) vs exact
    attention on q/k/v captured from a model: "cogvideox" = random-weight CogVideoX-2B-width blocks (30 heads x
    64, LayerNorm'd Q/K, 226 text + 660 video tokens, 2 layers), "t2v" = the embedded T2V model (trained weights
    if shipped, else its random init)."""
    import diffusers

    from viditq.attention import _mask_to_key_bias

    torch.manual_seed(0)
    if which == "cogvideox":
        model = diffusers.CogVideoXTransformer3DModel(num_layers=2, sample_frames=9, sample_height=30,
                                                      sample_width=44).eval()
        kwargs = dict(hidden_states=torch.randn(2, 3, 16, 30, 44), encoder_hidden_states=torch.randn(2, 226, 4096),
                      timestep=torch.tensor([500, 500]))
        source = "random-weight CogVideoX-2B blocks"
    else:
        from viditq import models

        try:
            pipe = models.load_t2v_pipeline()
            source = "embedded T2V (trained)"
        except (FileNotFoundError, OSError):
            pipe = models.new_pipeline("t2v")
            source = "embedded T2V architecture, random init (no shipped weights)"
        model = pipe.transformer.eval()
        # the pipeline's own layout and text encoder (Latte or CogVideoX weights alike)
        embeds, mask = pipe.encode_prompt(["a large red circle moving left fast on a black background",
                                           "a small blue square moving up slowly on a white background"], "cpu")
        kwargs = pipe.transformer_kwargs(torch.randn(pipe.sample_shape(2)), embeds, mask, torch.tensor([500.0, 500.0]))
    calls = capture_sdpa_inputs(model, kwargs)
    res = {"source": source, "calls": []}
    for q, k, v, mask in calls:
        b, h, n_q, _ = q.shape
        bias = _mask_to_key_bias(mask, b, h, n_q, k.shape[2]) if mask is not None else None
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
        entry = {"shape": list(q.shape), "n_kv": k.shape[2]}
        for mode in KA.MODES:
            out = KA.quantized_attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), mode, bias=bias)
            entry[mode] = metrics(out, exact)
        entry["bf16_sdpa"] = metrics(F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(),
                                                                    attn_mask=mask), exact)
        res["calls"].append(entry)
    for mode in KA.MODES + ("bf16_sdpa",):
        res[f"min_cos_{mode}"] = min(c[mode]["cos"] for c in res["calls"])
        res[f"max_rel_l2_{mode}"] = max(c[mode]["rel_l2"] for c in res["calls"])
    return res


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="attention.json")
    parser.add_argument("--sweep", action="store_true", help="time the tiles in TILES (default: default_config)")
    parser.add_argument("--ref-rows", type=int, default=1024)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--models", action="store_true", help="check tiny diffusers models (needs diffusers)")
    parser.add_argument("--e2e", action="store_true", help="CogVideoX-2B / PixArt-α forward, attention bf16 vs 8-bit")
    parser.add_argument("--min-kv-tokens", type=int, default=None,
                        help="--e2e: attention over fewer keys stays on SDPA (default viditq.attention.MIN_KV_TOKENS)")
    parser.add_argument("--activations", default="", help="CPU: comma list of cogvideox,t2v (see activation_quality)")
    args = parser.parse_args()
    if args.activations:
        result = {name: activation_quality(name) for name in args.activations.split(",")}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        for name, r in result.items():
            print(name, r["source"], {k: round(v, 5) for k, v in r.items() if k.startswith(("min_", "max_"))})
        return
    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "sm_count": props.multi_processor_count, "torch": torch.__version__,
              "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "shapes": {}}
    print(result["device"], result["torch"], result["triton"], flush=True)
    for name in filter(None, args.shapes.split(",")):
        b, h, n_q, n_kv, d, n_masked = SHAPES[name]
        q, k, v, mask = make_inputs(b, h, n_q, n_kv, d, n_masked)
        head_d = KA.padded_head_dim(d)
        configs = ([KA.AttentionConfig(*t) for t in TILES[name]] if args.sweep
                   else [KA.default_config(head_d, "fp8", n_kv)])
        t0 = time.time()
        entry = {"quality": check_quality(name, q, k, v, mask, args.ref_rows)}
        entry.update(time_shape(name, q, k, v, mask, configs))
        entry["seconds"] = time.time() - t0
        result["shapes"][name] = entry
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"{name}: {json.dumps(entry['quality'])}", flush=True)
    if args.models:
        result["models"] = model_checks()
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.e2e:
        result["end_to_end"] = {}
        end_to_end(result["end_to_end"], save, min_kv_tokens=args.min_kv_tokens)
    for name, e in result["shapes"].items():
        print(f"{name}: sdpa flash {e['sdpa_bf16_ms']:.3f} ms, default {e['sdpa_default_ms']:.3f} ms, "
              f"cudnn {e['sdpa_cudnn_ms']}")
    print(f"\n{'shape':16s} {'sdpa ms':>8s} {'mode':5s} {'best config':26s} {'total':>7s} {'kernel':>7s} "
          f"{'prep':>6s} {'x sdpa':>6s} {'cos':>8s}")
    for name, e in result["shapes"].items():
        for mode in KA.MODES:
            best = e.get(f"best_{mode}")
            if best:
                print(f"{name:16s} {e['sdpa_bf16_ms']:8.3f} {mode:5s} {best['config']:26s} {best['total_ms']:7.3f} "
                      f"{best['kernel_ms']:7.3f} {best['prep_ms']:6.3f} {best['speedup_vs_sdpa']:6.2f} "
                      f"{e['quality'][mode]['cos']:8.5f}")


if __name__ == "__main__":
    main()
