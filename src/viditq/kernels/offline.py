"""Compile Triton / Gluon kernels for sm_90 on a machine without a GPU (Triton's bundled ptxas): CI checks what
the compiler makes of the Gluon GEMM (which has no CPU interpreter), and the benchmarks' resource reports
(registers, spills, shared memory) prune sweeps before device time is spent.

    with offline.sm90_compiles(kernel) as compiled:
        launcher(...)  # the kernel's launches compile (warm-up only, nothing runs); compiled[-1] is the last one
"""
from __future__ import annotations

import contextlib

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class NoGpuDriver:
    """Just enough of a driver for the JIT to specialize and compile for sm_90."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def sm90_compiles(kernel):
    """Inside, launches of ``kernel`` (CPU tensors) compile for sm_90 without running; yields the list each
    compiled kernel is appended to. Triton's active driver is swapped meanwhile, so use it in a process of its
    own (not under ``TRITON_INTERPRET``)."""
    compiled = []
    real_run = kernel.run
    driver.set_active(NoGpuDriver())
    kernel.run = lambda *a, grid, warmup, **k: compiled.append(real_run(*a, grid=grid, warmup=True, **k))
    try:
        yield compiled
    finally:
        kernel.run = real_run
        with contextlib.suppress(RuntimeError):  # no default driver to go back to on a machine without a GPU
            driver.reset_active()
