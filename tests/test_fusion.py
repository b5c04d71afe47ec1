"""Fused LayerNorm + adaLN modulation: the Triton kernel against its reference (CPU interpreter here, GPU in the
device run), and the fused CogVideoX norm module against diffusers' own."""
import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from viditq import fusion  # noqa: E402
from viditq.kernels import norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("b,n,c,affine,dtype", [(2, 5, 48, True, torch.float32), (1, 3, 130, False, torch.float32),
                                                (3, 7, 64, True, torch.bfloat16)])
def test_layer_norm_modulate_matches_reference(b, n, c, affine, dtype):
    g = torch.Generator().manual_seed(c)
    x = (torch.randn(b, n, c, generator=g) * 3 + 1).to(DEVICE, dtype)
    weight = (torch.randn(c, generator=g).to(DEVICE, dtype) if affine else None)
    bias = (torch.randn(c, generator=g).to(DEVICE, dtype) if affine else None)
    emb = torch.randn(b, 6 * c, generator=g).to(DEVICE, dtype)
    shift, scale = emb.chunk(6, dim=1)[:2]  # strided views, as CogVideoX passes them
    out = norm.layer_norm_modulate(x, weight, bias, scale, shift, 1e-5)
    ref = norm.layer_norm_modulate_reference(x, weight, bias, scale, shift, 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    plain = torch.nn.functional.layer_norm(x.float(), (c,), None if weight is None else weight.float(),
                                           None if bias is None else bias.float(), 1e-5)
    assert (ref.float() - plain).abs().max() > 0.1  # the modulation really was applied
    with pytest.raises(ValueError, match="scale must be"):
        norm.layer_norm_modulate(x, weight, bias, scale[:, :-1], shift, 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        norm.layer_norm_modulate(x.transpose(0, 1), weight, bias, scale, shift, 1e-5)


def test_fused_cogvideox_norm_matches_diffusers(monkeypatch):
    from diffusers.models.normalization import CogVideoXLayerNormZero

    from viditq.testing import tiny_model

    model = tiny_model("cogvideox").to(DEVICE)
    expected = sum(isinstance(m, CogVideoXLayerNormZero) or (type(m) is torch.nn.LayerNorm
                                                             and m.normalized_shape[0] <= fusion.SMALL_NORM_CHANNELS)
                   for m in model.modules())
    module = next(m for m in model.modules() if isinstance(m, CogVideoXLayerNormZero))
    g = torch.Generator().manual_seed(0)
    c = module.norm.normalized_shape[0]
    hidden, enc = torch.randn(2, 12, c, generator=g).to(DEVICE), torch.randn(2, 5, c, generator=g).to(DEVICE)
    temb = torch.randn(2, module.linear.in_features, generator=g).to(DEVICE)
    with torch.no_grad():
        before = module(hidden, enc, temb)
        assert fusion.fuse_norms(model) == expected > 0
        assert fusion.fuse_norms(model) == expected  # idempotent
        assert type(module).__name__ == "FusedCogVideoXLayerNormZero" and isinstance(module, CogVideoXLayerNormZero)
        monkeypatch.setattr(fusion, "_kernel_ok", lambda x: False)
        unfused_path = module(hidden, enc, temb)  # diffusers' own forward (CPU, reference backend, compile)
        monkeypatch.setattr(fusion, "_kernel_ok", lambda x: True)  # force the kernel (interpreter on CPU)
        fused_path = module(hidden, enc, temb)
    for a, b, c_ in zip(before, unfused_path, fused_path):
        assert torch.equal(a, b)
        torch.testing.assert_close(c_, a, rtol=1e-5, atol=1e-5)


def test_gelu_fused_into_the_quantized_projection():
    """PixArt's feed-forward GELU(tanh) runs in the QuantLinear (the GEMM epilogue where the kernel runs): same
    output as the unfused module, the GELU applied once, and the fusion survives a checkpoint round trip."""
    import viditq
    from diffusers.models.activations import GELU

    from viditq.layers import QuantLinear
    from viditq.testing import tiny_inputs, tiny_model

    model = tiny_model("pixart")
    inputs = tiny_inputs("pixart")
    viditq.quantize(model, "w8a8", calib=[inputs])
    gelus = [m for m in model.modules() if isinstance(m, GELU)]
    assert gelus and all(isinstance(m, fusion.FusedGELU) for m in gelus)
    assert all(m.proj.fused_activation == "gelu_tanh" for m in gelus)
    assert fusion.fuse_gelu(model) == len(gelus)  # idempotent: not fused twice
    x = torch.randn(2, 7, gelus[0].proj.in_features)
    with torch.no_grad():
        fused = gelus[0](x)
        gelus[0].proj.fused_activation = None
        unfused = torch.nn.functional.gelu(gelus[0].proj(x), approximate="tanh")
        gelus[0].proj.fused_activation = "gelu_tanh"
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)
    assert isinstance(gelus[0].proj, QuantLinear)



@pytest.mark.parametrize("shape,transpose", [((2, 6, 3, 64), True), ((5, 64), False), ((2, 3, 4, 32), False)])
def test_layer_norm_on_permuted_rows(shape, transpose):
    """Per-head q/k norms see (B, H, N, D) views of (B, N, H, D) tensors: normalized in place of their layout."""
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g).to(DEVICE)
    if transpose:
        x = x.transpose(1, 2)  # (B, H, N, D) view, not contiguous
    d = shape[-1]
    weight, bias = torch.randn(d, generator=g).to(DEVICE), torch.randn(d, generator=g).to(DEVICE)
    assert norm.layer_norm_supported(x)
    out = norm.layer_norm(x, weight, bias, 1e-6)
    ref = torch.nn.functional.layer_norm(x, (d,), weight, bias, 1e-6)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not norm.layer_norm_supported(torch.randn(4, 6, 8)[:, ::2])  # rows overlap no contiguous layout


