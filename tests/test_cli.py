import numpy as np
import pytest
from typer.testing import CliRunner

from viditq.cli import app
from viditq.testing import tiny_pixart_pipeline

PIPE_ARGS = ["--pipe-arg", "max_sequence_length=16", "--pipe-arg", "use_resolution_binning=false"]


@pytest.fixture(scope="module")
def float_pipeline_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    tiny_pixart_pipeline().save_pretrained(d / "float")
    (d / "prompts.txt").write_text("a red circle\n\na blue square above a green triangle\n")
    return d


def run(*args, columns=400):
    """Invoke the CLI; error boxes are wide enough that messages are not wrapped."""
    env = {"COLUMNS": str(columns), "TERMINAL_WIDTH": str(columns)}
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def tiny_pipeline_dirs(tmp_path_factory):
    """The embedded T2I / T2V pipeline classes (untrained): their __call__ takes no **kwargs, unlike PixArt's."""
    from viditq.models import new_pipeline

    d = tmp_path_factory.mktemp("tiny")
    for kind in ("t2i", "t2v"):
        new_pipeline(kind).save_pretrained(d / kind)
    return d


@pytest.fixture
def no_loading(monkeypatch):
    """Records (instead of doing) every pipeline load of the CLI."""
    from viditq import cli

    loads = []
    monkeypatch.setattr(cli, "_load_any_pipeline", lambda *a: loads.append(a) or pytest.fail("pipeline loaded"))
    return loads


def test_quantize_info_generate(float_pipeline_dir):
    d = float_pipeline_dir
    res = run("quantize", "--model", d / "float", "--preset", "w4a8", "--prompts", d / "prompts.txt",
              "--out", d / "q", "--steps", 2, "--device", "cpu", "--conditioning-bits", 8, "--no-ff-hand-off", *PIPE_ARGS)
    assert res.exit_code == 0, res.output
    assert "smaller" in res.output and (d / "q" / "transformer" / "viditq.json").is_file()
    meta = (d / "q" / "transformer" / "viditq.json").read_text()
    assert '"conditioning_bits": 8' in meta and '"ff_hand_off": false' in meta
    assert "text_encoder: text-embedding cosine" in res.output
    assert (d / "q" / "text_encoder" / "viditq.json").is_file()

    res = run("info", d / "q")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    # the title on lines of its own (short class name), then the layers by precision
    assert str(d / "q" / "transformer") in lines
    assert "PixArtTransformer2DModel, preset w4a8, attention bf16" in lines
    assert "T5EncoderModel, preset w8-weight-only, attention bf16" in lines
    assert "W4A8" in res.output and "W8A16 (weight-only)" in res.output and "W8A8" not in res.output
    assert "text_encoder" in res.output and "vae" in res.output  # per-component memory table

    res = run("generate", "--model", d / "q", "--prompt", "a red circle", "--out", d / "img.png", "--steps", 2,
              "--device", "cpu", *PIPE_ARGS)
    assert res.exit_code == 0, res.output
    import imageio.v3 as iio

    img = iio.imread(d / "img.png")
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8


def test_generate_compile_uses_regional_compilation(float_pipeline_dir, monkeypatch):
    from viditq import compile as regional

    d = float_pipeline_dir
    compiled = []
    real = regional.compile_blocks
    monkeypatch.setattr(regional, "compile_blocks", lambda m: compiled.append(real(m, backend="eager")) or compiled[-1])
    res = run("generate", "--model", d / "float", "--prompt", "a red circle", "--out", d / "c.png", "--steps", 2,
              "--device", "cpu", "--compile", *PIPE_ARGS)
    assert res.exit_code == 0, res.output
    assert compiled == [2] and "compiling 2 transformer blocks" in res.output and (d / "c.png").is_file()


def test_unknown_preset_is_a_clear_error(float_pipeline_dir):
    d = float_pipeline_dir
    res = run("quantize", "--model", d / "float", "--preset", "w3a9", "--prompts", d / "prompts.txt",
              "--out", d / "x")
    assert res.exit_code != 0 and "unknown preset" in res.output
    assert not (d / "x").exists()


def test_bad_conditioning_bits_is_a_clear_error(float_pipeline_dir):
    d = float_pipeline_dir
    res = run("quantize", "--model", d / "float", "--prompts", d / "prompts.txt", "--out", d / "x",
              "--conditioning-bits", 6)
    assert res.exit_code != 0 and "conditioning_bits must be" in res.output
    assert not (d / "x").exists()


