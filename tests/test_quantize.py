"""End-to-end accuracy of viditq.quantize on real diffusers classes (small configs, random weights)."""
import copy
import functools

import pytest
import torch
from torch import nn

import viditq
from viditq.layers import QuantLinear
from viditq.quantize import layer_group, plan_layers, quantized_layers
from viditq.testing import MODELS, calibration_set, forward_output, inject_outliers, sqnr_db, tiny_inputs, tiny_model

PRESETS = ("w8a8", "w8a8-dynamic", "w8a8-static", "w4a8", "w4a8-dynamic", "w6a6", "w4a4", "w8a8-fp8",
           "w8a8-fp8-dynamic")


@functools.lru_cache(maxsize=None)
def sqnr_table(name: str) -> dict[str, float]:
    """SQNR (dB) of each preset vs the float model, on a model with injected channel outliers."""
    model = tiny_model(name)
    inject_outliers(model)
    calib = calibration_set(name)
    evals = [tiny_inputs(name, seed=s) for s in (1, 2)]
    refs = [forward_output(model, x) for x in evals]
    table = {}
    for preset in PRESETS:
        q = viditq.quantize(copy.deepcopy(model), preset, calib)
        table[preset] = min(sqnr_db(r, forward_output(q, x)) for r, x in zip(refs, evals))
    return table


@pytest.mark.parametrize("name", MODELS)
def test_w8a8_sqnr_at_least_30db_with_outliers(name):
    assert sqnr_table(name)["w8a8"] >= 30.0


@pytest.mark.parametrize("name", MODELS)
def test_per_token_dynamic_beats_static(name):
    t = sqnr_table(name)
    assert t["w8a8-dynamic"] > t["w8a8-static"] + 3.0


@pytest.mark.parametrize("name", MODELS)
def test_balancing_helps(name):
    t = sqnr_table(name)
    assert t["w8a8"] > t["w8a8-dynamic"] + 2.0
    assert t["w4a8"] >= t["w4a8-dynamic"] - 0.25  # never hurts at W4A8 ...


def test_balancing_beats_no_balancing_at_w4a8_on_average():
    gains = [sqnr_table(n)["w4a8"] - sqnr_table(n)["w4a8-dynamic"] for n in MODELS]
    assert sum(gains) / len(gains) > 0.5  # ... and helps on average


def test_bit_width_ordering():
    for name in MODELS:
        t = sqnr_table(name)
        assert t["w8a8"] > t["w6a6"] > t["w4a4"]
        assert t["w4a8"] > t["w4a4"]


@pytest.mark.parametrize("name", MODELS)
def test_fp8_sqnr_with_outliers(name):
    """fp8 e4m3 (3 mantissa bits) is coarser than int8 on the bulk of a row but needs no rotation for outliers:
    >= 40 dB with outliers injected, balancing never worse than none, below balanced int8."""
    t = sqnr_table(name)
    assert t["w8a8-fp8"] >= 40.0
    assert t["w8a8-fp8"] >= t["w8a8-fp8-dynamic"] - 0.25
    assert t["w8a8"] > t["w8a8-fp8"]


def test_fp8_layers_store_fp8_codes():
    model = viditq.quantize(tiny_model("pixart"), "w8a8-fp8", calibration_set("pixart", n=1))
    layers = quantized_layers(model)
    assert layers and all(m.spec.fp8 and m.weight_codes.dtype == torch.float8_e4m3fn
                          and m.weight_scale.shape == (m.out_features, 1) and m.weight_zero is None
                          for m in layers.values())
    layer = layers["transformer_blocks.0.ff.net.2"]
    x = torch.randn(3, layer.in_features)
    # the layer computes exactly the reference formula on its own buffers
    from viditq.kernels import reference
    codes, scale = reference.quantize_activation(x, 8, layer.smooth_inv, layer.rot_signs, layer.spec.rot_m, fp8=True)
    want = reference.int_linear(codes, scale, layer.weight_codes, layer.weight_scale, None, layer.in_features,
                                False, layer.bias, torch.float32)
    assert torch.equal(layer(x), want)


def test_quantize_swaps_linears_and_keeps_conditioning_layers():
    model = tiny_model("pixart")
    viditq.quantize(model, "w8a8", calibration_set("pixart", n=1))
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert "transformer_blocks.0.attn1.to_q" in names and "transformer_blocks.1.ff.net.2" in names
    assert not any(n.startswith(("adaln_single", "caption_projection", "proj_out")) for n in names)
    assert type(model.proj_out) is nn.Linear
    assert model.viditq_config.name == "w8a8"


