"""CLIPScore for users with real models, from a CLIP checkpoint already on disk (never downloaded).

``clip_score = 100 * mean(max(cos(image_embedding, text_embedding), 0))`` (Hessel et al. 2021 without the 2.5
rescaling, as torchmetrics reports it). The folder must hold a ``transformers`` CLIP model, its tokenizer and its
image processor config (what ``CLIPModel.save_pretrained`` + ``CLIPProcessor.save_pretrained`` write).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_clip(model_dir: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, image_processor) from a local folder; raises FileNotFoundError for anything else, so a
    hub id is never fetched."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a local CLIP checkpoint folder (no config.json); nothing is downloaded")
    model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    return model, tokenizer, image_processor


def _to_uint8_hwc(images) -> list[np.ndarray]:
    """(B, 3, H, W) float tensor in [0, 1], or a list of PIL images → list of (H, W, 3) uint8 arrays."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        return list((images.detach().cpu().clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy())
    return [np.asarray(im.convert("RGB")) for im in images]


@torch.no_grad()
def clip_score(images, prompts: list[str], model_dir: str | Path, device: str | torch.device = "cpu",
               batch_size: int = 32) -> float:
    """CLIPScore of ``images`` (tensor (B, 3, H, W) in [0, 1] or PIL list) against same-index ``prompts``."""
    arrays = _to_uint8_hwc(images)
    if len(arrays) != len(prompts):
        raise ValueError(f"got {len(arrays)} images for {len(prompts)} prompts")
    model, tokenizer, image_processor = load_clip(model_dir, device)
    max_len = model.config.text_config.max_position_embeddings
    scores = []
    for start in range(0, len(arrays), batch_size):
        pixel = image_processor(images=arrays[start:start + batch_size], return_tensors="pt").pixel_values
        text = tokenizer(prompts[start:start + batch_size], padding=True, truncation=True, max_length=max_len,
                         return_tensors="pt")
        img_emb = model.get_image_features(pixel_values=pixel.to(device))
        txt_emb = model.get_text_features(input_ids=text.input_ids.to(device), attention_mask=text.attention_mask.to(device))
        cos = torch.nn.functional.cosine_similarity(_embedding(img_emb), _embedding(txt_emb), dim=-1)
        scores.append(100.0 * cos.clamp(min=0))
    return float(torch.cat(scores).mean())


def _embedding(out) -> torch.Tensor:
    # transformers >= 5 may return a model output object instead of a tensor from get_*_features.
    return out if isinstance(out, torch.Tensor) else out.pooler_output
