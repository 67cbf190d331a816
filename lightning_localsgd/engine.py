"""SyncEngine: the part of local SGD that does not depend on the Trainer, driven by both front ends.

:class:`~lightning_localsgd.LocalSGDStrategy` (Trainer) and
:class:`lightning_localsgd.fabric.LocalSGDStrategy` (Fabric) each own one engine and call it at the
same points; everything between those calls is the algorithms' (see
:mod:`lightning_localsgd.contract`). Resuming goes through :mod:`lightning_localsgd.resume`.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.contract import FrontEnd, GradientModifier, StepReport, SyncContext, SyncObserver

# RankResume/ResumeState lived here before 0.2: imported by name for old code (`from ...engine import ResumeState`).
from lightning_localsgd.resume import CHECKPOINT_KEY, RankResume, ResumeState, average_optimizer_states  # noqa: F401
from lightning_localsgd.transport.collectives import Collectives, Group
from lightning_localsgd.transport.tensors import any_nonfinite
from lightning_localsgd.tuning.tuner import AutoTuner

__all__ = [
    "FaultTolerancePlugin",
    "FaultTolerantSession",
    "ReplicaHost",
    "SyncEngine",
    "WaitsForBackgroundSyncs",
    "reset_nonfinite_state",
]


class SyncEngine:
    """One consensus algorithm, at most one gradient modifier and the sync observers of one process.

    Args:
        algorithm: the consensus algorithm.
        modifier: a gradient modifier (e.g. GradAlign) or ``None``.
        observers: told about every sync (e.g. ReplicaDrift).
        tuner: the auto-tuner, for what was left to it (``comm_dtype="auto"``, ``sync_every="auto"``, ...).
    """

    def __init__(
        self,
        algorithm: ConsensusAlgorithm,
        modifier: GradientModifier | None = None,
        observers: Sequence[SyncObserver] = (),
        tuner: AutoTuner | None = None,
    ) -> None:
        self.algorithm = algorithm
        self.modifier = modifier
        self.observers = tuple(observers)
        self.tuner = tuner if tuner is not None else AutoTuner()
        self.last_loss: Tensor | None = None  # what backward saw in the current step

    @staticmethod
    def find(callbacks: Iterable[Any]) -> tuple[list[ConsensusAlgorithm], list[GradientModifier], list[SyncObserver]]:
        """The callbacks that take part, by kind; exactly one algorithm and at most one modifier are allowed."""
        callbacks = list(callbacks)
        algorithms = [cb for cb in callbacks if isinstance(cb, ConsensusAlgorithm)]
        modifiers = [cb for cb in callbacks if isinstance(cb, GradientModifier)]
        observers = [cb for cb in callbacks if isinstance(cb, SyncObserver)]
        if len(algorithms) > 1:
            names = ", ".join(type(cb).__name__ for cb in algorithms)
            raise ValueError(f"exactly one consensus algorithm may be active, got {names}: keep one of them")
        if len(modifiers) > 1:
            names = ", ".join(type(cb).__name__ for cb in modifiers)
            raise ValueError(f"at most one gradient modifier may be active (each re-runs the step), got {names}")
        return algorithms, modifiers, observers

    def check(self, front_end: FrontEnd) -> None:
        """Let the algorithm and the modifier refuse ``front_end`` (both front ends call this at setup)."""
        self.algorithm.check_front_end(front_end)
        if self.modifier is not None:
            self.modifier.check_front_end(front_end)
        self.tuner.check(self.algorithm, self.modifier)

    def bind(self, ctx: SyncContext, step: int, restored: RankResume | None) -> None:
        """Hand the context to everyone; ``restored`` is this rank's slice of a checkpoint (or ``None``)."""
        self.tuner.prepare(ctx, self.algorithm, step)
        self.algorithm.bind(ctx, step, None if restored is None else restored.algorithm)
        if self.modifier is not None:
            self.modifier.bind(ctx)

    def note_loss(self, loss: Tensor) -> None:
        """The loss a backward pass of this step saw (called by the front end's backward hook)."""
        self.last_loss = loss.detach()

    def step(
        self,
        step: int,
        closure: Callable[[], Any],
        run: Callable[[Callable[[], Any]], Any],
        optimizer: Optimizer | None = None,
    ) -> Any:
        """Optimizer step ``step``: wrap ``closure``, ``run(closure)`` (``optimizer``'s step), then the schedule."""
        report = StepReport(step)
        if self.modifier is not None:
            closure = self.modifier.wrap_closure(closure, self.algorithm.position(step), report)
        closure = self.algorithm.wrap_closure(closure, step)
        out = run(closure)
        if self.algorithm.needs_loss and self.last_loss is not None:  # a host read: only for who needs it
            report.loss = float(self.last_loss)
        self.last_loss = None  # the next step's backward sets it again
        syncs = self.algorithm.num_syncs
        self.algorithm.after_step(step, report)
        self.tuner.after_step(step)
        if optimizer is not None and self.algorithm.nonfinite == "skip" and self.algorithm.num_syncs != syncs:
            reset_nonfinite_state(optimizer)
        return out