@pytest.mark.parametrize("preset,value,message", [("w4a8", 3, "needs gptq=True"),
                                                  ("w4a8-gptq", -1, "gptq_temporal must be")])
def test_bad_gptq_temporal_is_a_clear_error(float_pipeline_dir, preset, value, message):
    d = float_pipeline_dir
    res = run("quantize", "--model", d / "float", "--preset", preset, "--prompts", d / "prompts.txt", "--out",
              d / "x", "--gptq-temporal", value)
    assert res.exit_code != 0 and message in res.output and "--gptq-temporal" in res.output
    assert not (d / "x").exists()


def test_missing_prompt_file(float_pipeline_dir):
    d = float_pipeline_dir
    res = run("quantize", "--model", d / "float", "--prompts", d / "nope.txt", "--out", d / "x")
    assert res.exit_code != 0 and "prompt file not found" in res.output


def test_info_on_a_non_checkpoint(tmp_path):
    res = run("info", tmp_path)
    assert res.exit_code != 0 and "not a viditq checkpoint" in res.output


# --- quantize --out: never destroy what is there --------------------------------------------------------------

def test_quantize_refuses_to_write_over_the_model(float_pipeline_dir, no_loading):
    d = float_pipeline_dir
    for out in (d / "float", d):  # the model directory, and one that holds it
        res = run("quantize", "--model", d / "float", "--prompts", d / "prompts.txt", "--out", out, "--overwrite")
        assert res.exit_code == 2 and "Invalid value for --out" in res.output, res.output
        assert "the --model directory; saving there would delete the float model" in res.output
    assert (d / "float" / "model_index.json").is_file() and not no_loading


def test_quantize_refuses_a_non_checkpoint_out_without_overwrite(float_pipeline_dir, tmp_path, no_loading):
    d = float_pipeline_dir
    (tmp_path / "existing" / "sub").mkdir(parents=True)
    (tmp_path / "existing" / "notes.txt").write_text("important")
    (tmp_path / "file.txt").write_text("important")
    base = ("quantize", "--model", d / "float", "--prompts", d / "prompts.txt")
    res = run(*base, "--out", tmp_path / "existing")
    assert res.exit_code == 2 and "is a non-empty directory that is not a viditq checkpoint" in res.output
    assert "(CLI: --overwrite) to replace it and everything in it" in res.output
    res = run(*base, "--out", tmp_path / "file.txt")
    assert res.exit_code == 2 and "is a file that is not a viditq checkpoint" in res.output
    assert (tmp_path / "existing" / "notes.txt").read_text() == "important"
    assert (tmp_path / "file.txt").read_text() == "important" and not no_loading


@pytest.mark.parametrize("setup", ["overwrite", "checkpoint", "pipeline checkpoint", "empty"])
def test_quantize_out_accepted(float_pipeline_dir, tmp_path, setup, no_loading):
    """--overwrite, an existing viditq checkpoint or an empty directory pass the --out check (the run then stops
    at the missing prompt file, before loading anything)."""
    out = tmp_path / "out"
    out.mkdir()
    extra = []
    if setup == "overwrite":
        (out / "notes.txt").write_text("x")
        extra = ["--overwrite"]
    elif setup == "checkpoint":
        (out / "viditq.json").write_text("{}")
    elif setup == "pipeline checkpoint":
        (out / "viditq_pipeline.json").write_text("{}")
        (out / "model_index.json").write_text('{"_class_name": "X", "transformer": ["viditq", "Q"]}')
        (out / "transformer").mkdir()
    res = run("quantize", "--model", float_pipeline_dir / "float", "--prompts", tmp_path / "none.txt", "--out", out,
              *extra)
    assert res.exit_code == 2 and "prompt file not found" in res.output, res.output
    assert not no_loading


