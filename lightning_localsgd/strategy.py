"""LocalSGDStrategy: data-parallel training without the per-step gradient allreduce."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_localsgd.algorithms.base import ConsensusAlgorithm, check_positive_int
from lightning_localsgd.comm import Collectives, Group, NonFinitePolicy
from lightning_localsgd.params import BufferPolicy

_UNSET: Any = object()
_CHECKPOINT_KEY = "localsgd"


def _as_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"comm_dtype must name a floating dtype such as 'bfloat16' or 'float16', got {value!r}")
    return dtype


class LocalSGDStrategy(DDPStrategy):
    """Data-parallel training with local steps and periodic synchronization (``strategy="localsgd"``).

    Unlike :class:`~lightning.pytorch.strategies.DDPStrategy`, the module is **not** wrapped in
    ``DistributedDataParallel``: a backward pass sends nothing. Each rank steps its own replica;
    a consensus algorithm (a callback such as :class:`~lightning_localsgd.PeriodicAveraging` or
    :class:`~lightning_localsgd.DiLoCo`) brings the replicas together on its schedule. With no
    algorithm among the callbacks, ``PeriodicAveraging(sync_every, warmup_steps, node_sync_every,
    buffers, nonfinite)`` is used with the arguments given here.

    Guarantees:

    * every replica starts equal (parameters and buffers broadcast from rank 0 at setup);
    * validation and test during ``fit`` run on the consensus (the replicas' average), and the
      replicas are put back exactly afterwards, so evaluating never perturbs training;
    * after ``fit`` every rank holds the consensus model, and a checkpoint's ``state_dict`` is the
      consensus model;
    * a checkpoint also carries every rank's replica, inner optimizer state and per-rank algorithm
      state, so resuming on the same world size continues exactly; on another world size every
      rank starts from the consensus with rank 0's optimizer state (with a warning).

    Example::

        trainer = Trainer(accelerator="gpu", devices=8, num_nodes=4, strategy="localsgd")
        trainer = Trainer(devices=4, strategy=LocalSGDStrategy(comm_dtype="bfloat16"), callbacks=[DiLoCo(500)])

    Args:
        sync_every: H of the default ``PeriodicAveraging`` (8 when not given). Pass it to the
            algorithm instead when you give one.
        warmup_steps: DDP-style gradient averaging for this many first steps (default algorithm).
        node_sync_every: node-local averaging period of the default algorithm (hierarchical).
        buffers: buffer policy of the default algorithm: ``"average"``, ``"broadcast"``, ``"local"``.
        nonfinite: NaN/Inf policy of the default algorithm: ``"raise"`` (default) or ``"skip"``.
        comm_dtype: dtype on the wire for syncs, e.g. ``"bfloat16"`` (replica − anchor travels;
            the mean is added back in fp32). ``None`` keeps the parameters' own dtype.
        bucket_mb: largest single collective in megabytes.
        save_replicas: store every rank's replica and optimizer state in checkpoints (rank 0 holds
            them all while saving). ``False`` stores only the consensus: resume restarts every
            rank from it.
        timeout: timeout of every collective; a rank that never arrives makes the others fail.
        start_method, accelerator, parallel_devices, cluster_environment, checkpoint_io,
        precision_plugin, process_group_backend: as in ``DDPStrategy``.
    """

    strategy_name = "localsgd"

    def __init__(
        self,
        sync_every: int | None = None,
        warmup_steps: int | None = None,
        node_sync_every: int | None = None,
        buffers: BufferPolicy | None = None,
        nonfinite: NonFinitePolicy | None = None,
        comm_dtype: str | torch.dtype | None = None,
        bucket_mb: float = 256.0,
        save_replicas: bool = True,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        # Arguments of the default PeriodicAveraging, validated now by building it once.
        self._default_kwargs = {
            k: v
            for k, v in dict(
                sync_every=sync_every,
                warmup_steps=warmup_steps,
                node_sync_every=node_sync_every,
                buffers=buffers,
                nonfinite=nonfinite,
            ).items()
            if v is not None
        }
        from lightning_localsgd.algorithms.periodic import PeriodicAveraging

        PeriodicAveraging(**self._default_kwargs)
        self.comm = Collectives(comm_dtype=_as_dtype(comm_dtype), bucket_mb=bucket_mb)
        self.save_replicas = bool(save_replicas)
        self.algorithm: ConsensusAlgorithm | None = None
        self.world_group = Group(None, [0], 0)
        self.node_group = Group(None, [0], 0)
        self._sync_observers: list[Callable[[int, bool, Tensor, Tensor], None]] = []
        self._restored_rank: dict[str, Any] | None = None  # this rank's slice of a loaded checkpoint

    # ------------------------------------------------------------------ process groups
    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        world, rank = self.world_size, self.global_rank
        self.world_group = Group(None, list(range(world)), rank)
        per_node, node = self.num_processes, self.node_rank
        if self.num_nodes == 1:
            self.node_group = self.world_group
        else:
            handle = None
            for n in range(self.num_nodes):  # every rank must create every group, in the same order
                ranks = list(range(n * per_node, (n + 1) * per_node))
                g = dist.new_group(ranks, timeout=self._timeout) if per_node > 1 else None
                if n == node:
                    handle = g
            ranks = list(range(node * per_node, (node + 1) * per_node))
            self.node_group = Group(handle, ranks, ranks.index(rank))

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            self._resolve_algorithm(trainer)
            if self.world_size == 1:
                rank_zero_warn("LocalSGDStrategy runs on a single process: there is nothing to synchronize.")

    def _resolve_algorithm(self, trainer: Trainer) -> None:
        from lightning_localsgd.algorithms.periodic import PeriodicAveraging

        found = [cb for cb in trainer.callbacks if isinstance(cb, ConsensusAlgorithm)]
        if self.algorithm is not None and found == [self.algorithm]:
            return  # a second fit with the same trainer
        if len(found) > 1:
            names = ", ".join(type(cb).__name__ for cb in found)
            raise ValueError(f"exactly one consensus algorithm may be active, got {names}: keep one of them")
        if found:
            if self._default_kwargs:
                raise ValueError(
                    f"{sorted(self._default_kwargs)} given to LocalSGDStrategy would have no effect next to "
                    f"{type(found[0]).__name__}: pass them to {type(found[0]).__name__}(...) instead"
                )
            self.algorithm = found[0]
        else:
            self.algorithm = PeriodicAveraging(**self._default_kwargs)
            trainer.callbacks.append(self.algorithm)

    # ------------------------------------------------------------------ setup: no DDP wrapper
    @override
    def configure_ddp(self) -> None:
        # No DistributedDataParallel: replicas start equal by one broadcast from rank 0, unless each
        # rank has just loaded its own replica from a checkpoint.
        if self._restored_rank is None:
            module = self.model
            assert module is not None
            tensors = list(module.parameters()) + list(module.buffers())
            by_dtype: dict[torch.dtype, list[Tensor]] = {}
            for t in tensors:
                by_dtype.setdefault(t.dtype, []).append(t)
            for group in by_dtype.values():
                self.comm.broadcast_tensors_(group, src=0, group=self.world_group, kind="setup")

    @override
    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if len(self.optimizers) != 1:
            raise ValueError(
                f"LocalSGDStrategy supports exactly one optimizer, got {len(self.optimizers)}; "
                "combine parameter groups into one optimizer instead"
            )
        assert self.algorithm is not None
        self.algorithm.attach(self)
        if self._restored_rank is not None:
            self.algorithm.load_rank_state_dict(self._restored_rank.get("algorithm", {}))
        self._sync_observers = [cb.observe for cb in trainer.callbacks if hasattr(cb, "observe")]

    # ------------------------------------------------------------------ the training step
    @override
    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        trainer = self.lightning_module.trainer
        algorithm = self.algorithm
        if algorithm is None or trainer.state.fn != TrainerFn.FITTING:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        step = trainer.global_step + 1  # the optimizer step this call completes
        for cb in trainer.callbacks:  # the algorithm, and gradient modifiers such as GradAlign
            if hasattr(cb, "wrap_closure"):
                closure = cb.wrap_closure(closure, step)
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        algorithm.after_step(step)
        return out

    def sync_observer(self, step: int, node: bool = False) -> Callable[[Tensor, Tensor], None] | None:
        """The monitors' view of a sync: ``observer(local_flat, mean_flat)`` (``None`` if nobody looks)."""
        if not self._sync_observers:
            return None

        def observe(local: Tensor, mean: Tensor) -> None:
            for fn in self._sync_observers:
                fn(step, node, local, mean)

        return observe

    # ------------------------------------------------------------------ evaluation on the consensus
    def _evaluating_during_fit(self) -> bool:
        trainer = self.lightning_module.trainer
        return self.algorithm is not None and self.algorithm._strategy is self and trainer.state.fn == TrainerFn.FITTING

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self._evaluating_during_fit():
            self.algorithm.begin_evaluation()

    @override
    def on_validation_end(self) -> None:
        if self._evaluating_during_fit():
            self.algorithm.end_evaluation()
        super().on_validation_end()

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        if self._evaluating_during_fit():
            self.algorithm.finalize(self.lightning_module.trainer.global_step)

    # ------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        # Called on every rank (Trainer.save_checkpoint), so collectives are allowed here.
        if self.algorithm is not None and self.algorithm._strategy is self:
            checkpoint["state_dict"] = self.algorithm.consensus_state_dict(checkpoint["state_dict"])
            if self.save_replicas and "optimizer_states" in checkpoint:
                mine = {
                    "model": self.algorithm.replica_state_dict(),
                    "optimizer_states": [self.optimizer_state(opt) for opt in self.optimizers],
                    "algorithm": self.algorithm.rank_state_dict(),
                }
                ranks = self.comm.gather_object(mine, self.world_group, kind="checkpoint")  # to rank 0
                checkpoint[_CHECKPOINT_KEY] = {"world_size": self.world_size, "ranks": ranks}
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        saved = checkpoint.get(_CHECKPOINT_KEY)
        trainer = self.lightning_module.trainer
        self._restored_rank = None
        if saved is not None and trainer.state.fn == TrainerFn.FITTING:
            if saved["world_size"] == self.world_size:
                self._restored_rank = saved["ranks"][self.global_rank]
                self.lightning_module.load_state_dict(self._restored_rank["model"], strict=strict)
                return
            rank_zero_warn(
                f"The checkpoint holds replicas of {saved['world_size']} ranks but this run has {self.world_size}: "
                "every rank starts from the consensus model with rank 0's optimizer state; per-rank algorithm "
                "state starts fresh. Resume on the original world size to continue exactly."
            )
        super().load_model_state_dict(checkpoint, strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self._restored_rank is not None:
            checkpoint = {"optimizer_states": self._restored_rank["optimizer_states"]}
        super().load_optimizer_state_dict(checkpoint)
        self._restored_rank = None

    # ------------------------------------------------------------------ registration
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        entries = (
            ("localsgd", "popen", None),
            ("localsgd_spawn", "spawn", None),
            ("localsgd_bf16", "popen", "bfloat16"),
        )
        for name, start_method, comm_dtype in entries:
            if name in strategy_registry:
                continue  # imported twice (e.g. reloaded): keep the first registration
            strategy_registry.register(
                name,
                cls,
                description=f"Local SGD (no per-step gradient allreduce), start_method={start_method!r}, "
                f"comm_dtype={comm_dtype!r}",
                start_method=start_method,
                comm_dtype=comm_dtype,
            )


LocalSGDStrategy.register_strategies(StrategyRegistry)
