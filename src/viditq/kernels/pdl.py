"""Programmatic dependent launch (PDL, sm_90+): a kernel starts launching while the one before it in the stream
finishes, instead of after it.

A DiT forward is a chain of short kernels (PixArt-α W8A8: ~420 per forward, most under 40 µs); between two of them
the GPU drains the first grid, then launches and sets up the second (about 2 µs per kernel boundary under a CUDA
graph: ~0.8 ms per PixArt forward in the session-9 profile). With PDL the next grid's programs are scheduled as
soon as every program of the current one has signalled, and wait on the device for its completion.

Each viditq kernel starts with :func:`enter`: ``griddepcontrol.wait`` (block until the previous grid in the
stream has completed and its writes are visible — before this kernel reads or writes any memory, so no read or
write hazard can cross it) then ``griddepcontrol.launch_dependents`` (let the next grid begin launching). Since
every PDL-launched kernel waits before touching memory, ordering stays transitive along the chain. The exception,
``enter(PDL, INDEPENDENT=True)``, is for a kernel that shares no memory with the one before it — no tensor, and no
block the allocator could hand out again while it runs, i.e. that grid's tensors all stay referenced (the
attention preparation's K and V quantization after Q's): it runs alongside that grid and waits at its end
(:func:`leave`), so its completion still implies the previous grid's. A kernel launched without PDL (cuDNN
attention, Inductor's) waits for the whole previous grid as usual. CUDA graphs capture the launches as
programmatic edges.

:func:`launch_options` gives the launch keywords: ``PDL=True, launch_pdl=True`` on CUDA devices of compute
capability 9.0 or more, ``PDL=False`` elsewhere (the CPU interpreter has no inline PTX) or with ``VIDITQ_PDL=0``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def enter(PDL: tl.constexpr, INDEPENDENT: tl.constexpr = False):
    """The first statement of a PDL-launched kernel (see the module docstring). ``INDEPENDENT``: the kernel reads
    nothing the previous grid writes, and writes nothing it reads, so it runs alongside it and only lets the next
    grid launch here; it waits in :func:`leave` instead, so that its completion still implies the previous grid's
    (the ordering stays transitive for the kernels after it)."""
    if PDL:
        if not INDEPENDENT:
            gdc_wait()
        gdc_launch_dependents()


@triton.jit
def leave(PDL: tl.constexpr, INDEPENDENT: tl.constexpr):
    """The last statement of a kernel that entered ``INDEPENDENT``: wait for the previous grid's completion."""
    if PDL and INDEPENDENT:
        gdc_wait()


_SM90_PLUS: dict[int, bool] = {}


def sm90_plus(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA GPU of compute capability 9.0 or more (asked once per device)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM90_PLUS:
        _SM90_PLUS[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _SM90_PLUS[index]


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL (CUDA, sm_90+, not ``VIDITQ_PDL=0``)."""
    return os.environ.get("VIDITQ_PDL", "1") != "0" and sm90_plus(device)


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch: the ``PDL`` constexpr of :func:`enter` and Triton's ``launch_pdl``."""
    return dict(PDL=True, launch_pdl=True) if enabled(device) else dict(PDL=False)
