"""Model CPU offload on a quantized pipeline (issue 8): generations with and without diffusers'
``pipe.enable_model_cpu_offload()`` (accelerate ``CpuOffload`` hooks), same seed, and peak GPU memory of each.

Pipelines: the embedded T2I pipeline (``viditq.models.load_t2i_pipeline``, "embedded_t2i") and a PixArt-α-shaped
pipeline with a small T5 encoder and a VAE (``viditq.testing.tiny_pixart_pipeline``, "pixart_tiny"). For each:

1. ``resident``: ``pipe.to(device)``, ``viditq.quantize_pipeline`` (transformer W8A8, text encoder int8
   weight-only), generate;
2. ``offload``: ``pipe.enable_model_cpu_offload()`` on the same pipeline, generate twice (the hooks are re-armed
   after each call). During the calls every QuantLinear's buffers are checked to be on the accelerator when the
   layer runs; after each call every component must be back on the CPU;
3. ``offload_then_quantize``: a fresh float pipeline, offload enabled first, then ``quantize_pipeline`` (it
   calibrates through the hooks), generate.

Each is compared with ``resident`` (max |Δ| of the [0, 1] images, PSNR; ``identical`` when bit-equal) and reports
peak GPU memory (``torch.cuda.max_memory_allocated``) and the memory still allocated after the call.

    python benchmarks/check_offload.py --out offload.json          # CUDA (needs accelerate)
    python benchmarks/check_offload.py --device cpu --steps 2     # CPU: the hooks run, nothing moves
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

PIPELINES = ("embedded_t2i", "pixart_tiny")
PROMPTS = ["a red circle", "a large blue square above a small green triangle", "a small yellow circle"]
PROMPT = "a red circle above a blue square"


def build(name: str, dtype: torch.dtype):
    """(float pipeline on the CPU, extra call kwargs)."""
    if name == "embedded_t2i":
        from viditq.models import load_t2i_pipeline

        return load_t2i_pipeline("cpu", dtype), {}
    if name == "pixart_tiny":
        from viditq.testing import tiny_pixart_pipeline

        return tiny_pixart_pipeline().to(dtype=dtype), dict(max_sequence_length=16, use_resolution_binning=False)
    raise ValueError(f"unknown pipeline {name!r}; choose from {PIPELINES}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _components(pipe) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def tensor_devices(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in list(module.parameters()) + list(module.buffers())}


class LayerDeviceProbe:
    """Forward pre-hooks on every QuantLinear of ``pipe``: the device types of its buffers when it runs."""

    def __init__(self, pipe):
        from viditq import QuantLinear

        self.seen: set[str] = set()
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self._hook) for comp in _components(pipe).values()
                        for m in comp.modules() if isinstance(m, QuantLinear)]

    def _hook(self, module, args):
        self.calls += 1
        self.seen |= {b.device.type for b in module.buffers()}
        self.seen.add(args[0].device.type)

    def remove(self):
        for h in self.handles:
            h.remove()


def generate(pipe, device: torch.device, steps: int, seed: int, extra: dict) -> tuple[torch.Tensor, dict]:
    """Images (B, 3, H, W) float32 in [0, 1] on the CPU, and memory figures of the call."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _allocated(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        images = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=steps,
                      output_type="pt", **extra).images
    _sync(device)
    mem = dict(seconds=time.perf_counter() - t0, allocated_before=before, allocated_after=_allocated(device),
               peak_allocated=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0)
    return images.float().cpu(), mem


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    mse = float((out - ref).pow(2).mean())
    return dict(max_abs_diff=float((out - ref).abs().max()), identical=bool(torch.equal(out, ref)),
                psnr_db=None if mse == 0 else 10 * math.log10(1.0 / mse))


