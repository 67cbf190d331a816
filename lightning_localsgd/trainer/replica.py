"""ReplicaStrategy: the common base of the Trainer strategies that keep one replica per rank.

Both :class:`~lightning_localsgd.LocalSGDStrategy` and :class:`~lightning_localsgd.AsyncLocalSGDStrategy`
train without ``DistributedDataParallel``: each rank steps its own replica and the strategy decides
when replicas meet. What they share lives here, each piece short and calling ``super()``:

* the default process group, created so that torchrun restarts always come up and creation never
  waits without bound (:mod:`lightning_localsgd.transport.process_group`); the world and node groups and the
  transport :class:`~lightning_localsgd.transport.collectives.Collectives`;
* no DDP wrapper: replicas start equal by one broadcast from rank 0, unless each rank has just
  loaded its own replica from a checkpoint;
* exactly one optimizer;
* the checkpoint read once when resuming (:class:`~lightning_localsgd.engine.ResumeState`), with each
  rank's own dataloader position put back (Lightning's file holds rank 0's);
* atomic checkpoint writes (:class:`~lightning_localsgd.checkpoint_io.AtomicCheckpointIO`) unless
  you give another ``CheckpointIO``;
* the background thread of the transport stopped at teardown.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_localsgd._checks import check_seconds
from lightning_localsgd.checkpoint_io import AtomicCheckpointIO
from lightning_localsgd.engine import WaitsForBackgroundSyncs
from lightning_localsgd.resume import RankResume, ResumeState, stale_parts
from lightning_localsgd.transport.collectives import Collectives, Group, destroy_groups, new_group
from lightning_localsgd.transport.process_group import (
    DEFAULT_INIT_TIMEOUT,
    DEFAULT_TIMEOUT,
    init_strategy_process_group,
    serialize_threads,
)
from lightning_localsgd.transport.replicas import broadcast_module_, node_groups

__all__ = ["ReplicaStrategy", "loader_state"]


def loader_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The fit loop's state in a checkpoint dict, where Lightning keeps the dataloader's ``combined_loader``."""
    return checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict")


class ReplicaStrategy(WaitsForBackgroundSyncs, DDPStrategy):
    """A ``DDPStrategy`` without the DDP wrapper: one replica per rank (base of the library's strategies).

    Args:
        comm_dtype: what travels at a sync (see :class:`~lightning_localsgd.transport.collectives.Collectives`).
        bucket_mb: largest single collective in megabytes.
        timeout: how long any collective waits for a peer (default :data:`DEFAULT_TIMEOUT`, 10 minutes).
        init_timeout: how long creating the process group waits for every rank (default 5 minutes),
            then an error naming the rank and the store.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
        process_group_backend, start_method: as in ``DDPStrategy``.
    """

    def __init__(
        self,
        comm_dtype: str | torch.dtype | None = None,
        bucket_mb: float = 256.0,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = DEFAULT_TIMEOUT,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        init_timeout: timedelta = DEFAULT_INIT_TIMEOUT,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO(),
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.init_timeout = check_seconds("init_timeout", init_timeout)
        if timeout is not None:
            check_seconds("timeout", timeout)
        self._comm = Collectives(comm_dtype=comm_dtype, bucket_mb=bucket_mb)
        self._world_group = Group(None, [0], 0)
        self._node_group = Group(None, [0], 0)
        self._groups: list[Group] = []  # the process groups this strategy made (destroyed at teardown)
        self._resume_state: ResumeState | None = None  # the checkpoint being resumed, read once
        self._rank_resume: RankResume | None = None  # this rank's part of it, until the optimizer is loaded

    @property
    def comm(self) -> Collectives:
        """The transport: every collective of this strategy goes through it (its ``counters`` count the bytes)."""
        return self._comm

    @property
    def world_group(self) -> Group:
        """Every rank of this job."""
        return self._world_group

    @property
    def node_group(self) -> Group:
        """The ranks of this node (the world on one node)."""
        return self._node_group

    def fitting(self) -> bool:
        module = self.lightning_module
        return module is not None and module._trainer is not None and module.trainer.state.fn == TrainerFn.FITTING

    # ------------------------------------------------------------------ process groups
    @override
    def setup_distributed(self) -> None:
        self.set_world_ranks()
        init_strategy_process_group(self)
        super().setup_distributed()  # Lightning's own init finds the group and goes on
        world, rank = self.world_size, self.global_rank
        self._world_group = Group(None, list(range(world)), rank)
        self._node_group = node_groups(world, self.num_nodes, rank, self._timeout, created=self._groups)
        self._comm.serialize_threads = serialize_threads()

    # ------------------------------------------------------------------ setup: no DDP wrapper
    @override
    def configure_ddp(self) -> None:
        if self._rank_resume is None or not self._rank_resume.exact:
            assert self.model is not None
            broadcast_module_(self._comm, self.model, self._world_group)

    @override
    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING and len(self.optimizers) != 1:
            raise ValueError(
                f"{type(self).__name__} supports exactly one optimizer, got {len(self.optimizers)}; "
                "combine parameter groups into one optimizer instead"
            )

    # ------------------------------------------------------------------ checkpoints
    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._resume_state = None
        if self.fitting():
            read = lambda path: self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)  # noqa: E731
            self._resume_state = ResumeState.from_checkpoint(checkpoint, checkpoint_path, read)
        resume, loops = self._resume_state, loader_state(checkpoint)
        if resume is not None and resume.has_parts and resume.world_size == self.world_size and loops:
            mine = resume.part(self.global_rank).get("loader")
            if mine is not None:  # this rank's own dataloader position, not rank 0's
                loops["combined_loader"] = mine
        return checkpoint

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        super().remove_checkpoint(filepath)  # the file (rank 0)
        for part in stale_parts(filepath, self.global_rank, keep_step=None):  # and this rank's parts of it
            self.checkpoint_io.remove_checkpoint(part)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        if self._rank_resume is not None:
            checkpoint = {"optimizer_states": self._rank_resume.optimizer_states}
        super().load_optimizer_state_dict(checkpoint)
        self._rank_resume = None  # the last reader

    @override
    def teardown(self) -> None:
        self._comm.close()  # the background thread's syncs end first: they use the groups
        destroy_groups(self._groups)
        self._groups.clear()
        super().teardown()

    def _new_group(self, backend: str | None = None) -> Group:
        """A group over every rank of this job, destroyed at teardown (every rank calls this alike)."""
        group = new_group(list(range(self.world_size)), self.global_rank, self._timeout, backend=backend)
        self._groups.append(group)
        return group
