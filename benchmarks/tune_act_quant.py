"""Fused activation quantization on one GPU: correctness at DiT shapes, the default launch shapes, a launch-shape
sweep, and the W8A8 PixArt layer set (quantization + GEMM, q/k/v quantized once vs three times).

(The call-3 run also timed the previous "v3" kernel, `git show f0842b0^:src/viditq/kernels/act_quant.py`;
its numbers are in ``results/act_quant_h100_2026-11-25.json`` and NOTES.md.)

    python benchmarks/tune_act_quant.py --out "$OUT/act_quant.json" [--budget-s 230]

Times are medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``). Each timed call walks enough
distinct input buffers that the inputs do not sit in L2 (50 MB on H100); the time per quantization is the graph
time divided by the number of buffers. All kernels of the sweep are compiled first, in parallel worker processes
that fill Triton's disk cache. Prints a short table last; writes every number to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

SHAPES = [(8192, 1152), (8192, 4608), (35552, 1920), (35552, 7680)]
# rot*: one Hadamard rotation of the whole width (H_m ⊗ H_p); brot*: block rotation, runs of BLOCK channels
# (the default since session 3); *_smooth: with smoothing, what ViDiT-Q's balanced layers run.
VARIANTS = ("plain", "smooth", "rot", "rot_smooth", "brot", "brot_smooth")
BLOCK = 128
SWEEP_VARIANTS = ("brot_smooth",)  # "smooth" and "rot_smooth" were swept in session 2 (TUNED_CONFIGS)
T0 = time.time()


def sweep_configs(k: int, variant: str):
    from viditq.kernels.act_quant import ActQuantConfig as C

    rotated = variant.startswith("rot")
    if variant.startswith("brot"):
        return [C(1, 4), C(1, 8), C(2, 8), C(4, 4), C(4, 8), C(1, 8, True, 4), C(4, 4, True, 4), C(1, 16)]
    if rotated:
        if k in (1152, 1920):  # row tile 64 x 32
            return [C(1, 4), C(2, 4), C(2, 8), C(4, 8), C(8, 8), C(4, 8, True, 2), C(2, 4, True, 8), C(4, 4)]
        return [C(1, 4), C(1, 8), C(2, 8), C(1, 16), C(1, 8, True, 2), C(1, 4, True, 4), C(2, 16)]
    if k == 1152:
        return [C(2, 4), C(4, 4), C(4, 8), C(8, 8), C(16, 8), C(4, 8, True, 4), C(8, 8, True, 2), C(2, 2),
                C(4, 4, True, 8, 3), C(8, 8, True, 4, 3), C(2, 2, True, 16, 2), C(1, 1)]
    if k in (4608, 1920):
        return [C(1, 4), C(1, 8), C(2, 8), C(2, 4), C(4, 8), C(2, 8, True, 4), C(1, 8, True, 8), C(1, 2),
                C(1, 4, True, 8, 3), C(2, 4, True, 8, 3), C(1, 2, True, 16, 2), C(4, 8, True, 2, 3)]
    return [C(1, 8), C(1, 16), C(2, 16), C(1, 4), C(1, 8, True, 4), C(2, 8), C(1, 8, True, 4, 3),
            C(1, 16, True, 2, 2), C(1, 4, True, 8, 2)]


def make_inputs(m, k, variant, n_buf, seed=0):
    from viditq.quant.hadamard import hadamard_factors, random_signs

    g = torch.Generator(device="cuda").manual_seed(seed + m + k)
    xs = []
    for _ in range(n_buf):
        x = torch.randn(m, k, device="cuda", generator=g)
        x[:, :: max(1, k // 7)] *= 30  # outlier channels
        xs.append(x.to(torch.bfloat16))
    smooth = (torch.rand(k, device="cuda", generator=g) + 0.5) if "smooth" in variant else None
    rotated = "rot" in variant
    signs = random_signs(k, seed=k).cuda() if rotated else None
    block = BLOCK if variant.startswith("brot") else 0
    return xs, (smooth, signs, 1 if block or not rotated else hadamard_factors(k)[0], block)


def _compile_job(job):
    """Worker: run one (version, K, variant, config) at M = 4096 so the kernel lands in Triton's disk cache."""
    version, k, variant, cfg = job
    try:
        xs, bal = make_inputs(4096, k, variant, 1)  # M specializes like the real shapes
        from viditq.kernels import act_quant

        act_quant.quantize_activation(xs[0], 8, *bal, config=cfg)  # cfg None: the default launch
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{version} K={k} {variant} {cfg}: {type(e).__name__}: {str(e)[:300]}"


