"""AutoTuner: measures the step, the link and the wire formats, then sets the algorithm's schedule.

Driven by :class:`~lightning_localsgd.engine.SyncEngine` (so the Trainer and Fabric get the same),
at three points: before ``algorithm.bind`` (:meth:`AutoTuner.prepare`), before each optimizer
step (:meth:`AutoTuner.before_step`) and after it (:meth:`AutoTuner.after_step`).

**Measuring** (``AutoTune.measure_steps = W`` local steps after the algorithm's warm-up and
``settle_steps`` more, which run slow at the start of a fit; no sync among them):

1. steps 1 … W/2: the step time t (on a CPU the median time between the ends of consecutive
   steps; on an accelerator the mean over the span, the device synchronized at both ends);
2. at W/2, on the training thread: the latency ℓ (the median of 5 allreduces of one value), a
   first bandwidth (one allreduce of 256 KiB) and each wire format's local work κ_f (the
   transport's own code run without the network on copies of the model's tensors,
   :func:`measure_conversions`); every rank takes the slowest rank's figures (one MAX allreduce);
3. steps W/2 … W: a transfer of about 0.8·(W/2)·t seconds of data (at most one model, in at least
   :data:`PROBE_CALLS` calls) runs on the background group while the steps go on; it stops at W
   (the ranks agree between calls), and the bytes of the calls done over their seconds give the
   bandwidth β under load; the slowdown of the steps it ran in (the one it ended in included: a
   probe shorter than a step still measures s) gives s. When the algorithm cannot overlap (no
   background group), a blocking transfer of about 0.25·(W/2)·t seconds gives β, and s = 0;
4. at W: the slowest rank's figures again (one MAX allreduce), rank 0 decides
   (:func:`~lightning_localsgd.tuning.model.decide`) and broadcasts the decision: every rank applies
   the same schedule from step W on.

**Re-tuning.** Checks fall on round boundaries: the first after two rounds of a new setting (at
least 16 steps), so that a choice the model got wrong costs two rounds, not ``retune_every``
steps; then every ``retune_every`` steps rounded up to whole rounds. After the first decision (and
after a resume) the rounds are counted from the merge of the first round of syncs, whose one-time
costs are left out (:meth:`AutoTuner._after_first_sync`). At a check the mean time of the steps
since the last check (evaluations and checkpoints left out) over the floor gives the measured overhead
o = max(0, mean/floor − 1), the slowest rank's (one MAX allreduce). The floor is the median of
that period's clean steps (nothing in flight, no sync: the machine's speed drifts) when there are
at least :data:`MIN_CLEAN`, else the smaller of the measuring steps' t and the period's median
step. When o is above the target by more than ``retune_threshold``, the current H is marked too
short for good (no later choice goes back to it or below) and the model learns the per-round cost
it missed, x = max(x, o·H·t − C(H), 0); when o is below the target by more than the threshold,
x = max(o·H·t − C(H), 0) (the model's cost is a lower bound) and H may move down, at most halfway
to the longest H marked too short (a bisection: it settles). Then H and τ are chosen again (the
wire format and the fragments stay). The new schedule starts at the first step with no sync in
flight (a merge at its scheduled step, not a wait for a transfer: draining at the check cost a
whole transfer, 1.9 s at 100 Mbit/s); with a sync always in flight, after one round.

Everything it measured and chose is in :attr:`record` (also in the algorithm's checkpoint
state, so a resume keeps the choice and skips the measuring) and in the log
(``logging.getLogger("lightning_localsgd")``, info level).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import statistics
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch
from torch import Tensor

from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.contract import SyncContext
from lightning_localsgd.transport.collectives import DryCollectives, Group, parse_comm_dtype
from lightning_localsgd.transport.tensors import flatten_into, sync_tensors, unflatten_
from lightning_localsgd.tuning.model import (
    FORMATS,
    INTEGER,
    AutoTune,
    Decision,
    Measurements,
    decide,
    format_name,
    round_cost,
)

__all__ = ["PURPOSE", "AutoTuner", "may_overlap", "measure_conversions", "tuner_for"]

log = logging.getLogger(__name__)

PURPOSE = "tune"
"""The counter (``CommCounters``) the tuner's own collectives are booked under."""

