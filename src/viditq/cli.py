"""Command line: a thin layer over the Python API (same configs, same defaults)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import MixedPrecisionSpec

app = typer.Typer(add_completion=False, no_args_is_help=True, help="viditq: quantize diffusion transformers.")
console = Console()


_MP_DEFAULTS = MixedPrecisionSpec()


def _parse_pipe_args(pairs: list[str]) -> dict:
    """``key=value`` pairs for the pipeline call; values are parsed as JSON when possible (16, false, 7.5)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {pair!r}", param_hint="--pipe-arg")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise typer.BadParameter(f"prompt file not found: {path}", param_hint="--prompts")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise typer.BadParameter(f"{path} has no prompts (one per line)", param_hint="--prompts")
    return prompts


def _load_any_pipeline(path: Path, device: str):
    from .checkpoint import PIPELINE_META_FILE, load_pipeline
    from .models import pipeline_class_for

    if not path.is_dir():
        raise typer.BadParameter(f"not a directory: {path}", param_hint="--model")
    if (path / PIPELINE_META_FILE).is_file():
        return load_pipeline(path, device=device)
    if not (path / "model_index.json").is_file():
        raise typer.BadParameter(f"{path} is not a diffusers pipeline directory (no model_index.json)",
                                 param_hint="--model")
    return pipeline_class_for(path).from_pretrained(path).to(device)


@app.command()
def quantize(
    model: Path = typer.Option(..., help="Local diffusers pipeline directory."),
    preset: str = typer.Option("w8a8", help="Preset name, or a QuantConfig .yaml/.json path."),
    prompts: Path = typer.Option(..., help="Calibration prompts, one per line."),
    out: Path = typer.Option(..., help="Output directory (diffusers layout, quantized transformer)."),
    steps: int = typer.Option(20, help="Denoising steps during calibration."),
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
    device: str = typer.Option("auto", help="cpu | cuda | auto."),
    pipe_arg: list[str] = typer.Option([], help="Extra pipeline call argument key=value (repeatable)."),
):
    """Calibrate on PROMPTS, quantize the pipeline's transformer, and save the pipeline to OUT."""
    import dataclasses

    from . import memory_report, quantize_pipeline, save_quantized
    from .config import resolve_config

    try:
        config = resolve_config(preset)
        if attention is not None:
            config = dataclasses.replace(config, attention=attention)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e), param_hint="--preset") from None
    if conditioning_bits is not None:
        try:
            config = dataclasses.replace(config, conditioning_bits=conditioning_bits or None)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--conditioning-bits") from None
    if ff_hand_off is not None:
        config = dataclasses.replace(config, ff_hand_off=ff_hand_off)
    if gptq_temporal is not None:
        try:
            config = dataclasses.replace(config, weight=dataclasses.replace(config.weight, gptq_temporal=gptq_temporal))
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--gptq-temporal") from None
    if text_encoder_bits not in (0, 4, 8):
        raise typer.BadParameter(f"expected 8, 4 or 0, got {text_encoder_bits}", param_hint="--text-encoder-bits")
    prompt_list = _read_prompts(prompts)
    pipe = _load_any_pipeline(model, _device(device))
    console.print(f"calibrating on {len(prompt_list)} prompts x {steps} steps")
    quantize_pipeline(pipe, config, prompt_list, text_encoder_bits=text_encoder_bits or None,
                      num_inference_steps=steps, **_parse_pipe_args(pipe_arg))
    for name, cos in pipe.quantization_report["text_embedding_cosine"].items():
        console.print(f"{name}: text-embedding cosine similarity vs float {cos:.5f}")
    save_quantized(pipe, out)
    console.print(memory_report(pipe).table())
    console.print(f"[green]saved[/green] {out}")


@app.command()
def generate(
    model: Path = typer.Option(..., help="Quantized (or float) diffusers pipeline directory."),
    prompt: list[str] = typer.Option(..., help="Prompt (repeatable)."),
    out: Path = typer.Option(..., help="Output image (.png) or video (.gif/.mp4) path; one per prompt."),
    steps: int = typer.Option(20),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    pipe_arg: list[str] = typer.Option([], help="Extra pipeline call argument key=value (repeatable)."),
    gpus: int = typer.Option(1, help="GPUs for context-parallel (Ulysses) generation; with --device cpu, processes."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the transformer's repeated blocks "
                                 "(viditq.compile_blocks): faster steps after a compile of tens of seconds."),
):
    """Generate images or videos with a (quantized) pipeline."""
    import torch

    from .media import save_media

    if gpus != 1:
        from .parallel import generate_parallel

        try:
            paths = generate_parallel(model, prompt, out, gpus, steps=steps, seed=seed,
                                      pipe_kwargs=_parse_pipe_args(pipe_arg),
                                      device="cuda" if device == "auto" else device)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--gpus") from None
        for path in paths:
            console.print(f"[green]wrote[/green] {path}")
        return
    pipe = _load_any_pipeline(model, _device(device))
    if compile:
        from . import compile as regional

        console.print(f"compiling {regional.compile_blocks(pipe.transformer)} transformer blocks")
    kwargs = _parse_pipe_args(pipe_arg)
    for i, text in enumerate(prompt):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        result = pipe(prompt=text, num_inference_steps=steps, generator=generator, output_type="np", **kwargs)
        media = result.frames[0] if hasattr(result, "frames") else result.images[0]
        path = out if len(prompt) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        save_media(media, path)
        console.print(f"[green]wrote[/green] {path}")


