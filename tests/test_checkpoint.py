import dataclasses
import json
import warnings

import pytest
import torch
from torch import nn

import viditq
from viditq.quantize import quantized_layers
from viditq.testing import calibration_set, forward_output, tiny_inputs, tiny_model, tiny_pixart_pipeline


@pytest.fixture(scope="module")
def quantized_pixart():
    presets = {p: p for p in ("w8a8", "w4a8", "w8a8-fp8", "w4a8-fp8")}
    presets["w4a8-fp8-c4"] = dataclasses.replace(viditq.PRESETS["w4a8-fp8"], name="w4a8-fp8-c4", conditioning_bits=4)
    presets["w8a8-fp8-exact-ff"] = dataclasses.replace(viditq.PRESETS["w8a8-fp8"], name="w8a8-fp8-exact-ff",
                                                       ff_hand_off=False)
    return {p: viditq.quantize(tiny_model("pixart"), cfg, calibration_set("pixart", n=2)) for p, cfg in presets.items()}


@pytest.mark.parametrize("preset", ["w8a8", "w4a8", "w8a8-fp8", "w4a8-fp8", "w4a8-fp8-c4", "w8a8-fp8-exact-ff"])
def test_round_trip_is_bit_identical(tmp_path, quantized_pixart, preset):
    model = quantized_pixart[preset]
    viditq.save_quantized(model, tmp_path / "ckpt")
    loaded = viditq.load_quantized(tmp_path / "ckpt")  # rebuilt from the saved diffusers config
    x = tiny_inputs("pixart", seed=7)
    assert torch.equal(forward_output(model, x), forward_output(loaded, x))
    # derived buffers (the staged int4's per-channel scale) are recomputed on load, not saved
    stage = {n: b for n, b in model.named_buffers() if n.endswith("stage_scale")}
    assert (len(stage) > 0) == preset.startswith("w4")
    assert all(torch.equal(b, dict(loaded.named_buffers())[n]) for n, b in stage.items())
    assert loaded.viditq_config == model.viditq_config
    assert type(loaded) is type(model)
    hand_offs = [sum(type(m).__name__ == "FusedFeedForward" for m in mod.modules()) for mod in (model, loaded)]
    assert hand_offs[0] == hand_offs[1] and (hand_offs[0] > 0) == (preset in ("w8a8-fp8", "w4a8-fp8", "w4a8-fp8-c4"))


def test_tensor_dtype_must_match_the_layer_spec(tmp_path, quantized_pixart):
    """A spec saying fp8 over int8 codes (an edited viditq.json) is refused, not silently cast."""
    viditq.save_quantized(quantized_pixart["w8a8"], tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "viditq.json"
    meta = json.loads(meta_path.read_text())
    name = "transformer_blocks.0.ff.net.2"
    meta["layers"][name]["fp8"] = True
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"{name}.weight_codes.*torch.int8.*float8_e4m3fn"):
        viditq.load_quantized(tmp_path / "ckpt")


