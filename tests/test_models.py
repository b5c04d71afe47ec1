"""Embedded tiny pipelines: shapes, sampler convention, save/load round trips, calibration contract, accuracy."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from viditq.metrics import attribute_accuracy, generate, load_probe
from viditq.models import (
    TinyT2IPipeline, TinyT2VPipeline, load_pipeline_weights, load_t2i_pipeline, load_t2v_pipeline, new_pipeline,
    pipeline_class_for, save_pipeline_weights,
)
from viditq.models.data import model_scenes
from viditq.models.weights import WEIGHTS_DIR

PROMPTS = ["a small red circle at the top left on a black background",
           "a large blue square above a small green cross on a gray background"]


@pytest.fixture(scope="module")
def t2i():
    pipe = load_t2i_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def t2v():
    pipe = load_t2v_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _seeded(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_t2i_output_types(t2i):
    pt = t2i(PROMPTS, output_type="pt", num_inference_steps=1, generator=_seeded(2)).images
    assert pt.shape == (2, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    np_images = t2i(PROMPTS, output_type="np", num_inference_steps=1, generator=_seeded(2)).images
    assert np_images.shape == (2, 32, 32, 3) and np.allclose(np_images, pt.permute(0, 2, 3, 1).numpy())
    pil = t2i(PROMPTS, output_type="pil", num_inference_steps=1, generator=_seeded(2)).images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    with pytest.raises(ValueError, match="output_type"):
        t2i(PROMPTS, output_type="latent")
    with pytest.raises(ValueError, match="prompt"):
        t2i([])


def test_t2v_output_shapes(t2v):
    frames = t2v(["a large red circle moving left fast on a black background"], num_inference_steps=1,
                 generator=_seeded(1), output_type="pt").frames
    assert frames.shape == (1, 16, 3, 32, 32)
    np_frames = t2v(["a large red circle moving left fast on a black background"], num_inference_steps=1,
                    generator=_seeded(1), output_type="np").frames
    assert np_frames.shape == (1, 16, 32, 32, 3) and np.allclose(np_frames, frames.permute(0, 1, 3, 4, 2).numpy())


def test_sampler_recovers_x0_from_an_oracle_velocity():
    """With the exact velocity (x - x0) / sigma, DPM-Solver on flow sigmas lands on x0: the pipeline and the
    training objective agree on the timestep and velocity convention."""
    pipe = new_pipeline("t2i")
    pipe.set_progress_bar_config(disable=True)
    x0 = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8

    def oracle(hidden_states, timestep, **kwargs):
        sigma = (timestep / 1000).view(-1, 1, 1, 1)
        return ((hidden_states - x0) / sigma,)

    pipe.transformer.forward = oracle
    out = pipe("a", num_inference_steps=8, guidance_scale=1.0, output_type="pt", generator=_seeded(1)).images
    # Integer timesteps (round(1000 sigma)) cost a few thousandths.
    assert (out - (x0 / 2 + 0.5)).abs().max() < 0.01


def test_pretrained_round_trip(t2i, tmp_path):
    t2i.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "TinyT2IPipeline" and index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert pipeline_class_for(tmp_path) is TinyT2IPipeline
    again = TinyT2IPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    a = t2i(PROMPTS, num_inference_steps=2, generator=_seeded(2), output_type="pt").images
    b = again(PROMPTS, num_inference_steps=2, generator=_seeded(2), output_type="pt").images
    assert torch.equal(a, b)


def test_weight_file_round_trip(tmp_path):
    pipe = new_pipeline("t2v")
    path = tmp_path / "t2v.safetensors"
    save_pipeline_weights(pipe, path, "t2v", {"note": "test"})
    again = load_pipeline_weights(path)
    assert isinstance(again, TinyT2VPipeline)
    for (name, a), (_, b) in zip(pipe.transformer.state_dict().items(), again.transformer.state_dict().items()):
        assert torch.equal(a.half().float(), b), name  # fp16 storage, loaded back as float32
    with pytest.raises(ValueError, match="kind"):
        save_pipeline_weights(pipe, path, "t2a")


def test_latte_weight_files_still_load(tmp_path):
    """The first shipped T2V was a Latte model; its files carry no class record and must keep loading as Latte,
    and a file that records its class gets it back, with the pipeline's (B, 3, F, H, W) sample layout either way."""
    from viditq.models.configs import _SHARED, build_transformer
    from viditq.models.weights import load_bundle, save_bundle

    pipe = new_pipeline("t2v")
    latte = build_transformer("t2v", dict(_SHARED, num_layers=1, patch_size=4, video_length=16),
                              "LatteTransformer3DModel")
    pipe.register_modules(transformer=latte)
    path = tmp_path / "latte.safetensors"
    save_pipeline_weights(pipe, path, "t2v")
    states, meta = load_bundle(path)
    assert meta["transformer_class"] == "LatteTransformer3DModel"
    del meta["transformer_class"]  # as written before the key existed
    legacy = tmp_path / "legacy.safetensors"
    save_bundle(legacy, {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}, meta)
    for f in (path, legacy):
        again = load_pipeline_weights(f)
        again.set_progress_bar_config(disable=True)
        assert type(again.transformer).__name__ == "LatteTransformer3DModel"
        assert again.sample_shape(2) == (2, 3, 16, 32, 32)
        frames = again(["a large red circle moving left fast on a black background"], num_inference_steps=1,
                       output_type="pt").frames
        assert frames.shape == (1, 16, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown transformer class"):
        build_transformer("t2v", {}, "UNet2DModel")


def test_shipped_t2v_is_cogvideox_with_frames_first_layout(t2v):
    assert type(t2v.transformer).__name__ == "CogVideoXTransformer3DModel"
    x = torch.randn(2, 3, 16, 32, 32)
    embeds = torch.randn(2, t2v.tokenizer.model_max_length, 128)
    kwargs = t2v.transformer_kwargs(x, embeds, None, torch.full((2,), 500.0))
    assert kwargs["hidden_states"].shape == (2, 16, 3, 32, 32)  # CogVideoX's layout
    with torch.no_grad():
        v = t2v.predict_velocity(x, embeds, None, torch.full((2,), 500.0))
    assert v.shape == x.shape and torch.isfinite(v).all() and v.abs().mean() > 0.01


def test_shipped_weights_are_small_fp16_and_documented():
    files = sorted(WEIGHTS_DIR.glob("*.safetensors"))
    assert [f.stem for f in files] == ["probe", "t2i", "t2v"]
    assert sum(f.stat().st_size for f in files) <= 25 * 2**20
    for f in files:
        with safe_open(str(f), "pt") as st:
            info = json.loads(st.metadata()["info"])
            assert info["steps"] > 0 and "H100" in info["device"]
            assert all(st.get_slice(k).get_dtype() in ("F16", "I64") for k in st.keys())


def test_transformer_is_called_with_keywords_only(t2i):
    """The calibration contract: every transformer call is replayable as transformer(**record)."""
    from viditq import capture_calibration

    calls = []
    handle = t2i.transformer.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args), with_kwargs=True)
    try:
        records = capture_calibration(t2i, PROMPTS[:1], num_inference_steps=3, generator=_seeded(1))
    finally:
        handle.remove()
    assert len(records) == 3 and all(args == () for args in calls)
    assert records[0]["hidden_states"].shape == (2, 3, 32, 32)  # [uncond; cond] in one batch
    with torch.no_grad():
        replay = t2i.transformer(**records[0])[0]
    assert replay.shape == (2, 3, 32, 32) and torch.isfinite(replay).all()


