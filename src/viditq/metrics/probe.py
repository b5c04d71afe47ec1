"""The attribute probe: a small CNN trained on procedural scenes that names what a 32 x 32 image shows.

Heads (see ``viditq.models.data.PROBE_HEADS``): layout (one object / a horizontal pair / a vertical pair), grid
position of a single object, background, and shape / colour / size of up to two objects in canonical order (left
to right, or top to bottom). Its penultimate layer (256 features) is the feature space of the Fréchet distance.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.data import PROBE_HEADS
from ..models.weights import load_bundle, save_bundle, weights_path

FEATURE_DIM = 256


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.GELU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.GELU(),
        nn.AvgPool2d(2),
    )


class AttributeProbe(nn.Module):
    """(B, 3, 32, 32) images in [0, 1] → features (B, 256) and one logit vector per head."""

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM, heads: dict[str, int] | None = None):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "heads": dict(heads or PROBE_HEADS)}
        self.body = nn.Sequential(
            _conv_block(3, width), _conv_block(width, 2 * width), _conv_block(2 * width, 4 * width),  # → (B, 4w, 4, 4)
            nn.Flatten(), nn.Linear(16 * 4 * width, feature_dim), nn.GELU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, n) for name, n in self.config["heads"].items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → (B, feature_dim)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"probe expects images (B, 3, H, W), got shape {tuple(images.shape)}")
        return self.body(images * 2.0 - 1.0)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Class index per head, (B,) int64, on CPU."""
        preds: dict[str, list[torch.Tensor]] = {name: [] for name in self.heads}
        device = next(self.parameters()).device
        for chunk in images.split(batch_size):
            for name, logits in self(chunk.to(device, torch.float32)).items():
                preds[name].append(logits.argmax(-1).cpu())
        return {name: torch.cat(p) for name, p in preds.items()}

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Features (B, feature_dim) float64 on CPU, for Fréchet distances."""
        device = next(self.parameters()).device
        return torch.cat([self.features(c.to(device, torch.float32)).double().cpu() for c in images.split(batch_size)])


def save_probe(probe: AttributeProbe, path, info: dict | None = None) -> None:
    save_bundle(path, {"probe": probe}, {"kind": "probe", "probe_config": probe.config, "info": info or {}})


def load_probe(path=None, device: str | torch.device = "cpu") -> AttributeProbe:
    """The shipped probe (or one saved by :func:`save_probe` at ``path``), in eval mode."""
    states, meta = load_bundle(path or weights_path("probe"))
    if meta.get("kind") != "probe":
        raise ValueError(f"{path} holds a {meta.get('kind')!r} model, not a probe")
    cfg = meta["probe_config"]
    probe = AttributeProbe(cfg["width"], cfg["feature_dim"], cfg["heads"])
    probe.load_state_dict(states["probe"], strict=True)
    return probe.to(device).eval()
