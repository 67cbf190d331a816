"""The only module that calls ``torch.distributed``.

Design rules (see docs/design.md):

* **One collective per sync.** Tensors are flattened into one buffer and reduced in buckets of at
  most ``bucket_mb`` megabytes, never one call per parameter. The flat buffers persist between
  syncs (one model-sized buffer; two with a reduced-precision transport) because allocating
  them anew costs more than a loopback allreduce.
* **SUM, then divide.** gloo has no ``ReduceOp.AVG``; the division happens locally in the tensors'
  own precision.
* **Reduced-precision transport.** With ``comm_dtype=torch.bfloat16`` only the *difference* from a
  shared fp32 anchor travels (replicas minus the last consensus are small numbers, so bf16 loses
  little), and the mean is added back to the fp32 anchor on the receiving side. Sending raw
  parameters in bf16 would round every weight to 3 significant digits.
* **Integer transport with error feedback.** ``comm_dtype="int8"`` / ``"int4"``: the difference
  from the anchor plus this rank's *residual* (what rounding dropped at earlier syncs) is quantized
  per block of 128 values (:mod:`lightning_localsgd.transport.quantize`) and reduced in two steps, each
  moving (m−1)/m of the packet per rank like a ring: an all-to-all sends chunk j of every rank's
  packet to rank j, which sums the m dequantized copies, re-quantizes the sum and keeps that
  rounding in its residual; an all-gather returns every summed chunk to everyone. Every rank
  dequantizes the same bytes, so every rank gets the same mean, and nothing rounding drops is lost:
  it travels at a later sync.
* **Background syncs.** :meth:`Collectives.start_mean` runs the same averaging on a worker thread
  over a process group reserved for it (so it never interleaves with the training thread's
  collectives) and returns a :class:`PendingMean`; the training thread goes on and calls
  :meth:`PendingMean.wait` when it needs the result. Errors raised on the thread surface there.
* **Non-finite replicas are caught.** Each rank appends a one-hot "I hold NaN/Inf" flag to the
  buffer; the flags ride in the same allreduce, so every rank learns *which* rank went bad and
  raises the same error, or (``nonfinite="skip"``) repeats the reduction without those ranks.
* **Every call is counted.** :class:`CommCounters` keeps the estimated bytes this rank sent
  (ring algorithms: an allreduce of B bytes over m ranks sends 2·(m−1)/m·B per rank, a broadcast
  (m−1)/m·B on average, an all-gather (m−1)·B) and the wall-clock seconds spent inside collectives.
  Timeouts are those of the process groups (``LocalSGDStrategy(timeout=...)``): a peer that
  never arrives makes the call fail instead of hang.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import record_function

from lightning_localsgd._checks import check_number
from lightning_localsgd.transport.quantize import BLOCK, IntFormat, dequantize, packet_bytes, quantize
from lightning_localsgd.transport.streams import StreamOrder, side_stream
from lightning_localsgd.transport.tensors import any_nonfinite, flatten, flatten_into, unflatten_

__all__ = [
    "BACKGROUND_RANGE",
    "INT_FORMATS",
    "CollectiveError",
    "Collectives",
    "CommCounters",
    "CommDtype",
    "DryCollectives",
    "Group",
    "NonFinitePolicy",
    "NonFiniteReplicaError",
    "PendingMean",
    "destroy_groups",
    "device_events",
    "flat_anchor",
    "new_group",
    "nonfinite_flag",
    "parse_comm_dtype",
    "replica_slice",
]

BACKGROUND_RANGE = "lightning_localsgd::sync(background)"
_comm_thread = threading.local()  # .active: this thread is the comm thread
NonFinitePolicy = Literal["raise", "skip"]
CommDtype = torch.dtype | IntFormat
"""What travels at a sync: a floating dtype, or ``"int8"`` / ``"int4"`` (per-block integers)."""
INT_FORMATS: tuple[str, ...] = ("int8", "int4")
WIRE_FLOATS: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)


def parse_comm_dtype(value: str | torch.dtype | None) -> CommDtype | None:
    """``None``, ``"bfloat16"``, ``"float16"``, ``"float32"`` (a dtype or its name), ``"int8"`` or ``"int4"``.

    Other dtypes are refused: float8 has no allreduce on gloo or NCCL and its 2-3 significant bits
    would swamp the deltas (use ``"int8"``: per-block scales, error feedback); float64 would send
    more bytes than an fp32 model's own parameters.
    """
    if value is None:
        return None
    if isinstance(value, str) and value in INT_FORMATS:
        return value  # type: ignore[return-value]
    if isinstance(value, torch.dtype):
        dtype: Any = value
    else:
        dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or dtype not in WIRE_FLOATS:
        hint = ""
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            hint = " (float8: use 'int8', per-block scales with error feedback; float64: use None)"
        raise ValueError(
            "comm_dtype must be None, a floating dtype such as 'bfloat16' or 'float16', or 'int8' / 'int4', "
            f"got {value!r}{hint}"
        )
    return dtype


def device_events(device: torch.device | None) -> tuple[Any, Any] | None:
    """Two timing events on ``device``'s current stream, or ``None`` (the CPU, or a device without events)."""
    if device is None or device.type == "cpu":
        return None
    module = torch.get_device_module(device)
    if not hasattr(module, "Event"):
        return None
    return module.Event(enable_timing=True), module.Event(enable_timing=True)