def precompile(jobs, workers):
    t = time.time()
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        errors = [e for e in pool.map(_compile_job, jobs) if e]
    print(f"precompiled {len(jobs)} kernels in {time.time() - t:.0f} s ({len(errors)} failed)", flush=True)
    for e in errors:
        print("  COMPILE FAIL", e, flush=True)
    return errors


def bench_graph(fn, n_buf) -> float:
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=40, return_mode="median") / n_buf


def check(m, k, variant, quant, ref_fn):
    """Codes / scales of ``quant`` vs the PyTorch reference on fresh inputs, every element compared."""
    xs, bal = make_inputs(m, k, variant, 1, seed=123)
    codes, scale = quant(xs[0], *bal)
    ref_codes, ref_scale = ref_fn(xs[0], 8, *bal)
    diff = (codes.int() - ref_codes.int()).abs()
    rel_scale = ((scale - ref_scale).abs() / ref_scale).max().item()
    return {"max_code_diff": diff.max().item(), "code_flip_rate": diff.float().mean().item(),
            "scale_max_rel": rel_scale, "finite": bool(torch.isfinite(scale).all())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=230.0)
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--sweep-variants", default=",".join(SWEEP_VARIANTS), help=f"comma list of {VARIANTS}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="variants timed at the default launch shape")
    args = ap.parse_args()
    sweep_variants, variants = args.sweep_variants.split(","), args.variants.split(",")

    import triton
    from viditq.kernels import act_quant, int_gemm, reference

    dev = torch.cuda.get_device_name()
    out = {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "correctness": {},
           "act_quant": {}, "sweep": {}, "layers": {}, "errors": []}
    print(dev, torch.__version__, triton.__version__, flush=True)

    # ---- compile everything first (parallel), then time
    jobs = []
    for m, k in SHAPES:
        for variant in variants:
            jobs.append(("v4", k, variant, None))
        for variant in sweep_variants:
            jobs += [("v4", k, variant, cfg) for cfg in sweep_configs(k, variant)]
    out["errors"] += precompile(jobs, args.workers)

    # ---- device copy ceiling
    a = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t_copy = bench_graph(lambda: b.copy_(a), 1)
    out["copy_tb_s"] = 2 * a.numel() / (t_copy * 1e-3) / 1e12
    del a, b
    print(f"D2D copy: {out['copy_tb_s']:.2f} TB/s", flush=True)

    v4 = lambda x, *bal: act_quant.quantize_activation(x, 8, *bal)  # noqa: E731

    # ---- correctness at the real shapes (default config), every variant
    for m, k in SHAPES:
        for variant in variants:
            key = f"{m}x{k}/{variant}"
            try:
                out["correctness"][key] = {"v4": check(m, k, variant, v4, reference.quantize_activation)}
            except Exception as e:  # noqa: BLE001
                out["errors"].append(f"check {key}: {type(e).__name__}: {str(e)[:300]}")
        torch.cuda.empty_cache()
    bad = {k: v for k, v in out["correctness"].items()
           if v["v4"]["max_code_diff"] > 1 or v["v4"]["code_flip_rate"] > 1e-3 or v["v4"]["scale_max_rel"] > 1e-4
           or not v["v4"]["finite"] or ("rot" not in k and v["v4"]["max_code_diff"] > 0)}  # noqa: E501
    print(f"correctness: {len(out['correctness'])} cases, {len(bad)} bad: {bad}", flush=True)

    # ---- default configs, every shape and variant
    for m, k in SHAPES:
        n_buf = max(1, math.ceil(160e6 / (m * k * 3)))
        for variant in variants:
            xs, bal = make_inputs(m, k, variant, n_buf)
            row = {}
            # "cast": PyTorch's elementwise bf16 -> int8 conversion, the same bytes in and out and no reduction
            # (a reference point, not a ceiling: 1.05-1.21 TB/s on the H200, session 14)
            fns = (("v4", v4),) + ((("cast", lambda x, *_: x.to(torch.int8)),) if variant == "plain" else ())
            for name, fn in fns:
                try:
                    t = bench_graph(lambda: [fn(x, *bal) for x in xs], n_buf)
                    row[name] = {"us": t * 1e3, "tb_s": m * k * 3 / (t * 1e-3) / 1e12}
                except Exception as e:  # noqa: BLE001
                    out["errors"].append(f"time {name} {m}x{k}/{variant}: {type(e).__name__}: {str(e)[:300]}")
            out["act_quant"][f"{m}x{k}/{variant}"] = row
            print(f"{m}x{k} {variant:10s} " + "  ".join(f"{n} {r['us']:8.1f} us {r['tb_s']:.2f} TB/s"
                                                       for n, r in row.items()), flush=True)
            del xs
        torch.cuda.empty_cache()

    # ---- launch-shape sweep, within the time budget
    for variant in sweep_variants:
        for m, k in SHAPES:
            if time.time() - T0 > args.budget_s - 25:  # 25 s kept for the layer set and the summary
                out["errors"].append(f"sweep stopped at {variant} {m}x{k}: time budget")
                break
            n_buf = max(1, math.ceil(160e6 / (m * k * 3)))
            xs, bal = make_inputs(m, k, variant, n_buf)
            res = []
            for cfg in sweep_configs(k, variant):
                try:
                    t = bench_graph(lambda: [act_quant.quantize_activation(x, 8, *bal, config=cfg) for x in xs], n_buf)
                    res.append((t * 1e3, cfg))
                except Exception as e:  # noqa: BLE001
                    out["errors"].append(f"sweep {variant} {m}x{k} {cfg}: {type(e).__name__}: {str(e)[:200]}")
            res.sort(key=lambda r: r[0])
            out["sweep"][f"{m}x{k}/{variant}"] = [
                {"us": us, "tb_s": m * k * 3 / (us * 1e-6) / 1e12, "block_m": c.block_m, "num_warps": c.num_warps,
                 "persistent": c.persistent, "programs_per_sm": c.programs_per_sm, "num_stages": c.num_stages}
                for us, c in res]
            if res:
                best = res[0]
                print(f"sweep {variant:10s} {m}x{k}: best {best[0]:.1f} us {best[1]}", flush=True)
            del xs
            torch.cuda.empty_cache()

    # ---- W8A8 PixArt layer set: q/k/v/o (block-rotated + smoothed, K = 1152), FF up (K = 1152), FF down (K = 4608)
    try:
        layer_set(out, act_quant, int_gemm)
    except Exception as e:  # noqa: BLE001
        out["errors"].append(f"layers: {type(e).__name__}: {str(e)[:300]}")

    out["wall_s"] = time.time() - T0
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    summary(out)


