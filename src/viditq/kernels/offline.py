"""Compile Triton / Gluon kernels for sm_90 on a machine without a GPU (Triton's bundled ptxas): CI checks what
the compiler makes of the Gluon GEMM (which has no CPU interpreter), and the benchmarks' resource reports
(registers, spills, shared memory) prune sweeps before device time is spent.

    with offline.sm90_compiles(kernel) as compiled:
        launcher(...)  # the kernel's launches compile (warm-up only, nothing runs); compiled[-1] is the last one
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
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


def ptxas_report(compiled) -> dict:
    """Bundled ptxas, verbose, on a compiled kernel's PTX for sm_90a: registers per thread, spill bytes, and
    whether ptxas serialized the asynchronous wgmma (it does when it cannot prove a register operand or
    accumulator untouched while in flight — a silent loss of the overlap)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        run = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = run.stdout + run.stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(registers=int(re.search(r"Used (\d+) registers", log)[1]), spill_stores=int(spills[1]),
                spill_loads=int(spills[2]), wgmma_serialized="wgmma.mma_async instructions are serialized" in log)


def cuobjdump(compiled, *flags: str) -> str:
    """The bundled cuobjdump's output on a compiled kernel's cubin (``-sass``, ``-res-usage``, ...)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def mma_loops(compiled) -> list[dict]:
    """The loops of a compiled kernel's SASS (bundled cuobjdump) that issue warpgroup MMAs, innermost first: per
    loop body, its instruction count, MMA instructions (HGMMA / IGMMA / QGMMA), waits on them
    (``WARPGROUP.DEPBAR``), exp2 (``MUFU.EX2``) and indexed shuffles (``SHFL.IDX``: register layout conversions) —
    what one trip costs, e.g. the exponentials per score of an attention kernel."""
    sass = cuobjdump(compiled, "-sass")
    code = [(int(m[1], 16), m[2]) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([^;]*);", sass)]
    index = {addr: i for i, (addr, _) in enumerate(code)}
    loops = []
    for i, (addr, text) in enumerate(code):
        branch = re.match(r"BRA\b.*?0x([0-9a-f]+)", text)
        if branch and int(branch[1], 16) < addr and int(branch[1], 16) in index:  # a backward branch: a loop
            body = [t for _, t in code[index[int(branch[1], 16)]:i + 1]]
            mma = sum(bool(re.match(r"[HIQ]GMMA", t)) for t in body)
            if mma:
                loops.append(dict(instructions=len(body), mma=mma, ex2=sum(t.startswith("MUFU.EX2") for t in body),
                                  waits=sum(t.startswith("WARPGROUP.DEPBAR") for t in body),
                                  shuffles=sum(t.startswith("SHFL.IDX") for t in body)))
    return sorted(loops, key=lambda loop: loop["instructions"])
