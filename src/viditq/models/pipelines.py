"""Diffusers pipelines around the tiny transformers: text encoding, classifier-free guidance, DPM-Solver sampling.

They follow PixArt-α / CogVideoX: the unconditional and conditional branches are concatenated into one batch and the
transformer is always called with keyword arguments (``hidden_states=``, ``encoder_hidden_states=``,
``timestep=``, ...), so ``viditq.capture_calibration`` records replayable inputs exactly as for the big models.

Pixel space: the "latents" are the RGB images/videos themselves in [-1, 1]; there is no VAE.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0
OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class TinyT2VPipelineOutput(BaseOutput):
    """``frames``: (B, F, H, W, 3) float numpy for "np", (B, F, 3, H, W) tensor for "pt", list of PIL lists for "pil"."""

    frames: object


class _TinyDiTPipeline(DiffusionPipeline):
    """Shared text encoding and denoising loop; subclasses say the sample shape and transformer kwargs."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    # -- text ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions → (embeddings (B, L, D), attention mask (B, L)), L = tokenizer.model_max_length."""
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        embeds = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return embeds.to(self.transformer.dtype), mask

    # -- subclass hooks ------------------------------------------------------------------------------
    def sample_shape(self, batch: int) -> tuple[int, ...]:
        raise NotImplementedError

    def transformer_kwargs(self, x, embeds, mask, t) -> dict:
        raise NotImplementedError

    def predict_velocity(self, x, embeds, mask, t) -> torch.Tensor:
        """The transformer's velocity for samples ``x`` in the pipeline's layout (training and sampling use this)."""
        return self.transformer(**self.transformer_kwargs(x, embeds, mask, t))[0]

    # -- sampling ------------------------------------------------------------------------------------
    @staticmethod
    def _check_call(prompt, num_inference_steps, guidance_scale, output_type) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        return prompts

    def denoise(
        self, prompts: list[str], negative_prompt: str, num_inference_steps: int, guidance_scale: float,
        generator=None, latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample from noise; returns the final sample in [-1, 1] (unclamped), shape :meth:`sample_shape`."""
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        embeds, mask = self.encode_prompt(prompts, device)
        if do_cfg:  # one batch [uncond; cond], as PixArt does
            neg_embeds, neg_mask = self.encode_prompt([negative_prompt] * len(prompts), device)
            embeds, mask = torch.cat([neg_embeds, embeds]), torch.cat([neg_mask, mask])
        shape = self.sample_shape(len(prompts))
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        x = latents.to(device=device, dtype=self.transformer.dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        with self.progress_bar(total=num_inference_steps) as progress:
            for t in self.scheduler.timesteps:
                x_in = torch.cat([x, x]) if do_cfg else x
                t_in = t.to(device=device, dtype=self.transformer.dtype).expand(x_in.shape[0])  # (B',)
                velocity = self.predict_velocity(x_in, embeds, mask, t_in)
                if do_cfg:
                    uncond, cond = velocity.chunk(2)
                    velocity = uncond + guidance_scale * (cond - uncond)
                x = self.scheduler.step(velocity, t, x, return_dict=False)[0]
                progress.update()
        self.maybe_free_model_hooks()
        return x


class TinyT2IPipeline(_TinyDiTPipeline):
    """Text-to-image around a :class:`diffusers.PixArtTransformer2DModel` (32 x 32 RGB, pixel space)."""

    def sample_shape(self, batch: int) -> tuple[int, ...]:
        size = self.transformer.config.sample_size
        return (batch, self.transformer.config.in_channels, size, size)

    def transformer_kwargs(self, x, embeds, mask, t) -> dict:
        return dict(
            hidden_states=x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
        )

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str], negative_prompt: str = "", num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE, num_images_per_prompt: int = 1, generator=None,
        latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
    ):
        """Images for ``prompt``: "pt" (B, 3, H, W) in [0, 1], "np" (B, H, W, 3) float32 in [0, 1], or PIL."""
        prompts = self._check_call(prompt, num_inference_steps, guidance_scale, output_type)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        x = self.denoise(prompts, negative_prompt, num_inference_steps, guidance_scale, generator, latents)
        images = (x.float() / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W)
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
            if output_type == "pil":
                images = [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class TinyT2VPipeline(_TinyDiTPipeline):
    """Text-to-video around a :class:`diffusers.CogVideoXTransformer3DModel` (16 frames of 32 x 32 RGB, pixel space).

    Samples are (B, 3, F, H, W) here; CogVideoX takes and returns (B, F, 3, H, W). (Files of the first shipped
    model hold a :class:`diffusers.LatteTransformer3DModel`, which takes the pipeline's layout.)"""

    @property
    def _frames_first(self) -> bool:
        return not hasattr(self.transformer.config, "video_length")  # Latte has video_length, CogVideoX not

    def sample_shape(self, batch: int) -> tuple[int, ...]:
        config = self.transformer.config
        if self._frames_first:
            return (batch, config.in_channels, config.sample_frames, config.sample_height, config.sample_width)
        return (batch, config.in_channels, config.video_length, config.sample_size, config.sample_size)

    def transformer_kwargs(self, x, embeds, mask, t) -> dict:
        # Neither model takes a text mask; padded positions are learned as-is.
        if self._frames_first:
            x = x.transpose(1, 2)
        return dict(hidden_states=x, encoder_hidden_states=embeds, timestep=t, return_dict=False)

    def predict_velocity(self, x, embeds, mask, t) -> torch.Tensor:
        velocity = super().predict_velocity(x, embeds, mask, t)
        return velocity.transpose(1, 2) if self._frames_first else velocity

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str], negative_prompt: str = "", num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE, num_videos_per_prompt: int = 1, generator=None,
        latents: torch.Tensor | None = None, output_type: str = "np", return_dict: bool = True,
    ):
        """Videos for ``prompt``: "pt" (B, F, 3, H, W) in [0, 1], "np" (B, F, H, W, 3) float32, or PIL frame lists."""
        prompts = self._check_call(prompt, num_inference_steps, guidance_scale, output_type)
        prompts = [p for p in prompts for _ in range(num_videos_per_prompt)]
        x = self.denoise(prompts, negative_prompt, num_inference_steps, guidance_scale, generator, latents)
        frames = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # (B, F, 3, H, W)
        if output_type != "pt":
            frames = frames.permute(0, 1, 3, 4, 2).cpu().numpy()  # (B, F, H, W, 3)
            if output_type == "pil":
                frames = [[Image.fromarray((f * 255).round().astype(np.uint8)) for f in video] for video in frames]
        return TinyT2VPipelineOutput(frames=frames) if return_dict else (frames,)

