"""Weight memory accounting: bytes by storage kind, before (float) and after quantization."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .layers import QuantLinear, TimestepSwitchLinear


@dataclass
class MemoryReport:
    """``rows``: kind → (bytes before, bytes after); kinds like ``"W4 g64 asym"`` or ``"bfloat16 (kept)"``."""

    rows: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def total_before(self) -> int:
        return sum(b for b, _ in self.rows.values())

    @property
    def total_after(self) -> int:
        return sum(a for _, a in self.rows.values())

    @property
    def ratio(self) -> float:
        return self.total_before / max(self.total_after, 1)

    def to_dict(self) -> dict:
        return {"rows": {k: {"before": b, "after": a} for k, (b, a) in self.rows.items()},
                "total_before": self.total_before, "total_after": self.total_after, "ratio": self.ratio}

    def table(self) -> str:
        lines = [f"{'weights':<28}{'before':>12}{'after':>12}"]
        for kind, (b, a) in sorted(self.rows.items()):
            lines.append(f"{kind:<28}{_mib(b):>12}{_mib(a):>12}")
        lines.append(f"{'total':<28}{_mib(self.total_before):>12}{_mib(self.total_after):>12}"
                     f"   ({self.ratio:.2f}x smaller)")
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_report(model: nn.Module | Any) -> MemoryReport:
    """Weight bytes of a model, or of a diffusers pipeline's components (transformer, text_encoder, vae, ...: then
    one row each), by kind; QuantLinear layers are compared with their float equivalent."""
    if not isinstance(model, nn.Module) and hasattr(model, "components"):
        return MemoryReport({name: (r.total_before, r.total_after) for name, comp in model.components.items()
                             if isinstance(comp, nn.Module) for r in [memory_report(comp)]})
    # A timestep-switching layer stores one copy per precision; the float model had one: extra copies add to
    # "after" only.
    extra_copies = {id(t) for m in model.modules() if isinstance(m, TimestepSwitchLinear)
                    for variant in list(m.variants.values())[1:] for t in variant.state_dict(keep_vars=True).values()}
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            kind, float_bytes = _quant_kind(module)
            is_extra = any(id(t) in extra_copies for t in module.buffers())
            rows[kind][0] += 0 if is_extra else float_bytes
            rows[kind][1] += module.weight_nbytes()
            seen.update(id(t) for t in module.buffers())
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        kind = f"{str(t.dtype).removeprefix('torch.')} (kept)"
        rows[kind][0] += 0 if id(t) in extra_copies else _nbytes(t)
        rows[kind][1] += _nbytes(t)
    return MemoryReport({k: (v[0], v[1]) for k, v in rows.items()})


def _quant_kind(layer: QuantLinear) -> tuple[str, int]:
    """(row label, bytes of the float layer it replaced) for a QuantLinear."""
    s = layer.spec
    itemsize = torch.empty(0, dtype=layer.float_dtype).element_size()
    float_bytes = (s.in_features + s.bias) * s.out_features * itemsize
    g = "per-tensor" if s.weight_per_tensor else ("per-channel" if s.group_size == s.in_features else f"g{s.group_size}")
    mode = "weight-only" if s.weight_only else ("sym" if s.weight_symmetric else "asym")
    fmt = "fp8 e4m3" if s.fp8_weights else f"W{s.weight_bits}"
    return f"{fmt} {g} {mode}", float_bytes
