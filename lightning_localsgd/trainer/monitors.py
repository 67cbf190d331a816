"""Monitoring callbacks: what the synchronization costs and how far the replicas drift."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_localsgd.contract import FrontEnd, SyncEvent, SyncObserver

__all__ = ["CommStats", "ReplicaDrift"]


def _localsgd_strategy(trainer: Trainer, who: str) -> FrontEnd:
    if not isinstance(trainer.strategy, FrontEnd):
        raise TypeError(f"{who} reads the local-SGD strategy's counters: use it with Trainer(strategy='localsgd')")
    return trainer.strategy


class CommStats(Callback):
    """Log this rank's communication through Lightning's logger every training batch.

    Logged (rank 0's values): ``comm/MB_sent`` (cumulative estimated megabytes this rank sent,
    see :mod:`lightning_localsgd.transport.collectives`), ``comm/seconds`` (cumulative wall-clock inside
    collectives, including those running in the background), ``comm/wait_seconds`` (the training
    thread waiting for background syncs), ``comm/syncs`` (synchronizations so far; each fragment's
    counts once).

    Example::

        Trainer(strategy="localsgd", callbacks=[CommStats()], log_every_n_steps=10)
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            _localsgd_strategy(trainer, type(self).__name__)

    def summary(self, trainer: Trainer) -> dict[str, float]:
        """The current totals as a dict (also what gets logged)."""
        strategy = _localsgd_strategy(trainer, type(self).__name__)
        counters = strategy.comm.counters
        algorithm = strategy.algorithm
        return {
            "comm/MB_sent": counters.bytes_sent / 1e6,
            "comm/seconds": counters.seconds,
            "comm/wait_seconds": counters.wait_seconds,
            "comm/syncs": float(algorithm.num_syncs if algorithm is not None else 0),
        }

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        pl_module.log_dict(self.summary(trainer), on_step=True, on_epoch=False, rank_zero_only=True)


class ReplicaDrift(SyncObserver):
    """Log the distance of the replicas from their consensus just before each sync.

    At every sync each rank computes ``d_i = ||x_i − x̄||₂`` over the synchronized tensors (from the
    buffers the sync already holds); one all-gather of one scalar per rank (only when this callback
    is present) gives ``replica_drift/mean`` and ``replica_drift/max`` over ranks, logged on the
    next training batch end. Node-level syncs of hierarchical averaging are logged under
    ``replica_drift/node_mean`` and ``replica_drift/node_max``. With fragments, the distance is
    over the fragment that was synced.
    """

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self._fresh = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            _localsgd_strategy(trainer, type(self).__name__)

    def on_sync(self, event: SyncEvent) -> None:
        square = (event.local - event.mean).double().square().sum().reshape(1)
        shards = event.group.shards
        if shards is not None and shards.size > 1:  # sharded replicas: this rank saw its shard; the replica's sum
            event.comm.mean_([square], shards, purpose="monitor")
            square.mul_(shards.size)
        dist_local = square.sqrt().float()
        all_d = event.comm.all_gather(dist_local, event.group, purpose="monitor").flatten()
        prefix = "replica_drift/node_" if event.node else "replica_drift/"
        self.last[prefix + "mean"] = float(all_d.mean())
        self.last[prefix + "max"] = float(all_d.max())
        self.last["replica_drift/step"] = float(event.step)
        self._fresh = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._fresh:
            values = {k: v for k, v in self.last.items() if math.isfinite(v)}
            pl_module.log_dict(values, on_step=True, on_epoch=False, rank_zero_only=True)
            self._fresh = False
