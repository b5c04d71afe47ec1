"""Multi-GPU inference of quantized pipelines with diffusers' context parallelism (Ulysses / ring attention).

The engine is diffusers' own (``ModelMixin.enable_parallelism`` with a ``ContextParallelConfig``): its hooks split
the token sequence across ranks at the model's entry and all-gather it at the exit, and its attention dispatcher
runs the all-to-all (Ulysses) or the KV rotation (ring) around each attention call. viditq adds no communication
of its own; it only makes quantized models fit that engine:

* QuantLinear is a per-token op (per-token activation scales, per-channel weights), so it gives the same numbers
  whichever rank holds a token: nothing to change.
* 8-bit attention (``viditq.attention``) hooks ``F.scaled_dot_product_attention`` inside each processor. Under
  Ulysses the native backend calls that function on the *full* sequence for a slice of the heads, so the 8-bit
  kernel sees exactly the tensors of a single-GPU run. Ring attention needs a backend that returns the log-sum-exp
  of each chunk; the 8-bit kernel does not, so ring is only allowed with bf16 attention.
* Models: those whose diffusers class declares a ``_cp_plan`` (Wan, Flux, LTX, Qwen-Image, ...) and CogVideoX,
  for which this module supplies the plan and a processor that goes through ``dispatch_attention_fn``.

Entry points: :func:`enable_context_parallel` (inside processes you launched, e.g. with torchrun),
:func:`generate_parallel` and :func:`capture_calibration_parallel` (launch the processes themselves), and
:func:`launch` for any other per-rank function.
"""
from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

CP_KINDS = ("ulysses", "ring")


