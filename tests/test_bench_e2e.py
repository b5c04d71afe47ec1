"""benchmarks/bench_e2e.py's byte counts: what the weights row of the end-to-end table reports."""
import torch
from torch.testing._internal.two_tensor import TwoTensor


def test_weight_bytes_count_the_inner_tensors_of_wrapper_subclasses(benchmark_script):
    """A weight held as a wrapper subclass (torchao's fp8 tensors report the bf16 dtype they stand for) counts the
    bytes of the tensors it holds: session 21's torchao row reported the bf16 size, 1232 MB for 664 MB held."""
    bench_e2e = benchmark_script("bench_e2e")
    model = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    plain = 64 * 32 * 2 + 32 * 2
    assert bench_e2e.module_bytes(model) == plain
    assert bench_e2e.state_bytes(model) == plain
    codes, scales = torch.zeros(32, 64, dtype=torch.float8_e4m3fn), torch.ones(32, 64, dtype=torch.float8_e4m3fn)
    model.weight = torch.nn.Parameter(TwoTensor(codes, scales), requires_grad=False)
    assert model.weight.element_size() == 1  # (TwoTensor reports its inner dtype; the count must not use it)
    held = 2 * 32 * 64 + 32 * 2
    assert bench_e2e.module_bytes(model) == held
    assert bench_e2e.state_bytes(model) == held
