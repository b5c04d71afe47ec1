"""Mixed precision: timestep-aware layers, sensitivity measurement, decoupled bit allocation, w4a8-mp."""
import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

import viditq
from viditq.config import ActSpec, BalanceSpec, LayerRule, MixedPrecisionSpec, QuantConfig, WeightSpec
from viditq.layers import TimestepSwitchLinear
from viditq.mixed_precision import (
    MSE, Metric, OutputMetric, SensitivityTable, allocate, flicker_metric, group_key, layer_groups, measure_sensitivity,
    plot_sensitivity, split_timesteps, temporal_second_difference,
)
from viditq.quantize import layer_schedule
from viditq.testing import calibration_set, forward_output, inject_outliers, sqnr_db, tiny_inputs, tiny_model

W4A8 = QuantConfig("w4a8", WeightSpec(4, False, 64), ActSpec(8))
# Fewer balancing candidates and calibration rows than the presets: same code paths, faster tests.
FAST = dict(balance=BalanceSpec(alphas=(0.5,)), calib_rows_per_layer=128)


# ------------------------------------------------------------------------------------------ a tiny generic model
class TimeMlp(nn.Module):
    """Three residual blocks (attention-like + FFN linears) whose input scale grows with the timestep."""

    def __init__(self, width: int = 64, blocks: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "attn1": nn.ModuleDict({"to_q": nn.Linear(width, width), "to_out": nn.Linear(width, width)}),
            "ff": nn.ModuleDict({"fc": nn.Linear(width, width)}),
        }) for _ in range(blocks))

    def forward(self, hidden_states, timestep):
        h = hidden_states * (1 + timestep.float()[:, None, None] / 250)
        for block in self.blocks:
            h = h + block["attn1"]["to_out"](torch.tanh(block["attn1"]["to_q"](h)))
            h = h + block["ff"]["fc"](torch.relu(h))
        return h


def mlp_sample(t: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 64, generator=g)
    x[..., :2] *= 10  # outlier channels
    return {"hidden_states": x, "timestep": torch.full((2,), t)}


MLP_CALIB = [mlp_sample(t, i) for i, t in enumerate((50, 300, 550, 800, 950, 150, 700, 400))]


# ------------------------------------------------------------------------------------------ config / schedule
def test_layer_schedule_from_timestep_rules():
    cfg = QuantConfig("t", WeightSpec(4, False, 64), ActSpec(8), rules=(
        LayerRule("attn", weight_bits=8, timesteps=(0, 500)), LayerRule("to_q", keep_fp=True, timesteps=(400, 600))))
    default, schedule = layer_schedule("blocks.0.attn1.to_q", cfg)
    assert default[0].bits == 4
    assert [(lo, hi, None if p is None else p[0].bits) for lo, hi, p in schedule] == [
        (0.0, math.nextafter(400.0, -math.inf), 8), (400.0, 600.0, None)]
    assert layer_schedule("blocks.0.ff.fc", cfg) == (default, [])


def test_groups_and_timestep_ranges():
    assert group_key("transformer_blocks.3.attn2.to_k") == "transformer_blocks.3/cross_attn"
    assert group_key("transformer_blocks.3.ff.net.2", "role") == "ffn"
    groups = layer_groups(["b.0.attn1.to_q", "b.0.attn1.to_k", "b.1.ff.fc"])
    assert groups == {"b.0/self_attn": ["b.0.attn1.to_q", "b.0.attn1.to_k"], "b.1/ffn": ["b.1.ff.fc"]}
    ranges, shares = split_timesteps(MLP_CALIB, 4)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1000 and len(ranges) == 4
    assert shares == [0.25] * 4 and ranges[0][1] == (150 + 300) / 2


def test_final_range_steps_gives_the_last_steps_a_range_of_their_own():
    # MLP_CALIB timesteps 50, 150, 300, 400, 550, 700, 800, 950 (one sample each)
    ranges, shares = split_timesteps(MLP_CALIB, 4, final_range_steps=1)
    assert ranges == [(0.0, 100.0), (100.0, 350.0), (350.0, 625.0), (625.0, 1000.0)]  # 50 | 150 300 | 400 550 | ...
    assert shares == [1 / 8, 2 / 8, 2 / 8, 3 / 8]
    # 10 steps of a DPM schedule: the even split puts t = 99 and 199 in one range, the final range only t = 99
    steps = [{"timestep": torch.tensor([float(t)])} for t in range(999, 0, -100)]
    assert split_timesteps(steps, 4)[0][0] == (0.0, 249.0)
    ranges, shares = split_timesteps(steps, 5, final_range_steps=1)
    assert ranges == [(0.0, 149.0), (149.0, 349.0), (349.0, 549.0), (549.0, 749.0), (749.0, 1000.0)]
    assert shares == pytest.approx([0.1, 0.2, 0.2, 0.2, 0.3])
    assert split_timesteps(steps, 2, final_range_steps=3) == ([(0.0, 349.0), (349.0, 1000.0)], pytest.approx([0.3, 0.7]))
    assert split_timesteps(MLP_CALIB, 4, final_range_steps=2) == split_timesteps(MLP_CALIB, 4)  # same split
    with pytest.raises(ValueError, match="final_range_steps=1 needs timestep_ranges >= 2"):
        split_timesteps(MLP_CALIB, 1, final_range_steps=1)
    with pytest.raises(ValueError, match=r"final_range_steps=8 must be smaller than .* timesteps \(8\)"):
        split_timesteps(MLP_CALIB, 4, final_range_steps=8)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="final_range_steps must be an integer >= 0"):
            split_timesteps(MLP_CALIB, 4, final_range_steps=bad)
    with pytest.raises(ValueError, match="final_range_steps must be an integer >= 0, got -1"):
        MixedPrecisionSpec(final_range_steps=-1)
    with pytest.raises(ValueError, match="final_range_steps=1 needs timestep_ranges >= 2"):
        MixedPrecisionSpec(timestep_ranges=1, final_range_steps=1)