@pytest.fixture(scope="module")
def probe():
    return load_probe()


def test_t2i_accuracy_on_held_out_prompts(t2i, probe):
    # Measured on 512 held-out prompts (H100, 10 steps, guidance 4): attribute accuracy 0.66, colour 0.73/0.50,
    # position 1.00, layout 0.80. Below the 85 % target: the training run was too short (see docs/models.md).
    scenes = model_scenes("t2i", 16, seed=31)
    images = generate(t2i, [s.caption for s in scenes], seed=0, num_inference_steps=8, batch_size=16)
    acc = attribute_accuracy(images, scenes, probe)
    assert acc["attribute_accuracy"] >= 0.5 and acc["background_accuracy"] >= 0.9
    assert acc["per_attribute"]["position"] >= 0.8


def test_t2v_colour_and_background_follow_the_prompt(t2v, probe):
    # Measured on 256 held-out prompts (H100, 10 steps): colour 0.92, background 1.00, but shape 0.30 and motion
    # direction 0.18 (chance 0.25): the video model did not learn motion in its short run (see docs/models.md).
    scenes = model_scenes("t2v", 3, seed=32)
    videos = generate(t2v, [s.caption for s in scenes], seed=0, num_inference_steps=8, batch_size=3)
    acc = attribute_accuracy(videos, scenes, probe)
    assert acc["per_attribute"]["colour0"] >= 0.6 and acc["background_accuracy"] >= 0.9


def test_training_script_runs_and_writes_loadable_weights(tmp_path):
    from viditq.models.train import main

    main(["--model", "t2i", "--max-steps", "2", "--out", str(tmp_path), "--batch-size", "2", "--workers", "0",
          "--device", "cpu"])
    pipe = load_pipeline_weights(tmp_path / "t2i.safetensors")
    with safe_open(str(tmp_path / "t2i.safetensors"), "pt") as st:
        info = json.loads(st.metadata()["info"])
    assert isinstance(pipe, TinyT2IPipeline) and info["steps"] == 2 and info["samples"] == 4
