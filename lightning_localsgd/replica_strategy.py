"""ReplicaStrategy: the common base of the Trainer strategies that keep one replica per rank.

Both :class:`~lightning_localsgd.LocalSGDStrategy` and :class:`~lightning_localsgd.AsyncLocalSGDStrategy`
train without ``DistributedDataParallel``: each rank steps its own replica and the strategy decides
when replicas meet. What they share lives here, each piece short and calling ``super()``:

* the default process group, created so that torchrun restarts always come up and creation never
  waits without bound (:mod:`lightning_localsgd.process_group`); the world and node groups and the
  transport :class:`~lightning_localsgd.comm.Collectives`;
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
from torch import Tensor
from typing_extensions import override

from lightning_localsgd.checkpoint_io import AtomicCheckpointIO
from lightning_localsgd.comm import Collectives, Group, new_group
from lightning_localsgd.engine import RankResume, ResumeState
from lightning_localsgd.process_group import (
    DEFAULT_COLLECTIVE_TIMEOUT,
    DEFAULT_INIT_TIMEOUT,
    init_strategy_process_group,
)

DEFAULT_TIMEOUT = DEFAULT_COLLECTIVE_TIMEOUT
"""How long any collective (and the async server) waits for a peer before failing with an error that
names the rank and the operation: 10 minutes (Lightning's default is 30). Raise it for validations or
checkpoint writes longer than this on one rank while the others wait."""


def loader_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The fit loop's state in a checkpoint dict, where Lightning keeps the dataloader's ``combined_loader``."""
    return checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict")


def node_groups(world_size: int, num_nodes: int, rank: int, timeout: Any) -> Group:
    """This rank's node group (every rank creates every node's group, in the same order)."""
    per_node = world_size // num_nodes
    mine = Group(None, list(range(world_size)), rank)
    if num_nodes == 1:
        return mine
    for n in range(num_nodes):
        ranks = list(range(n * per_node, (n + 1) * per_node))
        group = (
            new_group(ranks, rank, timeout)
            if per_node > 1
            else Group(None, ranks, ranks.index(rank) if rank in ranks else -1)
        )
        if rank in ranks:
            mine = group
    return mine


def broadcast_module_(comm: Collectives, module: torch.nn.Module, world: Group) -> None:
    """Every rank takes rank 0's parameters and buffers (one flat broadcast per dtype)."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        comm.broadcast_tensors_(group, src=0, group=world, kind="setup")


class ReplicaStrategy(DDPStrategy):
    """A ``DDPStrategy`` without the DDP wrapper: one replica per rank (base of the library's strategies).

    Args:
        comm_dtype: what travels at a sync (see :class:`~lightning_localsgd.comm.Collectives`).
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
        self.init_timeout = init_timeout
        self.comm = Collectives(comm_dtype=comm_dtype, bucket_mb=bucket_mb)
        self.world_group = Group(None, [0], 0)
        self.node_group = Group(None, [0], 0)
        self.resume_state: ResumeState | None = None  # the checkpoint being resumed, read once
        self.rank_resume: RankResume | None = None  # this rank's part of it, until the optimizer is loaded

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
        self.world_group = Group(None, list(range(world)), rank)
        self.node_group = node_groups(world, self.num_nodes, rank, self._timeout)

    # ------------------------------------------------------------------ setup: no DDP wrapper
    @override
    def configure_ddp(self) -> None:
        if self.rank_resume is None or not self.rank_resume.exact:
            assert self.model is not None
            broadcast_module_(self.comm, self.model, self.world_group)

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
        self.resume_state = ResumeState.from_checkpoint(checkpoint) if self.fitting() else None
        resume, loops = self.resume_state, loader_state(checkpoint)
        if resume is not None and resume.ranks is not None and resume.world_size == self.world_size and loops:
            mine = resume.ranks[self.global_rank].get("loader")
            if mine is not None:  # this rank's own dataloader position, not rank 0's
                loops["combined_loader"] = mine
        return checkpoint

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        if self.rank_resume is not None:
            checkpoint = {"optimizer_states": self.rank_resume.optimizer_states}
        super().load_optimizer_state_dict(checkpoint)
        self.rank_resume = None  # the last reader

    @override
    def teardown(self) -> None:
        self.comm.close()
        super().teardown()
