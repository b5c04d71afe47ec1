"""Text alignment: does a generated sample show what its caption says? Judged by the attribute probe.

For an image scene the judged attributes are the layout (one object, a horizontal or a vertical pair — with the
canonical slot order this also judges the relation "left of / above"), the grid position of a single object, and
shape / colour / size of every object. The background is judged and reported apart, since it is nearly free.
For a video every frame is judged on its object's shape / colour / size (and background).
"""
from __future__ import annotations

import numpy as np
import torch

from ..models.data import PROBE_SLOTS, Scene, scene_labels
from .probe import AttributeProbe

OBJECT_ATTRIBUTES = ("shape", "colour", "size")


def judged_heads(scene: Scene) -> list[str]:
    """Probe heads that a scene's caption determines (background excluded)."""
    heads = [] if scene.is_video else ["layout"]
    if scene.position is not None:
        heads.append("position")
    for slot in range(min(len(scene.objects), PROBE_SLOTS)):
        heads += [f"{attr}{slot}" for attr in OBJECT_ATTRIBUTES]
    return heads


def _as_frames(samples: torch.Tensor, scenes: list[Scene]) -> tuple[torch.Tensor, list[Scene]]:
    """Images (B, 3, H, W) stay; videos (B, F, 3, H, W) become (B*F, 3, H, W) with each scene repeated F times."""
    if samples.ndim == 4:
        return samples, scenes
    if samples.ndim == 5:
        b, f = samples.shape[:2]
        return samples.reshape(b * f, *samples.shape[2:]), [s for s in scenes for _ in range(f)]
    raise ValueError(f"samples must be images (B, 3, H, W) or videos (B, F, 3, H, W), got {tuple(samples.shape)}")


def attribute_accuracy(samples: torch.Tensor, scenes: list[Scene], probe: AttributeProbe) -> dict:
    """Probe-judged accuracy of ``samples`` (images (B, 3, H, W) or videos (B, F, 3, H, W), in [0, 1]) against
    their ``scenes``' ground truth.

    Returns ``attribute_accuracy`` (mean over all judged (sample, attribute) pairs), ``all_correct`` (share of
    samples — frames for videos — with every judged attribute and the background right), ``background_accuracy``
    and ``per_attribute`` (accuracy per head name, e.g. ``colour0``).
    """
    if len(samples) != len(scenes):
        raise ValueError(f"got {len(samples)} samples for {len(scenes)} scenes")
    frames, frame_scenes = _as_frames(samples, scenes)
    pred = probe.predict(frames)
    hits: dict[str, list[bool]] = {}
    sample_ok, bg_ok = [], []
    for i, scene in enumerate(frame_scenes):
        truth = scene_labels(scene)
        ok = [int(pred[h][i]) == truth[h] for h in judged_heads(scene)]
        for h, hit in zip(judged_heads(scene), ok):
            hits.setdefault(h, []).append(hit)
        bg_ok.append(int(pred["background"][i]) == truth["background"])
        sample_ok.append(all(ok) and bg_ok[-1])
    all_hits = [h for v in hits.values() for h in v]
    return {
        "attribute_accuracy": float(np.mean(all_hits)),
        "all_correct": float(np.mean(sample_ok)),
        "background_accuracy": float(np.mean(bg_ok)),
        "per_attribute": {h: float(np.mean(v)) for h, v in sorted(hits.items())},
    }
