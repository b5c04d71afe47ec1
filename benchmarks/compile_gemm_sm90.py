"""Compile the TMA GEMM kernel (one product, q/k/v grouped, residual and quantized-output epilogues) for sm_90
without a GPU, with whatever Triton is first on the path, and build each launcher's source — the launcher step is
where Triton 3.6 (the GPU image's) rejects tensor descriptors inside tuples, which the CPU interpreter never
reaches. Prints registers / stack / spills per variant (Triton's bundled ptxas + cuobjdump).

    pip download triton==3.6.0 --no-deps -d /tmp/t36 && pip install --no-deps --target /tmp/t36site /tmp/t36/*.whl
    PYTHONPATH=/tmp/t36site:src python benchmarks/compile_gemm_sm90.py
"""
from __future__ import annotations

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
from compile_act_quant_sm90 import resources  # noqa: E402
from triton.backends.nvidia import driver as nvidia  # noqa: E402

from viditq.kernels import int_gemm, offline, reference  # noqa: E402
from viditq.quant.quantizers import quantize_weight  # noqa: E402


def main():
    with offline.sm90_compiles(int_gemm._quant_gemm_tma_kernel) as compiled:
        _compile_all(compiled)
    print(f"triton {triton.__version__}: {len(compiled)} kernels compiled for sm_90")


def _compile_all(compiled):
    m, n, k = 512, 1152, 1152
    cfg = int_gemm.GemmConfig(128, 128, 128, 8, 4, 4, persistent=True, tma=True)
    x = torch.randn(m, k)
    for fp8 in (True, False):
        a, s = reference.quantize_per_token_fp8(x) if fp8 else reference.quantize_activation(x, 8)
        weights = []
        for _ in range(3):
            w = torch.randn(n, k) * k**-0.5
            if fp8:
                wq, w_scale = reference.quantize_per_token_fp8(w)
            else:
                q = quantize_weight(w, 8)
                wq, w_scale = q.codes, q.scale
            weights.append((wq, w_scale, torch.randn(n).bfloat16()))
        wq, w_scale, bias = weights[0]
        runs = {"group of 3": lambda: int_gemm.quant_linear_group(a, s, weights, torch.bfloat16, cfg),
                "one product": lambda: int_gemm.quant_linear(a, s, wq, w_scale, None, k, False, bias, torch.bfloat16,
                                                             cfg),
                "residual + gate": lambda: int_gemm.quant_linear(
                    a, s, wq, w_scale, None, k, False, bias, torch.bfloat16, cfg,
                    residual=torch.randn(m, n).bfloat16(), gate=torch.randn(2, n).bfloat16())}
        if fp8:
            runs["quantized output"] = lambda: int_gemm.quant_linear(
                a, s, wq, w_scale, None, k, False, bias, torch.bfloat16, cfg,
                quant_out=dict(smooth_inv=None, bound=torch.tensor([1.0, 0.0, 1e-6])))
        for name, fn in runs.items():
            fn()
            c = compiled[-1]
            src = c.src
            constants = {((src.fn.arg_names.index(i),) if isinstance(i, str) else i): v
                         for i, v in src.constants.items()}
            launcher = "launcher not checked (this Triton builds it differently)"
            if hasattr(nvidia, "make_launcher"):  # Triton <= 3.6
                nvidia.make_launcher(constants, dict(src.signature), getattr(c.metadata, "tensordesc_meta", None))
                launcher = "launcher ok"
            print(f"{'fp8' if fp8 else 'int8'} {name:17s} {resources(c)}  {launcher}")


if __name__ == "__main__":
    main()
