"""Whole-pipeline quantization: the transformer with a preset, text encoders weight-only.

In PixArt the T5-XXL text encoder (4.7 B parameters) dwarfs the 0.6 B transformer, so the memory saving of a
deployed pipeline comes mostly from it. Text encoders run once per prompt, so they are quantized weight-only
(int8 per channel, or int4 group-wise) without calibration, and the text embeddings are compared with the float
ones (cosine similarity) to show they stay close.

Model CPU offload (diffusers' ``pipe.enable_model_cpu_offload()``, accelerate's ``CpuOffload`` hooks) works on a
quantized pipeline, before or after quantization: the hooks move whole components with ``module.to(device)``,
which moves every QuantLinear buffer (packed codes, scales, smoothing/rotation vectors) and keeps their dtypes, and
they find a component's device from its first parameter — the layers kept in high precision (embeddings, norms)
provide one. Text is encoded, and calibration inputs are replayed, on the hook's execution device
(:func:`viditq.calibrate.model_device`): the hooks move a module and its positional inputs, not keyword inputs. ``benchmarks/check_offload.py`` compares generations with and
without offload on a GPU.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .calibrate import capture_calibration, model_device, unknown_arguments
from .config import ActSpec, QuantConfig, WeightSpec, resolve_config
from .layers import LayerSpec, QuantLinear, make_layer_spec
from .memory import memory_report
from .progress import progress
from .quantize import _set_submodule, quantize

TEXT_ENCODER = re.compile(r"^text_encoder(_\d+)?$")


def quantize_weights_only(model: nn.Module, bits: int = 8, group_size: int | None = None) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` for a weight-only QuantLinear (in place); returns ``model``."""
    weight = WeightSpec(bits, symmetric=bits > 4, group_size=group_size if bits <= 4 else None)
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize")
    for name, linear in progress(linears, desc=f"text encoder W{bits}"):
        spec = make_layer_spec(linear, weight, ActSpec(8))
        spec = LayerSpec(**{**spec.to_dict(), "weight_only": True})
        _set_submodule(model, name, QuantLinear.from_linear(linear, spec))
    model.viditq_config = QuantConfig(f"w{bits}-weight-only", weight, ActSpec(8), balance=None, keep_fp=())
    return model


def text_encoder_pairs(pipe) -> list[tuple[str, str]]:
    """(text_encoder name, tokenizer name) pairs of a diffusers pipeline (text_encoder ↔ tokenizer, _2 ↔ _2)."""
    pairs = []
    for name, comp in pipe.components.items():
        if TEXT_ENCODER.match(name) and isinstance(comp, nn.Module):
            tok = name.replace("text_encoder", "tokenizer")
            if pipe.components.get(tok) is not None:
                pairs.append((name, tok))
    return pairs


@torch.no_grad()
def encode_text(text_encoder: nn.Module, tokenizer, prompts: list[str], max_length: int = 77) -> torch.Tensor:
    """Last hidden states (B, T, C) of ``text_encoder`` for ``prompts`` (padding positions zeroed)."""
    device = model_device(text_encoder)
    batch = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    mask = batch["attention_mask"].to(device)
    hidden = text_encoder(input_ids=batch["input_ids"].to(device), attention_mask=mask)[0]
    return hidden.float() * mask.to(hidden.device)[..., None]


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of token embeddings (B, T, C), over non-zero (non-padding) tokens."""
    keep = a.flatten(0, 1).norm(dim=-1) > 0
    cos = nn.functional.cosine_similarity(a.flatten(0, 1)[keep], b.flatten(0, 1)[keep], dim=-1)
    return float(cos.mean())


def quantize_pipeline(
    pipe,
    preset: QuantConfig | str | Path,
    prompts: list[str],
    text_encoder_bits: int | None = 8,
    text_encoder_group_size: int = 64,
    num_inference_steps: int = 20,
    **pipe_kwargs,
):
    """Quantize ``pipe`` in place: text encoder(s) weight-only, then the transformer calibrated on ``prompts``.

    The transformer is calibrated after the text encoders are quantized, so it sees the embeddings it will see
    at inference. ``pipe.quantization_report`` holds the text-embedding cosine similarities and memory.
    Returns ``pipe``.
    """
    if not prompts:
        raise ValueError("quantize_pipeline needs at least one calibration prompt")
    config = resolve_config(preset)  # (everything is checked before the pipeline changes)
    if text_encoder_bits not in (None, 8, 4):
        raise ValueError(f"text_encoder_bits must be 8, 4 or None (keep float), got {text_encoder_bits!r}")
    if getattr(pipe, "transformer", None) is None:
        raise ValueError(f"{type(pipe).__name__} has no .transformer to quantize")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    targets = ["transformer"] + ([te for te, _ in text_encoder_pairs(pipe)] if text_encoder_bits else [])
    done = [name for name in targets if getattr(pipe.components.get(name), "viditq_config", None) is not None]
    if done:
        raise ValueError(f"the pipeline's {', '.join(done)} already quantized by viditq: quantize_pipeline "
                         "needs the float pipeline (load it again)")
    _check_call_kwargs(pipe, {"num_inference_steps": num_inference_steps, **pipe_kwargs})
    cosines = {}
    if text_encoder_bits is not None:
        for te_name, tok_name in text_encoder_pairs(pipe):
            te, tok = getattr(pipe, te_name), getattr(pipe, tok_name)
            max_len = min(getattr(tok, "model_max_length", 77) or 77, 128)
            ref = encode_text(te, tok, prompts, max_len)
            quantize_weights_only(te, text_encoder_bits, text_encoder_group_size)
            cosines[te_name] = embedding_cosine(ref, encode_text(te, tok, prompts, max_len))
    calib = capture_calibration(pipe, prompts, num_inference_steps=num_inference_steps, **pipe_kwargs)
    quantize(pipe.transformer, config, calib)
    pipe.quantization_report = {"text_embedding_cosine": cosines, "memory": memory_report(pipe).to_dict()}
    return pipe


def _check_call_kwargs(pipe, kwargs: dict) -> None:
    """The pipeline's ``__call__`` takes every key of ``kwargs`` (unless it takes ``**kwargs``)."""
    unknown, params = unknown_arguments(pipe.__call__, kwargs)
    if unknown:
        raise ValueError(f"{type(pipe).__name__}.__call__ does not take {unknown}; it takes {params}")
