"""Context-parallel (Ulysses) inference of quantized models: 2 CPU processes over gloo vs one process.

The multi-process tests run diffusers' real context-parallel path (split/gather hooks, all-to-all around each
attention call) with W8A8 QuantLinear layers and INT8 attention, and compare with the single-process quantized
forward of the same checkpoint.
"""
import dataclasses
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import viditq
from viditq.attention import quantized_attention_mode
from viditq.config import resolve_config
from viditq.parallel import (
    CogVideoXContextParallelAttnProcessor,
    capture_calibration_parallel,
    check_world,
    enable_context_parallel,
    generate_parallel,
    launch,
    supports_context_parallel,
)
from viditq.testing import calibration_set, forward_output, sqnr_db, tiny_inputs, tiny_model, tiny_word_tokenizer

WORLD = 2
CONFIG = dataclasses.replace(resolve_config("w8a8"), attention="int8")
# case → (tiny model, uneven split)
CASES = {
    "wan": ("wan", None),
    "cogvideox": ("cogvideox", None),
    "cogvideox_rope": ("cogvideox_rope", None),  # CogVideoX-5B style: RoPE tables split with the video tokens
    "cogvideox_text7": ("cogvideox_text7", True),  # 7 text tokens on 2 ranks: diffusers' "anything" mode
}


def _model(name: str):
    if name in ("wan", "cogvideox"):
        return tiny_model(name)
    import diffusers

    torch.manual_seed(0)
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, num_layers=2, text_embed_dim=48,
        time_embed_dim=32, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=7 if name == "cogvideox_text7" else 8,
        use_rotary_positional_embeddings=name == "cogvideox_rope").eval()


def _inputs(name: str, seed: int = 0) -> dict:
    if name == "cogvideox_text7":
        return dict(tiny_inputs("cogvideox", seed=seed, text_len=7), return_dict=False)
    if name != "cogvideox_rope":
        return dict(tiny_inputs(name, seed=seed), return_dict=False)
    kw = tiny_inputs("cogvideox", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    video_tokens = 3 * 4 * 4  # frames x (8 / patch 2)^2
    # Any (S_video, head_dim) tables exercise the split; real ones come from the pipeline.
    kw["image_rotary_emb"] = (torch.randn(video_tokens, 32, generator=g), torch.randn(video_tokens, 32, generator=g))
    return dict(kw, return_dict=False)


def _calibration(name: str) -> list[dict]:
    return [{k: v for k, v in _inputs(name, seed=100 + i).items() if k != "return_dict"} for i in range(2)]


# ------------------------------------------------------------------------------------------ single process
def test_cogvideox_processor_matches_diffusers():
    """The dispatch-based CogVideoX processor is the same function as diffusers' (with and without RoPE)."""
    for name in ("cogvideox", "cogvideox_rope"):
        model = _model(name)
        ref = forward_output(model, _inputs(name))
        for block in model.transformer_blocks:
            block.attn1.set_processor(CogVideoXContextParallelAttnProcessor())
        torch.testing.assert_close(forward_output(model, _inputs(name)), ref, rtol=1e-5, atol=1e-5)


def test_launch_arguments_are_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="2 GPUs requested but 1 CUDA device"):
        check_world(2, "cuda")
    with pytest.raises(ValueError, match=">= 1"):
        check_world(0, "cpu")
    with pytest.raises(ValueError, match="'cuda' or 'cpu'"):
        check_world(2, "mps")


@pytest.fixture
def one_process_group():
    """A gloo group of this process alone: enough for the checks that run before any communication."""
    import torch.distributed as dist

    from viditq.parallel import _free_port

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    yield
    dist.destroy_process_group()


def test_requests_that_cannot_work_are_refused(one_process_group):
    assert supports_context_parallel(tiny_model("wan")) and supports_context_parallel(tiny_model("cogvideox"))
    assert not supports_context_parallel(tiny_model("pixart"))
    quantized = viditq.quantize(tiny_model("wan"), CONFIG, calibration_set("wan", 1))
    with pytest.raises(ValueError, match="log-sum-exp, which int8 attention"):
        enable_context_parallel(quantized, 2, kind="ring")
    with pytest.raises(ValueError, match="PixArtTransformer2DModel has no context-parallel plan"):
        enable_context_parallel(tiny_model("pixart"), 2)
    with pytest.raises(ValueError, match="one of .'ulysses', 'ring'.*'zigzag'"):
        enable_context_parallel(tiny_model("wan"), 2, kind="zigzag")
    with pytest.raises(ValueError, match="world_size >= 2"):
        enable_context_parallel(tiny_model("wan"), 1)
    # 2 heads over 3 ranks: 1 head each, 1 padded, which diffusers does not accept; nor, unasked, an uneven split
    with pytest.raises(ValueError, match="cannot split 2 attention heads over 3 ranks"):
        enable_context_parallel(tiny_model("wan"), 3)
    with pytest.raises(ValueError, match="pass uneven=True"):
        enable_context_parallel(tiny_model("wan"), 3, uneven=False)


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="not initialised"):
        enable_context_parallel(tiny_model("wan"), 2)


