"""A/B of attention-kernel variants on one GPU machine: each variant is a copy of the package, timed in a process of
its own (a process imports one version of a module), in the order given.

Here, before the device call (``.ab/`` is git-ignored: carry it along):
    python benchmarks/ab_attention.py prepare old=HEAD new=worktree
On the device (``carry: [".whl", ".ab"]``):
    python benchmarks/ab_attention.py run old new old "new:VIDITQ_WS_ATTENTION=1" --out $OUT/ab.json

``prepare NAME=REV``: REV is a git revision (``git archive``) or ``worktree`` (``src/viditq`` as it is now); the
embedded models' weights (``*.safetensors``) are left out. ``run``: each entry ``NAME[:KEY=VALUE,...]`` runs in a
fresh process with its copy first on ``PYTHONPATH`` (and those environment variables); per shape and tile it
times the kernel alone on prepared operands and the operand preparation (``do_bench`` medians; the preparation
also replayed in a CUDA graph, as a graph-mode forward runs it, and preparation + kernel in one graph on inputs in the
attention processors' (B, N, H, D) memory layout) and measures the relative L2 error against
float32 SDPA on the first 512 queries; the first entry also times SDPA (cuDNN, flash).
List a variant twice to see the machine's drift. Tiles: ``bench_attention.TILES`` unless ``--tiles``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AB_DIR = ROOT / ".ab"
WEIGHTS = "*.safetensors"


def prepare(name: str, rev: str, ab_dir: Path = AB_DIR) -> Path:
    """``ab_dir/name/viditq``: the package at git revision ``rev`` or, for ``worktree``, as it is on disk."""
    dest = ab_dir / name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if rev == "worktree":
        shutil.copytree(ROOT / "src" / "viditq", dest / "viditq", ignore=shutil.ignore_patterns(WEIGHTS, "__pycache__"))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            git = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/viditq"], capture_output=True)
            if git.returncode != 0:
                raise SystemExit(f"git archive {rev}: {git.stderr.decode().strip()}")
            archive = git.stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            shutil.copytree(Path(tmp) / "src" / "viditq", dest / "viditq", ignore=shutil.ignore_patterns(WEIGHTS))
    return dest / "viditq"


def parse_entry(entry: str) -> tuple[str, dict[str, str]]:
    """``"new:A=1,B=2"`` → ``("new", {"A": "1", "B": "2"})``."""
    name, _, env = entry.partition(":")
    pairs = [kv.split("=", 1) for kv in env.split(",") if kv]
    if not name or any(len(p) != 2 or not p[0] for p in pairs):
        raise ValueError(f"expected NAME[:KEY=VALUE,...], got {entry!r}")
    return name, dict(pairs)


def parse_tiles(spec: str | None) -> dict[str, list[tuple[int, ...]]] | None:
    """``"cogvideox_self=64,128,4,3,128;64,128,4,3 pixart_self=64,128,4,3"`` → tiles per shape."""
    if not spec:
        return None
    tiles = {}
    for item in spec.split():
        shape, _, configs = item.partition("=")
        tiles[shape] = [tuple(int(x) for x in c.split(",")) for c in configs.split(";")]
    return tiles


def shape_of(name: str, shapes: dict) -> tuple[int, ...]:
    """A name of ``bench_attention.SHAPES`` or ``BxHxNQxNKVxD`` (no masked keys)."""
    if name in shapes:
        return shapes[name]
    try:
        b, h, n_q, n_kv, d = (int(x) for x in name.split("x"))
    except ValueError:
        raise SystemExit(f"unknown shape {name!r}: one of {sorted(shapes)} or BxHxNQxNKVxD") from None
    return b, h, n_q, n_kv, d, 0


def worker(label: str, out: str, shapes: list[str], tiles: dict | None, sdpa: bool) -> None:
    """Time this process's package (first on ``PYTHONPATH``); off the GPU (CPU interpreter, for the tests) with a
    wall-clock median and no SDPA timing."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_attention as BA
    from viditq.kernels import attention as KA

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def median_ms(fn, rep=1000):
        if device == "cuda":
            return do_bench(fn, warmup=100, rep=rep, return_mode="median")
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]

    result = {"entry": label, "package": KA.__file__, "shapes": {}}
    for name in shapes:
        b, h, n_q, n_kv, d, n_masked = shape_of(name, BA.SHAPES)
        q, k, v, mask = BA.make_inputs(b, h, n_q, n_kv, d, n_masked, device=device)
        bias = BA.bias_of(mask, b, h, n_kv)
        ref = F.scaled_dot_product_attention(q[:, :, :512].float(), k.float(), v.float(), attn_mask=mask).double()
        entry = result["shapes"][name] = {}
        if sdpa and device == "cuda":
            for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
                try:  # (flash takes no mask)
                    with sdpa_kernel(getattr(SDPBackend, backend)):
                        entry[f"sdpa_{backend.split('_')[0].lower()}_ms"] = median_ms(
                            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
                except RuntimeError:
                    pass
        default = [tuple(x for x in dataclasses.astuple(KA.default_config(KA.padded_head_dim(d), "fp8", n_kv))
                         if x is not None)]
        for tile in (tiles or BA.TILES).get(name, default):
            cfg = KA.AttentionConfig(*tile)
            ops = KA.quantize_operands(q, k, v, "fp8", d ** -0.5, bias, cfg)
            o = torch.empty(b, n_q, h, d, dtype=torch.bfloat16, device=device).transpose(1, 2)
            KA.attention_from_operands(ops, o, n_kv, cfg)
            got = o[:, :, :512].double()
            prep = lambda: KA.quantize_operands(q, k, v, "fp8", d ** -0.5, bias, cfg)  # noqa: E731
            # the (B, N, H, D) memory layout the attention processors hand over, preparation and kernel together
            qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
            whole = lambda: KA.attention_from_operands(  # noqa: E731
                KA.quantize_operands(qt, kt, vt, "fp8", d ** -0.5, bias, cfg), o, n_kv, cfg)
            entry[",".join(map(str, tile))] = {
                "kernel_ms": median_ms(lambda: KA.attention_from_operands(ops, o, n_kv, cfg)),
                "prep_ms": median_ms(prep, rep=300),
                # what a CUDA-graph forward pays: the launches replayed without the host
                "prep_graph_ms": BA.graph_bench(prep) if device == "cuda" else None,
                "whole_graph_ms": BA.graph_bench(whole) if device == "cuda" else None,
                "rel_l2": float((got - ref).norm() / ref.norm()), "finite": bool(torch.isfinite(o).all())}
            del qt, kt, vt
        del q, k, v, ref
        if device == "cuda":
            torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump(result, f)


def run(entries: list[str], out: str, shapes: list[str], tiles_spec: str | None, timeout_s: float) -> dict:
    import torch

    result = {"card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": sys.argv, "runs": []}
    for i, entry in enumerate(entries):
        name, env = parse_entry(entry)
        copy = AB_DIR / name
        if not (copy / "viditq").is_dir():
            raise SystemExit(f"no package copy {copy}/viditq: run `prepare {name}=REV` first (and carry .ab)")
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = [sys.executable, __file__, "_worker", entry, tmp.name, "--shapes", ",".join(shapes)]
            cmd += (["--tiles", tiles_spec] if tiles_spec else []) + (["--sdpa"] if i == 0 else [])
            child_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(
                filter(None, [str(copy), os.environ.get("PYTHONPATH", "")]))}
            t0 = time.time()
            try:
                proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=timeout_s)
                error = proc.stderr[-2000:] if proc.returncode != 0 else None
            except subprocess.TimeoutExpired:
                error = f"timed out after {timeout_s:.0f} s"
            run_result = {"entry": entry, "error": error} if error else json.loads(Path(tmp.name).read_text())
        if not error and not run_result["package"].startswith(str(copy)):
            raise SystemExit(f"{entry} imported {run_result['package']}, not its copy under {copy}")
        run_result["seconds"] = time.time() - t0
        result["runs"].append(run_result)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        if error:
            print(f"{entry}: failed\n{error}", flush=True)
            continue
        for shape, e in run_result["shapes"].items():
            for key, r in e.items():
                if isinstance(r, dict):
                    graph = (f" (graph {r['prep_graph_ms']:.3f}, whole BNHD {r['whole_graph_ms']:.3f})"
                             if r.get("whole_graph_ms") is not None else "")
                    print(f"{entry:24s} {shape:15s} {key:14s} kernel {r['kernel_ms']:7.3f} ms  prep {r['prep_ms']:6.3f}"
                          f"{graph}  rel L2 {r['rel_l2']:.4f}", flush=True)
                else:
                    print(f"{entry:24s} {shape:15s} {key:14s} {r:7.3f} ms", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="package copies: NAME=REV (git revision or 'worktree')")
    p.add_argument("variants", nargs="+")
    r = sub.add_parser("run", help="time the entries NAME[:KEY=VALUE,...] in order, each in its own process")
    r.add_argument("entries", nargs="+")
    r.add_argument("--out", default="ab_attention.json")
    r.add_argument("--shapes", default="cogvideox_self,pixart_self")
    r.add_argument("--tiles", default=None,
                   help="'SHAPE=bm,bn,w,s[,regs];... SHAPE=...' (default: bench_attention.TILES, else default_config)")
    r.add_argument("--timeout", type=float, default=150.0, help="seconds per entry")
    w = sub.add_parser("_worker")
    w.add_argument("entry")
    w.add_argument("out")
    w.add_argument("--shapes", required=True)
    w.add_argument("--tiles", default=None)
    w.add_argument("--sdpa", action="store_true")
    args = parser.parse_args()
    if args.cmd == "prepare":
        for variant in args.variants:
            name, sep, rev = variant.partition("=")
            if not sep or not name or not rev:
                parser.error(f"expected NAME=REV, got {variant!r}")
            print(f"{name}: {prepare(name, rev)}")
    elif args.cmd == "run":
        run(args.entries, args.out, args.shapes.split(","), args.tiles, args.timeout)
    else:
        worker(args.entry, args.out, args.shapes.split(","), parse_tiles(args.tiles), args.sdpa)


if __name__ == "__main__":
    main()
