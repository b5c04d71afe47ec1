"""The warp-specialized Gluon 8-bit GEMM (``viditq.kernels.ws_gemm``).

Gluon has no CPU interpreter, so CI compiles the kernel for sm_90 (Triton's bundled ptxas, in a subprocess:
``tests/sm90_compile.py``) and checks what the compiler made of it; on an H100 / H200 the kernel is compared
with the ``tl`` kernel — the same products in the same float32 epilogue order, so bit for bit — and with the
reference, and ``int_gemm.quant_linear`` is checked to dispatch to it.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from viditq.kernels import int_gemm, reference  # noqa: E402

if int_gemm.ws_gemm is None:  # a Triton whose Gluon lacks the Hopper API the kernel uses (3.6 and 3.9 have it)
    pytest.skip("no usable Gluon Hopper API in this Triton", allow_module_level=True)
ws_gemm = int_gemm.ws_gemm
from viditq.quant.quantizers import quantize_weight  # noqa: E402

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
sm90_only = pytest.mark.skipif(not SM90, reason="the Gluon kernel runs on sm_90 (H100 / H200) only")


def test_kernel_compiles_for_sm90_as_designed(sm90_compile):
    """Both epilogues and the three-product launch, fp8 and int8 codes, compile for sm_90: two consumer
    warpgroups' 8-bit wgmma (m64n128k32, 8 per 128-deep step each), setmaxnreg for the partitions, TMA loads (A,
    B; + the residual tile), the PDL wait, and shared memory within the 227 KiB of an SM (4 stages of A + B
    tiles, two C tiles)."""
    out = sm90_compile("gemm")
    assert len(out) == 6
    stages = ws_gemm.STAGES * 2 * 128 * 128  # 8-bit A and B tiles
    for name, info in out.items():
        wgmma = 48 if name.startswith("group") else 16  # q, k and v: the consumer loop unrolled per product
        assert info["wgmma"] == wgmma and info["setmaxnreg"] and info["griddepcontrol"], (name, info)
        assert stages + 2 * 128 * 128 * 2 <= info["shared"] <= int_gemm.SMEM_LIMIT, (name, info)
    for codes in ("float8_e4m3fn", "int8"):
        plain, res = out[f"plain {codes}"]["tma_loads"], out[f"residual {codes}"]["tma_loads"]
        assert plain >= 2 and res >= plain + 2


def test_dispatch_predicate_off_the_gpu():
    """``applies`` refuses what the kernel cannot take: CPU tensors, fp32 output."""
    a = torch.zeros(1024, 256, dtype=torch.float8_e4m3fn)
    w = torch.zeros(128, 256, dtype=torch.float8_e4m3fn)
    assert not ws_gemm.applies(a, [w], [torch.empty(1024, 128, dtype=torch.bfloat16)])  # not CUDA
    assert not int_gemm._use_ws(None, None, False, True, a, [w], [torch.empty(1024, 128)])


def _operands(m, n, k, batch, seed, codes="fp8", device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, generator=g)
    w = torch.randn(n, k, device=device, generator=g) * k**-0.5
    if codes == "fp8":
        (a, a_scale), (w, w_scale) = reference.quantize_per_token_fp8(x), reference.quantize_per_token_fp8(w)
    else:
        (a, a_scale), q = reference.quantize_activation(x, 8), quantize_weight(w, 8)
        w, w_scale = q.codes, q.scale
    bias = torch.randn(n, device=device, generator=g).to(torch.bfloat16)
    residual = torch.randn(m, n, device=device, generator=g).to(torch.bfloat16)
    gate = None if batch is None else torch.randn(batch, n, device=device, generator=g).to(torch.bfloat16)
    return a, a_scale, w, w_scale, bias, residual, gate


@sm90_only
@pytest.mark.parametrize("m,n,k,batch,programs", [
    (1000, 1000, 1152, 2, None),  # tiles cut at both edges, per-row gate (500 tokens a batch row)
    (4096, 1152, 4608, 2, None),  # 288 tiles: two or three a program, both consumer groups
    (2048, 392, 640, 4, 7),  # 7 programs, 64 tiles: many turns per group; tile gate (512 rows a batch row)
    (8192, 1152, 1152, None, None),  # PixArt's shape, ungated residual
])
@pytest.mark.parametrize("epilogue", ["plain", "residual", "plain_fp16"])
@pytest.mark.parametrize("codes", ["fp8", "int8"])
def test_ws_gemm_equals_the_tl_kernel(m, n, k, batch, programs, epilogue, codes):
    a, a_scale, w, w_scale, bias, residual, gate = _operands(m, n, k, batch, m + n + k, codes)
    out_dtype = torch.float16 if epilogue == "plain_fp16" else torch.bfloat16
    extra = dict(residual=residual, gate=gate) if epilogue == "residual" else {}
    if epilogue == "plain_fp16":
        bias = None
    cfg = int_gemm.GemmConfig(128, 128, 128, 8, 8, 4, persistent=True, tma=True)  # a config: the tl kernel
    expected = int_gemm.quant_linear(a, a_scale, w, w_scale, None, k, False, bias, out_dtype, cfg, **extra)
    y = ws_gemm.linear(a, a_scale.view(-1), w, w_scale.view(-1), bias, torch.empty_like(expected), programs=programs,
                       **extra)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    ref = reference.int_linear(a, a_scale, w, w_scale, None, k, False, bias, torch.float32, None, None,
                               extra.get("residual"), extra.get("gate"))
    assert ((y.double() - ref.double()).norm() / ref.double().norm()).item() < 8e-3  # the 16-bit output's rounding


@sm90_only
def test_quant_linear_dispatches_8bit_products_to_the_ws_kernel(monkeypatch):
    """8-bit products with a plain or residual epilogue, > 512 rows and few waves of tiles go to the Gluon kernel; a
    GELU epilogue, few rows, many waves, a given config or ``VIDITQ_WS_GEMM=0`` keep the tl kernel; results agree
    either way."""
    calls = []
    real = ws_gemm.linear
    monkeypatch.setattr(ws_gemm, "linear", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    a, a_scale, w, w_scale, bias, residual, gate = _operands(1024, 384, 256, 2, 7)

    def run(**kw):
        return int_gemm.quant_linear(a, a_scale, w, w_scale, None, 256, False, bias, torch.bfloat16, **kw)

    y = run(residual=residual, gate=gate)
    assert len(calls) == 1
    a8, s8, w8, ws8 = _operands(1024, 384, 256, 2, 7, "int8")[:4]
    int_gemm.quant_linear(a8, s8, w8, ws8, None, 256, False, bias, torch.bfloat16)  # int8 codes too
    assert len(calls) == 2
    run(activation="gelu_tanh")
    run(config=int_gemm.GemmConfig(128, 128, 128, 8, 8, 4, persistent=True, tma=True))
    int_gemm.quant_linear(a[:512], a_scale[:512], w, w_scale, None, 256, False, bias, torch.bfloat16)
    waves = ws_gemm.MAX_WAVES
    monkeypatch.setattr(ws_gemm, "MAX_WAVES", 0)  # many tiles per SM (CogVideoX): the tl kernel's wider tiles
    run(residual=residual, gate=gate)
    monkeypatch.setattr(ws_gemm, "MAX_WAVES", waves)
    assert len(calls) == 2
    monkeypatch.setenv("VIDITQ_WS_GEMM", "0")
    y_tl = run(residual=residual, gate=gate)
    assert len(calls) == 2
    monkeypatch.delenv("VIDITQ_WS_GEMM")
    run(residual=residual, gate=gate)
    assert len(calls) == 3
    torch.testing.assert_close(y, y_tl, rtol=0, atol=0)


@sm90_only
@pytest.mark.parametrize("m,ns,k,bias,programs", [(8192, (1152, 1152, 1152), 1152, True, None),
                                                  (1000, (392, 1000, 264), 640, False, 5)])
@pytest.mark.parametrize("codes", ["fp8", "int8"])
def test_ws_group_equals_the_tl_group(m, ns, k, bias, programs, codes):
    """q, k and v in one launch of the Gluon kernel equal the tl kernel's grouped launch bit for bit (different
    widths, edge tiles, few programs so tiles of two products share a program), and ``quant_linear_group``
    dispatches to it unless ``VIDITQ_WS_GROUP=0``."""
    a, a_scale = _operands(m, 8, k, None, m + k, codes)[:2]
    weights = []
    for i, n in enumerate(ns):
        _, _, w, w_scale, b, _, _ = _operands(16, n, k, None, m + n + i, codes)
        weights.append((w, w_scale, b if bias else None))
    cfg = int_gemm.GemmConfig(256, 128, 128, 8, 8, 3, persistent=True, tma=True)
    expected = int_gemm.quant_linear_group(a, a_scale, weights, torch.bfloat16, cfg)
    outs = [torch.empty_like(e) for e in expected]
    ws_gemm.linear_group(a, a_scale.view(-1), [(w, s.view(-1), b, c) for (w, s, b), c in zip(weights, outs)],
                         programs=programs)
    for y, e in zip(outs, expected):
        torch.testing.assert_close(y, e, rtol=0, atol=0)
    if programs is None:
        calls = []
        real = ws_gemm.linear_group
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ws_gemm, "linear_group", lambda *args, **kw: calls.append(1) or real(*args, **kw))
            got = int_gemm.quant_linear_group(a, a_scale, weights, torch.bfloat16)
            mp.setenv("VIDITQ_WS_GROUP", "0")
            int_gemm.quant_linear_group(a, a_scale, weights, torch.bfloat16)
        assert len(calls) == 1
        for y, e in zip(got, expected):
            torch.testing.assert_close(y, e, rtol=0, atol=0)
