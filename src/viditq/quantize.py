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
import warnings
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .balance import build_quant_linear, concat_linears, split_quant_linear
from .calibrate import LayerStats, check_calibration_kwargs, collect_activation_stats, validate_calibration
from .config import CONDITIONING_LAYERS, FLOAT_ACT_BITS, ActSpec, LayerRule, QuantConfig, WeightSpec, resolve_config
from .gptq import apply_gptq, hessian_hooks
from .layers import (
    LayerSpec, QuantLinear, TimestepSwitchLinear, current_timestep, install_input_sharing, install_timestep_hook,
    install_weight_staging, make_layer_spec, timestep_position,
)
from .progress import progress

LAYER_GROUPS = ("cross_attn", "temporal_attn", "self_attn", "ffn", "other")
# Attention input projections that may read one tensor: siblings of one family under one parent module.
SHARED_INPUT_FAMILIES = (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))


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

    Rules with ``timesteps`` apply only when ``timestep`` is given and lies in their range. A rule that sets
    nothing but ``act_bits=16`` (float activations) changes the activations of a quantized layer and leaves a
    float one float.
    """
    keep = any(re.search(p, name) for p in config.keep_fp)
    weight, act = config.weight, config.act
    if config.conditioning_bits is not None and re.search(CONDITIONING_LAYERS, name):
        keep, (weight, act) = False, conditioning_precision(config.conditioning_bits)
    for rule in config.rules:
        if rule.timesteps is not None and (timestep is None or not rule.timesteps[0] <= timestep <= rule.timesteps[1]):
            continue
        if not re.search(rule.pattern, name):
            continue
        if rule.act_bits == FLOAT_ACT_BITS and rule.weight_bits is None and not rule.keep_fp:
            act = dataclasses.replace(act, bits=FLOAT_ACT_BITS)  # float activations only: a float layer stays float
            continue
        keep = rule.keep_fp
        if rule.weight_bits is not None:
            weight = dataclasses.replace(weight, bits=rule.weight_bits,
                                         group_size=config.weight.group_size if rule.weight_bits <= 4 else None)
        if rule.act_bits is not None:
            act = dataclasses.replace(act, bits=rule.act_bits)
    return None if keep else (weight, act)


def conditioning_precision(bits: int) -> tuple[WeightSpec, ActSpec]:
    """Weight-only precision of the conditioning layers (``QuantConfig.conditioning_bits``): int8 per output
    channel, or int4 g64 asymmetric; float activations."""
    weight = WeightSpec(8) if bits == 8 else WeightSpec(bits, symmetric=False, group_size=64)
    return weight, ActSpec(FLOAT_ACT_BITS)


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
    """Name of a precision inside a TimestepSwitchLinear: ``"w4a8"``, ``"w8a8"``, ``"w8a16"``, ``"w8a8_fp8"``, ...
    or ``"fp"``."""
    if precision is None:
        return "fp"
    weight, act = precision
    return f"w{weight.bits}a{act.bits}" + ("_fp8" if "fp8" in (weight.format, act.format) else "")


def switch_variants(precisions: list[Precision]) -> tuple[dict[str, Precision], dict[str, str]]:
    """(stored variants key → precision, float_act key → stored key) of a timestep-switching layer.

    A float-activation (A16) precision whose weight spec a quantized-activation precision of the layer shares
    runs on that variant's weights (no copy); any other A16 precision is stored as a weight-only variant."""
    by_key = {precision_key(p): p for p in precisions}
    stored = {k: p for k, p in by_key.items() if p is None or p[1].bits != FLOAT_ACT_BITS}
    float_act = {}
    for key, p in by_key.items():
        if key in stored:
            continue
        twin = next((k for k, q in stored.items() if q is not None and q[0] == p[0]), None)
        if twin is None:
            stored[key] = p
        else:
            float_act[key] = twin
    return stored, float_act


def final_steps_range(samples: list[dict], steps: int) -> tuple[float, float]:
    """Timestep range (lo, cut) of the ``steps`` smallest calibration timesteps: ``cut`` half-way to the next one
    (the whole horizon when there are no more), ``lo`` = min(0, smallest)."""
    times = sorted({t for t in (current_timestep((), s, None) for s in samples) if t is not None})
    if not times:
        raise ValueError("float_final_steps needs calibration samples with a 'timestep' argument")
    lo = min(times[0], 0.0)
    if steps >= len(times):
        return lo, max(times[-1], 1000.0 if times[-1] > 1 else 1.0)
    return lo, (times[steps - 1] + times[steps]) / 2


