"""Quantization configs: frozen dataclasses that validate themselves, presets by name, YAML/JSON round trip.

A :class:`QuantConfig` says how every linear layer of a transformer is quantized:

* ``weight`` / ``act``: the default bit-widths and granularity (:class:`WeightSpec`, :class:`ActSpec`);
* ``balance``: static-dynamic channel balancing (smoothing scales from calibration, then a Hadamard rotation);
* ``keep_fp``: regexes of layer names left in high precision (embeddings, adaLN, final projection by default;
  setting it replaces those defaults, see :class:`QuantConfig`);
* ``rules``: ordered per-layer overrides (:class:`LayerRule`, regex → bits), the output of mixed precision;
* ``attention``: ``"bf16"`` (the model's own attention), ``"int8"`` or ``"fp8"`` (viditq's quantized attention).

Nested sections may be given as the dataclasses or as mappings of their fields (as in YAML/JSON); every level
rejects unknown fields and values of the wrong type with a ValueError that names the field.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1

# Layers that condition the whole network (embeddings, timestep/adaLN modulation, final projection) are small and
# sensitive: ViDiT-Q and every peer keep them in high precision. Matched with re.search on the module name.
DEFAULT_KEEP_FP = (
    r"^(pos_embed|patch_embed|x_embedder|context_embedder|time_embedding|time_embed|time_proj|time_text_embed"
    r"|adaln_single|caption_projection|condition_embedder|text_proj|norm_out|norm_final|proj_out)(\.|$)",
    r"(^|\.)norm\w*\.",  # adaLN modulation linears inside blocks (norm1.linear, norm1_context.linear, ...)
)
# The linear layers among those that feed the conditioning in: timestep / text / guidance embeddings and the adaLN
# modulation (per block and final). They see a few rows per forward (the batch's timestep embeddings, the text
# tokens) but hold much of a model's weights (CogVideoX-2B's per-block modulation: 354 M of 1.7 G parameters), so
# ``QuantConfig.conditioning_bits`` may store them weight-only (float activations, weights dequantized per call).
# Not the final projection (proj_out), nor convolutions (patch embeddings are nn.Conv2d).
CONDITIONING_LAYERS = (r"(^|\.)(time_embedding|time_embed|time_text_embed|adaln_single|caption_projection"
                       r"|condition_embedder|text_proj|context_embedder|norm\w*)(\.|$)")
CONDITIONING_BITS = (4, 8)
ATTENTION_CHOICES = ("bf16", "int8", "fp8")
GRANULARITIES = ("per_token", "per_tensor_static")
# Activation bits meaning "not quantized": the layer runs its (balanced) float input times its dequantized
# weights, the same stored weights as its quantized path (no second copy).
FLOAT_ACT_BITS = 16
# Number formats of weights and activations: signed integers with scales, or fp8 e4m3 (float8_e4m3fn) values with
# scales (8 bits only). The GEMM kernels pair int8 or packed int4 weights with int8 activations, fp8 with fp8, and
# packed int4 weights (staged to per-channel fp8 for the product) with fp8 activations.
FORMATS = ("int", "fp8")


def _check_format(fmt: str, bits: int, what: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"{what} format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "fp8" and bits not in (8, FLOAT_ACT_BITS):
        raise ValueError(f"{what} format 'fp8' (e4m3) has 8 bits, got bits={bits}")


def _check_bits(bits: int, what: str, allow_float: bool = False) -> None:
    if isinstance(bits, int) and not isinstance(bits, bool) and (
            2 <= bits <= 8 or (allow_float and bits == FLOAT_ACT_BITS)):
        return
    extra = f", or {FLOAT_ACT_BITS} (not quantized)" if allow_float else ""
    raise ValueError(f"{what} bits must be an integer between 2 and 8{extra}, got {bits!r}")


# -- field types: one check for every section ----------------------------------------------------------------
# annotation -> (what a value must be, what a list's items must be, test)
_SCALARS = {  # (numpy numbers pass as Python ones: a config must serialize to JSON)
    bool: ("True or False", "booleans", lambda v: isinstance(v, (bool, np.bool_)), bool),
    int: ("an integer", "integers", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), int),
    float: ("a number", "numbers", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), float),
    str: ("a string", "strings", lambda v: isinstance(v, (str, os.PathLike)), os.fspath),  # (a path: a cache file)
}


@functools.cache
def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_fields(obj, label: str) -> None:
    """Check every field of dataclass ``obj`` against its annotation, ValueError naming ``label`` and the field
    otherwise; lists become tuples, mappings the nested dataclass and a lone string in a tuple-of-strings field one
    item (``keep_fp="proj_out"`` is one pattern, not its characters)."""
    for name, hint in _field_types(type(obj)).items():
        value = getattr(obj, name)
        new = _conform(value, hint, f"{label} {name}".strip())
        if new is not value:
            object.__setattr__(obj, name, new)


def _conform(value, hint, where: str):
    optional = type(None) in typing.get_args(hint)  # ``X | None``: every optional field here has one other type
    if optional:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if dataclasses.is_dataclass(hint):
        return _section(hint, value, where)
    if typing.get_origin(hint) is tuple:
        item, *rest = typing.get_args(hint)
        size = None if rest == [Ellipsis] else 1 + len(rest)
        if isinstance(value, str) and item is str and size is None:
            value = (value,)
        if isinstance(value, (list, tuple)) and size in (None, len(value)):
            return tuple(_conform(v, item, f"{where}[{i}]") for i, v in enumerate(value))
        items = (f"{item.__name__}s or mappings of their fields" if dataclasses.is_dataclass(item)
                 else _SCALARS[item][1])
        expected = f"a list of {items}" if size is None else f"a (lo, hi) pair of {items}"  # size 2: timesteps
    else:
        expected, _, ok, python = _SCALARS[hint]
        if ok(value):
            new = python(value)
            return value if new == value and type(new) is type(value) else new
    raise ValueError(f"{where} must be {expected}{' or None' if optional else ''}, got {value!r}")


def _section(cls, value, where: str | None):
    """``value`` as a ``cls``: itself, or built from a mapping of its fields (a nested YAML/JSON section or a
    Python dict); ``where`` names the section in errors (None: the top level, a QuantConfig)."""
    if isinstance(value, cls):
        return value
    fields = dataclasses.fields(cls)
    known = ", ".join(f.name for f in fields)
    section = f"section {where!r}" if where else cls.__name__
    if not isinstance(value, Mapping):
        raise ValueError(f"{section} must be a {cls.__name__} or a mapping of its fields ({known}), got {value!r}")
    unknown = [k for k in value if k not in {f.name for f in fields}]
    missing = [f.name for f in fields if f.name not in value
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if unknown:
        raise ValueError(f"unknown field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} in {section}; "
                         f"known: {known}")
    if missing:
        raise ValueError(f"missing field{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))} in {section}")
    return cls(**value)


@dataclass(frozen=True)
class WeightSpec:
    """Weights: ``bits`` per output channel, or per ``group_size`` input channels when set.

    ``format="fp8"``: fp8 e4m3 values with one float32 scale per output channel (``absmax / 448``), symmetric,
    8 bits, no groups; it pairs with fp8 activations.
    """

    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None
    per_tensor: bool = False  # naive baseline only: one scale for the whole matrix
    gptq: bool = False  # error-compensating rounding (GPTQ) from calibration inputs, for <= 4-bit weights
    format: str = "int"
    # GPTQ on video models: weight of the inputs' frame-to-frame (second) differences in the Hessian, relative to
    # the inputs themselves (viditq.gptq.hessian_hooks); 0: plain GPTQ. Ignored where the token layout is unknown.
    gptq_temporal: float = 0.0

    def __post_init__(self):
        _check_fields(self, "weight")
        _check_bits(self.bits, "weight")
        _check_format(self.format, self.bits, "weight")
        if self.format == "fp8" and (not self.symmetric or self.group_size is not None or self.per_tensor
                                     or self.gptq):
            raise ValueError("weight format 'fp8' is symmetric per output channel: symmetric=True, "
                             "group_size=None, per_tensor=False, gptq=False")
        if self.group_size is not None and (self.group_size < 2 or self.group_size & (self.group_size - 1)):
            raise ValueError(f"weight group_size must be a power of two >= 2 or None, got {self.group_size!r}")
        if self.per_tensor and self.group_size is not None:
            raise ValueError("weight per_tensor and group_size are exclusive")
        if self.per_tensor and self.gptq:
            raise ValueError("weight per_tensor (naive baseline) and gptq are exclusive")
        t = self.gptq_temporal
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"weight gptq_temporal must be a finite number >= 0, got {self.gptq_temporal!r}")
        if self.gptq_temporal and not self.gptq:
            raise ValueError("weight gptq_temporal needs gptq=True")


@dataclass(frozen=True)
class ActSpec:
    """Activations: ``bits``, quantized per token at run time (``per_token``) or with one calibrated scale;
    ``bits=16`` leaves them in float (weight-only quantization: dequantized weights, float matmul).

    ``format="fp8"``: per-token fp8 e4m3 (scale ``absmax / 448``), which keeps a relative precision over the whole
    range of a token (heavy-tailed activations, GELU outputs) where int8 spends its codes evenly.
    """

    bits: int = 8
    granularity: str = "per_token"
    format: str = "int"

    def __post_init__(self):
        _check_fields(self, "act")
        _check_bits(self.bits, "activation", allow_float=True)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"activation granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        _check_format(self.format, self.bits, "activation")
        if self.format == "fp8" and self.granularity != "per_token":
            raise ValueError("activation format 'fp8' is quantized per token (granularity='per_token')")


@dataclass(frozen=True)
class BalanceSpec:
    """Static-dynamic channel balancing.

    smooth: divide activations by per-channel scales ``s = max|X|^alpha / max|W|^(1-alpha)`` (folded into W).
    alphas: candidate migration strengths; each layer keeps the one with the least calibration output error.
    rotate: then rotate channels with a randomized Hadamard matrix (weights offline, activations online).
    rotate_block: rotate runs of this many channels (a power of two; the largest one that divides the width, at
        most this) with a block-diagonal Hadamard matrix (within ~0.2 dB of the full rotation after smoothing);
        None (default): one rotation of the whole width. On the H100 our block-rotation kernel is not faster than
        the full-width one (benchmarks/NOTES.md), so the full rotation stays the default.
    rotate_min_gain: a layer is rotated only where that cuts its calibration output error (MSE) by at least this
        fraction; the rotation costs a transform per call at run time.
    """

    smooth: bool = True
    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    rotate: bool = True
    rotate_block: int | None = None
    rotate_min_gain: float = 0.1

    def __post_init__(self):
        _check_fields(self, "balance")
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        if self.smooth and (not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas)):
            raise ValueError(f"balance alphas must be a non-empty list of values in [0, 1], got {self.alphas!r}")
        b = self.rotate_block
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1)):
            raise ValueError(f"balance rotate_block must be a power of two >= 16 or null, got {b!r}")
        if not 0.0 <= self.rotate_min_gain < 1.0:
            raise ValueError(f"balance rotate_min_gain must be in [0, 1), got {self.rotate_min_gain!r}")


@dataclass(frozen=True)
class LayerRule:
    """Override for layers whose name matches ``pattern`` (re.search). Later rules win over earlier ones.

    ``timesteps``: optional (lo, hi) range of diffusion timesteps (inclusive, ``lo <= hi``, the values the model's
    ``timestep`` argument takes) in which the rule applies; a layer with timestep rules keeps one weight copy per
    distinct weight precision it needs.

    ``act_bits=16``: activations not quantized. Where the layer has quantized activations at the same weight
    precision in another timestep range, the 16-bit range reuses those weights (no second copy): the balanced
    float input times the dequantized weights. A rule that sets nothing but ``act_bits=16`` never turns a layer
    that is float at that point (``keep_fp``) into a quantized one; give ``weight_bits`` too for that.
    """

    pattern: str
    weight_bits: int | None = None
    act_bits: int | None = None
    keep_fp: bool = False
    timesteps: tuple[float, float] | None = None

    def __post_init__(self):
        _check_fields(self, f"rule {self.pattern!r}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"invalid layer rule pattern {self.pattern!r}: {e}") from None
        if self.weight_bits is not None:
            _check_bits(self.weight_bits, "rule weight")
        if self.act_bits is not None:
            _check_bits(self.act_bits, "rule activation", allow_float=True)
        if self.timesteps is not None:
            lo, hi = (float(t) for t in self.timesteps)
            if not lo <= hi:  # NaN too
                raise ValueError(f"rule {self.pattern!r} timesteps must be (lo, hi) with lo <= hi (an inclusive range "
                                 f"of diffusion timesteps), got {self.timesteps!r}")
            object.__setattr__(self, "timesteps", (lo, hi))


MP_GROUPINGS = ("block", "role", "layer")


def check_final_range_steps(final_range_steps: int, timestep_ranges: int) -> None:
    """ValueError unless ``final_range_steps`` is an integer >= 0 that leaves a range for the other steps."""
    if isinstance(final_range_steps, bool) or not isinstance(final_range_steps, int) or final_range_steps < 0:
        raise ValueError(f"final_range_steps must be an integer >= 0, got {final_range_steps!r}")
    if final_range_steps and timestep_ranges < 2:
        raise ValueError(f"final_range_steps={final_range_steps} needs timestep_ranges >= 2 (one range for the final "
                         f"steps, at least one for the others), got timestep_ranges={timestep_ranges}")


@dataclass(frozen=True)
class MixedPrecisionSpec:
    """Automatic metric-decoupled bit allocation, run by :func:`viditq.quantize` before quantizing.

    Sensitivity (output-MSE proxy on the calibration inputs) is measured per layer group and timestep range, then
    groups get ``high_bits`` weights in the ranges where they hurt most until a budget is met:

    budget_bits: average weight bits *as executed*, i.e. weighted by parameters and by the share of denoising
        steps in each timestep range (the bandwidth / speed budget).
    memory_bits: optional cap on average *stored* weight bits per parameter; a layer that needs two bit-widths
        in different timestep ranges keeps both copies and pays for both (4 + 8 = 12).
    allow_fp: let the most sensitive cells stay in 16-bit float (a third level above ``high_bits``).
    float_act_budget: share of the executed weights (parameters x share of denoising steps) that may run with
        float (16-bit) activations on their quantized weights; 0 (default) turns the level off. It stores nothing
        and leaves ``budget_bits`` / ``memory_bits`` unchanged (same weights), but those layer-steps run a float
        matmul instead of an integer one, hence its own budget. The sensitivity then also probes the A16 levels.
    final_range_steps: the last N denoising steps get a timestep range of their own (the first of
        ``timestep_ranges``; the other steps share the rest evenly), so the allocation can upgrade the last step
        alone; 0 (default): all ranges even. E.g. ``timestep_ranges=5, final_range_steps=1`` with 10 steps.
    flicker: video models: also measure the flicker family (``mixed_precision.flicker_metric`` on the model's
        raw output in the last ``max(1, final_range_steps)`` steps, frames along the model's frame axis) and
        allocate for it next to the MSE proxy; an error for a model whose frame axis is not known.
    cache: optional JSON file where the sensitivity table is kept and reused while the inputs are unchanged.
    """

    budget_bits: float | None = 5.0
    memory_bits: float | None = None
    high_bits: int = 8
    timestep_ranges: int = 4
    groups: str = "block"
    timestep_aware: bool = True
    allow_fp: bool = False
    float_act_budget: float = 0.0
    final_range_steps: int = 0
    flicker: bool = False
    cache: str | None = None

    def __post_init__(self):
        _check_fields(self, "mixed_precision")
        _check_bits(self.high_bits, "mixed-precision high weight")
        if not 0.0 <= self.float_act_budget <= 1.0:
            raise ValueError(f"mixed precision float_act_budget must be in [0, 1], got {self.float_act_budget!r}")
        if self.budget_bits is None and self.memory_bits is None:
            raise ValueError("mixed precision needs a budget: set budget_bits and/or memory_bits")
        for value, what in ((self.budget_bits, "budget_bits"), (self.memory_bits, "memory_bits")):
            if value is not None and not 2 <= value <= 32:
                raise ValueError(f"mixed precision {what} must be between 2 and 32 bits, got {value!r}")
        if self.timestep_ranges < 1:
            raise ValueError(f"timestep_ranges must be >= 1, got {self.timestep_ranges!r}")
        check_final_range_steps(self.final_range_steps, self.timestep_ranges)
        if self.groups not in MP_GROUPINGS:
            raise ValueError(f"mixed precision groups must be one of {MP_GROUPINGS}, got {self.groups!r}")


@dataclass(frozen=True)
class QuantConfig:
    """A quantization recipe (see the module docstring).

    ``keep_fp``: regexes (``re.search`` on module names) of the layers kept in high precision; a single string is
    one pattern. Setting it *replaces* the defaults (:data:`DEFAULT_KEEP_FP`: embeddings, timestep / adaLN
    modulation, final projection), so ``keep_fp="proj_out"`` quantizes the embeddings and modulation layers. To add
    patterns to the defaults: ``keep_fp=DEFAULT_KEEP_FP + (r"my_layer",)`` in Python; in YAML/JSON, which cannot
    name the defaults, append to the list a saved config writes out (``save`` lists them all), or add a rule
    ``{pattern: my_layer, keep_fp: true}`` (:class:`LayerRule`: keeps matching layers float on top of ``keep_fp``;
    later rules win). ``keep_fp=()`` quantizes every linear layer.

    ``float_final_steps``: the last N denoising steps run every quantized layer with float activations on its
    quantized weights (no second copy). Resolved by :func:`viditq.quantize` into one
    ``LayerRule(".*", act_bits=16, timesteps=(lo, cut))``, ``cut`` half-way between the N-th and (N+1)-th smallest
    calibration timestep (so calibrate with the number of steps you sample with). For pixel-space video models,
    whose last step writes its prediction straight into the video: 8-bit activation noise there is flicker.
    """

    name: str = "custom"
    weight: WeightSpec = field(default_factory=WeightSpec)
    act: ActSpec = field(default_factory=ActSpec)
    balance: BalanceSpec | None = field(default_factory=BalanceSpec)
    keep_fp: tuple[str, ...] = DEFAULT_KEEP_FP
    rules: tuple[LayerRule, ...] = ()
    attention: str = "bf16"
    mixed_precision: MixedPrecisionSpec | None = None  # resolved into ``rules`` by viditq.quantize
    float_final_steps: int = 0  # resolved into a timestep rule with act_bits=16 by viditq.quantize
    # Weight-only bits of the conditioning layers (CONDITIONING_LAYERS): None keeps them in float (keep_fp);
    # 8: int8 per output channel, 4: int4 g64 asymmetric; activations stay float (weights dequantized per call).
    conditioning_bits: int | None = None
    # fp8 activations: the feed-forward's up-projection quantizes the hidden state for the down-projection in its
    # GEMM epilogue, with a per-token scale that bounds the row (viditq.fusion.FusedFeedForward; faster, a few
    # tenths of a dB away from the exact per-token scale). False: the down-projection quantizes its own input.
    ff_hand_off: bool = True
    calib_rows_per_layer: int = 512  # input rows kept per layer for the alpha search (reservoir sample)
    seed: int = 0
    version: int = FORMAT_VERSION

    def __post_init__(self):
        _check_fields(self, "")
        for pattern in self.keep_fp:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"invalid keep_fp pattern {pattern!r}: {e}") from None
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        if isinstance(self.float_final_steps, bool) or not isinstance(self.float_final_steps, int) \
                or self.float_final_steps < 0:
            raise ValueError(f"float_final_steps must be an integer >= 0, got {self.float_final_steps!r}")
        if self.conditioning_bits is not None and self.conditioning_bits not in CONDITIONING_BITS:
            raise ValueError(f"conditioning_bits must be None (float) or one of {CONDITIONING_BITS}, "
                             f"got {self.conditioning_bits!r}")
        if self.calib_rows_per_layer < 1:
            raise ValueError(f"calib_rows_per_layer must be >= 1, got {self.calib_rows_per_layer}")
        if self.version > FORMAT_VERSION:
            raise ValueError(f"config format version {self.version} is newer than this viditq ({FORMAT_VERSION})")
        int4_fp8 = self.weight.format == "int" and self.weight.bits == 4 and self.act.format == "fp8"
        if self.weight.format != self.act.format and self.act.bits != FLOAT_ACT_BITS and not int4_fp8:
            raise ValueError(f"weight format {self.weight.format!r} ({self.weight.bits} bits) and activation format "
                             f"{self.act.format!r} differ; the GEMMs take int weights with int activations, fp8 "
                             "with fp8, or 4-bit int weights (staged to fp8) with fp8 activations")
        if self.weight.format == "fp8" or int4_fp8:
            bad = [r.pattern for r in self.rules
                   if r.weight_bits not in (None, self.weight.bits) or r.act_bits not in (None, 8, FLOAT_ACT_BITS)]
            if bad or self.mixed_precision is not None:
                raise ValueError(f"fp8 configs have {self.weight.bits}-bit weights and 8-bit (or float) activations "
                                 f"only: no mixed precision and no rules with other bits (rules: {bad})")

    # -- serialization -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        """A QuantConfig from a mapping of its fields; nested sections are mappings too (``__post_init__`` builds
        them). ValueError for unknown fields or values of the wrong type, at any level."""
        return _section(cls, d, None)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(json.loads(self.to_json()), sort_keys=False))
        else:
            path.write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "QuantConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"quantization config file not found: {path}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                def at(mark):
                    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

                problem = getattr(e, "problem", None) or str(e)
                context = getattr(e, "context", None)
                context = f" ({context}{at(getattr(e, 'context_mark', None))})" if context else ""
                raise ValueError(f"{path}: invalid YAML{at(getattr(e, 'problem_mark', None))}: "
                                 f"{problem}{context}") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of QuantConfig fields")
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------------ presets
PRESETS: dict[str, QuantConfig] = {}


def register_preset(config: QuantConfig) -> QuantConfig:
    PRESETS[config.name] = config
    return config


register_preset(QuantConfig("w8a8", WeightSpec(8), ActSpec(8)))
# W8A8 with float activations (its 8-bit weights, no second copy) in the last denoising step: on the embedded
# pixel-space T2V model the 8-bit activation noise of that step is all of W8A8's extra flicker.
register_preset(QuantConfig("w8a8-float-last", WeightSpec(8), ActSpec(8), float_final_steps=1))
register_preset(QuantConfig("w6a6", WeightSpec(6), ActSpec(6)))
register_preset(QuantConfig("w4a8", WeightSpec(4, symmetric=False, group_size=64), ActSpec(8)))
register_preset(QuantConfig("w4a4", WeightSpec(4, symmetric=False, group_size=64), ActSpec(4)))
# Error-compensating (GPTQ) rounding of the 4-bit weights, from the calibration inputs' Hessians; on video models
# the Hessians also weigh the inputs' frame-to-frame differences (gptq_temporal=1: embedded T2V flicker excess
# +15.9 -> +11.8 % as W4A8, +6.1 -> +2.8 % in W4A8-mp, means of 5 quantization seeds; docs/mixed_precision.md)
register_preset(QuantConfig("w4a8-gptq", WeightSpec(4, symmetric=False, group_size=64, gptq=True, gptq_temporal=1.0),
                            ActSpec(8)))
register_preset(QuantConfig("w4a4-gptq", WeightSpec(4, symmetric=False, group_size=64, gptq=True), ActSpec(4)))
# Metric-decoupled mixed precision: W4A8 (GPTQ) base, 8-bit weights where (and when) the model is most sensitive,
# 5 bits on average as executed and at most 6 stored (a second weight copy only where it pays for itself).
register_preset(QuantConfig("w4a8-mp", WeightSpec(4, symmetric=False, group_size=64, gptq=True, gptq_temporal=1.0),
                            ActSpec(8),
                            mixed_precision=MixedPrecisionSpec(budget_bits=5.0, memory_bits=6.0)))
# ... for video models: also the flicker family (frame-to-frame noise of the last step's output), the last step as
# a timestep range of its own and float activations on up to 15 % of the executed weights (embedded T2V, five
# quantization seeds: flicker +2.3 % vs FP where w4a8-mp gives +7.8 %, alignment and FD as w4a8-mp's; README)
register_preset(QuantConfig("w4a8-mp-video", WeightSpec(4, symmetric=False, group_size=64, gptq=True,
                                                        gptq_temporal=1.0), ActSpec(8),
                            mixed_precision=MixedPrecisionSpec(budget_bits=5.0, memory_bits=6.0, timestep_ranges=5,
                                                               final_range_steps=1, float_act_budget=0.15,
                                                               flicker=True)))
# FP8 e4m3 weights (per output channel) and activations (per token): the Hopper fp8 tensor cores (faster than
# int8 in our kernels), balancing kept where it cuts the calibration error.
register_preset(QuantConfig("w8a8-fp8", WeightSpec(8, format="fp8"), ActSpec(8, format="fp8")))
# ... with float activations on the fp8 weights in the last denoising step (fp8's per-token rounding there is the
# extra flicker of pixel-space video models)
register_preset(QuantConfig("w8a8-fp8-float-last", WeightSpec(8, format="fp8"), ActSpec(8, format="fp8"),
                            float_final_steps=1))
# W4A8 on the fp8 path: int4 g64 weights (staged to per-channel fp8 for each product) with per-token fp8
# activations, which need no rotation (the int8 path's rotated activation quantization is its cost on PixArt)
register_preset(QuantConfig("w4a8-fp8", WeightSpec(4, symmetric=False, group_size=64), ActSpec(8, format="fp8")))
register_preset(QuantConfig("w4a8-fp8-gptq", WeightSpec(4, symmetric=False, group_size=64, gptq=True),
                            ActSpec(8, format="fp8")))
# ... with float activations on the same int4 weights in the last denoising step (video: fp8's flicker)
register_preset(QuantConfig("w4a8-fp8-float-last", WeightSpec(4, symmetric=False, group_size=64),
                            ActSpec(8, format="fp8"), float_final_steps=1))
# Ablations / baselines: per-token dynamic without balancing, and the naive static per-tensor scheme.
register_preset(QuantConfig("w8a8-dynamic", WeightSpec(8), ActSpec(8), balance=None))
# fp8 without balancing: the numerics of torchao's Float8DynamicActivationFloat8WeightConfig(PerRow())
register_preset(QuantConfig("w8a8-fp8-dynamic", WeightSpec(8, format="fp8"), ActSpec(8, format="fp8"),
                            balance=None))
register_preset(QuantConfig("w4a8-dynamic", WeightSpec(4, False, 64), ActSpec(8), balance=None))
register_preset(
    QuantConfig("w8a8-static", WeightSpec(8, per_tensor=True), ActSpec(8, "per_tensor_static"), balance=None)
)


def resolve_config(config: "QuantConfig | str | Path") -> QuantConfig:
    """A QuantConfig from itself, a preset name, or a YAML/JSON file path."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, (str, Path)):
        key = str(config)
        if key in PRESETS:
            return PRESETS[key]
        if Path(key).suffix in (".yaml", ".yml", ".json"):
            return QuantConfig.load(key)
        raise ValueError(f"unknown preset {key!r}; choose one of {sorted(PRESETS)} or pass a .yaml/.json path")
    raise TypeError(f"config must be a QuantConfig, a preset name or a path, got {type(config).__name__}")
