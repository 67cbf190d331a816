"""What a measurement records: the environment it ran in, and when a curve reached a target.

* :func:`environment` is the record every results JSON carries (versions, cores, load average, date,
  link); :func:`loadavg` the load average alone.
* :func:`time_to`, :func:`time_held` and :func:`time_to_interpolated`: when a curve reaches a target
  (the demo's speedups; the benchmarks use the same helpers through :mod:`benchmarks.common`).
"""

from __future__ import annotations

import itertools
import os
import platform
from datetime import datetime, timezone
from typing import Any


# ====================================================================== the environment record
def loadavg() -> list[float] | None:
    """``os.getloadavg()`` as a list, or ``None`` where the platform has none."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def environment(*modules: str, link: str | None = None) -> dict[str, Any]:
    """Versions (python, torch, lightning and ``modules``), platform, cores, load average now, date, link."""
    import importlib

    import lightning
    import torch

    from .launch import describe_link

    record: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
    }
    for name in modules:
        record[name] = importlib.import_module(name).__version__
    record.update(
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        loadavg_end=loadavg(),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        link=describe_link(link),
    )
    return record


# ====================================================================== time to a target
def _reached(v: float, target: float, lower_is_better: bool) -> bool:
    return v <= target if lower_is_better else v >= target


def time_to(
    records: list[dict[str, Any]],
    target: float,
    clock: str = "train_seconds",
    value: str = "value",
    lower_is_better: bool = False,
) -> Any:
    """The ``clock`` of the first record whose ``value`` reaches ``target`` (at or above it; at or
    below with ``lower_is_better``), or ``None``: never."""
    for r in records:
        if _reached(r[value], target, lower_is_better):
            return r[clock]
    return None


def time_held(
    records: list[dict[str, Any]],
    target: float,
    clock: str = "train_seconds",
    value: str = "value",
    lower_is_better: bool = False,
) -> Any:
    """The ``clock`` of the first record from which every later record stays at the target (``None``:
    the last one misses it). Stricter than :func:`time_to`: a single lucky evaluation does not count."""
    held = None
    for r in records:
        if not _reached(r[value], target, lower_is_better):
            held = None
        elif held is None:
            held = r[clock]
    return held


def time_to_interpolated(
    curve: list[dict[str, Any]], target: float, clock: str = "time", value: str = "val_loss"
) -> float | None:
    """When a falling curve first reaches ``target``, linear between its points (sorted by ``clock``).

    Each segment is judged by its end: the first segment whose end is at or below ``target`` gives
    the crossing (its end when its start is already there). ``None``: never.
    """
    pts = sorted((c[clock], c[value]) for c in curve)
    for (t0, y0), (t1, y1) in itertools.pairwise(pts):
        if y1 <= target:
            return t1 if y0 == y1 or y0 <= target else t0 + (t1 - t0) * (y0 - target) / (y0 - y1)
    return None
