"""GPTQ (error-compensating rounding) vs round-to-nearest, alone and inside balanced QuantLinear layers."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

import viditq
from viditq.balance import make_rotation
from viditq.gptq import apply_gptq, gptq_quantize, hessian_hooks, temporal_differences, video_token_layout
from viditq.layers import QuantLinear, make_layer_spec
from viditq.config import ActSpec, BalanceSpec, QuantConfig, WeightSpec
from viditq.quant.quantizers import quantize_weight
from viditq.testing import calibration_set, forward_output, sqnr_db, tiny_inputs, tiny_model


def correlated_rows(n: int, k: int, seed: int) -> torch.Tensor:
    """Rows with strongly correlated channels (a random low-rank mix plus noise) and a few outlier channels."""
    mix = torch.randn(k // 4, k, generator=torch.Generator().manual_seed(0))  # same distribution for every seed
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k // 4, generator=g) @ mix + 0.1 * torch.randn(n, k, generator=g)
    x[:, :3] *= 8
    return x


def output_error(w, qw, x):
    return float((x @ (qw.dequantize() - w).T).pow(2).mean())


@pytest.mark.parametrize("symmetric,group_size", [(True, None), (False, None), (False, 32), (True, 64)])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(symmetric, group_size):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    x_cal, x_test = correlated_rows(2048, 128, 1), correlated_rows(512, 128, 2)
    rtn = quantize_weight(w, 4, symmetric, group_size)
    gptq = gptq_quantize(w, x_cal.T @ x_cal / len(x_cal), 4, symmetric, group_size)
    assert gptq.codes.shape == rtn.codes.shape and gptq.scale.shape == rtn.scale.shape
    assert (gptq.zero is None) == symmetric and gptq.codes.abs().max() <= 8
    assert output_error(w, gptq, x_test) < 0.3 * output_error(w, rtn, x_test)


def test_gptq_with_identity_hessian_is_round_to_nearest():
    w = torch.randn(16, 64)
    for group_size in (None, 32):
        rtn = quantize_weight(w, 4, False, group_size)
        gptq = gptq_quantize(w, torch.eye(64), 4, False, group_size)
        assert torch.equal(gptq.codes, rtn.codes)


def test_gptq_rejects_a_wrong_hessian():
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_quantize(torch.randn(4, 8), torch.eye(4), 4)


def test_hessian_hooks_accumulate_x_t_x():
    lin = nn.Linear(8, 4)
    xs = [torch.randn(3, 5, 8) for _ in range(2)]
    with hessian_hooks({"lin": lin}) as hessians:
        for x in xs:
            lin(x)
    rows = torch.cat([x.reshape(-1, 8) for x in xs])
    torch.testing.assert_close(hessians["lin"], rows.T @ rows / len(rows))


def test_gptq_in_the_balanced_basis_of_a_quant_linear():
    """Smoothing + Hadamard rotation folded in: GPTQ must use the balanced Hessian and still win."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    x_cal, x_test = correlated_rows(2048, 128, 3), correlated_rows(512, 128, 4)
    spec = make_layer_spec(linear, WeightSpec(4, False, 32), ActSpec(8))
    signs, m, block = make_rotation(128, seed=0, max_block=64)
    assert (m, block) == (1, 64)
    smooth = x_cal.abs().amax(0).pow(0.5) / linear.weight.abs().amax(0).pow(0.5)
    spec = dataclasses.replace(spec, smooth=True, rotate=True, rot_m=m, rot_block=block)
    layer = QuantLinear.from_linear(linear, spec, smooth=smooth, rotation=signs)
    with torch.no_grad():
        ref = linear(x_test)
        rtn_err = float((layer(x_test) - ref).pow(2).mean())
        kept = apply_gptq(layer, linear, x_cal.T @ x_cal / len(x_cal), rows=x_cal[:256])
        gptq_err = float((layer(x_test) - ref).pow(2).mean())
    assert kept and gptq_err < 0.7 * rtn_err


def test_gptq_end_to_end_on_a_diffusers_model():
    model = tiny_model("pixart")
    calib = calibration_set("pixart", n=2)
    fast = dict(balance=BalanceSpec(alphas=(0.5,)), calib_rows_per_layer=128)
    rtn_cfg = QuantConfig("w4a8", WeightSpec(4, False, 64), ActSpec(8), **fast)
    gptq_cfg = dataclasses.replace(rtn_cfg, name="w4a8-gptq", weight=WeightSpec(4, False, 64, gptq=True))
    evals = [tiny_inputs("pixart", seed=s) for s in (1, 2)]
    refs = [forward_output(model, x) for x in evals]
    rtn, gptq = (viditq.quantize(copy.deepcopy(model), c, calib) for c in (rtn_cfg, gptq_cfg))
    for r, x in zip(refs, evals):
        assert sqnr_db(r, forward_output(gptq, x)) > sqnr_db(r, forward_output(rtn, x)) + 2.0


