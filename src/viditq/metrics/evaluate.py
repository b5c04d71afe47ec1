"""Generate from a pipeline with fixed seeds and score the samples with every metric that applies."""
from __future__ import annotations

import torch

from ..models.data import Scene, render
from .alignment import attribute_accuracy
from .probe import AttributeProbe
from .quality import frechet_distance, psnr, ssim
from .temporal import temporal_metrics


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, num_inference_steps: int = 20, guidance_scale: float = 4.0,
             batch_size: int = 64) -> torch.Tensor:
    """Samples in [0, 1] on CPU: images (B, 3, H, W) or videos (B, F, 3, H, W). Sample ``i`` draws its noise from
    ``torch.Generator().manual_seed(seed + i)``, so it does not depend on ``batch_size`` or the device."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        result = pipe(chunk, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=gens,
                      output_type="pt", return_dict=False)[0]
        out.append(result.float().cpu())
    return torch.cat(out)


def real_samples(scenes: list[Scene]) -> torch.Tensor:
    """Ground-truth renders in the layout :func:`generate` returns: (B, 3, H, W) or (B, F, 3, H, W)."""
    x = render(scenes)
    return x.permute(0, 2, 1, 3, 4).contiguous() if x.ndim == 5 else x


def _frames(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(0, 1) if x.ndim == 5 else x


def evaluate_samples(samples: torch.Tensor, scenes: list[Scene], probe: AttributeProbe,
                     reference: torch.Tensor | None = None) -> dict:
    """Metrics of generated ``samples`` for ``scenes``: probe alignment, Fréchet distance to the real renders of the
    same scenes (probe features, frames for videos), temporal metrics for videos, and PSNR / SSIM against
    ``reference`` (the float model's samples from the same seeds) when given."""
    align = attribute_accuracy(samples, scenes, probe)
    metrics = {
        "attribute_accuracy": align["attribute_accuracy"],
        "all_correct": align["all_correct"],
        "background_accuracy": align["background_accuracy"],
        "fd_probe": frechet_distance(probe.embed(_frames(samples)), probe.embed(_frames(real_samples(scenes)))),
    }
    if samples.ndim == 5:
        metrics.update(temporal_metrics(samples, scenes, probe))
    if reference is not None:
        metrics["psnr_vs_fp"] = psnr(samples, reference)
        metrics["ssim_vs_fp"] = ssim(samples, reference)
    metrics["per_attribute"] = align["per_attribute"]
    return metrics