def test_final_range_table_round_trip_and_cache(tmp_path):
    """A table with a final-step range keeps its ranges through save / load; the cache tells it from the even
    split (other ranges, other fingerprint) and the MSE cells of a group still add up to the same total."""
    model = TimeMlp()
    base = dataclasses.replace(W4A8, **FAST)
    calls = []
    metric = Metric(lambda m: calls.append(1) or 0.0)
    cache = tmp_path / "s.json"
    table = measure_sensitivity(model, MLP_CALIB, {"m": metric}, timestep_ranges=3, final_range_steps=1,
                                base_config=base, cache=cache)
    assert table.ranges == [(0.0, 100.0), (100.0, 475.0), (475.0, 1000.0)]
    assert table.range_shares == [1 / 8, 3 / 8, 4 / 8] and table.damage.shape == (2, 6, 3, 2)
    loaded = SensitivityTable.load(cache)
    assert loaded.ranges == table.ranges and loaded.range_shares == table.range_shares
    assert loaded.fingerprint == table.fingerprint and torch.equal(loaded.damage, table.damage)
    n = len(calls)
    again = measure_sensitivity(model, MLP_CALIB, {"m": metric}, timestep_ranges=3, final_range_steps=1,
                                base_config=base, cache=cache)
    assert len(calls) == n and torch.equal(again.damage, table.damage)  # reused
    even = measure_sensitivity(model, MLP_CALIB, {"m": metric}, timestep_ranges=3, base_config=base, cache=cache)
    assert len(calls) > n and even.fingerprint != table.fingerprint  # other ranges: measured again
    assert even.ranges == [(0.0, 225.0), (225.0, 625.0), (625.0, 1000.0)]
    torch.testing.assert_close(table.damage[..., 0].sum(-1), even.damage[..., 0].sum(-1))
    # final_range_steps is not hashed, only the ranges: a setting that splits as the default shares its table
    same = measure_sensitivity(model, MLP_CALIB, {"m": metric}, timestep_ranges=4, final_range_steps=2,
                               base_config=base, measure_high=False)
    default = measure_sensitivity(model, MLP_CALIB, {"m": metric}, timestep_ranges=4, base_config=base,
                                  measure_high=False)
    assert same.fingerprint == default.fingerprint and same.ranges == default.ranges


# ------------------------------------------------------------------------------------------ switching layers
def test_timestep_switching_uses_the_weights_of_the_range():
    """Outputs at t in [0, 500] are bit-identical to a model with 8-bit weights everywhere, outside to W4A8."""
    mixed_cfg = QuantConfig("m", WeightSpec(4, False, 64), ActSpec(8),
                            rules=(LayerRule("attn1", weight_bits=8, timesteps=(0, 500)),))
    w8_cfg = QuantConfig("w", WeightSpec(4, False, 64), ActSpec(8), rules=(LayerRule("attn1", weight_bits=8),))
    model = TimeMlp()
    mixed, w8, w4 = (viditq.quantize(copy.deepcopy(model), dataclasses.replace(cfg, **FAST), MLP_CALIB)
                     for cfg in (mixed_cfg, w8_cfg, W4A8))
    switch = mixed.blocks[0]["attn1"]["to_q"]
    assert isinstance(switch, TimestepSwitchLinear) and set(switch.variants) == {"w4a8", "w8a8"}
    early, late = mlp_sample(200, 99), mlp_sample(800, 99)
    assert torch.equal(mixed(**early), w8(**early)) and not torch.equal(mixed(**early), w4(**early))
    assert switch.active_key() == "w8a8"
    assert torch.equal(mixed(**late), w4(**late)) and switch.active_key() == "w4a8"


def test_mixed_checkpoint_round_trip_and_honest_memory(tmp_path):
    cfg = QuantConfig("m", WeightSpec(4, False, 64), ActSpec(8), rules=(
        LayerRule(r"transformer_blocks\.0\.attn1", weight_bits=8, timesteps=(0, 500)),
        LayerRule(r"transformer_blocks\.1\.ff", keep_fp=True, timesteps=(500, 1000))))
    model = viditq.quantize(tiny_model("pixart"), dataclasses.replace(cfg, **FAST), calibration_set("pixart", n=2))
    viditq.save_quantized(model, tmp_path / "ck")
    loaded = viditq.load_quantized(tmp_path / "ck")
    for t in (100, 900):
        x = tiny_inputs("pixart", seed=5)
        x["timestep"] = torch.full((2,), t)
        assert torch.equal(forward_output(model, x), forward_output(loaded, x))
    switch = loaded.get_submodule("transformer_blocks.0.attn1.to_q")
    assert isinstance(switch, TimestepSwitchLinear) and set(switch.variants) == {"w4a8", "w8a8"}
    # both copies are stored, and the memory report counts every stored tensor once
    codes = {key: v.weight_codes for key, v in switch.variants.items()}
    assert codes["w8a8"].numel() == 64 * 64 and codes["w4a8"].numel() == 64 * 32  # int8 and packed int4
    tensors = {id(t): t for t in [*loaded.parameters(), *loaded.buffers()]}
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert viditq.memory_report(loaded).total_after == stored


