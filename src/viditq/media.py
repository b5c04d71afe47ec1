"""Writing generated images and videos (PNG, JPEG, WebP, GIF, MP4) from float arrays in [0, 1]."""
from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".gif", ".mp4")


def check_media_path(path: str | Path, video: bool | None = None) -> Path:
    """``path`` if its suffix names a format :func:`save_media` writes (an image's when ``video`` is False, a
    video's when True, either when None); else a ValueError that names the allowed suffixes."""
    path = Path(path)
    suffix = path.suffix.lower()
    if video is None and suffix not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        what = f"unknown file suffix {path.suffix!r}" if path.suffix else "no file suffix"
        raise ValueError(f"{path}: {what}; use an image ({', '.join(IMAGE_SUFFIXES)}) or a video "
                         f"({', '.join(VIDEO_SUFFIXES)}) suffix")
    if video and suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: a video needs a {' or '.join(VIDEO_SUFFIXES)} file name")
    if video is False and suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: an image needs a {', '.join(IMAGE_SUFFIXES[:-1])} or {IMAGE_SUFFIXES[-1]} file name")
    return path


def to_uint8(x) -> np.ndarray:
    """(…, H, W, 3) float in [0, 1] (numpy or torch) → uint8."""
    arr = x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)
    return (np.clip(arr, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def save_media(media, path: str | Path, fps: int = 8) -> Path:
    """Save an image (H, W, 3) as PNG / JPEG / WebP, or a video (F, H, W, 3) as GIF / MP4, by the suffix of ``path``
    (written to a temp name, then renamed). Other suffixes are a ValueError."""
    import imageio.v3 as iio

    frames = to_uint8(media)
    path = check_media_path(path, video=frames.ndim == 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    suffix = path.suffix.lower()
    if suffix == ".gif":
        iio.imwrite(tmp, frames, duration=1000 / fps, loop=0)
    elif suffix == ".mp4":
        iio.imwrite(tmp, frames, fps=fps, codec="libx264", macro_block_size=1)
    else:
        iio.imwrite(tmp, frames)
    tmp.replace(path)
    return path
