"""Calibration: record transformer inputs from a pipeline, and per-layer activation statistics via hooks.

Two steps, one direction:
1. :func:`capture_calibration` runs a diffusers pipeline and records the keyword arguments of every
   ``pipe.transformer`` forward (one per denoising step; both CFG branches are in the batch).
2. :func:`collect_activation_stats` replays those kwargs through a model and records, for each linear layer, the
   per-input-channel absmax over all tokens (per call, so per timestep) and a random sample of input rows.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from .progress import progress


def _map_tensors(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _iter_tensors(obj: Any, prefix: str = ""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _iter_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _iter_tensors(v, f"{prefix}[{i}]")


def validate_calibration(calib: Iterable[dict]) -> list[dict]:
    """Materialize ``calib`` and check it: non-empty, dicts of kwargs, finite floating tensors."""
    if isinstance(calib, dict):
        raise TypeError("calib must be an iterable of kwargs dicts (e.g. [dict(hidden_states=..., ...)]), "
                        "not a single dict; wrap it in a list")
    samples = list(calib) if calib is not None else []
    if not samples:
        raise ValueError("calibration data is empty: pass at least one kwargs dict for model.forward "
                         "(e.g. from viditq.capture_calibration)")
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise TypeError(f"calibration sample {i} is a {type(sample).__name__}, expected a kwargs dict")
        for key, t in _iter_tensors(sample):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"calibration sample {i}: {key!r} contains NaN or Inf values")
    return samples


def capture_calibration(pipe, prompts: str | list[str], num_inference_steps: int = 20, **pipe_kwargs) -> list[dict]:
    """Run ``pipe`` on ``prompts`` and record ``pipe.transformer``'s forward kwargs at every step (on CPU).

    Positional arguments are stored under their parameter names, so each record can be replayed as
    ``transformer(**record)``. Extra ``pipe_kwargs`` (guidance_scale, generator, height, ...) go to the pipeline.
    """
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"{type(pipe).__name__} has no .transformer to calibrate")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("capture_calibration needs at least one prompt")
    names = list(inspect.signature(transformer.forward).parameters)
    records: list[dict] = []

    def hook(module, args, kwargs):
        record = dict(zip(names, args))
        record.update(kwargs)
        records.append(_map_tensors(record, lambda t: t.detach().to("cpu", copy=True)))

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(prompt=list(prompts), num_inference_steps=num_inference_steps, **pipe_kwargs)
    finally:
        handle.remove()
    return records


@dataclass
class LayerStats:
    """Input statistics of one linear layer. ``call_absmax``: (calls, K) channel absmax per forward call;
    ``rows``: (R, K) float32 random input rows for error-based searches."""

    call_absmax: list[torch.Tensor] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)

    @property
    def absmax(self) -> torch.Tensor:  # (K,) max over all calls and tokens
        return torch.stack(self.call_absmax).amax(0)

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: an accelerate offload hook's execution device (with
    ``pipe.enable_model_cpu_offload()`` the module sits on the CPU between calls and the hook moves it, but not
    keyword inputs, to the accelerator), else the device of its first parameter or buffer (CPU for an empty one)."""
    for sub in model.modules():
        device = getattr(getattr(sub, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def unknown_arguments(fn, keys) -> tuple[list[str], list[str]]:
    """(the keys ``fn`` has no parameter for, sorted — none if it takes ``**kwargs``; the parameters it has)."""
    params = inspect.signature(fn).parameters
    names = [n for n in params if n != "self"]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return [], names
    return sorted(set(keys) - set(params)), names


def check_calibration_kwargs(model: nn.Module, samples: list[dict]) -> None:
    """Every sample's keys are arguments of ``model.forward`` (unless it takes ``**kwargs``): a ValueError naming
    the unknown ones, instead of a TypeError from deep inside the forward."""
    for i, sample in enumerate(samples):
        unknown, params = unknown_arguments(model.forward, sample)
        if unknown:
            raise ValueError(f"calibration sample {i} has arguments {unknown} that {type(model).__name__}.forward "
                             f"does not take (it takes {params}); calibrate with this model's inputs")


def run_calibration(model: nn.Module, samples: list[dict], desc: str = "calibrating") -> None:
    """Replay every kwargs dict through ``model`` (moved to the model's device), no grad. A sample the forward
    fails on raises a ValueError naming the sample (the forward's own error chained to it)."""
    device = model_device(model)
    with torch.no_grad():
        for i, sample in enumerate(progress(samples, desc=desc)):
            try:
                model(**_map_tensors(sample, lambda t: t.to(device)))
            except torch.OutOfMemoryError:
                raise
            except (TypeError, ValueError, RuntimeError, AttributeError, IndexError, KeyError) as e:
                raise ValueError(f"calibration sample {i} failed in {type(model).__name__}.forward: "
                                 f"{type(e).__name__}: {e} — do its kwargs, dtypes and device match the model's "
                                 "(calibrate with what the pipeline passes: viditq.capture_calibration)?") from e


def collect_activation_stats(
    model: nn.Module, layers: dict[str, nn.Linear], samples: list[dict], rows_per_layer: int = 512, seed: int = 0
) -> dict[str, LayerStats]:
    """Hook ``layers`` (name → linear) and replay ``samples``; returns name → :class:`LayerStats`."""
    stats = {name: LayerStats() for name in layers}
    rows_per_call = max(1, math.ceil(rows_per_layer / len(samples)))
    gen = torch.Generator().manual_seed(seed)

    def make_hook(name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, module.in_features)  # (tokens, K)
            st = stats[name]
            st.call_absmax.append(x.abs().amax(0).float().cpu())
            idx = torch.randperm(x.shape[0], generator=gen)[:rows_per_call]
            st.rows.append(x[idx.to(x.device)].float().cpu())

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        run_calibration(model, samples)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, st in stats.items() if not st.call_absmax]
    if len(missing) == len(stats) and stats:
        raise ValueError("calibration ran but no target linear layer was called; do the kwargs match "
                         "model.forward?")
    return stats
