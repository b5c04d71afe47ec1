"""Writing generated images and videos (PNG, GIF, MP4) from float arrays in [0, 1]."""
from __future__ import annotations

from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".gif", ".mp4")


def to_uint8(x) -> np.ndarray:
    """(…, H, W, 3) float in [0, 1] (numpy or torch) → uint8."""
    arr = x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)
    return (np.clip(arr, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def save_media(media, path: str | Path, fps: int = 8) -> Path:
    """Save an image (H, W, 3) as PNG, or a video (F, H, W, 3) as GIF/MP4 (written to a temp name, then renamed)."""
    import imageio.v3 as iio

    path = Path(path)
    frames = to_uint8(media)
    is_video = frames.ndim == 4
    if is_video and path.suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: a video needs a {' or '.join(VIDEO_SUFFIXES)} file name")
    if not is_video and path.suffix in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: an image needs an image file name such as .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    if path.suffix == ".gif":
        iio.imwrite(tmp, frames, duration=1000 / fps, loop=0)
    elif path.suffix == ".mp4":
        iio.imwrite(tmp, frames, fps=fps, codec="libx264", macro_block_size=1)
    else:
        iio.imwrite(tmp, frames)
    tmp.replace(path)
    return path
