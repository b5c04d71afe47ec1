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
    out = {}
    residual = dict(residual=torch.randn(m, n).bfloat16(), gate=torch.randn(2, n).bfloat16())
    with offline.sm90_compiles(ws_gemm._gemm_ws_kernel) as compiled:
        for codes in (torch.float8_e4m3fn, torch.int8):
            a = torch.randn(m, k).mul(20).clamp(-127, 127).to(codes)
            w = torch.randn(n, k).mul(20).clamp(-127, 127).to(codes)
            a_scale, w_scale, bias = torch.rand(m), torch.rand(n), torch.randn(n).bfloat16()
            for name, extra in {"plain": {}, "residual": residual, "group": None}.items():
                if extra is None:  # q, k and v in one launch
                    ws_gemm.linear_group(a, a_scale, [(w, w_scale, bias, torch.empty(m, n, dtype=torch.bfloat16))
                                                      for _ in range(3)], programs=132, pdl=True)
                else:
                    ws_gemm.linear(a, a_scale, w, w_scale, bias, torch.empty(m, n, dtype=torch.bfloat16),
                                   programs=132, pdl=True, **extra)
                c = compiled[-1]
                ptx = c.asm["ptx"]
                kind = "e4m3.e4m3" if codes == torch.float8_e4m3fn else "s32.s8.s8"
                out[f"{name} {str(codes).removeprefix('torch.')}"] = dict(
                    shared=c.metadata.shared, setmaxnreg="setmaxnreg" in ptx,
                    wgmma=len(re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n128k32\.\w*\.?{kind}", ptx)),
                    griddepcontrol="griddepcontrol.wait" in ptx,
                    tma_loads=len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.shared::\w+\.global", ptx)))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
