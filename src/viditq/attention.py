"""8-bit attention inside diffusers models: wrap each attention processor so its SDPA call runs quantized.

diffusers computes attention in per-model *processors* (``attn.processor(attn, hidden_states, ...)``): older ones
call ``F.scaled_dot_product_attention`` directly (PixArt, Latte, CogVideoX, SD3), newer ones go through
``dispatch_attention_fn``, whose default "native" backend calls the same function (Wan, Flux). Everything
model-specific — projections, QK norms, rotary embeddings, concatenated text tokens, masks — happens before that
call, so the least invasive generic hook is there: :class:`QuantizedAttnProcessor` runs the model's own processor
under a ``TorchFunctionMode`` that hands ``scaled_dot_product_attention`` to
:func:`viditq.kernels.attention.quantized_attention` and lets every other op through.

Calls the 8-bit kernel cannot express fall back to the original SDPA: dropout, causal masks, masks that vary over
queries (key-padding masks, the cross-attention text masks, are supported), grouped-query attention with unequal
head counts, head dims above 256, non-float inputs. Attention run through a non-native ``dispatch_attention_fn``
backend (flash-attn, sage, ...) is left as the user chose it.

Short key sequences also stay on the model's own SDPA (bf16 in a bf16 model): calls with fewer than
``min_kv_tokens`` keys (default :data:`MIN_KV_TOKENS` = 512; an argument of :func:`apply_quantized_attention`, 0
quantizes every call). Those are the text cross-attentions (120 text tokens in PixArt) and short temporal
attentions (Latte's frames), where the 8-bit path's preparation — K mean and channel statistics, quantizing Q, K
and V, ~0.3 ms of launches at PixArt's 4096 x 120 cross-attention on an H100 — costs more than the whole bf16 SDPA
call (0.05 ms; benchmarks/NOTES.md, "8-bit attention"), and the attention FLOPs saved are negligible.
:func:`attention_call_counts` reports how many eager calls ran quantized, went to SDPA for their short keys, or
fell back for the reasons above (compiled forwards and CUDA-graph replays are not counted).
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .kernels.attention import MODES, quantized_attention

ATTENTION_MODES = ("bf16",) + MODES
MAX_HEAD_DIM = 256
MIN_KV_TOKENS = 512  # default: attention over fewer keys runs the model's own SDPA (module docstring)
COUNT_KEYS = ("quantized", "short_kv_sdpa", "fallback_sdpa")


# ------------------------------------------------------------------------------------------ SDPA routing
def _mask_to_key_bias(mask: torch.Tensor, b: int, h: int, n_q: int, n_kv: int) -> torch.Tensor | None:
    """SDPA ``attn_mask`` → additive (B, H, Nkv) float bias, or None when it varies over queries."""
    if mask.dim() > 4 or mask.shape[-1] != n_kv:
        return None
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (b|1, h|1, nq|1, Nkv)
    if mask.shape[2] != 1:
        if mask.shape[2] != n_q or not bool((mask == mask[:, :, :1]).all()):
            return None
        mask = mask[:, :, :1]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float().expand(b, h, 1, n_kv)[:, :, 0]


def quantized_sdpa(
    mode: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor | None:
    """``F.scaled_dot_product_attention`` with 8-bit attention, or None where the kernel does not apply."""
    if dropout_p > 0.0 or is_causal or query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return None
    if not (query.is_floating_point() and key.dtype == query.dtype and value.dtype == query.dtype):
        return None
    b, h, n_q, d = query.shape
    if key.shape[:2] != (b, h) or value.shape[:2] != (b, h) or value.shape[-1] != d or d > MAX_HEAD_DIM:
        return None
    bias = None
    if attn_mask is not None:
        bias = _mask_to_key_bias(attn_mask, b, h, n_q, key.shape[2])
        if bias is None:
            return None
    return quantized_attention(query, key, value, mode, scale=scale, bias=bias)


def _new_counts() -> dict[str, int]:
    return dict.fromkeys(COUNT_KEYS, 0)


class SDPARouter(TorchFunctionMode):
    """Inside this context, ``F.scaled_dot_product_attention`` runs 8-bit attention (mode "int8" or "fp8"),
    except over fewer than ``min_kv_tokens`` keys. ``counts`` (dict of :data:`COUNT_KEYS`) is incremented per
    eager call. Traced code does not count: Dynamo would bake each count into the graph as a constant and guard
    on it, recompiling on every call (and failing inside a CUDA-graph capture); replays run no Python."""

    def __init__(self, mode: str, min_kv_tokens: int = MIN_KV_TOKENS, counts: dict[str, int] | None = None):
        super().__init__()
        self.mode = mode
        self.min_kv_tokens = min_kv_tokens
        self.counts = counts if counts is not None else _new_counts()

    def _count(self, key: str) -> None:
        if not torch.compiler.is_compiling():
            self.counts[key] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            key = args[1] if len(args) > 1 else kwargs.get("key")
            if isinstance(key, torch.Tensor) and key.dim() >= 2 and key.shape[-2] < self.min_kv_tokens:
                self._count("short_kv_sdpa")
                return func(*args, **kwargs)
            out = quantized_sdpa(self.mode, *args, **kwargs)
            if out is not None:
                self._count("quantized")
                return out
            self._count("fallback_sdpa")
        if func is torch.Tensor.unflatten:
            # Tensor.unflatten is Python calling super(); torch.compile cannot trace that under a mode (a graph
            # break in every Wan/Flux attention) but traces the functional form.
            return torch.unflatten(*args, **kwargs)
        return func(*args, **kwargs)


# ------------------------------------------------------------------------------------------ processor wrapper
class QuantizedAttnProcessor:
    """Wraps a diffusers attention processor; its SDPA runs as 8-bit attention of ``mode`` ("int8" | "fp8").

    Attribute reads and writes (other than its own ``processor``, ``mode``, ``min_kv_tokens`` and ``counts``) go
    to the wrapped processor, so diffusers' ``set_attention_backend`` / ``enable_parallelism`` configure the
    processor that really runs. Calls over fewer than ``min_kv_tokens`` keys run the model's own SDPA.
    """

    _OWN = ("processor", "mode", "min_kv_tokens", "counts")

    def __init__(self, processor, mode: str, min_kv_tokens: int = MIN_KV_TOKENS):
        self.processor = processor
        self.mode = mode
        self.min_kv_tokens = int(min_kv_tokens)
        self.counts = _new_counts()

    def __call__(self, attn, *args, **kwargs):
        with SDPARouter(self.mode, self.min_kv_tokens, self.counts):
            return self.processor(attn, *args, **kwargs)

    def __setattr__(self, name, value):
        if name in self._OWN or "processor" not in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            setattr(self.processor, name, value)

    def __getattr__(self, name):
        processor = self.__dict__.get("processor")
        if processor is None:
            raise AttributeError(name)
        return getattr(processor, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, processor={self.processor!r})"


@functools.lru_cache(maxsize=None)
def _wrapper_class(processor_cls: type) -> type:
    """A QuantizedAttnProcessor subclass whose ``__call__`` shows the wrapped class's signature: diffusers'
    ``Attention.forward`` drops keyword arguments (``image_rotary_emb``...) the processor does not declare."""

    def __call__(self, attn, *args, **kwargs):
        with SDPARouter(self.mode, self.min_kv_tokens, self.counts):
            return self.processor(attn, *args, **kwargs)

    __call__.__signature__ = inspect.signature(processor_cls.__call__)
    return type(f"Quantized{processor_cls.__name__}", (QuantizedAttnProcessor,), {"__call__": __call__})


def _attention_modules(model: torch.nn.Module):
    """Every diffusers attention module (``Attention`` or ``AttentionModuleMixin``) with a processor."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    for name, module in model.named_modules():
        if isinstance(module, (Attention, AttentionModuleMixin)) and getattr(module, "processor", None) is not None:
            yield name, module


