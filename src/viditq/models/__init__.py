"""Embedded tiny text-to-image / text-to-video diffusion transformers, trained on procedural scenes.

>>> from viditq.models import load_t2i_pipeline
>>> pipe = load_t2i_pipeline()                        # shipped fp16 weights, no network
>>> images = pipe(["a small red circle above a large blue square on a black background"],
...               num_inference_steps=10, output_type="np").images   # (1, 32, 32, 3)

``pipe.save_pretrained(dir)`` writes a normal diffusers folder; ``TinyT2IPipeline.from_pretrained(dir)`` reads it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import T5Config, T5EncoderModel

from .configs import build_scheduler, build_transformer, scheduler_config, t2i_transformer_config, t2v_transformer_config
from .pipelines import TinyT2IPipeline, TinyT2VPipeline, TinyT2VPipelineOutput
from .text import MAX_TEXT_TOKENS, build_text_encoder, build_tokenizer, build_vocab
from .weights import load_bundle, load_state, save_bundle, weights_path

PIPELINE_CLASSES = {"t2i": TinyT2IPipeline, "t2v": TinyT2VPipeline}
# For loaders that read model_index.json's "_class_name" (diffusers itself only knows its own classes).
PIPELINE_CLASSES_BY_NAME = {cls.__name__: cls for cls in PIPELINE_CLASSES.values()}

__all__ = [
    "PIPELINE_CLASSES_BY_NAME", "TinyT2IPipeline", "TinyT2VPipeline", "TinyT2VPipelineOutput", "new_pipeline", "save_pipeline_weights",
    "load_pipeline_weights", "load_t2i_pipeline", "load_t2v_pipeline", "pipeline_class_for",
]


def pipeline_class_for(path: str | Path):
    """The class that loads the diffusers folder ``path``: a tiny pipeline class if its model_index.json names
    one, else :class:`diffusers.DiffusionPipeline` (which resolves diffusers' own classes itself)."""
    import json

    import diffusers

    index = Path(path) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    return PIPELINE_CLASSES_BY_NAME.get(name, diffusers.DiffusionPipeline)


def _check_kind(kind: str) -> None:
    if kind not in PIPELINE_CLASSES:
        raise ValueError(f"model kind must be one of {sorted(PIPELINE_CLASSES)}, got {kind!r}")


def new_pipeline(kind: str) -> TinyT2IPipeline | TinyT2VPipeline:
    """A freshly initialized (untrained) pipeline of ``kind`` ("t2i" | "t2v")."""
    _check_kind(kind)
    vocab = build_vocab()
    return PIPELINE_CLASSES[kind](
        transformer=build_transformer(kind), text_encoder=build_text_encoder(len(vocab)),
        tokenizer=build_tokenizer(vocab), scheduler=build_scheduler(),
    )


def save_pipeline_weights(pipe, path: str | Path, kind: str, info: dict | None = None) -> None:
    """Write ``pipe``'s transformer + text encoder as one fp16 safetensors file with configs in its metadata."""
    _check_kind(kind)
    metadata = {
        "kind": kind,
        "transformer_class": type(pipe.transformer).__name__,
        "transformer_config": dict(pipe.transformer.config),
        "text_encoder_config": pipe.text_encoder.config.to_dict(),
        "scheduler_config": scheduler_config(),
        "vocab": pipe.tokenizer.get_vocab(),
        "max_length": pipe.tokenizer.model_max_length,
        "info": info or {},
    }
    save_bundle(path, {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}, metadata)


def _transformer_config(meta: dict) -> dict:
    # ConfigMixin adds private keys (_class_name, _diffusers_version, ...) that the constructor does not take.
    return {k: v for k, v in meta["transformer_config"].items() if not k.startswith("_")}


def load_pipeline_weights(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Rebuild a pipeline from a file written by :func:`save_pipeline_weights` (no network access)."""
    states, meta = load_bundle(path)
    kind = meta.get("kind")
    _check_kind(kind)
    # Which diffusers class wrote the file; files from before this key existed hold a Latte model for "t2v".
    class_name = meta.get("transformer_class") or ("LatteTransformer3DModel" if kind == "t2v" else None)
    transformer = load_state(build_transformer(kind, _transformer_config(meta), class_name), states["transformer"])
    text_encoder = load_state(T5EncoderModel(T5Config.from_dict(meta["text_encoder_config"])), states["text_encoder"])
    tokenizer = build_tokenizer({k: int(v) for k, v in meta["vocab"].items()}, int(meta["max_length"]))
    for module in (transformer, text_encoder):
        module.to(device).eval()
        if dtype != torch.float32:  # (ModelMixin.to warns about any dtype argument, even float32)
            module.to(dtype)
    return PIPELINE_CLASSES[kind](
        transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=build_scheduler(meta["scheduler_config"]),
    )


def load_t2i_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TinyT2IPipeline:
    """The shipped text-to-image pipeline (PixArt-style DiT, 32 x 32)."""
    return load_pipeline_weights(weights_path("t2i"), device, dtype)


def load_t2v_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TinyT2VPipeline:
    """The shipped text-to-video pipeline (CogVideoX-style DiT, 16 frames of 32 x 32)."""
    return load_pipeline_weights(weights_path("t2v"), device, dtype)


del t2i_transformer_config, t2v_transformer_config, MAX_TEXT_TOKENS  # re-exported from their modules only
