"""GPTQ (error-compensating rounding) vs round-to-nearest, alone and inside balanced QuantLinear layers."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

import viditq
from viditq.balance import make_rotation
from viditq.gptq import apply_gptq, gptq_quantize, hessian_hooks
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
