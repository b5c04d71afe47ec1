"""Procedural scenes: determinism, ground truth of every attribute, held-out split, tokenizer coverage."""
import numpy as np
import pytest
import torch

from viditq.models.data import (
    BACKGROUNDS, COLOURS, IMAGE_SIZE, NUM_FRAMES, SIZES, model_scenes, render, sample_image_scene, sample_scenes,
)
from viditq.models.text import MAX_TEXT_TOKENS, build_tokenizer
from viditq.metrics.temporal import fit_velocity, track_centroids


def test_same_seed_same_scenes_and_pixels():
    a, b = sample_scenes(32, seed=3), sample_scenes(32, seed=3)
    assert a == b
    assert torch.equal(render(a), render(b))
    assert sample_scenes(32, seed=4) != a


def test_image_ground_truth_matches_pixels():
    scenes = [s for s in sample_scenes(200, seed=1) if s.layout == "single"][:40]
    images = render(scenes)  # (B, 3, H, W)
    for scene, img in zip(scenes, images):
        obj = scene.objects[0]
        centre = img[:, int(obj.y), int(obj.x)]
        assert torch.allclose(centre, torch.tensor(COLOURS[obj.colour]), atol=1e-6)
        corner = img[:, 0, 0]
        assert torch.allclose(corner, torch.tensor(BACKGROUNDS[scene.background]), atol=1e-6)
        if obj.shape in ("circle", "square", "cross"):  # symmetric shapes: pixel centroid = object centre
            mask = (img - torch.tensor(BACKGROUNDS[scene.background]).view(3, 1, 1)).abs().sum(0)
            ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
            cx, cy = float((mask * xs).sum() / mask.sum()), float((mask * ys).sum() / mask.sum())
            assert abs(cx - obj.x) < 0.3 and abs(cy - obj.y) < 0.3


def test_caption_names_every_attribute_and_canonical_order():
    for scene in sample_scenes(300, seed=2, max_objects=3, texture_prob=0.3):
        words = scene.caption
        for o in scene.objects:
            assert f"{o.size} {o.colour} {o.shape}" in words
            assert (o.texture == "striped") == (f"striped {o.size} {o.colour} {o.shape}" in words)
        assert f"on a {scene.background} background" in words
        if scene.layout == "horizontal":
            xs = [o.x for o in scene.objects]
            assert xs == sorted(xs) and ("left of" in words or "right of" in words)
            first = scene.caption.split(" left of " if "left of" in words else " right of ")[0]
            leftmost, rightmost = scene.objects[0], scene.objects[-1]
            named = leftmost if "left of" in words else rightmost
            assert first.endswith(f"{named.colour} {named.shape}")
        elif scene.layout == "vertical":
            ys = [o.y for o in scene.objects]
            assert ys == sorted(ys) and ("above" in words or "below" in words)
        else:
            assert f"at the {scene.position} on" in words


def test_objects_inside_canvas_and_apart():
    for scene in sample_scenes(300, seed=5, max_objects=3):
        for o in scene.objects:
            reach = SIZES[o.size] * 1.15
            assert reach <= o.x <= IMAGE_SIZE - reach and reach <= o.y <= IMAGE_SIZE - reach
        for a, b in zip(scene.objects, scene.objects[1:]):
            assert np.hypot(a.x - b.x, a.y - b.y) >= (a.radius + b.radius) * 1.15


def test_one_to_three_objects_and_bad_counts():
    counts = {len(s.objects) for s in sample_scenes(200, seed=0, max_objects=3)}
    assert counts == {1, 2, 3}
    with pytest.raises(ValueError, match="max_objects"):
        sample_image_scene(np.random.default_rng(0), max_objects=4)
    with pytest.raises(ValueError, match="split"):
        sample_scenes(1, 0, split="val")


def test_held_out_split():
    test = sample_scenes(100, seed=6, split="test")
    train = sample_scenes(300, seed=6, split="train")
    assert all(s.held_out for s in test) and not any(s.held_out for s in train)
    share = np.mean([s.held_out for s in sample_scenes(3000, seed=7)])
    assert 0.06 < share < 0.14
    assert {s.combination_key() for s in test}.isdisjoint({s.combination_key() for s in train})


def test_video_motion_ground_truth():
    scenes = sample_scenes(24, seed=8, kind="video", max_objects=1)
    videos = render(scenes)  # (B, 3, F, H, W)
    assert videos.shape == (24, 3, NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE)
    for scene, video in zip(scenes, videos.permute(0, 2, 1, 3, 4)):
        vx, vy = fit_velocity(track_centroids(video))
        assert abs(vx - scene.velocities[0][0]) < 0.05 and abs(vy - scene.velocities[0][1]) < 0.05
        assert scene.objects[0].direction in scene.caption and scene.objects[0].speed in scene.caption


def test_camera_pan_moves_objects_against_the_pan():
    scenes = sample_scenes(20, seed=9, kind="video", pan_prob=1.0)
    for s in scenes:
        assert f"as the camera pans {s.pan}" in s.caption
        obj = s.objects[0]
        from viditq.models.data import DIRECTIONS, PAN_SPEED, SPEEDS

        want = np.array(DIRECTIONS[obj.direction]) * SPEEDS[obj.speed] - np.array(DIRECTIONS[s.pan]) * PAN_SPEED
        assert np.allclose(s.velocities[0], want)


def test_tokenizer_covers_the_grammar():
    tok = build_tokenizer()
    captions = [s.caption for s in sample_scenes(200, 0, max_objects=3, texture_prob=0.5)]
    captions += [s.caption for s in sample_scenes(200, 0, kind="video", max_objects=2, pan_prob=0.5, texture_prob=0.5)]
    ids = tok(captions, padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True)["input_ids"]
    unk, eos, pad = tok.unk_token_id, tok.eos_token_id, tok.pad_token_id
    for caption, row in zip(captions, ids):
        assert unk not in row
        n = len(caption.split())
        assert n + 1 <= MAX_TEXT_TOKENS and row[n] == eos and all(t == pad for t in row[n + 1:])
    assert tok("")["input_ids"] == [eos]  # the CFG negative prompt still has a token


def test_model_scenes_follow_training_distribution():
    assert all(len(s.objects) <= 2 and s.held_out for s in model_scenes("t2i", 50, 0))
    assert all(len(s.objects) == 1 and s.is_video for s in model_scenes("t2v", 10, 0))
    with pytest.raises(ValueError, match="model"):
        model_scenes("t2a", 1, 0)