def test_fuse_norms_takes_narrow_layer_norms_only(monkeypatch):
    from viditq.testing import tiny_model

    model = tiny_model("cogvideox").to(DEVICE)
    narrow = [m for m in model.modules() if type(m) is torch.nn.LayerNorm and m.normalized_shape[0] <= 256]
    wide = torch.nn.LayerNorm(512, device=DEVICE)
    model.add_module("wide_norm", wide)
    fusion.fuse_norms(model)
    assert narrow and all(type(m) is fusion.FusedLayerNorm for m in narrow) and type(wide) is torch.nn.LayerNorm
    x = torch.randn(2, 4, 5, narrow[0].normalized_shape[0], device=DEVICE)
    with torch.no_grad():
        monkeypatch.setattr(fusion.dispatch, "use_triton", lambda t: False)
        cpu_path = narrow[0](x)  # PyTorch's LayerNorm
        monkeypatch.setattr(fusion.dispatch, "use_triton", lambda t: True)  # the kernel (interpreter on CPU)
        kernel_path = narrow[0](x.transpose(1, 2))
    torch.testing.assert_close(kernel_path, cpu_path.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fp8,c", [(False, 72), (True, 72), (False, 100), (True, 64)])
def test_layer_norm_modulate_quant_gives_the_act_quant_codes_of_its_output(fp8, c):
    """The norm kernel's codes are exactly what the activation quantization computes from the norm's output
    (widths as a main tile plus a tail: 72 = 64 + 8, 100 = 64 + 36 padded to 64; 64 in one tile), with or
    without the float output written."""
    from viditq.kernels import reference

    g = torch.Generator().manual_seed(7)
    b, n = 2, 5
    x = (torch.randn(b, n, c, generator=g) * 3 + 1).to(DEVICE, torch.bfloat16)
    shift, scale = torch.randn(b, 6 * c, generator=g).to(DEVICE, torch.bfloat16).chunk(6, dim=1)[:2]
    smooth = (torch.rand(c, generator=g) + 0.5).to(DEVICE)
    y, codes, qscale = norm.layer_norm_modulate_quant(x, None, None, scale, shift, 1e-6, 8, smooth, fp8)
    torch.testing.assert_close(y, norm.layer_norm_modulate(x, None, None, scale, shift, 1e-6), rtol=0, atol=0)
    ref_codes, ref_scale = reference.quantize_activation(y.reshape(-1, c), 8, smooth, None, 1, 0, fp8)
    assert torch.equal(codes.float(), ref_codes.float()) and torch.equal(qscale, ref_scale)
    _, codes_only, qscale_only = norm.layer_norm_modulate_quant(x, None, None, scale, shift, 1e-6, 8, smooth, fp8,
                                                                write_y=False)
    assert torch.equal(codes_only.float(), codes.float()) and torch.equal(qscale_only, qscale)
    ref = norm.layer_norm_modulate_quant_reference(x, None, None, scale, shift, 1e-6, 8, smooth, fp8)
    torch.testing.assert_close(y.float(), ref[0].float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="smooth_inv"):
        norm.layer_norm_modulate_quant(x, None, None, scale, shift, 1e-6, 8, smooth[:-1], fp8)


def _fused_tiny(name: str, preset: str, fuse):
    """The tiny ``name`` model quantized with ``preset`` without rotation (what the norm kernel quantizes for),
    its float twin, its fused blocks — every block, ``fuse`` idempotent — and inputs, on DEVICE."""
    import dataclasses

    import viditq
    from viditq.config import BalanceSpec
    from viditq.testing import calibration_set, tiny_inputs, tiny_model

    cfg = dataclasses.replace(viditq.PRESETS[preset], balance=BalanceSpec(rotate=False))
    float_model = tiny_model(name)
    model = viditq.quantize(tiny_model(name), cfg, calibration_set(name, n=1))
    blocks = [m for m in model.transformer_blocks if type(m).__name__.startswith("Fused")]
    assert len(blocks) == len(model.transformer_blocks) and fuse(model) == len(blocks)
    x = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in tiny_inputs(name, seed=3).items()}
    return model.to(DEVICE), float_model.to(DEVICE), blocks, x


