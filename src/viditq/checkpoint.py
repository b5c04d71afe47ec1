"""Quantized checkpoints: a directory of JSON + safetensors, written atomically, validated on load, no pickle.

Layout of ``save_quantized(model, dir)``::

    dir/config.json        the model's own config (diffusers ``save_config``), when it has one
    dir/viditq.json        format version, model class, dtype, QuantConfig, every QuantLinear's LayerSpec,
                           the schedules of timestep-switching layers (stored variants, and the float-activation
                           keys that run on one of them), size and SHA-256 of the tensors file
    dir/model.safetensors  the full state dict: packed integer weights, scales, smoothing and rotation tensors

A pipeline is saved in the diffusers layout (``model_index.json``, scheduler, tokenizer, ...) with each
quantized component in the format above in its subfolder, listed in ``viditq_pipeline.json`` (diffusers' own
``from_pretrained`` cannot open it: :func:`load_pipeline` does).

Models whose parameters are not all of one dtype (diffusers' ``_keep_in_fp32_modules``: Wan's norms and time
embedding in float32 in a bfloat16 model) load back with each tensor in its saved dtype.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
from collections import Counter
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
    """The dtype of most of the model's float weights, by element count (a quantized layer's weights count in the
    float dtype around it)."""
    count = Counter()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            count[module.float_dtype] += module.in_features * module.out_features
        else:
            for p in module.parameters(recurse=False):
                if p.is_floating_point():
                    count[p.dtype] += p.numel()
    return count.most_common(1)[0][0] if count else torch.float32


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a viditq checkpoint (a model's or a pipeline's) and nothing else: replacing it loses
    no other file."""
    path = Path(path)
    if (path / META_FILE).is_file():
        own = {META_FILE, TENSORS_FILE, "config.json"}
    elif (path / PIPELINE_META_FILE).is_file() and (path / "model_index.json").is_file():
        try:
            index = json.loads((path / "model_index.json").read_text())
        except (json.JSONDecodeError, OSError):
            return False
        own = {PIPELINE_META_FILE, "model_index.json", "README.md", *(k for k in index if not k.startswith("_"))}
    else:
        return False
    return all(p.name in own for p in path.iterdir())


def check_writable(path: str | Path, overwrite: bool = False) -> Path:
    """``path`` if :func:`save_quantized` may write there: absent, an empty directory or a viditq checkpoint with
    nothing else in it (replaced once the new one is complete); anything else only with ``overwrite``. Never the
    current directory or one above it, nor a symbolic link (the rename would replace the link, not its target)."""
    path = Path(path)
    if path.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise ValueError(f"cannot save a checkpoint to {path} (the current directory or one above it): name a new "
                         "directory")
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link; save to the directory it points to ({path.resolve()})")
    if overwrite or not path.exists() or is_checkpoint(path):
        return path
    if not path.is_dir() or any(path.iterdir()):
        what, everything = ("a file", "") if not path.is_dir() else ("a non-empty directory", " and everything in it")
        raise FileExistsError(f"{path} is {what} that is not a viditq checkpoint alone; choose another path, or "
                              f"pass overwrite=True (CLI: --overwrite) to replace it{everything}")
    return path


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
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif old.exists():  # (a file replaced with overwrite=True)
            old.unlink()
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
    dtype = _float_dtype(model)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "dtype": _dtype_name(dtype),
        "layer_dtypes": {name: _dtype_name(m.float_dtype) for name, m in model.named_modules()
                         if isinstance(m, QuantLinear) and m.float_dtype != dtype},
        "buffer_dtypes": {name: _dtype_name(b.dtype) for name, b in _unsaved_buffers(model) if b.is_floating_point()},
        "quant_config": config.to_dict(),
        "layers": {name: layer.spec.to_dict() for name, layer in quantized_layers(model).items()},
        "switch_layers": {name: m.schedule_dict() for name, m in model.named_modules()
                          if isinstance(m, TimestepSwitchLinear)},
        "tensors_bytes": (directory / TENSORS_FILE).stat().st_size,
        "tensors_sha256": _sha256(directory / TENSORS_FILE),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
        with _quiet("diffusers"):  # ("self.transformer=None ... cannot be saved": the skip above, not a failure)
            pipe.save_pretrained(directory)
    finally:
        for name, component in quantized.items():
            setattr(pipe, name, component)
    for name, component in quantized.items():
        _write_model(component, directory / name)
    (directory / PIPELINE_META_FILE).write_text(json.dumps(
        {"format_version": FORMAT_VERSION, "quantized_components": sorted(quantized)}, indent=2))
    (directory / "README.md").write_text(
        f"A {type(pipe).__name__} with quantized {', '.join(sorted(quantized))}, saved by viditq. "
        "Open it with `viditq.load_pipeline(path)` (diffusers' `from_pretrained` cannot rebuild the quantized "
        "components), or run `viditq generate --model path ...`.\n")


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Only errors from that logger (and its children) inside the block."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def save_quantized(obj, path: str | Path, overwrite: bool = False) -> Path:
    """Save a quantized model, or a diffusers pipeline with quantized components, to the directory ``path``.

    The directory is written next to ``path`` and renamed into place, so a crash never leaves a half-written
    checkpoint behind (an existing checkpoint at ``path`` is replaced only once the new one is complete). Any other
    existing file or non-empty directory at ``path`` is an error unless ``overwrite`` (it is then replaced whole).
    """
    path = check_writable(path, overwrite)
    write = _write_pipeline if _is_pipeline(obj) else _write_model
    atomic_directory(path, lambda tmp: write(obj, tmp))
    return path


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a torch.device, or a ValueError naming the problem (an unknown name, CUDA not available, a
    CUDA index past the visible devices)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: expected cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{device} requested but CUDA is not available to this torch ({torch.__version__}); "
                             "use cpu")
        if (parsed.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"{device} requested but {torch.cuda.device_count()} CUDA device(s) are visible")
    return parsed