@app.command()
def info(path: Path = typer.Argument(..., help="A viditq checkpoint or quantized pipeline directory.")):
    """Describe a quantized checkpoint: config, layers by bit-width, weight memory."""
    from . import load_quantized, memory_report
    from .checkpoint import PIPELINE_META_FILE, read_metadata

    components = [path]
    is_pipeline = (path / PIPELINE_META_FILE).is_file()
    if is_pipeline:
        components = [path / n for n in json.loads((path / PIPELINE_META_FILE).read_text())["quantized_components"]]
    for comp in components:
        try:
            meta = read_metadata(comp)
        except (FileNotFoundError, ValueError) as e:
            raise typer.BadParameter(str(e), param_hint="PATH") from None
        cfg = meta["quant_config"]
        kinds = Counter(f"W{s['weight_bits']}A{s['act_bits']}" + (" fp8" if s.get("fp8") else "")
                        for s in meta["layers"].values())
        table = Table(title=f"{comp}  ({meta['model_class']}, preset {cfg['name']}, attention {cfg['attention']})")
        table.add_column("layers")
        table.add_column("count", justify="right")
        for kind, n in sorted(kinds.items()):
            table.add_row(kind, str(n))
        views = Counter(k for info in meta.get("switch_layers", {}).values() for k in info.get("float_act", {}))
        for kind, n in sorted(views.items()):
            table.add_row(f"{kind.upper()} ranges (float activations, stored weights)", str(n))
        console.print(table)
        if not is_pipeline:
            console.print(memory_report(load_quantized(comp)).table())
    if is_pipeline:
        from .checkpoint import load_pipeline

        console.print(memory_report(load_pipeline(path)).table())


@app.command()
def presets():
    """List the built-in presets."""
    from .config import PRESETS

    table = Table("preset", "weights", "activations", "balancing")
    for name, cfg in PRESETS.items():
        w = cfg.weight
        g = "per-tensor" if w.per_tensor else (f"g{w.group_size}" if w.group_size else "per-channel")
        bal = "smooth+rotate" if cfg.balance else "none"
        last = f", float in the last {cfg.float_final_steps} step(s)" if cfg.float_final_steps else ""
        table.add_row(name, f"{w.bits}-bit {g} {'sym' if w.symmetric else 'asym'}",
                      f"{cfg.act.bits}-bit {cfg.act.granularity}{last}", bal)
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
    steps: int = typer.Option(20, help="Denoising steps during calibration."),
    device: str = typer.Option("auto", help="cpu | cuda | auto."),
    pipe_arg: list[str] = typer.Option([], help="Extra pipeline call argument key=value (repeatable)."),
):
    """Measure each layer group's sensitivity per timestep range (output-MSE proxy; --flicker: and the flicker of
    video models), plot a heatmap, and write the mixed-precision QuantConfig that meets the budget (use it with
    `viditq quantize --preset`)."""
    from . import capture_calibration
    from .config import resolve_config
    from .mixed_precision import plot_sensitivity, spec_allocation

    try:
        base = resolve_config(preset)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e), param_hint="--preset") from None
    try:  # before calibrating: the spec checks its settings
        spec = MixedPrecisionSpec(budget_bits=budget_bits, memory_bits=memory_bits, high_bits=high_bits,
                                  timestep_ranges=ranges, groups=groups, float_act_budget=float_act_budget,
                                  final_range_steps=final_range_steps, flicker=flicker,
                                  cache=str(out / "sensitivity.json"))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    prompt_list = _read_prompts(prompts)
    pipe = _load_any_pipeline(model, _device(device))
    console.print(f"calibrating on {len(prompt_list)} prompts x {steps} steps")
    calib = capture_calibration(pipe, prompt_list, num_inference_steps=steps, **_parse_pipe_args(pipe_arg))
    out.mkdir(parents=True, exist_ok=True)
    try:
        table, allocation = spec_allocation(pipe.transformer, calib, base, spec)
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
    device: str = typer.Option("auto"),
):
    """Quantize the embedded tiny T2I/T2V models with each preset and write a visual report."""
    from .demo import run_demo

    run_demo(out, presets=preset or None, full=full, seed=seed, device=_device(device))


def main():  # pragma: no cover
    app()
