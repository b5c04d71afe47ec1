"""Train the embedded models on procedural data drawn on the fly, then evaluate them.

    python -m viditq.models.train --model probe --time-budget 150 --out DIR   # attribute probe (metrics)
    python -m viditq.models.train --model t2i   --time-budget 420 --out DIR   # PixArt-style text-to-image
    python -m viditq.models.train --model t2v   --time-budget 420 --out DIR   # CogVideoX-style text-to-video
    python -m viditq.models.train --model eval  --out DIR                     # accuracies of DIR's models

Each run writes ``DIR/<model>.safetensors`` (fp16, configs in the metadata; refreshed every ``--save-every``
seconds, so a stopped run still leaves weights) and logs one line per ``--log-every`` steps. The learning rate
follows a warm-up then a cosine over the *wall-clock* budget (or over ``--max-steps`` if given), so a faster card
trains more steps in the same time; the step count reached is written into the file's metadata.

Diffusion objective: rectified flow. ``x_s = (1 - s) x0 + s noise`` with ``s ~ sigmoid(N(0, 1))``; the transformer
gets ``timestep = 1000 s`` and predicts the velocity ``noise - x0`` (the convention of the DPM-Solver flow
scheduler the pipelines sample with). 10 % of captions are dropped to "" for classifier-free guidance.
The weights saved are an exponential moving average (decay 0.999) of the trained ones.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from .data import TRAINED_SCENES, label_arrays, pack_scenes, render_packed, sample_image_scene, sample_video_scene
from .text import build_tokenizer

CFG_DROP = 0.1
EMA_DECAY = 0.999
WARMUP_STEPS = 300
PROBE_VIDEO_FRACTION = 0.25  # share of probe batches made of single video frames (free positions)


# ------------------------------------------------------------------------------------------ data
class SceneBatches(IterableDataset):
    """Endless batches of packed scenes (+ token ids, + probe labels) from seeded numpy Generators.

    Worker ``w`` of run seed ``s`` draws from ``default_rng([s, w])``; the loader interleaves workers in a fixed
    order, so a run's data stream depends only on the seed and the worker count.
    """

    def __init__(self, kind: str, batch_size: int, seed: int, split: str = "train", with_labels: bool = False,
                 scene_kwargs: dict | None = None):
        self.kind, self.batch_size, self.seed, self.split = kind, batch_size, seed, split
        self.with_labels, self.scene_kwargs = with_labels, scene_kwargs or {}

    def _scenes(self, rng: np.random.Generator, kind: str, n: int) -> list:
        sample = sample_image_scene if kind == "image" else sample_video_scene
        out = []
        while len(out) < n:
            scene = sample(rng, **self.scene_kwargs.get(kind, {}))
            if self.split == "all" or scene.held_out == (self.split == "test"):
                out.append(scene)
        return out

    def _batch(self, rng: np.random.Generator, tokenizer) -> dict:
        if self.kind == "probe":  # images plus single frames of videos (objects anywhere, not on the grid)
            n_video = int(self.batch_size * PROBE_VIDEO_FRACTION)
            images, videos = self._scenes(rng, "image", self.batch_size - n_video), self._scenes(rng, "video", n_video)
            batch = {"image": pack_scenes(images), "video": pack_scenes(videos)}
            batch["labels"] = {k: np.concatenate([a, b]) for (k, a), b in
                               zip(label_arrays(images).items(), label_arrays(videos).values())}
            batch["video_frame"] = rng.integers(0, videos[0].num_frames, size=n_video)
            return batch
        scenes = self._scenes(rng, self.kind, self.batch_size)
        captions = [s.caption if rng.random() >= CFG_DROP else "" for s in scenes]
        tokens = tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                           return_tensors="np")
        return {"scenes": pack_scenes(scenes), "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        tokenizer = build_tokenizer()
        while True:
            yield self._batch(rng, tokenizer)


def make_loader(kind: str, batch_size: int, seed: int, workers: int, **kwargs) -> DataLoader:
    return DataLoader(SceneBatches(kind, batch_size, seed, **kwargs), batch_size=None, num_workers=workers,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


# ------------------------------------------------------------------------------------------ helpers
class Schedule:
    """Linear warm-up, then cosine to 10 % over the time budget or the step budget (whichever is set)."""

    def __init__(self, base_lr: float, time_budget: float | None, max_steps: int | None):
        self.base_lr, self.time_budget, self.max_steps = base_lr, time_budget, max_steps
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        fractions = []
        if self.time_budget:
            fractions.append(self.elapsed() / self.time_budget)
        if self.max_steps:
            fractions.append(step / self.max_steps)
        return min(1.0, max(fractions))

    def lr(self, step: int) -> float:
        warm = min(1.0, (step + 1) / WARMUP_STEPS)
        return self.base_lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * self.progress(step))))

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int) -> None:
    decay = min(EMA_DECAY, (1 + step) / (10 + step))  # short memory early on, while weights move fast
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


def log(path: Path | None, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if path is not None:
        with path.open("a") as f:
            f.write(line + "\n")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


# ------------------------------------------------------------------------------------------ diffusion
def velocity_loss(pipe, x_s, ids, mask, sigma, target) -> torch.Tensor:
    """Text encoder + transformer + MSE: the part of a training step that ``--compile`` hands to torch.compile."""
    with autocast(x_s.device):
        embeds = pipe.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pred = pipe.predict_velocity(x_s, embeds, mask, sigma * 1000)
    return F.mse_loss(pred.float(), target)


def diffusion_loss(pipe, batch: dict, device: torch.device, loss_fn=velocity_loss) -> torch.Tensor:
    """Rectified-flow velocity MSE on one batch (pipeline modules in train mode)."""
    x0 = render_packed(batch["scenes"], device) * 2 - 1  # (B, 3, H, W) or (B, 3, F, H, W) in [-1, 1]
    ids = torch.as_tensor(batch["input_ids"]).to(device, non_blocking=True)
    mask = torch.as_tensor(batch["attention_mask"]).to(device, non_blocking=True)
    noise = torch.randn_like(x0)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], device=device))  # logit-normal(0, 1)
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    x_s = (1 - s) * x0 + s * noise
    return loss_fn(pipe, x_s, ids, mask, sigma, noise - x0)


def _diffusion_setup(kind: str, args, device: torch.device):
    """(pipeline in train mode, its frozen EMA copy, trained parameters, optimizer)."""
    from . import load_pipeline_weights, new_pipeline

    torch.manual_seed(args.seed)
    pipe = load_pipeline_weights(args.init) if args.init else new_pipeline(kind)  # --init: continue a run
    pipe.transformer.to(device).train()
    pipe.text_encoder.to(device).train()
    ema = copy.deepcopy(pipe)  # EMA copy of both trained modules; this is what gets saved
    for m in (ema.transformer, ema.text_encoder):
        m.eval().requires_grad_(False)
    params = list(pipe.transformer.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01, fused=device.type == "cuda")
    return pipe, ema, params, opt


def _run_info(kind: str, args, step: int, schedule: Schedule, losses: list[float], device) -> dict:
    """What a weight file records about the run that made it."""
    return {"model": kind, "steps": step, "samples": step * args.batch_size, "batch_size": args.batch_size,
            "lr": args.lr, "train_time_s": round(schedule.elapsed(), 1), "final_loss": float(np.mean(losses[-200:])),
            "device": device_name(device), "seed": args.seed, "command": " ".join(sys.argv),
            "scene_kwargs": TRAINED_SCENES[kind][1], "compiled": bool(args.compile),
            "continued_from": _previous_runs(args.init)}


def _previous_runs(path: Path | None) -> list[dict]:
    """The run records of the weights a ``--init`` run starts from (so a file lists every run that made it)."""
    if path is None:
        return []
    from .weights import load_bundle

    info = load_bundle(path)[1].get("info", {})
    earlier = info.pop("continued_from", [])
    return [*earlier, {k: info.get(k) for k in ("steps", "samples", "batch_size", "lr", "train_time_s", "final_loss",
                                                "device", "command")}]


def train_diffusion(kind: str, args) -> dict:
    """Train the ``kind`` ("t2i" | "t2v") pipeline until the budget ends; saves EMA snapshots as it goes."""
    from . import save_pipeline_weights

    device = torch.device(args.device)
    pipe, ema, params, opt = _diffusion_setup(kind, args, device)
    scene_kind, scene_kwargs = TRAINED_SCENES[kind]
    loader = make_loader(scene_kind, args.batch_size, args.seed, args.workers, scene_kwargs={scene_kind: scene_kwargs})
    schedule, out_path = Schedule(args.lr, args.time_budget, args.max_steps), Path(args.out) / f"{kind}.safetensors"
    loss_fn = torch.compile(velocity_loss, fullgraph=True, dynamic=False) if args.compile else velocity_loss
    step, losses, pending, last_save, info = 0, [], [], time.perf_counter(), {}
    for batch in loader:
        for group in opt.param_groups:
            group["lr"] = schedule.lr(step)
        try:
            loss = diffusion_loss(pipe, batch, device, loss_fn)
        except Exception as exc:  # noqa: BLE001 - a compiler failure must not cost the run: train eagerly
            if loss_fn is velocity_loss:
                raise
            log(args.log, {"model": kind, "compile_failed": f"{type(exc).__name__}: {str(exc)[:300]}"})
            loss_fn = velocity_loss
            loss = diffusion_loss(pipe, batch, device, loss_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema.transformer, pipe.transformer, step)
        ema_update(ema.text_encoder, pipe.text_encoder, step)
        pending.append(loss.detach())  # read back in groups: a .item() per step would stall the GPU queue
        step += 1
        finished = schedule.done(step)
        if step % args.log_every == 0 or finished or time.perf_counter() - last_save > args.save_every:
            losses.extend(torch.stack(pending).tolist())
            pending.clear()
        if step % args.log_every == 0:
            log(args.log, {"model": kind, "step": step, "time_s": round(schedule.elapsed(), 1),
                           "loss": round(float(np.mean(losses[-args.log_every:])), 5), "lr": schedule.lr(step)})
        if finished or time.perf_counter() - last_save > args.save_every:
            info = _run_info(kind, args, step, schedule, losses, device)
            save_pipeline_weights(ema, out_path, kind, info)
            last_save = time.perf_counter()
        if finished:
            break
    log(args.log, {"model": kind, "done": True, **info})
    return info


PROBE_SCENES = {"image": TRAINED_SCENES["t2i"][1], "video": TRAINED_SCENES["t2v"][1]}


# ------------------------------------------------------------------------------------------ probe
def probe_inputs(batch: dict, device: torch.device, noise: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images (B, 3, H, W) in [0, 1] and labels; ``noise`` adds the augmentation that makes the probe tolerant of
    a generator's small errors (pixel noise up to 0.08, brightness jitter up to 0.05)."""
    images = render_packed(batch["image"], device)
    videos = render_packed(batch["video"], device)  # (Bv, 3, F, H, W)
    frame = torch.as_tensor(batch["video_frame"], device=device)
    frames = videos[torch.arange(len(frame), device=device), :, frame]  # (Bv, 3, H, W)
    x = torch.cat([images, frames])
    if noise:
        b = x.shape[0]
        x = x + torch.rand(b, 1, 1, 1, device=device) * 0.08 * torch.randn_like(x)
        x = x + (torch.rand(b, 1, 1, 1, device=device) - 0.5) * 0.1
        x = x.clamp(0, 1)
    labels = {k: torch.as_tensor(v, device=device) for k, v in batch["labels"].items()}
    return x, labels