def load_pipeline(path: str | Path, device: str | torch.device | None = None, **kwargs):
    """Load a pipeline saved by :func:`save_quantized` (quantized components restored, the rest by diffusers)."""
    from .models import pipeline_class_for

    device = check_device(device)
    path = Path(path)
    meta_file = path / PIPELINE_META_FILE
    if not meta_file.is_file():
        hint = "; it is a single model's checkpoint: use viditq.load_quantized" if (path / META_FILE).is_file() else ""
        raise FileNotFoundError(f"{path} is not a quantized viditq pipeline (no {PIPELINE_META_FILE}){hint}")
    meta = json.loads(meta_file.read_text())
    components = {name: load_quantized(path / name) for name in meta["quantized_components"]}
    pipe = pipeline_class_for(path).from_pretrained(path, **components, **kwargs)
    return pipe.to(device) if device is not None else pipe


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        hint = ("; it is a saved pipeline: use viditq.load_pipeline (or load_quantized on its quantized component's "
                "subfolder)") if (path / PIPELINE_META_FILE).is_file() else ""
        raise FileNotFoundError(f"{path} is not a viditq checkpoint (no {META_FILE}){hint}")
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
            return _without_weights(lambda: cls.from_config(cls.load_config(path)))
        if hasattr(cls, "config_class"):  # transformers
            return _without_weights(lambda: cls(cls.config_class.from_pretrained(path)).eval())
    raise ValueError(f"{meta['model_class']} cannot be rebuilt without a saved config ({path / 'config.json'} "
                     "missing, or not a diffusers / transformers model); pass the float model with "
                     "load_quantized(path, model=...)")


