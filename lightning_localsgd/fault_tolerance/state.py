"""What a replica group that heals receives from a live peer, and how it is put in place.

torchft's checkpoint transport moves one picklable dict from a peer that is up to date to a group
that is behind (it just started, or it missed a commit). The dict is captured by the peer at the
quorum of a round, *before* that round's average, and holds:

===============  ================================================================================
``step``         the optimizer step of the peer's round (the step count the group adopts)
``kind``         ``"sync"`` (a sync of the schedule: the healed group takes part in it) or
                 ``"join"`` (the peer's own first round: nothing to average)
``module``       the peer's replica (``state_dict``), for the tensors a sync does not average
``algorithm``    the consensus algorithm's global state: counters, the anchor (DiLoCo's θ),
                 DiLoCo's outer optimizer state
``optimizers``   the inner optimizer's state (momentum, Adam moments, step counters)
``schedulers``   the LR schedulers' state
===============  ================================================================================

Not sent: the integer wire's error-feedback residual (per process). A group that heals sets its own
to zero; see :mod:`lightning_localsgd.fault_tolerance.collectives`.

Everything is loaded **in place**: the anchor keeps its storage (DiLoCo's θ pieces and outer
optimizer parameters are views of it), the outer optimizers keep their parameters.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.engine import ReplicaHost
from lightning_localsgd.transport.collectives import Collectives, Group
from lightning_localsgd.transport.replicas import broadcast_module_

__all__ = ["capture_peer_state", "equalize_job_", "restore_peer_state_"]


def capture_peer_state(host: ReplicaHost, algorithm: ConsensusAlgorithm, step: int, kind: str) -> dict[str, Any]:
    """This group's state for a peer that heals (called on torchft's quorum thread, training blocked)."""
    return {
        "step": int(step),
        "kind": kind,
        "module": host.module.state_dict(),
        "algorithm": algorithm.state_dict(),
        "optimizers": [optimizer.state_dict() for optimizer in host.optimizers()],
        "schedulers": [scheduler.state_dict() for scheduler in host.schedulers()],
    }


@torch.no_grad()
def restore_peer_state_(host: ReplicaHost, algorithm: ConsensusAlgorithm, state: dict[str, Any]) -> None:
    """Put a peer's captured state into this group's module, algorithm, optimizers and schedulers."""
    optimizers, schedulers = host.optimizers(), host.schedulers()
    if len(optimizers) != len(state["optimizers"]) or len(schedulers) != len(state["schedulers"]):
        raise RuntimeError(
            f"the peer has {len(state['optimizers'])} optimizer(s) and {len(state['schedulers'])} LR scheduler(s), "
            f"this group {len(optimizers)} and {len(schedulers)}: every replica group must run the same configuration"
        )
    host.module.load_state_dict(state["module"])
    algorithm.load_shared_state_(state["algorithm"])
    if algorithm.residual is not None:
        # The integer wire's error feedback: what this group still owed was rounding of the replica it just
        # replaced by the peer's; it starts again from zero, as a new group does (the peers keep theirs).
        algorithm.residual.zero_()
    for optimizer, saved in zip(optimizers, state["optimizers"]):
        optimizer.load_state_dict(saved)
    for scheduler, saved in zip(schedulers, state["schedulers"]):
        scheduler.load_state_dict(saved)


def equalize_job_(host: ReplicaHost, algorithm: ConsensusAlgorithm, comm: Collectives, job: Group) -> None:
    """After a join round, every rank of a multi-process group takes its job rank 0's model and global state.

    At the first start torchft heals rank r of each group from group ``r mod m`` of the ``m`` groups
    that are up to date, so the ranks of one group may have received different models; one
    broadcast inside the job makes them the model every group's rank 0 received.
    """
    if job.size == 1:
        return
    broadcast_module_(comm, host.module, job)
    comm.broadcast_tensors_(algorithm.shared_tensors(), src=job.ranks[0], group=job, purpose="setup")
