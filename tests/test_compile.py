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


@pytest.mark.parametrize("preset,most_graphs", [(None, 2), ("w8a8-fp8", 3)])
def test_compiled_blocks_match_eager_and_share_graphs(preset, most_graphs):
    """The blocks share their compiled code: block 0 (its input has the patch embedding's strides) and one more
    graph for the contiguous input of the other blocks; a quantized block whose layers chose other balancing
    (a smoothing vector or not) needs its own."""
    from torch._dynamo.utils import counters

    model = tiny_model("pixart", num_layers=3)
    if preset:
        viditq.quantize(model, preset, calibration_set("pixart", n=1))
    x = tiny_inputs("pixart", seed=5)
    eager = forward_output(model, x)
    torch._dynamo.reset()
    counters.clear()
    assert viditq.compile_blocks(model, backend="eager") == 3
    assert torch.equal(forward_output(model, x), eager)
    assert 2 <= counters["stats"]["unique_graphs"] <= most_graphs