def _both_forwards(monkeypatch, model, x, calls: list):
    """(diffusers' output, the fused blocks' output, the quantization ``calls`` the fusion saved, the 8-bit
    attention calls of the fused forward); the fused one runs the kernels (the interpreter on CPU)."""
    from viditq.testing import forward_output

    monkeypatch.setattr(fusion, "_fusable", lambda t: False)
    unfused = forward_output(model, x)
    unfused_calls, calls[:] = len(calls), []
    monkeypatch.setattr(fusion, "_fusable", lambda t: True)
    attention_calls = _quantized_attention_calls(model)
    fused = forward_output(model, x)
    return unfused, fused, unfused_calls - len(calls), _quantized_attention_calls(model) - attention_calls


def _spy_quantization(monkeypatch, joint: bool):
    """(activation quantization calls, the norm kernel's ``write_y`` per call), the norm kernel poisoned: an
    output it did not write is NaN, so no reader may see it. ``joint``: every call has a prefix (CogVideoX)."""
    from viditq.kernels import dispatch

    calls, norm_calls = [], []
    real = dispatch.quantize_activation
    monkeypatch.setattr(dispatch, "quantize_activation", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_norm = norm.layer_norm_modulate_quant

    def poisoned_norm(*args, prefix=None):
        assert (prefix is not None) == joint
        y, codes, qscale = real_norm(*args, prefix=prefix)
        norm_calls.append(args[-1])
        return (y if args[-1] else y.fill_(float("nan"))), codes, qscale

    monkeypatch.setattr(norm, "layer_norm_modulate_quant", poisoned_norm)
    return calls, norm_calls


@pytest.mark.parametrize("preset,attention", [("w8a8", None), ("w8a8-fp8", None), ("w4a8-fp8", None),
                                              ("w8a8-fp8", "int8")])
def test_pixart_blocks_quantize_in_the_norm_kernel(monkeypatch, preset, attention):
    """Quantized PixArt blocks: the LayerNorm + modulation kernel also quantizes the q/k/v and feed-forward
    inputs (their own quantization calls go), the output projections add the residuals, the masked
    cross-attention (and 8-bit attention) runs as in diffusers: the unfused model's output up to the norm's
    rounding."""
    from viditq.kernels import dispatch
    from viditq.testing import forward_output, sqnr_db

    model, float_model, blocks, x = _fused_tiny("pixart", preset, fusion.fuse_ada_norm_single)
    mask = torch.ones(2, x["encoder_hidden_states"].shape[1], device=DEVICE)
    x["encoder_attention_mask"] = mask.index_fill_(1, torch.tensor([5, 6, 7], device=DEVICE), 0.0)
    if attention:
        from viditq.attention import apply_quantized_attention

        apply_quantized_attention(model, attention, min_kv_tokens=0)
    calls, norm_calls = _spy_quantization(monkeypatch, joint=False)
    residuals = []
    real_linear = dispatch.int_linear
    monkeypatch.setattr(dispatch, "int_linear", lambda *a: residuals.append(a[11] is not None) or real_linear(*a))
    unfused, fused, saved, quantized_attention = _both_forwards(monkeypatch, model, x, calls)
    assert quantized_attention == (2 * len(blocks) if attention else 0)
    assert saved == 2 * len(blocks)  # per block: q/k/v (one shared call) and FF up, in the norm kernel
    assert norm_calls == [False] * (2 * len(blocks))  # q/k/v and the FF read the codes only: y is not written
    # the two attention output projections and the FF down-projection add the residual in their epilogue
    assert sum(residuals) == 3 * len(blocks) and not any(residuals[:len(residuals) // 2])
    assert sqnr_db(unfused, fused) > 30
    ref = forward_output(float_model, x)
    assert abs(sqnr_db(ref, fused) - sqnr_db(ref, unfused)) < 1.0
    x["encoder_attention_mask"] = torch.ones_like(mask)  # the mask is read: unmasking changes the output
    assert sqnr_db(fused, forward_output(model, x)) < 40


@pytest.mark.parametrize("codes_only", [True, False])
def test_fused_pixart_blocks_run_module_hooks(monkeypatch, codes_only):
    """Hooks on the attention and feed-forward modules of a fused block still run (the block then calls those
    modules as they are, and the norm writes its float output for them): ``inject_outliers``'s pre-hooks, which
    scale the hidden states those modules receive, give the unfused model's output (they were once skipped: 18 dB
    lost, no error). ``codes_only``: hooks on q/k/v and the up-projection alone."""
    import dataclasses

    import viditq
    from viditq.config import BalanceSpec
    from viditq.testing import calibration_set, forward_output, inject_outliers, sqnr_db, tiny_inputs, tiny_model

    cfg = dataclasses.replace(viditq.PRESETS["w8a8"], balance=BalanceSpec(rotate=False))
    float_model = tiny_model("pixart")
    model = tiny_model("pixart")
    assert inject_outliers(float_model) == inject_outliers(model) > 0
    model = viditq.quantize(model, cfg, calibration_set("pixart", n=1))
    if codes_only:  # the hooks on the layers that would read the norm kernel's codes instead
        for net in (model, float_model):
            for name, m in net.named_modules():
                m._forward_pre_hooks.clear()
                if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "ff.net.0.proj")):
                    m.register_forward_pre_hook(lambda mod, args: (args[0] * 1.5,))
    model, float_model = model.to(DEVICE), float_model.to(DEVICE)
    x = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in tiny_inputs("pixart", seed=3).items()}
    ref = forward_output(float_model, x)
    monkeypatch.setattr(fusion, "_fusable", lambda t: False)
    unfused = forward_output(model, x)
    monkeypatch.setattr(fusion, "_fusable", lambda t: True)
    fused = forward_output(model, x)
    assert sqnr_db(ref, unfused) > 25
    assert abs(sqnr_db(ref, fused) - sqnr_db(ref, unfused)) < 1.0


