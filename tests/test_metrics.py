"""Metrics against hand-computed values, the shipped probe, and CLIPScore on a tiny random CLIP."""
import math

import numpy as np
import pytest
import torch

from viditq.metrics import (
    attribute_accuracy, clip_score, flicker, frame_consistency, frechet_distance, load_probe, motion_accuracy,
    psnr, real_samples, ssim, temporal_metrics,
)
from viditq.metrics.quality import gaussian_frechet_distance
from viditq.models.data import COLOURS, model_scenes, sample_scenes


@pytest.fixture(scope="module")
def probe():
    return load_probe()


# ------------------------------------------------------------------------------------------ Fréchet distance
def test_frechet_identical_sets_is_zero():
    feats = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(feats, feats)) < 1e-8


def test_frechet_shifted_gaussian_equals_squared_shift():
    a = np.random.default_rng(0).normal(size=(500, 8))
    shift = np.arange(8) * 0.25
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)


def test_frechet_closed_form_for_scaled_covariances():
    d = 6
    # N(0, I) vs N(0, 4 I): tr(I) + tr(4I) - 2 tr(2I) = d
    assert gaussian_frechet_distance(np.zeros(d), np.eye(d), np.zeros(d), 4 * np.eye(d)) == pytest.approx(d)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2
    ca, cb = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 9.0])
    assert gaussian_frechet_distance(np.zeros(3), ca, np.ones(3), cb) == pytest.approx(3 + 1 + 1 + 0)


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))


# ------------------------------------------------------------------------------------------ PSNR / SSIM
def test_psnr_known_value_and_identity():
    a = torch.zeros(3, 3, 16, 16)
    assert psnr(a + 0.1, a) == pytest.approx(20.0, abs=1e-6)  # MSE 0.01 → 10 log10(1 / 0.01)
    assert psnr(a, a) == 100.0
    videos = torch.zeros(2, 4, 3, 16, 16)
    assert psnr(videos + 0.01, videos) == pytest.approx(40.0, abs=1e-6)


def test_ssim_identity_and_damage():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert ssim(x, x) == pytest.approx(1.0)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    assert ssim(noisy, x) < 0.9
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(x[:2], x)


# ------------------------------------------------------------------------------------------ temporal
def test_flicker_known_values():
    static = torch.rand(1, 1, 3, 8, 8).expand(2, 6, 3, 8, 8)
    assert flicker(static) == 0.0
    alternating = torch.zeros(1, 6, 3, 8, 8)
    alternating[:, 1::2] = 1.0  # 0,1,0,1,...: every second difference is ±2
    assert flicker(alternating) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="videos"):
        flicker(torch.zeros(2, 3, 8, 8))


def test_motion_accuracy_real_and_reversed_videos():
    scenes = model_scenes("t2v", 12, seed=3)
    videos = real_samples(scenes)  # (B, F, 3, H, W)
    real = motion_accuracy(videos, scenes)
    assert real["direction_accuracy"] == 1.0 and real["speed_accuracy"] == 1.0
    reversed_videos = videos.flip(1)  # every object now moves the opposite way
    assert motion_accuracy(reversed_videos, scenes)["direction_accuracy"] == 0.0
    frozen = videos[:, :1].expand_as(videos)
    assert motion_accuracy(frozen, scenes)["direction_accuracy"] == 0.0


def test_two_object_videos_are_tracked_by_colour():
    scenes = [s for s in sample_scenes(40, 4, kind="video", max_objects=2) if len(s.objects) == 2][:8]
    assert motion_accuracy(real_samples(scenes), scenes)["direction_accuracy"] == 1.0


def test_frame_consistency_and_temporal_metrics(probe):
    scenes = model_scenes("t2v", 4, seed=5)
    videos = real_samples(scenes)
    static = videos[:, :1].expand_as(videos).contiguous()
    assert frame_consistency(static, probe) == pytest.approx(1.0, abs=1e-6)
    noise = torch.rand(videos.shape, generator=torch.Generator().manual_seed(0))
    assert frame_consistency(noise, probe) < frame_consistency(videos, probe)
    m = temporal_metrics(videos, scenes, probe)
    assert m["direction_accuracy"] == 1.0 and m["flicker"] < 0.02 and m["frame_consistency"] > 0.9


# ------------------------------------------------------------------------------------------ probe / alignment
def test_shipped_probe_accuracy_on_fresh_real_samples(probe):
    images = sample_scenes(400, seed=123_456, max_objects=2)
    acc = attribute_accuracy(real_samples(images), images, probe)
    assert acc["attribute_accuracy"] >= 0.97 and acc["background_accuracy"] >= 0.97
    assert min(acc["per_attribute"].values()) >= 0.97
    videos = model_scenes("t2v", 16, seed=654_321, split="all")
    acc = attribute_accuracy(real_samples(videos), videos, probe)  # every frame judged
    assert acc["attribute_accuracy"] >= 0.97


def test_attribute_accuracy_sees_wrong_colours(probe):
    scenes = [s for s in sample_scenes(200, seed=7) if s.layout == "single"][:32]
    images = real_samples(scenes)
    names = list(COLOURS)
    recoloured = [
        type(s)(tuple(o.__class__(**{**o.__dict__, "colour": names[(names.index(o.colour) + 1) % 6]})
                      for o in s.objects), s.background, s.layout, s.caption, s.position)
        for s in scenes
    ]
    acc = attribute_accuracy(images, recoloured, probe)
    assert acc["per_attribute"]["colour0"] <= 0.05 and acc["per_attribute"]["shape0"] >= 0.97
    assert acc["all_correct"] <= 0.05


# ------------------------------------------------------------------------------------------ CLIPScore
@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_clip")
    words = ["[PAD]", "[UNK]", "a", "red", "blue", "circle", "square"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, eos_token_id=1,
                         bos_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_clip_score_on_tiny_random_clip(tiny_clip_dir, monkeypatch):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square", "a red square"]
    score = clip_score(images, prompts, tiny_clip_dir)
    # The same number by hand.
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tok, proc = AutoTokenizer.from_pretrained(tiny_clip_dir), CLIPImageProcessor.from_pretrained(tiny_clip_dir)
    arrays = list((images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy())
    with torch.no_grad():
        img = model.get_image_features(pixel_values=proc(images=arrays, return_tensors="pt").pixel_values)
        text = tok(prompts, padding=True, return_tensors="pt")
        txt = model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    want = float((100 * torch.nn.functional.cosine_similarity(img, txt).clamp(min=0)).mean())
    assert 0.0 <= score <= 100.0 and math.isclose(score, want, rel_tol=1e-5, abs_tol=1e-5)


def test_clip_score_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        clip_score(torch.rand(1, 3, 32, 32), ["a"], "openai/clip-vit-base-patch32")
    with pytest.raises(FileNotFoundError):
        clip_score(torch.rand(1, 3, 32, 32), ["a"], tmp_path)
