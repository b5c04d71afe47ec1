"""Metric-decoupled mixed precision: sensitivity per layer group × timestep range × metric, then bit allocation.

Two steps, one direction:

1. :func:`measure_sensitivity` quantizes one layer group (block × role: self-/cross-/temporal attention, FFN) in
   one timestep range at a time, the rest of the model staying float, and records the damage on every metric:
   the output-MSE proxy on the calibration inputs (always; works on any model) and any user metrics (callables
   on the model, e.g. alignment / visual quality / temporal consistency of generated samples; for video models
   :func:`flicker_metric` scores the frame-to-frame noise of the final step's outputs). All variants are
   built once; each probe only flips which variant a :class:`~viditq.layers.TimestepSwitchLinear` uses in which
   timestep range, so a probe costs one evaluation.
2. :func:`allocate` turns the table into bits under a budget. It is *decoupled*: every metric family is
   normalized by its own total damage, and at each step the family with the most damage left (as a fraction of
   its own total) gets its most damaging cell upgraded (best damage per bit). No family's large raw numbers can
   crowd out another's most sensitive layers. The result is a plain :class:`~viditq.config.QuantConfig` with
   :class:`~viditq.config.LayerRule` s (``timesteps=(lo, hi)`` where a group needs more bits only in part of the
   schedule) that :func:`viditq.quantize` consumes; the ``"w4a8-mp"`` preset runs both steps automatically.

Budgets: ``budget_bits`` is the average weight bit-width *as executed* (parameters × share of denoising steps),
``memory_bits`` the average *stored* bits per weight, where a layer holding a 4-bit and an 8-bit copy pays 12.

Float activations (``float_acts=True`` / ``float_act_budget``): the levels ``w4a16`` / ``w8a16`` run a cell's
quantized weights with activations left in float. They store nothing and change no weight bits, so they have their
own budget: the share of the executed weights (parameters × steps) that may run a float matmul instead of an
integer one. The allocation picks those cells first, then the weight bits on each cell's damage at its activation
precision.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .calibrate import _iter_tensors, _map_tensors, model_device, validate_calibration
from .config import FLOAT_ACT_BITS, LayerRule, MixedPrecisionSpec, QuantConfig, check_final_range_steps, resolve_config
from .gptq import temporal_second_difference, video_frame_dim
from .layers import TimestepSwitchLinear, current_timestep, install_timestep_hook
from .progress import progress
from .quantize import (
    _layer_precision, _set_submodule, build_layer, calibrate_layers, layer_group, plan_layers, precision_key,
)

MSE = "mse"  # name of the built-in output-MSE proxy metric
FP_LEVEL = "fp"
FP_BITS = 16
SENSITIVITY_VERSION = 1


# ------------------------------------------------------------------------------------------ groups and ranges
def group_key(name: str, grouping: str = "block") -> str:
    """Group of layer ``name``: ``"<block>/<role>"`` (block = path up to its first index, e.g.
    ``transformer_blocks.3``), ``"<role>"``, or the layer itself (``grouping="layer"``)."""
    if grouping == "layer":
        return name
    role = layer_group(name)
    if grouping == "role":
        return role
    if grouping != "block":
        raise ValueError(f"grouping must be 'block', 'role' or 'layer', got {grouping!r}")
    match = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return f"{match.group(1) if match else 'model'}/{role}"


def layer_groups(names: Iterable[str], grouping: str = "block") -> dict[str, list[str]]:
    """group → layer names, in model order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(group_key(name, grouping), []).append(name)
    return groups


def group_pattern(layer_names: list[str]) -> str:
    """A regex matching exactly these layer names (for a LayerRule)."""
    return "^(?:" + "|".join(re.escape(n) for n in layer_names) + ")$"


def sample_timestep(sample: dict) -> float | None:
    return current_timestep((), sample, None)