# ------------------------------------------------------------------------------------------ 2 processes
def _forward_worker(rank, world_size, device, checkpoints: dict, out_dir: str):
    """Every case: load the quantized checkpoint, make it context parallel, forward; each rank saves its output."""
    from viditq.layers import QuantLinear

    tensors = {}
    for case, path in checkpoints.items():
        name, uneven = CASES[case]
        model = viditq.load_quantized(path)
        enable_context_parallel(model, world_size, uneven=uneven)
        tensors[case] = forward_output(model, _inputs(name))
        tensors[f"{case}.quant_linears"] = torch.tensor(sum(isinstance(m, QuantLinear) for m in model.modules()))
        tensors[f"{case}.int8_attention"] = torch.tensor(quantized_attention_mode(model) == "int8")
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out_dir}/rank{rank}.safetensors")


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    checkpoints, single, float_out, n_linear = {}, {}, {}, {}
    for case, (name, _) in CASES.items():
        model = _model(name)
        float_out[case] = forward_output(model, _inputs(name))
        viditq.quantize(model, CONFIG, _calibration(name))
        checkpoints[case] = str(viditq.save_quantized(model, root / case))
        single[case] = forward_output(model, _inputs(name))
        n_linear[case] = len(viditq.checkpoint.quantized_layers(model))
    launch(_forward_worker, WORLD, checkpoints, str(root), device="cpu")
    ranks = [load_file(root / f"rank{r}.safetensors") for r in range(WORLD)]
    return single, float_out, n_linear, ranks


@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_matches_single_process(parallel_run, case):
    single, float_out, n_linear, ranks = parallel_run
    bf16_noise = sqnr_db(single[case], single[case].bfloat16().float())  # rounding the output to bf16 once
    for out in ranks:
        assert out[f"{case}.quant_linears"].item() == n_linear[case]  # QuantLinear survives enable_parallelism
        assert bool(out[f"{case}.int8_attention"])  # and so does 8-bit attention
        assert out[case].shape == single[case].shape
        parallel_vs_single = sqnr_db(single[case], out[case])
        assert parallel_vs_single > bf16_noise, (parallel_vs_single, bf16_noise)
        if case.startswith("cogvideox"):
            # Joint self-attention only: under Ulysses the 8-bit kernel sees the very tensors of the single-process
            # run, so only float summation order differs.
            assert parallel_vs_single > 100, parallel_vs_single
        else:
            # Wan's cross-attention runs per rank on its local queries (diffusers' Wan processor), so the 8-bit
            # kernel's query statistics (channel balance, per-128-query scales) differ: 8-bit-rounding-level noise,
            # below a single bf16 rounding of the output.
            assert parallel_vs_single > 50, parallel_vs_single
    torch.testing.assert_close(ranks[0][case], ranks[1][case], rtol=0, atol=0)  # gathered: identical on all ranks


# ------------------------------------------------------------------------------------------ pipelines
WAN_KW = dict(height=32, width=32, num_frames=5, max_sequence_length=16)  # 2 latent frames x 2 x 2 patches
COG_KW = dict(height=32, width=32, num_frames=9, max_sequence_length=8)  # 3 latent frames x 2 x 2 patches, 8 text
PROMPTS = ["a red circle", "a blue square above a green triangle"]


def _tiny_text_encoder():
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_word_tokenizer()
    return tokenizer, T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=48, d_kv=16, d_ff=96, num_layers=2,
                                              num_heads=3, relative_attention_num_buckets=8)).eval()


def tiny_wan_pipeline(seed: int = 0):
    """A Wan-2.1-shaped text-to-video pipeline (T5 encoder, Wan VAE, Wan transformer) with tiny random weights."""
    import diffusers

    torch.manual_seed(seed)
    tokenizer, text_encoder = _tiny_text_encoder()
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=48, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=32).eval()
    return diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))


