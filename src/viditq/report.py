"""Visual reports: labelled image grids (rows = presets), side-by-side videos, metrics tables, report.md.

All inputs are float tensors in [0, 1]: images (N, 3, H, W), videos (N, F, 3, H, W).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .media import save_media

LABEL_WIDTH = 84  # pixels of the row-label column
GAP = 2  # pixels between tiles


def _tile_row(images: torch.Tensor, scale: int) -> np.ndarray:
    """(N, 3, H, W) → one (H*scale, N*(W*scale + GAP), 3) uint8 strip, nearest-neighbour upscaled."""
    arr = (images.detach().cpu().float().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, H*s, W*s, 3)
    n, h, w, _ = arr.shape
    strip = np.full((h, n * (w + GAP), 3), 255, np.uint8)
    for i, tile in enumerate(arr):
        strip[:, i * (w + GAP): i * (w + GAP) + w] = tile
    return strip


def image_grid(rows: list[torch.Tensor], labels: list[str], scale: int = 4) -> Image.Image:
    """One row per entry of ``rows`` (each (N, 3, H, W), same N), its label on the left."""
    if len(rows) != len(labels) or not rows:
        raise ValueError(f"image_grid needs as many labels as rows, got {len(rows)} rows and {len(labels)} labels")
    strips = [_tile_row(r, scale) for r in rows]
    if len({s.shape for s in strips}) != 1:
        raise ValueError("image_grid rows must all have the same number and size of images")
    h, w, _ = strips[0].shape
    canvas = Image.new("RGB", (LABEL_WIDTH + w, len(strips) * (h + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (strip, label) in enumerate(zip(strips, labels)):
        top = r * (h + GAP)
        canvas.paste(Image.fromarray(strip), (LABEL_WIDTH, top))
        draw.text((4, top + h // 2 - 5), label, fill="black")
    return canvas


def video_grid_frames(rows: list[torch.Tensor], labels: list[str], scale: int = 4) -> np.ndarray:
    """Side-by-side videos: rows (each (N, F, 3, H, W)) → frames (F, H', W', 3) float in [0, 1] of labelled grids."""
    frames = rows[0].shape[1]
    if any(r.shape[1] != frames for r in rows):
        raise ValueError("video_grid_frames: all videos must have the same number of frames")
    grids = [np.asarray(image_grid([r[:, f] for r in rows], labels, scale)) for f in range(frames)]
    return np.stack(grids).astype(np.float32) / 255.0


def save_video_grid(rows: list[torch.Tensor], labels: list[str], path_stem: Path, fps: int = 8,
                    scale: int = 4) -> list[Path]:
    """Write ``path_stem``.gif and, when an ffmpeg is available (imageio-ffmpeg), ``path_stem``.mp4."""
    frames = video_grid_frames(rows, labels, scale)
    written = [save_media(frames, path_stem.with_suffix(".gif"), fps=fps)]
    try:
        import imageio_ffmpeg  # noqa: F401  (the MP4 writer's backend)
    except ImportError:
        return written
    # H.264 wants even sizes: pad by one pixel where needed.
    h, w = frames.shape[1:3]
    padded = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=1.0)
    written.append(save_media(padded, path_stem.with_suffix(".mp4"), fps=fps))
    return written


# ------------------------------------------------------------------------------------------ tables
def _fmt(value, decimals: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        if abs(value) >= 100:  # Fréchet distances
            return f"{value:.0f}"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.{decimals}f}"  # dB / MiB and seconds / rates
    return str(value)


SHORT_NAMES = {
    "attribute_accuracy": "attr acc", "all_correct": "all ok", "fd_probe": "FD", "psnr_vs_fp": "PSNR",
    "ssim_vs_fp": "SSIM", "weight_mib": "MiB", "gen_s": "gen s", "direction_accuracy": "dir acc",
    "speed_accuracy": "spd acc", "frame_consistency": "consist", "flicker": "flicker",
}


def markdown_table(rows: dict[str, dict], columns: list[str]) -> str:
    """``rows``: row name → {column: value}; missing values show as "–"."""
    head = "| preset | " + " | ".join(SHORT_NAMES.get(c, c) for c in columns) + " |"
    sep = "|---|" + "---|" * len(columns)
    body = ["| " + name + " | " + " | ".join(_fmt(vals.get(c)) for c in columns) + " |" for name, vals in rows.items()]
    return "\n".join([head, sep, *body])


def rich_table(rows: dict[str, dict], columns: list[str], title: str):
    from rich import box
    from rich.table import Table

    # A light box, short numbers and two-line headers keep the 11-column video table whole in 80 columns.
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    cells = {name: [_fmt(vals.get(c), decimals=2) for c in columns] for name, vals in rows.items()}
    table.add_column("preset", no_wrap=True, min_width=max(map(len, cells)))
    for i, c in enumerate(columns):  # values never wrap; headers may, onto two lines
        table.add_column(SHORT_NAMES.get(c, c), justify="right", min_width=max(len(v[i]) for v in cells.values()))
    for name, values in cells.items():
        table.add_row(name, *values)
    return table


def write_json(data: dict, path: Path) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)
    return path
