"""The written contract between a front end (the Trainer or Fabric strategy) and the algorithms.

Three kinds of objects take part in a local-SGD run, and they only talk through the typed calls
below (no ``hasattr`` probing, no reads of each other's private attributes):

=====================  ==================================================================
object                 role
=====================  ==================================================================
front end              :class:`FrontEnd`: owns the process groups and the transport; calls
                       the algorithm at fixed points (``LocalSGDStrategy`` for the Trainer,
                       ``lightning_localsgd.fabric.LocalSGDStrategy`` for Fabric)
consensus algorithm    :class:`~lightning_localsgd.ConsensusAlgorithm`: keeps the replicas
                       together (exactly one per run)
gradient modifier      :class:`GradientModifier`: rewrites an update's gradients before the
                       optimizer step (at most one per run, e.g. GradAlign)
sync observer          :class:`SyncObserver`: sees every synchronization (monitors)
=====================  ==================================================================

The front end hands each of them a :class:`SyncContext` once, when training starts; everything an
algorithm needs from the engine is in it. The order of one optimizer step is fixed by
:class:`~lightning_localsgd.engine.SyncEngine`::

    closure  = the engine's closure (forward + backward; a no-op under Fabric without a closure)
    closure  = modifier.wrap_closure(closure, position, report)   # innermost: it may re-run the closure
    closure  = algorithm.wrap_closure(closure, step)              # warm-up averaging, proximal terms
    optimizer.step(closure)
    algorithm.after_step(step, report)                             # the sync schedule
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Callback
from torch import Tensor, nn

from lightning_localsgd.transport.collectives import Collectives, Group

__all__ = [
    "FrontEnd",
    "GradientModifier",
    "RoundPosition",
    "StepReport",
    "SyncContext",
    "SyncEvent",
    "SyncObserver",
    "scale_of",
]


@dataclass(frozen=True)
class RoundPosition:
    """Where optimizer step ``step`` falls in the consensus algorithm's schedule.

    ``round_index`` counts rounds of ``sync_every`` local steps from the end of warm-up (0-based);
    ``index_in_round`` is 0 for the first step of a round.
    """

    step: int
    warmup: bool
    round_index: int
    index_in_round: int
    sync_every: int


@dataclass
class StepReport:
    """What happened in one optimizer step, filled in while the closure runs.

    ``loss``: the training loss of the batch that completed the step, as passed to ``backward``
    (``None`` if backward never saw one, or if the algorithm does not read it: reading it costs a
    device-to-host synchronization, so it is filled only for algorithms with ``needs_loss = True``).
    ``gradients_averaged``: the update used gradients averaged over the world (e.g. GradAlign with
    ``sync_every=1``), so replicas that were equal before the step are still equal after it.
    """

    step: int
    loss: float | None = None
    gradients_averaged: bool = False


@dataclass
class SyncEvent:
    """One completed synchronization, as observers see it.

    ``local`` is this rank's flat copy of the synchronized tensors just before the sync and ``mean``
    their average over ``group`` (both in the transport's full precision). ``node`` marks a
    node-local average of hierarchical averaging.
    """

    step: int
    node: bool
    local: Tensor
    mean: Tensor
    group: Group
    comm: Collectives


class SyncObserver(Callback):
    """A callback that sees every synchronization (e.g. :class:`~lightning_localsgd.ReplicaDrift`)."""

    def on_sync(self, event: SyncEvent) -> None:
        """Called on every rank of ``event.group`` right after the mean is known (collectives allowed)."""
        raise NotImplementedError


@dataclass
class SyncContext:
    """What a front end gives the algorithms when training starts.

    Attributes:
        module: this rank's replica (a ``LightningModule`` under the Trainer, any ``nn.Module`` under Fabric).
        comm: the transport; the only way to communicate.
        world: every rank.
        node: the ranks of this node (``world`` on one node).
        background: a group reserved for syncs that overlap local steps (``None`` when nothing overlaps).
        observers: told about every sync.
        everyone: every process of the job (what the auto-tuner agrees over); ``None``: ``world``.
        gradient_scale: ``gradient_scale()`` is the factor the gradients of the step's closure carry
            (fp16 loss scaling's current scale, a tensor on the device: reading it costs no host
            synchronization), or ``None`` when they are unscaled. An algorithm that adds a term to
            the gradients inside the closure (ModifiedLocalGD's λ(w − z)) multiplies it by this, so
            that the scaler's unscaling leaves the term as it is in fp32.
    """

    module: nn.Module
    comm: Collectives
    world: Group
    node: Group
    background: Group | None = None
    observers: Sequence[SyncObserver] = field(default_factory=tuple)
    gradient_scale: Callable[[], Tensor | None] = field(default=lambda: None)
    everyone: Group | None = None

    def notify(self, event: SyncEvent) -> None:
        for observer in self.observers:
            observer.on_sync(event)


def scale_of(scaler: Any) -> Tensor | None:
    """A ``torch.amp.GradScaler``'s current scale as a device tensor (``None``: no scaler, or disabled).

    ``GradScaler.get_scale()`` returns a Python float, a device-to-host synchronization; the
    scaler's own tensor is read instead (``_get_scale_async``, what ``GradScaler.unscale_`` uses),
    and ``get_scale()`` only before the scaler has made it (before its first ``scale()``).
    """
    if scaler is None or not scaler.is_enabled():
        return None
    scale = scaler._get_scale_async()
    return scale if scale is not None else torch.tensor(scaler.get_scale())


class GradientModifier(Callback):
    """A callback that rewrites an update's gradients (it may run the closure more than once).

    The engine calls :meth:`bind` when training starts and :meth:`wrap_closure` before every
    optimizer step; the returned closure is what the consensus algorithm and the optimizer see.
    """

    def bind(self, ctx: SyncContext) -> None:
        """Called once per fit, before the first step."""

    def wrap_closure(
        self, closure: Callable[[], Any], position: RoundPosition, report: StepReport
    ) -> Callable[[], Any]:
        raise NotImplementedError

    def check_front_end(self, front_end: FrontEnd) -> None:
        """Raise, with the fix, if this modifier cannot run under ``front_end`` (called at setup by both)."""


class FrontEnd(ABC):
    """What both local-SGD strategies are: the Trainer's ``LocalSGDStrategy`` and Fabric's.

    Callbacks that need a local-SGD strategy check for this marker (never for a strategy class),
    and algorithms ask it, through ``check_front_end``, the questions that decide whether they can
    run: the same checks then hold under the Trainer and under Fabric.
    """

    @property
    @abstractmethod
    def comm(self) -> Collectives:
        """The transport (its ``counters`` are what this rank sent)."""

    @property
    @abstractmethod
    def algorithm(self) -> Any:
        """The consensus algorithm being driven (``None`` before the Trainer's first fit)."""

    @property
    @abstractmethod
    def loss_scaling(self) -> bool:
        """Whether fp16 loss scaling (a ``GradScaler``) scales the gradients the step's closure produces."""

    @property
    def within_node(self) -> str | None:
        """What a replica is: ``None``, one process; ``"ddp"``, one node (DDP inside, replica groups)."""
        return None