# ------------------------------------------------------------------------------------------ allocation
def synthetic_table(damage: torch.Tensor, params=None, metrics=("a",), levels=("w4a8", "w8a8")) -> SensitivityTable:
    """damage (L, G, T, M)."""
    _, g, t, _ = damage.shape
    groups = {f"b.{i}/ffn": [f"b.{i}.ff.fc"] for i in range(g)}
    params = params or [100] * g
    ranges = [(i * 1000 / t, (i + 1) * 1000 / t) for i in range(t)]
    return SensitivityTable(groups, dict(zip(groups, params)), ranges, [1 / t] * t, list(metrics),
                            {m: False for m in metrics}, list(levels), damage.double())


def test_allocation_respects_budget_and_prefers_sensitive_groups():
    low = torch.tensor([1.0, 8.0, 2.0, 6.0])[:, None, None]  # (G, T=1, M=1)
    table = synthetic_table(torch.stack([low, torch.zeros_like(low)]))
    a = allocate(table, W4A8, budget_bits=6.0)  # half the parameters may be 8-bit
    assert a.executed_bits <= 6.0 and a.executed_bits == pytest.approx(6.0)
    assert [lv[0] for lv in a.levels.values()] == ["w4a8", "w8a8", "w4a8", "w8a8"]
    assert a.damage_left["a"] == pytest.approx(3 / 17)
    # bigger groups cost more: a sensitive but huge group loses to two smaller ones with more damage per bit
    table = synthetic_table(torch.stack([low, torch.zeros_like(low)]), params=[100, 300, 100, 100])
    a = allocate(table, W4A8, budget_bits=5.6)
    assert [lv[0] for lv in a.levels.values()] == ["w4a8", "w4a8", "w8a8", "w8a8"]


def test_allocation_is_decoupled_across_metrics():
    """Metric b's numbers are 1000x smaller; summing would serve only metric a. Each family gets its top group."""
    a_dmg = torch.tensor([900.0, 1000.0, 0.0, 0.0])
    b_dmg = torch.tensor([0.0, 0.0, 0.5, 0.1])
    low = torch.stack([a_dmg, b_dmg], -1)[:, None, :]  # (G, 1, 2)
    table = synthetic_table(torch.stack([low, torch.zeros_like(low)]), metrics=("a", "b"))
    a = allocate(table, W4A8, budget_bits=6.0)
    assert [lv[0] for lv in a.levels.values()] == ["w4a8", "w8a8", "w8a8", "w4a8"]
    assert a.damage_left["b"] == pytest.approx(0.1 / 0.6)
    only_a = allocate(table, W4A8, budget_bits=6.0, metrics=["a"])
    assert [lv[0] for lv in only_a.levels.values()] == ["w8a8", "w8a8", "w4a8", "w4a8"]


def test_timestep_aware_allocation_and_memory_cap(tmp_path):
    # group 0 hurts only in range 0, group 1 everywhere a bit less per range
    low = torch.tensor([[[10.0], [0.0], [0.0], [0.0]], [[3.0], [3.0], [3.0], [3.0]]])  # (G=2, T=4, 1)
    table = synthetic_table(torch.stack([low, torch.zeros_like(low)]))
    a = allocate(table, W4A8, budget_bits=5.0)  # 1/4 of the parameter-steps at 8 bits: 2 cells
    assert a.levels["b.0/ffn"] == ["w8a8", "w4a8", "w4a8", "w4a8"]
    assert a.levels["b.1/ffn"].count("w8a8") == 1
    assert a.executed_bits == pytest.approx(5.0) and a.stored_bits == pytest.approx(12.0)  # two copies each
    rules = [r for r in a.config.rules if r.timesteps is not None]
    assert len(rules) == 2 and rules[0].timesteps == (0.0, 250.0) and rules[0].weight_bits == 8
    a.config.save(tmp_path / "mp.yaml")
    assert QuantConfig.load(tmp_path / "mp.yaml") == a.config
    # with a memory cap of 6 stored bits only one group may hold 8-bit weights, and then in every range
    capped = allocate(table, W4A8, budget_bits=None, memory_bits=6.0)
    assert capped.stored_bits <= 6.0 and capped.levels["b.1/ffn"] == ["w8a8"] * 4
    assert capped.levels["b.0/ffn"] == ["w4a8"] * 4
    whole = allocate(table, W4A8, budget_bits=6.0, timestep_aware=False)
    assert whole.levels == {"b.0/ffn": ["w4a8"], "b.1/ffn": ["w8a8"]} and all(r.timesteps is None for r in whole.config.rules)


