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


def run(*args):
    """Invoke the CLI; error boxes are wide enough that messages are not wrapped."""
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})


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
    assert "w4a8" in res.output and "W4A8" in res.output
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