def split_timesteps(samples: list[dict], n: int, final_range_steps: int = 0
                    ) -> tuple[list[tuple[float, float]], list[float]]:
    """Split the calibration timesteps into ``n`` contiguous ranges with (nearly) equal numbers of distinct
    timesteps. Returns (ranges [(lo, hi)], share of samples in each), lowest timesteps first. Boundaries sit
    half-way between neighbouring ranges and the outer ones reach 0 and the training horizon (1000, or 1 for
    [0, 1] schedules), so timesteps not seen in calibration still fall in a range.

    ``final_range_steps``: the ``final_range_steps`` smallest distinct timesteps (the last denoising steps) form the
    first range on their own and the other timesteps are split evenly into the remaining ``n - 1`` ranges (0, the
    default: all ``n`` ranges even). With 10 steps and ``n=4`` the even split puts the last two steps in one range;
    ``n=5, final_range_steps=1`` gives the last step a range of its own and four ranges to the other nine, so an
    allocation can pay for the last step alone (where a video model's flicker comes from)."""
    if n < 1:
        raise ValueError(f"timestep_ranges must be >= 1, got {n}")
    check_final_range_steps(final_range_steps, n)
    times = [sample_timestep(s) for s in samples]
    if any(t is None for t in times):
        return [(-math.inf, math.inf)], [1.0]
    values = sorted(set(times))
    if final_range_steps >= len(values):
        raise ValueError(f"final_range_steps={final_range_steps} must be smaller than the number of distinct "
                         f"calibration timesteps ({len(values)}): no steps would be left for the other ranges")
    head, rest = [values[:final_range_steps]] if final_range_steps else [], values[final_range_steps:]
    n = min(n - len(head), len(rest))
    chunks = head + [rest[len(rest) * i // n: len(rest) * (i + 1) // n] for i in range(n)]
    cuts = [(a[-1] + b[0]) / 2 for a, b in zip(chunks, chunks[1:])]
    horizon = 1000.0 if values[-1] > 1 else 1.0
    los = [min(values[0], 0.0)] + cuts
    his = cuts + [max(values[-1], horizon)]
    ranges = list(zip(los, his))
    index = [range_index(t, ranges) for t in times]
    return ranges, [index.count(i) / len(times) for i in range(len(ranges))]


def range_index(t: float | None, ranges: list[tuple[float, float]]) -> int | None:
    """First range containing ``t`` (the same first-match rule TimestepSwitchLinear uses)."""
    if t is None:
        return None
    return next((i for i, (lo, hi) in enumerate(ranges) if lo <= t <= hi), None)


# ------------------------------------------------------------------------------------------ levels
def level_rule(level: str, pattern: str = ".*", timesteps=None) -> LayerRule:
    """LayerRule setting precision ``level`` (``"w8a8"``, ``"w4a8"``, ``"w4a16"`` (float activations), ... or
    ``"fp"``)."""
    if level == FP_LEVEL:
        return LayerRule(pattern, keep_fp=True, timesteps=timesteps)
    match = re.fullmatch(r"w(\d+)a(\d+)", level)
    if not match:
        raise ValueError(f"precision level must look like 'w8a8' or be 'fp', got {level!r}")
    return LayerRule(pattern, weight_bits=int(match.group(1)), act_bits=int(match.group(2)), timesteps=timesteps)


def level_bits(level: str) -> int:
    """Weight bits of a level (16 for ``"fp"``)."""
    return FP_BITS if level == FP_LEVEL else int(re.fullmatch(r"w(\d+)a\d+", level).group(1))


def level_act_bits(level: str) -> int:
    """Activation bits of a level (16 for ``"fp"`` and the float-activation levels ``"w4a16"``, ...)."""
    return FP_BITS if level == FP_LEVEL else int(re.fullmatch(r"w\d+a(\d+)", level).group(1))


def sensitivity_levels(base: QuantConfig, high_bits: int, float_acts: bool = False) -> list[str]:
    """Measured levels: the base config's precision and ``high_bits`` weights at the same activation bits (the
    activations stay at the base's bits: 8 for W4A8); with ``float_acts``, then the same two weight precisions
    with float activations (``"w4a16"``, ``"w8a16"``: the same quantized weights, activations not quantized)."""
    low = f"w{base.weight.bits}a{base.act.bits}"
    high = f"w{high_bits}a{base.act.bits}"
    if high_bits <= base.weight.bits:
        raise ValueError(f"high_bits ({high_bits}) must exceed the base weight bits ({base.weight.bits})")
    if not float_acts:
        return [low, high]
    if base.act.bits == FLOAT_ACT_BITS:
        raise ValueError(f"float_acts needs a base config with quantized activations, {base.name!r} has none")
    return [low, high, f"w{base.weight.bits}a{FLOAT_ACT_BITS}", f"w{high_bits}a{FLOAT_ACT_BITS}"]


# ------------------------------------------------------------------------------------------ the table
@dataclass
class SensitivityTable:
    """Damage of quantizing each group alone, per timestep range and metric.

    damage: float64 (L, G, T, M) = (levels, groups, timestep ranges, metrics); damage > 0 means worse than float
    (``reference - value`` for higher-is-better metrics, ``value - reference`` otherwise; the MSE proxy is the
    output squared error relative to the float output's power).
    """

    groups: dict[str, list[str]]  # group → layer names
    group_params: dict[str, int]  # group → weight parameters
    ranges: list[tuple[float, float]]
    range_shares: list[float]  # share of denoising steps (calibration samples) in each range
    metrics: list[str]
    higher_is_better: dict[str, bool]
    levels: list[str]  # measured precision levels, low → high
    damage: torch.Tensor
    reference: dict[str, float] = field(default_factory=dict)  # metric values of the float model
    fingerprint: str = ""

    @property
    def group_names(self) -> list[str]:
        return list(self.groups)

    def to_dict(self) -> dict:
        return {
            "version": SENSITIVITY_VERSION, "groups": self.groups, "group_params": self.group_params,
            "ranges": [list(r) for r in self.ranges], "range_shares": self.range_shares, "metrics": self.metrics,
            "higher_is_better": self.higher_is_better, "levels": self.levels, "damage": self.damage.tolist(),
            "reference": self.reference, "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityTable":
        if d.get("version") != SENSITIVITY_VERSION:
            raise ValueError(f"sensitivity table version {d.get('version')!r} is not {SENSITIVITY_VERSION}")
        return cls(d["groups"], d["group_params"], [tuple(r) for r in d["ranges"]], d["range_shares"],
                   d["metrics"], d["higher_is_better"], d["levels"], torch.tensor(d["damage"], dtype=torch.float64),
                   d["reference"], d["fingerprint"])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def ranking(self, metric: str, level: int = 0) -> list[tuple[str, int, float]]:
        """(group, range index, damage) cells from most to least damaging for ``metric``."""
        m = self.metrics.index(metric)
        cells = [(g, r, float(self.damage[level, i, r, m])) for i, g in enumerate(self.groups)
                 for r in range(len(self.ranges))]
        return sorted(cells, key=lambda c: -c[2])


# ------------------------------------------------------------------------------------------ measuring
@dataclass(frozen=True)
class Metric:
    """A user metric: ``fn(model)`` returns a float, or a dict of named floats (several metric families scored
    on one set of generated samples). ``higher_is_better`` is one flag, or a dict giving each name's direction.
    """

    fn: Callable[[nn.Module], "float | dict[str, float]"]
    higher_is_better: "bool | dict[str, bool]" = True

    def direction(self, key: str) -> bool:
        if isinstance(self.higher_is_better, bool):
            return self.higher_is_better
        if key not in self.higher_is_better:
            raise ValueError(f"metric {key!r} has no direction in higher_is_better={self.higher_is_better}")
        return self.higher_is_better[key]


@dataclass(frozen=True)
class OutputMetric(Metric):
    """A metric of the model's *outputs on the calibration inputs*, as cheap as the MSE proxy (one forward per
    sample of the probed timestep range, no sampling loop): ``fn(outputs, samples, references)`` gets the outputs
    (list of tensors), the kwargs dicts of those samples and the float model's outputs on them, and returns a float or a dict of named floats (e.g. a probe's
    alignment with the prompt and feature distances of the one-step denoised prediction). A probed cell's damage
    is the change on its range's samples, weighted by their share of all samples.
    """


def flicker_metric(
    calib: Iterable[dict],
    frame_dim: int = 1,
    frames: Callable[[torch.Tensor, dict], torch.Tensor] | None = None,
    final_steps: int | None = 1,
    mode: str = "error",
    name: str = "flicker",
) -> OutputMetric:
    """Temporal-consistency family for video models, as cheap as the MSE proxy: how much frame-to-frame noise a
    probed cell adds to the model's output (lower is better, the float model scores 0).

    For each counted calibration call, ``y = frames(output, sample)`` (e.g. the one-step denoised prediction in
    pixel space; default: the raw output) and ``D2`` = :func:`temporal_second_difference` along ``frame_dim``:

    * ``mode="error"``: ``mean|D2(y) - D2(y_float)| / mean|D2(y_float)|`` — the temporally incoherent part of the
      output error, which is what the flicker of a video (mean ``|D2|``) picks up; an error that grows at a
      constant rate from frame to frame does not count. The denominator only weights the calls against each other,
      so the raw output (e.g. a velocity, whose ``D2`` is mostly noise) works too.
    * ``mode="flicker"``: ``(mean|D2(y)| - mean|D2(y_float)|) / mean|D2(y_float)|``, the relative flicker increase
      itself (signed; meaningful when ``y`` estimates the clean sample, e.g. the denoised prediction).

    ``calib``: the calibration list given to :func:`measure_sensitivity` (for its timesteps). ``final_steps``: only
    the calls of the ``final_steps`` smallest calibration timesteps count (None: all). The last denoising step writes
    its prediction straight into the sample, while frame-to-frame noise that earlier steps add is mostly removed by
    the steps after them: on the embedded CogVideoX T2V (pixel space, 10 steps), W8A8 in the last step alone raises
    the generated videos' flicker by 6 %, in the other nine steps together by 0.5 %
    (``benchmarks/eval_flicker_sources.py``), so scoring every call would point the allocation at the wrong steps.
    """
    if mode not in ("error", "flicker"):
        raise ValueError(f"mode must be 'error' or 'flicker', got {mode!r}")
    times = sorted({t for t in (sample_timestep(s) for s in calib) if t is not None})
    counted = None if final_steps is None or not times else set(times[:final_steps])

    @torch.no_grad()
    def fn(outputs, samples, references) -> dict[str, float]:
        scores = []
        for out, ref, sample in zip(outputs, references, samples):
            if counted is not None and sample_timestep(sample) not in counted:
                continue
            y, y_ref = (out, ref) if frames is None else (frames(out, sample), frames(ref, sample))
            d2 = temporal_second_difference(y.float(), frame_dim)
            d2_ref = temporal_second_difference(y_ref.float(), frame_dim)
            norm = float(d2_ref.abs().mean().clamp_min(1e-12))
            if mode == "error":
                scores.append(float((d2 - d2_ref).abs().mean()) / norm)
            else:
                scores.append((float(d2.abs().mean()) - norm) / norm)
        return {name: sum(scores) / len(scores) if scores else 0.0}

    return OutputMetric(fn, {name: False})


def _as_metric(value) -> Metric:
    if isinstance(value, Metric):
        return value
    if callable(value):
        return Metric(value)
    raise TypeError(f"metrics values must be callables or viditq.mixed_precision.Metric, got {type(value).__name__}")


def _evaluate_metrics(model: nn.Module, user_metrics: dict[str, Metric]) -> dict[str, tuple[float, bool]]:
    """name → (value, higher_is_better) of every user metric on ``model`` (dict results expanded)."""
    values = {}
    for name, metric in user_metrics.items():
        result = metric.fn(model)
        items = result.items() if isinstance(result, Mapping) else [(name, result)]
        for key, value in items:
            values[key] = (float(value), metric.direction(key))
    return values


def _fingerprint(model: nn.Module, layers: dict[str, nn.Linear], samples: list[dict], parts: dict) -> str:
    """Hash of what the table depends on: layer names/shapes/weights, calibration tensors, settings."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    h.update(type(model).__name__.encode())
    for name, linear in layers.items():
        w = linear.weight.detach().double()
        h.update(f"{name}{tuple(w.shape)}{w.sum().item():.12e}{w.pow(2).sum().item():.12e}".encode())
    for sample in samples:
        for key, t in _iter_tensors(sample):
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _output(result) -> torch.Tensor:
    out = result.sample if hasattr(result, "sample") else (result[0] if isinstance(result, (tuple, list)) else result)
    return out.float()


class _Probe:
    """Every quantized layer of the model wrapped as a TimestepSwitchLinear of {"fp", level...}; ``set(cells)``
    sends a group to a level in a timestep range, ``restore()`` puts the float linears back."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Linear], variants: dict[str, dict[str, nn.Module]],
                 float_act: dict[str, str]):
        self.model, self.layers = model, layers
        self.switches = {}
        for name, linear in layers.items():
            switch = TimestepSwitchLinear({FP_LEVEL: linear, **variants[name]}, [], FP_LEVEL, float_act)
            _set_submodule(model, name, switch)
            self.switches[name] = switch
        install_timestep_hook(model)

    def set(self, names: list[str], level: str | None, timesteps: tuple[float, float] | None) -> None:
        for switch in self.switches.values():
            switch.schedule = []
        if level is not None:
            lo, hi = timesteps
            for name in names:
                self.switches[name].schedule = [(lo, hi, level)]

    def restore(self) -> None:
        for name, linear in self.layers.items():
            _set_submodule(self.model, name, linear)
        install_timestep_hook(self.model)


def measure_sensitivity(
    model: nn.Module,
    calib: Iterable[dict],
    metrics: Mapping[str, Callable | Metric] | None = None,
    groups: str = "block",
    timestep_ranges: int = 4,
    base_config: QuantConfig | str | Path = "w4a8",
    high_bits: int = 8,
    measure_high: bool = True,
    cache: str | Path | None = None,
    float_acts: bool = False,
    final_range_steps: int = 0,
) -> SensitivityTable:
    """Damage table (see :class:`SensitivityTable`) of ``model`` quantized group by group, range by range.

    Args:
        model: float transformer (left unchanged on return); its forward gets the ``timestep`` keyword.
        calib: kwargs dicts for ``model.forward`` (e.g. :func:`viditq.capture_calibration`); used to calibrate
            the quantized variants, to split the timestep ranges, and for the output-MSE proxy.
        metrics: name → callable(model) -> float (or :class:`Metric` with a direction); each is called with the
            probed model, e.g. to generate samples and score alignment / quality / temporal consistency. The
            MSE proxy (``"mse"``) is always measured.
        groups: "block" (block × role), "role" or "layer".
        base_config: the low precision (a preset or QuantConfig); its balancing and keep_fp are used.
        high_bits: weight bits of the upgraded level (measured too unless ``measure_high=False``, then assumed
            lossless).
        cache: JSON path; reused when its fingerprint (layers, weights, calibration, settings, metric names)
            matches, written otherwise.
        float_acts: also probe the float-activation levels (``"w4a16"``, ``"w8a16"``): each quantized level's
            own weights run with float activations (as ``quantize`` deploys them, no second copy).
        final_range_steps: the last ``final_range_steps`` denoising steps (smallest calibration timesteps) get a
            timestep range of their own, the first of the ``timestep_ranges`` (:func:`split_timesteps`); 0 (the
            default): all ranges split evenly. E.g. 10 steps, ``timestep_ranges=5, final_range_steps=1``: the last
            step alone, then four ranges for the other nine, so the allocation can buy bits or float activations
            for the last step without paying for the one before it.
    """
    base = dataclasses.replace(resolve_config(base_config), mixed_precision=None, rules=(), float_final_steps=0)
    samples = validate_calibration(calib)
    user_metrics = {name: _as_metric(m) for name, m in (metrics or {}).items()}
    if MSE in user_metrics:
        raise ValueError(f"metric name {MSE!r} is reserved for the built-in output-MSE proxy")
    # weight-only layers (the conditioning layers of ``conditioning_bits``) keep their precision: not probed
    plan = {name: entry for name, entry in plan_layers(model, base).items() if not entry[1].weight_only}
    if not plan:
        raise ValueError(f"no layer of {type(model).__name__} is quantized by {base.name!r}")
    layers = {name: linear for name, (linear, _) in plan.items()}
    levels = sensitivity_levels(base, high_bits, float_acts)
    measured = [lv for lv in levels if measure_high or level_bits(lv) == base.weight.bits]
    ranges, shares = split_timesteps(samples, timestep_ranges, final_range_steps)
    # the ranges themselves are hashed (not final_range_steps): two settings that split alike share a table, and
    # the default's fingerprint is the one of tables measured before the option existed
    # float_final_steps plays no part in the probes, and fields added later enter only when set (tables measured
    # before they existed stay valid)
    base_settings = {k: v for k, v in base.to_dict().items() if k != "float_final_steps"
                     and not (k == "conditioning_bits" and v is None) and not (k == "ff_hand_off" and v)}
    if not base_settings["weight"].get("gptq_temporal"):
        base_settings["weight"] = {k: v for k, v in base_settings["weight"].items() if k != "gptq_temporal"}
    settings = dict(base=base_settings, groups=groups, ranges=ranges, levels=measured, metrics=sorted(user_metrics))
    fingerprint = _fingerprint(model, layers, samples, settings)
    if cache is not None and Path(cache).is_file():
        table = SensitivityTable.load(cache)
        if table.fingerprint == fingerprint:
            return table

    group_map = layer_groups(layers, groups)
    probe = _build_probe(model, layers, samples, base, measured)
    try:
        reference, ref_outputs = _evaluate_float(model, samples, user_metrics)
        names = [MSE] + list(reference)
        damage = torch.zeros(len(levels), len(group_map), len(ranges), len(names), dtype=torch.float64)
        sample_ranges = [range_index(sample_timestep(s), ranges) for s in samples]
        cells = [(li, gi, ri) for li, level in enumerate(levels) if level in measured
                 for gi in range(len(group_map)) for ri in range(len(ranges))]
        group_lists = list(group_map.values())
        model_metrics = {n: m for n, m in user_metrics.items() if not isinstance(m, OutputMetric)}
        output_metrics = {n: m for n, m in user_metrics.items() if isinstance(m, OutputMetric)}
        range_refs = [_output_metric_values(output_metrics, samples, ref_outputs, ref_outputs, sample_ranges, ri)
                      for ri in range(len(ranges))]
        for li, gi, ri in progress(cells, desc="sensitivity"):
            probe.set(group_lists[gi], levels[li], ranges[ri])
            outputs = _range_outputs(model, samples, sample_ranges, ri)
            damage[li, gi, ri, 0] = _mse_damage(outputs, ref_outputs, sample_ranges, ri)
            values = {**_evaluate_metrics(model, model_metrics),
                      **_output_metric_values(output_metrics, samples, outputs, ref_outputs, sample_ranges, ri)}
            refs = {**reference, **range_refs[ri]}
            for mi, name in enumerate(names[1:], start=1):
                if name not in values:  # an output metric on a range without calibration samples: no damage
                    continue
                (ref, higher_is_better), value = refs[name], values[name][0]
                damage[li, gi, ri, mi] = ref - value if higher_is_better else value - ref
    finally:
        probe.restore()
    table = SensitivityTable(
        groups=group_map, group_params={g: sum(layers[n].weight.numel() for n in ns) for g, ns in group_map.items()},
        ranges=ranges, range_shares=shares, metrics=names,
        higher_is_better={MSE: False, **{n: hib for n, (_, hib) in reference.items()}},
        levels=levels, damage=damage, reference={MSE: 0.0, **{n: v for n, (v, _) in reference.items()}},
        fingerprint=fingerprint,
    )
    if cache is not None:
        table.save(cache)
    return table


def _build_probe(model, layers, samples, base: QuantConfig, levels: list[str]) -> _Probe:
    """Quantize every layer at every measured quantized-activation level once (shared calibration pass), then
    wrap them; a float-activation level runs on the weights of the level with its weight bits."""
    stats, hessians = calibrate_layers(model, layers, samples, base)
    variants: dict[str, dict[str, nn.Module]] = {name: {} for name in layers}
    stored = [lv for lv in levels if level_act_bits(lv) != FLOAT_ACT_BITS]
    float_act = {lv: next(q for q in stored if level_bits(q) == level_bits(lv)) for lv in levels if lv not in stored}
    for level in stored:
        config = dataclasses.replace(base, rules=(level_rule(level),))
        for name, linear in progress(layers.items(), desc=f"quantizing ({level})"):
            precision = _layer_precision(name, config)
            variants[name][level] = build_layer(linear, precision, stats=stats[name], hessian=hessians.get(name),
                                                config=config, name=name)
    return _Probe(model, layers, variants, float_act)


@torch.no_grad()
def _evaluate_float(model, samples, user_metrics) -> tuple[dict[str, tuple[float, bool]], list[torch.Tensor]]:
    """Float outputs of every sample, and every user metric's reference value (output metrics: on all samples,
    only to learn their names and directions; their per-range references are computed separately)."""
    outputs = _range_outputs(model, samples, [0] * len(samples), 0)
    model_metrics = {n: m for n, m in user_metrics.items() if not isinstance(m, OutputMetric)}
    output_metrics = {n: m for n, m in user_metrics.items() if isinstance(m, OutputMetric)}
    reference = {**_evaluate_metrics(model, model_metrics),
                 **_output_metric_values(output_metrics, samples, outputs, outputs, [0] * len(samples), 0)}
    if MSE in reference:
        raise ValueError(f"metric name {MSE!r} is reserved for the built-in output-MSE proxy")
    return reference, outputs


@torch.no_grad()
def _range_outputs(model, samples, sample_ranges, range_idx: int) -> list[torch.Tensor | None]:
    """Model outputs of the samples in one timestep range (None for the others)."""
    device = model_device(model)
    return [_output(model(**_map_tensors(s, lambda t: t.to(device)))) if r == range_idx else None
            for s, r in zip(samples, sample_ranges)]


def _mse_damage(outputs, ref_outputs, sample_ranges, range_idx: int) -> float:
    """Squared output error on the samples of one timestep range, relative to the total output power of all
    samples (so the cells of one group add up to its whole-schedule damage)."""
    power = sum(float(r.pow(2).mean()) for r in ref_outputs)
    err = sum(float((out - ref).pow(2).mean()) for out, ref, r in zip(outputs, ref_outputs, sample_ranges)
              if r == range_idx)
    return err / max(power, 1e-30)


def _output_metric_values(output_metrics, samples, outputs, ref_outputs, sample_ranges, range_idx: int) -> dict:
    """name → (value × share of samples in the range, direction) of every output metric on that range."""
    chosen = [i for i, r in enumerate(sample_ranges) if r == range_idx]
    if not chosen:
        return {}
    share = len(chosen) / len(samples)
    values = {}
    for name, metric in output_metrics.items():
        result = metric.fn([outputs[i] for i in chosen], [samples[i] for i in chosen], [ref_outputs[i] for i in chosen])
        items = result.items() if isinstance(result, Mapping) else [(name, result)]
        for key, value in items:
            values[key] = (float(value) * share, metric.direction(key))
    return values


# ------------------------------------------------------------------------------------------ allocation
@dataclass
class Allocation:
    """Bits chosen per group × timestep range, and the QuantConfig that applies them.

    levels: group → precision level per timestep range (``table.ranges``, or one whole-schedule entry when the
    allocation is not timestep-aware); damage_left: per metric, the estimated damage left as a fraction of the
    damage of the all-low-precision model (sum of single-group damages).
    """

    config: QuantConfig
    levels: dict[str, list[str]]
    executed_bits: float
    stored_bits: float
    damage_left: dict[str, float]
    float_act_share: float = 0.0  # share of the executed weights (parameters x steps) run with float activations

    def summary(self) -> str:
        upgraded = {g: lv for g, lv in self.levels.items() if len(set(lv)) > 1 or lv[0] != self.config_low}
        lines = [f"average weight bits: {self.executed_bits:.2f} executed, {self.stored_bits:.2f} stored; "
                 f"float activations on {100 * self.float_act_share:.0f} % of the executed weights",
                 "damage left (fraction of all-low): " + ", ".join(f"{m} {v:.2f}" for m, v in self.damage_left.items()),
                 f"{len(upgraded)} of {len(self.levels)} groups above {self.config_low}:"]
        lines += [f"  {g:<40} {' '.join(lv)}" for g, lv in upgraded.items()]
        return "\n".join(lines)

    @property
    def config_low(self) -> str:
        return f"w{self.config.weight.bits}a{self.config.act.bits}"


class _Budget:
    """Executed / stored average bits of an allocation state (G, T) of level indices."""

    def __init__(self, params: torch.Tensor, shares: torch.Tensor, bits: torch.Tensor):
        self.params, self.shares, self.bits = params, shares, bits  # (G,), (T,), (L,)
        self.total = float(params.sum())

    def executed(self, state: torch.Tensor) -> float:
        per_group = (self.bits[state] * self.shares).sum(1)  # (G,)
        return float((per_group * self.params).sum()) / self.total

    def stored(self, state: torch.Tensor) -> float:
        used = torch.zeros(state.shape[0], len(self.bits), dtype=torch.bool)
        used.scatter_(1, state, True)
        return float(((used.double() * self.bits).sum(1) * self.params).sum()) / self.total

    def step_costs(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(executed, stored) bit increase (G, T) of moving each cell one level up."""
        top = len(self.bits) - 1
        up = (state + 1).clamp(max=top)
        g_w = self.params[:, None] / self.total
        executed = (self.bits[up] - self.bits[state]) * self.shares[None, :] * g_w
        counts = torch.zeros(state.shape[0], len(self.bits), dtype=torch.long)
        counts.scatter_add_(1, state, torch.ones_like(state))
        new_copy = counts.gather(1, up) == 0
        last_copy = counts.gather(1, state) == 1
        stored = (self.bits[up] * new_copy - self.bits[state] * last_copy) * g_w
        return executed, stored


def allocate(
    table: SensitivityTable,
    base_config: QuantConfig | str | Path = "w4a8",
    budget_bits: float | None = 5.0,
    memory_bits: float | None = None,
    metrics: list[str] | None = None,
    timestep_aware: bool = True,
    allow_fp: bool = False,
    name: str | None = None,
    float_act_budget: float = 0.0,
) -> Allocation:
    """Choose a precision level per group and timestep range (see the module docstring for the method).

    Args:
        table: from :func:`measure_sensitivity` with the same ``base_config``.
        budget_bits: cap on the average weight bits as executed (None: no cap).
        memory_bits: cap on the average stored weight bits, every copy counted (None: no cap).
        metrics: metric families to protect (default: all in the table).
        timestep_aware: False gives every group one precision over the whole schedule.
        allow_fp: let cells go up to 16-bit float after ``high_bits``.
        float_act_budget: share of the executed weights (parameters x share of denoising steps) that may run with
            float activations on their quantized weights (needs a table measured with ``float_acts=True``). Chosen
            first: cells by the damage they remove at the low weight bits (families normalized by their own
            all-low damage, summed) per unit of cost; the weight bits are then allocated on the damage of each
            cell at its activation precision. It changes neither ``budget_bits`` nor ``memory_bits`` (same
            weights, nothing stored).
    """
    base = dataclasses.replace(resolve_config(base_config), mixed_precision=None)
    chosen = _check_allocation(table, base, budget_bits, memory_bits, metrics, float_act_budget)
    quant_chain, float_chain = _level_chains(table, float_act_budget > 0)
    extra = [FP_LEVEL] if allow_fp else []
    damage = table.damage[..., [table.metrics.index(m) for m in chosen]].clamp_min(0)  # (L, G, T, M)
    ranges, shares = table.ranges, table.range_shares
    if not timestep_aware:
        damage = damage.sum(2, keepdim=True)
        ranges, shares = [(table.ranges[0][0], table.ranges[-1][1])], [1.0]
    params = torch.tensor([float(table.group_params[g]) for g in table.groups], dtype=torch.float64)
    shares = torch.tensor(shares, dtype=torch.float64)
    float_acts = torch.zeros(len(table.groups), len(ranges), dtype=torch.bool)
    if float_chain:
        float_acts = _allocate_float_acts(damage, table.levels, quant_chain[0], float_chain[0], params, shares,
                                          float_act_budget)
    quant_dmg = _chain_damage(damage, table.levels, quant_chain, len(extra))
    float_dmg = _chain_damage(damage, table.levels, float_chain, len(extra)) if float_chain else quant_dmg
    total = quant_dmg[0].sum((0, 1))  # (M,) damage of the all-low model, the reference of every family's share
    damage = torch.where(float_acts[None, :, :, None], float_dmg, quant_dmg)  # (L, G, T, M) at each cell's acts
    budget = _Budget(params, shares, torch.tensor([float(level_bits(lv)) for lv in quant_chain + extra],
                                                  dtype=torch.float64))
    state = torch.zeros(len(table.groups), len(ranges), dtype=torch.long)
    lowest = budget.executed(state)
    if budget_bits is not None and budget_bits < lowest - 1e-9:
        raise ValueError(f"budget_bits {budget_bits} is below the all-{quant_chain[0]} average ({lowest:.2f})")
    _greedy_decoupled(state, damage, budget, budget_bits, memory_bits, total)
    _complete_partial_groups(state, budget, budget_bits, memory_bits)
    left = _damage_at(state, damage).sum((0, 1))
    cells = [[(float_chain if fa else quant_chain)[i] if i < len(quant_chain) else FP_LEVEL
              for i, fa in zip(row, acts)] for row, acts in zip(state.tolist(), float_acts.tolist())]
    config = allocation_config(table.groups, cells, ranges, base, name or f"{base.name}-mp")
    share = float(((float_acts.double() * shares).sum(1) * params).sum() / params.sum())
    return Allocation(
        config=config, levels=dict(zip(table.groups, cells)),
        executed_bits=budget.executed(state), stored_bits=budget.stored(state),
        damage_left={m: float(left[i] / total[i]) if total[i] > 0 else 0.0 for i, m in enumerate(chosen)},
        float_act_share=share,
    )


def _check_allocation(table: SensitivityTable, base: QuantConfig, budget_bits, memory_bits, metrics,
                      float_act_budget: float) -> list[str]:
    """Validate allocate's arguments; returns the metric families to protect."""
    if budget_bits is None and memory_bits is None:
        raise ValueError("allocate needs a budget: budget_bits and/or memory_bits")
    if table.levels[0] != f"w{base.weight.bits}a{base.act.bits}":
        raise ValueError(f"the table's low level {table.levels[0]!r} does not match base config "
                         f"{base.name!r} (w{base.weight.bits}a{base.act.bits})")
    if not 0.0 <= float_act_budget <= 1.0:
        raise ValueError(f"float_act_budget must be in [0, 1], got {float_act_budget!r}")
    chosen = metrics or table.metrics
    unknown = set(chosen) - set(table.metrics)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; the table has {table.metrics}")
    return list(chosen)


def _level_chains(table: SensitivityTable, float_acts: bool) -> tuple[list[str], list[str]]:
    """(weight levels at the base's activation bits, the same weight levels with float activations, or [] when
    ``float_acts`` is off), low → high."""
    quant = [lv for lv in table.levels if level_act_bits(lv) != FLOAT_ACT_BITS]
    if not float_acts:
        return quant, []
    floats = [lv for lv in table.levels if level_act_bits(lv) == FLOAT_ACT_BITS]
    if [level_bits(lv) for lv in floats] != [level_bits(lv) for lv in quant]:
        raise ValueError(f"float_act_budget needs a table with float-activation levels for {quant} "
                         f"(measure_sensitivity(..., float_acts=True)); it has {table.levels}")
    return quant, floats


def _chain_damage(damage: torch.Tensor, levels: list[str], chain: list[str], extra: int) -> torch.Tensor:
    """Damage (len(chain) + extra, G, T, M) of a chain of table levels, the extra (float) levels at zero."""
    picked = damage[[levels.index(lv) for lv in chain]]
    return torch.cat([picked, picked.new_zeros(extra, *picked.shape[1:])])


def _allocate_float_acts(damage, levels, low: str, low_float: str, params, shares, float_act_budget: float):
    """Cells (G, T) that run with float activations. A cell's score is the sum over families of the damage it
    removes at the low weight bits, each as a share of that family's all-low damage (no family's raw scale
    dominates), per unit of cost (its share of the executed weights); cells are taken best first while they fit.
    Not handed out in turns as the weight bits are: the level pays mostly for one family (flicker), and turns
    would spend it on families it barely helps."""
    quantized, floated = damage[levels.index(low)], damage[levels.index(low_float)]  # (G, T, M)
    total = quantized.sum((0, 1)).clamp_min(1e-30)  # (M,)
    gain = ((quantized - floated) / total).sum(-1)  # (G, T)
    cost = params[:, None] / params.sum() * shares[None, :]  # (G, T)
    chosen = torch.zeros(gain.shape, dtype=torch.bool)
    spent = 0.0
    for cell in torch.argsort((gain / cost).flatten(), descending=True).tolist():
        g, t = divmod(cell, gain.shape[1])
        if gain[g, t] <= 0:
            break
        if spent + float(cost[g, t]) <= float_act_budget + 1e-9:
            chosen[g, t] = True
            spent += float(cost[g, t])
    return chosen


def _damage_at(state: torch.Tensor, damage: torch.Tensor) -> torch.Tensor:
    """Damage (G, T, M) of every cell at its current level; damage is (L, G, T, M)."""
    return damage.gather(0, state[None, :, :, None].expand(1, *state.shape, damage.shape[-1]))[0]


def _fits(executed: float, stored: float, budget_bits, memory_bits) -> bool:
    return (budget_bits is None or executed <= budget_bits + 1e-9) and (memory_bits is None or stored <= memory_bits + 1e-9)


def _greedy_decoupled(state, damage, budget: _Budget, budget_bits, memory_bits, total=None) -> None:
    """Upgrade one step at a time: the metric family with the largest share of its own damage left takes its
    best gain-per-bit move that fits the budgets; stop when no family can improve. A move is one cell (group ×
    timestep range) one level up, or a whole uniform group one level up (the only move a tight memory cap
    allows, since a single range would add a second weight copy). ``total`` (M,): each family's reference damage
    (default: all cells at level 0)."""
    total = (damage[0].sum((0, 1)) if total is None else total).clamp_min(1e-30)  # (M,)
    while True:
        gain, fits, cost = _cell_moves(state, damage, budget, budget_bits, memory_bits)  # (G, T, M), (G, T), (G, T)
        g_gain, g_fits, g_cost = _group_moves(state, gain, budget, budget_bits, memory_bits)  # (G, M), (G,), (G,)
        left = _damage_at(state, damage).sum((0, 1)) / total  # (M,) share of each family's damage still there
        for m in torch.argsort(left, descending=True).tolist():
            cell_score = torch.where(fits & (gain[..., m] > 0), gain[..., m] / cost, torch.zeros_like(cost))
            group_score = torch.where(g_fits & (g_gain[:, m] > 0), g_gain[:, m] / g_cost, torch.zeros_like(g_cost))
            if left[m] <= 0 or max(cell_score.max(), group_score.max()) <= 0:
                continue
            if cell_score.max() >= group_score.max():
                g, r = divmod(int(cell_score.argmax()), state.shape[1])
                state[g, r] += 1
            else:
                state[int(group_score.argmax())] += 1
            break
        else:
            return


def _cell_moves(state, damage, budget: _Budget, budget_bits, memory_bits):
    """Gain (G, T, M), feasibility (G, T) and cost (G, T) of raising each cell one level."""
    top = damage.shape[0] - 1
    up = (state + 1).clamp(max=top)
    gain = _damage_at(state, damage) - _damage_at(up, damage)
    gain[state == top] = 0
    d_exec, d_stored = budget.step_costs(state)
    fits = state < top
    if budget_bits is not None:
        fits &= budget.executed(state) + d_exec <= budget_bits + 1e-9
    if memory_bits is not None:
        fits &= budget.stored(state) + d_stored <= memory_bits + 1e-9
    cost = (d_exec if budget_bits is not None else d_stored).clamp_min(1e-12)
    return gain, fits, cost


def _group_moves(state, gain, budget: _Budget, budget_bits, memory_bits):
    """Gain (G, M), feasibility (G,) and cost (G,) of raising every range of a uniform group one level."""
    top = len(budget.bits) - 1
    level = state[:, 0]
    uniform = (state == level[:, None]).all(1) & (level < top)
    step_bits = budget.bits[(level + 1).clamp(max=top)] - budget.bits[level]  # (G,)
    d_bits = step_bits * budget.params / budget.total  # same executed and stored increase for a uniform group
    fits = uniform.clone()
    if budget_bits is not None:
        fits &= budget.executed(state) + d_bits <= budget_bits + 1e-9
    if memory_bits is not None:
        fits &= budget.stored(state) + d_bits <= memory_bits + 1e-9
    return gain.sum(1), fits, d_bits.clamp_min(1e-12)


def _complete_partial_groups(state, budget: _Budget, budget_bits, memory_bits) -> None:
    """A group with two precisions in different ranges stores two copies; raising all its ranges to its top
    level drops a copy (less memory) and can only help accuracy: do it wherever the budgets allow."""
    for g in range(state.shape[0]):
        if len(set(state[g].tolist())) < 2:
            continue
        trial = state.clone()
        trial[g] = state[g].max()
        if _fits(budget.executed(trial), budget.stored(trial), budget_bits, memory_bits):
            state[g] = trial[g]


def allocation_config(groups: dict[str, list[str]], cells: list[list[str]], ranges: list[tuple[float, float]],
                      base: QuantConfig, name: str) -> QuantConfig:
    """QuantConfig = ``base`` + one LayerRule per group above the base precision (and merged run of timestep
    ranges); ``cells``: each group's level per range."""
    low = f"w{base.weight.bits}a{base.act.bits}"
    rules = []
    for layer_names, row in zip(groups.values(), cells):
        pattern = group_pattern(layer_names)
        if len(set(row)) == 1:
            if row[0] != low:
                rules.append(level_rule(row[0], pattern))
            continue
        start = 0
        for r in range(1, len(row) + 1):
            if r == len(row) or row[r] != row[start]:
                if row[start] != low:
                    rules.append(level_rule(row[start], pattern, (ranges[start][0], ranges[r - 1][1])))
                start = r
    return dataclasses.replace(base, name=name, rules=base.rules + tuple(rules), mixed_precision=None)


def spec_allocation(model: nn.Module, samples: list[dict], base: QuantConfig, spec: MixedPrecisionSpec,
                    name: str | None = None) -> tuple[SensitivityTable, Allocation]:
    """Sensitivity table and allocation that ``spec`` asks for on ``base``: the MSE proxy on ``samples``, and the
    flicker family if ``spec.flicker`` (:func:`flicker_metric` on the raw output of the last
    ``max(1, final_range_steps)`` steps, along the frame axis of the model class)."""
    metrics = None
    if spec.flicker:
        frame_dim = video_frame_dim(model)
        if frame_dim is None:
            raise ValueError(f"mixed precision flicker=True: the frame axis of {type(model).__name__} is not known "
                             f"(CogVideoX, Wan, Latte, HunyuanVideo, Mochi); pass a flicker_metric to "
                             f"measure_sensitivity")
        metrics = {"flicker": flicker_metric(samples, frame_dim, final_steps=max(1, spec.final_range_steps))}
    table = measure_sensitivity(model, samples, metrics, groups=spec.groups, timestep_ranges=spec.timestep_ranges,
                                base_config=base, high_bits=spec.high_bits, cache=spec.cache,
                                float_acts=spec.float_act_budget > 0, final_range_steps=spec.final_range_steps)
    allocation = allocate(table, base, budget_bits=spec.budget_bits, memory_bits=spec.memory_bits,
                          timestep_aware=spec.timestep_aware, allow_fp=spec.allow_fp, name=name,
                          float_act_budget=spec.float_act_budget)
    return table, allocation


def resolve_mixed_precision(model: nn.Module, config: QuantConfig, samples: list[dict]) -> QuantConfig:
    """The plain QuantConfig that ``config.mixed_precision`` asks for (:func:`spec_allocation`); called by
    :func:`viditq.quantize`."""
    base = dataclasses.replace(config, mixed_precision=None)
    return spec_allocation(model, samples, base, config.mixed_precision, name=config.name)[1].config


# ------------------------------------------------------------------------------------------ plots
def plot_sensitivity(table: SensitivityTable, path: str | Path, level: int = 0) -> Path:
    """Heatmap PNG of group × timestep range, one panel per metric (each scaled to its own maximum, the
    decoupled view the allocation uses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_groups, n_metrics = len(table.groups), len(table.metrics)
    fig, axes = plt.subplots(1, n_metrics, figsize=(2.2 + 2.0 * n_metrics, 1.2 + 0.22 * n_groups), squeeze=False)
    labels = [f"[{lo:g},{hi:g}]" for lo, hi in table.ranges]
    for m, ax in enumerate(axes[0]):
        values = table.damage[level, :, :, m].clamp_min(0)
        scaled = (values / values.max()).numpy() if values.max() > 0 else values.numpy()
        ax.imshow(scaled, aspect="auto", cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"{table.metrics[m]} ({table.levels[level]})", fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(n_groups), table.group_names if m == 0 else [""] * n_groups, fontsize=7)
        ax.set_xlabel("timestep range", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