def _quantized_attention_calls(model) -> int:
    return sum(getattr(m.processor, "counts", {}).get("quantized", 0) for m in model.modules()
               if hasattr(m, "processor"))


@pytest.mark.parametrize("preset", ["w8a8-fp8", "w4a8-fp8", "w8a8"])
def test_feed_forward_hands_its_hidden_state_over_quantized(monkeypatch, preset):
    """Where the down-projection qualifies (plain dynamic fp8 input: the fp8 presets; not w8a8's int8 input),
    the up-projection's epilogue quantizes the hidden state to fp8 per token for it, with a scale bounding the
    row: one quantization call per block fewer, the output as close to the float model as the per-token path, a
    hook on the down-projection turns the hand-off off (it sees the real hidden state), so does
    ``QuantConfig(ff_hand_off=False)``, and loading a state dict recomputes the bound."""
    import dataclasses

    import viditq
    from diffusers.models.attention import FeedForward

    from viditq.config import BalanceSpec
    from viditq.kernels import dispatch
    from viditq.testing import calibration_set, forward_output, sqnr_db, tiny_inputs, tiny_model

    rotate = preset == "w8a8"
    cfg = dataclasses.replace(viditq.PRESETS[preset], balance=BalanceSpec(rotate=rotate))
    float_model = tiny_model("pixart")
    model = viditq.quantize(tiny_model("pixart"), cfg, calibration_set("pixart", n=1))
    ffs = [m for m in model.modules() if isinstance(m, FeedForward)]
    handed = [m for m in ffs if isinstance(m, fusion.FusedFeedForward)]
    assert len(handed) == (0 if preset == "w8a8" else len(model.transformer_blocks))
    if preset == "w8a8":
        return
    model, float_model = model.to(DEVICE), float_model.to(DEVICE)
    x = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in tiny_inputs("pixart", seed=3).items()}
    calls, hand_offs = [], []
    real, real_out = dispatch.quantize_activation, dispatch.int_linear_quant_out
    monkeypatch.setattr(dispatch, "quantize_activation", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(dispatch, "int_linear_quant_out", lambda *a: hand_offs.append(1) or real_out(*a))
    ref = forward_output(float_model, x)
    for fusable in (False, True):  # diffusers' block forward, then the fused PixArt block
        monkeypatch.setattr(fusion, "_fusable", lambda t, on=fusable: on)
        calls.clear(), hand_offs.clear()
        out = forward_output(model, x)
        handed_calls = len(calls)
        assert len(hand_offs) == len(handed)
        for ff in handed:
            ff.__class__ = FeedForward
        calls.clear()
        plain = forward_output(model, x)
        for ff in handed:
            ff.__class__ = fusion.FusedFeedForward
        assert len(calls) - handed_calls == len(handed)
        assert sqnr_db(ref, out) > sqnr_db(ref, plain) - 0.5 and sqnr_db(plain, out) > 25
    assert fusion.fuse_gelu(model, hand_off=False) == len(ffs) and not any(
        isinstance(m, fusion.FusedFeedForward) for m in model.modules())
    assert torch.equal(forward_output(model, x), plain)  # the per-token path again
    fusion.fuse_gelu(model)
    seen = []
    handle = handed[0].net[2].register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    hand_offs.clear()
    with_hook = forward_output(model, x)
    handle.remove()
    assert len(hand_offs) == len(handed) - 1 and torch.isfinite(seen[0]).all() and seen[0].abs().amax() > 0
    assert sqnr_db(out, with_hook) > 25
    no_hand_off = viditq.quantize(tiny_model("pixart"), dataclasses.replace(cfg, ff_hand_off=False),
                                  calibration_set("pixart", n=1))
    assert not any(isinstance(m, fusion.FusedFeedForward) for m in no_hand_off.modules())
    up = handed[0].net[0].proj
    before = up._hand_off_range.clone()
    assert "_hand_off_range" not in up.state_dict()  # derived, not stored
    up.load_state_dict({k: v * 2 if k == "bias" else v for k, v in up.state_dict().items()})
    after = up._hand_off_range
    assert after[1].item() == pytest.approx(2 * before[1].item(), rel=1e-6) and torch.equal(after[0::2], before[0::2])
    model.to(torch.bfloat16)  # the bound keeps float32, as the layer's scales do
    assert up._hand_off_range.dtype == torch.float32 and torch.equal(up._hand_off_range, after)


@pytest.mark.parametrize("preset", ["w8a8-fp8", "w4a8-fp8", "w8a8"])
def test_fused_pixart_self_attention_projects_qkv_in_one_launch(monkeypatch, preset):
    """Where the kernels run, a fused block's q, k and v take one grouped GEMM launch on their shared codes (the
    norm kernel's; w8a8: the rotated input's int8 codes, quantized once) and per-channel weights (the W4 ones as
    their block staged them):
    the output equals the one-launch-per-layer block's up to summation order, which
    ``fuse_ada_norm_single(group_qkv=False)`` restores."""
    import dataclasses

    import viditq
    from viditq.config import BalanceSpec
    from viditq.kernels import dispatch
    from viditq.testing import calibration_set, forward_output, sqnr_db, tiny_inputs, tiny_model

    rotate = preset == "w8a8"
    cfg = dataclasses.replace(viditq.PRESETS[preset], balance=BalanceSpec(rotate=rotate, rotate_min_gain=0.0))
    model = tiny_model("pixart")
    if rotate:  # outlier channels in the q/k/v input (the modulation's scale), so that q/k/v take the rotation
        for block in model.transformer_blocks:
            block.scale_shift_table.data[1, :4] += 30.0
    model = viditq.quantize(model, cfg, calibration_set("pixart", n=1)).to(DEVICE)
    blocks = [m for m in model.modules() if isinstance(m, fusion.FusedAdaNormSingleBlock)]
    assert blocks and all((b.attn1.to_q.rot_signs is not None) == rotate for b in blocks)
    x = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in tiny_inputs("pixart", seed=4).items()}
    monkeypatch.setattr(dispatch, "use_triton", lambda t: True)  # the kernels (the interpreter on CPU)
    groups = []
    real = dispatch.int_linear_group
    monkeypatch.setattr(dispatch, "int_linear_group", lambda *a: groups.append(len(a[2])) or real(*a))
    grouped = forward_output(model, x)
    assert groups == [3] * len(blocks)
    assert fusion.fuse_ada_norm_single(model, group_qkv=False) == len(blocks)
    groups.clear()
    separate = forward_output(model, x)
    assert groups == [] and torch.isfinite(grouped).all()
    assert sqnr_db(separate, grouped) > 60