def test_allow_fp_keeps_the_most_sensitive_cells_in_float():
    low = torch.tensor([10.0, 1.0])[:, None, None]
    high = torch.tensor([5.0, 0.0])[:, None, None]  # group 0 stays bad at 8 bits
    a = allocate(synthetic_table(torch.stack([low, high])), W4A8, budget_bits=10.0, allow_fp=True)
    assert a.levels["b.0/ffn"] == ["fp"] and a.config.rules[-1].keep_fp


A16_LEVELS = ("w4a8", "w8a8", "w4a16", "w8a16")


def a16_table() -> SensitivityTable:
    """Two groups x two ranges. Group 0's damage in range 0 is activation noise (float activations remove it,
    8-bit weights barely help); group 1's is weight error (8-bit weights remove it, float activations do not)."""
    w4a8 = torch.tensor([[10.0, 0.0], [6.0, 0.0]])
    w8a8 = torch.tensor([[9.0, 0.0], [0.0, 0.0]])
    w4a16 = torch.tensor([[0.0, 0.0], [6.0, 0.0]])
    w8a16 = torch.zeros(2, 2)
    return synthetic_table(torch.stack([w4a8, w8a8, w4a16, w8a16])[..., None], levels=A16_LEVELS)


def test_float_act_budget_spends_float_activations_where_activation_noise_is():
    table = a16_table()
    a = allocate(table, W4A8, budget_bits=5.0, float_act_budget=0.25)  # one cell of each
    assert a.levels == {"b.0/ffn": ["w4a16", "w4a8"], "b.1/ffn": ["w8a8", "w4a8"]}
    assert a.damage_left["a"] == 0.0 and a.float_act_share == pytest.approx(0.25)
    # float activations cost no weight bits: executed 4 + 4 * 1/4, stored W4 for group 0 and W4 + W8 for group 1
    assert a.executed_bits == pytest.approx(5.0) and a.stored_bits == pytest.approx((4 + 12) / 2)
    rules = {(r.pattern, r.weight_bits, r.act_bits, r.timesteps) for r in a.config.rules}
    assert rules == {(r"^(?:b\.0\.ff\.fc)$", 4, 16, (0.0, 500.0)), (r"^(?:b\.1\.ff\.fc)$", 8, 8, (0.0, 500.0))}
    # without the level the same weight budget goes to group 1 and group 0's noise stays (10 of 16)
    plain = allocate(table, W4A8, budget_bits=5.0)
    assert plain.levels == {"b.0/ffn": ["w4a8", "w4a8"], "b.1/ffn": ["w8a8", "w4a8"]}
    assert plain.damage_left["a"] == pytest.approx(10 / 16) and plain.float_act_share == 0.0
    two_level = allocate(synthetic_table(table.damage[:2]), W4A8, budget_bits=5.0)
    assert two_level.levels == plain.levels and two_level.config == plain.config
    # with float activations in every cell of group 0 allowed, still only the cell that pays is taken
    wide = allocate(table, W4A8, budget_bits=5.0, float_act_budget=1.0)
    assert wide.levels["b.0/ffn"] == ["w4a16", "w4a8"] and wide.float_act_share == pytest.approx(0.25)
    with pytest.raises(ValueError, match="float_acts=True"):
        allocate(synthetic_table(table.damage[:2]), W4A8, budget_bits=5.0, float_act_budget=0.25)
    with pytest.raises(ValueError, match="float_act_budget must be in .*got 2"):
        allocate(table, W4A8, budget_bits=5.0, float_act_budget=2)