def test_quantize_passes_overwrite_to_save_quantized(float_pipeline_dir, tmp_path, monkeypatch):
    import viditq

    saved = []
    monkeypatch.setattr(viditq, "save_quantized", lambda pipe, out, overwrite=False: saved.append((out, overwrite)))
    monkeypatch.setattr(viditq, "memory_report", lambda pipe: type("R", (), {"table": lambda self: "memory"})())
    monkeypatch.setattr(viditq, "quantize_pipeline",
                        lambda pipe, *a, **k: setattr(pipe, "quantization_report", {"text_embedding_cosine": {}}))
    (tmp_path / "keep.txt").write_text("x")
    d = float_pipeline_dir
    res = run("quantize", "--model", d / "float", "--prompts", d / "prompts.txt", "--out", tmp_path, "--overwrite",
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert saved == [(tmp_path, True)]


# --- simple arguments are checked before anything is loaded ---------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--device", "gpu"], "Invalid value for --device: expected cpu, cuda, cuda:N, auto or another torch device, got 'gpu'"),
    (["--device", "cuda"], "Invalid value for --device: cuda requested but CUDA is not available"),
    (["--device", "cuda:1"], "Invalid value for --device: cuda:1 requested but CUDA is not available"),
    (["--steps", "0"], "Invalid value for '--steps'"),
    (["--pipe-arg", "guidance_scale"], "Invalid value for --pipe-arg: expected key=value, got 'guidance_scale'"),
    (["--pipe-arg", "num_inference_steps=3"], "Invalid value for --pipe-arg: num_inference_steps is set by --steps"),
    (["--pipe-arg", "prompt=x"], "Invalid value for --pipe-arg: prompt is set by --prompts"),
    (["--attention", "int4"], "Invalid value for --attention: attention must be one of"),
])
def test_quantize_checks_arguments_before_loading(float_pipeline_dir, tmp_path, monkeypatch, no_loading, args,
                                                  message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    d = float_pipeline_dir
    res = run("quantize", "--model", d / "float", "--prompts", d / "prompts.txt", "--out", tmp_path / "x", *args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not no_loading and not (tmp_path / "x").exists()


@pytest.mark.parametrize("args,message", [
    (["--device", "tpu"], "Invalid value for --device: expected cpu, cuda, cuda:N, auto or another torch device, got 'tpu'"),
    (["--steps", "0"], "Invalid value for '--steps'"),
    (["--out", "img.jpgg"], "Invalid value for --out: img.jpgg: unknown file suffix '.jpgg'; use an image "
                            "(.png, .jpg, .jpeg, .webp) or a video (.gif, .mp4) suffix"),
    (["--out", "img"], "Invalid value for --out: img: no file suffix"),
    (["--pipe-arg", "num_inference_steps=3"], "Invalid value for --pipe-arg: num_inference_steps is set by --steps"),
    (["--pipe-arg", "generator=3"], "Invalid value for --pipe-arg: generator is set by --seed"),
    (["--pipe-arg", "output_type=pil"], "Invalid value for --pipe-arg: output_type is set by --out"),
])
def test_generate_checks_arguments_before_loading(float_pipeline_dir, no_loading, args, message):
    res = run("generate", "--model", float_pipeline_dir / "float", "--prompt", "a cat", "--out", "img.png", *args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not no_loading


def test_sensitivity_checks_arguments_before_loading(float_pipeline_dir, tmp_path, no_loading):
    d = float_pipeline_dir
    base = ("sensitivity", "--model", d / "float", "--prompts", d / "prompts.txt", "--out", tmp_path / "s")
    assert "Invalid value for --device" in run(*base, "--device", "gpu").output
    assert "Invalid value for '--steps'" in run(*base, "--steps", "0").output
    assert "num_inference_steps is set by --steps" in run(*base, "--pipe-arg", "num_inference_steps=1").output
    assert not no_loading and not (tmp_path / "s").exists()


def test_unknown_pipe_arg_is_rejected_before_quantizing(tiny_pipeline_dirs, tmp_path, monkeypatch):
    import viditq

    monkeypatch.setattr(viditq, "quantize_pipeline", lambda *a, **k: pytest.fail("quantized"))
    (tmp_path / "p.txt").write_text("a red circle\n")
    res = run("quantize", "--model", tiny_pipeline_dirs / "t2i", "--prompts", tmp_path / "p.txt", "--out",
              tmp_path / "q", "--device", "cpu", "--pipe-arg", "guidanc_scale=4")
    assert res.exit_code == 2, res.output
    assert ("Invalid value for --pipe-arg: TinyT2IPipeline takes no argument 'guidanc_scale'; did you mean "
            "guidance_scale?") in res.output
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("kind,out,message", [
    ("t2v", "v.png", "v.png: a video needs a .gif or .mp4 file name"),
    ("t2i", "i.gif", "i.gif: an image needs a .png, .jpg, .jpeg or .webp file name"),
])
def test_generate_checks_out_against_the_pipeline_before_sampling(tiny_pipeline_dirs, tmp_path, monkeypatch, kind,
                                                                  out, message):
    from viditq.models import TinyT2IPipeline, TinyT2VPipeline

    for cls in (TinyT2IPipeline, TinyT2VPipeline):
        monkeypatch.setattr(cls, "denoise", lambda *a, **k: pytest.fail("sampled"))
    res = run("generate", "--model", tiny_pipeline_dirs / kind, "--prompt", "a cat", "--out", tmp_path / out,
              "--device", "cpu")
    assert res.exit_code == 2 and f"Invalid value for --out: {tmp_path / message}" in res.output, res.output


def test_generate_unknown_pipe_arg(tiny_pipeline_dirs, tmp_path):
    res = run("generate", "--model", tiny_pipeline_dirs / "t2v", "--prompt", "a cat", "--out", tmp_path / "v.gif",
              "--device", "cpu", "--pipe-arg", "num_frames=3")
    assert res.exit_code == 2, res.output
    assert "Invalid value for --pipe-arg: TinyT2VPipeline takes no argument 'num_frames'" in res.output


def test_generate_gpus_error_names_the_cli_flag(float_pipeline_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    res = run("generate", "--model", float_pipeline_dir / "float", "--prompt", "a cat", "--out", "x.png",
              "--gpus", 2)
    assert res.exit_code == 2 and "Invalid value for --gpus" in res.output, res.output
    assert "or --device cpu for a CPU (gloo) run" in res.output and "device='cpu'" not in res.output


# --- media ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["img.jpgg", "img", "img.tiff", "img.gif"])
def test_save_media_rejects_unknown_suffixes(tmp_path, name):
    from viditq.media import check_media_path, save_media

    with pytest.raises(ValueError, match=r"an image needs a \.png, \.jpg, \.jpeg or \.webp file name"):
        save_media(np.zeros((4, 4, 3)), tmp_path / name)
    with pytest.raises(ValueError, match=r"a video needs a \.gif or \.mp4 file name"):
        save_media(np.zeros((2, 4, 4, 3)), tmp_path / name.replace("gif", "png"))
    assert not list(tmp_path.iterdir())
    if name != "img.gif":  # suffix alone (the CLI, before sampling)
        with pytest.raises(ValueError, match=r"use an image \(\.png, \.jpg, \.jpeg, \.webp\) or a video "
                                             r"\(\.gif, \.mp4\) suffix"):
            check_media_path(name)


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.jpeg", "a.webp", "a.PNG"])
def test_save_media_image_formats(tmp_path, name):
    import imageio.v3 as iio

    from viditq.media import save_media

    path = save_media(np.full((4, 4, 3), 0.5), tmp_path / name)
    assert iio.imread(path).shape == (4, 4, 3)


# --- presets, info, help -------------------------------------------------------------------------------------

def test_presets_tell_presets_apart_and_never_cut_names():
    from viditq.config import PRESETS

    res = run("presets", columns=60)
    assert res.exit_code == 0, res.output
    names = {line.split()[0] for line in res.output.splitlines() if line.strip()}
    assert set(PRESETS) <= names  # every name whole, at the start of its row
    rows = {line.split()[0]: " ".join(line.split()[1:]) for line in run("presets", columns=300).output.splitlines()
            if line.split() and line.split()[0] in PRESETS}
    assert len(set(rows.values())) == len(PRESETS), rows  # one distinct description per preset
    assert "fp8" in rows["w8a8-fp8"] and "fp8" not in rows["w8a8"] and "int8" in rows["w8a8"]
    assert "GPTQ" in rows["w4a8-gptq"] and "GPTQ" not in rows["w4a8"]
    assert "mixed precision" in rows["w4a8-mp"] and "float activations in the last step" in rows["w8a8-float-last"]


@pytest.fixture(scope="module")
def float_last_checkpoint(tmp_path_factory):
    import viditq
    from viditq.testing import calibration_set, tiny_model

    path = tmp_path_factory.mktemp("ck") / "float-last"
    model = viditq.quantize(tiny_model("pixart"), "w8a8-float-last", calibration_set("pixart", n=2))
    return viditq.save_quantized(model, path)


def test_info_counts_timestep_variants_once(float_last_checkpoint):
    res = run("info", float_last_checkpoint)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert str(float_last_checkpoint) in lines
    assert "PixArtTransformer2DModel, preset w8a8-float-last, attention bf16" in lines
    n = int(next(line for line in lines if "quantized layers" in line).split()[0])
    assert f"{n} quantized layers, {n} with timestep variants" in res.output
    row = lambda name: next(line.split("│")[1:-1] for line in lines if name in line)  # noqa: E731
    assert [c.strip() for c in row("W8A8 ")] == ["W8A8", str(n), "-"]
    assert [c.strip() for c in row("W8A16 (float activations)")] == ["W8A16 (float activations)", "-", str(n)]


def test_info_on_a_corrupt_checkpoint_is_one_line(float_last_checkpoint, tmp_path):
    import shutil

    broken = shutil.copytree(float_last_checkpoint, tmp_path / "broken")
    tensors = broken / "model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:1000])
    res = run("info", broken)
    assert res.exit_code == 2 and "Invalid value for PATH:" in res.output and "truncated or corrupt" in res.output
    assert "Traceback" not in res.output and "precision" not in res.output  # nothing printed before the error


def test_generate_help_and_version(monkeypatch, capsys):
    import re
    import runpy
    import sys
    from importlib.metadata import version

    res = run("generate", "--help")
    text = re.sub(r"[\s│]+", " ", res.output)
    assert "prompt i (from 0) uses seed + i" in text and "Denoising steps." in text
    assert "cpu | cuda | cuda:N | auto" in text
    res = run("--version")
    assert res.exit_code == 0 and res.output.strip() == f"viditq {version('viditq')}"
    monkeypatch.setattr(sys, "argv", ["viditq", "--version"])
    with pytest.raises(SystemExit) as exit_info:  # python -m viditq
        runpy.run_module("viditq", run_name="__main__")
    assert exit_info.value.code in (0, None) and capsys.readouterr().out.strip() == f"viditq {version('viditq')}"


def test_generate_says_how_many_steps_run_float_activations(float_pipeline_dir):
    """A *-float-last checkpoint calibrated with 2 steps and sampled with 6: its range (placed on the calibration
    schedule) covers more than the last step, and generate says how many of the 6 it covered."""
    import viditq
    from viditq.quantize import float_final_range

    d = float_pipeline_dir
    res = run("quantize", "--model", d / "float", "--preset", "w8a8-float-last", "--prompts", d / "prompts.txt",
              "--out", d / "q-last", "--steps", 2, "--device", "cpu", "--text-encoder-bits", 0, *PIPE_ARGS)
    assert res.exit_code == 0, res.output
    res = run("generate", "--model", d / "q-last", "--prompt", "a red circle", "--out", d / "last.png", "--steps", 6,
              "--device", "cpu", *PIPE_ARGS)
    assert res.exit_code == 0, res.output
    pipe = viditq.load_pipeline(d / "q-last")
    lo, hi = float_final_range(pipe.transformer.viditq_config)
    pipe.scheduler.set_timesteps(6)
    expected = sum(lo <= float(t) <= hi for t in pipe.scheduler.timesteps)
    assert 1 < expected < 6
    assert f"w8a8-float-last: float activations in {expected} of 6 steps" in res.output


def test_embedded_writes_a_pipeline_to_try_the_commands_on(tmp_path):
    """`viditq embedded t2i DIR` then `viditq quantize --model DIR --prompts DIR/prompts.txt`: the README's first
    CLI steps work without any other file; an existing non-empty DIR is refused."""
    res = run("embedded", "t2i", tmp_path / "t2i", "--prompts", 3)
    assert res.exit_code == 0, res.output
    prompts = (tmp_path / "t2i" / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 3 and all(prompts)
    res = run("quantize", "--model", tmp_path / "t2i", "--prompts", tmp_path / "t2i" / "prompts.txt", "--out",
              tmp_path / "q", "--steps", 2, "--device", "cpu", "--text-encoder-bits", 0)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "q" / "transformer" / "viditq.json").is_file()
    again = run("embedded", "t2i", tmp_path / "t2i")
    assert again.exit_code == 2 and "exists and is not empty" in again.output
    assert run("embedded", "t2x", tmp_path / "x").exit_code == 2


def test_embedded_never_writes_into_an_existing_directory(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "viditq.json").write_text("{}")  # even a checkpoint: embedded writes a float pipeline
    res = run("embedded", "t2i", tmp_path / "ck")
    assert res.exit_code == 2 and "exists and is not empty" in res.output
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["viditq.json"]