def test_layer_groups():
    assert layer_group("transformer_blocks.0.attn2.to_k") == "cross_attn"
    assert layer_group("temporal_transformer_blocks.1.attn1.to_q") == "temporal_attn"
    assert layer_group("transformer_blocks.0.attn1.to_out.0") == "self_attn"
    assert layer_group("blocks.3.ffn.net.0.proj") == "ffn"
    assert layer_group("single_transformer_blocks.0.proj_mlp") == "ffn"


def test_rules_override_bits_and_keep_fp():
    cfg = viditq.QuantConfig("mp", viditq.WeightSpec(4, False, 64), viditq.ActSpec(8),
                             rules=(viditq.LayerRule(r"ff\.", weight_bits=8), viditq.LayerRule("attn2", keep_fp=True)))
    plan = plan_layers(tiny_model("pixart"), cfg)
    assert plan["transformer_blocks.0.ff.net.2"][1].weight_bits == 8
    assert plan["transformer_blocks.0.attn1.to_q"][1].weight_bits == 4
    assert not any("attn2" in n for n in plan)


def test_empty_calibration_is_rejected():
    with pytest.raises(ValueError, match="calibration data is empty"):
        viditq.quantize(tiny_model("pixart"), "w8a8", [])


def test_nan_in_calibration_is_rejected():
    calib = calibration_set("pixart", n=2)
    calib[1]["encoder_hidden_states"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="sample 1.*encoder_hidden_states.*NaN"):
        viditq.quantize(tiny_model("pixart"), "w8a8", calib)


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="unknown preset"):
        viditq.quantize(tiny_model("pixart"), "int3", calibration_set("pixart", n=1))


def test_quantizing_twice_is_rejected():
    model = viditq.quantize(tiny_model("sd3"), "w8a8", calibration_set("sd3", n=1))
    with pytest.raises(ValueError, match="already quantized"):
        viditq.quantize(model, "w8a8", calibration_set("sd3", n=1))


@pytest.mark.parametrize("preset", ["w8a8", "w4a8", "w8a8-static"])
def test_zero_range_channels_give_finite_output(preset):
    """Dead input channels (always 0 in calibration) and an all-zero input must not produce NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 32))

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x)

    def sample():
        x = torch.randn(16, 64)
        x[:, :8] = 0  # zero-range channels
        return {"x": x}

    m = viditq.quantize(Wrapped(), preset, [sample() for _ in range(2)])
    y = m(torch.zeros(4, 64))
    assert torch.isfinite(y).all()
    x = sample()["x"]
    assert torch.isfinite(m(x)).all() and sqnr_db(model(x), m(x)) > 15


def test_generic_module_with_any_kwargs():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(96, 192), nn.Linear(192, 96)

        def forward(self, hidden, scale=1.0):
            return self.fc2(torch.nn.functional.gelu(self.fc1(hidden))) * scale

    torch.manual_seed(0)
    m = Mlp()
    ref_model = copy.deepcopy(m)
    viditq.quantize(m, "w8a8", [{"hidden": torch.randn(2, 10, 96), "scale": 2.0} for _ in range(3)])
    x = torch.randn(2, 10, 96)
    assert sqnr_db(ref_model(x), m(x)) > 35


def test_casting_the_model_keeps_scales_in_full_precision():
    model = viditq.quantize(tiny_model("pixart"), "w4a8", calibration_set("pixart", n=1))
    x = tiny_inputs("pixart", seed=3)
    ref = forward_output(model, x)
    layer = model.transformer_blocks[0].ff.net[2]  # K = 256: g64 scales
    dtypes = {n: b.dtype for n, b in layer.named_buffers() if n != "bias"}
    assert dtypes["weight_scale"] == torch.float16
    model.to(torch.bfloat16)
    assert dtypes == {n: b.dtype for n, b in layer.named_buffers() if n != "bias"}
    assert layer.bias.dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    xb = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}
    assert sqnr_db(ref, forward_output(model, xb)) > 20  # bf16 activations, same integer weights


def test_quantized_model_traces_under_torch_compile():
    """Dynamo captures QuantLinear without graph breaks and the compiled model matches eager exactly."""
    model = viditq.quantize(tiny_model("pixart"), "w4a8", calibration_set("pixart", n=1))
    layer = model.transformer_blocks[0].ff.net[2]
    x = torch.randn(2, 16, layer.in_features)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), layer(x))
    inputs = tiny_inputs("pixart", seed=3)
    assert torch.equal(forward_output(torch.compile(model, backend="aot_eager"), inputs), forward_output(model, inputs))


# ----------------------------------------------------------------------------------------- shared q/k/v input
def _quant_calls(monkeypatch):
    from viditq.kernels import dispatch

    calls = []
    real = dispatch.quantize_activation

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(dispatch, "quantize_activation", counting)
    return calls


def test_qkv_share_one_balancing_and_one_quantization(monkeypatch):
    """Self-attention q/k/v (and cross-attention k/v, which read the text states) share smoothing + rotation,
    and each group's input is quantized once per forward, with outputs bit-identical to quantizing per layer."""
    model = viditq.quantize(tiny_model("pixart"), "w8a8", calibration_set("pixart", n=2))
    attn1, attn2 = model.transformer_blocks[0].attn1, model.transformer_blocks[0].attn2
    assert {attn1.to_q.spec.input_group, attn1.to_k.spec.input_group, attn1.to_v.spec.input_group} == \
        {"transformer_blocks.0.attn1.to_q+to_k+to_v"}
    assert attn2.to_q.spec.input_group is None
    assert attn2.to_k.spec.input_group == attn2.to_v.spec.input_group == "transformer_blocks.0.attn2.to_k+to_v"
    for a, b in [(attn1.to_q, attn1.to_k), (attn1.to_q, attn1.to_v), (attn2.to_k, attn2.to_v)]:
        assert a._input_cache is b._input_cache is not None
        for name in ("smooth_inv", "rot_signs"):
            ta, tb = getattr(a, name), getattr(b, name)
            assert (ta is None and tb is None) or torch.equal(ta, tb)
    inputs = tiny_inputs("pixart", seed=3)
    calls = _quant_calls(monkeypatch)
    shared = forward_output(model, inputs)
    n_shared = len(calls)
    for layer in quantized_layers(model).values():
        layer._input_cache = None
    calls.clear()
    separate = forward_output(model, inputs)
    assert torch.equal(shared, separate)
    # 2 blocks: 3 - 1 calls saved in attn1, 2 - 1 in attn2
    assert len(calls) - n_shared == 2 * (2 + 1)
    assert all(layer._input_cache is None or layer._input_cache._ref is None
               for layer in quantized_layers(model).values() if layer.spec.input_group)  # nothing held after


