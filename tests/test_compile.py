"""Regional compilation (viditq.compile_blocks) on float and quantized diffusers models."""
import pytest
import torch
from torch import nn

import viditq
from viditq.compile import repeated_blocks
from viditq.testing import calibration_set, forward_output, tiny_inputs, tiny_model


def test_repeated_blocks_are_the_transformer_blocks():
    model = tiny_model("pixart")
    assert repeated_blocks(model) == list(model.transformer_blocks)
    with pytest.raises(ValueError, match="no nn.ModuleList of repeated blocks"):
        viditq.compile_blocks(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("preset,blocks,most_graphs", [(None, 4, 2), ("w8a8-fp8", 3, 3), ("w8a8-fp8 unbalanced", 4, 2)])
def test_compiled_blocks_match_eager_and_share_graphs(preset, blocks, most_graphs):
    """The blocks share their compiled code: block 0 (its input has the patch embedding's strides) and one more
    graph for the contiguous input of the other blocks; a quantized block whose layers chose other balancing
    (a smoothing vector or not) needs its own — but alike blocks share (per-layer values such as the
    feed-forward hand-off's bound are tensors, not constants the graphs specialize on)."""
    from torch._dynamo.utils import counters

    model = tiny_model("pixart", num_layers=blocks)
    if preset:
        import dataclasses

        config = viditq.PRESETS["w8a8-fp8"]
        if preset.endswith("unbalanced"):  # the blocks' layers all alike: one graph after block 0's
            config = dataclasses.replace(config, balance=None)
        viditq.quantize(model, config, calibration_set("pixart", n=1))
    x = tiny_inputs("pixart", seed=5)
    eager = forward_output(model, x)
    torch._dynamo.reset()
    counters.clear()
    assert viditq.compile_blocks(model, backend="eager") == blocks
    assert torch.equal(forward_output(model, x), eager)
    assert 2 <= counters["stats"]["unique_graphs"] <= most_graphs


def test_compiled_timestep_switching_recompiles_per_precision_not_per_step():
    """A timestep-switching model (float activations in the last step) under regional compilation: the blocks
    guard on the active precision only, so ten timesteps in two precision ranges give the graphs of two
    precisions, and each step's output equals eager."""
    from torch._dynamo.utils import counters

    model = tiny_model("pixart", num_layers=2)
    viditq.quantize(model, "w8a8-float-last", calibration_set("pixart", n=1))
    steps = [999.0 - 111.0 * i for i in range(10)]  # 999 ... 0: the last two fall in the float-activation range
    inputs = [tiny_inputs("pixart", seed=5) | {"timestep": torch.full((2,), t)} for t in steps]
    eager = [forward_output(model, x) for x in inputs]
    torch._dynamo.reset()
    counters.clear()
    viditq.compile_blocks(model, backend="eager")
    for x, ref in zip(inputs, eager):
        assert torch.equal(forward_output(model, x), ref)
    graphs = counters["stats"]["unique_graphs"]
    counters.clear()
    for x in inputs[:3]:
        forward_output(model, x)
    assert counters["stats"]["unique_graphs"] == 0  # nothing new once both precisions were seen
    assert 2 <= graphs <= 4  # two precisions x (block 0's input strides, the other blocks')


def test_compiled_blocks_quantize_a_shared_input_once(monkeypatch):
    """q, k and v (and the cross-attention's k and v) read one input: compiled code quantizes it once per group,
    as eager does (the SharedInputCache is resolved at trace time), not once per layer — and matches eager."""
    from viditq.kernels import dispatch

    model = tiny_model("pixart", num_layers=2)
    viditq.quantize(model, "w8a8", calibration_set("pixart", n=1))
    calls = []
    real = dispatch.quantize_activation
    monkeypatch.setattr(dispatch, "quantize_activation", lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    x = tiny_inputs("pixart", seed=5)
    eager = forward_output(model, x)
    eager_calls = len(calls)
    assert eager_calls == 2 * 7  # per block: shared q/k/v, o, cross q, shared cross k/v, cross o, FF up, FF down
    torch._dynamo.reset()
    viditq.compile_blocks(model, backend="eager")
    forward_output(model, x)  # compiles; Dynamo replays the list appends (a side effect) on every call
    calls.clear()
    assert torch.equal(forward_output(model, x), eager)
    assert len(calls) == eager_calls


def test_compiled_blocks_quantize_in_the_norm_kernel(monkeypatch):
    """Compiled PixArt blocks keep the norm kernel's quantization of the q/k/v and feed-forward inputs (the
    custom op primes the layers' input caches at trace time) and the residuals added in the GEMM epilogues: the
    same calls and output as eager."""
    import dataclasses

    from viditq import fusion
    from viditq.config import BalanceSpec
    from viditq.kernels import dispatch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("pixart", num_layers=2)
    viditq.quantize(model, dataclasses.replace(viditq.PRESETS["w8a8-fp8"], balance=BalanceSpec(rotate=False)),
                    calibration_set("pixart", n=1))
    model.to(device)
    monkeypatch.setattr(fusion, "_fusable", lambda t: True)  # the kernels (the interpreter on CPU)
    calls = []
    real = dispatch.quantize_activation
    monkeypatch.setattr(dispatch, "quantize_activation", lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    x = {k: v.to(device) if torch.is_tensor(v) else v for k, v in tiny_inputs("pixart", seed=5).items()}
    eager = forward_output(model, x)
    eager_calls = len(calls)
    assert eager_calls == 2 * 4  # per block: o, cross q, shared cross k/v, cross o (FF down: the FF-up epilogue)
    torch._dynamo.reset()
    viditq.compile_blocks(model, backend="eager")
    residuals = []
    real_linear = dispatch.int_linear
    monkeypatch.setattr(dispatch, "int_linear", lambda *a: residuals.append(a[11] is not None) or real_linear(*a))
    forward_output(model, x)  # traced: the residual hand-over to the epilogue resolves at trace time
    assert sum(residuals) == 2 * 3  # per block: self- and cross-attention output projections, FF down
    calls.clear()
    assert torch.equal(forward_output(model, x), eager)
    assert len(calls) == eager_calls


@pytest.mark.parametrize("attention", [None, "fp8"])
def test_compiled_cogvideox_blocks_quantize_in_the_norm_kernel(monkeypatch, attention):
    """Compiled CogVideoX blocks keep the joint norm kernel (text and video tokens in one launch, through the
    custom op with its prefix arguments) priming q/k/v's and the feed-forward's input caches, and 8-bit
    attention with its q / k norms as arguments: the same quantization calls and output as eager."""
    import dataclasses

    from torch._dynamo.utils import counters

    from viditq import fusion
    from viditq.config import BalanceSpec
    from viditq.kernels import dispatch, norm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("cogvideox", num_layers=2)
    viditq.quantize(model, dataclasses.replace(viditq.PRESETS["w8a8-fp8"], balance=BalanceSpec(rotate=False)),
                    calibration_set("cogvideox", n=1))
    assert fusion.fuse_cogvideox_blocks(model) == 2
    if attention:
        from viditq.attention import apply_quantized_attention

        apply_quantized_attention(model, attention, min_kv_tokens=0)
    model.to(device)
    monkeypatch.setattr(fusion, "_fusable", lambda t: True)  # the kernels (the interpreter on CPU)
    calls, norms = [], []
    real = dispatch.quantize_activation
    monkeypatch.setattr(dispatch, "quantize_activation", lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    real_norm = norm.layer_norm_modulate_quant
    monkeypatch.setattr(norm, "layer_norm_modulate_quant", lambda *a, **k: norms.append(1) or real_norm(*a, **k))
    x = {k: v.to(device) if torch.is_tensor(v) else v for k, v in tiny_inputs("cogvideox", seed=5).items()}
    eager = forward_output(model, x)
    eager_calls = len(calls)
    assert len(norms) == 2 * 2
    torch._dynamo.reset()
    counters.clear()
    viditq.compile_blocks(model, backend="eager")
    forward_output(model, x)  # compiles
    assert not counters["graph_break"]  # the joint norm, attention and residuals in one graph per block
    calls.clear(), norms.clear()
    assert torch.equal(forward_output(model, x), eager)
    assert len(calls) == eager_calls and len(norms) == 2 * 2


@pytest.mark.parametrize("preset", ["w4a8-fp8", "w4a8"])
def test_blocks_stage_their_packed_int4_weights_in_one_launch(monkeypatch, preset):
    """A W4 block stages its layers' packed int4 weights in one launch before it runs (``WeightStaging``), not one
    per layer: the layers take those codes, no layer stages its own, nothing stays alive after the block, and
    the output equals per-layer staging exactly — eager and in compiled blocks (the custom op)."""
    from viditq.kernels import dispatch, int_gemm
    from viditq.layers import QuantLinear

    model = tiny_model("pixart", num_layers=2)
    viditq.quantize(model, preset, calibration_set("pixart", n=1))
    stagings = [b._viditq_weight_staging for b in model.transformer_blocks]
    assert all(s is not None for s in stagings)
    packed = [m for m in model.transformer_blocks[0].modules() if isinstance(m, QuantLinear) and m.spec.packed_int4]
    per_block = len(packed)
    kinds = len({(m.weight_zero is not None, m.spec.group_size == m.spec.in_features) for m in packed})
    assert per_block >= 8
    monkeypatch.setattr(dispatch, "use_triton", lambda t: True)  # the kernels (the interpreter on CPU)
    launches, singles = [], []
    real_launch, real_single = int_gemm._launch_stage, int_gemm.stage_int4
    monkeypatch.setattr(int_gemm, "_launch_stage", lambda *a: launches.append(len(a[0])) or real_launch(*a))
    monkeypatch.setattr(int_gemm, "stage_int4", lambda *a, **k: singles.append(1) or real_single(*a, **k))
    x = tiny_inputs("pixart", seed=5)
    staged = forward_output(model, x)
    assert sum(launches) == 2 * per_block and len(launches) == 2 * kinds and not singles
    assert all(m._weight_staging._staged is None for m in model.modules() if getattr(m, "_weight_staging", None))
    assert viditq.layers.install_weight_staging(model, enable=False) == 0  # each layer stages its own weights
    assert all(not b._forward_pre_hooks and m._weight_staging is None for b in model.transformer_blocks
               for m in packed)
    launches.clear()
    alone = forward_output(model, x)
    assert len(singles) == 2 * per_block and launches == [1] * (2 * per_block)
    assert torch.equal(staged, alone)
    viditq.layers.install_weight_staging(model)  # idempotent: the old hooks go
    assert all(len(b._forward_pre_hooks) == 1 for b in model.transformer_blocks)
    torch._dynamo.reset()
    viditq.compile_blocks(model, backend="eager")
    launches.clear(), singles.clear()
    assert torch.equal(forward_output(model, x), staged)
    assert sum(launches) == 2 * per_block and len(launches) == 2 * kinds and not singles
