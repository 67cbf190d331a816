"""The Trainer strategy's one extension point: a fault-tolerance plugin that turns the job into a replica group.

:class:`~lightning_localsgd.LocalSGDStrategy` knows only these two interfaces; the torchft wing
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

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Trainer

from lightning_localsgd.engine import SyncEngine
from lightning_localsgd.transport.collectives import Collectives, Group

__all__ = ["FaultTolerancePlugin", "FaultTolerantSession"]


class FaultTolerantSession(ABC):
    """One fit of this job as a replica group of a larger job whose groups may die and come back."""

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
    """How a job joins a fault-tolerant job (``LocalSGDStrategy(fault_tolerance=...)``)."""

    @abstractmethod
    def collectives(self, comm_dtype: str | torch.dtype | None, bucket_mb: float) -> Collectives:
        """The transport every sync goes through."""

    @abstractmethod
    def check_supported(self, engine: SyncEngine, comm: Collectives, processes: int = 1) -> None:
        """Raise, with the fix, for what the plugin cannot carry (an algorithm, a modifier, a transport;
        ``processes``: this job's)."""

    @abstractmethod
    def start(
        self, trainer: Trainer, engine: SyncEngine, job: Group, comm: Collectives, broadcast: Callable[[Any], Any]
    ) -> FaultTolerantSession:
        """A session for this fit (``job``: this job's own ranks; ``broadcast``: from job rank 0)."""
