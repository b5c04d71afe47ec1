"""GEMM-level and activation-quantization benchmark on one GPU (run on an H100; see NOTES.md).

Tables (one run, same card): bf16 cuBLAS (F.linear), fp8 ``torch._scaled_mm`` row-wise, ``torch._int_mm``, ours
int8 / W4A8 (packed int4, g64, asymmetric, staged to per-channel int8; the staging alone too) / fp8 GEMM with the
fused epilogue, the full W8A8 layer (fused quantization + GEMM), q/k/v as one grouped launch
(``quant_linear_group``) against three cuBLAS launches and one on the concatenated weight, the gated-residual
epilogue (operands cycled through HBM: the shipped default, the tl kernel, the warp-specialized Gluon kernel's
stage counts), the fused quantization
alone (GB/s), a config sweep, and the device ceilings.

    python benchmarks/bench_gemm.py --out results.json [--sweep]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from viditq.kernels import act_quant, int_gemm, reference
from viditq.kernels.int_gemm import ws_gemm
from viditq.quant.hadamard import hadamard_factors, random_signs
from viditq.quant.quantizers import pack_int4, quantize_weight

# (M, N, K): PixArt-α 1024 (batch 2 x 4096 tokens, hidden 1152, FFN 4608); CogVideoX-2B (2 x 17776, 1920, 7680).
SHAPES = {
    "pixart_qkvo": (8192, 1152, 1152),
    "pixart_ff_up": (8192, 4608, 1152),
    "pixart_ff_down": (8192, 1152, 4608),
    "pixart_qkv_fused": (8192, 3456, 1152),  # q, k, v of one self-attention as one product
    "pixart_cross_kv": (240, 1152, 1152),  # cross-attention k or v over 2 x 120 text tokens
    "pixart_cross_kv_fused": (240, 2304, 1152),
    "cogvideox_qkvo": (35552, 1920, 1920),
    "cogvideox_ff_up": (35552, 7680, 1920),
    "cogvideox_ff_down": (35552, 1920, 7680),
    "square_8192": (8192, 8192, 8192),
}
INT8_SWEEP = [  # (BM, BN, BK, GROUP_M, warps, stages, persistent, tma); call-1 winners + variants for small K
    (128, 256, 128, 8, 8, 3, False, False), (256, 128, 128, 8, 8, 3, True, True), (128, 256, 128, 8, 8, 3, True, True),
    (256, 128, 128, 8, 8, 4, True, True), (256, 128, 64, 8, 8, 4, True, True), (128, 128, 128, 8, 4, 4, True, True),
    (256, 128, 128, 4, 8, 3, True, True), (128, 128, 128, 8, 8, 3, False, False),
]
FP8_SWEEP = [
    (128, 256, 128, 8, 8, 3, True, True), (256, 128, 128, 8, 8, 3, True, True), (128, 256, 128, 8, 8, 4, True, True),
    (128, 128, 128, 8, 4, 4, True, True), (128, 128, 128, 8, 8, 3, True, True), (128, 128, 128, 8, 4, 4, False, False),
]
RESIDUAL_SWEEP = [  # the gated residual epilogue needs shared memory for its tile: fewer stages or narrower tiles
    (128, 256, 128, 8, 8, 2, True, True), (256, 128, 128, 8, 8, 2, True, True), (128, 128, 128, 8, 8, 3, True, True),
    (128, 128, 128, 8, 8, 4, True, True), (128, 128, 128, 8, 4, 4, True, True), (128, 256, 64, 8, 8, 3, True, True),
]
TMA8 = int_gemm.GemmConfig(128, 256, 128, 8, 8, 3, True, True)
PTR8 = int_gemm.GemmConfig(128, 256, 128, 8, 8, 3)


def ms(fn) -> float:
    """Median device time per call, replayed from a CUDA graph: kernel time without Python launch overhead."""
    return do_bench_cudagraph(fn, rep=100, return_mode="median")


def ms_eager(fn) -> float:
    """Median time per call launched from Python (includes launch overhead when it exceeds the kernel time)."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def tflops(m, n, k, t_ms) -> float:
    return 2 * m * n * k / (t_ms * 1e-3) / 1e12