# ------------------------------------------------------------------------------------------ temporal Hessian
@pytest.mark.parametrize("name,layout", [("cogvideox", (8, 3, 16)), ("wan", (0, 3, 16)), ("pixart", None)])
def test_video_token_layout_of_real_diffusers_models(name, layout):
    model, seen = tiny_model(name), []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(video_token_layout(m, a, kw)), with_kwargs=True)
    forward_output(model, tiny_inputs(name))
    assert seen == [layout]


def test_temporal_differences_are_second_differences_of_the_video_tokens():
    prefix, frames, positions, k = 2, 4, 3, 5
    x = torch.randn(2, prefix + frames * positions, k)
    d = temporal_differences(x, (prefix, frames, positions))
    v = x[:, prefix:].reshape(2, frames, positions, k)
    expected = torch.stack([v[:, f + 1] - 2 * v[:, f] + v[:, f - 1] for f in range(1, frames - 1)], 1)
    torch.testing.assert_close(d, expected.reshape(-1, k))
    torch.testing.assert_close(temporal_differences(x[:, prefix:], (prefix, frames, positions)), d)  # no prefix
    assert temporal_differences(x[:, 1:], (prefix, frames, positions)) is None  # another sequence
    assert temporal_differences(x, None) is None and temporal_differences(x[0], (prefix, frames, positions)) is None
    assert temporal_differences(torch.randn(1, 2 * 3, k), (0, 2, 3)) is None  # fewer than 3 frames


def test_hessian_hooks_add_the_trace_normalized_temporal_term():
    model = tiny_model("cogvideox")
    layer = model.transformer_blocks[0].ff.net[2]
    inputs = []
    layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    kwargs = tiny_inputs("cogvideox")
    with hessian_hooks({"down": layer}, model, temporal=2.5) as hessians:
        forward_output(model, kwargs)
    with hessian_hooks({"down": layer}) as plain:
        forward_output(model, kwargs)
    x = inputs[0]
    rows = x.reshape(-1, x.shape[-1])
    h = rows.T @ rows / len(rows)
    d = temporal_differences(x, (8, 3, 16))
    dd = d.T @ d / len(d)
    torch.testing.assert_close(plain["down"], h)
    torch.testing.assert_close(hessians["down"], h + 2.5 * torch.trace(h) / torch.trace(dd) * dd)


def test_temporal_gptq_keeps_frame_to_frame_changes_better():
    """Frames that change slowly (a static part plus a small moving component): plain GPTQ pushes its rounding
    error into the low-energy directions the frame-to-frame changes live in — 2x round-to-nearest's error on the
    second frame differences (what flicker scores) — while the temporal term keeps most of GPTQ's output gain."""
    g = torch.Generator().manual_seed(0)
    frames, positions, k = 12, 64, 128
    static = correlated_rows(positions, k, 5)
    motion = torch.randn(positions, k, generator=g) @ torch.randn(k, k, generator=g) / k ** 0.5
    t = torch.arange(frames, dtype=torch.float32)[:, None, None]
    x = (static[None] + 0.3 * torch.sin(0.5 * t) * motion[None]).reshape(1, frames * positions, k)
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    rows, d = x.reshape(-1, k), temporal_differences(x, (0, frames, positions))
    h, dd = rows.T @ rows / len(rows), d.T @ d / len(d)
    w = torch.randn(48, k, generator=g)
    rtn = quantize_weight(w, 4, False, 32)
    plain = gptq_quantize(w, h, 4, False, 32)
    temporal = gptq_quantize(w, h + torch.trace(h) / torch.trace(dd) * dd, 4, False, 32)
    assert output_error(w, plain, d) > 2 * output_error(w, rtn, d)
    assert output_error(w, temporal, d) < 0.6 * output_error(w, plain, d)
    assert output_error(w, temporal, rows) < 0.5 * output_error(w, rtn, rows)


def test_gptq_temporal_in_quantize_changes_only_video_models():
    base = viditq.PRESETS["w4a8-gptq"]
    config = dataclasses.replace(base, weight=dataclasses.replace(base.weight, gptq_temporal=10.0))
    for name, changes in (("cogvideox", True), ("pixart", False)):
        calib = calibration_set(name)
        model = tiny_model(name)
        ref = forward_output(model, calib[0])
        outs = [forward_output(viditq.quantize(copy.deepcopy(model), c, calib), calib[0]) for c in (base, config)]
        assert all(torch.isfinite(o).all() for o in outs)
        assert (not torch.equal(outs[0], outs[1])) == changes
        assert sqnr_db(ref, outs[1]) > sqnr_db(ref, outs[0]) - 3.0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "10"])
def test_gptq_temporal_is_validated(bad):
    with pytest.raises(ValueError, match="gptq_temporal"):
        WeightSpec(4, gptq=True, gptq_temporal=bad)


def test_gptq_temporal_needs_gptq_and_round_trips():
    with pytest.raises(ValueError, match="needs gptq=True"):
        WeightSpec(4, gptq_temporal=1.0)
    config = dataclasses.replace(viditq.PRESETS["w4a8-gptq"],
                                 weight=WeightSpec(4, False, 64, gptq=True, gptq_temporal=30.0))
    assert QuantConfig.from_dict(config.to_dict()) == config
