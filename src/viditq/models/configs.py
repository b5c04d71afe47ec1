"""Configurations of the two tiny diffusion transformers (real diffusers classes) and their scheduler.

Both work in pixel space on 32 x 32 RGB in [-1, 1] and predict the flow-matching velocity ``noise - x0``:

* T2I: :class:`diffusers.PixArtTransformer2DModel`, 6 blocks, 4 heads x 32 (width 128), patch 2 (256 tokens).
* T2V: :class:`diffusers.LatteTransformer3DModel`, 3 spatial + 3 temporal blocks, width 128, patch 4
  (8 x 8 tokens per frame, 16 frames = 1024 tokens), because 2 CPU cores must run it for the demo.

Sizes are small enough for a 2-core CPU demo and large enough to learn the grammar in minutes on one GPU.
"""
from __future__ import annotations

from diffusers import DPMSolverMultistepScheduler, LatteTransformer3DModel, PixArtTransformer2DModel

from .data import IMAGE_SIZE, NUM_FRAMES

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
    return dict(_SHARED, num_layers=3, patch_size=4, video_length=NUM_FRAMES)


def build_transformer(kind: str, config: dict | None = None):
    """A freshly initialized transformer of ``kind`` ("t2i" | "t2v"); output projection zeroed so training starts
    from a model that predicts zero velocity."""
    if kind == "t2i":
        model = PixArtTransformer2DModel(**(config or t2i_transformer_config()))
    elif kind == "t2v":
        model = LatteTransformer3DModel(**(config or t2v_transformer_config()))
    else:
        raise ValueError(f"model kind must be 't2i' or 't2v', got {kind!r}")
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