def layer_set(out, act_quant, int_gemm):
    from viditq.quant.hadamard import random_signs
    from viditq.quant.quantizers import quantize_weight

    m = 8192
    g = torch.Generator(device="cuda").manual_seed(5)

    def weight(n, k):
        qw = quantize_weight(torch.randn(n, k, device="cuda", generator=g) * k**-0.5, 8, True, None)
        return qw.codes, qw.scale.float()

    def bal(k):
        return (torch.rand(k, device="cuda", generator=g) + 0.5, random_signs(k, k).cuda(), 1, BLOCK)

    x1 = torch.randn(m, 1152, device="cuda", generator=g).to(torch.bfloat16)
    x2 = torch.randn(m, 4608, device="cuda", generator=g).to(torch.bfloat16)
    wq, wk, wv, wo = [weight(1152, 1152) for _ in range(4)]
    wup, wdown = weight(4608, 1152), weight(1152, 4608)
    b_qkv, b_o, b_up, b_down = bal(1152), bal(1152), bal(1152), bal(4608)
    bias = torch.randn(4608, device="cuda", generator=g).to(torch.bfloat16)

    def gemm(codes, scale, w):
        return int_gemm.quant_linear(codes, scale, w[0], w[1], None, codes.shape[1], False, bias[:w[0].shape[0]],
                                     torch.bfloat16)

    def run(q, shared):
        outs = []
        if shared:
            c, s = q(x1, *b_qkv)
            outs += [gemm(c, s, w) for w in (wq, wk, wv)]
        else:
            for w in (wq, wk, wv):
                c, s = q(x1, *b_qkv)
                outs.append(gemm(c, s, w))
        outs.append(gemm(*q(x1, *b_o), wo))
        outs.append(gemm(*q(x1, *b_up), wup))
        outs.append(gemm(*q(x2, *b_down), wdown))
        return outs

    def q4(x, *bal):
        return act_quant.quantize_activation(x, 8, *bal)

    # GEMMs alone (codes precomputed) and bf16 cuBLAS for scale
    c1, s1 = q4(x1, *b_qkv)
    c2, s2 = q4(x2, *b_down)
    t_gemm = bench_graph(lambda: [gemm(c1, s1, w) for w in (wq, wk, wv, wo, wup)] + [gemm(c2, s2, wdown)], 1)
    wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for n, k in
          [(1152, 1152)] * 4 + [(4608, 1152), (1152, 4608)]]
    t_bf16 = bench_graph(lambda: [torch.nn.functional.linear(x1, w) for w in wb[:5]] +
                         [torch.nn.functional.linear(x2, wb[5])], 1)
    res = {"bf16_cublas_us": t_bf16 * 1e3, "gemm_only_us": t_gemm * 1e3}
    for name, q, shared in (("v4_separate", q4, False), ("v4_shared_qkv", q4, True)):
        res[f"{name}_us"] = bench_graph(lambda: run(q, shared), 1) * 1e3
    # shared and separate give the same outputs (same codes)
    a, b = run(q4, True), run(q4, False)
    res["shared_equals_separate"] = all(torch.equal(u, v) for u, v in zip(a, b))
    res["per_28_blocks_ms"] = {k: v * 28 / 1e3 for k, v in res.items() if k.endswith("_us")}
    # QuantLinear with an input group under CUDA-graph capture: one quantization, same output as eager
    res["quantlinear_graph"] = quantlinear_graph_check()
    out["layers"] = res
    print("layers:", json.dumps(res), flush=True)


