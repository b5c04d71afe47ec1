"""Temporal consistency of videos (B, F, 3, H, W) in [0, 1].

* ``frame_consistency``: mean cosine similarity of consecutive frames' probe features (1 = the content stays the
  same thing from frame to frame), as CLIP-feature consistency is used for big models.
* ``flicker``: mean absolute second temporal difference ``|x[t+1] - 2 x[t] + x[t-1]|`` of pixel values, in
  [0, 1] units. Smooth motion at constant speed gives small values; frame-to-frame noise or brightness pumping
  gives large ones (real procedural videos: ~0.005).
* ``motion accuracy``: the object is tracked (pixels that differ from the background colour, estimated from the
  frame borders; by its named colour when a scene has two objects or a camera pan), a line is fitted to its centroid over time,
  and the velocity is classified into a direction (left/right/up/down, or none below 0.2 px/frame) and a speed
  (fast from 0.75 px/frame, midway between slow = 0.5 and fast = 1.0).
"""
from __future__ import annotations

import numpy as np
import torch

from ..models.data import COLOURS, SPEEDS, Scene
from .probe import AttributeProbe

FOREGROUND_THRESHOLD = 0.25  # RGB distance from the background colour that counts as object
COLOUR_THRESHOLD = 0.35  # RGB distance from the named colour that counts as that object
MIN_PIXELS = 3  # a frame with fewer object pixels has no centroid
MIN_SPEED = 0.2  # px/frame; slower counts as "not moving"
FAST_FROM = float(np.mean(list(SPEEDS.values())))  # 0.75 px/frame


def _check_videos(videos: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(videos).detach().float().cpu()
    if v.ndim != 5 or v.shape[2] != 3 or v.shape[1] < 3:
        raise ValueError(f"videos must be (B, F >= 3, 3, H, W) in [0, 1], got shape {tuple(v.shape)}")
    return v


def flicker(videos: torch.Tensor) -> float:
    """Mean |second temporal difference| of pixel values over all videos, frames, pixels and channels."""
    v = _check_videos(videos)
    return float((v[:, 2:] - 2 * v[:, 1:-1] + v[:, :-2]).abs().mean())


def frame_consistency(videos: torch.Tensor, probe: AttributeProbe) -> float:
    """Mean cosine similarity between probe features of consecutive frames."""
    v = _check_videos(videos)
    b, f = v.shape[:2]
    feats = probe.embed(v.flatten(0, 1)).view(b, f, -1)
    return float(torch.nn.functional.cosine_similarity(feats[:, 1:], feats[:, :-1], dim=-1).mean())


def estimate_background(video: torch.Tensor) -> torch.Tensor:
    """Median colour (3,) of the border pixels of all frames of one video (F, 3, H, W)."""
    border = torch.cat([video[..., 0, :], video[..., -1, :], video[..., :, 0], video[..., :, -1]], dim=-1)  # (F, 3, 4W)
    return border.permute(1, 0, 2).reshape(3, -1).median(dim=1).values


def track_centroids(video: torch.Tensor, colour: tuple[float, float, float] | None = None) -> np.ndarray:
    """Object centroid per frame (F, 2) as (x, y) pixels, NaN where fewer than MIN_PIXELS object pixels.

    Without ``colour`` the object is everything far from the background; with it, pixels near that colour and
    nearer to it than to the background.
    """
    bg = estimate_background(video).view(1, 3, 1, 1)
    dist_bg = (video - bg).norm(dim=1)  # (F, H, W)
    if colour is None:
        mask = dist_bg > FOREGROUND_THRESHOLD
    else:
        dist_c = (video - torch.tensor(colour).view(1, 3, 1, 1)).norm(dim=1)
        mask = (dist_c < COLOUR_THRESHOLD) & (dist_c < dist_bg)
    size = video.shape[-1]
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    area = mask.sum(dim=(1, 2)).float()  # (F,)
    cx = (mask * coords.view(1, 1, -1)).sum(dim=(1, 2)) / area.clamp(min=1)
    cy = (mask * coords.view(1, -1, 1)).sum(dim=(1, 2)) / area.clamp(min=1)
    out = torch.stack([cx, cy], dim=1).numpy().astype(np.float64)
    out[area.numpy() < MIN_PIXELS] = np.nan
    return out


def fit_velocity(centroids: np.ndarray) -> tuple[float, float] | None:
    """Least-squares (vx, vy) in px/frame; None if fewer than half the frames have a centroid."""
    t = np.arange(len(centroids), dtype=np.float64)
    ok = ~np.isnan(centroids[:, 0])
    if ok.sum() < max(3, len(centroids) // 2):
        return None
    vx = np.polyfit(t[ok], centroids[ok, 0], 1)[0]
    vy = np.polyfit(t[ok], centroids[ok, 1], 1)[0]
    return float(vx), float(vy)


def classify_motion(velocity: tuple[float, float] | None) -> tuple[str | None, str | None]:
    """(direction, speed word) of a velocity; (None, None) if it is unknown or slower than MIN_SPEED."""
    if velocity is None:
        return None, None
    vx, vy = velocity
    if max(abs(vx), abs(vy)) < MIN_SPEED:
        return None, None
    if abs(vx) >= abs(vy):
        direction, magnitude = ("right" if vx > 0 else "left"), abs(vx)
    else:
        direction, magnitude = ("down" if vy > 0 else "up"), abs(vy)
    return direction, "fast" if magnitude >= FAST_FROM else "slowly"


def expected_motion(scene: Scene) -> list[tuple[str | None, str | None]]:
    """On-screen (direction, speed) per object that a perfect video of ``scene`` shows (pans included)."""
    return [classify_motion(v) for v in scene.velocities]


def motion_accuracy(videos: torch.Tensor, scenes: list[Scene]) -> dict:
    """Direction and speed accuracy over all objects of all videos, plus the measured velocities."""
    v = _check_videos(videos)
    if len(v) != len(scenes):
        raise ValueError(f"got {len(v)} videos for {len(scenes)} scenes")
    dir_hits, speed_hits, velocities = [], [], []
    for video, scene in zip(v, scenes):
        for obj, (want_dir, want_speed) in zip(scene.objects, expected_motion(scene)):
            # Track by the named colour when a plain foreground mask would mix things (two objects, a panning
            # checkerboard background); by foreground otherwise, so a wrong colour does not spoil the motion score.
            colour = COLOURS[obj.colour] if len(scene.objects) > 1 or scene.pan else None
            velocity = fit_velocity(track_centroids(video, colour))
            got_dir, got_speed = classify_motion(velocity)
            velocities.append(velocity)
            dir_hits.append(got_dir == want_dir)
            speed_hits.append(got_dir == want_dir and got_speed == want_speed)
    return {
        "direction_accuracy": float(np.mean(dir_hits)),
        "speed_accuracy": float(np.mean(speed_hits)),  # counts only when the direction is right too
        "velocities": velocities,
    }


def temporal_metrics(videos: torch.Tensor, scenes: list[Scene] | None = None, probe: AttributeProbe | None = None) -> dict:
    """All temporal metrics that the given inputs allow: flicker always, frame consistency with a probe, motion
    accuracy with scenes."""
    out = {"flicker": flicker(videos)}
    if probe is not None:
        out["frame_consistency"] = frame_consistency(videos, probe)
    if scenes is not None:
        motion = motion_accuracy(videos, scenes)
        out["direction_accuracy"], out["speed_accuracy"] = motion["direction_accuracy"], motion["speed_accuracy"]
    return out