def probe_loss(probe, x, labels) -> torch.Tensor:
    """Sum over heads of the mean cross-entropy over the samples the head applies to (label >= 0)."""
    total = 0.0
    for k, logits in probe(x).items():
        ce = F.cross_entropy(logits.float(), labels[k], ignore_index=-1, reduction="sum")
        total = total + ce / (labels[k] >= 0).sum().clamp(min=1)  # a head with no labelled sample adds 0, not NaN
    return total


@torch.no_grad()
def probe_accuracy(probe, device: torch.device, n_batches: int, batch_size: int, seed: int) -> dict[str, float]:
    """Per-head accuracy on fresh real samples (all splits), without augmentation."""
    probe.eval()
    loader = iter(make_loader("probe", batch_size, seed, 0, split="all",
                              scene_kwargs=PROBE_SCENES))
    hits, counts = {}, {}
    for _ in range(n_batches):
        x, labels = probe_inputs(next(loader), device, noise=False)
        for k, logits in probe(x).items():
            valid = labels[k] >= 0
            hits[k] = hits.get(k, 0) + int((logits.argmax(-1) == labels[k])[valid].sum())
            counts[k] = counts.get(k, 0) + int(valid.sum())
    probe.train()
    return {k: hits[k] / counts[k] for k in hits}