def flat_anchor(anchor: Tensor | Sequence[Tensor] | None) -> Tensor | None:
    """An anchor given as one flat tensor or as a list of tensors, as one flat tensor (``None`` stays)."""
    return None if anchor is None else (anchor if isinstance(anchor, Tensor) else flatten(anchor))


def replica_slice(n: int, k: int, j: int) -> tuple[int, int, int]:
    """``(lo, hi, chunk)``: the values ``[lo, hi)`` of n that rank j of a k-rank replica syncs (``chunk`` = ⌈n/k⌉)."""
    chunk = -(-n // k)
    return min(j * chunk, n), min((j + 1) * chunk, n), chunk


def nonfinite_flag(values: Tensor) -> Tensor:
    """1.0 on the values' device if any of them is NaN/±Inf, else 0.0 (no host read; see :func:`any_nonfinite`)."""
    return any_nonfinite(values).to(torch.float32)


class NonFiniteReplicaError(FloatingPointError):
    """A replica held NaN or Inf when it was about to be synchronized."""


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names this rank, the operation and the peers."""


@dataclass
class CommCounters:
    """Cumulative communication of this rank, split by purpose (``"sync"``, ``"grad"``, ...).

    Bytes are the ring estimates of the module docstring. Seconds: wall-clock inside the call on the
    CPU; on an accelerator the device time between events around the call, added once the
    collective has completed (:meth:`settle`, which :attr:`seconds` calls).
    """

    bytes_by_purpose: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    seconds_by_purpose: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls_by_purpose: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    wait_seconds: float = 0.0  # the training thread waiting for background syncs (not in ``seconds``)
    serialized: int = 0  # times the training thread waited for the comm thread before its own collective
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _device_timed: list[tuple[str, Any, Any]] = field(default_factory=list, repr=False)

    # The names before 0.2 ("kind" meant the purpose); read-only.
    bytes_by_kind = property(lambda self: self.bytes_by_purpose)
    seconds_by_kind = property(lambda self: self.seconds_by_purpose)
    calls_by_kind = property(lambda self: self.calls_by_purpose)

    @property
    def bytes_sent(self) -> float:
        return float(sum(self.bytes_by_purpose.values()))

    @property
    def seconds(self) -> float:
        self.settle()
        return float(sum(self.seconds_by_purpose.values()))

    @property
    def calls(self) -> int:
        return int(sum(self.calls_by_purpose.values()))

    def add(self, purpose: str, nbytes: float, seconds: float) -> None:
        with self._lock:  # the background thread books its collectives too
            self.bytes_by_purpose[purpose] += nbytes
            self.seconds_by_purpose[purpose] += seconds
            self.calls_by_purpose[purpose] += 1

    def add_device_timed(self, purpose: str, nbytes: float, start: Any, end: Any) -> None:
        """A collective on an accelerator: its bytes now, its time from two device events once it completed."""
        with self._lock:
            self.bytes_by_purpose[purpose] += nbytes
            self.calls_by_purpose[purpose] += 1
            self.seconds_by_purpose[purpose] += 0.0
            self._device_timed.append((purpose, start, end))

    def settle(self) -> None:
        """Add the device time of the collectives that have completed since (no host synchronization)."""
        with self._lock:
            waiting = []
            for purpose, start, end in self._device_timed:
                if end.query():
                    self.seconds_by_purpose[purpose] += start.elapsed_time(end) / 1000.0  # ms
                else:
                    waiting.append((purpose, start, end))
            self._device_timed = waiting


@dataclass
class Group:
    """A process group with the facts collectives need: its handle, size and this rank's place.

    **Replica groups.** When ``node`` is set, a replica is a group of ranks that hold equal values
    (a node running DDP inside, ``LocalSGDStrategy(within_node="ddp")``). Then ``handle``,
    ``ranks`` and ``rank`` are this rank's *cross* group: one rank per replica, the ranks with this
    rank's local rank on every node, so ``size`` is the number of replicas and a plain collective
    over the group reaches every replica once. ``node`` is the group of this rank's replica. A
    mean over such a group is split (:meth:`Collectives.mean_`): local rank j of every node averages
    slice j of the flat buffer with its peers across nodes, then each node all-gathers its slices,
    so each node sends one model's worth across nodes per sync, spread over all of its ranks.

    **Sharded replicas.** When ``shards`` is set, a replica is a node whose k ranks each hold a
    different shard of it (FSDP2 inside the node, ``LocalSGDStrategy(within_node="fsdp")``);
    ``handle``, ``ranks`` and ``rank`` are again the cross group, whose ranks hold the same shard
    of every replica, so a plain mean over the group is the mean of this rank's shard.
    ``shards`` (the node) only joins the NaN/Inf verdict: a replica is skipped or refused as a
    whole when any of its shards holds NaN/Inf.
    """

    handle: Any  # a torch ProcessGroup, or None for the default (world) group
    ranks: list[int]  # global ranks, in group order
    rank: int  # this process's index in ``ranks``
    node: Group | None = None  # the ranks of this rank's replica, which hold equal values (replica groups)
    shards: Group | None = None  # the ranks holding the other shards of this rank's replica (sharded replicas)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def split(self) -> bool:
        """Whether a mean over this group is split across the ranks of each replica (see above)."""
        return self.node is not None and self.node.size > 1


class PendingMean:
    """A mean running on the background thread; :meth:`wait` returns it (a flat tensor).

    ``keep``: the tensors the background work reads, referenced until :meth:`wait` (on an
    accelerator, their memory must not return to the training stream before the side stream is
    done with it; see :mod:`lightning_localsgd.transport.streams`).
    """

    def __init__(
        self, future: Future[Tensor], counters: CommCounters, order: StreamOrder | None = None, keep: Any = None
    ) -> None:
        self._future = future
        self._counters = counters
        self._order = order
        self._keep = keep
        self._mean: Tensor | None = None

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> Tensor:
        """Block until the mean is known; re-raises what the background thread raised."""
        if self._mean is None:
            start = time.perf_counter()
            self._mean = self._future.result()
            if self._order is not None:
                self._order.join()  # the training stream waits for the side stream's last kernel
            self._keep = None
            self._counters.wait_seconds += time.perf_counter() - start
        return self._mean


class Collectives:
    """Flat, bucketed, counted collectives over :class:`Group` objects.

    Args:
        comm_dtype: what travels when averaging against an anchor: ``None`` (the tensors' own dtype),
            a floating dtype (``torch.bfloat16``), or ``"int8"`` / ``"int4"`` (needs a residual for
            error feedback). Raw values (no anchor, e.g. gradients) always travel in their own dtype.
        bucket_mb: largest single collective, in megabytes; bigger buffers go in several calls.
    """

    def __init__(self, comm_dtype: str | torch.dtype | None = None, bucket_mb: float = 256.0) -> None:
        self.bucket_mb = check_number("bucket_mb", bucket_mb, 0, low_open=True, example="256")
        self.comm_dtype: CommDtype | None = parse_comm_dtype(comm_dtype)
        self.counters = CommCounters()
        self.serialize_threads = False  # see before_collective
        self.keep_buffers = True  # the flat buffers persist between syncs (False: offload, see ConsensusAlgorithm)
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[Any]] = []
        self._streams: dict[torch.device, Any] = {}

    @property
    def quantized(self) -> bool:
        """Whether syncs against an anchor travel as integers (``"int8"`` / ``"int4"``)."""
        return isinstance(self.comm_dtype, str)

    # ------------------------------------------------------------------ primitives
    def _timed(
        self,
        purpose: str,
        nbytes: float,
        fn: Callable[[], Any],
        op: str = "a collective",
        group: Group | None = None,
        device: torch.device | None = None,
    ) -> Any:
        """Run the collective ``fn``, book its bytes and time; a failure names this rank, ``op`` and the peers.

        On an accelerator (``device``) the time is the device's, between events recorded around the
        call (a call returns once queued, see docs/gpu.md); it is added when the collective has
        completed (:meth:`CommCounters.settle`). On the CPU it is the call's wall-clock.
        """
        self.before_collective()
        events = device_events(device)
        if events is not None:
            events[0].record()
        start = time.perf_counter()
        try:
            out = fn()
        except RuntimeError as err:  # gloo/NCCL timeouts and closed connections
            if isinstance(err, CollectiveError):
                raise
            me = dist.get_rank() if dist.is_initialized() else "?"
            peers = f" with ranks {group.ranks}" if group is not None else ""
            raise CollectiveError(
                f"rank {me} gave up on {op} ({purpose}){peers} after {time.perf_counter() - start:.0f} s: {err}. "
                "A peer died or stalled (its own log says why), or it is slower than the timeout: raise "
                "the strategy's timeout=... if it is only slow."
            ) from err
        if events is not None:
            events[1].record()
            self.counters.add_device_timed(purpose, nbytes, *events)
        else:
            self.counters.add(purpose, nbytes, time.perf_counter() - start)
        return out

    def all_reduce_sum_(self, flat: Tensor, group: Group, purpose: str) -> Tensor:
        """In-place SUM of a 1-D tensor across ``group``, in buckets of at most ``bucket_mb``."""
        if group.size == 1:
            return flat
        per_bucket = max(1, int(self.bucket_mb * 2**20) // flat.element_size())
        nbytes = 2.0 * (group.size - 1) / group.size * flat.numel() * flat.element_size()

        def run() -> None:
            for chunk in flat.split(per_bucket):
                dist.all_reduce(chunk, op=dist.ReduceOp.SUM, group=group.handle)

        self._timed(purpose, nbytes, run, "an allreduce", group, flat.device)
        return flat

    def all_reduce_max_(self, flat: Tensor, group: Group, purpose: str, op: str = "an allreduce (MAX)") -> Tensor:
        """In-place elementwise MAX of a small 1-D tensor across ``group`` (verdicts and measurements everyone must
        agree on); ``op`` names it in a failure's message."""
        if group.size == 1:
            return flat
        nbytes = 2.0 * (group.size - 1) / group.size * flat.numel() * flat.element_size()
        run = lambda: dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group.handle)  # noqa: E731
        self._timed(purpose, nbytes, run, op, group, flat.device)
        return flat

    def start_transfer(
        self,
        numel: int,
        group: Group,
        *,
        calls: int,
        dtype: torch.dtype,
        device: torch.device,
        purpose: str,
        stop: threading.Event | None = None,
    ) -> Future[tuple[int, float]]:
        """Up to ``calls`` allreduces of ``numel`` zeros over ``group`` on the background thread; the future gives
        ``(calls done, their seconds)`` (the auto-tuner's probe of the link under load, while local steps go on).
        Every rank of the group must start the same transfer.

        ``stop``: set it to end the transfer early. Before each call after the first, the ranks agree whether any
        of them has set it (one MAX allreduce of one value), so every rank stops after the same call and the
        group is free again; the call in flight when it is set still completes.
        """
        buf = torch.zeros(numel, dtype=dtype, device=device)
        flag = torch.zeros(1, dtype=torch.float32, device=device)
        plain = Group(group.handle, group.ranks, group.rank)

        def run() -> tuple[int, float]:
            _comm_thread.active = True
            start, done = time.perf_counter(), 0
            for _ in range(calls):
                if stop is not None and done:
                    flag.fill_(1.0 if stop.is_set() else 0.0)
                    if self.all_reduce_max_(flag, plain, purpose, "an allreduce (MAX) of the probe's stop flag")[0]:
                        break
                self.all_reduce_sum_(buf, plain, purpose)
                done += 1
            if device.type != "cpu":
                torch.accelerator.synchronize(device)
            return done, time.perf_counter() - start

        return self._submit(run)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on the comm thread (one worker: background work runs in submission order)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="localsgd-sync")
        future = self._executor.submit(fn, *args)
        self._pending = [f for f in self._pending if not f.done()] + [future]
        return future

    def all_to_all_(self, out: Tensor, local: Tensor, group: Group, purpose: str) -> Tensor:
        """Chunk j of ``local`` goes to the group's j-th rank; ``out`` receives every rank's chunk (group order)."""
        if group.size == 1:
            out.copy_(local)
            return out
        nbytes = (group.size - 1) / group.size * local.numel() * local.element_size()
        self._timed(
            purpose,
            nbytes,
            lambda: dist.all_to_all_single(out, local, group=group.handle),
            "an all-to-all",
            group,
            local.device,
        )
        return out

    def broadcast_(self, flat: Tensor, src: int, group: Group, purpose: str) -> Tensor:
        """In-place broadcast of a 1-D tensor from global rank ``src`` to ``group``."""
        if group.size == 1:
            return flat
        nbytes = (group.size - 1) / group.size * flat.numel() * flat.element_size()
        self._timed(
            purpose,
            nbytes,
            lambda: dist.broadcast(flat, src=src, group=group.handle),
            f"a broadcast from {src}",
            group,
            flat.device,
        )
        return flat

    def all_gather(self, local: Tensor, group: Group, purpose: str) -> Tensor:
        """Stack every rank's 1-D ``local`` into a ``(group.size, numel)`` tensor (group order)."""
        if group.size == 1:
            return local.unsqueeze(0).clone()
        out = torch.empty(group.size * local.numel(), dtype=local.dtype, device=local.device)
        self.all_gather_into_(out, local.reshape(-1), group, purpose)
        return out.view(group.size, local.numel())

    def all_gather_into_(
        self, out: Tensor, local: Tensor, group: Group, purpose: str, op: str = "an all-gather"
    ) -> Tensor:
        """Every rank's 1-D ``local`` into the flat ``out`` (group order; ``group.size`` times its values)."""
        nbytes = (group.size - 1) * local.numel() * local.element_size()
        self._timed(purpose, nbytes, lambda: _all_gather_flat(out, local, group.handle), op, group, local.device)
        return out

    def gather_object(self, obj: Any, group: Group, purpose: str) -> list[Any] | None:
        """Every rank's picklable ``obj`` on the group's first rank (``None`` elsewhere)."""
        if group.size == 1:
            return [obj]
        dst = group.ranks[0]
        out: list[Any] | None = [None] * group.size if group.rank == 0 else None
        self._timed(
            purpose,
            0.0,
            lambda: dist.gather_object(obj, out, dst=dst, group=group.handle),
            f"gathering objects on rank {dst}",
            group,
        )
        return out

    # ------------------------------------------------------------------ averaging
    @torch.no_grad()
    def mean_(
        self,
        tensors: Sequence[Tensor],
        group: Group,
        *,
        purpose: str = "sync",
        anchor: Tensor | Sequence[Tensor] | None = None,
        residual: Tensor | None = None,
        nonfinite: NonFinitePolicy = "raise",
        step: int | None = None,
        observer: Callable[[Tensor, Tensor], None] | None = None,
    ) -> None:
        """Replace every tensor by its mean over ``group``, with one allreduce (per bucket).

        Args:
            tensors: this rank's tensors; overwritten with the mean.
            group: who averages.
            purpose: the counter the bytes are booked under.
            anchor: a copy of the tensors (a list, or one flat tensor) that is identical on every rank
                (the last consensus). Without an anchor the tensors travel in their own dtype.
                When given and ``comm_dtype`` is set, ``tensors − anchor`` travels in ``comm_dtype``
                and the mean is ``anchor + mean(tensors − anchor)``, computed in full precision.
            residual: this rank's error-feedback residual (flat, the anchor's dtype), required with
                an integer ``comm_dtype``; updated in place with what rounding dropped.
            nonfinite: ``"raise"`` a :class:`NonFiniteReplicaError` naming the offending ranks, or
                ``"skip"`` them (average the finite replicas only; every rank gets that average).
            step: the optimizer step, for the error message.
            observer: called as ``observer(local_flat, mean_flat)`` before the mean is written back
                (used by :class:`~lightning_localsgd.ReplicaDrift`).
        """
        if group.size == 1 or not tensors:
            return
        n, m = sum(t.numel() for t in tensors), group.size
        buf = self._scratch("local", tensors[0].dtype, n + m, tensors[0].device)
        flatten_into(tensors, buf[:n])
        local_copy = buf[:n].clone() if observer is not None else None

        def refill(out: Tensor) -> None:
            flatten_into(tensors, out)

        mean = self._mean_flat(buf, n, group, purpose, anchor, residual, nonfinite, step, refill, "")
        if observer is not None:
            observer(local_copy, mean)
        unflatten_(mean, tensors)

    def start_mean(
        self,
        local: Tensor,
        group: Group,
        *,
        purpose: str = "sync",
        anchor: Tensor | None = None,
        residual: Tensor | None = None,
        nonfinite: NonFinitePolicy = "raise",
        step: int | None = None,
        device: torch.device | None = None,
    ) -> PendingMean:
        """Start averaging the flat ``local`` over ``group`` on the background thread.

        Same arithmetic as :meth:`mean_`. ``local`` (and ``anchor``, ``residual``) belong to the
        background thread until :meth:`PendingMean.wait` returns: do not touch them before. The
        mean comes back in a new flat tensor. Use a group that nothing else uses concurrently.
        """
        n = local.numel()
        device = local.device if device is None else device  # the wire's device (``local`` may be in host memory)
        buf = torch.empty(n + group.size, dtype=local.dtype, device=device)
        buf[:n].copy_(local)
        order = StreamOrder(device, self._side_stream(device))  # after the snapshot's copy

        def refill(out: Tensor) -> None:
            out.copy_(local)

        args = (buf, n, group, purpose, anchor, residual, nonfinite, step, refill, "background/")
        future = self._submit(self._background_mean, order, *args)
        return PendingMean(future, self.counters, order, keep=(buf, local, anchor, residual))

    def _background_mean(self, order: StreamOrder, *args: Any) -> Tensor:
        _comm_thread.active = True
        with record_function(BACKGROUND_RANGE), order.on_side():  # the profiler's view; the side stream
            return self._mean_flat(*args)

    def _side_stream(self, device: torch.device) -> Any | None:
        if device not in self._streams:
            self._streams[device] = side_stream(device)
        return self._streams[device]

    def quiesce(self) -> None:
        """Wait until no background sync is running (their means are kept for their merge step)."""
        for future in self._pending:
            if not future.done():
                start = time.perf_counter()
                wait([future])
                self.counters.wait_seconds += time.perf_counter() - start
                self.counters.serialized += 1
        self._pending = []

    def before_collective(self) -> None:
        """Called before the training thread issues a collective (this class's, or Lightning's own).

        With ``serialize_threads`` (set by the strategies on NCCL), it first waits for the syncs in
        flight: two threads driving two NCCL communicators in different orders can deadlock, so on
        NCCL only one of them communicates at a time. On gloo the two groups run side by side.
        """
        if self.serialize_threads and not getattr(_comm_thread, "active", False):
            self.quiesce()

    def close(self) -> None:
        """Stop the background thread (after the syncs it runs have finished)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _mean_flat(
        self,
        buf: Tensor,
        n: int,
        group: Group,
        purpose: str,
        anchor: Tensor | Sequence[Tensor] | None,
        residual: Tensor | None,
        nonfinite: NonFinitePolicy,
        step: int | None,
        refill: Callable[[Tensor], None],
        scratch: str,
        code: Tensor | None = None,
    ) -> Tensor:
        """The mean over ``group`` of the values in ``buf[:n]`` (``buf[n:]``: m free slots), in ``buf[:n]``.

        ``code``: this rank's NaN/Inf code computed by the caller (a split mean computes it over the
        whole buffer, so that every slice of a replica reaches the same verdict).
        """
        if group.split and n >= group.node.size**2:  # type: ignore[union-attr]  # (every slice holds values)
            return self._split_mean(buf, n, group, purpose, anchor, residual, nonfinite, step, refill, scratch)
        with torch.no_grad():
            local = buf[:n]
            base = flat_anchor(anchor)
            if code is None and group.shards is not None and group.shards.size > 1:
                code = self._replica_code(local, group.shards, base, purpose)
            if base is not None:
                local.sub_(base)  # the delta from the shared anchor travels
            if self.quantized and base is not None:
                divisor = self._quantized_sum_(local, residual, group, purpose, nonfinite, step, scratch, code)
            else:
                divisor = self._float_sum_(buf, n, group, purpose, base, nonfinite, step, refill, scratch, code)
            local.div_(divisor)
            if base is not None:
                local.add_(base)
            return local

    def _local_code(self, local: Tensor, base: Tensor | None) -> Tensor:
        """This rank's NaN/Inf code for ``local``: 1 NaN/Inf, 2 a float16 delta from ``base`` beyond ±65504, else 0."""
        code = nonfinite_flag(local)
        wire = self.comm_dtype
        if wire == torch.float16 and local.dtype != torch.float16 and base is not None:
            limit = torch.finfo(wire).max  # the delta would overflow the wire dtype (float16)
            overflow = ((local - base).abs().amax() > limit).to(torch.float32)
            code = torch.where(code > 0, code, 2.0 * overflow)
        return code

    def _replica_code(self, local: Tensor, shards: Group, base: Tensor | None, purpose: str) -> Tensor:
        """The NaN/Inf code of this rank's whole replica: the largest over its shards (one 4-byte allreduce)."""
        code = self._local_code(local, base).reshape(1).to(torch.float32)
        self.all_reduce_max_(code, shards, purpose + "/node", "an allreduce of NaN/Inf flags inside the replica")
        return code[0]

    def _split_mean(
        self,
        buf: Tensor,
        n: int,
        group: Group,
        purpose: str,
        anchor: Tensor | Sequence[Tensor] | None,
        residual: Tensor | None,
        nonfinite: NonFinitePolicy,
        step: int | None,
        refill: Callable[[Tensor], None],
        scratch: str,
    ) -> Tensor:
        r"""The mean over a replica group (``group.node`` set), split across each replica's k ranks.

        Every rank of a replica holds the same n values x. With :math:`c = \lceil n/k \rceil`, local
        rank j owns the slice :math:`S_j = [jc, \min((j+1)c, n))` and computes
        :math:`\bar x[S_j] = \frac1N \sum_{\text{replicas } r} x_r[S_j]` over its cross group
        (``group``'s handle: local rank j of each of the N replicas) with the usual arithmetic (anchor
        deltas, wire formats, error feedback on its slice of ``residual``); the replica's ranks then
        all-gather their slices, so every rank ends with the whole mean. Bytes per rank across replicas:
        an allreduce of c values (2·(N−1)/N·c per rank, ≈ one model per replica per sync in all);
        inside the replica an all-gather of (k−1)·c values, booked under ``purpose + "/node"``.

        The NaN/Inf verdict is computed once over the whole buffer (equal on the replica's ranks), so
        every slice skips or raises for the same replicas. Equal to an unsplit mean over the cross
        group for float transports (the same sums, slice by slice); integer transports round per
        block of their slice, with the same error-feedback guarantee.
        """
        node = group.node
        assert node is not None
        k, j, m = node.size, node.rank, group.size
        local, dtype, device = buf[:n], buf.dtype, buf.device
        base = flat_anchor(anchor)
        code = self._local_code(local, base)
        lo, hi, chunk = replica_slice(n, k, j)
        part = self._scratch(scratch + "slice", dtype, hi - lo + m, device)  # the slice, then m flag slots
        part[: hi - lo].copy_(local[lo:hi])

        def refill_slice(out: Tensor) -> None:
            whole = torch.empty(n, dtype=dtype, device=device)
            refill(whole)
            out.copy_(whole[lo:hi])

        cross = Group(group.handle, group.ranks, group.rank)
        piece_anchor = None if base is None else base[lo:hi]
        piece_residual = None if residual is None else residual[lo:hi]
        args = (purpose, piece_anchor, piece_residual, nonfinite, step, refill_slice, scratch + "slice/")
        mean = self._mean_flat(part, hi - lo, cross, *args, code=code)
        local.copy_(self.gather_slices(mean, n, chunk, node, purpose + "/node", scratch))
        return local

    def gather_slices(self, piece: Tensor, n: int, chunk: int, node: Group, purpose: str, scratch: str = "") -> Tensor:
        """The n values whose slice :func:`replica_slice` ``(n, k, j)`` is ``piece`` on rank j of ``node``, on every
        rank (one all-gather of ``chunk`` values per rank); a scratch view, valid until the next call."""
        gathered = self._scratch(scratch + "gathered", piece.dtype, node.size * chunk, piece.device)
        send = self._scratch(scratch + "send", piece.dtype, chunk, piece.device)  # apart from ``gathered``
        send[: piece.numel()].copy_(piece)
        send[piece.numel() :].zero_()
        self.all_gather_into_(gathered, send, node, purpose, "an all-gather inside the replica")
        return gathered[:n]

    def _float_sum_(
        self,
        buf: Tensor,
        n: int,
        group: Group,
        purpose: str,
        base: Tensor | None,
        nonfinite: NonFinitePolicy,
        step: int | None,
        refill: Callable[[Tensor], None],
        scratch: str,
        code: Tensor | None = None,
    ) -> int:
        """Sum ``buf[:n]`` over the group in the wire dtype, the NaN/Inf flags riding in the same call.

        Each rank writes its code into its own flag slot, on the device (no host read before the
        call): 1 if its values hold NaN/Inf, 2 if they are finite but overflow the wire dtype (a
        float16 delta beyond ±65504). The flags are read once, after the sum.
        """
        m, local, dtype = group.size, buf[:n], buf.dtype
        # Reduced precision only for deltas from an anchor; raw values (e.g. gradients) travel as they are.
        wire_dtype = self.comm_dtype if (isinstance(self.comm_dtype, torch.dtype) and base is not None) else dtype
        wire = buf if wire_dtype == dtype else self._scratch(scratch + "wire", wire_dtype, n + m, buf.device)
        bad_here = nonfinite_flag(local) if code is None else code
        if wire is not buf:
            wire[:n].copy_(local)
            if code is None:
                bad_here = torch.where(bad_here > 0, bad_here, 2.0 * nonfinite_flag(wire[:n]))  # the cast overflowed
        wire[n:].zero_()
        wire[n + group.rank] = bad_here.to(wire_dtype)
        self.all_reduce_sum_(wire, group, purpose)
        codes = wire[n:].tolist()  # the one device-to-host read of a sync
        bad_ranks = [group.ranks[i] for i, code in enumerate(codes) if code != 0.0]
        divisor = m
        if bad_ranks:
            overflowed = [group.ranks[i] for i, code in enumerate(codes) if code == 2.0]
            self._check_skippable(bad_ranks, m, nonfinite, step, overflowed, wire_dtype)
            finite = codes[group.rank] == 0.0
            # Repeat without the bad replicas: they contribute zeros and the divisor shrinks.
            retry = wire[:n]
            if finite:
                refill(local)
                if base is not None:
                    local.sub_(base)
                retry.copy_(local)
            else:
                retry.zero_()
            self.all_reduce_sum_(retry, group, purpose)
            divisor = m - len(bad_ranks)
        if wire is not buf:
            local.copy_(wire[:n])
        return divisor

    def _quantized_sum_(
        self,
        local: Tensor,
        residual: Tensor | None,
        group: Group,
        purpose: str,
        nonfinite: NonFinitePolicy,
        step: int | None,
        scratch: str,
        code: Tensor | None = None,
    ) -> int:
        """Sum ``local`` (deltas) over the group as integers with error feedback; see the module docs."""
        fmt: IntFormat = self.comm_dtype  # type: ignore[assignment]
        if residual is None:
            raise ValueError(f"comm_dtype={fmt!r} needs an error-feedback residual: pass residual= to mean_")
        if residual.device != local.device:  # kept in host memory (offload): used here, written back below
            host, residual = residual, residual.to(local.device, non_blocking=True)
        else:
            host = None
        m, n, dtype = group.size, local.numel(), local.dtype
        flags = torch.zeros(m, dtype=torch.float32, device=local.device)
        flags[group.rank] = nonfinite_flag(local) if code is None else code
        self.all_reduce_sum_(flags, group, purpose)
        codes = flags.tolist()  # the one device-to-host read of a sync
        bad_ranks = [group.ranks[i] for i, code in enumerate(codes) if code != 0.0]
        finite = codes[group.rank] == 0.0
        if bad_ranks:
            self._check_skippable(bad_ranks, m, nonfinite, step)
        chunk = -(-n // (m * BLOCK)) * BLOCK  # values per rank's chunk, a whole number of blocks
        padded = self._scratch(scratch + "padded", dtype, m * chunk, local.device)
        padded.zero_()
        if finite:
            padded[:n].copy_(local).add_(residual)  # what this rank owes: the delta plus the residual
        per_packet = packet_bytes(chunk, fmt)
        # the packets are transient (not kept between syncs: docs/gpu.md's memory table counts model-sized buffers)
        sent = torch.empty(m * per_packet, dtype=torch.uint8, device=local.device)
        for c, packet in zip(padded.split(chunk), sent.split(per_packet), strict=True):
            # straight into the packet; what rounding dropped overwrites the chunk (cache-hot: no second pass)
            quantize(c, fmt, out=packet, error=c if finite else None)
        if finite:
            residual.copy_(padded[:n])  # the new residual: this rank's rounding, owed at a later sync
        received = torch.empty_like(sent)
        self.all_to_all_(received, sent, group, purpose)  # chunk j of every rank's packet lands on rank j
        mine = padded[:chunk]  # free again: the sum of the m copies of this rank's chunk, accumulated in place
        for i, packet in enumerate(received.split(per_packet)):
            dequantize(packet, chunk, fmt, dtype, out=mine, accumulate=i > 0)
        summed = torch.empty(per_packet, dtype=torch.uint8, device=local.device)
        quantize(mine, fmt, out=summed, error=mine)  # mine: the sum's rounding, owed again by this rank
        lo = group.rank * chunk
        own = residual[lo : min(lo + chunk, n)]
        own.add_(mine[: own.numel()])
        everyone = self.all_gather_into_(torch.empty_like(sent), summed, group, purpose)
        if host is not None:  # blocking: a host read of it later must see the new values
            host.copy_(residual)
        for packet, values in zip(everyone.split(per_packet), padded.split(chunk), strict=True):
            dequantize(packet, chunk, fmt, dtype, out=values)  # straight into the free buffer, then one copy
        local.copy_(padded[:n])
        return m - len(bad_ranks)

    @staticmethod
    def _check_skippable(
        bad_ranks: list[int],
        m: int,
        nonfinite: NonFinitePolicy,
        step: int | None,
        overflowed: Sequence[int] = (),
        wire_dtype: torch.dtype | None = None,
    ) -> None:
        if nonfinite == "raise" or len(bad_ranks) == m:
            where = f" at step {step}" if step is not None else ""
            if overflowed:
                raise NonFiniteReplicaError(
                    f"the update of rank(s) {list(overflowed)} overflows {wire_dtype} on the wire{where} (its delta "
                    f"from the anchor exceeds {torch.finfo(wire_dtype).max:g}); no replica was changed. Use "
                    "comm_dtype='bfloat16' (the float32 range) or 'int8', or sync more often."
                )
            raise NonFiniteReplicaError(
                f"the replica of rank(s) {bad_ranks} holds NaN/Inf{where}; no replica was changed. Lower the "
                "learning rate or clip gradients, or pass nonfinite='skip' to the algorithm to average the "
                "finite replicas only."
            )

    def _scratch(self, name: str, dtype: torch.dtype, numel: int, device: torch.device) -> Tensor:
        """A reusable 1-D buffer (one per name/dtype/device), reallocated only when the size changes."""
        if not self.keep_buffers:
            return torch.empty(numel, dtype=dtype, device=device)
        key = (name, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() != numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf

    @torch.no_grad()
    def broadcast_tensors_(self, tensors: Sequence[Tensor], src: int, group: Group, purpose: str) -> None:
        """Overwrite ``tensors`` with global rank ``src``'s copy (one flat broadcast)."""
        if group.size == 1 or not tensors:
            return
        flat = flatten(tensors)
        self.broadcast_(flat, src, group, purpose)
        unflatten_(flat, tensors)

    # ------------------------------------------------------------------ point to point (async parameter server)
    def send(self, tensor: Tensor, dst: int, group: Group, purpose: str, tag: int = 0) -> None:
        """Blocking send of a contiguous tensor to global rank ``dst``.

        Counts ``numel · element_size`` bytes (what this rank puts on the wire) and the seconds until
        the receiver has taken it. Fails after the group's timeout, or at once if ``dst`` is gone.
        """
        nbytes = float(tensor.numel() * tensor.element_size())
        self._timed(
            purpose, nbytes, lambda: dist.send(tensor, dst=dst, group=group.handle, tag=tag), f"a send to {dst}"
        )

    def recv_(self, tensor: Tensor, src: int | None, group: Group, purpose: str, tag: int = 0) -> int:
        """Blocking receive into ``tensor`` from global rank ``src`` (``None``: from any rank).

        Returns the sender's global rank. Counts 0 bytes (bytes are booked by the sender) and the
        seconds spent waiting, which include the time until the sender sent. Fails after the group's
        timeout: with gloo a timed-out receive also closes the connection, so it is final.
        """
        what = f"a receive from {src}" if src is not None else "a receive"
        return int(self._timed(purpose, 0.0, lambda: dist.recv(tensor, src=src, group=group.handle, tag=tag), what))


class DryCollectives(Collectives):
    """The transport's local work with every network call replaced by the local copy it implies.

    A mean over a group of m ranks here does everything :class:`Collectives` does on this rank
    (flatten, NaN/Inf check, anchor deltas, casts, quantization, error feedback, dequantization,
    write-back) but sends nothing: an allreduce leaves this rank's values as they are (the "sum"
    of one), an all-to-all copies the sent chunks into the received buffer, an all-gather tiles
    this rank's piece m times. The auto-tuner times each wire format's local work on it
    (:func:`lightning_localsgd.tuning.tuner.measure_conversions`) with the real code, on the
    model's own tensors. Nothing is booked in :attr:`counters`. Not for training: with a float
    wire the "mean" it writes back is this rank's values over m (a sum of one); with an integer
    wire, finite values of no meaning (the all-to-all hands back this rank's own chunks).
    """

    def all_reduce_sum_(self, flat: Tensor, group: Group, purpose: str) -> Tensor:
        return flat

    def all_reduce_max_(self, flat: Tensor, group: Group, purpose: str, op: str = "an allreduce (MAX)") -> Tensor:
        return flat

    def all_to_all_(self, out: Tensor, local: Tensor, group: Group, purpose: str) -> Tensor:
        return out.copy_(local)

    def all_gather_into_(
        self, out: Tensor, local: Tensor, group: Group, purpose: str, op: str = "an all-gather"
    ) -> Tensor:
        out.view(group.size, local.numel()).copy_(local.unsqueeze(0).expand(group.size, -1))
        return out

    def broadcast_(self, flat: Tensor, src: int, group: Group, purpose: str) -> Tensor:
        return flat


def _all_gather_flat(out: Tensor, local: Tensor, handle: Any) -> None:
    """Every rank's ``local`` into ``out``, in group order (torch >= 2.14 renamed the call)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=handle)


def new_group(ranks: list[int], rank: int, timeout: Any = None, backend: str | None = None) -> Group:
    """A new process group over ``ranks`` (every process must call this, in the same order).

    ``rank`` is this process's global rank; ``timeout`` (a ``timedelta``) bounds every operation on
    the group, including point-to-point receives; ``backend`` (default: the world's) e.g. ``"gloo"``
    for a group that carries host tensors next to an NCCL world. Release it with :func:`destroy_groups`.
    """
    handle = dist.new_group(ranks, timeout=timeout, backend=backend)
    return Group(handle, list(ranks), ranks.index(rank) if rank in ranks else -1)


def destroy_groups(groups: Sequence[Group]) -> None:
    """Destroy the process groups :func:`new_group` made (this rank's handles; a no-op for the rest).

    Strategies call it at teardown, so that a sweep of fits does not pile up communicators.
    """
    for group in groups:
        if isinstance(group.handle, dist.ProcessGroup) and group.rank >= 0 and dist.is_initialized():
            dist.destroy_process_group(group.handle)
