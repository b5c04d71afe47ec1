"""Compile the Gluon kernels for sm_90 without a GPU (Triton's bundled ptxas) and print what the tests check, as
JSON: ``gemm`` (:mod:`viditq.kernels.ws_gemm`, for ``tests/test_ws_gemm.py``), ``attention``
(:mod:`viditq.kernels.ws_attention`, for ``tests/test_ws_attention.py``), ``residual_gemm`` (the ``tl`` TMA GEMM's
residual epilogues, for ``tests/test_kernels.py``), ``tl_attention`` (the ``tl`` kernel
of :mod:`viditq.kernels.attention`, for ``tests/test_attention.py``), ``attention_prep`` (its preparation kernels'
programmatic-dependent-launch order, same test file) or ``norm`` (the LayerNorm + modulation + quantization kernel
with and without a prefix, for ``tests/test_fusion.py``). Run in a subprocess by the tests
(``offline.sm90_compiles`` swaps Triton's active driver, and the compile must not see ``TRITON_INTERPRET``)."""
import json
import re
import sys

import torch
import triton

from viditq.kernels import attention, offline, ws_attention, ws_gemm


def gemm():
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
    return out


def _fp8_operands(bh: int, n: int, head_d: int, block_m: int, block_n: int) -> attention.QuantizedOperands:
    """Operands of the fp8 mode as ``attention.quantize_operands`` lays them out (``n`` tokens padded to whole Q /
    K blocks); the values do not matter for a compile."""
    nq_pad, nkv_pad = triton.cdiv(n, block_m) * block_m, triton.cdiv(n, block_n) * block_n
    return attention.QuantizedOperands(
        q8=torch.zeros(bh, nq_pad, head_d, dtype=torch.int8), q_scale=torch.rand(bh, nq_pad // block_m),
        k8=torch.zeros(bh, nkv_pad, head_d, dtype=torch.int8), k_scale=torch.rand(bh, nkv_pad // block_n),
        v=torch.zeros(bh, head_d, nkv_pad).to(torch.float8_e4m3fn), v_scale=torch.rand(bh, head_d), bias=None)


def attention_kernel():
    """fp8 operands as ``attention.quantize_operands`` lays them out, per padded head dim and key block; the
    ping-pong order at the CogVideoX tile."""
    out = {}
    b, h, n = 1, 2, 300
    with offline.sm90_compiles(ws_attention._attn_fp8_ws_kernel) as compiled:
        variants = [(d, bn, False) for d in ws_attention.HEAD_DS for bn in ws_attention.BLOCK_NS] + [(64, 128, True)]
        for head_d, block_n, pingpong in variants:
            ops = _fp8_operands(b * h, n, head_d, ws_attention.BLOCK_M, block_n)
            ws_attention.attention(ops, torch.empty(b, n, h, head_d, dtype=torch.bfloat16).transpose(1, 2), n,
                                   block_n, pingpong=pingpong)
            c = compiled[-1]
            ptx = c.asm["ptx"]
            out[f"d{head_d} n{block_n}{' pingpong' if pingpong else ''}"] = dict(
                shared=c.metadata.shared, setmaxnreg="setmaxnreg" in ptx,
                qk=len(re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{block_n}k32\.s32\.s8\.s8", ptx)),
                pv=len(re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{head_d}k32\.f32\.e4m3\.e4m3", ptx)),
                tma_loads=len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.shared::\w+\.global", ptx)),
                **offline.ptxas_report(c), loops=offline.mma_loops(c))
    return out


def tl_attention():
    """The ``tl`` kernel of :mod:`attention` in fp8 mode at its default tiles (head dims 64 and 128): the SASS
    loops; at CogVideoX's tile also with the output quantized in the epilogue (``quant``: its loops, registers,
    spills)."""
    out = {}
    b, h, n = 1, 2, 300
    with offline.sm90_compiles(attention._attn_fwd_kernel) as compiled:
        for head_d in (64, 128):
            for config in {attention.default_config(head_d, "fp8"), attention.default_config(head_d, "fp8", 120)}:
                ops = _fp8_operands(b * h, n, head_d, config.block_m, config.block_n)
                attention.attention_from_operands(
                    ops, torch.empty(b, n, h, head_d, dtype=torch.bfloat16).transpose(1, 2), n, config)
                out[f"d{head_d} m{config.block_m} n{config.block_n} w{config.num_warps}"] = dict(
                    loops=offline.mma_loops(compiled[-1]))
        config = attention.default_config(64, "fp8")
        quant = dict(scale=torch.ones(b), smooth=torch.ones(h * 64), token_scale=torch.empty(b * n, 1))
        attention.attention_from_operands(
            _fp8_operands(b * h, n, 64, config.block_m, config.block_n),
            torch.empty(b, n, h, 64, dtype=torch.float8_e4m3fn).transpose(1, 2), n, config, quant)
        out["quant"] = dict(loops=offline.mma_loops(compiled[-1]), **offline.ptxas_report(compiled[-1]))
    return out


def _pdl_order(ptx: str) -> dict:
    """Line numbers in the PTX: the PDL wait and trigger, the first global load, the last global store."""
    lines = ptx.splitlines()

    def where(pattern, last=False):
        hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        return (hits[-1] if last else hits[0]) if hits else None

    return dict(wait=where(r"griddepcontrol\.wait"), launch=where(r"griddepcontrol\.launch_dependents"),
                first_load=where(r"ld\.global|cp\.async\.bulk\.tensor"), last_store=where(r"st\.global", last=True))


def attention_prep():
    """The 8-bit attention's preparation kernels (head dim 72; with q / k norms at 64) and the attention kernel
    compiled with PDL on (as on an H100): where each waits for the previous grid and lets the next one launch
    (:func:`_pdl_order`), and ptxas's spill stores."""
    from viditq.kernels import pdl

    pdl.launch_options = lambda device: dict(PDL=True, launch_pdl=True)
    b, h, n, d = 1, 2, 300, 72
    x = torch.randn(b, h, n, d).bfloat16()
    d_pad = attention.padded_head_dim(d)
    cfg = attention.default_config(d_pad, "fp8", n)
    chan, v_scale = torch.ones(b * h, d), torch.ones(b * h, d_pad)
    part = torch.zeros(5, b * h, 4, d_pad)
    x64, w = torch.randn(b, h, n, 64).bfloat16(), torch.ones(64).bfloat16()  # q / k norms: CogVideoX's head dim
    qk_norm = (w, w, w, w, 1e-6)
    rope = (torch.ones(n - 20, 64), torch.zeros(n - 20, 64), 20)  # (tables of the tokens after 20 text tokens)
    launches = {
        "stats": (attention._attn_stats_kernel, lambda: attention.attention_stats(x, x, x, d_pad)),
        "finish": (attention._attn_stats_finish_kernel, lambda: attention._attn_stats_finish_kernel[(b * h,)](
            part, chan, chan, chan, v_scale, float(n), d, part[0].numel(), HEAD_D=d_pad, SPLITS=4, HAS_V=True,
            num_warps=4, **pdl.launch_options(x.device))),
        "quantize q": (attention._quantize_blocks_kernel,
                       lambda: attention.quantize_per_block(x, cfg.block_m, d_pad, chan, 0.1)),
        "quantize k": (attention._quantize_blocks_kernel, lambda: attention.quantize_per_block(
            x, cfg.block_n, d_pad, chan, mean=chan, independent=True)),
        "stats with qk norms, d64": (attention._attn_stats_kernel, lambda: attention.attention_stats(
            x64, x64, x64, 64, qk_norm=qk_norm)),
        "quantize q with its norm, d64": (attention._quantize_blocks_kernel, lambda: attention.quantize_per_block(
            x64, cfg.block_m, 64, chan, 0.1, norm=(w, w, 1e-6))),
        "quantize k with its norm, d64": (attention._quantize_blocks_kernel, lambda: attention.quantize_per_block(
            x64, cfg.block_n, 64, chan, mean=chan, independent=True, norm=(w, w, 1e-6))),
        "stats with qk norms and rope, d64": (attention._attn_stats_kernel, lambda: attention.attention_stats(
            x64, x64, x64, 64, qk_norm=qk_norm, rope=rope)),
        "quantize q with its norm and rope, d64": (
            attention._quantize_blocks_kernel,
            lambda: attention.quantize_per_block(x64, cfg.block_m, 64, chan, 0.1, norm=(w, w, 1e-6), rope=rope)),
        "quantize v": (attention._quantize_v_fp8_kernel,
                       lambda: attention.quantize_v_fp8(x, cfg.block_n, d_pad, v_scale, independent=True)),
        "attention": (attention._attn_fwd_kernel, lambda: attention.attention_from_operands(
            _fp8_operands(b * h, n, d_pad, cfg.block_m, cfg.block_n),
            torch.empty(b, n, h, d, dtype=torch.bfloat16).transpose(1, 2), n, cfg)),
    }
    out = {}
    for name, (kernel, launch) in launches.items():
        with offline.sm90_compiles(kernel) as compiled:
            try:
                launch()
            except (RuntimeError, AttributeError):  # a later launch needs the real driver: the first one compiled
                pass
        out[name] = dict(_pdl_order(compiled[0].asm["ptx"]), spills=offline.ptxas_report(compiled[0])["spill_stores"])
    return out


def norm_kernel():
    """The norm kernel at CogVideoX-2B's width (1920 channels, 226 text + 300 video tokens) quantizing for fp8 and
    int8, codes only or with the output, with and without the text prefix: ptxas's registers and spills."""
    from viditq.kernels import norm

    b, c = 2, 1920
    x, x0 = torch.randn(b, 300, c).bfloat16(), torch.randn(b, 226, c).bfloat16()
    w, bias = torch.randn(c).bfloat16(), torch.randn(c).bfloat16()
    shift, scale, _, shift0, scale0, _ = torch.randn(b, 6 * c).bfloat16().chunk(6, 1)
    out = {}
    with offline.sm90_compiles(norm._ln_modulate_kernel) as compiled:
        for fp8 in (True, False):
            for write_y in (False, True):
                for prefix in (None, (x0, scale0, shift0)):
                    try:
                        norm.layer_norm_modulate_quant(x, w, bias, scale, shift, 1e-6, 8, None, fp8, write_y, prefix)
                    except (RuntimeError, AttributeError):  # the launch needs the real driver: compiled already
                        pass
                    out[f"fp8={fp8} write_y={write_y} prefix={prefix is not None}"] = dict(
                        compiles=len(compiled), **offline.ptxas_report(compiled[-1]))
    return out


def residual_gemm():
    """The tl TMA GEMM's residual epilogue at CogVideoX-2B's out-projection and FF down-projection (fp8 and int8,
    its default residual tile): one residual with one gate row a batch entry, and the text and video residuals as
    two parts (3-D TMA descriptors over views of one sequence) with split gates — shared memory, ptxas's
    registers and spills, and the residual's TMA loads (2-D / 3-D) in the PTX."""
    from viditq.kernels import int_gemm

    b, t, s, n = 2, 226, 775, 1920  # (a short video part: the compile does not depend on it)
    m = b * (t + s)
    joint = torch.zeros(b, t + s, n).bfloat16()
    out = {}
    with offline.sm90_compiles(int_gemm._quant_gemm_tma_kernel) as compiled:
        for codes in (torch.float8_e4m3fn, torch.int8):
            for k in (1920, 5120):
                a, w = torch.zeros(m, k).to(codes), torch.zeros(n, k).to(codes)
                cfg = int_gemm.default_config(36004, n, k, k, codes == torch.float8_e4m3fn, 2, True)
                for parts in (False, True):
                    kw = dict(residual=joint.view(m, n), gate=torch.zeros(b, n).bfloat16())
                    if parts:  # the text and video parts of one sequence, a gate row each
                        kw = dict(residual=joint[:, t:], residual_prefix=joint[:, :t],
                                  gate=torch.zeros(b, 2, n).bfloat16())
                    try:
                        int_gemm.quant_linear(a, torch.ones(m, 1), w, torch.ones(n, 1), None, k, False, None,
                                              torch.bfloat16, cfg, **kw)
                    except (RuntimeError, AttributeError):  # the launch needs the real driver: compiled already
                        pass
                    ptx = compiled[-1].asm["ptx"]
                    out[f"{str(codes).removeprefix('torch.')} k={k} parts={parts}"] = dict(
                        shared=compiled[-1].metadata.shared, **offline.ptxas_report(compiled[-1]),
                        tma_3d=len(re.findall(r"cp\.async\.bulk\.tensor\.3d\.shared::\w+\.global", ptx)))
    return out


if __name__ == "__main__":
    which = dict(gemm=gemm, attention=attention_kernel, tl_attention=tl_attention, attention_prep=attention_prep,
                 norm=norm_kernel, residual_gemm=residual_gemm)
    json.dump(which[sys.argv[1]](), sys.stdout)