def tiny_cogvideox_pipeline(seed: int = 0):
    """A CogVideoX-2B-shaped pipeline (T5 encoder, CogVideoX VAE, transformer) with tiny random weights."""
    import diffusers

    torch.manual_seed(seed)
    tokenizer, text_encoder = _tiny_text_encoder()
    vae = diffusers.AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4).eval()
    return diffusers.CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                       transformer=tiny_model("cogvideox", seed),
                                       scheduler=diffusers.CogVideoXDDIMScheduler())


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    """Quantized (W8A8, INT8 attention) tiny Wan and CogVideoX pipeline directories."""
    root = tmp_path_factory.mktemp("pipelines")
    dirs = {}
    for name, build, kw in (("wan", tiny_wan_pipeline, WAN_KW), ("cogvideox", tiny_cogvideox_pipeline, COG_KW)):
        pipe = build()
        pipe.set_progress_bar_config(disable=True)
        calib = viditq.capture_calibration(pipe, PROMPTS, num_inference_steps=2, **kw)
        viditq.quantize(pipe.transformer, CONFIG, calib)
        dirs[name] = viditq.save_quantized(pipe, root / name)
    return dirs


def test_cli_generate_gpus_matches_single_gpu(pipeline_dirs, tmp_path):
    """`viditq generate --gpus 2` (here: 2 CPU processes) against the in-process single-device generation."""
    import numpy as np
    from typer.testing import CliRunner

    from viditq.cli import app

    wan_dir = pipeline_dirs["wan"]
    (single,) = generate_parallel(wan_dir, PROMPTS[:1], tmp_path / "single.npy", world_size=1, steps=2, seed=3,
                                  pipe_kwargs=WAN_KW, device="cpu")
    parallel = tmp_path / "parallel.npy"
    pipe_args = [a for k, v in WAN_KW.items() for a in ("--pipe-arg", f"{k}={v}")]
    result = CliRunner().invoke(app, ["generate", "--model", str(wan_dir), "--prompt", PROMPTS[0], "--out",
                                      str(parallel), "--steps", "2", "--seed", "3", "--device", "cpu", "--gpus",
                                      str(WORLD), *pipe_args])
    assert result.exit_code == 0, result.output
    a, b = torch.from_numpy(np.load(single)), torch.from_numpy(np.load(parallel))
    assert a.shape == b.shape == (5, 32, 32, 3)  # (frames, H, W, RGB) in [0, 1]
    assert a.std() > 0.01  # not a blank video
    assert sqnr_db(a, b) > 50, sqnr_db(a, b)
    assert (a - b).abs().max() < 2 / 255  # the same 8-bit video up to rounding


def test_cli_generate_gpus_errors(tmp_path):
    from typer.testing import CliRunner

    from viditq.cli import app
    from viditq.testing import tiny_pixart_pipeline

    def error(args):  # typer's error box wraps lines: compare the words
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0
        return re.sub(r"[\s│╭╮╰╯─]+", " ", result.output)

    tiny_pixart_pipeline().save_pretrained(tmp_path / "pixart")
    base = ["generate", "--model", str(tmp_path / "pixart"), "--prompt", "a cat", "--out", str(tmp_path / "x.png")]
    if torch.cuda.device_count() < 64:
        assert "64 GPUs requested" in error([*base, "--gpus", "64"])  # --device auto means CUDA for --gpus > 1
    assert "PixArtTransformer2DModel has no context-parallel plan" in error([*base, "--gpus", "2", "--device", "cpu"])
    assert "must be >= 1" in error([*base, "--gpus", "0"])


def test_capture_calibration_parallel_records_full_inputs(pipeline_dirs):
    # (The quantized CogVideoX pipeline: the capture does not care what the transformer holds.)
    cog_dir = pipeline_dirs["cogvideox"]
    pipe = viditq.load_pipeline(cog_dir)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(5)
    single = viditq.capture_calibration(pipe, PROMPTS, num_inference_steps=2, generator=generator, **COG_KW)
    parallel = capture_calibration_parallel(cog_dir, PROMPTS, WORLD, num_inference_steps=2, seed=5,
                                            pipe_kwargs=COG_KW, device="cpu")
    assert len(parallel) == len(single) == 2  # one record per step (CFG batch of 2 x 2 prompts)
    for i, (rec_s, rec_p) in enumerate(zip(single, parallel)):
        assert rec_p.keys() == rec_s.keys()
        assert rec_p["hidden_states"].shape == rec_s["hidden_states"].shape == (4, 3, 4, 4, 4)  # full, unsharded
        if i == 0:  # step 0: the seeded latents themselves
            torch.testing.assert_close(rec_p["hidden_states"], rec_s["hidden_states"], rtol=0, atol=0)
        else:  # step 1 follows the context-parallel transformer output (exact up to float order for CogVideoX)
            assert sqnr_db(rec_s["hidden_states"], rec_p["hidden_states"]) > 80
        torch.testing.assert_close(rec_p["encoder_hidden_states"], rec_s["encoder_hidden_states"])
        torch.testing.assert_close(rec_p["timestep"], rec_s["timestep"])