@pytest.mark.parametrize("fp8,n0", [(False, 3), (True, 3), (False, 0)])
def test_norm_kernel_normalizes_a_prefix_and_x_as_one_sequence(fp8, n0):
    """``prefix=(x0, scale0, shift0)``: the kernel's rows are those of ``torch.cat([x0, x], dim=1)``, each part
    with its own modulation (CogVideoX's text and video tokens): the same values as the kernel on each part alone,
    the codes of that output, the reference within bf16 rounding; mismatched parts fail with a clear error. The
    prefix's scale and shift have a batch stride of their own; 24 rows are not a whole number of programs."""
    from viditq.kernels import reference

    g = torch.Generator().manual_seed(11 + n0)
    b, n, c = 3, 5, 72
    x = (torch.randn(b, n, c, generator=g) * 3 + 1).to(DEVICE, torch.bfloat16)
    x0 = (torch.randn(b, n0, c, generator=g) - 2).to(DEVICE, torch.bfloat16)
    w, bias = (torch.randn(c, generator=g).to(DEVICE, torch.bfloat16) for _ in range(2))
    shift, scale = torch.randn(b, 6 * c, generator=g).to(DEVICE, torch.bfloat16).chunk(6, 1)[:2]
    shift0, scale0 = torch.randn(b, 2 * c, generator=g).to(DEVICE, torch.bfloat16).chunk(2, 1)
    y, codes, qscale = norm.layer_norm_modulate_quant(x, w, bias, scale, shift, 1e-6, 8, None, fp8,
                                                      prefix=(x0, scale0, shift0))
    assert y.shape == (b, n0 + n, c) and codes.shape == (b * (n0 + n), c)
    parts = torch.cat([norm.layer_norm_modulate(x0, w, bias, scale0, shift0, 1e-6),
                       norm.layer_norm_modulate(x, w, bias, scale, shift, 1e-6)], dim=1)
    assert torch.equal(y, parts)
    assert torch.equal(norm.layer_norm_modulate(x, w, bias, scale, shift, 1e-6, prefix=(x0, scale0, shift0)), y)
    joint = torch.cat([x0, x], dim=1)  # the parts as views of one sequence (batch stride n0 + n rows)
    views = norm.layer_norm_modulate_quant(joint[:, n0:], w, bias, scale, shift, 1e-6, 8, None, fp8,
                                           prefix=(joint[:, :n0], scale0, shift0))
    assert all(torch.equal(u, v) for u, v in zip(views, (y, codes, qscale)))
    ref_codes, ref_scale = reference.quantize_activation(y.reshape(-1, c), 8, None, None, 1, 0, fp8)
    assert torch.equal(codes.float(), ref_codes.float()) and torch.equal(qscale, ref_scale)
    ref = norm.layer_norm_modulate_quant_reference(x, w, bias, scale, shift, 1e-6, 8, None, fp8, (x0, scale0, shift0))
    torch.testing.assert_close(y.float(), ref[0].float(), rtol=2e-2, atol=6e-2)
    with pytest.raises(ValueError, match="prefix must be"):
        norm.layer_norm_modulate(x, w, bias, scale, shift, 1e-6, prefix=(x0[:, :, :-1], scale0, shift0))
    if n0 > 1:
        with pytest.raises(ValueError, match="contiguous rows"):  # rows must be contiguous, batches need not
            norm.layer_norm_modulate(x, w, bias, scale, shift, 1e-6, prefix=(joint[:, :n0:2], scale0, shift0))
    with pytest.raises(ValueError, match="prefix needs a scale"):
        norm.layer_norm_modulate(x, w, bias, scale, shift, 1e-6, prefix=(x0, None, shift0))
    with pytest.raises(ValueError, match="prefix's scale must be torch.bfloat16"):
        norm.layer_norm_modulate(x, w, bias, scale, shift, 1e-6, prefix=(x0, scale0.float(), shift0))


