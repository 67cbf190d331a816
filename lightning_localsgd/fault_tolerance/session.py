"""ReplicaGroupSession: one Lightning job as a replica group of a torchft job (the Lightning glue).

A *round* is what every group of a quorum does together, in this order:

============  ======================================================================================
open          ``Manager.start_quorum`` (blocking): the Lighthouse names the live groups; torchft
              rebuilds its process group if they changed; a group behind the others heals (its
              state is replaced by a live peer's, :mod:`lightning_localsgd.fault_tolerance.state`)
agree         :meth:`ReplicaGroupSession.agree`: four float64 numbers summed over the quorum give
              the number of contributors and check the step (and are the round's barrier)
average       sync rounds only: :class:`~lightning_localsgd.fault_tolerance.collectives.QuorumCollectives`
              sums over the quorum with ``Manager.allreduce`` (a healed group contributes zeros)
close         ``Manager.should_commit``: True → the mean is written and the step counted;
              False (a peer died in the round) → the same round again, replicas untouched
============  ======================================================================================

When training starts every group runs a *join* round (:meth:`ReplicaGroupSession.join`). At the
first start all groups are at torchft step 0: one of them is the source and the others heal from
it (torchft's ``init_sync``), so every group starts from the same model. A group that comes back
later heals from a peer that is in a sync round at step ``S``: it takes part in that sync
(contributing nothing, receiving the mean and making the same DiLoCo outer step), then continues
from ``S`` with the peers' step count, inner optimizer and schedulers.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.engine import FaultTolerantSession, ReplicaHost
from lightning_localsgd.fault_tolerance.binding import (
    WILDCARDS,
    bound_store,
    check_reachable,
    manager_bound_to,
    resolve_bind,
)
from lightning_localsgd.fault_tolerance.collectives import QuorumCollectives, QuorumGroup, _QuorumHandle
from lightning_localsgd.fault_tolerance.config import FaultToleranceError, TorchFT, require_torchft
from lightning_localsgd.fault_tolerance.state import capture_peer_state, equalize_job_, restore_peer_state_
from lightning_localsgd.transport.collectives import Group, NonFiniteReplicaError

__all__ = ["STATE_KEY", "ReplicaGroupSession", "RoundRecord"]

log = logging.getLogger(__name__)
STATE_KEY = "lightning_localsgd"


@dataclass
class RoundRecord:
    """One attempt of a round, as this group saw it (``ReplicaGroupSession.history``)."""

    kind: str  # "join" or "sync"
    step: int  # the optimizer step of the round (after healing: the peers')
    participants: int  # replica groups in the quorum
    contributors: int  # processes whose replicas went into the mean (0 for a join round)
    healed: bool  # this group received a peer's state in this attempt
    source: str  # the replica_id of the peer it came from ("" when not healed)
    committed: bool
    quorum_seconds: float  # waiting for the quorum
    seconds: float  # the whole attempt
    wall_time: float  # time.time() at the end


class ReplicaGroupSession(FaultTolerantSession):
    """The torchft ``Manager`` of this process and the rounds it runs for the consensus algorithm.

    Args:
        config: the :class:`~lightning_localsgd.TorchFT` settings.
        host: the front end (Trainer or Fabric): its module, optimizers, schedulers and step count
            are what a healing peer receives and what healing replaces.
        algorithm: the bound consensus algorithm (PeriodicAveraging or DiLoCo).
        job: this job's own ranks (the fixed world of the Lightning job).
        comm: the transport (a :class:`QuorumCollectives`).
        broadcast: ``broadcast(obj) -> obj`` from job rank 0 (the strategy's ``broadcast``).

    Job rank 0 serves a TCPStore of its own on a free port for torchft, bound to ``config.bind``
    and advertised at ``config.hostname`` (where torchft advertises the manager too; see
    :mod:`lightning_localsgd.fault_tolerance.binding` for the defaults and the trust model): the
    job's ranks find their manager there, and when this group is the quorum's primary the groups'
    process group meets there. A fresh store per start means a restarted group never reads the
    keys of its previous life (the stale-key problem of torchrun's agent store, see
    ``process_group.py``), and the groups need not reach each other's ``MASTER_ADDR``.
    """

    def __init__(
        self,
        config: TorchFT,
        host: ReplicaHost,
        algorithm: ConsensusAlgorithm,
        job: Group,
        comm: QuorumCollectives,
        broadcast: Callable[[Any], Any],
        one_replica: bool = False,
    ) -> None:
        manager_module = require_torchft()
        from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

        self.config, self.host, self.algorithm, self.job, self.comm = config, host, algorithm, job, comm
        # within_node="ddp": the job's ranks hold one replica (DDP inside); rank j syncs slice j of it
        self.one_replica = bool(one_replica) and job.size > 1
        self.replica_id: str = config.resolved("replica_id")
        self.timeout = config.resolved("timeout")
        self.quorum_timeout = config.resolved("quorum_timeout")
        self.max_attempts = config.max_retries + 1
        pg_class = ProcessGroupGloo if config.backend == "gloo" else ProcessGroupNCCL
        self.bind, hostname = self.addresses(config)
        self._store = None
        port = 0
        if job.rank == 0:
            self._store, port = bound_store(self.bind, hostname, self.timeout)
        host, port = broadcast(None if self._store is None else (hostname, port))
        try:
            with manager_bound_to(manager_module, self.bind):
                self.manager = self._manager(manager_module, config, pg_class, host, int(port), hostname)
        except RuntimeError as err:  # torchft's "failed to connect to <lighthouse> within timeout"
            raise FaultToleranceError(
                f"replica group {self.replica_id!r} could not start its torchft manager: {err}. Start the Lighthouse "
                f"first (torchft_lighthouse --min_replicas {config.min_replicas}) at lighthouse_addr="
                f"{config.resolved('lighthouse_addr')!r}, or raise connect_timeout"
            ) from err
        self.manager.register_state_dict_fn(STATE_KEY, self._restore, self._capture)
        self._group = QuorumGroup(_QuorumHandle(), list(job.ranks), job.rank, session=self)
        self.history: list[RoundRecord] = []
        self.contributes = True  # False from healing until the round commits
        self.round_step, self.round_kind = 0, "join"
        self._open = False
        self._healed = False  # in the current attempt
        self._adopted: tuple[int, str] | None = None  # (step, kind) of the last peer state received
        self._started = self._quorum_seconds = 0.0
        self._closed = False
        self._source = ""

    @property
    @override
    def group(self) -> QuorumGroup:
        """The quorum of live replica groups: what the algorithm syncs over."""
        return self._group

    @staticmethod
    def addresses(config: TorchFT) -> tuple[str, str]:
        """(the address this group listens on, the one peers are told to connect to); see :mod:`.binding`.

        Refuses a loopback-only address while the Lighthouse is on another machine.
        """
        explicit = config.bind is not None and config.bind.strip("[] ") not in WILDCARDS
        hostname = config.hostname or (config.bind.strip("[] ") if explicit else socket.gethostname())  # type: ignore[union-attr]
        bind = resolve_bind(config.bind, hostname)
        check_reachable(bind, config.resolved("lighthouse_addr"), f"replica group {config.resolved('replica_id')!r}")
        return bind, hostname

    def _manager(self, module: Any, config: TorchFT, pg_class: Any, host: str, port: int, hostname: str) -> Any:
        """torchft's Manager of this process (a synchronous quorum: heal on the training thread, before the average)."""
        pg = pg_class(timeout=self.timeout)
        transport = None  # torchft's default: HTTPTransport
        if config.heal_transport == "pg":
            from torchft.checkpointing.pg_transport import PGTransport

            device = torch.device("cpu")
            if config.backend == "nccl":
                device = next(iter(self.host.module.parameters())).device
            transport = PGTransport(pg, timeout=self.timeout, device=device)
        return module.Manager(
            pg=pg,
            checkpoint_transport=transport,
            load_state_dict=None,
            state_dict=None,
            min_replica_size=config.min_replicas,
            use_async_quorum=False,
            timeout=self.timeout,
            quorum_timeout=self.quorum_timeout,
            connect_timeout=config.resolved("connect_timeout"),
            rank=self.job.rank,
            world_size=self.job.size,
            store_addr=host,
            store_port=port,
            lighthouse_addr=config.resolved("lighthouse_addr"),
            replica_id=self.replica_id,
            hostname=hostname,
            heartbeat_interval=config.resolved("heartbeat_interval"),
            init_sync=True,
        )

    # ------------------------------------------------------------------ rounds
    def open_round(self, step: int, kind: str, redo: bool = False) -> None:
        """Get a quorum for the round at ``step`` (no-op if this attempt's quorum is already held).

        ``redo``: the survivors of a round that failed in flight do it again (an overlapped sync):
        torchft's ``shrink_only`` quorum of the groups of the previous one, without healing (a group
        that waits to join does so at the next round, whose state it can take).
        """
        if self._open:
            return
        self.round_step, self.round_kind = step, kind
        self._started, self._healed = time.perf_counter(), False
        try:
            if redo:
                self.manager.start_quorum(timeout=self.quorum_timeout, allow_heal=False, shrink_only=True)
            else:
                self.manager.start_quorum(timeout=self.quorum_timeout)
        except Exception as err:  # the Lighthouse's timeout or an unreachable Lighthouse
            # (not retried: torchft's manager keeps a failed quorum's error and raises it at every later
            # start_quorum, so a Lighthouse restarted on its address is not found again; the fault matrix
            # in docs/results/fault_tolerance.md measures it)
            raise FaultToleranceError(
                f"replica group {self.replica_id!r} got no quorum for its {kind} round at step {step} within "
                f"{self.quorum_timeout}: {err}. Check that the Lighthouse at {self.config.resolved('lighthouse_addr')} "
                f"runs and that min_replicas={self.config.min_replicas} groups are alive; a returning group waits for "
                "the others' next sync, so quorum_timeout must exceed sync_every steps. If the Lighthouse died, "
                "restart it and every group (from their checkpoints: they keep torchft's step)."
            ) from err
        self._quorum_seconds = time.perf_counter() - self._started
        self._open = True

    @property
    def is_open(self) -> bool:
        """Whether this attempt's quorum is held (a round is open)."""
        return self._open

    @property
    def healed_now(self) -> bool:
        """Whether this group received a peer's state in the current attempt."""
        return self._healed

    def fell_behind(self) -> FaultToleranceError:
        return FaultToleranceError(
            f"replica group {self.replica_id!r} fell behind the others while training with overlap_steps/fragments "
            f"(it missed the commit of a round they made) and would merge a sync it did not start: restart this "
            "group; it rejoins at the others' next sync"
        )

    def sum_(self, flat: Tensor, purpose: str) -> bool:
        """SUM ``flat`` in place over this job, then over the quorum; False if the attempt failed."""
        return self.start_sum_(flat, purpose)()

    def start_sum_(self, flat: Tensor, purpose: str) -> Callable[[], bool]:
        """Start the SUM of ``flat``: over this job now, then over the quorum in torchft's background.

        Returns ``finish()``: waits for the SUM; False if it failed (this attempt will not commit).
        """
        if self.job.size > 1 and not self.one_replica:
            self.comm.all_reduce_sum_(flat, self.job, purpose)  # the job's fixed group: its ranks live and die together
        per_bucket = max(1, int(self.comm.bucket_mb * 2**20) // flat.element_size())
        from torch.distributed import ReduceOp

        participants = self.manager.num_participants()
        works = [self.manager.allreduce(chunk, reduce_op=ReduceOp.SUM) for chunk in flat.split(per_bucket)]

        def finish() -> bool:
            def run() -> bool:
                ok = all([work.wait() for work in works])  # noqa: C419 - a list: wait for every bucket, even after a failure
                return ok and self.manager.errored() is None

            return self.comm.timed_sum_(flat, purpose, participants, run)

        return finish

    def agree(
        self, contributes: bool, finite: bool = True, nonfinite: str = "raise", device: torch.device | None = None
    ) -> int | None:
        """The round's first collective: how many replicas contribute, and is everyone at the same step?

        Sums ``(c, [not finite], c·s, c·s²)`` over the quorum in float64 (``c`` = this process
        contributes, ``s`` = the round's step). Returns the number of contributors, or ``None`` if the
        attempt failed. Every process reads the same sums, so all raise the same error (or none).
        ``device``: where the four numbers live (the model's device: NCCL needs them there).
        It is also the round's barrier: a peer commits only after every healing group has fetched
        its state (torchft stops serving the state at ``should_commit``).
        """
        s = float(self.round_step)
        c = float(contributes)
        if device is None:
            device = next(iter(self.host.module.parameters())).device
        meta = torch.tensor([c, float(not finite), c * s, c * s * s], dtype=torch.float64, device=device)
        if not self.sum_(meta, "sync"):
            return None
        count, bad = int(meta[0]), float(meta[1])
        if bad and (nonfinite == "raise" or count == 0):
            raise NonFiniteReplicaError(
                f"{bad:.0f} replica(s) of the quorum hold NaN/Inf at step {s:.0f}; no replica was changed. Lower "
                "the learning rate or clip gradients, or pass nonfinite='skip' to the algorithm to average the rest."
            )
        if count == 0:
            raise FaultToleranceError(
                f"replica group {self.replica_id!r}: no replica of the quorum contributes to the round at step "
                f"{s:.0f}: "
                "every group in it has just healed from a peer that died since. Restart the groups."
            )
        mean_step = float(meta[2]) / count
        if abs(mean_step - s) > 0.5 or abs(float(meta[3]) / count - s * s) > 0.5:
            raise FaultToleranceError(
                f"replica group {self.replica_id!r} is at step {s:.0f} but the quorum's replicas average step "
                f"{mean_step:.2f}: every group must run the same algorithm, sync_every and max_steps"
            )
        return count

    def close_round(self, contributors: int) -> bool:
        """``should_commit``: True if every process of this group finished the attempt without error."""
        try:
            committed = self.manager.should_commit(timeout=self.timeout)
        except Exception as err:
            raise FaultToleranceError(f"replica group {self.replica_id!r}: should_commit failed: {err}") from err
        finally:
            self._open = False
        record = RoundRecord(
            self.round_kind,
            self.round_step,
            self.manager.num_participants(),
            contributors,
            self._healed,
            self._source if self._healed else "",
            committed,
            self._quorum_seconds,
            time.perf_counter() - self._started,
            time.time(),
        )
        self.history.append(record)
        if not committed:
            log.warning(
                "replica group %r: %s round at step %d failed (%s); repeating it",
                self.replica_id,
                self.round_kind,
                self.round_step,
                self.manager.errored(),
            )
        else:
            self.contributes = True
        return committed

    # ------------------------------------------------------------------ joining and healing
    @override
    def join(self) -> None:
        """The first round of this fit: agree with the live groups on the model, then train from their step."""
        for attempt in range(1, self.max_attempts + 1):  # noqa: B007 (the else clause reports it)
            self.open_round(self.host.step, "join")
            if self._adopted is not None and self._adopted[1] == "sync":
                # The peers are in the sync of step S: take part in it like them, contributing nothing (with
                # fragments: the fragment due at S; with overlap: its flight starts here and merges τ steps on).
                self.algorithm.syncs_due_(self._adopted[0])
                break
            count = self.agree(self.contributes)  # the barrier: healing peers fetch before anyone commits
            if self.close_round(contributors=count or 0):
                break
        else:
            raise self.gave_up(attempt)
        kind = self.round_kind
        if self._adopted is not None:
            step, kind = self._adopted
            self._adopted = None
            self.host.set_step(step)
            if kind == "sync":
                self.host.step_schedulers(step)
        if kind == "join":
            equalize_job_(self.host, self.algorithm, self.comm, self.job)

    @override
    def after_step(self) -> None:
        """Inside an optimizer step, after its sync: adopt the step count a healing gave this group."""
        if self._adopted is None:
            return
        step, kind = self._adopted
        self._adopted = None
        self.host.set_step(step - 1, ready=step)  # the front end counts this step as completed next
        if kind == "sync" and self.algorithm.fragments == 1:
            self.algorithm.mark_equal(step)  # (healing inside an overlapped sync is refused: fell_behind)

    def _capture(self) -> dict[str, Any]:
        return {
            "source": self.replica_id,
            **capture_peer_state(self.host, self.algorithm, self.round_step, self.round_kind),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        restore_peer_state_(self.host, self.algorithm, state)
        self.round_step, self.round_kind = int(state["step"]), str(state["kind"])
        self._adopted = (self.round_step, self.round_kind)
        self._healed, self.contributes, self._source = True, False, str(state["source"])
        log.info(
            "replica group %r healed from a peer at step %d (%s)", self.replica_id, self.round_step, self.round_kind
        )

    # ------------------------------------------------------------------ durable state
    @override
    def state_dict(self) -> dict[str, Any]:
        """torchft's step and commit count of this group (checkpoints keep them: see :meth:`load_state_dict`)."""
        return {"replica_id": self.replica_id, "manager": dict(self.manager.state_dict())}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume torchft's step from a checkpoint, before the join round.

        torchft heals a group whose step is behind the quorum's highest. A group that starts with
        step 0 is always behind (or, when every group does, all but one heal from that one): a
        whole-job restart from checkpoints would collapse every group onto one group's state, its
        inner optimizer and data position included. With the step restored, groups restarted from
        checkpoints of the same sync are level: nobody heals, each keeps its own state. A group
        restarted from an older checkpoint than the others' is behind and heals from them, as a
        returning group does.
        """
        manager = state.get("manager")
        if manager is None:
            return
        if str(state.get("replica_id")) != self.replica_id:
            log.warning(
                "replica group %r resumes a checkpoint written by group %r: each group should resume its own",
                self.replica_id,
                state.get("replica_id"),
            )
        step, committed = int(manager["step"]), int(manager["batches_committed"])
        self.manager.load_state_dict({"step": step, "batches_committed": committed})
        log.info("replica group %r resumes at torchft step %d", self.replica_id, step)

    # ------------------------------------------------------------------ reporting and errors
    def records(self) -> list[dict[str, Any]]:
        """Every attempt of every round so far, as dicts (for JSON)."""
        return [asdict(r) for r in self.history]

    def gave_up(self, attempts: int) -> FaultToleranceError:
        return FaultToleranceError(
            f"replica group {self.replica_id!r}: the {self.round_kind} round at step {self.round_step} failed "
            f"{attempts} time(s) (last error: {self.manager.errored()}). Peers keep failing inside rounds or the "
            "network between groups is broken; raise TorchFT(max_retries=...) if failures are expected this often."
        )

    @override
    def shutdown(self) -> None:
        """Stop the manager's server, heartbeat and checkpoint server (the Lighthouse drops this group)."""
        if not self._closed:
            self._closed = True
            self.manager.shutdown(wait=False)
