"""The one set of argument validators: every constructor checks its arguments with these.

Each returns the value in its canonical type or raises ``ValueError`` / ``TypeError`` with a
message of one shape: ``"<name> must be <what>, got <value>"``, followed by an example where one
helps. ``bool`` is never accepted where a number is asked for (``True`` is an ``int`` in Python).
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

__all__ = ["check_bool", "check_int", "check_number", "check_seconds"]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """An integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    example: str | None = None,
) -> float:
    """A finite number in the interval ``[low, high]`` (``low_open`` / ``high_open``: the bound excluded).

    ``None`` bounds are unbounded; NaN and ±Inf are always refused.
    """
    ok = _is_number(value) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        if low is not None and high is not None:
            what = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low == 0 and low_open:
            what = "a positive number"
        elif low is not None:
            what = f"a finite number {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            what = f"a finite number {'<' if high_open else '<='} {high:g}"
        else:
            what = "a finite number"
        such_as = f" such as {example}" if example is not None else ""
        raise ValueError(f"{name} must be {what}{such_as}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (not a truthy value such as ``"no"``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_seconds(name: str, value: timedelta | float) -> timedelta:
    """A positive duration: a ``timedelta`` or a number of seconds."""
    if isinstance(value, timedelta):
        out = value
    elif _is_number(value) and math.isfinite(value):
        out = timedelta(seconds=float(value))
    else:
        raise TypeError(f"{name} must be a timedelta or a number of seconds such as 60, got {value!r}")
    if out.total_seconds() <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return out
