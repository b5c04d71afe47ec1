"""Configurations of the two tiny diffusion transformers (real diffusers classes) and their scheduler.

Both work in pixel space on 32 x 32 RGB in [-1, 1] and predict the flow-matching velocity ``noise - x0``:

* T2I: :class:`diffusers.PixArtTransformer2DModel`, 6 blocks, 4 heads x 32 (width 128), patch 2 (256 tokens).
* T2V: :class:`diffusers.CogVideoXTransformer3DModel`, 6 blocks of full 3D attention over text + video tokens,
  width 128, patch 4 (8 x 8 tokens per frame, 16 frames = 1024 tokens), 3D sin-cos positions, no temporal
  compression. (The first shipped T2V was a Latte model, factorized spatial/temporal attention; it learned colours
  but no motion in the training budget, so weight files record their class and old files still load.)

Sizes are small enough for a 2-core CPU demo and large enough to learn the grammar in minutes on one GPU.
"""
from __future__ import annotations

from diffusers import (
    CogVideoXTransformer3DModel, DPMSolverMultistepScheduler, LatteTransformer3DModel, PixArtTransformer2DModel,
)

from .data import IMAGE_SIZE, NUM_FRAMES
from .text import MAX_TEXT_TOKENS

TEXT_DIM = 128


# What the two tiny transformers share: width 128 (4 heads x 32), RGB pixels, PixArt-style adaLN-single blocks.
_SHARED = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=3, out_channels=3, cross_attention_dim=128,
    sample_size=IMAGE_SIZE, caption_channels=TEXT_DIM, norm_type="ada_norm_single", norm_elementwise_affine=False,
    norm_eps=1e-6, num_embeds_ada_norm=1000, attention_bias=True, activation_fn="gelu-approximate", dropout=0.0,
)


def t2i_transformer_config() -> dict:
    return dict(_SHARED, num_layers=6, patch_size=2, use_additional_conditions=False)


def t2v_transformer_config() -> dict:
    return dict(
        num_attention_heads=4, attention_head_dim=32, in_channels=3, out_channels=3, time_embed_dim=128,
        text_embed_dim=TEXT_DIM, num_layers=6, dropout=0.0, attention_bias=True, sample_width=IMAGE_SIZE,
        sample_height=IMAGE_SIZE, sample_frames=NUM_FRAMES, patch_size=4, temporal_compression_ratio=1,
        max_text_seq_length=MAX_TEXT_TOKENS, activation_fn="gelu-approximate", spatial_interpolation_scale=1.0,
        temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=False,
    )


TRANSFORMER_CLASSES = {cls.__name__: cls for cls in
                       (PixArtTransformer2DModel, CogVideoXTransformer3DModel, LatteTransformer3DModel)}
DEFAULT_CLASSES = {"t2i": "PixArtTransformer2DModel", "t2v": "CogVideoXTransformer3DModel"}


def build_transformer(kind: str, config: dict | None = None, class_name: str | None = None):
    """A freshly initialized transformer of ``kind`` ("t2i" | "t2v"); output projection zeroed so training starts
    from a model that predicts zero velocity. ``class_name`` (from a weight file) picks another diffusers class."""
    if kind not in DEFAULT_CLASSES:
        raise ValueError(f"model kind must be 't2i' or 't2v', got {kind!r}")
    name = class_name or DEFAULT_CLASSES[kind]
    if name not in TRANSFORMER_CLASSES:
        raise ValueError(f"unknown transformer class {name!r}; expected one of {sorted(TRANSFORMER_CLASSES)}")
    if config is None:
        if name != DEFAULT_CLASSES[kind]:
            raise ValueError(f"{name} needs an explicit config")
        config = t2i_transformer_config() if kind == "t2i" else t2v_transformer_config()
    model = TRANSFORMER_CLASSES[name](**config)
    model.proj_out.weight.data.zero_()
    model.proj_out.bias.data.zero_()
    return model


def scheduler_config() -> dict:
    """DPM-Solver++ (2nd order) on flow-matching sigmas, as diffusers' Sana pipeline uses it; timesteps are
    ``1000 * sigma`` with ``x_sigma = (1 - sigma) * x0 + sigma * noise``."""
    return dict(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
        algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, final_sigmas_type="zero",
    )


def build_scheduler(config: dict | None = None) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**(config or scheduler_config()))
