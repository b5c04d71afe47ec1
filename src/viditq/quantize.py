"""``viditq.quantize``: calibrate → balance → quantize → pack, by swapping ``nn.Linear`` for ``QuantLinear``.

Works on any ``torch.nn.Module`` whose forward takes keyword arguments (every diffusers transformer does): layers
are discovered from the module tree, classified by name (self-/cross-/temporal attention, FFN), and the ones
that condition the network (embeddings, adaLN, final projection) are kept in high precision by regex.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from torch import nn

from .balance import build_quant_linear
from .calibrate import collect_activation_stats, validate_calibration
from .config import ActSpec, QuantConfig, WeightSpec, resolve_config
from .layers import LayerSpec, QuantLinear, make_layer_spec
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


def _layer_precision(name: str, config: QuantConfig) -> tuple[WeightSpec, ActSpec] | None:
    """Weight/activation spec of layer ``name`` after keep_fp and rules; None means keep high precision."""
    keep = any(re.search(p, name) for p in config.keep_fp)
    weight, act = config.weight, config.act
    for rule in config.rules:
        if rule.timesteps is not None or not re.search(rule.pattern, name):
            continue
        keep = rule.keep_fp
        if rule.weight_bits is not None:
            weight = WeightSpec(rule.weight_bits, weight.symmetric,
                                weight.group_size if rule.weight_bits <= 4 else None, weight.per_tensor)
        if rule.act_bits is not None:
            act = ActSpec(rule.act_bits, act.granularity)
    return None if keep else (weight, act)


def plan_layers(model: nn.Module, config: QuantConfig) -> dict[str, tuple[nn.Linear, LayerSpec]]:
    """name → (linear, spec) for every linear layer that ``config`` quantizes."""
    plan = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        precision = _layer_precision(name, config)
        if precision is not None:
            plan[name] = (module, make_layer_spec(module, *precision))
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
    plan = plan_layers(model, config)
    if not plan:
        raise ValueError(f"no nn.Linear layer of {type(model).__name__} is selected for quantization "
                         f"(keep_fp={config.keep_fp}, rules={config.rules})")
    layers = {name: linear for name, (linear, _) in plan.items()}
    stats = collect_activation_stats(model, layers, samples, config.calib_rows_per_layer, config.seed)
    for name, (linear, spec) in progress(plan.items(), desc=f"quantizing ({config.name})", total=len(plan)):
        if not stats[name].call_absmax:
            raise ValueError(f"layer {name!r} was never called during calibration; keep it in high precision "
                             "with a keep_fp pattern or calibrate with inputs that reach it")
        _set_submodule(model, name, build_quant_linear(linear, spec, stats[name], config.balance, name, config.seed))
    _mark_quantized(model, config)
    return model


def _mark_quantized(model: nn.Module, config: QuantConfig) -> None:
    model.viditq_config = config
    if config.attention != "bf16":
        from .attention import apply_quantized_attention

        apply_quantized_attention(model, config.attention)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