def first_call_s(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def make_operands(m, n, k):
    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(torch.bfloat16)
    bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
    a, a_scale = reference.quantize_activation(x, 8)
    q8 = quantize_weight(w, 8)
    q4 = quantize_weight(w, 4, symmetric=False, group_size=64)
    fp8_a, fp8_a_scale = reference.quantize_per_token_fp8(x)
    fp8_w, fp8_w_scale = reference.quantize_per_token_fp8(w)
    residual = torch.randn(m, n, device="cuda", generator=g).to(torch.bfloat16)
    gate = torch.randn(2, n, device="cuda", generator=g).to(torch.bfloat16)
    w4, w4_scale = pack_int4(q4.codes), q4.scale.half()
    return dict(x=x, w=w, bias=bias, a=a, a_scale=a_scale, w8=q8.codes, w8_scale=q8.scale,
                w4=w4, w4_scale=w4_scale, w4_zero=q4.zero,
                w4_stage=reference.int4_stage_scale(w4, w4_scale, q4.zero, 64),  # what QuantLinear stores
                w4_stage_fp8=reference.int4_stage_scale(w4, w4_scale, q4.zero, 64, fp8=True),
                fp8_a=fp8_a, fp8_a_scale=fp8_a_scale, fp8_w=fp8_w, fp8_w_scale=fp8_w_scale, residual=residual,
                gate=gate)


def gemm_fns(o, k, cfg=None, cfg8=None):
    """name → zero-arg callable for every GEMM variant on operands ``o``."""
    fp8_wt = o["fp8_w"].t()  # (K, N) column-major: the layout _scaled_mm wants
    w8t = o["w8"].t()
    signs = random_signs(k, 0).cuda()
    rot_m = hadamard_factors(k)[0]
    smooth_inv = torch.rand(k, device="cuda") + 0.5

    def layer_w8a8():
        a, s = act_quant.quantize_activation(o["x"], 8, smooth_inv, signs, rot_m)
        return int_gemm.quant_linear(a, s, o["w8"], o["w8_scale"], None, k, False, o["bias"], torch.bfloat16, cfg)

    def layer_w8a8_plain():
        a, s = act_quant.quantize_activation(o["x"], 8, smooth_inv)
        return int_gemm.quant_linear(a, s, o["w8"], o["w8_scale"], None, k, False, o["bias"], torch.bfloat16, cfg)

    def layer_w4a8():
        a, s = act_quant.quantize_activation(o["x"], 8, smooth_inv, signs, rot_m)
        return int_gemm.quant_linear(a, s, o["w4"], o["w4_scale"], o["w4_zero"], 64, True, o["bias"],
                                     torch.bfloat16, cfg, stage_scale=o["w4_stage"])

    def layer_w4a8_fp8():
        a, s = act_quant.quantize_activation(o["x"], 8, smooth_inv, fp8=True)
        return int_gemm.quant_linear(a, s, o["w4"], o["w4_scale"], o["w4_zero"], 64, True, o["bias"],
                                     torch.bfloat16, cfg8, stage_scale=o["w4_stage_fp8"])

    def w4(fp8, stage_only=False):
        a, a_scale = (o["fp8_a"], o["fp8_a_scale"]) if fp8 else (o["a"], o["a_scale"])
        stage = o["w4_stage_fp8" if fp8 else "w4_stage"]
        if stage_only:
            return lambda: int_gemm.stage_int4(o["w4"], o["w4_scale"], o["w4_zero"], 64, stage, fp8)
        return lambda: int_gemm.quant_linear(a, a_scale, o["w4"], o["w4_scale"], o["w4_zero"], 64, True, o["bias"],
                                             torch.bfloat16, cfg8 if fp8 else cfg, stage_scale=stage)

    return {
        "bf16_cublas": lambda: F.linear(o["x"], o["w"], o["bias"]),
        "fp8_scaled_mm_rowwise": lambda: torch._scaled_mm(
            o["fp8_a"], fp8_wt, scale_a=o["fp8_a_scale"], scale_b=o["fp8_w_scale"].reshape(1, -1),
            bias=o["bias"], out_dtype=torch.bfloat16),  # (session-2 runs left the bias out: rel. error 0.70)
        "int8_torch_int_mm": lambda: torch._int_mm(o["a"], w8t),
        "ours_int8": lambda: int_gemm.quant_linear(o["a"], o["a_scale"], o["w8"], o["w8_scale"], None, k, False,
                                                   o["bias"], torch.bfloat16, cfg),
        "ours_int8_pointer": lambda: int_gemm.quant_linear(o["a"], o["a_scale"], o["w8"], o["w8_scale"], None, k,
                                                           False, o["bias"], torch.bfloat16, PTR8),
        "ours_w4a8_g64": w4(False),
        "ours_fp8": lambda: int_gemm.quant_linear(o["fp8_a"], o["fp8_a_scale"], o["fp8_w"], o["fp8_w_scale"], None,
                                                  k, False, o["bias"], torch.bfloat16, cfg8),
        "ours_w4a8_fp8_g64": w4(True),
        "ours_w4a8_stage_only": w4(False, stage_only=True),
        "ours_w4a8_fp8_stage_only": w4(True, stage_only=True),
        "ours_w8a8_layer_rot": layer_w8a8,
        "ours_w8a8_layer_smooth_only": layer_w8a8_plain,
        "ours_w4a8_layer_rot": layer_w4a8,
        "ours_w4a8_fp8_layer_smooth_only": layer_w4a8_fp8,
    }


def check(name, y, o, k):
    """Relative error of a variant's output against the bf16 product (sanity: the benchmark times real work)."""
    ref = F.linear(o["x"], o["w"], o["bias"]).float()
    return ((y.float() - ref).norm() / ref.norm()).item()


def bench_gemms(results):
    for shape_name, (m, n, k) in SHAPES.items():
        o = make_operands(m, n, k)
        for name, fn in gemm_fns(o, k).items():
            try:
                compile_s = first_call_s(fn)
                err = None if name.startswith(("int8_torch", "ours_w8a8_layer", "ours_w4a8_layer",
                                               "ours_w4a8_fp8_layer")) or "stage_only" in name else \
                    check(name, fn(), o, k)
                t = ms(fn)
                t_eager = ms_eager(fn)
            except Exception as e:  # noqa: BLE001 — one failing baseline must not lose the table
                results["errors"].append(f"{shape_name}/{name}: {type(e).__name__}: {e}"[:300])
                continue
            row = dict(shape=shape_name, m=m, n=n, k=k, method=name, ms=t, ms_eager=t_eager,
                       tflops=tflops(m, n, k, t), rel_err_vs_bf16=err, first_call_s=compile_s)
            if "stage_only" in name:  # memory-bound: packed int4 + group scales and zeros read, 8-bit codes written
                row["gbps"] = (n * k // 2 + n * (k // 64) * 3 + n * k) / (t * 1e-3) / 1e9
            results["gemm"].append(row)
        del o
        torch.cuda.empty_cache()


GROUP_SHAPES = {"pixart_qkv": (8192, 1152, 1152), "cogvideox_qkv": (35552, 1920, 1920)}  # (M, N per weight, K)
GROUP_CONFIGS = [None, (256, 128, 128, 8, 8, 3, True, True)]  # None: the default (the Gluon kernel at few waves on
# sm_90); a config: the tl kernel (this one its default; session 16 swept the others)


def bench_group(results):
    """q, k and v of one self-attention: three products of one input — bf16 cuBLAS three launches and one on the
    concatenated weight (diffusers' ``fuse_qkv_projections``), ours three launches and ``quant_linear_group``."""
    for shape_name, (m, n, k) in GROUP_SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(m + n)
        x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        ws = [(torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(torch.bfloat16) for _ in range(3)]
        bs = [torch.randn(n, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3)]
        w_cat, b_cat = torch.cat(ws), torch.cat(bs)
        fp8_a, fp8_s = reference.quantize_per_token_fp8(x)
        a8, s8 = reference.quantize_activation(x, 8)
        fp8_w = [reference.quantize_per_token_fp8(w) for w in ws]
        int8_w = [(q.codes, q.scale) for q in (quantize_weight(w, 8) for w in ws)]
        ref = [F.linear(x, w, b).float() for w, b in zip(ws, bs)]
        fns = {
            "bf16_cublas_x3": lambda: [F.linear(x, w, b) for w, b in zip(ws, bs)],
            "bf16_cublas_concat": lambda: F.linear(x, w_cat, b_cat).split(n, dim=1),
            "ours_fp8_x3": lambda: [int_gemm.quant_linear(fp8_a, fp8_s, w, s, None, k, False, b, torch.bfloat16)
                                    for (w, s), b in zip(fp8_w, bs)],
            "ours_int8_x3": lambda: [int_gemm.quant_linear(a8, s8, w, s, None, k, False, b, torch.bfloat16)
                                     for (w, s), b in zip(int8_w, bs)],
        }
        for c in GROUP_CONFIGS:
            cfg = int_gemm.GemmConfig(*c) if c else None
            tag = "default" if c is None else "x".join(map(str, c[:3])) + f"w{c[4]}s{c[5]}"
            fns[f"ours_fp8_group_{tag}"] = lambda cfg=cfg: int_gemm.quant_linear_group(
                fp8_a, fp8_s, [(w, s, b) for (w, s), b in zip(fp8_w, bs)], torch.bfloat16, cfg)
            fns[f"ours_int8_group_{tag}"] = lambda cfg=cfg: int_gemm.quant_linear_group(
                a8, s8, [(w, s, b) for (w, s), b in zip(int8_w, bs)], torch.bfloat16, cfg)
        for name, fn in fns.items():
            try:
                ys = fn()
                err = max(((y.float() - r).norm() / r.norm()).item() for y, r in zip(ys, ref))
                t = ms(fn)
            except Exception as e:  # noqa: BLE001
                results["errors"].append(f"group {shape_name}/{name}: {type(e).__name__}: {e}"[:300])
                continue
            results["group"].append(dict(shape=shape_name, m=m, n=n, k=k, method=name, ms=t,
                                         tflops=tflops(m, 3 * n, k, t), rel_err_vs_bf16=err))
        torch.cuda.empty_cache()


RESIDUAL_SHAPES = ["pixart_qkvo", "pixart_ff_down", "pixart_ff_up", "cogvideox_qkvo"]
RESIDUAL_COPIES = 4  # operand buffers cycled in each timed call: the residual and the output go through HBM, not L2


def _residual_methods(m, n, k, residual):
    """GEMM variants of the residual table, fp8 unless named int8: name → fn(operand set) (``default``: what
    ``quant_linear`` dispatches to — the warp-specialized Gluon kernel on sm_90 at few waves; ``tl_default``: the tl
    kernel's default tile)."""
    extra = (lambda o: dict(residual=o["residual"], gate=o["gate"])) if residual else (lambda o: {})

    def ours(cfg=None):
        return lambda o: int_gemm.quant_linear(o["fp8_a"], o["fp8_a_scale"], o["fp8_w"], o["fp8_w_scale"], None, k,
                                               False, o["bias"], torch.bfloat16, cfg, **extra(o))

    def ws(stages):
        return lambda o: ws_gemm.linear(o["fp8_a"], o["fp8_a_scale"].view(-1), o["fp8_w"], o["fp8_w_scale"].view(-1),
                                        o["bias"], torch.empty_like(o["residual"]), stages=stages, **extra(o))

    def bf16(o):
        y = F.linear(o["x"], o["w"], o["bias"])
        if not residual:
            return y
        return torch.addcmul(o["residual"].view(2, -1, n), o["gate"][:, None], y.view(2, -1, n)).view(-1, n)

    def int8(cfg=None):
        return lambda o: int_gemm.quant_linear(o["a"], o["a_scale"], o["w8"], o["w8_scale"], None, k, False,
                                               o["bias"], torch.bfloat16, cfg, **extra(o))

    methods = {"bf16_cublas": bf16, "default": ours(),
               "tl_default": ours(int_gemm.default_config(m, n, k, k, True, 2, residual))}
    if ws_gemm is not None:
        methods.update({f"ws_s{s}": ws(s) for s in (3, 5)})
    methods.update({"int8_default": int8(), "int8_tl_default": int8(int_gemm.default_config(m, n, k, k, False, 2,
                                                                                             residual))})
    return methods


def bench_residual(results):
    """8-bit GEMMs with the block's gated residual in the epilogue (and without): the shipped default, the tl
    kernel, the warp-specialized kernel's stage counts, bf16 cuBLAS + addcmul; each timed call runs
    ``RESIDUAL_COPIES`` products on distinct operand buffers (time per product)."""
    for shape_name in RESIDUAL_SHAPES:
        m, n, k = SHAPES[shape_name]
        sets = [make_operands(m, n, k) for _ in range(RESIDUAL_COPIES)]
        o = sets[0]
        plain = F.linear(o["x"], o["w"], o["bias"]).float()
        gated = (plain.view(2, -1, n) * o["gate"].float()[:, None]).view(m, n) + o["residual"].float()
        for residual, ref in ((True, gated), (False, plain)):
            for name, one in _residual_methods(m, n, k, residual).items():
                def fn(one=one):
                    return [one(o) for o in sets]

                kind = "bf16" if name == "bf16_cublas" else "int8" if name.startswith("int8") else "fp8"
                epilogue = "res" if residual else "plain"
                name = kind + "_" + epilogue + ("" if kind == "bf16" else "_" + name.removeprefix("int8_"))
                try:
                    y = fn()[0].float()
                    err = ((y - ref).norm() / ref.norm()).item()
                    t = ms(fn) / RESIDUAL_COPIES
                except Exception as e:  # noqa: BLE001
                    results["errors"].append(f"residual {shape_name}/{name}: {type(e).__name__}: {e}"[:300])
                    continue
                results["residual"].append(dict(shape=shape_name, method=name, ms=t, tflops=tflops(m, n, k, t),
                                                rel_err_vs_bf16=err))
        del sets, o, plain, gated
        torch.cuda.empty_cache()


SWEEP_KINDS = ["int8", "fp8"]  # packed int4 runs the int8 kernel after staging; also int8_res, fp8_res
SWEEP_SHAPES = ["pixart_qkvo", "pixart_ff_up", "pixart_ff_down", "cogvideox_qkvo", "cogvideox_ff_up"]


def bench_sweep(results):
    for shape_name in SWEEP_SHAPES:
        m, n, k = SHAPES[shape_name]
        o = make_operands(m, n, k)
        sweeps = (("int8", INT8_SWEEP), ("fp8", FP8_SWEEP), ("int8_res", RESIDUAL_SWEEP), ("fp8_res", RESIDUAL_SWEEP))
        for kind, sweep in sweeps:
            if kind not in SWEEP_KINDS:
                continue
            res = dict(residual=o["residual"], gate=o["gate"]) if kind.endswith("_res") else {}
            for c in sweep + ([None] if res else []):  # None: the default config
                cfg = int_gemm.GemmConfig(*c[:6], bool(c[6]), bool(c[7])) if c else None
                fn = {
                    "int8": lambda: int_gemm.quant_linear(o["a"], o["a_scale"], o["w8"], o["w8_scale"], None, k,
                                                          False, o["bias"], torch.bfloat16, cfg, **res),
                    "fp8": lambda: int_gemm.quant_linear(o["fp8_a"], o["fp8_a_scale"], o["fp8_w"], o["fp8_w_scale"],
                                                         None, k, False, o["bias"], torch.bfloat16, cfg, **res),
                }[kind.removesuffix("_res")]
                try:
                    fn()
                    t = ms(fn)
                except Exception as e:  # noqa: BLE001 — e.g. out of shared memory for one config
                    results["errors"].append(f"sweep {shape_name}/{kind}/{c}: {type(e).__name__}: {e}"[:300])
                    continue
                results["sweep"].append(dict(shape=shape_name, kind=kind, config=list(c) if c else "default", ms=t,
                                             tflops=tflops(m, n, k, t)))
        del o
        torch.cuda.empty_cache()


def bench_act_quant(results):
    """Fused quantization: effective bandwidth = bytes read (bf16) + written (int8 + scales) over time."""
    for m, k in ((8192, 1152), (8192, 4608), (35552, 1920), (35552, 7680)):
        copies = max(1, (200 << 20) // (m * k * 2))  # cycle through >= 200 MB of inputs so L2 cannot hold them
        xs = [torch.randn(m, k, device="cuda").to(torch.bfloat16) for _ in range(copies)]
        smooth_inv = torch.rand(k, device="cuda") + 0.5
        signs = random_signs(k, 0).cuda()
        rot_m = hadamard_factors(k)[0]
        nbytes = m * k * 3 + m * 4
        state = {"i": 0}

        def nxt():
            state["i"] = (state["i"] + 1) % copies
            return xs[state["i"]]

        variants = {
            "ours_plain_smooth": lambda: act_quant.quantize_activation(nxt(), 8, smooth_inv),
            "ours_rotate_smooth": lambda: act_quant.quantize_activation(nxt(), 8, smooth_inv, signs, rot_m),
            "torch_eager_reference_rotate": lambda: reference.quantize_activation(nxt(), 8, smooth_inv, signs, rot_m),
            "torch_eager_reference_plain": lambda: reference.quantize_activation(nxt(), 8, smooth_inv),
        }
        for name, fn in variants.items():
            compile_s = first_call_s(fn)
            t = ms_eager(fn) if "reference" in name else ms(fn)  # the reference copies to the GPU: no graphs
            results["act_quant"].append(dict(m=m, k=k, method=name, ms=t, gbps=nbytes / (t * 1e-3) / 1e9,
                                             ms_eager=ms_eager(fn), first_call_s=compile_s))
        del xs
        torch.cuda.empty_cache()


NORM_SWEEP = [(2, 4), (1, 1), (1, 2), (1, 4), (2, 2), (2, 8), (4, 4), (4, 8), (8, 8), (4, 2), (8, 4), (16, 8)]


def bench_norm(results):
    """PixArt's LayerNorm + modulation + fp8 quantization kernel (8192 x 1152, codes only or with the bf16 output
    too) over launch shapes (rows per program, warps); GB/s = bytes read + written over time."""
    import os

    from viditq.kernels import norm

    b, n, c = 2, 4096, 1152
    copies = 8  # 150 MB of inputs: L2 cannot hold them
    xs = [torch.randn(b, n, c, device="cuda").to(torch.bfloat16) for _ in range(copies)]
    emb = torch.randn(b, 6 * c, device="cuda").to(torch.bfloat16)
    shift, scale = emb.chunk(6, dim=1)[:2]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % copies
        return xs[state["i"]]

    for block_m, warps in NORM_SWEEP:
        os.environ["VIDITQ_NORM_CONFIG"] = f"{block_m},{warps}"
        for write_y in (False, True):
            fn = lambda: norm.layer_norm_modulate_quant(nxt(), None, None, scale, shift, 1e-6, 8, None, True,  # noqa: E731
                                                        write_y)
            try:
                fn()
                t = ms(fn)
            except Exception as e:  # noqa: BLE001 — a launch shape this width cannot take
                results["errors"].append(f"norm {block_m},{warps}: {type(e).__name__}: {e}"[:300])
                continue
            nbytes = b * n * c * (2 + 1 + (2 if write_y else 0)) + b * n * 4
            results["norm"].append(dict(block_m=block_m, num_warps=warps, write_y=write_y, ms=t,
                                        gbps=nbytes / (t * 1e-3) / 1e9))
    os.environ.pop("VIDITQ_NORM_CONFIG", None)
    del xs
    torch.cuda.empty_cache()


def bench_ceilings(results):
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = ms(lambda: dst.copy_(src))
    results["ceilings"]["d2d_copy_gbps"] = 2 * src.numel() / (t * 1e-3) / 1e9
    del src, dst


def compiled_kernel_report() -> list[dict]:
    """Registers, spills, shared memory and whether wgmma was emitted, for every compiled kernel (free to read)."""
    report = []
    for kernel in (int_gemm._quant_gemm_kernel, act_quant._act_quant_plain_kernel, act_quant._act_quant_rotate_kernel):
        try:
            caches = [c[0] for c in kernel.device_caches.values()]
        except AttributeError:
            continue
        for cache in caches:
            for key, ck in cache.items():
                ptx = ck.asm.get("ptx", "")
                report.append(dict(kernel=ck.name, key=str(key)[-300:], n_regs=getattr(ck, "n_regs", None),
                                   n_spills=getattr(ck, "n_spills", None), shared=ck.metadata.shared,
                                   wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx))
    return report


def print_tables(results):
    print(f"\n== {results['device']} ==")
    print("ceilings:", {k: round(v, 1) for k, v in results["ceilings"].items()})
    rows = results["gemm"]
    for shape in SHAPES:
        base = next((r["ms"] for r in rows if r["shape"] == shape and r["method"] == "bf16_cublas"), None)
        for r in (r for r in rows if r["shape"] == shape):
            speed = base / r["ms"] if base else float("nan")
            rate = f"{r['gbps']:7.0f} GB/s" if "gbps" in r else f"{r['tflops']:7.1f} TF/s"
            print(f"{shape:18s} {r['method']:31s} {r['ms']:8.3f} ms {rate}  x{speed:4.2f} vs bf16"
                  f"  (eager launch {r['ms_eager']:.3f} ms)")
    for shape in GROUP_SHAPES:
        rows = [r for r in results.get("group", []) if r["shape"] == shape]
        base = {r["method"]: r["ms"] for r in rows}
        for r in rows:
            print(f"group {shape:14s} {r['method']:34s} {r['ms']:8.3f} ms {r['tflops']:7.1f} TF/s"
                  f"  x{base.get('bf16_cublas_x3', float('nan')) / r['ms']:4.2f} vs bf16 x3"
                  f"  x{base.get('bf16_cublas_concat', float('nan')) / r['ms']:4.2f} vs bf16 concat"
                  f"  err {r['rel_err_vs_bf16']:.4f}")
    for r in results.get("residual", []):
        print(f"resid {r['shape']:14s} {r['method']:34s} {r['ms'] * 1e3:8.1f} us {r['tflops']:7.1f} TF/s"
              f"  err {r['rel_err_vs_bf16']:.4f}")
    for r in results["act_quant"]:
        print(f"actq {r['m']}x{r['k']} {r['method']:30s} {r['ms']:8.3f} ms {r['gbps']:7.0f} GB/s"
              f"  (eager {r['ms_eager']:.3f} ms)")
    for r in results.get("norm", []):
        print(f"norm {r['block_m']:2d} rows {r['num_warps']:2d} warps {'y+codes' if r['write_y'] else 'codes  '} "
              f"{r['ms'] * 1e3:6.1f} us {r['gbps']:6.0f} GB/s")
    best = {}
    for r in results["sweep"]:
        key = (r["shape"], r["kind"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    for (shape, kind), r in best.items():
        print(f"best {shape:18s} {kind:9s} {r['config']} {r['ms']:.3f} ms {r['tflops']:.0f} TF/s")
    for r in (r for r in results["sweep"] if r["kind"].endswith("_res")):
        print(f"res  {r['shape']:18s} {r['kind']:9s} {r['config']} {r['ms']:.3f} ms")
    for r in results.get("kernels", [])[:40]:
        print(f"kern {r['kernel'][:40]:40s} regs={r['n_regs']} spills={r['n_spills']} smem={r['shared']} "
              f"wgmma={r['wgmma']} mma.sync={r['mma_sync']}")
    for e in results["errors"]:
        print("ERROR", e)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-shapes", default=",".join(SWEEP_SHAPES))
    parser.add_argument("--sweep-kinds", default="int8,fp8")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--sections", default="ceilings,act_quant,gemms,group,residual,sweep",
                        help="which tables (comma list)")
    args = parser.parse_args()
    SWEEP_SHAPES[:] = args.sweep_shapes.split(",")
    SWEEP_KINDS[:] = args.sweep_kinds.split(",")
    for name in set(SHAPES) - set(args.shapes.split(",")):
        del SHAPES[name]
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), gemm=[], sweep=[], act_quant=[],
                   ceilings={}, errors=[], norm=[], group=[], residual=[])
    sections = [bench_ceilings, bench_act_quant, bench_norm, bench_gemms, bench_group, bench_residual] + \
        ([bench_sweep] if args.sweep else [])
    sections = [f for f in sections if f.__name__.removeprefix("bench_") in args.sections.split(",")]
    for section in sections:
        try:
            section(results)
        except Exception as e:  # noqa: BLE001 — keep the other tables
            results["errors"].append(f"{section.__name__}: {type(e).__name__}: {e}"[:500])
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    try:
        results["kernels"] = compiled_kernel_report()
    except Exception as e:  # noqa: BLE001 — introspection of Triton internals is best effort
        results["errors"].append(f"kernel report: {e}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print_tables(results)


if __name__ == "__main__":
    main()
