"""The demo: quantize the embedded tiny T2I / T2V models with each preset and report what it costs in quality.

For each model: load the shipped pipeline, capture calibration inputs from a few prompts, then for every preset
deep-copy the float transformer, ``viditq.quantize`` it, generate from fixed held-out prompts and seeds, and score
the samples (probe attribute accuracy, Fréchet distance in probe features, PSNR / SSIM against the float samples of
the same seeds, temporal metrics for videos) next to the weight memory. A "real" row scores the ground-truth
renders of the same prompts, i.e. what a perfect generator would get.

Writes ``out_dir/``: ``t2i_grid.png`` (rows = presets), ``t2v_videos.gif`` (+ ``.mp4``), ``metrics.json``,
``report.md``.
"""
from __future__ import annotations

import contextlib
import copy
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DEMO_PRESETS = ("fp", "w8a8", "w8a8-fp8", "w6a6", "w4a8", "w4a4")
# Mixed precision measures every layer group's sensitivity first: about a minute for the tiny T2I model on one CPU
# core, several for the T2V one, so only `--full` (or an explicit preset list) runs it.
FULL_EXTRA_PRESETS = ("w4a8-mp",)
REAL_ROW = "real"
PROMPT_SEED = 4242  # the demo's held-out prompts
CALIB_SEED = 99  # calibration prompts (a different draw from the training split)
GUIDANCE = 4.0

T2I_COLUMNS = ["attribute_accuracy", "all_correct", "fd_probe", "psnr_vs_fp", "ssim_vs_fp", "weight_mib", "gen_s"]
T2V_COLUMNS = ["attribute_accuracy", "direction_accuracy", "speed_accuracy", "frame_consistency", "flicker",
               "fd_probe", "psnr_vs_fp", "ssim_vs_fp", "weight_mib", "gen_s"]


@dataclass(frozen=True)
class DemoSize:
    images: int  # T2I prompts (one sample each)
    videos: int  # T2V prompts
    steps: int  # sampling steps
    calib_prompts: int  # prompts whose transformer inputs calibrate the quantizers
    batch_size: int


DEFAULT_SIZE = DemoSize(images=4, videos=1, steps=8, calib_prompts=1, batch_size=8)
FULL_SIZE = DemoSize(images=128, videos=32, steps=10, calib_prompts=8, batch_size=32)


def _check_presets(presets, full: bool) -> list[str]:
    from .config import PRESETS

    available = ["fp"] + sorted(PRESETS)
    defaults = DEMO_PRESETS + (FULL_EXTRA_PRESETS if full else ())
    chosen = list(presets) if presets else [p for p in defaults if p == "fp" or p in PRESETS]
    unknown = [p for p in chosen if p not in available]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; choose from {available}")
    if "fp" not in chosen:  # the float samples are the reference of PSNR / SSIM
        chosen.insert(0, "fp")
    return chosen


@contextlib.contextmanager
def _inner_progress_off():
    """Silence viditq's own per-layer bars while the demo's bar is live (rich allows one live display)."""
    old = os.environ.get("VIDITQ_PROGRESS")
    os.environ["VIDITQ_PROGRESS"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VIDITQ_PROGRESS", None)
        else:
            os.environ["VIDITQ_PROGRESS"] = old


@contextlib.contextmanager
def _cpu_threads(device: str):
    """One intra-op thread when the CPU's cores are already busy (load average >= cores - 0.5): OpenMP threads
    that wait for a busy core make every op many times slower (17x measured on a shared 2-core machine)."""
    old = torch.get_num_threads()
    cores = os.cpu_count() or 1
    busy = str(device) == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] >= cores - 0.5
    if busy:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _calibration(pipe, kind: str, size: DemoSize, seed: int) -> list[dict]:
    from .calibrate import capture_calibration
    from .models.data import model_scenes

    prompts = [s.caption for s in model_scenes(kind, size.calib_prompts, seed + CALIB_SEED, split="train")]
    gens = [torch.Generator().manual_seed(seed + CALIB_SEED + i) for i in range(len(prompts))]
    return capture_calibration(pipe, prompts, num_inference_steps=size.steps, guidance_scale=GUIDANCE,
                               generator=gens, output_type="pt")


def _run_model(kind: str, presets: list[str], size: DemoSize, seed: int, device: str, probe, progress, task):
    """Metrics per preset (plus the real row) and the samples, for one model."""
    from . import memory_report, quantize
    from .metrics.evaluate import evaluate_samples, generate, real_samples
    from .models import load_t2i_pipeline, load_t2v_pipeline
    from .models.data import model_scenes

    pipe = (load_t2i_pipeline if kind == "t2i" else load_t2v_pipeline)(device=device)
    pipe.set_progress_bar_config(disable=True)
    scenes = model_scenes(kind, size.images if kind == "t2i" else size.videos, seed + PROMPT_SEED, split="test")
    prompts = [s.caption for s in scenes]
    progress.update(task, description=f"{kind}: calibrating")
    calib = _calibration(pipe, kind, size, seed)
    float_transformer = pipe.transformer
    real = real_samples(scenes)
    metrics = {REAL_ROW: evaluate_samples(real, scenes, probe)}
    samples = {REAL_ROW: real}
    for preset in presets:
        progress.update(task, description=f"{kind}: {preset} quantizing")
        t0 = time.perf_counter()
        if preset == "fp":
            pipe.transformer = float_transformer
        else:
            pipe.transformer = quantize(copy.deepcopy(float_transformer), preset, calib=calib)
        quant_s = time.perf_counter() - t0
        progress.update(task, description=f"{kind}: {preset} generating")
        t0 = time.perf_counter()
        x = generate(pipe, prompts, seed=seed, num_inference_steps=size.steps, guidance_scale=GUIDANCE,
                     batch_size=size.batch_size)
        gen_s = time.perf_counter() - t0
        m = evaluate_samples(x, scenes, probe, reference=None if preset == "fp" else samples["fp"])
        m.update(weight_mib=memory_report(pipe.transformer).total_after / 2**20, quant_s=quant_s, gen_s=gen_s)
        metrics[preset], samples[preset] = m, x
        progress.advance(task)
    pipe.transformer = float_transformer
    return metrics, samples, prompts