def resolve_float_final_steps(config: QuantConfig, samples: list[dict]) -> QuantConfig:
    """``config`` with ``float_final_steps`` turned into its LayerRule (act_bits=16 in the final steps' range)."""
    rule = LayerRule(".*", act_bits=FLOAT_ACT_BITS, timesteps=final_steps_range(samples, config.float_final_steps))
    return dataclasses.replace(config, rules=config.rules + (rule,), float_final_steps=0)


def float_final_range(config: QuantConfig) -> tuple[float, float] | None:
    """The timestep range in which ``float_final_steps`` runs float activations (its resolved rule), or None."""
    for rule in reversed(config.rules):
        if (rule.pattern, rule.act_bits, rule.weight_bits, rule.keep_fp) == (".*", FLOAT_ACT_BITS, None, False) \
                and rule.timesteps is not None:
            return rule.timesteps
    return None


@contextlib.contextmanager
def recorded_timesteps(model: nn.Module):
    """A list that fills with the timestep of each of ``model``'s forward calls inside the block."""
    position, seen = timestep_position(model), []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(current_timestep(args, kwargs, position)), with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def plan_layers(model: nn.Module, config: QuantConfig) -> dict[str, tuple[nn.Linear, LayerSpec]]:
    """name → (linear, spec) for every linear layer that ``config`` quantizes (at its default precision; see
    :func:`plan_schedules` for layers whose precision depends on the timestep)."""
    plan = {}
    for name, (linear, default, _) in plan_schedules(model, config).items():
        if default is not None:
            plan[name] = (linear, make_layer_spec(linear, *default))
    return plan


def plan_schedules(model: nn.Module, config: QuantConfig) -> dict[str, tuple[nn.Linear, Precision, list]]:
    """name → (linear, default precision, timestep schedule) for every linear layer quantized at some timestep.
    Layers inside the modules a diffusers model keeps in float32 (``_keep_in_fp32_modules``: Wan's time embedding,
    whose forward reads its parameters' dtype) stay float whatever the config says."""
    plan, kept = {}, []
    fp32_modules = getattr(model, "_keep_in_fp32_modules", None) or ()
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        default, schedule = layer_schedule(name, config)
        if default is not None or schedule:
            if any(m in name.split(".") for m in fp32_modules):
                kept.append(name)
            else:
                plan[name] = (module, default, schedule)
    if kept:
        warnings.warn(f"{len(kept)} layers the config quantizes stay float: {type(model).__name__} keeps their "
                      f"modules in float32 (_keep_in_fp32_modules): {kept[:4]}{' ...' if len(kept) > 4 else ''}",
                      stacklevel=3)
    return plan


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize(model: nn.Module, config: QuantConfig | str | Path, calib: Iterable[dict], *,
             share_inputs: bool = True) -> nn.Module:
    """Quantize ``model`` in place and return it.

    Args:
        model: any module; its ``forward(**kwargs)`` is called once per calibration sample.
        config: a preset name (``"w8a8"``, ``"w4a8"``, ...), a :class:`QuantConfig`, or a YAML/JSON path.
        calib: iterable of kwargs dicts for ``model.forward`` (e.g. from :func:`viditq.capture_calibration`).
        share_inputs: attention projections that read the same tensor (q, k, v of a self-attention; see
            :func:`shared_input_groups`) get one smoothing vector and rotation, chosen jointly from the shared
            activation statistics and their stacked weights, so their input is quantized once per forward.
    """
    if not isinstance(model, nn.Module):
        hint = (": pass pipe.transformer, or quantize the whole pipeline with viditq.quantize_pipeline"
                if hasattr(model, "components") else "")
        raise TypeError(f"viditq.quantize expects a torch.nn.Module, got {type(model).__name__}{hint}")
    config = resolve_config(config)
    if getattr(model, "viditq_config", None) is not None:
        raise ValueError("model is already quantized by viditq; quantize the float model")
    samples = validate_calibration(calib)
    check_calibration_kwargs(model, samples)
    if config.mixed_precision is not None:
        from .mixed_precision import resolve_mixed_precision

        config = resolve_mixed_precision(model, config, samples)
    if config.float_final_steps:
        config = resolve_float_final_steps(config, samples)
    plan = plan_schedules(model, config)
    if not plan:
        raise ValueError(f"no nn.Linear layer of {type(model).__name__} is selected for quantization "
                         f"(keep_fp={config.keep_fp}, rules={config.rules})")
    layers = {name: linear for name, (linear, _, _) in plan.items()}
    stats, hessians = calibrate_layers(model, layers, samples, config)
    for name, st in stats.items():
        if not st.call_absmax:
            raise ValueError(f"layer {name!r} was never called during calibration; keep it in high precision "
                             "with a keep_fp pattern or calibrate with inputs that reach it")
    groups = shared_input_groups(plan, stats) if share_inputs else []
    grouped = {name for group in groups for name in group}
    work = [(name, None) for name in plan if name not in grouped] + [(group[0], group) for group in groups]
    for name, group in progress(work, desc=f"quantizing ({config.name})", total=len(work)):
        if group is not None:
            for member, layer in zip(group, build_shared_group(plan, group, stats, hessians, config)):
                _set_submodule(model, member, layer)
            continue
        linear, default, schedule = plan[name]
        build = functools.partial(build_layer, linear, stats=stats[name], hessian=hessians.get(name),
                                  config=config, name=name)
        if not schedule:
            _set_submodule(model, name, build(default))
            continue
        stored, float_act = switch_variants([default] + [piece[2] for piece in schedule])
        switch = TimestepSwitchLinear({key: build(p) for key, p in stored.items()},
                                      [(lo, hi, precision_key(p)) for lo, hi, p in schedule], precision_key(default),
                                      float_act)
        _set_submodule(model, name, switch)
    _mark_quantized(model, config)
    return model


