"""The Trainer strategy's one extension point: a fault-tolerance plugin that turns the job into a replica group.

The interfaces live in :mod:`lightning_localsgd.engine` (Fabric's strategy has the same plug);
:class:`TrainerHost` is what a healing reads and replaces in a Trainer.
:class:`~lightning_localsgd.LocalSGDStrategy` knows only these interfaces; the torchft wing
(:mod:`lightning_localsgd.fault_tolerance`) implements them with
:class:`~lightning_localsgd.TorchFT` and its ``ReplicaGroupSession``. The strategy calls them at
fixed points:

==========================  ===========================================================================
strategy                    plugin / session
==========================  ===========================================================================
``__init__``                :meth:`FaultTolerancePlugin.collectives`: the transport the syncs go through
``setup_environment``       :meth:`FaultTolerancePlugin.check_supported`: refuse what rounds cannot carry
``setup``                   :meth:`FaultTolerancePlugin.start`: a session; its :attr:`~FaultTolerantSession.group`
                            is the world the algorithm syncs over
``on_train_start``          :meth:`FaultTolerantSession.join`: agree with the live groups on the model
``optimizer_step`` (after)  :meth:`FaultTolerantSession.after_step`: adopt a step count a healing gave
``teardown``                :meth:`FaultTolerantSession.shutdown`
==========================  ===========================================================================
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from torch import nn
from torch.optim import Optimizer

# The interfaces lived here before Fabric got fault tolerance: imported by name for old code.
from lightning_localsgd.engine import FaultTolerancePlugin, FaultTolerantSession, ReplicaHost

__all__ = ["FaultTolerancePlugin", "FaultTolerantSession", "ReplicaHost", "TrainerHost"]


class TrainerHost(ReplicaHost):
    """A Trainer's model, optimizers, LR schedulers and step count, for fault tolerance."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    @property
    def module(self) -> nn.Module:
        return self.trainer.lightning_module

    @property
    def step(self) -> int:
        return self.trainer.global_step

    def optimizers(self) -> list[Optimizer]:
        return list(self.trainer.strategy.optimizers)

    def schedulers(self) -> list[Any]:
        return [config.scheduler for config in self.trainer.lr_scheduler_configs]

    def set_step(self, completed: int, ready: int | None = None) -> None:
        """``trainer.global_step`` reads ``completed`` (``ready``: started steps, one more inside a step)."""
        loop = self.trainer.fit_loop.epoch_loop
        if self.trainer.lightning_module.automatic_optimization:
            total = loop.automatic_optimization.optim_progress.optimizer.step.total
        else:
            total = loop.manual_optimization.optim_step_progress.total
        total.completed = int(completed)
        total.ready = int(completed if ready is None else ready)

    def step_schedulers(self, step: int) -> None:
        """The per-step updates Lightning makes after optimizer step ``step`` (``interval="step"`` schedulers)."""
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == "step" and not config.reduce_on_plateau and step % config.frequency == 0:
                self.trainer.lightning_module.lr_scheduler_step(config.scheduler, None)
