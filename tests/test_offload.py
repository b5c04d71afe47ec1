"""Model CPU offload (diffusers ``enable_model_cpu_offload``, accelerate ``CpuOffload`` hooks) on quantized pipelines.

On the CPU the hooks run the whole flow (execution device ``cpu:0``, nothing really moves); the device moves of
quantized modules are checked by sending them to the ``meta`` device through the same hook. On CUDA,
``benchmarks/check_offload.py`` runs for real.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import viditq
from viditq.calibrate import model_device as execution_device
from viditq.pipeline import encode_text, quantize_weights_only
from viditq.testing import calibration_set, tiny_model, tiny_pixart_pipeline

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def quantized_modules():
    transformer = viditq.quantize(tiny_model("pixart"), "w4a8", calibration_set("pixart"))
    text_encoder = quantize_weights_only(tiny_pixart_pipeline().text_encoder, bits=8)
    return {"transformer": transformer, "text_encoder": text_encoder}


def test_offload_flow_on_cpu_matches_resident_generation(benchmark_script):
    pytest.importorskip("accelerate")
    res = benchmark_script("check_offload").check_pipeline("pixart_tiny", "cpu", torch.float32, steps=2)
    assert res["ok"], res
    assert res["hooks"] == {"text_encoder": "CpuOffload", "vae": "CpuOffload", "transformer": "CpuOffload"}
    assert res["quantized_layers"]["text_encoder"] == 12 and res["quantized_layers"]["transformer"] > 0
    for key in ("offload", "offload_second_call", "offload_then_quantize"):
        assert res[key]["identical"] and res[key]["max_abs_diff"] == 0.0, key
    # every QuantLinear ran (text encoder: 2 encodes x 12 layers; transformer: 2 steps x its layers)
    assert res["offload"]["layer_calls"] == res["offload_second_call"]["layer_calls"] > 24
    assert res["text_embedding_cosine"]["text_encoder"] > 0.999


@pytest.mark.parametrize("name", ["transformer", "text_encoder"])
def test_offload_hook_moves_every_quantized_tensor(name, quantized_modules):
    """CpuOffload.pre_forward moves the whole component with module.to(device): packed codes, scales, zero
    points, smoothing and rotation vectors go along and keep their dtypes; the meta ``weight`` stand-in follows
    the float dtype. Sent to ``meta`` here (a second device on a CPU-only machine)."""
    accelerate = pytest.importorskip("accelerate")
    import copy

    module = copy.deepcopy(quantized_modules[name])
    layers = [m for m in module.modules() if isinstance(m, viditq.QuantLinear)]
    assert layers
    dtypes = {id(m): {k: b.dtype for k, b in m.named_buffers()} for m in layers}
    assert next(module.parameters(), None) is not None  # accelerate reads the device of the first parameter
    _, hook = accelerate.cpu_offload_with_hook(module, execution_device="meta")
    assert execution_device(module) == torch.device("meta")  # what encode_text uses
    hook.hook.pre_forward(module)
    assert {t.device.type for t in list(module.parameters()) + list(module.buffers())} == {"meta"}
    for m in layers:
        assert {k: b.dtype for k, b in m.named_buffers()} == dtypes[id(m)]
        assert m.weight_codes.dtype in (torch.int8, torch.uint8)
        assert m.weight.device.type == "meta" and m.weight.dtype == m.float_dtype == torch.float32
    hook.remove()
    assert not hasattr(module, "_hf_hook")


def test_dtype_cast_keeps_quantized_tensors(quantized_modules):
    """pipe.to(torch.bfloat16) (DiffusionPipeline.to → module.to(device, dtype)): codes, scales, zero points and
    balancing vectors keep their dtypes; the bias and the float stand-in follow the model."""
    import copy

    module = copy.deepcopy(quantized_modules["transformer"])
    layers = [m for m in module.modules() if isinstance(m, viditq.QuantLinear)]
    before = [{k: b.dtype for k, b in m.named_buffers() if k != "bias"} for m in layers]
    module.to("cpu", torch.bfloat16)
    assert [{k: b.dtype for k, b in m.named_buffers() if k != "bias"} for m in layers] == before
    assert {before[0]["weight_codes"], before[0]["weight_zero"]} == {torch.uint8, torch.int8}  # packed int4, asym
    for m in layers:
        assert m.float_dtype == m.weight.dtype == torch.bfloat16
        assert m.bias is None or m.bias.dtype == torch.bfloat16


def test_execution_device_and_encode_text_without_hooks(quantized_modules):
    te = quantized_modules["text_encoder"]
    assert execution_device(te) == torch.device("cpu")
    assert execution_device(torch.nn.Module()) == torch.device("cpu")
    buffers_only = torch.nn.Module()
    buffers_only.register_buffer("x", torch.zeros(1, device="meta"))
    assert execution_device(buffers_only) == torch.device("meta")
    tok = tiny_pixart_pipeline().tokenizer
    out = encode_text(te, tok, ["a red circle", "a blue square above a green triangle"], 8)
    assert out.shape == (2, 8, 48) and out.device.type == "cpu"
    assert (out[0, 3:] == 0).all() and (out[0, :3] != 0).any()  # "a red circle" + eos: padding zeroed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_check_offload_script_on_cuda(tmp_path):
    pytest.importorskip("accelerate")
    out = tmp_path / "offload.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_offload.py"), "--out", str(out),
                           "--steps", "4"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert not res["errors"], res["errors"]
    assert {r["pipeline"] for r in res["runs"]} == {"embedded_t2i", "pixart_tiny"}
    for r in res["runs"]:
        assert r["ok"], r
        assert r["offload"]["devices_seen_by_layers"] == ["cuda"]
        assert r["offload"]["max_abs_diff"] < 1e-2 and r["offload_then_quantize"]["max_abs_diff"] < 1e-2
        # weights leave the GPU between calls: what stays allocated is far below the resident pipeline's
        assert r["offload"]["allocated_after"] < r["resident"]["allocated_after"]


def test_calibration_replay_follows_the_offload_hook():
    """With model CPU offload the hook moves the module, not keyword inputs, to the accelerator: replaying
    calibration kwargs (quantizing an offloaded pipeline) must send them to the hook's device, not to the device
    the module sits on between calls (the GPU run of benchmarks/check_offload.py failed on this)."""
    accelerate = pytest.importorskip("accelerate")
    from viditq.calibrate import run_calibration

    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(next(m.parameters()).device.type))

    class KwargsModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, hidden_states):
            return self.inner(hidden_states)

    wrapped = KwargsModel()
    _, hook = accelerate.cpu_offload_with_hook(wrapped, execution_device="meta")  # "meta": a second device
    assert next(wrapped.parameters()).device.type == "cpu"
    run_calibration(wrapped, [{"hidden_states": torch.randn(2, 8)}])
    assert seen == ["meta"]
    hook.remove()