def _without_weights(build) -> nn.Module:
    """``build()`` with every parameter on the meta device: no memory and no random init for weights the checkpoint
    replaces (a float T5-XXL built first would take 19 GB), while buffers are built as usual (position tables
    computed at init are not saved) — accelerate's ``init_empty_weights(include_buffers=False)``, which is not a
    dependency here. A model whose construction needs real parameters is built normally."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:  # (a meta one is kept: tied weights stay one object)
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        return build()
    except (NotImplementedError, RuntimeError):  # (an init that reads parameter values)
        nn.Module.register_parameter = register
        return build()
    finally:
        nn.Module.register_parameter = register


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
    device = check_device(device)
    path = Path(path)
    meta = read_metadata(path)
    tensors = _check_tensors_file(path, meta)
    config = QuantConfig.from_dict(meta["quant_config"])
    if model is None:
        model = _build_model(path, meta)
    elif getattr(model, "viditq_config", None) is not None:
        raise ValueError("load_quantized needs the float model architecture, got an already quantized model")
    dtype = getattr(torch, meta["dtype"])
    if "buffer_dtypes" in meta:  # the saved tensors come with their dtype; the unsaved buffers (tables computed at
        # init, such as Wan's rotary ones, float32 in a bf16 model) get the one they had
        buffers = dict(_unsaved_buffers(model))
        for name, d in meta["buffer_dtypes"].items():
            if name in buffers:
                _set_tensor(model, name, buffers[name].to(getattr(torch, d)))
    else:  # (checkpoints written before session 27: the whole model in the checkpoint's dtype; diffusers' own .to
        # warns about its float32 modules)
        nn.Module.to(model, dtype)
    layer_dtypes = {name: getattr(torch, d) for name, d in meta.get("layer_dtypes", {}).items()}

    def quant_linear(name: str, linear: nn.Linear) -> QuantLinear:
        return QuantLinear(LayerSpec(**meta["layers"][name]), out_dtype=layer_dtypes.get(name, dtype))

    switches = meta.get("switch_layers", {})
    for name, info in switches.items():  # timestep-dependent layers: one variant per precision
        stored_default = info.get("float_act", {}).get(info["default"], info["default"])
        linear = _float_linear(model, name, meta["layers"].get(f"{name}.variants.{stored_default}"))
        variants = {key: linear if key == "fp" else quant_linear(f"{name}.variants.{key}", linear)
                    for key in info["variants"]}
        _set_submodule(model, name, TimestepSwitchLinear(variants, info["schedule"], info["default"],
                                                         info.get("float_act")))
    for name, spec_dict in meta["layers"].items():
        if any(name.startswith(f"{s}.variants.") for s in switches):
            continue
        _set_submodule(model, name, quant_linear(name, _float_linear(model, name, spec_dict)))
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
    expected = model.state_dict(keep_vars=True)
    saved = {_tensor_key(expected[name]) for name in state if name in expected}
    # tied parameters (T5's shared / embed_tokens) are saved once: a missing name is fine if its twin is there
    missing = sorted(n for n in set(expected) - set(state)
                     if expected[n].numel() and _tensor_key(expected[n]) not in saved)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # float tensors outside the quantized layers load in the dtype they were saved in (a model kept partly in
    # float32, as diffusers keeps its _keep_in_fp32_modules, comes back that way)
    quantized = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, QuantLinear))
    for name, value in state.items():
        want = expected[name]
        free = value.is_floating_point() and want.is_floating_point() and not name.startswith(quantized)
        if (value.dtype != want.dtype and not free) or value.shape != want.shape:
            raise ValueError(f"checkpoint tensor {name!r} is {value.dtype} {tuple(value.shape)}, the layer spec "
                             f"needs {want.dtype} {tuple(want.shape)}")
    twins = {}  # tied tensors: names of one tensor
    for name, t in expected.items():
        twins.setdefault(_tensor_key(t), []).append(name)
    model.load_state_dict(state, strict=False, assign=True)  # (assign: the meta parameters of _without_weights)
    loaded = model.state_dict(keep_vars=True)
    for names in twins.values():  # assign gave the saved name a new tensor: its twins take it too
        source = next((n for n in names if n in state), None)
        for name in names if source is not None else ():
            _set_tensor(model, name, loaded[source])
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise ValueError(f"checkpoint does not match the model: no tensors for {empty[:5]}")


def _tensor_key(t: torch.Tensor):
    """Equal for the names of one tensor: the same object (meta tensors have no memory), or the same memory."""
    if t.is_meta:
        return id(t)
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())


def _unsaved_buffers(model: nn.Module):
    """(name, buffer) of the non-persistent buffers outside the quantized layers (not in the state dict)."""
    for module_name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            for attr in module._non_persistent_buffers_set:
                if module._buffers.get(attr) is not None:
                    yield (f"{module_name}.{attr}" if module_name else attr), module._buffers[attr]


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``name`` (as it is, no copy)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    (module._parameters if attr in module._parameters else module._buffers)[attr] = value