# ------------------------------------------------------------------------------------------ CogVideoX support
class CogVideoXContextParallelAttnProcessor:
    """``CogVideoXAttnProcessor2_0`` with its attention call routed through diffusers' ``dispatch_attention_fn``.

    Same math as the original (text and video tokens are concatenated, RoPE on the video part), in the (B, S, H, D)
    layout the dispatcher uses, so that context parallelism can run it. Under Ulysses each rank holds its share of
    *both* text and video tokens; attention without a mask does not depend on the order of the keys, so the
    interleaving [text_r0, video_r0, text_r1, video_r1, ...] after the all-to-all gives the single-GPU result.
    """

    _attention_backend = None  # set by ModelMixin.set_attention_backend
    _parallel_config = None  # set by ModelMixin.enable_parallelism

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("CogVideoXContextParallelAttnProcessor does not support attention masks")
        text_len = encoder_hidden_states.shape[1]
        tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, S_text + S_video, C)
        query, key, value = (proj(tokens).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        # (B, S, H, D) each
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = torch.cat([query[:, :text_len], apply_rotary_emb(query[:, text_len:], image_rotary_emb,
                                                                     sequence_dim=1)], dim=1)
            if not attn.is_cross_attention:
                key = torch.cat([key[:, :text_len], apply_rotary_emb(key[:, text_len:], image_rotary_emb,
                                                                     sequence_dim=1)], dim=1)
        out = dispatch_attention_fn(query, key, value, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)  # (B, S, H, D)
        out = out.flatten(2, 3).type_as(query)  # (B, S, C)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, video_out = out.split([text_len, out.shape[1] - text_len], dim=1)
        return video_out, encoder_out


def _cogvideox_cp_plan(model: nn.Module) -> dict:
    """Split text and video tokens at the first block, the RoPE tables at the model's entry; gather after proj_out.

    The patch embedding runs before the split because it concatenates text and video (and adds the sincos
    positions of CogVideoX-2B) over the whole sequence; norm_final / norm_out / proj_out are per token.
    """
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    plan = {
        "transformer_blocks.0": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
            "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
        },
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
    if model.config.use_rotary_positional_embeddings:
        # Only then: diffusers' split hook fails on an optional argument the caller leaves out (the pipelines pass
        # image_rotary_emb by keyword, None for CogVideoX-2B).
        rope = ContextParallelInput(split_dim=0, expected_dims=2)  # cos, sin: (S_video, D)
        plan[""] = {"image_rotary_emb": [rope, rope]}
    return plan


def _prepare_cogvideox(model: nn.Module) -> dict:
    for block in model.transformer_blocks:
        block.attn1.set_processor(CogVideoXContextParallelAttnProcessor())
    return _cogvideox_cp_plan(model)


# class name → function that readies the model (processors) and returns its plan
_EXTRA_PLANS: dict[str, Callable[[nn.Module], dict]] = {"CogVideoXTransformer3DModel": _prepare_cogvideox}


def supports_context_parallel(model: nn.Module) -> bool:
    """Whether ``model`` has a context-parallel plan (its diffusers ``_cp_plan`` or one supplied here)."""
    return getattr(model, "_cp_plan", None) is not None or type(model).__name__ in _EXTRA_PLANS


# ------------------------------------------------------------------------------------------ enabling
def _heads(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "num_attention_heads", None)


def _check_request(model: nn.Module, world_size: int, kind: str, attention_mode: str) -> None:
    if kind not in CP_KINDS:
        raise ValueError(f"context-parallel kind must be one of {CP_KINDS}, got {kind!r}")
    if world_size < 2:
        raise ValueError(f"context parallelism needs world_size >= 2, got {world_size}")
    if not supports_context_parallel(model):
        raise ValueError(f"{type(model).__name__} has no context-parallel plan; supported: diffusers models with a "
                         f"_cp_plan (Wan, Flux, LTX, Qwen-Image, ...) and {sorted(_EXTRA_PLANS)}")
    if kind == "ring" and attention_mode != "bf16":
        raise ValueError(f"ring attention needs each chunk's log-sum-exp, which {attention_mode} attention does not "
                         "return; use kind='ulysses' or bf16 attention")


def _check_head_split(heads: int | None, world_size: int, kind: str, uneven: bool) -> None:
    """Ulysses gives each rank ceil(heads / world_size) heads; diffusers pads the missing ones, and only accepts
    fewer padded heads than that (30 heads on 4 GPUs: 8 per rank, 2 padded, fine; 4 on 3: 2 per rank, 2 padded,
    refused)."""
    if kind != "ulysses" or heads is None or heads % world_size == 0:
        return
    if not uneven:
        raise ValueError(f"{heads} attention heads do not split evenly over {world_size} ranks: pass uneven=True")
    per_rank = -(-heads // world_size)
    if per_rank * world_size - heads >= per_rank:
        raise ValueError(f"Ulysses cannot split {heads} attention heads over {world_size} ranks (diffusers pads at "
                         f"most {per_rank - 1} heads); use a world size that divides {heads} or ring attention")


@contextlib.contextmanager
def _accelerator_count_at_least_one():
    """diffusers 0.42.1 picks the rank's device as ``rank % torch.accelerator.device_count()``, a division by zero
    on a CPU-only host; for the CPU (gloo) path, count the CPU as one device while the mesh is built."""
    original = torch.accelerator.device_count
    if original() == 0:
        torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_context_parallel(model: nn.Module, world_size: int | None = None, kind: str = "ulysses",
                            uneven: bool | None = None) -> nn.Module:
    """Shard ``model``'s token sequence over the ranks of the initialised default process group.

    Args:
        model: a diffusers transformer, float or quantized (QuantLinear layers and 8-bit attention are kept).
        world_size: ranks to use (default: the whole process group).
        kind: "ulysses" (all-to-all over heads; works with 8-bit attention) or "ring" (bf16 attention with a
            backend that returns log-sum-exp, e.g. ``model.set_attention_backend("_native_cudnn")`` on CUDA).
        uneven: allow sequence lengths and head counts not divisible by ``world_size`` (diffusers' "anything"
            modes). Default: on when the head count is not divisible (CogVideoX-2B's 30 heads on 4 GPUs).
    Returns ``model``, changed in place.
    """
    from diffusers import ContextParallelConfig

    from .attention import apply_quantized_attention, quantized_attention_mode

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call it inside viditq.parallel.launch workers "
                           "or under torchrun after dist.init_process_group()")
    world_size = world_size or dist.get_world_size()
    attention_mode = quantized_attention_mode(model)
    _check_request(model, world_size, kind, attention_mode)
    heads = _heads(model)
    if uneven is None:
        uneven = kind == "ulysses" and heads is not None and heads % world_size != 0
    _check_head_split(heads, world_size, kind, uneven)
    degree = {"ring_degree": world_size} if kind == "ring" else {"ulysses_degree": world_size}
    anything = {"ring_anything": uneven} if kind == "ring" else {"ulysses_anything": uneven}
    config = ContextParallelConfig(**degree, **anything)

    # enable_parallelism sets ``processor._parallel_config``; on the 8-bit wrapper that attribute would not reach
    # the wrapped processor, so unwrap first and wrap the now parallel-aware processors again afterwards.
    apply_quantized_attention(model, "bf16")
    prepare = _EXTRA_PLANS.get(type(model).__name__)
    plan = prepare(model) if prepare is not None else None
    with _accelerator_count_at_least_one():
        model.enable_parallelism(config=config, cp_plan=plan)
    if attention_mode != "bf16":
        apply_quantized_attention(model, attention_mode)
    return model


# ------------------------------------------------------------------------------------------ process launcher
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_world(world_size: int, device: str) -> None:
    """ValueError unless ``world_size`` processes can run on ``device`` ("cuda": one GPU each; "cpu": gloo)."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu' for a multi-process run, got {device!r}")
    if world_size < 1:
        raise ValueError(f"number of GPUs/processes must be >= 1, got {world_size}")
    if device == "cuda" and world_size > torch.cuda.device_count():
        raise ValueError(f"{world_size} GPUs requested but {torch.cuda.device_count()} CUDA device(s) are visible "
                         "(CUDA_VISIBLE_DEVICES); use fewer, or device='cpu' for a CPU (gloo) run")


def _worker_entry(rank: int, world_size: int, device: str, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    if device == "cuda":
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=torch.device("cuda", rank))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # ranks share the cores
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, torch.device(device, rank) if device == "cuda" else torch.device("cpu"), *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, world_size: int, *args, device: str = "cuda") -> None:
    """Run ``fn(rank, world_size, torch_device, *args)`` in ``world_size`` local processes, process group set up.

    ``fn`` must be importable (a module-level function); ``args`` are sent to each process. NCCL on CUDA (one GPU
    per rank), gloo on CPU. Raises if any rank fails.
    """
    import torch.multiprocessing as mp

    check_world(world_size, device)
    mp.spawn(_worker_entry, args=(world_size, device, _free_port(), fn, args), nprocs=world_size, join=True)


# ------------------------------------------------------------------------------------------ generation
def load_parallel_pipeline(model_dir: str | Path, world_size: int, device: torch.device, kind: str = "ulysses",
                           uneven: bool | None = None):
    """On one rank: load a (quantized) pipeline directory onto ``device`` and make its transformer context
    parallel (no-op for ``world_size`` 1)."""
    import diffusers

    from .checkpoint import PIPELINE_META_FILE, load_pipeline

    model_dir = Path(model_dir)
    if (model_dir / PIPELINE_META_FILE).is_file():
        pipe = load_pipeline(model_dir, device=device)
    else:
        pipe = diffusers.DiffusionPipeline.from_pretrained(model_dir).to(device)
    if world_size > 1:
        enable_context_parallel(pipe.transformer, world_size, kind=kind, uneven=uneven)
    return pipe


def _output_paths(out: Path, n: int) -> list[Path]:
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def generate_media(pipe, prompts: list[str], out: Path, steps: int, seed: int, pipe_kwargs: dict,
                   write: bool = True) -> list[Path]:
    """Generate one image/video per prompt (seed + i, a CPU generator: same latents on every rank) and save them
    when ``write`` (PNG / GIF / MP4 by suffix; ``.npy``: the float array). Returns the output paths."""
    from .media import save_media

    paths = _output_paths(Path(out), len(prompts))
    for i, (text, path) in enumerate(zip(prompts, paths)):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        result = pipe(prompt=text, num_inference_steps=steps, generator=generator, output_type="np", **pipe_kwargs)
        media = result.frames[0] if hasattr(result, "frames") else result.images[0]
        if write and path.suffix == ".npy":  # the float frames themselves, for exact comparisons
            np.save(path, media)
        elif write:
            save_media(media, path)
    return paths


def check_pipeline_dir(model_dir: str | Path) -> None:
    """ValueError unless ``model_dir`` is a pipeline directory whose transformer class has a context-parallel plan
    (checked from its config before any process starts)."""
    import json

    import diffusers

    config_file = Path(model_dir) / "transformer" / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model_dir} is not a pipeline directory with a transformer (no {config_file})")
    class_name = json.loads(config_file.read_text()).get("_class_name", "")
    cls = getattr(diffusers, class_name, None)
    if class_name not in _EXTRA_PLANS and getattr(cls, "_cp_plan", None) is None:
        raise ValueError(f"{class_name or 'this transformer'} has no context-parallel plan; supported: diffusers "
                         f"models with a _cp_plan (Wan, Flux, LTX, Qwen-Image, ...) and {sorted(_EXTRA_PLANS)}")


def _generate_worker(rank: int, world_size: int, device: torch.device, model_dir: str, prompts: list[str],
                     out: str, steps: int, seed: int, pipe_kwargs: dict, kind: str, uneven: bool | None) -> None:
    pipe = load_parallel_pipeline(model_dir, world_size, device, kind, uneven)
    pipe.set_progress_bar_config(disable=rank != 0)
    generate_media(pipe, prompts, Path(out), steps, seed, pipe_kwargs, write=rank == 0)


def generate_parallel(model_dir: str | Path, prompts: list[str], out: str | Path, world_size: int, steps: int = 20,
                      seed: int = 0, pipe_kwargs: dict | None = None, device: str = "cuda", kind: str = "ulysses",
                      uneven: bool | None = None) -> list[Path]:
    """Generate with a (quantized) pipeline directory on ``world_size`` GPUs (context parallel transformer).

    Every rank loads the pipeline and runs it with the same seed; the transformer's tokens are split across the
    ranks. Rank 0 writes ``out`` (``out_<i>`` per prompt when several). ``world_size`` 1 runs in this process.
    """
    if not prompts:
        raise ValueError("generate_parallel needs at least one prompt")
    check_world(world_size, device)
    pipe_kwargs = dict(pipe_kwargs or {})
    if world_size == 1:
        pipe = load_parallel_pipeline(model_dir, 1, torch.device(device))
        return generate_media(pipe, list(prompts), Path(out), steps, seed, pipe_kwargs)
    check_pipeline_dir(model_dir)
    launch(_generate_worker, world_size, str(model_dir), list(prompts), str(out), steps, seed, pipe_kwargs, kind,
           uneven, device=device)
    return _output_paths(Path(out), len(prompts))


# ------------------------------------------------------------------------------------------ calibration
def _capture_worker(rank: int, world_size: int, device: torch.device, model_dir: str, prompts: list[str],
                    steps: int, seed: int, pipe_kwargs: dict, records_file: str) -> None:
    from .calibrate import capture_calibration

    pipe = load_parallel_pipeline(model_dir, world_size, device)
    pipe.set_progress_bar_config(disable=True)
    # The capture hook is a torch forward pre-hook: it runs before diffusers' split hooks, so it records the full
    # (unsharded) transformer inputs, the same on every rank.
    # Every rank must start from the same latents: a seeded CPU generator.
    generator = torch.Generator("cpu").manual_seed(seed)
    records = capture_calibration(pipe, prompts, num_inference_steps=steps, generator=generator, **pipe_kwargs)
    if rank == 0:
        torch.save(records, records_file)


def capture_calibration_parallel(model_dir: str | Path, prompts: list[str], world_size: int,
                                 num_inference_steps: int = 20, seed: int = 0, pipe_kwargs: dict | None = None,
                                 device: str = "cuda") -> list[dict]:
    """:func:`viditq.capture_calibration` with the pipeline's transformer context parallel on ``world_size`` GPUs.

    Returns the records of a single-GPU capture with ``generator=torch.Generator("cpu").manual_seed(seed)`` (full
    transformer inputs, on CPU), ready for ``viditq.quantize(transformer, config, calib=records)``.
    """
    pipe_kwargs = dict(pipe_kwargs or {})
    check_world(world_size, device)
    check_pipeline_dir(model_dir)
    with tempfile.TemporaryDirectory(prefix="viditq-calib-") as tmp:
        records_file = str(Path(tmp) / "records.pt")
        launch(_capture_worker, world_size, str(model_dir), list(prompts), num_inference_steps, seed, pipe_kwargs,
               records_file, device=device)
        return torch.load(records_file, weights_only=True)
