"""One progress-bar helper (rich), silent when stderr is not a terminal or VIDITQ_PROGRESS=0."""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    flag = os.environ.get("VIDITQ_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "")
    return sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    if not progress_enabled():
        yield from items
        return
    from rich.progress import track

    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    yield from track(items, description=desc, total=total, transient=True)
