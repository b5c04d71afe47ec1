"""Visual quality: Fréchet distance in the probe's feature space, and PSNR / SSIM against the float model.

PSNR and SSIM come from scikit-image (``skimage.metrics``), computed per image (per frame for videos) on
[0, 1] float RGB and averaged. SSIM uses scikit-image's default 7 x 7 Gaussian-free window.
"""
from __future__ import annotations

import numpy as np
import torch


def gaussian_frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2))`` for Gaussians N(mu1, C1), N(mu2, C2).

    ``tr((C1 C2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``C1^(1/2) C2 C1^(1/2)`` (same spectrum), which is stable with eigh and needs no scipy.
    """
    vals, vecs = np.linalg.eigh(cov1)
    sqrt_c1 = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    middle = sqrt_c1 @ cov2 @ sqrt_c1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)
    return max(distance, 0.0)  # round-off can leave identical distributions a hair below zero


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D), N, M >= 2."""
    a, b = (np.asarray(torch.as_tensor(f).double().cpu()) for f in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per set")
    return gaussian_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _as_hwc_images(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """(B, 3, H, W) or (B, F, 3, H, W) tensors in [0, 1] → (N, H, W, 3) float64 numpy."""
    t = torch.as_tensor(x).detach().cpu().double()
    if t.ndim == 5:
        t = t.flatten(0, 1)
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) or (B, F, 3, H, W), got {tuple(t.shape)}")
    return t.permute(0, 2, 3, 1).numpy()


def psnr(samples, reference, data_range: float = 1.0) -> float:
    """Mean PSNR (dB) of each image/frame against the same-index reference; inf-free (identical pairs → 100 dB)."""
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _as_hwc_images(samples), _as_hwc_images(reference)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {a.shape} vs {b.shape}")
    vals = [100.0 if np.array_equal(x, y) else peak_signal_noise_ratio(y, x, data_range=data_range) for x, y in zip(a, b)]
    return float(np.mean(vals))


def ssim(samples, reference, data_range: float = 1.0) -> float:
    """Mean SSIM of each image/frame against the same-index reference (scikit-image, RGB as channels)."""
    from skimage.metrics import structural_similarity

    a, b = _as_hwc_images(samples), _as_hwc_images(reference)
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ, {a.shape} vs {b.shape}")
    return float(np.mean([structural_similarity(y, x, data_range=data_range, channel_axis=-1) for x, y in zip(a, b)]))