def _same_input(a, b) -> bool:
    """Whether two layers' calibration statistics come from the same tensors (every call's channel absmax)."""
    return len(a.call_absmax) == len(b.call_absmax) and all(
        torch.equal(x, y) for x, y in zip(a.call_absmax, b.call_absmax))


def shared_input_groups(plan: dict, stats: dict) -> list[list[str]]:
    """Groups of layer names that read one input tensor and can share its quantization: members of one
    projection family (``SHARED_INPUT_FAMILIES``) under one parent, quantized at one precision with no timestep
    schedule, dynamic per-token activations, and identical input statistics in every calibration call (so
    cross-attention groups only k and v, which read the text states)."""
    candidates: dict[tuple, list[str]] = {}
    for name, (linear, default, schedule) in plan.items():
        parent, _, leaf = name.rpartition(".")
        family = next((i for i, fam in enumerate(SHARED_INPUT_FAMILIES) if leaf in fam), None)
        if (family is None or schedule or default is None or default[1].granularity == "per_tensor_static"
                or default[1].bits == FLOAT_ACT_BITS):
            continue
        candidates.setdefault((parent, family, linear.in_features, precision_key(default), default), []).append(name)
    groups = []
    for names in candidates.values():
        while len(names) > 1:
            head, rest = names[0], names[1:]
            group = [head] + [n for n in rest if _same_input(stats[head], stats[n])]
            if len(group) > 1:
                groups.append(group)
            names = [n for n in rest if n not in group]
    return groups


def build_shared_group(plan: dict, group: list[str], stats: dict, hessians: dict, config: QuantConfig) -> list:
    """QuantLinears for the layers of ``group`` with one balancing chosen on their stacked weights (the members'
    calibration rows pooled), GPTQ-rounded jointly when the config asks for it; split back per member."""
    linears = [plan[name][0] for name in group]
    precision = plan[group[0]][1]
    joint = concat_linears(linears)
    pooled = LayerStats(call_absmax=stats[group[0]].call_absmax, rows=[r for n in group for r in stats[n].rows])
    key = shared_group_name(group)
    layer = build_layer(joint, precision, stats=pooled, hessian=hessians.get(group[0]), config=config, name=key)
    return split_quant_linear(layer, linears, key)


def shared_group_name(group: list[str]) -> str:
    """``"blocks.0.attn1.to_q+to_k+to_v"``: the group's key in LayerSpec.input_group and its seed name."""
    parent, _, _ = group[0].rpartition(".")
    leaves = "+".join(n.rpartition(".")[2] for n in group)
    return f"{parent}.{leaves}" if parent else leaves


def calibrate_layers(model: nn.Module, layers: dict[str, nn.Linear], samples: list[dict], config: QuantConfig):
    """One calibration pass: activation statistics of ``layers`` (and input Hessians when GPTQ is on)."""
    hooks = hessian_hooks(layers, model, config.weight.gptq_temporal) if config.weight.gptq \
        else contextlib.nullcontext({})
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
    from .fusion import fuse_ada_norm_single, fuse_cogvideox_blocks, fuse_gelu, fuse_norms

    model.viditq_config = config
    install_timestep_hook(model)
    install_input_sharing(model)
    install_weight_staging(model)
    fuse_norms(model)
    fuse_gelu(model, hand_off=config.ff_hand_off)
    fuse_ada_norm_single(model)
    fuse_cogvideox_blocks(model)
    if config.attention != "bf16":
        from .attention import apply_quantized_attention

        apply_quantized_attention(model, config.attention)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