def test_shared_input_cache_misses_on_a_modified_or_different_tensor():
    from viditq.layers import LayerSpec, install_input_sharing

    torch.manual_seed(0)
    spec = LayerSpec(64, 32, True, 8, True, 64, 8, smooth=True, input_group="g")
    smooth = torch.rand(64) + 0.5
    mods = nn.ModuleList(QuantLinear.from_linear(nn.Linear(64, 32), spec, smooth=smooth) for _ in range(2))
    assert install_input_sharing(mods) == 1
    x = torch.randn(5, 64)
    y0 = mods[0](x)
    x.mul_(2.0)  # in place: the cached codes are stale
    separate = QuantLinear.from_linear(nn.Linear(64, 32), spec, smooth=smooth)
    separate.load_state_dict(mods[1].state_dict())
    assert torch.equal(mods[1](x), separate(x))
    assert torch.equal(mods[0](x.clone()), separate_first(mods[0], x))
    assert y0.shape == (5, 32)
    # deep copies get their own (empty) cache, still shared within the copy
    copied = copy.deepcopy(mods)
    assert copied[0]._input_cache is copied[1]._input_cache is not mods[0]._input_cache
    # different balancing tensors: not shared
    mods[1].smooth_inv.mul_(2)
    assert install_input_sharing(mods) == 0 and mods[0]._input_cache is None


def separate_first(layer, x):
    cache, layer._input_cache = layer._input_cache, None
    try:
        return layer(x)
    finally:
        layer._input_cache = cache


def test_share_inputs_off_keeps_separate_balancing():
    model = viditq.quantize(tiny_model("pixart"), "w8a8", calibration_set("pixart", n=1), share_inputs=False)
    assert all(layer.spec.input_group is None and layer._input_cache is None
               for layer in quantized_layers(model).values())


def test_shared_qkv_under_torch_compile_matches_eager():
    model = viditq.quantize(tiny_model("pixart"), "w8a8", calibration_set("pixart", n=1))
    inputs = tiny_inputs("pixart", seed=4)
    assert torch.equal(forward_output(torch.compile(model, backend="aot_eager"), inputs),
                       forward_output(model, inputs))
