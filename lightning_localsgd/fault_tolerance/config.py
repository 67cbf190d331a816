"""Live fault tolerance on torchft: replica groups die and come back while the others keep training.

``LocalSGDStrategy(fault_tolerance=TorchFT(...))`` turns each Lightning job (one process, or one
node's processes) into a *replica group* of a torchft job. The groups find each other through
torchft's Lighthouse; every world synchronization of the consensus algorithm becomes one torchft
*round* on the group's :class:`torchft.Manager`:

1. **quorum** (``Manager.start_quorum``): the Lighthouse says which groups are alive; torchft's
   reconfigurable process group is rebuilt when that set changed. A group whose step count is
   behind (it just started, or it missed a commit) *heals*: torchft's checkpoint transport sends
   it a live peer's state (the consensus model, DiLoCo's anchor and outer optimizer state, the
   inner optimizer, the LR schedulers, the step count) and the group then takes part in the
   round without contributing (:mod:`lightning_localsgd.fault_tolerance.session`);
2. **average** over the quorum (:mod:`lightning_localsgd.fault_tolerance.collectives`): a tiny float64
   allreduce agrees on how many replicas contribute and on the step, then one allreduce of the
   synchronized values (``Manager.allreduce`` with SUM, in buckets);
3. **commit** (``Manager.should_commit``): only then is the mean written into the replica. A
   round that failed (a peer died inside it) is repeated from step 1 with the replica untouched,
   so the survivors lose no local step; a group that cannot get a quorum within
   ``quorum_timeout`` fails with an error instead of hanging.

Evaluation and checkpoints between syncs use this group's own average (no cross-group
collective); see docs/fault_tolerance.md for what is and is not guaranteed.

Example::

    # once per job: python -m torchft.torchft_lighthouse ... or start_lighthouse(min_replicas=2)
    ft = TorchFT(lighthouse_addr="http://head:29510", replica_id=0, min_replicas=2)
    trainer = Trainer(strategy=LocalSGDStrategy(fault_tolerance=ft), callbacks=[DiLoCo(100)], max_steps=10_000)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import torch
from typing_extensions import override

from lightning_localsgd._checks import check_int, check_seconds
from lightning_localsgd.engine import FaultTolerancePlugin, FaultTolerantSession, ReplicaHost, SyncEngine
from lightning_localsgd.fault_tolerance.binding import WILDCARDS, host_port, resolve_bind, split_host_port
from lightning_localsgd.transport.collectives import Collectives, Group

__all__ = [
    "INSTALL_HINT",
    "LIGHTHOUSE_ENV",
    "REPLICA_ID_ENV",
    "FaultToleranceError",
    "Lighthouse",
    "TorchFT",
    "require_torchft",
    "start_lighthouse",
]

INSTALL_HINT = "pip install lightning-localsgd[ft]  (or: pip install torchft)"
LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"
REPLICA_ID_ENV = "REPLICA_GROUP_ID"


class FaultToleranceError(RuntimeError):
    """A round over the replica groups could not complete (no quorum, or too many failed attempts)."""


def require_torchft() -> Any:
    """Import torchft or fail with the command that installs it."""
    try:
        import torchft  # noqa: F401
        from torchft import manager
    except ImportError as err:
        raise ImportError(f"fault_tolerance=TorchFT(...) needs torchft: {INSTALL_HINT}") from err
    return manager


@dataclass(frozen=True)
class TorchFT(FaultTolerancePlugin):
    """How this Lightning job joins a torchft fault-tolerant job as one replica group.

    Argument names follow torchft's ``Manager`` and Lighthouse.

    Args:
        lighthouse_addr: the Lighthouse, e.g. ``"http://head-node:29510"``; default: the
            ``TORCHFT_LIGHTHOUSE`` environment variable (what torchft reads).
        replica_id: this group's id, unique among the groups and the same when the group is
            restarted (e.g. ``0``, ``1``, ``2``); default: ``REPLICA_GROUP_ID``. A trailing number
            orders the groups.
        min_replicas: fewest replica groups a round may commit with (torchft's
            ``min_replica_size``); start the Lighthouse with the same ``--min_replicas``.
        timeout: bound of every collective, ``should_commit`` and checkpoint transfer of a round.
        quorum_timeout: how long a group waits for a quorum. A returning group waits for the
            others' next sync, so this must exceed the time of ``sync_every`` steps.
        connect_timeout: bound of connecting to the Lighthouse and the peers' managers.
        heartbeat_interval: how often the group's manager tells the Lighthouse it is alive.
        max_retries: failed attempts of one round (a peer died inside it) before giving up.
        backend: ``"gloo"`` (CPU, or GPU tensors through host memory) or ``"nccl"``: torchft's
            reconfigurable process group that carries the rounds.
        hostname: the address peers reach this group's manager and store at (default: ``bind``
            when it is an address, else this machine's host name).
        bind: the address this group's manager and store listen on (default: the address
            ``hostname`` resolves to, not every interface; ``"0.0.0.0"`` or ``"::"``: every
            interface). See :mod:`lightning_localsgd.fault_tolerance.binding` for the trust model:
            these ports must be reachable only by the job's machines.
        heal_transport: how a healing group receives a peer's state: ``"pg"`` (torchft's
            ``PGTransport``, over the groups' process group: no extra listener) or ``"http"``
            (torchft's default ``HTTPTransport``: a server on every interface of each group).
    """

    lighthouse_addr: str | None = None
    replica_id: str | int | None = None
    min_replicas: int = 1
    timeout: timedelta | float = timedelta(seconds=60)
    quorum_timeout: timedelta | float = timedelta(minutes=10)
    connect_timeout: timedelta | float = timedelta(seconds=60)
    heartbeat_interval: timedelta | float = timedelta(milliseconds=100)
    max_retries: int = 3
    backend: Literal["gloo", "nccl"] = "gloo"
    hostname: str | None = None
    bind: str | None = None
    heal_transport: Literal["pg", "http"] = "pg"
    _resolved: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        require_torchft()
        lighthouse = self.lighthouse_addr or os.environ.get(LIGHTHOUSE_ENV)
        if not lighthouse:
            raise ValueError(f"TorchFT needs the Lighthouse address: pass lighthouse_addr=... or set {LIGHTHOUSE_ENV}")
        replica_id = self.replica_id if self.replica_id is not None else os.environ.get(REPLICA_ID_ENV)
        if replica_id is None or str(replica_id) == "":
            raise ValueError(f"TorchFT needs this group's replica_id (e.g. replica_id=0) or {REPLICA_ID_ENV} set")
        check_int("min_replicas", self.min_replicas)
        check_int("max_retries", self.max_retries, minimum=0)
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {self.backend!r}")
        if self.heal_transport not in ("pg", "http"):
            raise ValueError(f"heal_transport must be 'pg' or 'http', got {self.heal_transport!r}")
        if self.bind is not None and (not isinstance(self.bind, str) or not self.bind.strip()):
            raise ValueError(f"bind must be an address such as '10.0.0.5' ('0.0.0.0': every one), got {self.bind!r}")
        self._resolved.update(
            lighthouse_addr=lighthouse,
            replica_id=str(replica_id),
            timeout=check_seconds("timeout", self.timeout),
            quorum_timeout=check_seconds("quorum_timeout", self.quorum_timeout),
            connect_timeout=check_seconds("connect_timeout", self.connect_timeout),
            heartbeat_interval=check_seconds("heartbeat_interval", self.heartbeat_interval),
        )

    def resolved(self, name: str) -> Any:
        """An argument after defaults from the environment and conversion to ``timedelta``."""
        return self._resolved[name]

    # ------------------------------------------------------------------ the strategy's plugin interface
    @override
    def collectives(self, comm_dtype: str | torch.dtype | None, bucket_mb: float) -> Collectives:
        from lightning_localsgd.fault_tolerance.collectives import QuorumCollectives

        return QuorumCollectives(comm_dtype=comm_dtype, bucket_mb=bucket_mb)

    @override
    def start(
        self,
        host: ReplicaHost,
        engine: SyncEngine,
        job: Group,
        comm: Collectives,
        broadcast: Callable[[Any], Any],
        one_replica: bool = False,
    ) -> FaultTolerantSession:
        from lightning_localsgd.fault_tolerance.session import ReplicaGroupSession

        return ReplicaGroupSession(self, host, engine.algorithm, job, comm, broadcast, one_replica)

    @override
    def check_supported(self, engine: SyncEngine, comm: Collectives, processes: int = 1) -> None:
        """Refuse, with the reason and the fix, what the rounds over replica groups cannot carry."""
        algorithm = engine.algorithm
        name = type(algorithm).__name__
        if not algorithm.fault_tolerant:
            raise ValueError(
                f"fault_tolerance supports PeriodicAveraging and DiLoCo, got {name}: its state or its syncs "
                "(per-rank state, leaders, pulls) are not carried by torchft rounds; use one of those two"
            )
        gap = algorithm.sync_every // algorithm.fragments  # steps between two fragments' sync starts, at least
        if algorithm.overlap_steps > gap:
            raise ValueError(
                f"fault_tolerance runs one torchft round at a time, so an overlapped sync must merge before the next "
                f"fragment's starts: {name}(overlap_steps={algorithm.overlap_steps}) with sync_every="
                f"{algorithm.sync_every} and fragments={algorithm.fragments} needs overlap_steps <= {gap}"
            )
        if algorithm.warmup_steps:
            raise ValueError(
                f"fault_tolerance does not average gradients every step: drop warmup_steps from {name} "
                "(each step would need a quorum), or warm up in a run without fault_tolerance"
            )
        if algorithm.buffers == "broadcast":
            raise ValueError(
                "fault_tolerance has no fixed rank 0 to broadcast buffers from: use buffers='average' or 'local'"
            )
        if engine.modifier is not None or engine.observers:
            names = [type(cb).__name__ for cb in [engine.modifier, *engine.observers] if cb is not None]
            raise ValueError(
                f"{', '.join(names)} communicate over the fixed world: remove them when using fault_tolerance"
            )
        if comm.quantized and comm.comm_dtype == "int4" and self.min_replicas * processes > 13:
            raise ValueError(
                "comm_dtype='int4' under fault_tolerance sums every contributing process's integers in 4 bits: at "
                f"most 13 fit, and min_replicas={self.min_replicas} groups of {processes} process(es) make "
                f"{self.min_replicas * processes}; use comm_dtype='int8' (docs/fault_tolerance.md)"
            )


def start_lighthouse(
    min_replicas: int = 1,
    bind: str | None = None,
    join_timeout_ms: int = 60_000,
    quorum_tick_ms: int = 100,
    heartbeat_timeout_ms: int = 5_000,
) -> Lighthouse:
    """Start torchft's Lighthouse in this process (same as the ``torchft_lighthouse`` command).

    Args:
        bind: ``"host"`` or ``"host:port"`` to listen on (default: the address ``MASTER_ADDR``
            resolves to, else this machine's host name's, on a free port; ``"[::]:0"``: every
            interface, torchft's default). The Lighthouse hands out the groups' addresses without
            authentication: keep it on the job's private network.

    Returns a :class:`Lighthouse`: its ``address()`` is what every group passes as
    ``lighthouse_addr``; call ``shutdown()`` when the job is over. A group that stops heartbeating
    is dropped from the next quorum after ``heartbeat_timeout_ms``; a quorum that misses a group
    that still heartbeats waits up to ``join_timeout_ms`` for it.
    """
    require_torchft()
    from torchft.coordination import LighthouseServer

    host, port = split_host_port(bind) if bind else (None, 0)
    host = resolve_bind(host, os.environ.get("MASTER_ADDR") or socket.gethostname())
    server = LighthouseServer(
        bind=host_port(host, port),
        min_replicas=min_replicas,
        join_timeout_ms=join_timeout_ms,
        quorum_tick_ms=quorum_tick_ms,
        heartbeat_timeout_ms=heartbeat_timeout_ms,
    )
    return Lighthouse(server, host)


class Lighthouse:
    """A running Lighthouse and the address groups reach it at (the bound address, not the host name).

    torchft's ``LighthouseServer.address()`` advertises this machine's host name, which need not
    resolve to the address the server is bound to; :meth:`address` gives the bound one.
    """

    def __init__(self, server: Any, host: str) -> None:
        self.server, self.host = server, host

    def address(self) -> str:
        """``http://host:port``: what the groups pass as ``lighthouse_addr``."""
        advertised = self.server.address()
        if self.host in WILDCARDS:
            return str(advertised)
        return f"http://{host_port(self.host, int(advertised.rsplit(':', 1)[1]))}"

    def shutdown(self) -> None:
        self.server.shutdown()