def train_probe(args) -> dict:
    from ..metrics.probe import AttributeProbe, save_probe

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    probe = AttributeProbe().to(device).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=0.01)
    loader = make_loader("probe", args.batch_size, args.seed, args.workers, split="all",
                         scene_kwargs=PROBE_SCENES)
    schedule, step, losses = Schedule(args.lr, args.time_budget, args.max_steps), 0, []
    for batch in loader:
        for group in opt.param_groups:
            group["lr"] = schedule.lr(step)
        x, labels = probe_inputs(batch, device, noise=True)
        with autocast(device):
            loss = probe_loss(probe, x, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % args.log_every == 0:
            log(args.log, {"model": "probe", "step": step, "time_s": round(schedule.elapsed(), 1),
                           "loss": round(float(np.mean(losses[-args.log_every:])), 5)})
        if schedule.done(step):
            break
    accuracy = probe_accuracy(probe, device, args.eval_batches, args.batch_size, seed=args.seed + 10_000)
    info = {"model": "probe", "steps": step, "samples": step * args.batch_size, "train_time_s": round(schedule.elapsed(), 1),
            "device": device_name(device), "seed": args.seed, "command": " ".join(sys.argv),
            "accuracy_on_real": accuracy, "min_head_accuracy": min(accuracy.values())}
    save_probe(probe.eval(), Path(args.out) / "probe.safetensors", info)
    log(args.log, {"model": "probe", "done": True, **info})
    return info


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_all(args) -> dict:
    """Accuracies of the models in ``--out`` on held-out prompts, at a few sampler settings."""
    from ..metrics.evaluate import evaluate_samples, generate
    from ..metrics.probe import load_probe
    from . import load_pipeline_weights
    from .data import model_scenes

    device, out = torch.device(args.device), Path(args.out)
    probe = load_probe(out / "probe.safetensors", device)
    results = {"device": device_name(device)}
    for kind, n in (("t2i", args.eval_images), ("t2v", args.eval_videos)):
        path = out / f"{kind}.safetensors"
        if not path.is_file():
            continue
        pipe = load_pipeline_weights(path, device)
        pipe.set_progress_bar_config(disable=True)
        scenes = model_scenes(kind, n, args.seed + 20_000, split="test")
        prompts = [s.caption for s in scenes]
        for steps, guidance in args.eval_settings:
            t0 = time.perf_counter()
            samples = generate(pipe, prompts, seed=args.seed, num_inference_steps=steps, guidance_scale=guidance,
                               batch_size=args.eval_batch)
            metrics = evaluate_samples(samples, scenes, probe)
            record = {"model": kind, "n": n, "steps": steps, "guidance": guidance,
                      "time_s": round(time.perf_counter() - t0, 1), **metrics}
            results.setdefault(kind, []).append(record)
            log(args.log, record)
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    return results


# ------------------------------------------------------------------------------------------ CLI
DEFAULTS = {  # model -> (batch size, learning rate, data workers)
    "t2i": (512, 1e-3, 6),
    "t2v": (128, 1e-3, 4),
    "probe": (512, 2e-3, 4),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m viditq.models.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=("t2i", "t2v", "probe", "eval"))
    p.add_argument("--out", required=True, help="folder for <model>.safetensors (and eval.json)")
    p.add_argument("--time-budget", type=float, default=None, help="training seconds (wall clock)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--workers", type=int, default=None, help="data loader processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", type=Path, default=None, help="t2i/t2v: start from these saved weights (continue a run)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (default: on for CUDA); falls back to eager if it fails")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log", type=Path, default=None, help="also append JSON log lines to this file")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--save-every", type=float, default=90.0, help="seconds between weight snapshots")
    p.add_argument("--eval-batches", type=int, default=8, help="probe: batches of fresh real samples to score")
    p.add_argument("--eval-images", type=int, default=512)
    p.add_argument("--eval-videos", type=int, default=256)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--eval-settings", type=str, default="10:2,10:4,10:6,20:4",
                   help="comma-separated steps:guidance pairs to evaluate")
    args = p.parse_args(argv)
    if args.model != "eval":
        if args.time_budget is None and args.max_steps is None:
            p.error("give --time-budget and/or --max-steps")
        batch, lr, workers = DEFAULTS[args.model]
        args.batch_size = args.batch_size or batch
        args.lr = args.lr or lr
        args.workers = workers if args.workers is None else args.workers
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    args.eval_settings = [(int(a), float(b)) for a, b in (s.split(":") for s in args.eval_settings.split(","))]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = args.model != "eval"
        torch.backends.cudnn.allow_tf32 = args.model != "eval"
    if args.model == "probe":
        train_probe(args)
    elif args.model == "eval":
        evaluate_all(args)
    else:
        train_diffusion(args.model, args)


if __name__ == "__main__":
    main()
