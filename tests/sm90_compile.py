"""Compile :mod:`viditq.kernels.ws_gemm` for sm_90 without a GPU (Triton's bundled ptxas) and print what the
tests check, as JSON: run in a subprocess by ``tests/test_ws_gemm.py`` (``offline.sm90_compiles`` swaps
Triton's active driver, and the compile must not see ``TRITON_INTERPRET``)."""
import json
import re
import sys

import torch

from viditq.kernels import offline, ws_gemm


def main():
    m, n, k = 1000, 392, 640
    a = torch.randn(m, k).to(torch.float8_e4m3fn)
    w = torch.randn(n, k).to(torch.float8_e4m3fn)
    a_scale, w_scale, bias = torch.rand(m), torch.rand(n), torch.randn(n).bfloat16()
    out = {}
    residual = dict(residual=torch.randn(m, n).bfloat16(), gate=torch.randn(2, n).bfloat16())
    with offline.sm90_compiles(ws_gemm._fp8_gemm_ws_kernel) as compiled:
        for name, extra in {"plain": {}, "residual": residual}.items():
            ws_gemm.fp8_linear(a, a_scale, w, w_scale, bias, torch.empty(m, n, dtype=torch.bfloat16), programs=132,
                               pdl=True, **extra)
            c = compiled[-1]
            ptx = c.asm["ptx"]
            out[name] = dict(shared=c.metadata.shared, setmaxnreg="setmaxnreg" in ptx,
                             wgmma_e4m3=ptx.count("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3"),
                             griddepcontrol="griddepcontrol.wait" in ptx,
                             tma_loads=len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.shared::\w+\.global", ptx)))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