def test_float_activations_go_to_the_largest_summed_share_not_in_turns():
    """Family a's damage is all activation noise in group 0 (shares 0.6 and 0.4 per range); family b's float-
    activation gain is one tenth of its damage (group 1, range 0). Two cells of budget: both go to group 0 (the
    larger shares), where turn-taking would give b one of them."""
    a = torch.tensor([[6.0, 4.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [1.0, 9.0]])
    w4a8 = torch.stack([a, b], -1)  # (G, T, M)
    w4a16 = torch.stack([torch.zeros(2, 2), torch.tensor([[0.0, 0.0], [0.0, 9.0]])], -1)
    table = synthetic_table(torch.stack([w4a8, torch.zeros_like(w4a8), w4a16, torch.zeros_like(w4a8)]),
                            metrics=("a", "b"), levels=A16_LEVELS)
    allocation = allocate(table, W4A8, budget_bits=4.0, float_act_budget=0.5)
    assert allocation.levels == {"b.0/ffn": ["w4a16", "w4a16"], "b.1/ffn": ["w4a8", "w4a8"]}
    assert allocation.damage_left == {"a": 0.0, "b": 1.0} and allocation.executed_bits == 4.0


def test_allocation_rejects_impossible_budget():
    table = synthetic_table(torch.ones(2, 2, 1, 1))
    with pytest.raises(ValueError, match="below the all-w4a8"):
        allocate(table, W4A8, budget_bits=3.0)
    with pytest.raises(ValueError, match="low level"):
        allocate(table, "w8a8")


# ------------------------------------------------------------------------------------------ sensitivity
def test_sensitivity_proxy_user_metric_and_cache(tmp_path):
    model = TimeMlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evals = [mlp_sample(t, 50 + t) for t in (100, 900)]
    refs = [model(**x) for x in evals]

    def neg_error(m):  # a user metric, higher is better
        with torch.no_grad():
            return -sum(float((m(**x) - r).pow(2).mean()) for x, r in zip(evals, refs))

    calls = []
    metric = Metric(lambda m: calls.append(1) or neg_error(m), higher_is_better=True)
    base = dataclasses.replace(W4A8, **FAST)
    # a metric set: two names from one evaluation, with their own directions
    pair = Metric(lambda m: {"err_up": -neg_error(m), "err_down": neg_error(m)}, {"err_up": False, "err_down": True})
    # output metrics score the calibration outputs of the probed range only (no extra model calls)
    outs = OutputMetric(lambda o, s, r: {"power": sum(float(x.pow(2).mean()) for x in o) / len(o),
                                         "out_err": -sum(float((x - y).pow(2).mean()) for x, y in zip(o, r))},
                        {"power": True, "out_err": True})
    table = measure_sensitivity(model, MLP_CALIB, {"err": metric, "pair": pair, "outs": outs}, timestep_ranges=4,
                                base_config=base, cache=tmp_path / "s.json")
    assert table.metrics == [MSE, "err", "err_up", "err_down", "power", "out_err"]
    assert table.damage.shape == (2, 6, 4, 6)
    torch.testing.assert_close(table.damage[..., 2], table.damage[..., 1])
    torch.testing.assert_close(table.damage[..., 3], table.damage[..., 1])
    assert (table.damage[..., 4].abs() > 0).all()
    ratio = table.damage[..., 5] / table.damage[..., 0]  # same squared error, other normalization: proportional
    torch.testing.assert_close(ratio, ratio.flatten()[0].expand_as(ratio))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # model restored
    assert type(model.blocks[0]["ff"]["fc"]) is nn.Linear and model._viditq_timestep_hook is None
    assert (table.damage[0, ..., :4] >= 0).all() and (table.damage[0, ..., 0] > table.damage[1, ..., 0]).all()
    # the user metric sees only eval timesteps 100 and 900: ranges 1 and 2 (t in 225..875) do no damage to it
    assert (table.damage[:, :, 1:3, 1].abs() < 1e-12).all() and (table.damage[0, :, 0, 1] > 0).all()
    n_calls = len(calls)
    again = measure_sensitivity(model, MLP_CALIB, {"err": metric, "pair": pair, "outs": outs}, timestep_ranges=4,
                                base_config=base,
                                cache=tmp_path / "s.json")
    assert len(calls) == n_calls and torch.equal(again.damage, table.damage)  # from the cache
    measure_sensitivity(model, MLP_CALIB[:4], {"err": metric}, timestep_ranges=4, base_config=base,
                        cache=tmp_path / "s.json")
    assert len(calls) > n_calls  # other calibration data: recomputed
    png = plot_sensitivity(table, tmp_path / "s.png")
    assert png.stat().st_size > 1000


def test_flicker_metric_scores_frame_to_frame_noise_of_the_final_step():
    """Known videos (B=1, F=6, 2 values): the float output changes like f^2 (second difference 2), a probe adds
    c * (-1)^f (second difference 4c, alternating sign) or an error growing at a constant rate (second difference 0)."""
    f = torch.arange(6.0)[None, :, None].expand(1, 6, 2)
    ref = f ** 2
    torch.testing.assert_close(temporal_second_difference(ref), torch.full((1, 4, 2), 2.0))
    alternating = (-1.0) ** f
    late, early = {"timestep": torch.tensor([100.0])}, {"timestep": torch.tensor([900.0])}
    calib = [late, early]
    error = flicker_metric(calib).fn  # mode "error", final step only
    assert error([ref + 0.1 * alternating], [late], [ref])["flicker"] == pytest.approx(4 * 0.1 / 2, rel=1e-5)
    assert error([ref + 0.5 * f], [late], [ref])["flicker"] == pytest.approx(0.0, abs=1e-6)  # constant-rate error: no flicker
    assert error([ref + 0.1 * alternating], [early], [ref])["flicker"] == 0.0  # not the final step: not counted
    every_step = flicker_metric(calib, final_steps=None).fn
    assert every_step([ref + alternating], [early], [ref])["flicker"] == pytest.approx(2.0, rel=1e-5)
    # mode "flicker": relative change of mean |D2|: |2 - 4| and |2 + 4| average 4, twice the float value
    assert flicker_metric(calib, mode="flicker").fn([ref + alternating], [late], [ref])["flicker"] == pytest.approx(1.0, rel=1e-5)
    # frames: scored on a transform of the output (here the output is frames-last, (B, 2, F))
    to_frames = flicker_metric(calib, frames=lambda out, sample: out.transpose(1, 2)).fn
    assert to_frames([(ref + 0.1 * alternating).transpose(1, 2)], [late], [ref.transpose(1, 2)])["flicker"] == \
        pytest.approx(0.2, rel=1e-5)
    with pytest.raises(ValueError, match="at least 3 frames"):
        temporal_second_difference(torch.zeros(1, 2, 4))


class TwoPathVideo(nn.Module):
    """(B, F, T, C) video tokens. Block 0's FFN reads the frame-averaged tokens (identical in every frame), block 1's
    the tokens of each frame: quantizing block 0 errs the same way in every frame (no flicker), block 1 frame by
    frame. Block 0's input has outlier channels, so it has the larger output error."""

    def __init__(self, width: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.ModuleDict({"ff": nn.ModuleDict({"fc": nn.Linear(width, width)})})
                                    for _ in range(2))

    def forward(self, hidden_states, timestep):
        static = hidden_states.mean(1, keepdim=True).expand_as(hidden_states) * 8
        return self.blocks[0]["ff"]["fc"](static) + self.blocks[1]["ff"]["fc"](hidden_states)


def video_sample(t: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, 8, 64, generator=g) + 0.3 * torch.randn(1, 6, 8, 64, generator=g)  # slow frame changes
    x[..., :2] *= 10
    return {"hidden_states": x, "timestep": torch.full((1,), t)}


def test_flicker_family_gives_the_bits_to_the_group_that_flickers():
    model = TwoPathVideo()
    calib = [video_sample(t, i) for i, t in enumerate((100, 100, 900, 900))]
    base = QuantConfig("w4a8", WeightSpec(4, False, 64), ActSpec(8), **FAST)
    table = measure_sensitivity(model, calib, {"flicker": flicker_metric(calib, frame_dim=1)}, timestep_ranges=2,
                                base_config=base)
    assert table.metrics == [MSE, "flicker"] and table.group_names == ["blocks.0/ffn", "blocks.1/ffn"]
    mse, flick = table.damage[0, ..., 0], table.damage[0, ..., 1]
    assert mse[0].sum() > 2 * mse[1].sum() > 0  # block 0 has the larger output error ...
    assert flick[0].abs().max() < 1e-5 and flick[1, 0] > 0.01  # ... but only block 1 flickers
    assert (flick[:, 1] == 0).all()  # only the final step (t = 100, range 0) counts
    assert 0 < table.damage[1, 1, 0, 1] < flick[1, 0]  # 8-bit weights flicker less, not zero (8-bit activations)
    by_mse = allocate(table, base, budget_bits=None, memory_bits=6.0, metrics=[MSE])
    by_flicker = allocate(table, base, budget_bits=None, memory_bits=6.0, metrics=["flicker"])
    assert by_mse.levels == {"blocks.0/ffn": ["w8a8"] * 2, "blocks.1/ffn": ["w4a8"] * 2}
    assert by_flicker.levels == {"blocks.0/ffn": ["w4a8"] * 2, "blocks.1/ffn": ["w8a8"] * 2}


def test_float_activation_levels_remove_the_activation_share_of_the_flicker():
    """Probed on the quantized levels' own weights: W4A16 / W8A16 flicker less than W4A8 / W8A8 (the 8-bit
    activation noise is gone), W8A16 least; an allocation with a float-activation budget runs the
    flickering group's final-step range with float activations, and quantize deploys it without a second copy."""
    model = TwoPathVideo()
    calib = [video_sample(t, i) for i, t in enumerate((100, 100, 900, 900))]
    base = QuantConfig("w4a8", WeightSpec(4, False, 64), ActSpec(8), **FAST)
    metrics = {"flicker": flicker_metric(calib, frame_dim=1)}
    table = measure_sensitivity(model, calib, metrics, timestep_ranges=2, base_config=base, float_acts=True)
    assert table.levels == list(A16_LEVELS)
    plain = measure_sensitivity(model, calib, metrics, timestep_ranges=2, base_config=base)
    torch.testing.assert_close(table.damage[:2], plain.damage)  # the quantized levels are unchanged
    flick = table.damage[:, 1, 0, 1]  # block 1, final-step range, flicker: (levels,)
    # at 4-bit weights most of the flicker is weight error (float activations: -16 %), at 8-bit most of it is
    # the activations' (-76 %)
    assert flick[2] < 0.95 * flick[0] and flick[3] < 0.5 * flick[1] and flick[3] < flick[2]
    allocation = allocate(table, base, budget_bits=4.0, float_act_budget=0.25, metrics=["flicker"])
    assert allocation.levels["blocks.1/ffn"] == ["w4a16", "w4a8"] and allocation.executed_bits == 4.0
    q = viditq.quantize(copy.deepcopy(model), allocation.config, calib)
    switch = q.blocks[1]["ff"]["fc"]
    assert set(switch.variants) == {"w4a8"} and switch.float_act == {"w4a16": "w4a8"}
    w4 = viditq.quantize(copy.deepcopy(model), base, calib)
    assert viditq.memory_report(q).total_after == viditq.memory_report(w4).total_after


def test_a_final_step_range_pays_for_float_activations_in_one_step():
    """4 steps (t = 100, 200, 500, 900), flicker only from block 1 at t = 100. The even split's final range holds
    t = 100 and 200, so float activations there cost block 1 half the steps (0.25 of the executed weights) and a
    0.125 budget buys nothing; with the last step as a range of its own the same budget buys exactly that step."""
    model = TwoPathVideo()
    calib = [video_sample(t, i) for i, t in enumerate((100, 200, 500, 900))]
    base = QuantConfig("w4a8", WeightSpec(4, False, 64), ActSpec(8), **FAST)
    metrics = {"flicker": flicker_metric(calib, frame_dim=1)}
    even = measure_sensitivity(model, calib, metrics, timestep_ranges=2, base_config=base, float_acts=True)
    final = measure_sensitivity(model, calib, metrics, timestep_ranges=2, final_range_steps=1, base_config=base,
                                float_acts=True)
    assert even.ranges == [(0.0, 350.0), (350.0, 1000.0)] and final.ranges == [(0.0, 150.0), (150.0, 1000.0)]
    assert final.range_shares == [0.25, 0.75]
    assert (final.damage[:, :, 1, 1] == 0).all()  # flicker counts only the t = 100 calls: range 0
    # the same t = 100 calls, weighted by the share of the calibration calls in the range (1/4 vs 2/4)
    torch.testing.assert_close(final.damage[:, :, 0, 1] * 2, even.damage[:, :, 0, 1])
    kwargs = dict(budget_bits=4.0, float_act_budget=0.125, metrics=["flicker"])
    a_even, a_final = allocate(even, base, **kwargs), allocate(final, base, **kwargs)
    assert a_even.float_act_share == 0.0 and a_even.damage_left["flicker"] == 1.0
    assert a_final.levels["blocks.1/ffn"] == ["w4a16", "w4a8"] and a_final.float_act_share == pytest.approx(0.125)
    assert a_final.damage_left["flicker"] < 0.95 and a_final.executed_bits == 4.0
    rule = next(r for r in a_final.config.rules if r.act_bits == 16)
    assert rule.timesteps == (0.0, 150.0) and rule.weight_bits == 4
    # with twice the budget the even split buys it too, for t = 100 and 200
    wide = allocate(even, base, budget_bits=4.0, float_act_budget=0.25, metrics=["flicker"])
    assert wide.levels["blocks.1/ffn"] == ["w4a16", "w4a8"] and wide.float_act_share == pytest.approx(0.25)
    assert next(r for r in wide.config.rules if r.act_bits == 16).timesteps == (0.0, 350.0)


def test_mixed_precision_spec_final_range_steps_end_to_end():
    model = TimeMlp()
    cfg = dataclasses.replace(W4A8, name="mp-final", **FAST, mixed_precision=MixedPrecisionSpec(
        budget_bits=4.5, timestep_ranges=3, final_range_steps=1))
    q = viditq.quantize(copy.deepcopy(model), cfg, MLP_CALIB)
    cuts = {bound for r in q.viditq_config.rules if r.timesteps for bound in r.timesteps}
    assert cuts and cuts <= {0.0, 100.0, 475.0, 1000.0}  # the ranges of split_timesteps(MLP_CALIB, 3, 1)


def test_mixed_precision_spec_float_act_budget_end_to_end():
    model = TimeMlp()
    cfg = dataclasses.replace(W4A8, name="mp-a16", **FAST,
                              mixed_precision=MixedPrecisionSpec(budget_bits=5.0, float_act_budget=0.25))
    q = viditq.quantize(copy.deepcopy(model), cfg, MLP_CALIB)
    rules = q.viditq_config.rules
    assert q.viditq_config.mixed_precision is None and any(r.act_bits == 16 for r in rules)
    switches = [m for m in q.modules() if isinstance(m, TimestepSwitchLinear) and m.float_act]
    assert switches and all(set(m.float_act.values()) <= set(m.variants) for m in switches)


def test_flicker_family_on_a_random_weight_diffusers_video_model():
    """Latte's output is (B, C, F, H, W): frame_dim=2. Every group, temporal attention included, gets a flicker
    column next to the MSE proxy, and an MSE + flicker allocation is a plain config."""
    model = tiny_model("latte")
    calib = calibration_set("latte", n=4)
    base = dataclasses.replace(W4A8, **FAST)
    table = measure_sensitivity(model, calib, {"flicker": flicker_metric(calib, frame_dim=2, final_steps=None)},
                                timestep_ranges=2, base_config=base, measure_high=False)
    assert table.metrics == [MSE, "flicker"] and any(g.endswith("/temporal_attn") for g in table.group_names)
    flick = table.damage[0, ..., 1]
    assert torch.isfinite(flick).all() and (flick >= 0).all() and flick.sum() > 0
    allocation = allocate(table, base, budget_bits=6.0, metrics=[MSE, "flicker"])
    assert allocation.config.rules and allocation.executed_bits <= 6.0 + 1e-9


@pytest.mark.parametrize("name,frame_dim", [("cogvideox", 1), ("wan", 2), ("latte", 2), ("pixart", None)])
def test_video_frame_dim_of_diffusers_models(name, frame_dim):
    from viditq.gptq import video_frame_dim

    model = tiny_model(name)
    assert video_frame_dim(model) == frame_dim
    if frame_dim is not None:  # the output's frame axis: the calibration inputs' frame count
        out = forward_output(model, tiny_inputs(name))
        assert out.dim() == 5 and out.shape[frame_dim] == tiny_inputs(name)["hidden_states"].shape[frame_dim]


def test_mixed_precision_spec_flicker_measures_and_allocates_for_flicker(tmp_path):
    """``MixedPrecisionSpec(flicker=True)`` (the w4a8-mp-video preset): the sensitivity table gets a flicker
    column along the model's frame axis and the allocation is a plain config; an image model is refused."""
    model = tiny_model("latte")
    calib = calibration_set("latte", n=4)
    cache = tmp_path / "sens.json"
    spec = dataclasses.replace(viditq.PRESETS["w4a8-mp-video"].mixed_precision, timestep_ranges=2,
                               final_range_steps=0, float_act_budget=0.0, cache=str(cache))
    cfg = dataclasses.replace(W4A8, name="mp-flicker", **FAST, mixed_precision=spec)
    q = viditq.quantize(copy.deepcopy(model), cfg, calib)
    table = SensitivityTable.load(cache)
    assert table.metrics == [MSE, "flicker"] and torch.isfinite(table.damage).all()
    assert table.damage[0, ..., 1].sum() > 0
    assert q.viditq_config.mixed_precision is None and q.viditq_config.rules
    with pytest.raises(ValueError, match="frame axis of PixArtTransformer2DModel is not known"):
        viditq.quantize(tiny_model("pixart"), cfg, calibration_set("pixart", n=2))
    with pytest.raises(ValueError, match="flicker must be True or False"):
        MixedPrecisionSpec(flicker="yes")


def test_w4a8_mp_lies_between_w4a8_and_w8a8_on_a_diffusers_model():
    model = tiny_model("pixart")
    inject_outliers(model)
    calib = calibration_set("pixart", n=4)
    evals = [tiny_inputs("pixart", seed=s) for s in (1, 2, 3)]
    refs = [forward_output(model, x) for x in evals]

    def sqnr(q):
        return sum(sqnr_db(r, forward_output(q, x)) for r, x in zip(refs, evals)) / len(evals)

    w4_cfg = dataclasses.replace(viditq.PRESETS["w4a8"], **FAST)
    w8_cfg = dataclasses.replace(viditq.PRESETS["w8a8"], **FAST)
    mp_cfg = dataclasses.replace(w4_cfg, name="w4a8-mp6",
                                 mixed_precision=MixedPrecisionSpec(budget_bits=6.0, timestep_aware=False))
    w4, w8 = (sqnr(viditq.quantize(copy.deepcopy(model), p, calib)) for p in (w4_cfg, w8_cfg))
    mp_model = viditq.quantize(copy.deepcopy(model), mp_cfg, calib)
    mp = sqnr(mp_model)
    assert w4 + 1.0 < mp < w8
    assert mp_model.viditq_config.mixed_precision is None and mp_model.viditq_config.rules
    assert viditq.PRESETS["w4a8-mp"].mixed_precision.budget_bits == 5.0


def test_cli_sensitivity_writes_cache_heatmap_and_config(tmp_path):
    from typer.testing import CliRunner

    from viditq.cli import app
    from viditq.testing import tiny_pixart_pipeline

    tiny_pixart_pipeline().save_pretrained(tmp_path / "float")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    args = ["sensitivity", "--model", tmp_path / "float", "--prompts", tmp_path / "prompts.txt", "--out",
            tmp_path / "s", "--steps", 2, "--ranges", 2, "--budget-bits", 6, "--device", "cpu",
            "--pipe-arg", "max_sequence_length=16", "--pipe-arg", "use_resolution_binning=false"]
    res = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    table = SensitivityTable.load(tmp_path / "s" / "sensitivity.json")
    assert table.damage.shape == (2, 6, 2, 1) and len(table.ranges) == 2
    assert (tmp_path / "s" / "sensitivity.png").stat().st_size > 1000
    config = QuantConfig.load(tmp_path / "s" / "config.yaml")
    assert config.rules and config.mixed_precision is None and "executed" in res.output
    assert config.name == "w4a8-mp-measured"  # (not the built-in preset's name)
    # the last of 4 calibration steps as a range of its own (the even split: 2 + 2 steps)
    args[args.index("--steps") + 1] = 4
    res = CliRunner().invoke(app, [str(a) for a in args + ["--final-range-steps", 1]], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert SensitivityTable.load(tmp_path / "s" / "sensitivity.json").range_shares == [0.25, 0.75]
    bad = CliRunner().invoke(app, [str(a) for a in args + ["--ranges", 1, "--final-range-steps", 1]],
                             env={"COLUMNS": "200"})
    assert bad.exit_code != 0 and "needs timestep_ranges >= 2" in bad.output
    image = CliRunner().invoke(app, [str(a) for a in args + ["--flicker"]], env={"COLUMNS": "200"})
    assert image.exit_code != 0 and "frame axis of PixArtTransformer2DModel is not known" in image.output


def test_conditioning_layers_stay_out_of_the_sensitivity_groups():
    """With conditioning_bits the embedding / adaLN linears are weight-only at their own precision: mixed
    precision neither probes nor reallocates them, and the allocated config keeps them weight-only."""
    base = dataclasses.replace(W4A8, conditioning_bits=8, **FAST)
    model, calib = tiny_model("pixart"), calibration_set("pixart", n=2)
    table = measure_sensitivity(model, calib, {}, timestep_ranges=1, base_config=base, measure_high=False)
    # (layers outside the numbered blocks would form "model/<role>" groups)
    assert table.groups and all(g.startswith("transformer_blocks.") for g in table.groups)
    config = allocate(table, base, budget_bits=5.0).config
    q = viditq.quantize(model, config, calib)
    assert q.adaln_single.linear.spec.weight_only and q.adaln_single.linear.spec.weight_bits == 8
