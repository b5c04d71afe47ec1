"""Command line: a thin layer over the Python API (same configs, same defaults)."""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import FLOAT_ACT_BITS, MixedPrecisionSpec

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="viditq: quantize diffusion transformers. Progress bars show when stderr is a terminal "
                       "(VIDITQ_PROGRESS=1 shows them anyway, 0 hides them).")
console = Console()


_MP_DEFAULTS = MixedPrecisionSpec()
DEVICE_HELP = "cpu | cuda | cuda:N | auto (cuda if available)."
# Pipeline call arguments each command sets itself (→ the option that sets them): not allowed as --pipe-arg
CALIB_CALL_ARGS = {"prompt": "--prompts", "num_inference_steps": "--steps"}
GENERATE_CALL_ARGS = {"prompt": "--prompt", "num_inference_steps": "--steps", "generator": "--seed",
                      "output_type": "--out"}


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            console.print(f"viditq {version('viditq')}")
        except PackageNotFoundError:  # pragma: no cover (a source tree on sys.path, not installed)
            from . import __version__

            console.print(f"viditq {__version__}")
        raise typer.Exit()


@app.callback()
def _app(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Show the version and exit.")):
    pass


def _parse_pipe_args(pairs: list[str], cli_args: dict[str, str]) -> dict:
    """``key=value`` pairs for the pipeline call; values are parsed as JSON when possible (16, false, 7.5). Keys
    the command sets itself (``cli_args``: key → its option) are an error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {pair!r}", param_hint="--pipe-arg")
        if key in cli_args:
            raise typer.BadParameter(f"{key} is set by {cli_args[key]}, not by --pipe-arg", param_hint="--pipe-arg")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _check_call_args(pipe, kwargs: dict) -> None:
    """BadParameter for ``kwargs`` the pipeline's ``__call__`` does not take (unchecked if it takes ``**kwargs``)."""
    from .calibrate import unknown_arguments

    unknown, params = unknown_arguments(pipe.__call__, kwargs)
    if unknown:
        close = difflib.get_close_matches(unknown[0], params, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise typer.BadParameter(f"{type(pipe).__name__} takes no argument {unknown[0]!r}{hint}",
                                 param_hint="--pipe-arg")


def _pipeline_is_video(pipe) -> bool | None:
    """Whether ``pipe`` makes videos (judged from its call arguments), or None when it cannot be told."""
    params = inspect.signature(type(pipe).__call__).parameters
    if {"num_frames", "video_length", "num_videos_per_prompt"} & set(params):
        return True
    return False if "num_images_per_prompt" in params else None


def _check_out_file(out: Path, video: bool | None = None) -> None:
    """--out of generate: an image or video suffix (of the pipeline's kind when known), or .npy (float array)."""
    from .media import check_media_path

    if out.suffix.lower() == ".npy":
        return
    try:
        check_media_path(out, video)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--out") from None


def _device(device: str) -> str:
    """The checked --device (anything torch names: cpu, cuda, cuda:N, mps, ...; CUDA must be there), with auto
    resolved (cuda if available, else cpu)."""
    import torch

    from .checkpoint import check_device

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise typer.BadParameter(f"expected cpu, cuda, cuda:N, auto or another torch device, got {device!r}",
                                 param_hint="--device") from None
    try:
        check_device(device)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--device") from None
    return device


def _resolve_preset(preset: str):
    from .config import resolve_config

    try:
        return resolve_config(preset)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e), param_hint="--preset") from None


def _override(config, option: str, **changes):
    """``dataclasses.replace(config, **changes)`` (a config or one of its specs), a ValueError reported against
    ``option``."""
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=option) from None


