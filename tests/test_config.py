import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from viditq.config import (
    DEFAULT_KEEP_FP, PRESETS, ActSpec, BalanceSpec, LayerRule, MixedPrecisionSpec, QuantConfig, WeightSpec,
    resolve_config,
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
    (lambda: QuantConfig.from_dict({"nbits": 8}), "unknown field 'nbits' in QuantConfig; known: name, weight"),
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


# -- usability: strings, nested sections, file errors ------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_keep_fp_string_is_one_pattern(tmp_path, suffix):
    assert QuantConfig(keep_fp="proj_out").keep_fp == ("proj_out",)
    assert QuantConfig(keep_fp=["proj_out", r"ff\."]).keep_fp == ("proj_out", r"ff\.")
    assert QuantConfig(keep_fp=()).keep_fp == () and QuantConfig().keep_fp == DEFAULT_KEEP_FP
    extended = QuantConfig(keep_fp=DEFAULT_KEEP_FP + ("proj_out",))  # the documented way to extend the defaults
    assert extended.keep_fp[:-1] == DEFAULT_KEEP_FP
    path = tmp_path / f"cfg{suffix}"
    path.write_text('{"keep_fp": "proj_out"}' if suffix == ".json" else 'keep_fp: "proj_out"\n')
    assert QuantConfig.load(path).keep_fp == ("proj_out",)
    with pytest.raises(ValueError, match=r"keep_fp\[1\] must be a string, got 3"):
        QuantConfig(keep_fp=["proj_out", 3])
    with pytest.raises(ValueError, match="keep_fp must be a list of strings, got None"):
        QuantConfig(keep_fp=None)
    assert "replaces" in QuantConfig.__doc__ and "DEFAULT_KEEP_FP +" in QuantConfig.__doc__


@pytest.mark.parametrize("data,match", [
    ({"weight": {"symetric": False}}, "unknown field 'symetric' in section 'weight'; known: bits, symmetric, "),
    ({"act": {"bits": 8, "granularty": "per_token"}}, "unknown field 'granularty' in section 'act'; known: bits, "),
    ({"balance": {"alpha": [0.5], "rotat": True}}, "unknown fields 'alpha', 'rotat' in section 'balance'; known: "),
    ({"mixed_precision": {"budget": 5}}, "unknown field 'budget' in section 'mixed_precision'; known: budget_bits"),
    ({"rules": [{"pattern": "attn"}, {"pattern": r"ff\.", "weight_bit": 8}]},
     r"unknown field 'weight_bit' in section 'rules\[1\]'; known: pattern, weight_bits, act_bits, keep_fp, timesteps"),
    ({"rules": [{"weight_bits": 8}]}, r"missing field 'pattern' in section 'rules\[0\]'"),
    ({"rules": ["ff"]}, r"section 'rules\[0\]' must be a LayerRule or a mapping of its fields \(pattern, "),
    ({"rules": {"pattern": "ff"}}, "rules must be a list of LayerRules or mappings"),
    ({"weight": 4}, r"section 'weight' must be a WeightSpec or a mapping of its fields \(bits, "),
    ({"weight": None}, "section 'weight' must be a WeightSpec"),
    ({"balance": {"alphas": 0.5}}, "balance alphas must be a list of numbers, got 0.5"),
    ({"balance": {"rotate_min_gain": "0.1"}}, "balance rotate_min_gain must be a number, got '0.1'"),
    ({"weight": {"bits": 4, "symmetric": "no"}}, "weight symmetric must be True or False, got 'no'"),
    ({"weight": {"bits": 4, "group_size": "64"}}, "weight group_size must be an integer or None, got '64'"),
    ({"mixed_precision": {"timestep_ranges": "4"}}, "mixed_precision timestep_ranges must be an integer, got '4'"),
    ({"rules": [{"pattern": "ff", "timesteps": 500}]}, "rule 'ff' timesteps must be a .lo, hi. pair of numbers"),
    ({"calib_rows_per_layer": "512"}, "calib_rows_per_layer must be an integer, got '512'"),
    ({"name": 3}, "name must be a string, got 3"),
])
def test_nested_sections_give_clear_errors(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig.from_dict(data)
    for suffix in (".yaml", ".json"):  # the same message from a file, after the file's name
        path = tmp_path / f"cfg{suffix}"
        path.write_text(yaml.safe_dump(data) if suffix == ".yaml" else json.dumps(data))
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {match}"):
            QuantConfig.load(path)


def test_python_dicts_build_nested_sections():
    cfg = QuantConfig(weight={"bits": 4, "symmetric": False, "group_size": 64}, act={"bits": 8},
                      balance={"alphas": [0.5]}, mixed_precision={"budget_bits": 5.0},
                      rules=[{"pattern": r"ff\.", "weight_bits": 8, "timesteps": [0, 500]}, LayerRule("attn2", 8)])
    assert cfg.weight == WeightSpec(4, False, 64) and cfg.act == ActSpec(8)
    assert cfg.balance == BalanceSpec(alphas=(0.5,))
    assert cfg.mixed_precision == MixedPrecisionSpec(budget_bits=5.0)
    assert cfg.rules == (LayerRule(r"ff\.", 8, timesteps=(0.0, 500.0)), LayerRule("attn2", 8))
    assert cfg == QuantConfig.from_dict(cfg.to_dict())
    assert dataclasses.replace(PRESETS["w8a8"], weight={"bits": 6}).weight == WeightSpec(6)
    with pytest.raises(ValueError, match="unknown field 'bit' in section 'weight'"):
        QuantConfig(weight={"bit": 4})
    with pytest.raises(ValueError, match=r"section 'rules\[0\]' must be a LayerRule or a mapping.*got 3"):
        QuantConfig(rules=[3])
    with pytest.raises(ValueError, match="rules must be a list of LayerRules"):
        QuantConfig(rules=LayerRule("ff", 8))
    with pytest.raises(ValueError, match="weight bits must be an integer between 2 and 8, got 9"):
        QuantConfig(weight={"bits": 9})


def test_rule_timesteps_are_validated():
    assert LayerRule("ff", timesteps=[0, 500]).timesteps == (0.0, 500.0)
    assert LayerRule("ff", timesteps=(250, 250)).timesteps == (250.0, 250.0)  # inclusive: one timestep
    assert LayerRule("ff", timesteps=(float("-inf"), float("inf"))).timesteps[1] == float("inf")  # all
    for bad in (500, (0, 250, 500), (0,), "0-500", {"lo": 0, "hi": 500}):
        with pytest.raises(ValueError, match=r"rule 'ff' timesteps must be a \(lo, hi\) pair of numbers or None"):
            LayerRule("ff", timesteps=bad)
    for bad in ((0, "500"), (True, 500), (0, None)):
        with pytest.raises(ValueError, match=r"rule 'ff' timesteps\[\d\] must be a number"):
            LayerRule("ff", timesteps=bad)
    for bad in ((600, 100), (0, float("nan"))):
        with pytest.raises(ValueError, match=r"rule 'ff' timesteps must be \(lo, hi\) with lo <= hi"):
            LayerRule("ff", timesteps=bad)


@pytest.mark.parametrize("name,text,match", [
    ("bad.yaml", "name: [unclosed\n", r"bad.yaml: invalid YAML at line 2, column 1: .*flow sequence at line 1"),
    ("tab.yml", "name: x\n\tweight: {}\n", r"tab.yml: invalid YAML at line 2"),
    ("bad.json", '{"name": "x",\n "weight": }', r"bad.json: invalid JSON at line 2, column 12: Expecting value"),
    ("list.yaml", "- w8a8\n", "list.yaml: expected a mapping of QuantConfig fields"),
])
def test_malformed_files_name_the_file_and_line(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        QuantConfig.load(tmp_path / name)
    with pytest.raises(ValueError, match=match):
        resolve_config(str(tmp_path / name))


def test_numpy_numbers_and_paths_become_python_values():
    """numpy numbers (from a sweep) and a pathlib cache path are accepted and stored as what JSON can write."""
    import numpy as np

    from viditq.config import MixedPrecisionSpec, QuantConfig, WeightSpec

    cfg = QuantConfig("np", weight=WeightSpec(bits=np.int64(4), symmetric=np.bool_(False), group_size=np.int64(64)),
                      calib_rows_per_layer=np.int32(128))
    assert type(cfg.weight.bits) is int and type(cfg.weight.symmetric) is bool and type(cfg.calib_rows_per_layer) is int
    assert QuantConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert MixedPrecisionSpec(cache=Path("/tmp/x.json"), budget_bits=np.float32(5)).cache == "/tmp/x.json"