@pytest.mark.parametrize("preset,attention", [("w8a8-fp8", None), ("w4a8-fp8", "fp8"), ("w8a8", None),
                                              ("w8a8-fp8", "int8")])
def test_cogvideox_blocks_quantize_in_the_norm_kernel(monkeypatch, preset, attention):
    """Quantized CogVideoX blocks: one norm kernel quantizes the joint [text, video] input of q/k/v and of the
    feed-forward up-projection (those layers' own quantization calls go, the norm output is not written), the
    attention runs as diffusers' processor (8-bit where wrapped, and then the attention's preparation applies
    the q / k LayerNorms instead of the norm modules; in fp8 mode with fp8 activations its epilogue also writes
    the output projection's codes): the unfused model's output up to rounding."""
    from viditq.kernels import attention as KA
    from viditq.kernels import dispatch
    from viditq.testing import forward_output, sqnr_db

    model, float_model, blocks, x = _fused_tiny("cogvideox", preset, fusion.fuse_cogvideox_blocks)
    if attention:
        from viditq.attention import apply_quantized_attention

        apply_quantized_attention(model, attention, min_kv_tokens=0)
    ff_epilogue = preset == "w8a8"  # (off by default: the feed-forward's residual as a separate pass)
    monkeypatch.setattr(fusion.FusedCogVideoXBlock, "ff_residual_in_epilogue", ff_epilogue)
    calls, norm_calls = _spy_quantization(monkeypatch, joint=True)
    residuals, real_linear = [], dispatch.int_linear
    monkeypatch.setattr(dispatch, "int_linear",
                        lambda *a: residuals.append(a[13] is not None and a[13].shape[1]) or real_linear(*a))
    qk_norms, quant_outs = [], []  # (diffusers' path imported its own reference)
    for name, seen in (("quantized_attention", qk_norms), ("quantized_attention_quant_out", quant_outs)):
        monkeypatch.setattr(KA, name, functools.partial(
            lambda real, seen, *a, **k: seen.append(k.get("qk_norm") is not None) or real(*a, **k),
            getattr(KA, name), seen))
    norm_modules = [m for b in blocks for m in (b.attn1.norm_q, b.attn1.norm_k)]
    for m in norm_modules:
        m.forward = functools.partial(lambda m, *a: calls.append("qk norm") or type(m).forward(m, *a), m)
    assert fusion._qk_norm_args(blocks[0].attn1, 4096, 32) is None  # a replaced forward (a hook): the modules run
    for m in norm_modules:
        del m.forward
    unfused, fused, saved, quantized_attention = _both_forwards(monkeypatch, model, x, calls)
    assert quantized_attention == (len(blocks) if attention else 0)
    # 8-bit attention normalizes q and k itself, and in fp8 writes the output projection's codes (fp8 presets)
    assert quant_outs == [True] * (len(blocks) if attention == "fp8" else 0)
    assert qk_norms == [True] * (len(blocks) if attention == "int8" else 0)
    # the attention output projection (and with ff_epilogue the FF down-projection) adds the residual in two
    # parts, split at the text
    text_len = x["encoder_hidden_states"].shape[1]
    half = len(residuals) // 2  # (the unfused forward first)
    assert residuals[half:].count(text_len) == (2 if ff_epilogue else 1) * len(blocks) and not any(residuals[:half])
    # per block: q/k/v (one shared call) and FF up in the norm kernel, the output projection's in the attention's
    assert saved == (3 if attention == "fp8" else 2) * len(blocks)
    assert norm_calls == [False] * (2 * len(blocks))
    assert sqnr_db(unfused, fused) > 50  # float32: the norm's rounding, at most a rare code flip
    ref = forward_output(float_model, x)
    assert abs(sqnr_db(ref, fused) - sqnr_db(ref, unfused)) < 1.0