class WaitsForBackgroundSyncs:
    """Both front ends' strategies: Lightning's own collectives wait for a background sync first on NCCL.

    ``ModelCheckpoint``'s and ``self.log(sync_dist=True)``'s reductions, broadcasts and barriers (the
    Trainer's ``reduce``, Fabric's ``all_reduce``) go through these methods; each first calls the
    transport's :meth:`~lightning_localsgd.transport.collectives.Collectives.before_collective`
    (docs/gpu.md, "Two communicating threads on NCCL"), then the strategy's own. Put it first among
    the bases: ``class S(WaitsForBackgroundSyncs, DDPStrategy)``.
    """

    comm: Collectives  # the strategy's transport

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        self.comm.before_collective()
        super().barrier(*args, **kwargs)  # type: ignore[misc]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        self.comm.before_collective()
        return super().broadcast(obj, src)  # type: ignore[misc]

    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        self.comm.before_collective()
        return super().all_gather(tensor, group, sync_grads)  # type: ignore[misc]

    def reduce(self, *args: Any, **kwargs: Any) -> Any:  # the Trainer's
        self.comm.before_collective()
        return super().reduce(*args, **kwargs)  # type: ignore[misc]

    def all_reduce(self, *args: Any, **kwargs: Any) -> Any:  # Fabric's
        self.comm.before_collective()
        return super().all_reduce(*args, **kwargs)  # type: ignore[misc]


def reset_nonfinite_state(optimizer: Optimizer) -> int:
    """Zero the NaN/Inf entries of the optimizer state of every parameter that is finite; returns how many.

    Under ``nonfinite="skip"`` a replica that went NaN/Inf receives the finite replicas' mean at a
    sync, but its momentum (Adam's moments, ...) still holds NaN/Inf and would make it non-finite
    again at its next step, so that it stayed out of every later sync. Called after each sync.
    """
    reset = 0
    for param, state in optimizer.state.items():
        if bool(any_nonfinite(param)):
            continue  # not synced yet (another fragment): its state is reset when it is
        for value in state.values():
            if isinstance(value, Tensor) and value.is_floating_point() and value.shape == param.shape:
                bad = ~torch.isfinite(value)
                if bool(bad.any()):
                    value.masked_fill_(bad, 0.0)
                    reset += int(bad.sum())
    if reset:
        warnings.warn(
            f"{reset} NaN/Inf values of the optimizer state were reset to 0 after this replica was "
            "skipped at a sync (nonfinite='skip') and received the others' mean",
            stacklevel=2,
        )
    return reset


# ====================================================================== the front ends' fault-tolerance plug
class ReplicaHost(ABC):
    """What fault tolerance reads from and replaces in a front end when a replica group heals.

    The Trainer's (:class:`~lightning_localsgd.trainer.plugins.TrainerHost`) and Fabric's
    (:class:`~lightning_localsgd.fabric.FabricHost`) implement it; the torchft wing knows only this.
    """

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The replica."""

    @property
    @abstractmethod
    def step(self) -> int:
        """Completed optimizer steps."""

    @abstractmethod
    def optimizers(self) -> list[Optimizer]:
        """The inner optimizers (their state travels to a healing group)."""

    @abstractmethod
    def schedulers(self) -> list[Any]:
        """The LR schedulers (``state_dict`` / ``load_state_dict``; their state travels too)."""

    @abstractmethod
    def set_step(self, completed: int, ready: int | None = None) -> None:
        """Make the completed optimizer steps ``completed`` (``ready``: inside a step, what it becomes after it)."""

    @abstractmethod
    def step_schedulers(self, step: int) -> None:
        """The per-step LR scheduler update the front end makes after optimizer step ``step``."""


class FaultTolerantSession(ABC):
    """One run of this job as a replica group of a larger job whose groups may die and come back."""

    @property
    @abstractmethod
    def group(self) -> Group:
        """The group the consensus algorithm syncs over (the live replica groups' quorum)."""

    @abstractmethod
    def join(self) -> None:
        """Training starts: agree with the live groups on the model and the step."""

    @abstractmethod
    def after_step(self) -> None:
        """Inside an optimizer step, after its sync: adopt what a healing changed (e.g. the step count)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Leave the job (the session's records stay readable)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the session, so that a whole-job restart resumes every group where it was."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - nothing to restore by default
        """Before :meth:`join`: the state a checkpoint kept (:meth:`state_dict`)."""


class FaultTolerancePlugin(ABC):
    """How a job joins a fault-tolerant job (``LocalSGDStrategy(fault_tolerance=...)``, Trainer or Fabric)."""

    @abstractmethod
    def collectives(self, comm_dtype: str | torch.dtype | None, bucket_mb: float) -> Collectives:
        """The transport every sync goes through."""

    @abstractmethod
    def check_supported(self, engine: SyncEngine, comm: Collectives, processes: int = 1) -> None:
        """Raise, with the fix, for what the plugin cannot carry (an algorithm, a modifier, a transport;
        ``processes``: this job's)."""

    @abstractmethod
    def start(
        self,
        host: ReplicaHost,
        engine: SyncEngine,
        job: Group,
        comm: Collectives,
        broadcast: Callable[[Any], Any],
        one_replica: bool = False,
    ) -> FaultTolerantSession:
        """A session for this run (``host``: the front end's model, optimizers, schedulers and step;
        ``job``: this job's own ranks; ``broadcast``: from job rank 0; ``one_replica``: the job's ranks
        hold one replica, DDP inside, ``within_node="ddp"``)."""
