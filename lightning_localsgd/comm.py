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

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_localsgd.params import all_finite, flatten, flatten_into, unflatten_

NonFinitePolicy = Literal["raise", "skip"]


class NonFiniteReplicaError(FloatingPointError):
    """A replica held NaN or Inf when it was about to be synchronized."""


@dataclass
class CommCounters:
    """Cumulative communication of this rank, split by purpose (``"sync"``, ``"grad"``, ...)."""

    bytes_by_kind: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    seconds_by_kind: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls_by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def bytes_sent(self) -> float:
        return float(sum(self.bytes_by_kind.values()))

    @property
    def seconds(self) -> float:
        return float(sum(self.seconds_by_kind.values()))

    @property
    def calls(self) -> int:
        return int(sum(self.calls_by_kind.values()))

    def add(self, kind: str, nbytes: float, seconds: float) -> None:
        self.bytes_by_kind[kind] += nbytes
        self.seconds_by_kind[kind] += seconds
        self.calls_by_kind[kind] += 1


@dataclass
class Group:
    """A process group with the facts collectives need: its handle, size and this rank's place."""

    handle: Any  # a torch ProcessGroup, or None for the default (world) group
    ranks: list[int]  # global ranks, in group order
    rank: int  # this process's index in ``ranks``

    @property
    def size(self) -> int:
        return len(self.ranks)