SAMPLE = 1 << 21  # values the conversion costs are timed on (at most; 8 MiB of float32: ~0.1 s for all formats)
CONVERT_KEYS = [*(format_name(f) for f in FORMATS), "overlap"]  # what measure_conversions times
PROBE_CALLS = 16  # the loaded probe's calls at least (when it is more than PROBE_CALL_MIN values each)
PROBE_CALL_MIN = 1 << 12  # values of one call of the loaded probe at least (16 KiB: 13 ms at 10 Mbit/s)
FIRST_PROBE = 1 << 16  # values of the first, blocking bandwidth probe (256 KiB of fp32)


class AutoTuner:
    """Chooses what the user left to it (``comm_dtype="auto"``, ``sync_every``/``overlap_steps``/``fragments="auto"``).

    Args:
        config: bounds and targets.
        tune_format: the strategy was given ``comm_dtype="auto"``.
    """

    def __init__(self, config: AutoTune | None = None, tune_format: bool = False) -> None:
        if config is not None and not isinstance(config, AutoTune):
            raise TypeError(f"autotune must be an AutoTune(...) or None, got {type(config).__name__}")
        self.explicit = config is not None
        self.config = config if config is not None else AutoTune()
        self.tune_format = tune_format
        self._ctx: SyncContext | None = None
        self._algorithm: ConsensusAlgorithm | None = None
        self._start: int | None = None  # the step after which the measuring steps begin
        self._marks: list[tuple[int, float]] = []  # (step, time at its end) of the measuring steps
        self._first: dict[str, float] = {}
        self._transfer: Future[tuple[int, float]] | None = None
        self._call_bytes = 0.0  # bytes one call of the loaded probe books
        self._stop = threading.Event()  # ends the background probe at step W
        self._busy: tuple[int, float] | None = None  # steps done and time while the transfer ran
        self._probing = False  # the loaded probe was in flight at the end of the last measuring step
        self._check: _Watch | None = None  # what the re-tuning has seen since its last check
        self._pending: tuple[int, Decision] | None = None  # (step decided, a re-tune) waiting for the syncs in flight
        self._origin: int | None = 0  # checks count from this step, the earlier ones unmeasured (None: not known yet)

    @property
    def record(self) -> dict[str, Any] | None:
        """The measurements, the first and current decision, the re-tune history (the algorithm's ``tuning_record``,
        which checkpoints carry); ``None`` before the first decision."""
        return None if self._algorithm is None else self._algorithm.tuning_record

    # ------------------------------------------------------------------ set-up
    def active(self, algorithm: ConsensusAlgorithm) -> bool:
        return self.tune_format or bool(algorithm.auto)

    def check(self, algorithm: ConsensusAlgorithm, modifier: Any) -> None:
        """Refuse what cannot be tuned (at setup, both front ends)."""
        low = self.config.sync_every[0]
        if self.explicit and not self.active(algorithm):
            raise ValueError(
                "autotune=AutoTune(...) has no effect: nothing is left to the tuner. Pass comm_dtype='auto' and/or "
                f"{type(algorithm).__name__}(sync_every='auto', ...), or drop autotune"
            )
        if modifier is not None and self.active(algorithm):
            raise ValueError(
                f"{type(modifier).__name__} acts on the schedule's rounds, which the auto-tuner moves: give "
                "sync_every and comm_dtype numbers (no 'auto') with a gradient modifier"
            )
        if "sync_every" not in algorithm.auto:
            low = algorithm.sync_every
        if "overlap_steps" not in algorithm.auto and algorithm.overlap_steps >= low:
            raise ValueError(
                f"overlap_steps={algorithm.overlap_steps} must be smaller than every sync_every the tuner may choose "
                f"(from {low}): raise AutoTune(sync_every=(H_min, H_max))'s H_min or lower overlap_steps"
            )
        if "fragments" not in algorithm.auto and algorithm.fragments > low:
            raise ValueError(
                f"fragments={algorithm.fragments} needs sync_every >= {algorithm.fragments}: raise H_min to at least it"
            )
        if self.tune_format and not type(algorithm).tunable:
            raise ValueError(
                f"comm_dtype='auto' is chosen with the schedule of PeriodicAveraging or DiLoCo, not "
                f"{type(algorithm).__name__}: give comm_dtype (None, 'bfloat16', 'int8', 'int4')"
            )

    def prepare(self, ctx: SyncContext, algorithm: ConsensusAlgorithm, step: int) -> None:
        """Before ``algorithm.bind``: restore a checkpointed choice, or get ready to measure."""
        self._ctx, self._algorithm = ctx, algorithm
        self._marks, self._first, self._transfer, self._busy, self._check = [], {}, None, None, None
        self._pending, self._probing = None, False
        if not self.active(algorithm):
            return
        record = algorithm.tuning_record
        if record is not None:  # resumed after the decision: the same choice, no measuring
            algorithm.reserve_anchor = False  # (a first bind before the checkpoint was loaded may have set it)
            decision = Decision.from_dict(record["decision"])
            if self.tune_format:
                ctx.comm.comm_dtype = parse_comm_dtype(decision.comm_dtype)
            self._check = _Watch(interruptions=algorithm.interruptions)
            self._origin = None  # after the first sync of this process (set at the first step)
            log.info("auto-tuner: resumed with %s", decision.describe())
            return
        if self.tune_format:
            ctx.comm.comm_dtype = None  # full precision until the decision
            algorithm.reserve_anchor = True  # the wire chosen later sends differences from it
        algorithm.awaiting_tune = True
        self._start = max(step, algorithm.warmup_steps) + self.config.settle_steps

    # ------------------------------------------------------------------ the step hook
    def after_step(self, step: int) -> None:
        algorithm = self._algorithm
        if algorithm is None or not self.active(algorithm):
            return
        now = self._now()
        if algorithm.awaiting_tune:
            self._measure(step, now)
        elif self.config.retune_every:
            self._watch(step, now)

    # ------------------------------------------------------------------ measuring
    def _now(self, synchronize: bool = False) -> float:
        if synchronize:
            device = self._device()
            if device.type != "cpu":
                torch.accelerator.synchronize(device)
        return time.perf_counter()

    def _device(self) -> torch.device:
        assert self._algorithm is not None
        return self._algorithm.sync_tensors()[0][0].device

    def _measure(self, step: int, now: float) -> None:
        assert self._start is not None
        w = self.config.measure_steps
        k = step - self._start
        if k <= 0:
            return
        half = w // 2
        if k in (1, half, w):
            now = self._now(synchronize=True)
        self._marks.append((step, now))
        if k == half:
            self._first_measurements()
            self._probing = self._transfer is not None and not self._transfer.done()
        elif k > half and self._probing and self._transfer is not None:
            # every step the probe ran in, the one it ended in included: a probe shorter than one step (a fast link,
            # a replica's slice of the model) would otherwise leave no busy step, and s unmeasured (read as 0)
            self._busy = (k - half, now - self._first["probe_started"])
            self._probing = not self._transfer.done()
        if k == w:
            self._decide(step)

    def _values(self) -> tuple[list[Tensor], int, torch.dtype, Group]:
        """(the tensors a sync averages, the values this rank sends of them, their dtype, the group they travel
        over)."""
        ctx, algorithm = self._ctx, self._algorithm
        assert ctx is not None and algorithm is not None
        averaged, _ = sync_tensors(ctx.module, algorithm.buffers)
        n = sum(t.numel() for t in averaged)
        world = ctx.world
        if world.split:
            n = -(-n // world.node.size)  # type: ignore[union-attr]  # each rank of a replica sends its slice
        dtype = averaged[0].dtype if algorithm.anchor is None else algorithm.anchor.dtype
        return averaged, n, dtype, world

    def _agree(self, values: list[float]) -> list[float]:
        """The largest of each value over every process (one MAX allreduce)."""
        ctx = self._ctx
        assert ctx is not None
        group = ctx.everyone or ctx.world
        flat = torch.tensor(values, dtype=torch.float64, device=self._device())
        ctx.comm.all_reduce_max_(flat, Group(group.handle, group.ranks, group.rank), PURPOSE)
        return flat.tolist()

    def _first_measurements(self) -> None:
        ctx, algorithm = self._ctx, self._algorithm
        assert ctx is not None and algorithm is not None
        averaged, n, dtype, world = self._values()
        device = self._device()
        times = [t for _, t in self._marks]
        if device.type == "cpu":  # the median step: robust to the spikes of a shared machine
            step_seconds = statistics.median(b - a for a, b in itertools.pairwise(times))
        else:  # a step returns before its kernels ran: the span between two synchronized ends
            step_seconds = (times[-1] - times[0]) / max(1, len(times) - 1)
        cross = Group(world.handle, world.ranks, world.rank)
        latencies = []
        tiny = torch.zeros(1, dtype=torch.float32, device=device)
        for _ in range(5):
            begin = self._now()
            ctx.comm.all_reduce_sum_(tiny, cross, PURPOSE)
            latencies.append(self._now(synchronize=True) - begin)
        latency = statistics.median(latencies)
        probe = torch.zeros(min(FIRST_PROBE, max(n, 1)), dtype=torch.float32, device=device)
        begin = self._now()
        ctx.comm.all_reduce_sum_(probe, cross, PURPOSE)
        seconds = self._now(synchronize=True) - begin
        m = cross.size
        probe_bytes = 2.0 * (m - 1) / m * probe.numel() * 4
        inverse_bandwidth = max(seconds - latency, 1e-6) / max(probe_bytes, 1.0)
        convert = measure_conversions(averaged, dtype, m, cross.rank)
        order = CONVERT_KEYS
        agreed = self._agree([step_seconds, latency, inverse_bandwidth] + [convert[f] for f in order])
        self._first = {"step_seconds": agreed[0], "latency": agreed[1], "inverse_bandwidth": agreed[2]}
        self._first.update(zip(order, agreed[3:], strict=True))
        # the loaded probe: about (W/2)·t seconds of data at the first bandwidth, at most one model, in calls of
        # at most 4 MiB and 1/PROBE_CALLS of it (a whole number, the same on every rank: computed from agreed figures).
        # The background probe stops at step W (the ranks agree after a call): a first bandwidth measured too high
        # (a shaper's burst) makes it too large for the window, and waiting for the rest cost 0.8 s at 10 Mbit/s
        half = self.config.measure_steps - self.config.measure_steps // 2
        background = ctx.background if ctx.background is not None and algorithm.overlappable else None
        share = 0.8 if background is not None else 0.25  # a blocking transfer stops the steps: keep it short
        budget = share * half * agreed[0] / agreed[2]  # bytes
        per_value = 2.0 * (m - 1) / m * 4 if m > 1 else 4.0
        total = max(FIRST_PROBE, min(int(budget / per_value), n))
        per_call = max(1, min(total, 1 << 20, max(PROBE_CALL_MIN, total // PROBE_CALLS)))
        calls = max(1, total // per_call)
        self._call_bytes = per_value * per_call
        self._first["probe_started"] = self._now()
        self._stop = threading.Event()
        if m > 1 and background is not None:
            self._transfer = ctx.comm.start_transfer(
                per_call, background, calls=calls, dtype=torch.float32, device=device, purpose=PURPOSE, stop=self._stop
            )
        elif m > 1:  # nothing can overlap: a blocking transfer gives the bandwidth
            done: Future[tuple[int, float]] = Future()
            begin = self._now()
            buf = torch.zeros(per_call, dtype=torch.float32, device=device)
            for _ in range(calls):
                ctx.comm.all_reduce_sum_(buf, cross, PURPOSE)
            done.set_result((calls, self._now(synchronize=True) - begin))
            self._transfer = done
        log.info(
            "auto-tuner: step %.4f s, latency %.2e s, first bandwidth %.3g MB/s; probing with %.3g MB",
            agreed[0],
            agreed[1],
            1e-6 / agreed[2],
            calls * self._call_bytes / 1e6,
        )

    def _decide(self, step: int) -> None:
        ctx, algorithm = self._ctx, self._algorithm
        assert ctx is not None and algorithm is not None
        first = self._first
        _, n, dtype, world = self._values()
        m = world.size
        if self._transfer is not None:
            self._stop.set()  # the rest of the probe is not needed: the calls done give β
            calls, seconds = self._transfer.result()
            latencies = (2 * calls - 1) * first["latency"]  # each call after the first: its stop-flag allreduce
            inverse_bandwidth = max(seconds - latencies, 1e-6) / max(calls * self._call_bytes, 1.0)
        else:
            inverse_bandwidth = first["inverse_bandwidth"]
        slowdown = 0.0
        if self._busy is not None:
            busy_steps, busy_seconds = self._busy
            slowdown = max(0.0, busy_seconds / (busy_steps * first["step_seconds"]) - 1.0)
        # n differs by one value between the ranks of a replica group (each sends its slice): the largest
        agreed = self._agree([inverse_bandwidth, slowdown, float(n)])
        order = CONVERT_KEYS
        meas = Measurements(
            step_seconds=first["step_seconds"],
            latency=first["latency"],
            bandwidth=1.0 / agreed[0],
            slowdown=agreed[1],
            convert={f: first[f] for f in order},
            numel=int(agreed[2]),
            replicas=m,
            element_size=torch.empty((), dtype=dtype).element_size(),
        )
        decision = self._broadcast(self._choose(meas, algorithm, extra=0.0))
        self._apply(step, decision, first=True)
        algorithm.tuning_record = {
            "measurements": meas.as_dict(),
            "first": decision.as_dict(),
            "decision": decision.as_dict(),
            "history": [],
            "step": step,
        }
        self._check = _Watch(interruptions=algorithm.interruptions)
        self._origin = self._after_first_sync(step)
        log.info("auto-tuner: at step %d chose %s", step, decision.describe())
        for note in decision.notes:
            log.warning("auto-tuner: %s", note)

    def _choose(
        self,
        meas: Measurements,
        algorithm: ConsensusAlgorithm,
        extra: float,
        keep: bool = False,
        config: AutoTune | None = None,
    ) -> Decision:
        """The decision for what the user left open (``keep``: a re-tune, which keeps the wire and the fragments)."""
        comm = self._ctx.comm if self._ctx is not None else None
        if self.tune_format and not keep:
            formats: Any = list(self.config.formats)
        else:
            current = None if comm is None else comm.comm_dtype
            formats = _format_of(current)
        auto = algorithm.auto
        return decide(
            meas,
            config or self.config,
            comm_dtype=formats,
            sync_every=None if "sync_every" in auto else algorithm.sync_every,
            overlap_steps=None if "overlap_steps" in auto else algorithm.overlap_steps,
            fragments=None if ("fragments" in auto and not keep) else algorithm.fragments,
            overlappable=algorithm.overlappable,
            extra=extra,
        )

    def _broadcast(self, decision: Decision) -> Decision:
        """Rank 0's decision on every process (one broadcast of four numbers)."""
        ctx = self._ctx
        assert ctx is not None
        group = ctx.everyone or ctx.world
        index = FORMATS.index(decision.comm_dtype)
        packed = torch.tensor(
            [index, decision.sync_every, decision.overlap_steps, decision.fragments, decision.overhead],
            dtype=torch.float64,
            device=self._device(),
        )
        ctx.comm.broadcast_(packed, group.ranks[0], Group(group.handle, group.ranks, group.rank), PURPOSE)
        fmt, period, tau, count, predicted = packed.tolist()
        fields = decision.as_dict()
        fields.update(
            comm_dtype=FORMATS[int(fmt)],
            sync_every=int(period),
            overlap_steps=int(tau),
            fragments=int(count),
            overhead=predicted,
            met=predicted <= self.config.overhead,
        )
        return Decision.from_dict(fields)

    def _apply(self, step: int, decision: Decision, first: bool) -> None:
        ctx, algorithm = self._ctx, self._algorithm
        assert ctx is not None and algorithm is not None
        if first and self.tune_format:
            ctx.comm.comm_dtype = parse_comm_dtype(decision.comm_dtype)
        algorithm.drain_(step)
        algorithm.apply_schedule_(step, decision.sync_every, decision.overlap_steps, decision.fragments)
        if first:
            algorithm.reserve_anchor = False

    # ------------------------------------------------------------------ re-tuning
    def _watch(self, step: int, now: float) -> None:
        algorithm = self._algorithm
        record = self.record
        assert algorithm is not None and record is not None and self._check is not None
        if self._pending is not None:
            self._apply_pending(step)
            return
        watch = self._check
        if self._origin is None:
            self._origin = self._after_first_sync(step)
        if step <= self._origin:  # the first syncs of a process: not measured
            watch.last_end, watch.interruptions = now, algorithm.interruptions
            return
        if watch.last_end is not None and algorithm.interruptions == watch.interruptions:
            interval = now - watch.last_end
            watch.intervals.append(interval)
            # a clean step: nothing in flight before or after it, and no sync inside it (the floor, measured now)
            if watch.idle and not algorithm.in_flight and algorithm.num_syncs == watch.syncs:
                watch.clean.append(interval)
        watch.last_end, watch.interruptions = now, algorithm.interruptions
        watch.idle, watch.syncs = not algorithm.in_flight, algorithm.num_syncs
        if not self._due(step - self._origin, algorithm.sync_every):
            return
        meas = Measurements.from_dict(record["measurements"])
        decision = Decision.from_dict(record["decision"])
        mean = statistics.fmean(watch.intervals) if watch.intervals else meas.step_seconds
        # the floor: the median clean step of this period when there are enough (the machine's speed drifts),
        # else the measuring steps' (a sync always in flight, τ = H − 1, leaves no clean step), or this period's
        # median step if that is faster (the measuring steps ran slow: the floor cannot exceed a typical step)
        if len(watch.clean) >= MIN_CLEAN:
            floor = statistics.median(watch.clean)
        else:  # no clean steps to measure it on: the measuring steps', unless this period's median step is faster
            floor = min(meas.step_seconds, statistics.median(watch.intervals)) if watch.intervals else meas.step_seconds
        measured, floor = self._agree([max(0.0, mean / floor - 1.0), floor])  # the slowest rank's
        self._check = _Watch(interruptions=algorithm.interruptions)
        entry: dict[str, Any] = {"step": step, "measured": measured, "predicted": decision.overhead, "floor": floor}
        target, threshold = self.config.overhead, self.config.retune_threshold
        too_slow, too_fast = measured > target + threshold, measured < target - threshold
        low, high = self.config.sync_every
        if too_slow:  # this H is too short for the real cost: never again, and learn what the model missed
            record["too_short"] = max(record.get("too_short", 0), decision.sync_every)
            low = max(low, decision.sync_every + 1)
        elif too_fast:  # a shorter H may do: at most halfway down to the longest H measured too short
            low = max(low, (record.get("too_short", 0) + decision.sync_every + 1) // 2)
            high = min(high, decision.sync_every)
        low = max(low, record.get("too_short", 0) + 1)
        if (too_slow or too_fast) and low <= high:
            meas = dataclasses.replace(meas, step_seconds=floor)
            missed = measured * decision.sync_every * floor - round_cost(
                meas, decision.comm_dtype, decision.sync_every, decision.overlap_steps, decision.fragments
            )
            # the model's own cost is taken as a lower bound: a correction only adds what it missed (a negative one
            # would trust a floor measured too high, e.g. on slow first steps, and shorten H for nothing)
            extra = max(decision.extra, missed, 0.0) if too_slow else max(missed, 0.0)
            config = dataclasses.replace(self.config, sync_every=(low, high))
            new = self._broadcast(self._choose(meas, algorithm, extra=extra, keep=True, config=config))
            entry["decision"] = new.as_dict()
            record["history"].append(entry)
            if (new.sync_every, new.overlap_steps) != (decision.sync_every, decision.overlap_steps):
                log.info("auto-tuner: at step %d measured %.1f%%, re-tuning: %s", step, 100 * measured, new.describe())
                self._pending = (step, new)
                self._apply_pending(step)
            else:
                record["decision"] = new.as_dict()
            return
        record["history"].append(entry)

    def _apply_pending(self, step: int) -> None:
        """Apply the re-tune decided at a check once no sync is in flight (every rank at the same step: the merges
        follow the schedule), so that the change waits for no transfer; after a whole round with a sync always in
        flight (several fragments), the syncs in flight are merged now (:meth:`ConsensusAlgorithm.drain_`)."""
        algorithm, record = self._algorithm, self.record
        assert algorithm is not None and record is not None and self._pending is not None
        since, new = self._pending
        if algorithm.in_flight and step - since < algorithm.sync_every:
            return
        self._pending = None
        self._apply(step, new, first=False)
        record["decision"] = new.as_dict()
        record["history"][-1]["applied"] = step
        self._check = _Watch(interruptions=algorithm.interruptions)
        self._origin = step  # the same buffers and groups: nothing to warm up

    def _after_first_sync(self, step: int) -> int:
        """The step after which the first round of syncs that starts after ``step`` has merged.

        The first syncs of a process cost more than the later ones: the transport allocates the
        buffers it keeps, the groups run their first collective of that size (in the benchmarks the
        steps beside the first overlapped bf16 sync of resnet18 took 0.4 s longer in all, the later
        ones about 0.1 s). Measured in a first check, that cost made every first choice look 2–4×
        as expensive as predicted, so the checks start after it: the next round boundary after
        ``step``, plus τ (the last fragment's sync merges then).
        """
        algorithm = self._algorithm
        assert algorithm is not None
        start, period = algorithm.schedule_start, algorithm.sync_every
        boundary = start + (max(step - start, 0) // period + 1) * period
        return boundary + algorithm.overlap_steps

    def _due(self, elapsed: int, period: int) -> bool:
        """Whether a check falls ``elapsed`` steps after the current schedule began (H = ``period``).

        Checks fall on round boundaries, so that every check period holds whole rounds (the same
        number of syncs): the first after :data:`FIRST_ROUNDS` rounds of a new setting (and at least
        :data:`MIN_CHECK_STEPS` steps), so that a choice the model got wrong is seen early, then every
        ``retune_every`` steps rounded up to whole rounds.
        """
        if elapsed <= 0:
            return False
        first = period * max(FIRST_ROUNDS, -(-MIN_CHECK_STEPS // period))
        every = period * max(1, -(-self.config.retune_every // period))
        return elapsed >= first and (elapsed - first) % every == 0


FIRST_ROUNDS = 2
"""Rounds of a new setting before its first check (one round's sync lands in the next when overlapped)."""

MIN_CHECK_STEPS = 16
"""Steps a check period holds at least (a mean over fewer is the machine's noise)."""

MIN_CLEAN = 8
"""Clean steps (nothing in flight, no sync) a re-tune check needs to measure the floor afresh."""


@dataclasses.dataclass
class _Watch:
    """What the re-tuning has seen since its last check."""

    interruptions: int
    intervals: list[float] = dataclasses.field(default_factory=list)  # every step's (end to end)
    clean: list[float] = dataclasses.field(default_factory=list)  # the steps without communication
    last_end: float | None = None
    idle: bool = False  # nothing was in flight after the previous step
    syncs: int = 0  # the algorithm's num_syncs after the previous step


def tuner_for(comm_dtype: Any, autotune: AutoTune | None) -> AutoTuner:
    """The front ends' tuner: ``comm_dtype="auto"`` leaves the wire format to it."""
    return AutoTuner(autotune, tune_format=isinstance(comm_dtype, str) and comm_dtype == "auto")


def may_overlap(algorithm: ConsensusAlgorithm) -> bool:
    """Whether ``algorithm`` overlaps its syncs or may be tuned to (the front ends then make a background group)."""
    return algorithm.overlap_steps > 0 or "overlap_steps" in algorithm.auto


def _format_of(comm_dtype: Any) -> str | None:
    """A wire format's name as ``parse_comm_dtype`` takes it (``torch.bfloat16`` → ``"bfloat16"``)."""
    return comm_dtype if comm_dtype is None or isinstance(comm_dtype, str) else str(comm_dtype).removeprefix("torch.")


def measure_conversions(
    tensors: Sequence[Tensor], anchor_dtype: torch.dtype, replicas: int, rank: int = 0
) -> dict[str, float]:
    """κ_f: seconds per value of each wire format's local work at a sync, by running the transport's own code.

    A sync's local work is timed as it happens: a :class:`~lightning_localsgd.transport.collectives.DryCollectives`
    mean over ``replicas`` ranks (every step of :meth:`Collectives.mean_` on this rank, the network calls replaced
    by the local copies they imply) of copies of the model's first tensors, up to :data:`SAMPLE` values: flatten,
    the NaN/Inf check, anchor deltas, casts, quantization with error feedback, dequantization, division and
    write-back, in the model's own layout and dtype, the packets allocated afresh as a sync allocates them. Each
    format runs twice and the second run is timed (the first allocates the buffers the transport keeps).

    ``"overlap"``: the seconds per value an overlapped sync adds on the training thread beyond a blocking one,
    whatever the format: the snapshot of the values sent (a flatten into new memory), the background buffer
    filled from it, and the merge ``x ← x + (c − sent)``.

    (Before, κ_f was timed on a warm, contiguous 2^20-value sample, operation by operation; it missed the
    NaN/Inf check, the fresh packets and the scattered layout: 4–53 ms predicted against 78–140 ms measured per
    blocking sync of resnet18, docs/results/autotune.md.)
    """
    sample = _sample(tensors, SAMPLE)
    values = sum(t.numel() for t in sample)
    device = sample[0].device
    flat = torch.cat([t.reshape(-1) for t in sample]).to(anchor_dtype)
    anchor = flat - 1e-3 * torch.randn_like(flat)  # the last consensus: a little behind the replica
    m = max(replicas, 2)
    group = Group(None, list(range(m)), min(rank, m - 1))

    def timed(fn: Any, runs: int = 2) -> float:
        seconds = 0.0
        for _ in range(runs):
            if device.type != "cpu":
                torch.accelerator.synchronize(device)
            begin = time.perf_counter()
            fn()
            if device.type != "cpu":
                torch.accelerator.synchronize(device)
            seconds = time.perf_counter() - begin
        return seconds

    out = {}
    for fmt in FORMATS:
        dry = DryCollectives(comm_dtype=fmt)
        wire_anchor = None if fmt is None else anchor
        residual = torch.zeros_like(anchor) if fmt in INTEGER else None
        run = functools.partial(dry.mean_, sample, group, anchor=wire_anchor, residual=residual)
        out[format_name(fmt)] = timed(run)
    merged, sizes = [t.clone() for t in sample], [t.numel() for t in sample]
    scratch = torch.empty(values, dtype=anchor_dtype, device=device)

    def overlap() -> None:  # what ConsensusAlgorithm._start, Collectives.start_mean and the merge do
        sent = torch.cat([t.reshape(-1) for t in merged]).to(anchor_dtype)  # the snapshot, new memory
        buf = torch.empty(values + m, dtype=anchor_dtype, device=device)  # the background buffer, new memory
        buf[:values].copy_(sent)
        for x, c, s in zip(merged, buf[:values].split(sizes), sent.split(sizes), strict=True):
            x.add_(c.view_as(x).to(x) - s.view_as(x).to(x))  # x ← x + (c − sent): here c = sent, x stays

    def blocking_part() -> None:  # what the dry mean already counted in their place: flatten and write-back
        flatten_into(merged, scratch)
        unflatten_(scratch, merged)

    out["overlap"] = max(0.0, timed(overlap) - timed(blocking_part))
    return {name: seconds / values for name, seconds in out.items()}


def _sample(tensors: Sequence[Tensor], limit: int) -> list[Tensor]:
    """Copies of the first of ``tensors`` holding at least ``limit`` values in all (the last one cut to fit)."""
    out, total = [], 0
    for t in tensors:
        piece = t.detach()
        if total + piece.numel() > limit:
            piece = piece.reshape(-1)[: max(limit - total, 1)]
        out.append(piece.clone())
        total += piece.numel()
        if total >= limit:
            break
    return out
