"""Offline quality metrics for text-to-image / text-to-video diffusion (no download anywhere).

* alignment: :func:`attribute_accuracy` — a probe network trained on the procedural scenes names shape, colour,
  size, position / relation and background of generated samples; :func:`clip_score` for real models with a local
  CLIP checkpoint;
* visual quality: :func:`frechet_distance` in the probe's feature space; :func:`psnr` / :func:`ssim` against the
  float model's samples from the same seeds (scikit-image);
* temporal consistency: :func:`temporal_metrics` — frame-to-frame feature consistency, flicker, motion direction /
  speed accuracy from object tracking.
"""
from .alignment import attribute_accuracy
from .clip import clip_score
from .evaluate import evaluate_samples, generate, real_samples
from .probe import AttributeProbe, load_probe
from .quality import frechet_distance, psnr, ssim
from .temporal import flicker, frame_consistency, motion_accuracy, temporal_metrics

__all__ = [
    "AttributeProbe", "attribute_accuracy", "clip_score", "evaluate_samples", "flicker", "frame_consistency",
    "frechet_distance", "generate", "load_probe", "motion_accuracy", "psnr", "real_samples", "ssim",
    "temporal_metrics",
]
