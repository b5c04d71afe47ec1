"""Whole-pipeline quantization on a PixArt-α-shaped pipeline (tiny T5 encoder, VAE, transformer)."""
import pytest
import torch

import viditq
from viditq.pipeline import embedding_cosine, encode_text
from viditq.testing import sqnr_db, tiny_pixart_pipeline

KW = dict(num_inference_steps=3, max_sequence_length=16, use_resolution_binning=False)
PROMPTS = ["a red circle", "a blue square above a green triangle", "a small yellow cat"]


def generate(pipe, seed=0):
    return pipe("a red circle above a blue square", generator=torch.Generator().manual_seed(seed),
                output_type="pt", **KW).images


@pytest.fixture(scope="module")
def pipelines():
    ref = tiny_pixart_pipeline()
    out = {}
    for bits in (8, 4):
        pipe = tiny_pixart_pipeline()
        out[bits] = viditq.quantize_pipeline(pipe, "w8a8", PROMPTS, text_encoder_bits=bits, **KW)
    return ref, out


def test_text_encoder_is_weight_only_quantized(pipelines):
    _, q = pipelines
    te = q[8].text_encoder
    assert isinstance(te.encoder.block[0].layer[0].SelfAttention.q, viditq.QuantLinear)
    assert te.viditq_config.weight.bits == 8
    assert q[4].text_encoder.viditq_config.weight.bits == 4


def test_text_embeddings_stay_close(pipelines):
    ref, q = pipelines
    cos8 = q[8].quantization_report["text_embedding_cosine"]["text_encoder"]
    cos4 = q[4].quantization_report["text_embedding_cosine"]["text_encoder"]
    assert cos8 > 0.999 and cos4 > 0.98 and cos8 > cos4
    # the report agrees with a fresh measurement
    e_ref = encode_text(ref.text_encoder, ref.tokenizer, PROMPTS, 16)
    e_q = encode_text(q[8].text_encoder, q[8].tokenizer, PROMPTS, 16)
    assert abs(embedding_cosine(e_ref, e_q) - cos8) < 1e-3


def test_generation_stays_close_to_float(pipelines):
    ref, q = pipelines
    assert sqnr_db(generate(ref), generate(q[8])) > 25
    assert sqnr_db(generate(ref), generate(q[8])) > sqnr_db(generate(ref), generate(q[4]))


def test_memory_table_per_component(pipelines):
    _, q = pipelines
    rep = viditq.memory_report(q[4])
    assert set(rep.rows) >= {"transformer", "text_encoder", "vae"}
    before, after = rep.rows["text_encoder"]
    assert after < before / 2  # float32 weights -> int4 (embeddings stay float)
    assert rep.rows["vae"][0] == rep.rows["vae"][1]


def test_pipeline_round_trip_with_quantized_text_encoder(tmp_path, pipelines):
    _, q = pipelines
    viditq.save_quantized(q[4], tmp_path / "pipe")
    loaded = viditq.load_pipeline(tmp_path / "pipe")
    assert isinstance(loaded.text_encoder.encoder.block[0].layer[0].SelfAttention.q, viditq.QuantLinear)
    assert loaded.text_encoder.shared.weight is loaded.text_encoder.encoder.embed_tokens.weight  # tied, as saved
    assert torch.equal(generate(q[4]), generate(loaded))


def test_empty_prompts_rejected():
    with pytest.raises(ValueError, match="at least one"):
        viditq.quantize_pipeline(tiny_pixart_pipeline(), "w8a8", [], **KW)


@pytest.mark.parametrize("mistake, error", [
    (dict(preset="w8a9"), "unknown preset 'w8a9'"),
    (dict(text_encoder_bits=6), "text_encoder_bits must be 8, 4 or None"),
])
def test_mistakes_are_caught_before_the_pipeline_changes(mistake, error):
    """A typo in the preset or the text encoder's bits fails before the text encoder is quantized (the pipeline is
    left as it was, so the corrected call works); a second quantization of the same pipeline is refused."""
    pipe = tiny_pixart_pipeline()
    args = {"preset": "w8a8", "prompts": PROMPTS[:1], **KW, **mistake}
    with pytest.raises(ValueError, match=error):
        viditq.quantize_pipeline(pipe, **args)
    assert not any(isinstance(m, viditq.QuantLinear) for m in pipe.text_encoder.modules())
    assert getattr(pipe.transformer, "viditq_config", None) is None
    viditq.quantize_pipeline(pipe, "w8a8", PROMPTS[:1], **KW)
    with pytest.raises(ValueError, match="transformer, text_encoder already quantized"):
        viditq.quantize_pipeline(pipe, "w8a8", PROMPTS[:1], **KW)


def test_unknown_pipeline_argument_is_caught_first():
    """A misspelled pipeline argument (the embedded pipeline's __call__ names its arguments) fails before the text
    encoder is quantized. (PixArt's __call__ takes **kwargs: there nothing can be checked.)"""
    from viditq.models import load_t2i_pipeline

    pipe = load_t2i_pipeline()
    with pytest.raises(ValueError, match=r"does not take \['guidanc_scale'\]"):
        viditq.quantize_pipeline(pipe, "w8a8", PROMPTS[:1], num_inference_steps=2, guidanc_scale=4.0)
    assert not any(isinstance(m, viditq.QuantLinear) for m in pipe.text_encoder.modules())


def test_embedded_pipeline_quantize_save_load_and_cli(tmp_path):
    """The shipped tiny T2I pipeline (a custom DiffusionPipeline class) round-trips through save/load and the CLI."""
    from typer.testing import CliRunner

    from viditq.cli import app
    from viditq.models import load_t2i_pipeline

    pipe = load_t2i_pipeline()
    pipe.save_pretrained(tmp_path / "float")
    kw = dict(num_inference_steps=2, output_type="pt")
    viditq.quantize_pipeline(pipe, "w8a8", ["a red circle", "a large blue square"], **kw)
    viditq.save_quantized(pipe, tmp_path / "q")
    loaded = viditq.load_pipeline(tmp_path / "q")
    assert type(loaded) is type(pipe)
    gen = lambda p: p("a red circle", generator=torch.Generator().manual_seed(0), **kw).images  # noqa: E731
    assert torch.equal(gen(pipe), gen(loaded))

    (tmp_path / "prompts.txt").write_text("a red circle\n")
    res = CliRunner().invoke(app, ["quantize", "--model", str(tmp_path / "float"), "--preset", "w4a8", "--prompts",
                                   str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "cli"), "--steps", "2",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "cli"), "--prompt", "a red circle", "--out",
                                   str(tmp_path / "img.png"), "--steps", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "img.png").is_file()
