import pytest

from viditq.config import (
    PRESETS, ActSpec, BalanceSpec, LayerRule, MixedPrecisionSpec, QuantConfig, WeightSpec, resolve_config,
)


def test_presets_exist_and_resolve():
    for name in ("w8a8", "w6a6", "w4a8", "w4a4", "w8a8-static"):
        assert resolve_config(name) is PRESETS[name]
    assert PRESETS["w4a8"].weight.bits == 4 and PRESETS["w4a8"].act.bits == 8
    assert PRESETS["w8a8-static"].act.granularity == "per_tensor_static" and PRESETS["w8a8-static"].balance is None


def test_unknown_preset_names_choices():
    with pytest.raises(ValueError, match="unknown preset 'w3a3'.*w8a8"):
        resolve_config("w3a3")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_file_round_trip(tmp_path, suffix):
    cfg = QuantConfig("mine", WeightSpec(4, False, 128), ActSpec(8), BalanceSpec(alphas=(0.5,)),
                      rules=(LayerRule("ff", weight_bits=8), LayerRule("attn2", keep_fp=True, timesteps=(0, 500))))
    path = tmp_path / f"cfg{suffix}"
    cfg.save(path)
    assert QuantConfig.load(path) == cfg
    assert resolve_config(str(path)) == cfg


@pytest.mark.parametrize("make,match", [
    (lambda: WeightSpec(9), "between 2 and 8"),
    (lambda: WeightSpec(1), "between 2 and 8"),
    (lambda: ActSpec(8, "per_channel"), "granularity"),
    (lambda: WeightSpec(4, group_size=48), "power of two"),
    (lambda: LayerRule("(", weight_bits=4), "invalid layer rule"),
    (lambda: LayerRule("x", act_bits=12), "between 2 and 8, or 16 .*got 12"),
    (lambda: LayerRule("x", weight_bits=16), "rule weight bits must be an integer between 2 and 8, got 16"),
    (lambda: ActSpec(32), "activation bits .* or 16 .*got 32"),
    (lambda: WeightSpec(16), "weight bits must be an integer between 2 and 8, got 16"),
    (lambda: QuantConfig(float_final_steps=-1), "float_final_steps .*got -1"),
    (lambda: QuantConfig(float_final_steps=True), "float_final_steps .*got True"),
    (lambda: MixedPrecisionSpec(float_act_budget=1.5), "float_act_budget .*got 1.5"),
    (lambda: QuantConfig(attention="int4"), "attention"),
    (lambda: BalanceSpec(alphas=(1.5,)), "alphas"),
    (lambda: BalanceSpec(rotate_block=48), "rotate_block"),
    (lambda: BalanceSpec(rotate_min_gain=1.0), "rotate_min_gain"),
    (lambda: QuantConfig.from_dict({"nbits": 8}), "unknown QuantConfig fields"),
    (lambda: WeightSpec(8, format="fp16"), "format must be one of"),
    (lambda: WeightSpec(4, format="fp8"), "has 8 bits"),
    (lambda: WeightSpec(8, group_size=64, format="fp8"), "per output channel"),
    (lambda: ActSpec(8, "per_tensor_static", format="fp8"), "per token"),
    (lambda: QuantConfig(weight=WeightSpec(8, format="fp8")), "differ"),
    (lambda: QuantConfig(weight=WeightSpec(8, format="fp8"), act=ActSpec(8, format="fp8"),
                         rules=(LayerRule("ff", weight_bits=4),)), "8-bit weights and 8-bit .or float. activations only"),
])
def test_bad_values_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_video_mixed_precision_preset_round_trips(tmp_path):
    cfg = PRESETS["w4a8-mp-video"]
    spec = cfg.mixed_precision
    assert spec.flicker and spec.float_act_budget == 0.15 and (spec.timestep_ranges, spec.final_range_steps) == (5, 1)
    assert cfg.weight.gptq_temporal == 1.0 and not PRESETS["w4a8-mp"].mixed_precision.flicker
    cfg.save(tmp_path / "mp.yaml")
    assert QuantConfig.load(tmp_path / "mp.yaml") == cfg


def test_fp8_preset_round_trips(tmp_path):
    cfg = PRESETS["w8a8-fp8"]
    assert cfg.weight.format == cfg.act.format == "fp8" and cfg.balance is not None
    assert PRESETS["w8a8-fp8-dynamic"].balance is None
    cfg.save(tmp_path / "fp8.yaml")
    assert QuantConfig.load(tmp_path / "fp8.yaml") == cfg


def test_w4a8_fp8_preset_and_its_limits():
    cfg = PRESETS["w4a8-fp8"]
    assert (cfg.weight.format, cfg.weight.bits, cfg.weight.group_size, cfg.act.format) == ("int", 4, 64, "fp8")
    with pytest.raises(ValueError, match="4-bit int weights .staged to fp8. with fp8 activations"):
        QuantConfig("x", WeightSpec(8), ActSpec(8, format="fp8"))
    with pytest.raises(ValueError, match=r"4-bit weights and 8-bit .or float. activations only.*\['ff'\]"):
        QuantConfig("x", WeightSpec(4, False, 64), ActSpec(8, format="fp8"), rules=(LayerRule("ff", 8),))
    QuantConfig("x", WeightSpec(4, False, 64), ActSpec(8, format="fp8"), rules=(LayerRule("ff", act_bits=16),))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_float_activation_level_round_trips(tmp_path, suffix):
    cfg = QuantConfig("a16", WeightSpec(4, False, 64), ActSpec(8), float_final_steps=2,
                      mixed_precision=MixedPrecisionSpec(float_act_budget=0.1),
                      rules=(LayerRule("attn", act_bits=16, timesteps=(0, 249)), LayerRule("ff", 8, 16)))
    cfg.save(tmp_path / f"cfg{suffix}")
    loaded = QuantConfig.load(tmp_path / f"cfg{suffix}")
    assert loaded == cfg and loaded.rules[0].act_bits == 16 and loaded.float_final_steps == 2
    assert loaded.mixed_precision.float_act_budget == 0.1
    assert ActSpec(16).bits == 16  # weight-only quantization
    preset = PRESETS["w8a8-float-last"]
    assert preset.float_final_steps == 1 and preset.weight == PRESETS["w8a8"].weight
    assert PRESETS["w8a8"].float_final_steps == 0  # the default preset is unchanged


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        resolve_config(str(tmp_path / "nope.yaml"))
