"""Session 26's two CogVideoX changes at the kernel level (H100), beside the end-to-end A/B of ``session27_call.sh``:

1. the 8-bit attention's preparation with the per-head q / k LayerNorms inside (``qk_norm``) against the norms as
   their own pass (``F.layer_norm`` under ``torch.compile``, as Inductor ran them in the compiled blocks) and the
   preparation after it;
2. the residual epilogue with the text and video residuals as two parts and split gates (``residual_prefix``)
   against the plain GEMM plus the gated residual as its own (compiled) pass, and the one-residual epilogue;
3. the attention writing its output as the output projection's fp8 codes (``quantized_attention_quant_out``)
   against the attention's bf16 output and the projection's own quantization pass.

CogVideoX-2B shapes: 2 x (226 text + 17 776 video) tokens, 1920 channels, 30 heads of 64; fp8 codes. CUDA-graph
medians (``bench_attention.graph_bench``); also the largest difference between the fused and unfused results.

    python benchmarks/exp/session26_kernels.py --out kernels.json
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attention import graph_bench  # noqa: E402

from viditq.kernels import attention as KA  # noqa: E402
from viditq.kernels import dispatch, int_gemm, reference  # noqa: E402

B, T, S, C, H = 2, 226, 17776, 1920, 30
D = C // H
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # (CPU: a dry run of the script at small shapes)


def prep(res: dict) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    qkv = [torch.randn(B, T + S, C, device=DEVICE, generator=g).bfloat16() * 2 + 1 for _ in range(3)]
    q, k, v = (t.view(B, T + S, H, D).transpose(1, 2) for t in qkv)  # the q/k/v GEMM outputs' (B, N, H, D) layout
    w = [(1 + 0.2 * torch.randn(D, device=DEVICE, generator=g)).bfloat16() for _ in range(2)]
    b = [(0.1 * torch.randn(D, device=DEVICE, generator=g)).bfloat16() for _ in range(2)]
    norm = (w[0], b[0], w[1], b[1], 1e-6)
    cfg = KA.default_config(D, "fp8", T + S)
    scale = D ** -0.5
    layer_norm = torch.compile(lambda x, w, b: F.layer_norm(x, (D,), w, b, 1e-6))

    def separate():
        return KA.quantize_operands(layer_norm(q, w[0], b[0]), layer_norm(k, w[1], b[1]), v, "fp8", scale, None, cfg)

    def fused():
        return KA.quantize_operands(q, k, v, "fp8", scale, None, cfg, qk_norm=norm)

    res["prep: norms as a pass + preparation (ms)"] = graph_bench(separate)
    res["prep: norms in the preparation (ms)"] = graph_bench(fused)
    res["prep: the norms' pass alone (ms)"] = graph_bench(lambda: (layer_norm(q, w[0], b[0]), layer_norm(k, w[1], b[1])))
    a, f = separate(), fused()
    out_a = torch.empty(B, T + S, H, D, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
    out_f = torch.empty_like(out_a)
    KA.attention_from_operands(a, out_a, T + S, cfg)
    KA.attention_from_operands(f, out_f, T + S, cfg)
    res["prep: attention rel. difference, fused vs separate"] = float((out_f.float() - out_a.float()).norm()
                                                                      / out_a.float().norm())
    # 3. the output projection's input: quantized by its own pass, or by the attention's epilogue
    smooth = (torch.rand(C, device=DEVICE, generator=g) + 0.5).float()

    def attention_then_quantize():
        out = KA.quantized_attention_triton(q, k, v, "fp8", qk_norm=norm)
        return dispatch.quantize_activation(out.transpose(1, 2).reshape(-1, C), 8, smooth, None, 1, 0, fp8=True)

    def quantized_output():
        return KA.quantized_attention_quant_out_triton(q, k, v, qk_norm=norm, smooth=smooth)

    res["out: attention + its quantization pass (ms)"] = graph_bench(attention_then_quantize)
    res["out: attention writing fp8 codes (ms)"] = graph_bench(quantized_output)
    (c1, s1), (c2, s2) = attention_then_quantize(), quantized_output()
    ref = c1.float() * s1
    res["out: rel. difference of the dequantized inputs"] = float((c2.float() * s2 - ref).norm() / ref.norm())


def residual(res: dict) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(1)
    m = B * (T + S)
    joint = torch.randn(B, T + S, C, device=DEVICE, generator=g).bfloat16()
    text, video = joint[:, :T], joint[:, T:]
    gates = torch.randn(B, 2, C, device=DEVICE, generator=g).bfloat16()
    add = torch.compile(lambda out, text, video, gates: torch.cat(
        [text + gates[:, :1] * out[:, :T], video + gates[:, 1:] * out[:, T:]], dim=1))
    for k in (C, 5120):  # the out-projection (K = 1920), the FF down-projection (K = 5120)
        x = torch.randn(m, k, device=DEVICE, generator=g).bfloat16()
        wt = (torch.randn(C, k, device=DEVICE, generator=g) * k ** -0.5).bfloat16()
        a, a_scale = reference.quantize_per_token_fp8(x)
        w8, w_scale = reference.quantize_per_token_fp8(wt)
        bias = torch.randn(C, device=DEVICE, generator=g).bfloat16()

        def gemm(**kw):
            return int_gemm.quant_linear(a, a_scale, w8, w_scale, None, k, False, bias, torch.bfloat16, **kw)

        def unfused():
            return add(gemm().view(B, T + S, C), text, video, gates)

        def parts():
            return gemm(residual=video, gate=gates, residual_prefix=text)

        res[f"K={k}: GEMM alone (ms)"] = graph_bench(gemm)
        res[f"K={k}: GEMM + the gated residual as a pass (ms)"] = graph_bench(unfused)
        res[f"K={k}: residual in two parts in the epilogue (ms)"] = graph_bench(parts)
        res[f"K={k}: one residual in the epilogue (ms)"] = graph_bench(
            lambda: gemm(residual=joint.view(m, C), gate=gates[:, 1]))
        res[f"K={k}: max |difference|, epilogue vs pass"] = float((parts().float() - unfused().view(m, C).float())
                                                                  .abs().max())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="session26_kernels.json")
    args = parser.parse_args()
    res = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"}
    for step in (prep, residual):
        try:
            step(res)
        except Exception as e:  # noqa: BLE001 — report and go on to the other measurement
            res[f"{step.__name__} error"] = repr(e)[:500]
    Path(args.out).write_text(json.dumps(res, indent=1))
    for key, value in res.items():
        print(f"{key:60s} {value:.4f}" if isinstance(value, float) else f"{key:60s} {value}")


if __name__ == "__main__":
    main()