def test_no_pickle_and_layout(tmp_path, quantized_pixart):
    viditq.save_quantized(quantized_pixart["w8a8"], tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model.safetensors", "viditq.json"]
    meta = json.loads((tmp_path / "ckpt" / "viditq.json").read_text())
    assert meta["format_version"] == 1 and meta["quant_config"]["name"] == "w8a8"
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


def test_checkpoint_size_reflects_bit_width(tmp_path):
    """W4 (g64) weights ≈ 1/4 of 16-bit weights plus scales, W8 ≈ 1/2; measured on the quantized layers."""
    torch.manual_seed(0)
    calib = [{"x": torch.randn(8, 512)}]
    sizes = {}
    for preset in ("w8a8", "w4a8"):
        model = nn.Sequential(nn.Linear(512, 1024, bias=False), nn.Linear(1024, 512, bias=False)).to(torch.bfloat16)

        class Wrap(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x.to(torch.bfloat16))

        wrapped = viditq.quantize(Wrap(model), preset, calib)
        viditq.save_quantized(wrapped, tmp_path / preset)
        sizes[preset] = (tmp_path / preset / "model.safetensors").stat().st_size
    bf16_bytes = 2 * (512 * 1024 * 2)
    # W8: int8 codes + fp32 per-channel scales + smoothing/rotation vectors
    assert 0.49 < sizes["w8a8"] / bf16_bytes < 0.53
    # W4 g64: 4 bits + fp16 scale and int8 zero per 64 weights = 4.375 bits -> 0.273
    assert 0.26 < sizes["w4a8"] / bf16_bytes < 0.29


def test_memory_report(quantized_pixart):
    rep = viditq.memory_report(quantized_pixart["w4a8"])
    quant_rows = {k: v for k, v in rep.rows.items() if k.startswith("W4")}
    assert quant_rows
    before, after = next(iter(quant_rows.values()))
    assert 5.0 < before / after < 7.4  # float32 weights: 32 bits -> 4.375 bits, plus bias/rotation vectors
    assert rep.total_after < rep.total_before
    assert "total" in rep.table()
    float_rep = viditq.memory_report(tiny_model("pixart"))
    assert float_rep.total_before == float_rep.total_after == rep.total_before
    kinds = {k for k in viditq.memory_report(quantized_pixart["w8a8-fp8"]).rows if "kept" not in k}
    assert kinds == {"fp8 e4m3 per-channel sym"}  # (not labelled as int8)


def test_generic_module_needs_model_argument(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(x)

    torch.manual_seed(0)
    model = viditq.quantize(Net(), "w8a8", [{"x": torch.randn(4, 32)}])
    viditq.save_quantized(model, tmp_path / "net")
    with pytest.raises(ValueError, match="model=") as err:
        viditq.load_quantized(tmp_path / "net")
    assert "cannot be rebuilt" in str(err.value) or "cannot import" in str(err.value)
    torch.manual_seed(1)
    loaded = viditq.load_quantized(tmp_path / "net", model=Net())
    x = torch.randn(3, 32)
    assert torch.equal(model(x), loaded(x))


def test_checkpoint_from_another_model_is_rejected(tmp_path, quantized_pixart):
    viditq.save_quantized(quantized_pixart["w8a8"], tmp_path / "ckpt")
    with pytest.raises(ValueError, match="does not match the model"):
        viditq.load_quantized(tmp_path / "ckpt", model=tiny_model("sd3"))


def test_truncated_file_is_rejected(tmp_path, quantized_pixart):
    viditq.save_quantized(quantized_pixart["w8a8"], tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        viditq.load_quantized(tmp_path / "ckpt")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a viditq checkpoint"):
        viditq.load_quantized(tmp_path)


def test_saving_a_float_model_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        viditq.save_quantized(tiny_model("pixart"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, quantized_pixart, monkeypatch):
    viditq.save_quantized(quantized_pixart["w8a8"], tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("viditq.checkpoint.save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        viditq.save_quantized(quantized_pixart["w4a8"], tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_pipeline_round_trip_generates_identical_images(tmp_path):
    pipe = tiny_pixart_pipeline()
    kw = dict(num_inference_steps=3, max_sequence_length=16, use_resolution_binning=False, output_type="np")
    calib = viditq.capture_calibration(pipe, ["a red circle", "a blue square"], **kw)
    assert len(calib) == 3 and calib[0]["hidden_states"].shape[0] == 4  # 2 prompts x 2 CFG branches
    viditq.quantize(pipe.transformer, "w4a8", calib)
    viditq.save_quantized(pipe, tmp_path / "pipe")
    assert "viditq.load_pipeline" in (tmp_path / "pipe" / "README.md").read_text()  # (diffusers alone cannot)
    loaded = viditq.load_pipeline(tmp_path / "pipe")
    assert loaded.transformer.viditq_config.name == "w4a8"

    def gen(p):
        return p("a red circle", generator=torch.Generator().manual_seed(0), **kw).images

    assert (gen(pipe) == gen(loaded)).all()


def test_round_trip_keeps_shared_input_groups(tmp_path, quantized_pixart):
    model = quantized_pixart["w8a8"]
    viditq.save_quantized(model, tmp_path / "ckpt")
    loaded = viditq.load_quantized(tmp_path / "ckpt")
    attn = loaded.transformer_blocks[1].attn1
    assert attn.to_q.spec.input_group == "transformer_blocks.1.attn1.to_q+to_k+to_v"
    assert attn.to_q._input_cache is attn.to_k._input_cache is attn.to_v._input_cache is not None
    x = tiny_inputs("pixart", seed=8)
    assert torch.equal(forward_output(model, x), forward_output(loaded, x))


def test_float_activation_ranges_round_trip_bit_identically(tmp_path):
    """A16 ranges on a stored W4/W8 variant (no copy), a stored weight-only W8 variant, and a kept layer: saved,
    loaded, outputs bit-identical in every range; the float-activation keys are in viditq.json, and the loaded
    model stores exactly the tensors of the saved one."""
    from viditq.config import BalanceSpec, LayerRule, QuantConfig
    from viditq.layers import TimestepSwitchLinear

    base = viditq.PRESETS["w4a8"]
    cfg = QuantConfig("a16", base.weight, base.act, BalanceSpec(alphas=(0.5,)), calib_rows_per_layer=128, rules=(
        LayerRule(r"transformer_blocks\.0\.attn1", weight_bits=8, timesteps=(0, 600)),
        LayerRule(r"transformer_blocks\.1\.ff", weight_bits=8, act_bits=16, timesteps=(0, 300)),
        LayerRule(".*", act_bits=16, timesteps=(0, 300))))
    model = viditq.quantize(tiny_model("pixart"), cfg, calibration_set("pixart", n=2))
    viditq.save_quantized(model, tmp_path / "ck")
    loaded = viditq.load_quantized(tmp_path / "ck")
    outputs = {}
    for t in (100, 450, 900):  # A16 on W8 (attn1) / W4 (others) | W8A8 attn1 | W4A8
        x = tiny_inputs("pixart", seed=3)
        x["timestep"] = torch.full((2,), t)
        outputs[t] = forward_output(model, x)
        assert torch.equal(outputs[t], forward_output(loaded, x))
    assert not torch.equal(outputs[100], outputs[450])
    attn = loaded.get_submodule("transformer_blocks.0.attn1.to_q")
    assert isinstance(attn, TimestepSwitchLinear) and set(attn.variants) == {"w4a8", "w8a8"}
    assert attn.float_act == {"w8a16": "w8a8"}
    ff = loaded.get_submodule("transformer_blocks.1.ff.net.0.proj")
    assert set(ff.variants) == {"w4a8", "w8a16"} and ff.variants["w8a16"].spec.weight_only and not ff.float_act
    assert type(loaded.proj_out) is nn.Linear  # kept layers stay float in the A16 range
    meta = json.loads((tmp_path / "ck" / "viditq.json").read_text())
    assert meta["switch_layers"]["transformer_blocks.0.attn1.to_q"]["float_act"] == {"w8a16": "w8a8"}
    assert viditq.memory_report(loaded).total_after == viditq.memory_report(model).total_after
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def _wan_with_float32_modules():
    """A bf16 Wan as diffusers' ``from_pretrained(torch_dtype=torch.bfloat16)`` builds it: its
    ``_keep_in_fp32_modules`` (norms, time embedding, modulation table) stay float32."""
    model = tiny_model("wan").to(torch.bfloat16)
    for name, p in model.named_parameters():
        if any(k in name.split(".") for k in model._keep_in_fp32_modules):
            p.data = p.data.float()
    model.rope = tiny_model("wan").rope  # (its rotary tables too: computed at init in float32, not saved)
    return model


def _bf16(kwargs):
    return {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}


@pytest.mark.parametrize("conditioning_bits", [None, 8])
def test_mixed_dtype_model_round_trips(tmp_path, conditioning_bits):
    """Every tensor of a bf16 Wan with its float32 modules comes back in its saved dtype; outputs bit-identical.
    With weight-only conditioning layers the time embedding stays float (diffusers keeps it in float32, and Wan's
    forward reads its parameters' dtype: quantized, it had none), its projection to the modulation is quantized."""
    model = _wan_with_float32_modules()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert torch.float32 in dtypes.values() and torch.bfloat16 in dtypes.values()
    config = dataclasses.replace(viditq.PRESETS["w8a8"], conditioning_bits=conditioning_bits)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        viditq.quantize(model, config, [_bf16(kw) for kw in calibration_set("wan", n=2)])
    said = [str(w.message) for w in caught if "_keep_in_fp32_modules" in str(w.message)]
    assert bool(said) == (conditioning_bits is not None) and all("time_embedder.linear_1" in m for m in said)
    quantized = set(quantized_layers(model))
    assert not any("time_embedder" in name for name in quantized)
    assert ("condition_embedder.time_proj" in quantized) == (conditioning_bits is not None)
    viditq.save_quantized(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "viditq.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["layer_dtypes"] == {}
    loaded = viditq.load_quantized(tmp_path / "ck")
    assert {n: t.dtype for n, t in loaded.state_dict().items()} == {n: t.dtype for n, t in model.state_dict().items()}
    assert {n: b.dtype for n, b in loaded.named_buffers()} == {n: b.dtype for n, b in model.named_buffers()}
    x = _bf16(tiny_inputs("wan", seed=3))
    assert torch.equal(forward_output(model, x), forward_output(loaded, x))


def test_save_refuses_to_replace_what_is_not_a_checkpoint(tmp_path, quantized_pixart):
    """A non-empty directory or a file at the path (the float model's own folder, say) is kept, with an error
    naming ``overwrite``; an empty directory and an earlier checkpoint are written over; overwrite=True replaces."""
    model = quantized_pixart["w8a8"]
    other = tmp_path / "float_model"
    other.mkdir()
    (other / "diffusion_pytorch_model.safetensors").write_bytes(b"float weights")
    with pytest.raises(FileExistsError, match="not a viditq checkpoint.*overwrite"):
        viditq.save_quantized(model, other)
    assert (other / "diffusion_pytorch_model.safetensors").read_bytes() == b"float weights"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        viditq.save_quantized(model, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    viditq.save_quantized(model, tmp_path / "empty")
    viditq.save_quantized(quantized_pixart["w4a8"], tmp_path / "empty")  # a checkpoint: replaced
    assert viditq.load_quantized(tmp_path / "empty").viditq_config.name == "w4a8"
    (tmp_path / "empty" / "notes.txt").write_text("mine")  # a checkpoint with a file of the user's: kept
    with pytest.raises(FileExistsError, match="not a viditq checkpoint alone"):
        viditq.save_quantized(model, tmp_path / "empty")
    assert (tmp_path / "empty" / "notes.txt").read_text() == "mine"
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(ValueError, match="symbolic link"):
        viditq.save_quantized(model, tmp_path / "link")
    viditq.save_quantized(model, other, overwrite=True)
    assert sorted(p.name for p in other.iterdir()) == ["config.json", "model.safetensors", "viditq.json"]
    with pytest.raises(ValueError, match="current directory"):
        viditq.save_quantized(model, ".")


def test_loaders_point_to_each_other(tmp_path, quantized_pixart):
    viditq.save_quantized(quantized_pixart["w8a8"], tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="use viditq.load_quantized"):
        viditq.load_pipeline(tmp_path / "ckpt")


class _TwoDtypes(nn.Module):
    """A bf16 layer feeding a float32 one (a module kept in float32 by hand)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(64, 64).bfloat16()
        self.b = nn.Linear(64, 32)

    def forward(self, x):
        return self.b(self.a(x).float())


def test_quantized_layer_keeps_its_own_float_dtype(tmp_path):
    """A quantized layer in a float32 part of a bf16 model is saved with its output dtype (``layer_dtypes``) and
    loads back with it: same dtypes, bit-identical output."""
    config = dataclasses.replace(viditq.PRESETS["w8a8"], keep_fp=())
    calib = [{"x": torch.randn(16, 64, generator=torch.Generator().manual_seed(i)).bfloat16()} for i in range(2)]
    model = viditq.quantize(_TwoDtypes(), config, calib)
    viditq.save_quantized(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "viditq.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["layer_dtypes"] == {"b": "float32"}  # (64 x 64 bf16 weights, 64 x 32 fp32)
    loaded = viditq.load_quantized(tmp_path / "ck", model=_TwoDtypes())
    assert loaded.a.float_dtype == torch.bfloat16 and loaded.b.float_dtype == torch.float32
    assert {n: t.dtype for n, t in loaded.state_dict().items()} == {n: t.dtype for n, t in model.state_dict().items()}
    x = calib[0]["x"]
    assert torch.equal(model(x), loaded(x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_load_names_an_unusable_device(tmp_path, quantized_pixart):
    viditq.save_quantized(quantized_pixart["w8a8"], tmp_path / "ckpt")
    with pytest.raises(ValueError, match="CUDA is not available"):
        viditq.load_quantized(tmp_path / "ckpt", device="cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        viditq.load_quantized(tmp_path / "ckpt", device="gpu")


def test_loading_builds_no_float_weights(tmp_path, quantized_pixart, monkeypatch):
    """The model is rebuilt with its parameters on the meta device (no float copy of the weights, no random init:
    a float T5-XXL built first would take 19 GB) and its computed buffers real (PixArt's position table is not in
    the checkpoint); the loaded model holds no meta tensor and gives the saved model's output."""
    from viditq.checkpoint import _without_weights

    built = _without_weights(lambda: tiny_model("pixart"))
    assert all(p.is_meta for p in built.parameters())
    assert not any(b.is_meta for b in built.buffers()) and any(True for _ in built.buffers())
    viditq.save_quantized(quantized_pixart["w8a8"], tmp_path / "ckpt")
    inits = []
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda t, *a, **k: inits.append(t.is_meta) or t)
    loaded = viditq.load_quantized(tmp_path / "ckpt")
    assert inits and all(inits)  # (nn.Linear's init ran on meta tensors only)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    x = tiny_inputs("pixart", seed=5)
    assert torch.equal(forward_output(quantized_pixart["w8a8"], x), forward_output(loaded, x))


class _SharedMemory(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e1, self.e2, self.lin = nn.Embedding(10, 16), nn.Embedding(10, 16), nn.Linear(16, 16)
        self.e2.weight = nn.Parameter(self.e1.weight.data)  # (same memory, another Parameter object)

    def forward(self, ids):
        return self.lin(self.e1(ids) + self.e2(ids))


def test_weights_sharing_memory_load_as_saved(tmp_path):
    """Two parameters over one memory are saved once and both filled on load (with ``model=``)."""
    calib = [{"ids": torch.arange(10)[None].repeat(4, 1)}]
    model = viditq.quantize(_SharedMemory(), dataclasses.replace(viditq.PRESETS["w8a8"], keep_fp=()), calib)
    viditq.save_quantized(model, tmp_path / "ck")
    loaded = viditq.load_quantized(tmp_path / "ck", model=_SharedMemory())
    assert torch.equal(model(**calib[0]), loaded(**calib[0]))