def test_fused_cogvideox_block_falls_back_to_diffusers(monkeypatch):
    """What the fused path would skip — a hook on a norm's LayerNorm, training mode (dropout) — sends the block
    through diffusers' forward: the hook runs, the norm kernel does not, the output is diffusers'."""
    import viditq
    from viditq.testing import calibration_set, tiny_inputs, tiny_model

    model = viditq.quantize(tiny_model("cogvideox"), viditq.PRESETS["w8a8-fp8"], calibration_set("cogvideox", n=1))
    model.to(DEVICE)
    x = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in tiny_inputs("cogvideox", seed=2).items()}
    kernel_calls, hook_calls = [], []
    real = norm.layer_norm_modulate_quant
    monkeypatch.setattr(norm, "layer_norm_modulate_quant", lambda *a, **k: kernel_calls.append(1) or real(*a, **k))

    def run(fusable):
        monkeypatch.setattr(fusion, "_fusable", lambda t: fusable)
        torch.manual_seed(0)  # (dropout in training mode)
        with torch.no_grad():
            return model(**x, return_dict=False)[0]

    blocks = model.transformer_blocks
    run(True)
    assert len(kernel_calls) == 2 * len(blocks)  # the fused path, as a control
    for hooked in ([b.norm2 for b in blocks], [b.norm1.norm for b in blocks]):
        kernel_calls.clear()
        handles = [m.register_forward_hook(lambda *a: hook_calls.append(1)) for m in hooked]
        assert torch.equal(run(True), run(False)) and not kernel_calls
        for handle in handles:
            handle.remove()
    assert len(hook_calls) >= 2 * len(blocks)  # norm2 in both runs (a norm module's kernel may skip its LayerNorm)
    model.train()
    kernel_calls.clear()
    assert torch.equal(run(True), run(False)) and not kernel_calls