def check_pipeline(name: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, steps: int = 8,
                   seed: int = 0) -> dict:
    """The three runs of the module docstring for one pipeline; returns the JSON-able result."""
    import viditq

    device = torch.device(device)
    res: dict = dict(pipeline=name, device=str(device), dtype=str(dtype).removeprefix("torch."), steps=steps)

    def quant_kw():  # a seeded generator: both quantizations calibrate on the same noise
        return dict(text_encoder_bits=8, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(1))

    # 1. resident
    pipe, extra = build(name, dtype)
    pipe.to(device)
    t0 = time.perf_counter()
    viditq.quantize_pipeline(pipe, "w8a8", PROMPTS, **quant_kw(), **extra)
    res["quantize_s"] = time.perf_counter() - t0
    res["text_embedding_cosine"] = pipe.quantization_report["text_embedding_cosine"]
    res["quantized_layers"] = {n: sum(isinstance(m, viditq.QuantLinear) for m in c.modules())
                               for n, c in _components(pipe).items()}
    # accelerate's CpuOffload finds a component's device from next(module.parameters()): each needs one.
    res["components_without_parameters"] = [n for n, c in _components(pipe).items()
                                            if next(c.parameters(), None) is None]
    ref, res["resident"] = generate(pipe, device, steps, seed, extra)

    # 2. offload on the quantized pipeline
    pipe.enable_model_cpu_offload(device=device)
    res["weights_allocated_after_enable"] = _allocated(device)
    res["hooks"] = {n: type(getattr(c, "_hf_hook", None)).__name__ for n, c in _components(pipe).items()}
    runs = []
    for i in range(2):
        probe = LayerDeviceProbe(pipe)
        out, mem = generate(pipe, device, steps, seed, extra)
        probe.remove()
        runs.append(dict(mem, **compare(out, ref), layer_calls=probe.calls,
                         devices_seen_by_layers=sorted(probe.seen),
                         component_devices_after={n: sorted(tensor_devices(c)) for n, c in _components(pipe).items()}))
    res["offload"], res["offload_second_call"] = runs
    pipe.remove_all_hooks()
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 3. offload enabled on the float pipeline, then quantize through the hooks
    pipe, extra = build(name, dtype)
    pipe.enable_model_cpu_offload(device=device)
    viditq.quantize_pipeline(pipe, "w8a8", PROMPTS, **quant_kw(), **extra)
    out, mem = generate(pipe, device, steps, seed, extra)
    res["offload_then_quantize"] = dict(
        mem, **compare(out, ref),
        component_devices_after={n: sorted(tensor_devices(c)) for n, c in _components(pipe).items()})
    pipe.remove_all_hooks()
    res["ok"] = offload_ok(res, device)
    return res


def offload_ok(res: dict, device: torch.device, max_abs_diff: float = 1e-2) -> bool:
    """The pass criterion: offloaded generations match the resident one, layers ran on the accelerator, and the
    components went back to the CPU after each call."""
    accel = device.type
    for key in ("offload", "offload_second_call", "offload_then_quantize"):
        run = res[key]
        if run["max_abs_diff"] > max_abs_diff:
            return False
        if any(devs != ["cpu"] for devs in run["component_devices_after"].values()):
            return False
    for key in ("offload", "offload_second_call"):
        if res[key]["devices_seen_by_layers"] != [accel] or res[key]["layer_calls"] == 0:
            return False
    return not res["components_without_parameters"]


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f} MiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="offload.json")
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) | float16 | float32 (CPU default)")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    result = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                  device_name=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", runs=[],
                  errors=[])
    try:
        import accelerate

        result["accelerate"] = accelerate.__version__
    except ImportError:
        result["errors"].append("accelerate is not installed: enable_model_cpu_offload needs it")
    import diffusers

    result["diffusers"] = diffusers.__version__
    if not result["errors"]:
        for name in args.pipelines.split(","):
            try:
                result["runs"].append(check_pipeline(name, args.device, dtype, args.steps))
            except Exception as e:  # noqa: BLE001 — record and go on to the next pipeline
                import traceback

                result["errors"].append(f"{name}: {type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}")
    result["ok"] = bool(result["runs"]) and not result["errors"] and all(r["ok"] for r in result["runs"])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'pipeline':14s} {'run':22s} {'max|d|':>9s} {'PSNR':>7s} {'peak alloc':>12s} {'alloc after':>12s}")
    for r in result["runs"]:
        for key in ("resident", "offload", "offload_second_call", "offload_then_quantize"):
            run = r[key]
            psnr = "ref" if key == "resident" else ("inf" if run.get("psnr_db") is None else f"{run['psnr_db']:.1f}")
            diff = "" if key == "resident" else f"{run['max_abs_diff']:.2e}"
            print(f"{r['pipeline']:14s} {key:22s} {diff:>9s} {psnr:>7s} {_mib(run['peak_allocated']):>12s} "
                  f"{_mib(run['allocated_after']):>12s}")
        print(f"{r['pipeline']:14s} ok={r['ok']} layers on {r['offload']['devices_seen_by_layers']}, "
              f"hooks {r['hooks']}, quantize {r['quantize_s']:.1f} s")
    for e in result["errors"]:
        print("ERROR", e)
    print("offload check:", "OK" if result["ok"] else "FAILED")


if __name__ == "__main__":
    main()