def apply_quantized_attention(model: torch.nn.Module, mode: str, min_kv_tokens: int | None = None) -> int:
    """Route the attention of every diffusers attention module in ``model`` through 8-bit attention.

    mode: "int8" (INT8 Q·Kᵀ, BF16 P·V), "fp8" (INT8 Q·Kᵀ, FP8 P·V) or "bf16" (the model's own attention: removes
    wrappers a previous call installed). Idempotent; returns the number of attention modules now quantized.
    Calls with fewer than ``min_kv_tokens`` keys keep the model's own SDPA; 0 quantizes every call the kernel
    supports. None: the value last given for this model (kept on it, so unwrapping and re-wrapping — as
    ``viditq.parallel`` does — keeps it), else :data:`MIN_KV_TOKENS` (512: text cross-attention stays on SDPA).
    Processors that are ``nn.Module`` s (trainable IP-adapter processors) are left alone.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    if min_kv_tokens is None:
        min_kv_tokens = getattr(model, "_viditq_min_kv_tokens", MIN_KV_TOKENS)
    else:
        model._viditq_min_kv_tokens = min_kv_tokens = int(min_kv_tokens)
    converted = 0
    for _, module in _attention_modules(model):
        processor = module.processor
        if isinstance(processor, QuantizedAttnProcessor):
            processor = processor.processor
        if isinstance(processor, torch.nn.Module):
            continue
        if mode == "bf16":
            module.processor = processor
            continue
        module.processor = _wrapper_class(type(processor))(processor, mode, min_kv_tokens)
        converted += 1
    return converted


def attention_call_counts(model: torch.nn.Module, reset: bool = False) -> dict[str, int]:
    """Attention calls of ``model``'s wrapped processors since they were installed (or last reset):
    ``quantized`` (8-bit kernel), ``short_kv_sdpa`` (fewer keys than ``min_kv_tokens``: the model's own SDPA),
    ``fallback_sdpa`` (masks, dropout, ... the kernel cannot express). Eager calls only: compiled forwards and
    CUDA-graph replays are not counted (see :class:`SDPARouter`)."""
    total = _new_counts()
    for _, module in _attention_modules(model):
        if isinstance(module.processor, QuantizedAttnProcessor):
            for key, n in module.processor.counts.items():
                total[key] += n
            if reset:
                module.processor.counts.update(_new_counts())
    return total


def quantized_attention_mode(model: torch.nn.Module) -> str:
    """The attention mode ``model`` runs: "int8" / "fp8" if any module is wrapped, else "bf16"."""
    for _, module in _attention_modules(model):
        if isinstance(module.processor, QuantizedAttnProcessor):
            return module.processor.mode
    return "bf16"
