"""The FA3-structured fp8 attention kernel in Gluon (``viditq.kernels.ws_attention``).

Gluon has no CPU interpreter, so CI compiles the kernel for sm_90 (Triton's bundled ptxas, in a subprocess:
``tests/sm90_compile.py attention``) and checks what the compiler made of it; on an H100 / H200 it is compared with
the ``tl`` kernel (same numerics), the PyTorch reference and exact attention, and
``attention.attention_from_operands`` is checked to dispatch to it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from viditq.kernels import attention as KA  # noqa: E402

if KA.ws_attention is None:  # a Triton whose Gluon lacks the Hopper API the kernel uses (3.6 and 3.9 have it)
    pytest.skip("no usable Gluon Hopper API in this Triton", allow_module_level=True)
ws_attention = KA.ws_attention

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
sm90_only = pytest.mark.skipif(not SM90, reason="the Gluon kernel runs on sm_90 (H100 / H200) only")


def test_kernel_compiles_for_sm90_as_designed(sm90_compile):
    """Every padded head dim and key block (and the ping-pong order) compiles for sm_90: per consumer warpgroup,
    the int8 Q·Kᵀ and fp8 P·V wgmma (m64nBLOCK_Nk32 / m64nHEAD_Dk32 per 32-deep step), setmaxnreg for the
    partitions, four TMA loads (two Q tiles, K, Vᵀ), wgmma that ptxas leaves asynchronous, the shared memory of
    two Q tiles and ``STAGES`` K + Vᵀ stages, and in the SASS of the key-block loop one exp2 per score and no
    shuffle between the two products."""
    out = sm90_compile("attention")
    assert len(out) == len(ws_attention.HEAD_DS) * len(ws_attention.BLOCK_NS) + 1
    for name, info in out.items():
        head_d, block_n = (int(x[1:]) for x in name.split()[:2])
        # per consumer, the full-block loop's and the masked last block's
        assert info["qk"] == 2 * 2 * head_d // 32 and info["pv"] == 2 * 2 * block_n // 32, (name, info)
        assert info["setmaxnreg"] and info["tma_loads"] == 4, info
        assert not info["wgmma_serialized"], (name, info)  # (spills: none with Triton 3.6's ptxas, some with 3.9's)
        smem = 2 * 64 * head_d + ws_attention.STAGES * 2 * block_n * head_d
        assert smem <= info["shared"] <= smem + 1024, (name, info)
        # One trip over a key block (its S and P·V wgmma) evaluates one exp2 per score: 64 x BLOCK_N scores over
        # 128 threads, + 2 rows' rescale factors. (A runtime branch for the masked last block inside the loop
        # once made it evaluate both sides: 130 per trip, the kernel exp-bound at 10.2 ms on CogVideoX.)
        trip = min((loop for loop in info["loops"] if loop["mma"] == (head_d + block_n) // 32),
                   key=lambda loop: loop["instructions"])
        assert trip["ex2"] == block_n // 2 + 2, (name, trip)
        assert trip["shuffles"] == 0, (name, trip)  # P reaches the P·V wgmma without shuffles (V in key order)


def test_dispatch_predicate_off_the_gpu(monkeypatch):
    """``applies`` refuses what the kernel cannot take: CPU tensors, the int8 mode (bf16 V), a key-padding bias,
    128-row Q blocks."""
    fp8 = KA.QuantizedOperands(  # the fp8 mode's layouts: 2 heads, 300 tokens, head dim 64
        q8=torch.zeros(2, 320, 64, dtype=torch.int8), q_scale=torch.rand(2, 5),
        k8=torch.zeros(2, 384, 64, dtype=torch.int8), k_scale=torch.rand(2, 3),
        v=torch.zeros(2, 64, 384).to(torch.float8_e4m3fn), v_scale=torch.rand(2, 64), bias=None)
    out = torch.empty(1, 2, 300, 64)
    assert not ws_attention.applies(fp8, out, 64, 128)  # not CUDA
    if SM90:
        monkeypatch.setenv("VIDITQ_WS_ATTENTION", "1")
        cuda = KA.QuantizedOperands(**{f: getattr(fp8, f).cuda() if getattr(fp8, f) is not None else None
                                       for f in fp8.__dataclass_fields__})
        out = out.cuda()
        assert ws_attention.applies(cuda, out, 64, 128)
        assert not ws_attention.applies(cuda, out, 128, 128)
        assert not ws_attention.applies(KA.QuantizedOperands(**{**cuda.__dict__, "v_scale": None}), out, 64, 128)
        bias = torch.zeros(2, 384, device="cuda")
        assert not ws_attention.applies(KA.QuantizedOperands(**{**cuda.__dict__, "bias": bias}), out, 64, 128)


def _rel_l2(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@sm90_only
@pytest.mark.parametrize("shape,block_n", [
    ((1, 2, 1000, 1000, 64), 128),  # a partial last key block
    ((2, 3, 900, 700, 72), 128),  # an odd number of 64-row query blocks; head dim padded to 128
    ((1, 2, 333, 2000, 40), 64),
    ((1, 1, 64, 4096, 32), 128),  # one query tile, the pair's second tile empty
    ((2, 30, 4444, 4444, 64), 128),  # CogVideoX's heads at a quarter of its tokens
])
@pytest.mark.parametrize("pingpong", [False, True])
def test_kernel_matches_tl_kernel_and_reference(shape, block_n, pingpong, monkeypatch):
    b, h, n_q, n_kv, d = shape
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(b, h, n_q, d, generator=g) * 1.5
    k = torch.randn(b, h, n_kv, d, generator=g) + 2.0 * torch.randn(1, h, 1, d, generator=g)
    v = torch.randn(b, h, n_kv, d, generator=g)
    q[..., :2] *= 6.0
    q, k, v = (x.cuda().bfloat16() for x in (q, k, v))
    config = KA.AttentionConfig(64, block_n, 4, 3)
    calls = []
    real = ws_attention.attention
    monkeypatch.setattr(ws_attention, "attention",
                        lambda *a, **kw: calls.append(1) or real(*a, pingpong=pingpong, **kw))
    monkeypatch.setenv("VIDITQ_WS_ATTENTION", "1")
    out = KA.quantized_attention_triton(q, k, v, "fp8", config=config)
    assert calls == [1]
    monkeypatch.setenv("VIDITQ_WS_ATTENTION", "0")
    out_tl = KA.quantized_attention_triton(q, k, v, "fp8", config=config)
    assert calls == [1]
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert _rel_l2(out, out_tl) < 0.01  # the same numerics, up to the order of float32 sums
    assert _rel_l2(out, KA.quantized_attention_reference(q, k, v, "fp8", config=config)) < 0.03
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert _rel_l2(out, exact) < 0.045
    assert abs(_rel_l2(out, exact) - _rel_l2(out_tl, exact)) < 0.003
