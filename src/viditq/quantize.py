"""``viditq.quantize``: calibrate → balance → quantize → pack, by swapping ``nn.Linear`` for ``QuantLinear``.

Works on any ``torch.nn.Module`` whose forward takes keyword arguments (every diffusers transformer does): layers
are discovered from the module tree, classified by name (self-/cross-/temporal attention, FFN), and the ones
that condition the network (embeddings, adaLN, final projection) are kept in high precision by regex.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from pathlib import Path
from typing import Iterable

from torch import nn

from .balance import build_quant_linear
from .calibrate import LayerStats, collect_activation_stats, validate_calibration
from .config import ActSpec, QuantConfig, WeightSpec, resolve_config
from .gptq import apply_gptq, hessian_hooks
from .layers import LayerSpec, QuantLinear, TimestepSwitchLinear, install_timestep_hook, make_layer_spec
from .progress import progress

LAYER_GROUPS = ("cross_attn", "temporal_attn", "self_attn", "ffn", "other")


def layer_group(name: str) -> str:
    """Coarse role of a linear layer from its module path (used by reports and mixed precision)."""
    if re.search(r"(^|\.)attn2\.|cross_attn|add_[qkv]_proj|to_add_out", name):
        return "cross_attn"
    if "temporal" in name:
        return "temporal_attn"
    if re.search(r"(^|\.)(attn\d*|attention|self_attn)\.", name):
        return "self_attn"
    if re.search(r"(^|\.)(ff|ffn|mlp|ff_context|feed_forward)\.|proj_mlp|(^|\.)fc\d", name):
        return "ffn"
    return "other"


Precision = "tuple[WeightSpec, ActSpec] | None"  # None: the layer stays in high (float) precision


def _layer_precision(name: str, config: QuantConfig, timestep: float | None = None) -> tuple[WeightSpec, ActSpec] | None:
    """Weight/activation spec of layer ``name`` after keep_fp and rules; None means keep high precision.

    Rules with ``timesteps`` apply only when ``timestep`` is given and lies in their range.
    """
    keep = any(re.search(p, name) for p in config.keep_fp)
    weight, act = config.weight, config.act
    for rule in config.rules:
        if rule.timesteps is not None and (timestep is None or not rule.timesteps[0] <= timestep <= rule.timesteps[1]):
            continue
        if not re.search(rule.pattern, name):
            continue
        keep = rule.keep_fp
        if rule.weight_bits is not None:
            weight = dataclasses.replace(weight, bits=rule.weight_bits,
                                         group_size=config.weight.group_size if rule.weight_bits <= 4 else None)
        if rule.act_bits is not None:
            act = ActSpec(rule.act_bits, act.granularity)
    return None if keep else (weight, act)


def layer_schedule(name: str, config: QuantConfig) -> tuple[Precision, list[tuple[float, float, Precision]]]:
    """(default precision, [(lo, hi, precision), ...]) of layer ``name``: closed timestep intervals in which its
    precision differs from the default (from the config's timestep rules; empty when it has none).

    The rules' range endpoints cut the timestep axis into points and open gaps; each piece takes the precision
    the rules give at it, adjacent equal pieces merge, and open ends become closed with ``math.nextafter``.
    """
    ranges = [r.timesteps for r in config.rules if r.timesteps is not None and re.search(r.pattern, name)]
    default = _layer_precision(name, config)
    if not ranges:
        return default, []
    points = sorted({v for r in ranges for v in r})
    pieces = []  # (lo, hi, precision) in timestep order
    for p, q in zip(points, points[1:] + [None]):
        pieces.append((p, p, _layer_precision(name, config, p)))
        if q is not None:
            lo, hi = math.nextafter(p, math.inf), math.nextafter(q, -math.inf)
            if lo <= hi:
                pieces.append((lo, hi, _layer_precision(name, config, (p + q) / 2)))
    merged: list[tuple[float, float, Precision]] = []
    for lo, hi, precision in pieces:
        if merged and merged[-1][2] == precision:
            merged[-1] = (merged[-1][0], hi, precision)
        else:
            merged.append((lo, hi, precision))
    return default, [piece for piece in merged if piece[2] != default]


def precision_key(precision: Precision) -> str:
    """Name of a precision inside a TimestepSwitchLinear: ``"w4a8"``, ``"w8a8"``, ... or ``"fp"``."""
    return "fp" if precision is None else f"w{precision[0].bits}a{precision[1].bits}"


def plan_layers(model: nn.Module, config: QuantConfig) -> dict[str, tuple[nn.Linear, LayerSpec]]:
    """name → (linear, spec) for every linear layer that ``config`` quantizes (at its default precision; see
    :func:`plan_schedules` for layers whose precision depends on the timestep)."""
    plan = {}
    for name, (linear, default, _) in plan_schedules(model, config).items():
        if default is not None:
            plan[name] = (linear, make_layer_spec(linear, *default))
    return plan


def plan_schedules(model: nn.Module, config: QuantConfig) -> dict[str, tuple[nn.Linear, Precision, list]]:
    """name → (linear, default precision, timestep schedule) for every linear layer quantized at some timestep."""
    plan = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        default, schedule = layer_schedule(name, config)
        if default is not None or schedule:
            plan[name] = (module, default, schedule)
    return plan


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize(model: nn.Module, config: QuantConfig | str | Path, calib: Iterable[dict]) -> nn.Module:
    """Quantize ``model`` in place and return it.

    Args:
        model: any module; its ``forward(**kwargs)`` is called once per calibration sample.
        config: a preset name (``"w8a8"``, ``"w4a8"``, ...), a :class:`QuantConfig`, or a YAML/JSON path.
        calib: iterable of kwargs dicts for ``model.forward`` (e.g. from :func:`viditq.capture_calibration`).
    """
    config = resolve_config(config)
    if getattr(model, "viditq_config", None) is not None:
        raise ValueError("model is already quantized by viditq; quantize the float model")
    samples = validate_calibration(calib)
    if config.mixed_precision is not None:
        from .mixed_precision import resolve_mixed_precision

        config = resolve_mixed_precision(model, config, samples)
    plan = plan_schedules(model, config)
    if not plan:
        raise ValueError(f"no nn.Linear layer of {type(model).__name__} is selected for quantization "
                         f"(keep_fp={config.keep_fp}, rules={config.rules})")
    layers = {name: linear for name, (linear, _, _) in plan.items()}
    stats, hessians = calibrate_layers(model, layers, samples, config)
    for name, (linear, default, schedule) in progress(plan.items(), desc=f"quantizing ({config.name})",
                                                      total=len(plan)):
        if not stats[name].call_absmax:
            raise ValueError(f"layer {name!r} was never called during calibration; keep it in high precision "
                             "with a keep_fp pattern or calibrate with inputs that reach it")
        build = functools.partial(build_layer, linear, stats=stats[name], hessian=hessians.get(name),
                                  config=config, name=name)
        if not schedule:
            _set_submodule(model, name, build(default))
            continue
        variants = {precision_key(p): p for p in [default] + [piece[2] for piece in schedule]}
        switch = TimestepSwitchLinear({key: build(p) for key, p in variants.items()},
                                      [(lo, hi, precision_key(p)) for lo, hi, p in schedule], precision_key(default))
        _set_submodule(model, name, switch)
    _mark_quantized(model, config)
    return model


def calibrate_layers(model: nn.Module, layers: dict[str, nn.Linear], samples: list[dict], config: QuantConfig):
    """One calibration pass: activation statistics of ``layers`` (and input Hessians when GPTQ is on)."""
    hooks = hessian_hooks(layers) if config.weight.gptq else contextlib.nullcontext({})
    with hooks as hessians:
        stats = collect_activation_stats(model, layers, samples, config.calib_rows_per_layer, config.seed)
    return stats, hessians


def build_layer(linear: nn.Linear, precision: Precision, *, stats: LayerStats, hessian, config: QuantConfig,
                name: str) -> nn.Module:
    """The module replacing ``linear`` at ``precision``: the float linear itself (None), or a balanced
    QuantLinear, GPTQ-rounded when the config asks for it and the weights have <= 4 bits."""
    if precision is None:
        return linear
    spec = make_layer_spec(linear, *precision)
    layer = build_quant_linear(linear, spec, stats, config.balance, name, config.seed)
    if precision[0].gptq and precision[0].bits <= 4 and hessian is not None:
        apply_gptq(layer, linear, hessian, stats.sample)
    return layer


def _mark_quantized(model: nn.Module, config: QuantConfig) -> None:
    model.viditq_config = config
    install_timestep_hook(model)
    if config.attention != "bf16":
        from .attention import apply_quantized_attention

        apply_quantized_attention(model, config.attention)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