@pytest.mark.parametrize("attention", [None, "fp8"])
def test_fused_cogvideox_block_rotates_the_video_tokens(monkeypatch, attention):
    """With rotary embeddings (CogVideoX-5B and later) the fused block rotates q and k of the video tokens only,
    as diffusers' processor does — with 8-bit attention, in its preparation (with the q / k norms): one block,
    both forwards, same output up to the norm's rounding."""
    import viditq
    from viditq.kernels import attention as KA
    from viditq.testing import calibration_set, sqnr_db, tiny_model

    model = viditq.quantize(tiny_model("cogvideox"), viditq.PRESETS["w8a8-fp8"], calibration_set("cogvideox", n=1))
    if attention:
        from viditq.attention import apply_quantized_attention

        apply_quantized_attention(model, attention, min_kv_tokens=0)
    ropes = []  # (fp8 attention with fp8 activations: the route that also writes the projection's codes)
    for name in ("quantized_attention", "quantized_attention_quant_out"):
        monkeypatch.setattr(KA, name, functools.partial(
            lambda real, *a, **k: ropes.append(k.get("rope") is not None) or real(*a, **k), getattr(KA, name)))
    block = model.transformer_blocks[0].to(DEVICE)
    assert isinstance(block, fusion.FusedCogVideoXBlock)
    g = torch.Generator().manual_seed(5)
    c, heads, n, t = 64, 2, 12, 4
    hidden, enc = torch.randn(2, n, c, generator=g).to(DEVICE), torch.randn(2, t, c, generator=g).to(DEVICE)
    temb = torch.randn(2, block.norm1.linear.in_features, generator=g).to(DEVICE)
    angles = torch.randn(n, c // heads // 2, generator=g).repeat_interleave(2, dim=-1).to(DEVICE)
    rotary = (angles.cos(), angles.sin())
    with torch.no_grad():
        monkeypatch.setattr(fusion, "_fusable", lambda t: False)
        unfused = block(hidden, enc, temb, image_rotary_emb=rotary)
        plain = block(hidden, enc, temb)
        monkeypatch.setattr(fusion, "_fusable", lambda t: True)
        calls = []
        real = norm.layer_norm_modulate_quant
        monkeypatch.setattr(norm, "layer_norm_modulate_quant", lambda *a, **k: calls.append(1) or real(*a, **k))
        fused = block(hidden, enc, temb, image_rotary_emb=rotary)
    assert len(calls) == 2  # the fused path: both norms in the kernel
    assert ropes == ([True] if attention else [])  # 8-bit attention rotates q and k itself
    # what the block adds to its inputs (the residual stream would dominate a comparison of the outputs)
    added = [(y - x0).float() for y, x0 in zip(fused, (hidden, enc))]
    expected = [(y - x0).float() for y, x0 in zip(unfused, (hidden, enc))]
    for a, b in zip(added, expected):
        assert sqnr_db(b, a) > 30
    assert sqnr_db(expected[0], plain[0] - hidden) < 15  # the rotation changes the video tokens' update


def test_norm_kernel_with_a_prefix_compiles_for_sm90(sm90_compile):
    """The joint (prefix) norm kernel compiles for the H100 (Triton's bundled ptxas, no GPU) at CogVideoX's width
    in every variant the fused blocks launch, without spills (registers: 79-96 with Triton 3.6, the GPU image's,
    with or without the prefix; up to 130 with the prefix under Triton 3.9)."""
    out = sm90_compile("norm")
    assert len(out) == 8 and sorted(v["compiles"] for v in out.values()) == list(range(1, 9))
    for name, report in out.items():
        assert report["spill_stores"] == report["spill_loads"] == 0, (name, report)