def quantlinear_graph_check():
    from torch import nn

    from viditq.layers import LayerSpec, QuantLinear, install_input_sharing
    from viditq.quant.hadamard import random_signs

    k = 1152
    spec = LayerSpec(k, k, True, 8, True, k, 8, smooth=True, rotate=True, rot_block=BLOCK, input_group="g")
    smooth, signs = torch.rand(k, device="cuda") + 0.5, random_signs(k, 3).cuda()
    mods = nn.ModuleList(QuantLinear.from_linear(nn.Linear(k, k, device="cuda", dtype=torch.bfloat16), spec,
                                                 smooth=smooth, rotation=signs) for _ in range(3))
    shared = install_input_sharing(mods)
    x = torch.randn(2, 4096, k, device="cuda", dtype=torch.bfloat16)
    eager = [m(x) for m in mods]
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        [m(static_x) for m in mods]
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [m(static_x) for m in mods]
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    for m in mods:
        m._input_cache = None
    separate = [m(x) for m in mods]
    return {"groups": shared, "graph_equals_eager": all(torch.equal(a, b) for a, b in zip(outs, eager)),
            "shared_equals_separate": all(torch.equal(a, b) for a, b in zip(eager, separate))}


def summary(out):
    print("\n=== act quant (us, TB/s; graph replay; " + out["device"] + f"; copy {out.get('copy_tb_s', 0):.2f} TB/s)")
    print(f"{'shape/variant':26s} {'v4 default':>16s} {'torch cast':>16s} {'v4 best sweep':>16s}")
    for key, row in out["act_quant"].items():
        best = out["sweep"].get(key, [{}])[0] if out["sweep"].get(key) else {}
        cells = [f"{row[n]['us']:7.1f} {row[n]['tb_s']:4.2f}" if n in row else "-" for n in ("v4", "cast")]
        cells.append(f"{best['us']:7.1f} {best['tb_s']:4.2f}" if best else "-")
        print(f"{key:26s} " + " ".join(f"{c:>16s}" for c in cells))
    for key, res in out["sweep"].items():
        if res:
            b = res[0]
            print(f"best {key}: block_m={b['block_m']} warps={b['num_warps']} persistent={b['persistent']} "
                  f"pps={b['programs_per_sm']}")
    lay = out.get("layers", {})
    if lay:
        print("layer set per block (us):", {k: round(v, 1) for k, v in lay.items() if k.endswith("_us")},
              "equal:", lay.get("shared_equals_separate"), lay.get("quantlinear_graph"))
    print("errors:", len(out["errors"]), out["errors"][:6])


if __name__ == "__main__":
    main()
