"""Regional compilation: ``torch.compile`` each repeated transformer block instead of the whole model.

A DiT is a stack of identical blocks (PixArt 28, CogVideoX-2B 30). Compiling the whole model makes Dynamo trace
every block, which for a quantized model (a dozen more ops per linear layer: the activation quantization that
Inductor fuses into its producer) took longer than 97 s for PixArt-α on an H200. Compiled block by block, the
first block's graph serves the others (parameters and buffers are graph inputs), so Dynamo traces about two
blocks: the first, whose input has the patch embedding's layout, and one more for the contiguous input of the
rest. Quantized blocks whose layers chose different balancing (smoothing or rotation in one block, not in the
next) need a graph each: Dynamo's recompile limit per code object is raised to the number of blocks so that none
of them falls back to eager. The code outside the blocks (embeddings, final layer) stays eager; capture the
forward in a CUDA graph to remove its launch overhead as well.
"""
from __future__ import annotations

import torch
from torch import nn


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The members of every ``nn.ModuleList`` of ``model`` that holds two or more modules of one class."""
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            blocks.extend(module)
    return blocks


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """``block.compile(**compile_kwargs)`` for each of :func:`repeated_blocks`; returns how many were compiled.

    Works on float and viditq-quantized models alike (diffusers' ``compile_repeated_blocks`` does the same for
    the classes that declare their blocks). Raises ValueError if the model has no repeated blocks.
    """
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of repeated blocks to compile; use "
                         "torch.compile(model) instead")
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 2 * len(blocks) + 2)  # one graph per block at worst
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)