class Collectives:
    """Flat, bucketed, counted collectives over :class:`Group` objects.

    Args:
        comm_dtype: dtype on the wire for averaging (``None``: the tensors' own dtype). A lower
            precision requires an ``anchor`` in :meth:`mean_`.
        bucket_mb: largest single collective, in megabytes; bigger buffers go in several calls.
    """

    def __init__(self, comm_dtype: torch.dtype | None = None, bucket_mb: float = 256.0) -> None:
        if comm_dtype is not None and not (isinstance(comm_dtype, torch.dtype) and comm_dtype.is_floating_point):
            raise ValueError(f"comm_dtype must be a floating torch dtype such as torch.bfloat16, got {comm_dtype!r}")
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be positive, got {bucket_mb}")
        self.comm_dtype = comm_dtype
        self.bucket_mb = float(bucket_mb)
        self.counters = CommCounters()
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    # ------------------------------------------------------------------ primitives
    def _timed(self, kind: str, nbytes: float, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        self.counters.add(kind, nbytes, time.perf_counter() - start)
        return out

    def all_reduce_sum_(self, flat: Tensor, group: Group, kind: str) -> Tensor:
        """In-place SUM of a 1-D tensor across ``group``, in buckets of at most ``bucket_mb``."""
        if group.size == 1:
            return flat
        per_bucket = max(1, int(self.bucket_mb * 2**20) // flat.element_size())
        nbytes = 2.0 * (group.size - 1) / group.size * flat.numel() * flat.element_size()

        def run() -> None:
            for chunk in flat.split(per_bucket):
                dist.all_reduce(chunk, op=dist.ReduceOp.SUM, group=group.handle)

        self._timed(kind, nbytes, run)
        return flat

    def broadcast_(self, flat: Tensor, src: int, group: Group, kind: str) -> Tensor:
        """In-place broadcast of a 1-D tensor from global rank ``src`` to ``group``."""
        if group.size == 1:
            return flat
        nbytes = (group.size - 1) / group.size * flat.numel() * flat.element_size()
        self._timed(kind, nbytes, lambda: dist.broadcast(flat, src=src, group=group.handle))
        return flat

    def all_gather(self, local: Tensor, group: Group, kind: str) -> Tensor:
        """Stack every rank's 1-D ``local`` into a ``(group.size, numel)`` tensor (group order)."""
        if group.size == 1:
            return local.unsqueeze(0).clone()
        out = torch.empty(group.size * local.numel(), dtype=local.dtype, device=local.device)
        nbytes = (group.size - 1) * local.numel() * local.element_size()
        self._timed(kind, nbytes, lambda: dist.all_gather_into_tensor(out, local.reshape(-1), group=group.handle))
        return out.view(group.size, local.numel())

    def gather_object(self, obj: Any, group: Group, kind: str) -> list[Any] | None:
        """Every rank's picklable ``obj`` on the group's first rank (``None`` elsewhere)."""
        if group.size == 1:
            return [obj]
        dst = group.ranks[0]
        out: list[Any] | None = [None] * group.size if group.rank == 0 else None
        self._timed(kind, 0.0, lambda: dist.gather_object(obj, out, dst=dst, group=group.handle))
        return out

    # ------------------------------------------------------------------ averaging
    @torch.no_grad()
    def mean_(
        self,
        tensors: Sequence[Tensor],
        group: Group,
        *,
        kind: str = "sync",
        anchor: Tensor | Sequence[Tensor] | None = None,
        nonfinite: NonFinitePolicy = "raise",
        step: int | None = None,
        observer: Callable[[Tensor, Tensor], None] | None = None,
    ) -> None:
        """Replace every tensor by its mean over ``group``, with one allreduce (per bucket).

        Args:
            tensors: this rank's tensors; overwritten with the mean.
            group: who averages.
            kind: the counter the bytes are booked under.
            anchor: a copy of the tensors (a list, or one flat tensor) that is identical on every rank
                (the last consensus). Without an anchor the tensors travel in their own dtype.
                When given and ``comm_dtype`` is set, ``tensors − anchor`` travels in ``comm_dtype``
                and the mean is ``anchor + mean(tensors − anchor)``, computed in full precision.
            nonfinite: ``"raise"`` a :class:`NonFiniteReplicaError` naming the offending ranks, or
                ``"skip"`` them (average the finite replicas only; every rank gets that average).
            step: the optimizer step, for the error message.
            observer: called as ``observer(local_flat, mean_flat)`` before the mean is written back
                (used by :class:`~lightning_localsgd.ReplicaDrift`).
        """
        if group.size == 1 or not tensors:
            return
        n, m = sum(t.numel() for t in tensors), group.size
        dtype, device = tensors[0].dtype, tensors[0].device
        # Reduced precision only for deltas from an anchor; raw values (e.g. gradients) travel as they are.
        wire = self.comm_dtype if (self.comm_dtype is not None and anchor is not None) else dtype
        # Persistent work buffers: a model-sized allocation per sync would page-fault every time.
        buf = self._scratch("wire", wire, n + m, device)
        local = buf[:n] if wire == dtype else self._scratch("local", dtype, n, device)
        flatten_into(tensors, local)
        finite = bool(torch.isfinite(local.sum())) or all_finite(tensors)  # a finite sum means all finite
        local_copy = local.clone() if observer is not None else None
        base = None
        if anchor is not None:
            base = anchor if isinstance(anchor, Tensor) else flatten(anchor)
            local.sub_(base)  # the delta from the shared anchor travels
        if wire != dtype:
            buf[:n].copy_(local)
        buf[n:].zero_()
        buf[n + group.rank] = 0.0 if finite else 1.0
        self.all_reduce_sum_(buf, group, kind)
        bad_ranks = [group.ranks[i] for i in range(m) if float(buf[n + i]) != 0.0]
        divisor = m
        if bad_ranks:
            where = f" at step {step}" if step is not None else ""
            if nonfinite == "raise" or len(bad_ranks) == m:
                raise NonFiniteReplicaError(
                    f"the replica of rank(s) {bad_ranks} holds NaN/Inf{where}; no replica was changed. Lower the "
                    "learning rate or clip gradients, or pass nonfinite='skip' to the algorithm to average the "
                    "finite replicas only."
                )
            # Repeat without the bad replicas: they contribute zeros and the divisor shrinks.
            retry = buf[:n]
            if finite:
                flatten_into(tensors, local)
                if base is not None:
                    local.sub_(base)
                retry.copy_(local)
            else:
                retry.zero_()
            self.all_reduce_sum_(retry, group, kind)
            divisor = m - len(bad_ranks)
        if wire != dtype:
            local.copy_(buf[:n])
        local.div_(divisor)
        if base is not None:
            local.add_(base)
        if observer is not None:
            observer(local_copy, local)
        unflatten_(local, tensors)

    def _scratch(self, name: str, dtype: torch.dtype, numel: int, device: torch.device) -> Tensor:
        """A reusable 1-D buffer (one per name/dtype/device), reallocated only when the size changes."""
        key = (name, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() != numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf

    @torch.no_grad()
    def broadcast_tensors_(self, tensors: Sequence[Tensor], src: int, group: Group, kind: str) -> None:
        """Overwrite ``tensors`` with global rank ``src``'s copy (one flat broadcast)."""
        if group.size == 1 or not tensors:
            return
        flat = flatten(tensors)
        self.broadcast_(flat, src, group, kind)
        unflatten_(flat, tensors)

    # ------------------------------------------------------------------ point to point (async parameter server)
    def send(self, tensor: Tensor, dst: int, group: Group, kind: str, tag: int = 0) -> None:
        """Blocking send of a contiguous tensor to global rank ``dst``.

        Counts ``numel · element_size`` bytes (what this rank puts on the wire) and the seconds until
        the receiver has taken it. Fails after the group's timeout, or at once if ``dst`` is gone.
        """
        nbytes = float(tensor.numel() * tensor.element_size())
        self._timed(kind, nbytes, lambda: dist.send(tensor, dst=dst, group=group.handle, tag=tag))

    def recv_(self, tensor: Tensor, src: int | None, group: Group, kind: str, tag: int = 0) -> int:
        """Blocking receive into ``tensor`` from global rank ``src`` (``None``: from any rank).

        Returns the sender's global rank. Counts 0 bytes (bytes are booked by the sender) and the
        seconds spent waiting, which include the time until the sender sent. Fails after the group's
        timeout: with gloo a timed-out receive also closes the connection, so it is final.
        """
        return int(self._timed(kind, 0.0, lambda: dist.recv(tensor, src=src, group=group.handle, tag=tag)))


def new_group(ranks: list[int], rank: int, timeout: Any = None) -> Group:
    """A new process group over ``ranks`` (every process must call this, in the same order).

    ``rank`` is this process's global rank; ``timeout`` (a ``timedelta``) bounds every operation on
    the group, including point-to-point receives.
    """
    handle = dist.new_group(ranks, timeout=timeout)
    return Group(handle, list(ranks), ranks.index(rank) if rank in ranks else -1)
