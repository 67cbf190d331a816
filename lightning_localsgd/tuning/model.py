r"""The auto-tuner's cost model and its decision: pure arithmetic, numbers in and a decision out.

Nothing here measures or communicates (that is :mod:`lightning_localsgd.tuning.tuner`), so every
decision can be checked with literal numbers (tests/test_autotune.py).

**What a round costs.** A round is H local steps of :math:`t` seconds each (the measured step
time, no communication). The model's n values (this rank's share of a sync) are cut into P
fragments of :math:`v = \lceil n/P \rceil` values. For a wire format f:

.. math::
    t_\text{link}(f, v) &= c_f\,\ell + B_f(v) / \beta \\
    t_\text{cpu}(f, v) &= v\,\kappa_f

(the transfer: :math:`c_f` calls of latency ℓ and :math:`B_f(v)` bytes at β bytes/s; the local
work: copies, casts, quantization, κ_f seconds per value, measured)

:math:`B_f(v)` are the bytes the transport books for one rank (the ring estimates of
:mod:`lightning_localsgd.transport.collectives`): :math:`2\frac{m-1}{m}(v+m)\,e` for a float wire
of e bytes per value over m replicas, :math:`2(m-1)\,\mathrm{packet}(\lceil v/(m\cdot128)\rceil\cdot128)`
for int8/int4 (an all-to-all and an all-gather of per-block packets), so :math:`c_f` is 1 for a
float wire and 3 for an integer one.

One fragment's sync costs the training thread

.. math::
    \text{blocking } (\tau = 0):&\quad t_\text{link} + t_\text{cpu}\\
    \text{overlapped } (\tau > 0):&\quad \max(0,\ t_\text{link} - \tau t)
        + s\,\min(t_\text{link}, \tau t) + t_\text{cpu} + v\,\kappa_\text{overlap}

where s is the measured slowdown of local steps while a transfer runs in the background (on a
CPU the comm thread and the network stack take cores from the step) and κ_overlap the seconds per
value an overlapped sync adds on the training thread (the snapshot of the values sent, the
background buffer, the merge). The CPU work is counted whole in both cases (it competes with the
step on a CPU; on a GPU it is small). κ_f and κ_overlap are timed by running the transport's own
code without the network on the model's tensors
(:func:`~lightning_localsgd.tuning.tuner.measure_conversions`). A round costs
:math:`C = P\cdot(\text{one fragment's}) + x` (x: a per-round correction learned from the
measured overhead when re-tuning, 0 at first), and its **overhead** is :math:`C / (H t)`.
Overlap is impossible when the link cannot carry a round's fragments within the round
(:math:`P\,t_\text{link} > H t`): the syncs would queue without end. The tuner asks more of the
settings it chooses itself: :math:`H t \ge \text{margin}\cdot P\,t_\text{link}`, the same margin
it hides a sync with. Near the edge the model is optimistic: an overlapped sync stays in flight
1.5–2.3× as long as its transfer alone (its conversions and gloo's copies share the cores with the
steps), so with :math:`\tau = H-1` and :math:`P\,t_\text{link}` close to :math:`H t` the merges
wait, which the model does not count (at 100 Mbit/s bf16 with H = 19, τ = 18 measured 8–36 % where
it predicted 3 %, docs/results/autotune.md).

**The decision.** Over every candidate the user left to the tuner (the formats allowed; H in
``[H_min, H_max]``; P in 1, 2, 4, … up to ``max_fragments`` and H; τ = 0, or the smallest τ ≤ H−1
with :math:`\tau t \ge \text{margin}\cdot t_\text{link}`, else H−1, when the round keeps up with
the margin), the tuner takes the smallest
H whose overhead is at most the target; at that H the most precise format, then the fewest
fragments, then the smallest τ (accuracy first: a longer round, a coarser wire and a staler merge
each cost some; and every fragment has a fixed cost the model does not count, its launch and
merge bookkeeping, 10–25 ms per fragment on this machine's resnet18, so fewer is safer). If no
candidate meets the target it takes the cheapest and says so (``Decision.met = False``). An
argument the user gave is a single candidate: it is never changed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_localsgd._checks import check_int, check_number
from lightning_localsgd.transport.quantize import BLOCK, packet_bytes

__all__ = [
    "FORMATS",
    "AutoTune",
    "Decision",
    "Measurements",
    "decide",
    "format_name",
    "link_seconds",
    "overhead",
    "round_cost",
    "wire_bytes",
]

FORMATS: tuple[str | None, ...] = (None, "bfloat16", "int8", "int4")
"""The wire formats the tuner chooses from, most precise first (``None``: the parameters' own dtype)."""

INTEGER = ("int8", "int4")


def format_name(fmt: str | None) -> str:
    """``fmt`` for logs and tables (``None`` is the parameters' own dtype: ``"full"``)."""
    return "full" if fmt is None else fmt


@dataclass(frozen=True)
class AutoTune:
    """The tuner's bounds and targets (``LocalSGDStrategy(autotune=AutoTune(...))``; defaults work).

    Args:
        overhead: the largest acceptable slowdown over local steps without communication (0.03: 3 %).
        sync_every: ``(H_min, H_max)``, the range H is chosen from when ``sync_every="auto"``.
        max_fragments: the most fragments tried when ``fragments="auto"`` (powers of two up to it).
        formats: the wire formats tried when ``comm_dtype="auto"`` (``None``: the parameters' dtype).
        measure_steps: local steps measured before the first decision (half without communication,
            half with a background transfer running); no sync happens before they end.
        settle_steps: local steps left unmeasured before them (the first steps of a fit run slow:
            allocator, data loader and compile warm-up; measured 10–60 % slow on this machine).
        margin: a sync counts as hidden when τ steps last ``margin`` times its transfer (2.5: in the
            benchmarks an overlapped sync stayed in flight 1.5–2.3× as long as a blocking transfer of
            the same bytes, its conversions and gloo's copies sharing the cores with the steps; with
            1.25 the merges waited, docs/results/autotune.md).
        retune_every: steps between checks of the measured overhead, rounded up to whole rounds (a new
            setting is first checked after two rounds, at least 16 steps; 0: never re-tune).
        retune_threshold: a check re-tunes H and τ when the measured overhead is above or below the
            target by more than this (absolute: 0.02 = 2 points).
    """

    overhead: float = 0.03
    sync_every: tuple[int, int] = (8, 256)
    max_fragments: int = 8
    formats: tuple[str | None, ...] = FORMATS
    measure_steps: int = 20
    settle_steps: int = 10
    margin: float = 2.5
    retune_every: int = 100
    retune_threshold: float = 0.02

    def __post_init__(self) -> None:
        check_number("overhead", self.overhead, 0, 1, low_open=True, example="0.03 (3 %)")
        bounds = tuple(self.sync_every)
        if len(bounds) != 2:
            raise ValueError(f"AutoTune(sync_every=...) takes (H_min, H_max), got {self.sync_every!r}")
        low, high = (check_int("sync_every[0] (H_min)", bounds[0]), check_int("sync_every[1] (H_max)", bounds[1]))
        if low > high:
            raise ValueError(f"AutoTune(sync_every=({low}, {high})): H_min must not exceed H_max, e.g. (8, 256)")
        object.__setattr__(self, "sync_every", (low, high))
        check_int("max_fragments", self.max_fragments)
        formats = tuple(self.formats)
        unknown = [f for f in formats if f not in FORMATS]
        if not formats or unknown:
            raise ValueError(f"AutoTune(formats=...) takes some of {FORMATS}, got {self.formats!r}")
        object.__setattr__(self, "formats", formats)
        check_int("measure_steps", self.measure_steps, minimum=4)
        check_int("settle_steps", self.settle_steps, minimum=0)
        check_number("margin", self.margin, 1, example="2.5")
        check_int("retune_every", self.retune_every, minimum=0)
        check_number("retune_threshold", self.retune_threshold, 0, low_open=True, example="0.02")


@dataclass(frozen=True)
class Measurements:
    """What the tuner measured (the slowest rank's figures: every rank holds the same)."""

    step_seconds: float  # t: one local step without communication
    latency: float  # ℓ: a tiny allreduce over the replicas
    bandwidth: float  # β: bytes per second per rank (the transport's byte estimate over the seconds), under load
    slowdown: float  # s: local steps run (1 + s) times slower while a transfer runs in the background
    convert: Mapping[str, float]  # κ_f: seconds per value of each format's local work, by format_name; and
    # "overlap": κ_overlap, what an overlapped sync adds (absent from records written before 2026-12-07: 0)
    numel: int  # n: values this rank sends at a whole-model sync
    replicas: int  # m
    element_size: int = 4  # bytes per value of the parameters' dtype

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["convert"] = dict(self.convert)
        return out

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Measurements:
        return cls(**{**state, "convert": dict(state["convert"])})


@dataclass(frozen=True)
class Decision:
    """What the tuner chose, with the overhead its model predicts."""

    comm_dtype: str | None
    sync_every: int
    overlap_steps: int
    fragments: int
    overhead: float  # predicted
    met: bool  # whether the predicted overhead is within the target
    extra: float = 0.0  # x: the per-round correction (seconds) it was computed with
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["notes"] = list(self.notes)
        return out

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Decision:
        return cls(**{**state, "notes": tuple(state.get("notes", ()))})

    def describe(self) -> str:
        return (
            f"comm_dtype={format_name(self.comm_dtype)}, sync_every={self.sync_every}, "
            f"overlap_steps={self.overlap_steps}, fragments={self.fragments} "
            f"(predicted overhead {100 * self.overhead:.1f}%{'' if self.met else ', above the target'})"
        )


def wire_bytes(fmt: str | None, numel: int, replicas: int, element_size: int) -> float:
    """Bytes one rank sends for a sync of ``numel`` values over ``replicas`` (the transport's booking)."""
    m = replicas
    if m <= 1:
        return 0.0
    if fmt in INTEGER:
        chunk = -(-numel // (m * BLOCK)) * BLOCK
        flags = 2.0 * (m - 1) / m * 4 * m
        return 2.0 * (m - 1) * packet_bytes(chunk, fmt) + flags  # type: ignore[arg-type]
    size = {None: element_size, "bfloat16": 2, "float16": 2, "float32": 4}[fmt]
    return 2.0 * (m - 1) / m * (numel + m) * size


def link_seconds(meas: Measurements, fmt: str | None, numel: int) -> float:
    """:math:`t_\\text{link}`: calls × latency + bytes / bandwidth."""
    if meas.replicas <= 1:
        return 0.0
    calls = 3 if fmt in INTEGER else 1
    return calls * meas.latency + wire_bytes(fmt, numel, meas.replicas, meas.element_size) / meas.bandwidth


def round_cost(
    meas: Measurements, fmt: str | None, sync_every: int, overlap: int, fragments: int, extra: float = 0.0
) -> float:
    """Seconds a round of ``sync_every`` steps costs beyond its local steps (``inf``: overlap cannot keep up)."""
    t = meas.step_seconds
    values = -(-meas.numel // fragments)
    link = link_seconds(meas, fmt, values)
    cpu = values * meas.convert[format_name(fmt)]
    if overlap == 0:
        one = link + cpu
    else:
        if fragments * link > sync_every * t:
            return math.inf
        hidden = min(link, overlap * t)
        one = (link - hidden) + meas.slowdown * hidden + cpu + values * meas.convert.get("overlap", 0.0)
    return max(0.0, fragments * one + extra)


def overhead(
    meas: Measurements, fmt: str | None, sync_every: int, overlap: int, fragments: int, extra: float = 0.0
) -> float:
    """The predicted slowdown over local steps: a round's cost over its H local steps."""
    return round_cost(meas, fmt, sync_every, overlap, fragments, extra) / (sync_every * meas.step_seconds)


def _overlap_tau(meas: Measurements, fmt: str | None, sync_every: int, fragments: int, margin: float) -> int | None:
    """The τ the tuner offers for a round: the smallest that hides a fragment's transfer with ``margin`` (H−1
    when none does); None when the round's syncs do not keep up with the margin (H·t < margin·P·t_link) or H = 1."""
    link = link_seconds(meas, fmt, -(-meas.numel // fragments))
    if sync_every < 2 or sync_every * meas.step_seconds < margin * fragments * link:
        return None
    return min(max(1, math.ceil(margin * link / meas.step_seconds)), sync_every - 1)


def decide(
    meas: Measurements,
    config: AutoTune,
    *,
    comm_dtype: str | Sequence[str | None] | None = FORMATS,
    sync_every: int | None = None,
    overlap_steps: int | None = None,
    fragments: int | None = None,
    overlappable: bool = True,
    extra: float = 0.0,
) -> Decision:
    """The tuner's choice (see the module docstring). ``None`` (or a sequence of formats): the tuner's to choose.

    Args:
        meas: the measurements.
        config: bounds and target.
        comm_dtype: a fixed wire format, or the sequence to choose from (``config.formats`` ∩ it).
        sync_every, overlap_steps, fragments: fixed values, or ``None`` to choose them.
        overlappable: whether the algorithm can overlap and fragment its syncs (else τ = 0, P = 1).
        extra: x, the per-round correction in seconds.
    """
    if meas.step_seconds <= 0 or meas.bandwidth <= 0:
        raise ValueError(f"the tuner needs a positive step time and bandwidth, measured {meas}")
    if isinstance(comm_dtype, (list, tuple)):
        formats = [f for f in config.formats if f in comm_dtype]
    else:
        formats = [comm_dtype]
    low, high = config.sync_every
    periods = range(low, high + 1) if sync_every is None else [sync_every]
    if not overlappable:
        overlap_steps, fragments = (
            (0 if overlap_steps is None else overlap_steps),
            (1 if fragments is None else fragments),
        )
    candidates: list[tuple[tuple[Any, ...], float, Decision]] = []
    for period in periods:
        counts = [fragments] if fragments is not None else [p for p in _powers(config.max_fragments) if p <= period]
        for rank, fmt in enumerate(formats):
            for count in counts:
                if count > period:
                    continue
                if overlap_steps is not None:
                    taus = [overlap_steps] if overlap_steps < period else []
                else:
                    tau = _overlap_tau(meas, fmt, period, count, config.margin)
                    taus = [0] if tau is None else [0, tau]
                for tau in taus:
                    cost = overhead(meas, fmt, period, tau, count, extra)
                    if math.isinf(cost):
                        continue
                    choice = Decision(fmt, period, tau, count, cost, cost <= config.overhead, extra)
                    candidates.append(((period, rank, count, tau), cost, choice))
    if not candidates:
        raise ValueError(
            "no setting is possible within the bounds: the fixed overlap_steps must be smaller than sync_every "
            f"(bounds {config.sync_every}, overlap_steps={overlap_steps}, fragments={fragments})"
        )
    meeting = [c for c in candidates if c[2].met]
    if meeting:
        return min(meeting, key=lambda c: c[0])[2]
    best = min(candidates, key=lambda c: (c[1], c[0]))[2]
    note = f"no setting meets the {100 * config.overhead:.1f}% target: the cheapest is taken"
    return Decision(**{**best.as_dict(), "notes": (note,)})


def _powers(limit: int) -> list[int]:
    out, p = [], 1
    while p <= limit:
        out.append(p)
        p *= 2
    return out
