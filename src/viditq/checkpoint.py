"""Quantized checkpoints: a directory of JSON + safetensors, written atomically, validated on load, no pickle.

Layout of ``save_quantized(model, dir)``::

    dir/config.json        the model's own config (diffusers ``save_config``), when it has one
    dir/viditq.json        format version, model class, dtype, QuantConfig, every QuantLinear's LayerSpec,
                           the schedules of timestep-switching layers (stored variants, and the float-activation
                           keys that run on one of them), size and SHA-256 of the tensors file
    dir/model.safetensors  the full state dict: packed integer weights, scales, smoothing and rotation tensors

A pipeline is saved in the diffusers layout (``model_index.json``, scheduler, tokenizer, ...) with each
quantized component in the format above in its subfolder, listed in ``viditq_pipeline.json``.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from .config import FORMAT_VERSION, QuantConfig
from .layers import LayerSpec, QuantLinear, TimestepSwitchLinear
from .quantize import _mark_quantized, _set_submodule, quantized_layers

META_FILE = "viditq.json"
TENSORS_FILE = "model.safetensors"
PIPELINE_META_FILE = "viditq_pipeline.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def atomic_directory(path: Path, write) -> None:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``path`` in one rename (replacing an old ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_model(model: nn.Module, directory: Path) -> None:
    config: QuantConfig | None = getattr(model, "viditq_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} is not quantized: call viditq.quantize(model, config, calib) first")
    cls = type(model)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_config"):  # diffusers
        model.save_config(directory)
    elif hasattr(getattr(model, "config", None), "save_pretrained"):  # transformers
        model.config.save_pretrained(directory)
    save_model(model, str(directory / TENSORS_FILE))
    meta = {
        "format_version": FORMAT_VERSION,
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "dtype": str(_float_dtype(model)).removeprefix("torch."),
        "quant_config": config.to_dict(),
        "layers": {name: layer.spec.to_dict() for name, layer in quantized_layers(model).items()},
        "switch_layers": {name: m.schedule_dict() for name, m in model.named_modules()
                          if isinstance(m, TimestepSwitchLinear)},
        "tensors_bytes": (directory / TENSORS_FILE).stat().st_size,
        "tensors_sha256": _sha256(directory / TENSORS_FILE),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def _is_pipeline(obj) -> bool:
    return hasattr(obj, "components") and hasattr(obj, "save_pretrained") and not isinstance(obj, nn.Module)


def _write_pipeline(pipe, directory: Path) -> None:
    """Diffusers pipeline layout; quantized components are written in viditq's format in their subfolder."""
    quantized = {n: c for n, c in pipe.components.items() if getattr(c, "viditq_config", None) is not None}
    if not quantized:
        raise ValueError("no component of the pipeline is quantized: call viditq.quantize(pipe.transformer, ...) "
                         "first")
    for name in quantized:
        setattr(pipe, name, None)  # diffusers skips None components; their model_index entry stays
    try:
        pipe.save_pretrained(directory)
    finally:
        for name, component in quantized.items():
            setattr(pipe, name, component)
    for name, component in quantized.items():
        _write_model(component, directory / name)
    (directory / PIPELINE_META_FILE).write_text(json.dumps(
        {"format_version": FORMAT_VERSION, "quantized_components": sorted(quantized)}, indent=2))


def save_quantized(obj, path: str | Path) -> Path:
    """Save a quantized model, or a diffusers pipeline with quantized components, to the directory ``path``.

    The directory is written next to ``path`` and renamed into place, so a crash never leaves a half-written
    checkpoint behind (an existing ``path`` is replaced only once the new one is complete).
    """
    write = _write_pipeline if _is_pipeline(obj) else _write_model
    atomic_directory(Path(path), lambda tmp: write(obj, tmp))
    return Path(path)


def load_pipeline(path: str | Path, device: str | torch.device | None = None, **kwargs):
    """Load a pipeline saved by :func:`save_quantized` (quantized components restored, the rest by diffusers)."""
    from .models import pipeline_class_for

    path = Path(path)
    meta_file = path / PIPELINE_META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a quantized viditq pipeline (no {PIPELINE_META_FILE})")
    meta = json.loads(meta_file.read_text())
    components = {name: load_quantized(path / name) for name in meta["quantized_components"]}
    pipe = pipeline_class_for(path).from_pretrained(path, **components, **kwargs)
    return pipe.to(device) if device is not None else pipe


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a viditq checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file} is not valid JSON ({e}); the checkpoint is corrupt") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{meta_file}: unsupported format_version {version!r} (this viditq reads <= {FORMAT_VERSION})")
    return meta