def _check_out_dir(out: Path, model: Path, overwrite: bool) -> None:
    """--out of quantize, before anything is loaded: never the --model directory (or one that holds it), else what
    ``save_quantized`` accepts (:func:`checkpoint.check_writable`)."""
    from .checkpoint import check_writable

    target, source = out.resolve(), model.resolve()
    if target == source or target in source.parents:
        where = "is" if target == source else "holds"
        raise typer.BadParameter(f"{out} {where} the --model directory; saving there would delete the float model: "
                                 "choose another directory", param_hint="--out")
    try:
        check_writable(out, overwrite)
    except (FileExistsError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--out") from None


def _read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise typer.BadParameter(f"prompt file not found: {path}", param_hint="--prompts")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise typer.BadParameter(f"{path} has no prompts (one per line)", param_hint="--prompts")
    return prompts


def _load_any_pipeline(path: Path, device: str, float_only: bool = False):
    """The pipeline at --model: a quantized one (unless ``float_only``: quantize needs the float pipeline) or any
    diffusers folder; a corrupt checkpoint is a one-line error."""
    from .checkpoint import PIPELINE_META_FILE, load_pipeline
    from .models import pipeline_class_for

    if not path.is_dir():
        raise typer.BadParameter(f"not a directory: {path}", param_hint="--model")
    if (path / PIPELINE_META_FILE).is_file():
        if float_only:
            raise typer.BadParameter(f"{path} is already quantized by viditq; quantize the float pipeline",
                                     param_hint="--model")
        try:
            return load_pipeline(path, device=device)
        except (ValueError, OSError, KeyError) as e:
            raise typer.BadParameter(f"{path}: {e}", param_hint="--model") from None
    if not (path / "model_index.json").is_file():
        raise typer.BadParameter(f"{path} is not a diffusers pipeline directory (no model_index.json)",
                                 param_hint="--model")
    return pipeline_class_for(path).from_pretrained(path).to(device)


@app.command()
def quantize(
    model: Path = typer.Option(..., help="Local diffusers pipeline directory."),
    preset: str = typer.Option("w8a8", help="Preset name, or a QuantConfig .yaml/.json path."),
    prompts: Path = typer.Option(..., help="Calibration prompts, one per line."),
    out: Path = typer.Option(..., help="Output directory (diffusers layout, quantized transformer). An existing "
                                       "viditq checkpoint there is replaced; anything else needs --overwrite."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace an existing --out that is not a viditq checkpoint (a non-empty "
                                        "directory or a file) and everything in it."),
    steps: int = typer.Option(20, min=1, help="Denoising steps during calibration (use the number you sample with: "
                                              "the *-float-last presets place their last steps on this schedule)."),
    text_encoder_bits: int = typer.Option(8, help="Weight-only bits for the text encoder(s): 8, 4, or 0 to keep."),
    attention: Optional[str] = typer.Option(None, help="Override the attention mode: bf16 | int8 | fp8."),
    conditioning_bits: Optional[int] = typer.Option(
        None, help="Override: weight-only bits (8 or 4) for the transformer's timestep / text embedding and adaLN "
                   "modulation layers, 0 to keep them in float."),
    ff_hand_off: Optional[bool] = typer.Option(
        None, "--ff-hand-off/--no-ff-hand-off",
        help="Override (fp8 presets): quantize the feed-forward hidden state in the up-projection's GEMM epilogue "
             "with a bound-based scale (faster) or in the down-projection (exact per-token scale)."),
    gptq_temporal: Optional[float] = typer.Option(
        None, help="Override (GPTQ presets, video models): weight of the inputs' frame-to-frame differences in "
                   "GPTQ's Hessian, 0 for plain GPTQ."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    pipe_arg: list[str] = typer.Option([], help="Extra pipeline call argument key=value (repeatable)."),
):
    """Calibrate on PROMPTS, quantize the pipeline's transformer, and save the pipeline to OUT."""
    from . import memory_report, quantize_pipeline, save_quantized

    device = _device(device)
    pipe_kwargs = _parse_pipe_args(pipe_arg, CALIB_CALL_ARGS)
    config = _resolve_preset(preset)
    if attention is not None:
        config = _override(config, "--attention", attention=attention)
    if conditioning_bits is not None:
        config = _override(config, "--conditioning-bits", conditioning_bits=conditioning_bits or None)
    if ff_hand_off is not None:
        config = _override(config, "--ff-hand-off", ff_hand_off=ff_hand_off)
    if gptq_temporal is not None:
        weight = _override(config.weight, "--gptq-temporal", gptq_temporal=gptq_temporal)
        config = _override(config, "--gptq-temporal", weight=weight)
    if text_encoder_bits not in (0, 4, 8):
        raise typer.BadParameter(f"expected 8, 4 or 0, got {text_encoder_bits}", param_hint="--text-encoder-bits")
    _check_out_dir(out, model, overwrite)
    prompt_list = _read_prompts(prompts)
    pipe = _load_any_pipeline(model, device, float_only=True)
    _check_call_args(pipe, pipe_kwargs)
    console.print(f"calibrating on {len(prompt_list)} prompts x {steps} steps")
    quantize_pipeline(pipe, config, prompt_list, text_encoder_bits=text_encoder_bits or None,
                      num_inference_steps=steps, **pipe_kwargs)
    for name, cos in pipe.quantization_report["text_embedding_cosine"].items():
        console.print(f"{name}: text-embedding cosine similarity vs float {cos:.5f}")
    try:
        save_quantized(pipe, out, overwrite=overwrite)
    except (FileExistsError, ValueError) as e:  # (checked above; the directory may have changed since)
        raise typer.BadParameter(str(e), param_hint="--out") from None
    console.print(memory_report(pipe).table())
    console.print(f"[green]saved[/green] {out}")


@app.command()
def generate(
    model: Path = typer.Option(..., help="Quantized (or float) diffusers pipeline directory."),
    prompt: list[str] = typer.Option(..., help="Prompt (repeatable)."),
    out: Path = typer.Option(..., help="Output image (.png/.jpg/.jpeg/.webp) or video (.gif/.mp4) path, or .npy for "
                                       "the float array; with several prompts, NAME_i.SUFFIX for prompt i."),
    steps: int = typer.Option(20, min=1, help="Denoising steps."),
    seed: int = typer.Option(0, help="Seed of the initial noise; prompt i (from 0) uses seed + i (a CPU generator: "
                                     "the same noise on any device)."),
    device: str = typer.Option("auto", help=DEVICE_HELP + " With --gpus, auto means cuda."),
    pipe_arg: list[str] = typer.Option([], help="Extra pipeline call argument key=value (repeatable)."),
    gpus: int = typer.Option(1, help="GPUs for context-parallel (Ulysses) generation; with --device cpu, processes."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the transformer's repeated blocks "
                                 "(viditq.compile_blocks): faster steps after a compile of tens of seconds."),
):
    """Generate images or videos with a (quantized) pipeline."""
    import numpy as np
    import torch

    from .media import save_media
    from .quantize import float_final_range, recorded_timesteps

    resolved = _device(device)
    _check_out_file(out)
    kwargs = _parse_pipe_args(pipe_arg, GENERATE_CALL_ARGS)
    if gpus != 1:
        from .parallel import generate_parallel

        try:
            paths = generate_parallel(model, prompt, out, gpus, steps=steps, seed=seed, pipe_kwargs=kwargs,
                                      device="cuda" if device == "auto" else device)
        except ValueError as e:  # (parallel.py words its hint for Python callers)
            raise typer.BadParameter(str(e).replace("device='cpu'", "--device cpu"), param_hint="--gpus") from None
        for path in paths:
            console.print(f"[green]wrote[/green] {path}")
        return
    pipe = _load_any_pipeline(model, resolved)
    _check_out_file(out, _pipeline_is_video(pipe))
    _check_call_args(pipe, kwargs)
    if compile:
        from . import compile as regional

        console.print(f"compiling {regional.compile_blocks(pipe.transformer)} transformer blocks")
    config = getattr(pipe.transformer, "viditq_config", None)
    span = float_final_range(config) if config is not None else None
    with recorded_timesteps(pipe.transformer) as seen:
        for i, text in enumerate(prompt):
            generator = torch.Generator("cpu").manual_seed(seed + i)
            result = pipe(prompt=text, num_inference_steps=steps, generator=generator, output_type="np", **kwargs)
            media = result.frames[0] if hasattr(result, "frames") else result.images[0]
            path = out if len(prompt) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
            if path.suffix.lower() == ".npy":
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, media)
            else:
                save_media(media, path)
            console.print(f"[green]wrote[/green] {path}")
    times = {t for t in seen if t is not None}
    if span is not None and times:  # (the range was placed on the calibration run's schedule, not this one)
        n_float = sum(span[0] <= t <= span[1] for t in times)
        console.print(f"{config.name}: float activations in {n_float} of {len(times)} steps (timesteps "
                      f"{span[0]:g} to {span[1]:g}, placed by the calibration run's schedule: calibrate with the "
                      "number of steps you sample with)", markup=False)


def _spec_kind(spec: dict, float_act: bool = False) -> str:
    """``W4A8``, ``W8A8 fp8``, ``W8A16 (weight-only)`` for a saved LayerSpec (``float_act``: run with float
    activations on its weights)."""
    fp8 = " fp8" if spec.get("fp8") else ""
    if float_act:
        return f"W{spec['weight_bits']}A{FLOAT_ACT_BITS}{fp8} (float activations)"
    if spec.get("weight_only") or spec["act_bits"] == FLOAT_ACT_BITS:
        return f"W{spec['weight_bits']}A{FLOAT_ACT_BITS}{fp8} (weight-only)"
    return f"W{spec['weight_bits']}A{spec['act_bits']}{fp8}"


def _layer_table(meta: dict) -> tuple[Table, str]:
    """Quantized layers by precision (a timestep-switching layer counted once, at its default precision, and in
    the precisions it switches to), and a one-line summary."""
    layers, switches = meta["layers"], meta.get("switch_layers", {})

    def kind(name: str, info: dict, key: str) -> str:
        if key == "fp":
            return "float"
        stored = info.get("float_act", {}).get(key)
        return _spec_kind(layers[f"{name}.variants.{stored or key}"], float_act=stored is not None)

    default = Counter(_spec_kind(spec) for name, spec in layers.items()
                      if not any(name.startswith(f"{s}.variants.") for s in switches))
    default.update(kind(name, info, info["default"]) for name, info in switches.items())
    ranges = Counter(kind(name, info, key) for name, info in switches.items()
                     for key in {*info["variants"], *info.get("float_act", {})} - {info["default"]})
    table = Table("precision")
    table.add_column("layers", justify="right")
    if switches:
        table.add_column("in some timestep ranges", justify="right")
    for k in sorted({*default, *ranges}):
        table.add_row(k, str(default.get(k, "-")), *([str(ranges.get(k, "-"))] if switches else []))
    n = sum(default.values())
    summary = f"{n} quantized layers" + (f", {len(switches)} with timestep variants (the layers column counts "
                                         "their default precision)" if switches else "")
    return table, summary


@app.command()
def embedded(
    kind: str = typer.Argument(..., metavar="KIND", help="t2i (images) or t2v (videos)."),
    out: Path = typer.Argument(..., metavar="DIR", help="New directory for the pipeline and prompts.txt."),
    prompts: int = typer.Option(16, min=1, help="Calibration prompts to write to DIR/prompts.txt."),
):
    """Write an embedded tiny pipeline (trained, shipped with viditq) to DIR as a diffusers folder, with
    calibration prompts from its training distribution in DIR/prompts.txt: a model to try the other commands on
    (`viditq quantize --model DIR --prompts DIR/prompts.txt ...`)."""
    from .checkpoint import atomic_directory
    from .models import load_t2i_pipeline, load_t2v_pipeline
    from .models.data import model_scenes

    loaders = {"t2i": load_t2i_pipeline, "t2v": load_t2v_pipeline}
    if kind not in loaders:
        raise typer.BadParameter(f"expected t2i or t2v, got {kind!r}", param_hint="KIND")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise typer.BadParameter(f"{out} exists and is not empty; name a new directory", param_hint="DIR")
    atomic_directory(out, loaders[kind]().save_pretrained)
    captions = [s.caption for s in model_scenes(kind, prompts, seed=99, split="train")]
    (out / "prompts.txt").write_text("\n".join(captions) + "\n")
    console.print(f"[green]wrote[/green] {out} and {out / 'prompts.txt'} ({len(captions)} prompts)")


@app.command()
def info(path: Path = typer.Argument(..., metavar="PATH",
                                     help="A viditq checkpoint or quantized pipeline directory.")):
    """Describe a quantized checkpoint: config, layers by bit-width, weight memory."""
    from . import load_quantized, memory_report
    from .checkpoint import PIPELINE_META_FILE, load_pipeline, read_metadata

    try:
        if (path / PIPELINE_META_FILE).is_file():
            names = json.loads((path / PIPELINE_META_FILE).read_text())["quantized_components"]
            metas = {path / n: read_metadata(path / n) for n in names}
            loaded = load_pipeline(path)
        else:
            metas = {path: read_metadata(path)}
            loaded = load_quantized(path)
    except (ValueError, OSError) as e:  # a missing or corrupt file (FileNotFoundError is an OSError)
        raise typer.BadParameter(str(e), param_hint="PATH") from None
    for comp, meta in metas.items():
        cfg = meta["quant_config"]
        console.print(str(comp), style="bold", markup=False, soft_wrap=True)
        console.print(f"{meta['model_class'].rpartition('.')[2]}, preset {cfg['name']}, attention {cfg['attention']}",
                      markup=False, soft_wrap=True)
        table, summary = _layer_table(meta)
        console.print(table)
        console.print(summary, markup=False)
    console.print(memory_report(loaded).table())


def _preset_columns(cfg) -> tuple[str, str, str]:
    """weights, activations and notes of a QuantConfig, for `viditq presets`."""
    w, a, mp = cfg.weight, cfg.act, cfg.mixed_precision
    if w.format == "fp8":
        weights = "fp8 per-channel"
    else:
        g = "per-tensor" if w.per_tensor else (f"g{w.group_size}" if w.group_size else "per-channel")
        weights = f"int{w.bits} {g}{'' if w.symmetric else ' asym'}{' GPTQ' if w.gptq else ''}"
    acts = f"{'fp8' if a.format == 'fp8' else f'int{a.bits}'} " + \
        ("per-token" if a.granularity == "per_token" else "per-tensor static")
    notes = []
    if mp is not None:
        budget = " / ".join(x for x in (f"{mp.budget_bits:g} bits executed" if mp.budget_bits else "",
                                        f"<= {mp.memory_bits:g} stored" if mp.memory_bits else "") if x)
        notes.append(f"mixed precision: {mp.high_bits}-bit weights where sensitive, {budget}")
        if mp.flicker:
            notes.append("flicker-aware")
        if mp.float_act_budget:
            notes.append(f"float activations on <= {mp.float_act_budget:.0%} of the weights")
    if w.gptq_temporal:
        notes.append("temporal GPTQ on video")
    if cfg.float_final_steps:
        n = cfg.float_final_steps
        notes.append(f"float activations in the last {'step' if n == 1 else f'{n} steps'} (of the calibration run)")
    if cfg.conditioning_bits:
        notes.append(f"conditioning layers W{cfg.conditioning_bits} weight-only")
    if cfg.attention != "bf16":
        notes.append(f"{cfg.attention} attention")
    if cfg.balance is None:
        notes.append("no balancing" + (" (naive baseline)" if a.granularity != "per_token" else " (ablation)"))
    return weights, acts, "; ".join(notes)


@app.command()
def presets():
    """List the built-in presets (use a name with `viditq quantize --preset`)."""
    from rich import box

    from .config import PRESETS

    table = Table(box=box.SIMPLE_HEAD, caption="Activations are smoothed and rotated unless noted.",
                  caption_justify="left")
    table.add_column("preset", no_wrap=True)
    for name in ("weights", "activations", "notes"):
        table.add_column(name, overflow="fold")
    for name, cfg in PRESETS.items():
        table.add_row(name, *_preset_columns(cfg))
    console.print(table)


@app.command()
def sensitivity(
    model: Path = typer.Option(..., help="Local diffusers pipeline directory (float)."),
    prompts: Path = typer.Option(..., help="Calibration prompts, one per line."),
    out: Path = typer.Option(Path("out/sensitivity"), help="Folder for sensitivity.json/.png and config.yaml."),
    preset: str = typer.Option("w4a8", help="Low-precision base: preset name or QuantConfig .yaml/.json."),
    ranges: int = typer.Option(_MP_DEFAULTS.timestep_ranges, help="Number of timestep ranges."),
    final_range_steps: int = typer.Option(_MP_DEFAULTS.final_range_steps,
                                          help="The last N denoising steps get a timestep range of their own (one "
                                               "of --ranges; 0: all ranges even)."),
    groups: str = typer.Option(_MP_DEFAULTS.groups, help="Layer grouping: block | role | layer."),
    high_bits: int = typer.Option(_MP_DEFAULTS.high_bits, help="Weight bits of upgraded groups."),
    budget_bits: float = typer.Option(_MP_DEFAULTS.budget_bits, help="Average weight bits as executed."),
    memory_bits: Optional[float] = typer.Option(_MP_DEFAULTS.memory_bits, help="Cap on average stored bits."),
    float_act_budget: float = typer.Option(_MP_DEFAULTS.float_act_budget,
                                           help="Share of the executed weights that may run with float "
                                                "activations (0: off; probes the A16 levels too)."),
    flicker: bool = typer.Option(_MP_DEFAULTS.flicker,
                                 help="Video models: also measure the flicker of the last step's output and "
                                      "allocate for it (as the w4a8-mp-video preset)."),
    steps: int = typer.Option(20, min=1, help="Denoising steps during calibration."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    pipe_arg: list[str] = typer.Option([], help="Extra pipeline call argument key=value (repeatable)."),
):
    """Measure each layer group's sensitivity per timestep range (output-MSE proxy; --flicker: and the flicker of
    video models), plot a heatmap, and write the mixed-precision QuantConfig that meets the budget (use it with
    `viditq quantize --preset`)."""
    from . import capture_calibration
    from .mixed_precision import plot_sensitivity, spec_allocation

    device = _device(device)
    pipe_kwargs = _parse_pipe_args(pipe_arg, CALIB_CALL_ARGS)
    base = _resolve_preset(preset)
    try:  # before calibrating: the spec checks its settings
        spec = MixedPrecisionSpec(budget_bits=budget_bits, memory_bits=memory_bits, high_bits=high_bits,
                                  timestep_ranges=ranges, groups=groups, float_act_budget=float_act_budget,
                                  final_range_steps=final_range_steps, flicker=flicker,
                                  cache=str(out / "sensitivity.json"))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    prompt_list = _read_prompts(prompts)
    pipe = _load_any_pipeline(model, device, float_only=True)
    _check_call_args(pipe, pipe_kwargs)
    console.print(f"calibrating on {len(prompt_list)} prompts x {steps} steps")
    calib = capture_calibration(pipe, prompt_list, num_inference_steps=steps, **pipe_kwargs)
    out.mkdir(parents=True, exist_ok=True)
    try:
        table, allocation = spec_allocation(pipe.transformer, calib, base, spec, name=f"{base.name}-mp-measured")
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    plot_sensitivity(table, out / "sensitivity.png")
    allocation.config.save(out / "config.yaml")
    console.print(allocation.summary())
    console.print(f"[green]wrote[/green] {out / 'sensitivity.json'}, {out / 'sensitivity.png'}, {out / 'config.yaml'}")


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Report folder."),
    full: bool = typer.Option(False, help="Evaluate enough samples for stable metrics (slower)."),
    preset: list[str] = typer.Option([], help="Presets to run (default: all of the demo's)."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help=DEVICE_HELP),
):
    """Quantize the embedded tiny T2I/T2V models with each preset and write a visual report."""
    from .demo import run_demo

    run_demo(out, presets=preset or None, full=full, seed=seed, device=_device(device))


def main():  # pragma: no cover
    app()
