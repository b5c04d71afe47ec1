"""The shipped weight files: one fp16 safetensors per model, with its configs and vocabulary in the metadata.

A file holds ``transformer.*`` and ``text_encoder.*`` tensors (pipelines) or ``probe.*`` tensors, and string
metadata: ``format``, ``version``, ``kind`` and JSON-encoded configs. Everything needed to rebuild the model is in
the file itself, so a grammar change in the code cannot silently re-map the vocabulary of old weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "viditq-tiny"
FORMAT_VERSION = 1
WEIGHTS_DIR = Path(__file__).parent / "weights"


def weights_path(name: str) -> Path:
    """Path of a shipped weight file: ``name`` in {"t2i", "t2v", "probe"}."""
    path = WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"shipped weights {path} are missing; train them with `python -m viditq.models.train --model {name}`"
        )
    return path


def save_bundle(path: str | Path, modules: dict[str, torch.nn.Module], metadata: dict[str, Any]) -> None:
    """Save ``modules`` (prefix → module) as fp16 tensors ``prefix.param`` plus JSON metadata, atomically."""
    tensors = {}
    for prefix, module in modules.items():
        for name, t in module.state_dict().items():
            # .clone(): tied tensors (T5's shared embedding) would otherwise share storage, which safetensors refuses.
            tensors[f"{prefix}.{name}"] = t.detach().to("cpu", torch.float16 if t.is_floating_point() else t.dtype).clone()
    meta = {"format": FORMAT, "version": str(FORMAT_VERSION)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_bundle(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """→ ({prefix: state dict}, metadata with JSON values decoded). Raises ValueError for foreign files."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
        if raw.get("format") != FORMAT:
            raise ValueError(f"{path} is not a viditq tiny-model file (format {raw.get('format')!r})")
        if int(raw.get("version", "0")) > FORMAT_VERSION:
            raise ValueError(f"{path} has format version {raw['version']}, newer than this viditq ({FORMAT_VERSION})")
        states: dict[str, dict[str, torch.Tensor]] = {}
        for key in f.keys():
            prefix, name = key.split(".", 1)
            states.setdefault(prefix, {})[name] = f.get_tensor(key)
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return states, meta


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Load fp16 ``state`` into ``module`` (kept in its own dtype), strictly."""
    module.load_state_dict(state, strict=True)
    return module