def _check_tensors_file(path: Path, meta: dict) -> Path:
    tensors = path / TENSORS_FILE
    if not tensors.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {TENSORS_FILE}")
    size = tensors.stat().st_size
    if size != meta["tensors_bytes"] or _sha256(tensors) != meta["tensors_sha256"]:
        raise ValueError(f"{tensors} is truncated or corrupt ({size} bytes, expected {meta['tensors_bytes']} "
                         "with a matching SHA-256); re-save the checkpoint")
    return tensors


def _build_model(path: Path, meta: dict) -> nn.Module:
    module_name, _, qualname = meta["model_class"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError):
        raise ValueError(f"cannot import the checkpoint's model class {meta['model_class']!r}; "
                         "pass the float model with load_quantized(path, model=...)") from None
    if (path / "config.json").is_file():
        if hasattr(cls, "from_config") and hasattr(cls, "load_config"):  # diffusers
            return cls.from_config(cls.load_config(path))
        if hasattr(cls, "config_class"):  # transformers
            return cls(cls.config_class.from_pretrained(path)).eval()
    raise ValueError(f"{meta['model_class']} cannot be rebuilt from a saved config; "
                     "pass the float model with load_quantized(path, model=...)")


def _float_linear(model: nn.Module, name: str, spec_dict: dict | None) -> nn.Linear:
    """The float ``nn.Linear`` at ``name``, checked against the saved LayerSpec (when there is one)."""
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"checkpoint does not match the model: it has no layer {name!r}") from None
    shape = None if spec_dict is None else (spec_dict["in_features"], spec_dict["out_features"])
    if not isinstance(linear, nn.Linear) or (shape is not None and (linear.in_features, linear.out_features) != shape):
        raise ValueError(f"checkpoint does not match the model at {name!r}: expected Linear{shape or ''}, "
                         f"found {linear}")
    return linear


def load_quantized(path: str | Path, model: nn.Module | None = None, device: str | torch.device | None = None):
    """Load a checkpoint written by :func:`save_quantized`.

    Diffusers models are rebuilt from the saved ``config.json``; any other module must be passed as ``model``
    (its float architecture; weights are overwritten). Forward outputs are bit-identical to the saved model's.
    """
    path = Path(path)
    meta = read_metadata(path)
    tensors = _check_tensors_file(path, meta)
    config = QuantConfig.from_dict(meta["quant_config"])
    if model is None:
        model = _build_model(path, meta)
    elif getattr(model, "viditq_config", None) is not None:
        raise ValueError("load_quantized needs the float model architecture, got an already quantized model")
    model = model.to(getattr(torch, meta["dtype"]))
    switches = meta.get("switch_layers", {})
    for name, info in switches.items():  # timestep-dependent layers: one variant per precision
        stored_default = info.get("float_act", {}).get(info["default"], info["default"])
        linear = _float_linear(model, name, meta["layers"].get(f"{name}.variants.{stored_default}"))
        variants = {key: linear if key == "fp" else
                    QuantLinear(LayerSpec(**meta["layers"][f"{name}.variants.{key}"]), out_dtype=linear.weight.dtype)
                    for key in info["variants"]}
        _set_submodule(model, name, TimestepSwitchLinear(variants, info["schedule"], info["default"],
                                                         info.get("float_act")))
    for name, spec_dict in meta["layers"].items():
        if any(name.startswith(f"{s}.variants.") for s in switches):
            continue
        spec = LayerSpec(**spec_dict)
        linear = _float_linear(model, name, spec_dict)
        _set_submodule(model, name, QuantLinear(spec, out_dtype=linear.weight.dtype))
    _load_tensors(model, tensors)
    _mark_quantized(model, config)
    return model.to(device) if device is not None else model


def _load_tensors(model: nn.Module, tensors: Path) -> None:
    """Load the safetensors file into ``model``; every tensor must exist in the model with its shape and dtype (a
    silent cast would turn int8 codes into fp8 values, say)."""
    try:
        state = load_file(str(tensors))
    except SafetensorError as e:
        raise ValueError(f"cannot read {tensors}: {e}") from None
    expected = model.state_dict()
    saved_ptrs = {expected[name].data_ptr() for name in state if name in expected}
    # tied parameters (T5's shared / embed_tokens) are saved once: a missing name is fine if its twin is there
    missing = sorted(n for n in set(expected) - set(state)
                     if not expected[n].numel() or expected[n].data_ptr() not in saved_ptrs)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, value in state.items():
        want = expected[name]
        if value.dtype != want.dtype or value.shape != want.shape:
            raise ValueError(f"checkpoint tensor {name!r} is {value.dtype} {tuple(value.shape)}, the layer spec "
                             f"needs {want.dtype} {tuple(want.shape)}")
    model.load_state_dict(state, strict=False)