def _write_media(out: Path, kind: str, samples: dict[str, torch.Tensor]) -> list[str]:
    from .report import image_grid, save_video_grid

    labels = list(samples)
    if kind == "t2i":
        image_grid([samples[k] for k in labels], labels).save(out / "t2i_grid.png")
        return ["t2i_grid.png"]
    return [p.name for p in save_video_grid([samples[k] for k in labels], labels, out / "t2v_videos")]


def _report_markdown(results: dict, media: dict, settings: dict) -> str:
    from .report import markdown_table

    lines = [
        "# viditq demo: quantizing the embedded tiny T2I / T2V DiTs", "",
        f"{settings['images']} images and {settings['videos']} videos from held-out prompts, "
        f"{settings['steps']} DPM-Solver steps, guidance {settings['guidance']}, seed {settings['seed']}, "
        f"device {settings['device']}, {settings['elapsed_s']:.0f} s in total"
        + (" (`--full`)." if settings["full"] else " (default size: metrics are indicative only; run `--full`)."),
        "", "Row `real` scores the ground-truth renders of the same prompts (what a perfect model would get); "
        "PSNR / SSIM compare each preset with the float model (`fp`) from the same seeds; `weight_mib` is the "
        "transformer's weight memory.", "",
        "## Text-to-image (PixArt-style DiT, 32x32)", "", markdown_table(results["t2i"], T2I_COLUMNS), "",
        *[f"![{m}]({m})" for m in media["t2i"]], "", "Prompts (left to right):", "",
        *[f"{i + 1}. {p}" for i, p in enumerate(results["prompts"]["t2i"])], "",
        "## Text-to-video (CogVideoX-style DiT, 16 frames of 32x32)", "", markdown_table(results["t2v"], T2V_COLUMNS), "",
        *[f"![{m}]({m})" if m.endswith(".gif") else f"[{m}]({m})" for m in media["t2v"]], "",
        "Prompts (left to right):", "", *[f"{i + 1}. {p}" for i, p in enumerate(results["prompts"]["t2v"])], "",
        "Metrics: `attr acc` = probe-judged share of named attributes shown right (shape, colour, size, "
        "position / relation); `all ok` = share of samples (frames) with every attribute right; `FD` = Fréchet "
        "distance to the real renders in probe features (lower is better; with few samples only comparable "
        "between rows); `PSNR` (dB) / `SSIM` vs `fp` from the same seeds; `MiB` = transformer weight memory; "
        "`dir acc` / `speed acc` = tracked object motion vs the caption; `consist` = cosine similarity of "
        "consecutive frames' probe features; `flicker` = mean |second temporal difference| of pixel values; "
        "`gen s` = generation time.", "",
    ]
    return "\n".join(lines)


def run_demo(out_dir: str | Path = "out/demo", presets=None, full: bool = False, seed: int = 0,
             device: str = "cpu", console=None, size: DemoSize | None = None) -> dict:
    """Run the demo and write its report to ``out_dir``; returns the metrics (also in ``metrics.json``).

    ``presets``: names from ``viditq.config.PRESETS`` plus "fp" (default: :data:`DEMO_PRESETS` that exist);
    ``full``: :data:`FULL_SIZE` sample counts instead of :data:`DEFAULT_SIZE`; ``size`` overrides both.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .metrics.probe import load_probe
    from .report import rich_table, write_json

    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen, size = _check_presets(presets, full), size or (FULL_SIZE if full else DEFAULT_SIZE)
    start = time.perf_counter()
    probe = load_probe(device=device)
    results: dict = {"prompts": {}}
    media: dict = {}
    columns = [TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress, _inner_progress_off(), \
            _cpu_threads(device):
        threads = torch.get_num_threads()
        for kind in ("t2i", "t2v"):
            task = progress.add_task(kind, total=len(chosen))
            metrics, samples, prompts = _run_model(kind, chosen, size, seed, device, probe, progress, task)
            progress.update(task, description=f"{kind}: writing media")
            results[kind], results["prompts"][kind] = metrics, prompts
            media[kind] = _write_media(out, kind, samples)
            progress.update(task, description=f"{kind}: done")
    settings = {**asdict(size), "guidance": GUIDANCE, "seed": seed, "device": str(device), "full": full,
                "presets": chosen, "elapsed_s": time.perf_counter() - start, "torch": torch.__version__,
                "platform": platform.platform(), "threads": threads}
    results["settings"] = settings
    write_json(results, out / "metrics.json")
    (out / "report.md").write_text(_report_markdown(results, media, settings))
    console.print(rich_table(results["t2i"], T2I_COLUMNS, "text-to-image"))
    console.print(rich_table(results["t2v"], T2V_COLUMNS, "text-to-video"))
    console.print(f"report: {out / 'report.md'}  ({settings['elapsed_s']:.1f} s)")
    return results
