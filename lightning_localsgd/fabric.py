"""Local SGD for Lightning Fabric: ``Fabric(strategy="localsgd")`` (the second front end).

The same algorithm objects as under the Trainer, driven by the same
:class:`~lightning_localsgd.engine.SyncEngine`; only the glue differs::

    import lightning_localsgd.fabric  # registers strategy="localsgd" with Fabric
    from lightning_localsgd import DiLoCo

    fabric = Fabric(devices=4, strategy=LocalSGDStrategy(algorithm=DiLoCo(sync_every=64)))
    fabric.launch()
    model, optimizer = fabric.setup(model, optimizer)       # replicas start equal (broadcast from rank 0)
    for batch in loader:
        loss = loss_fn(model(batch))
        fabric.backward(loss)                                # no gradient allreduce
        optimizer.step()                                     # local step, then the sync schedule
        optimizer.zero_grad()
    with fabric.strategy.consensus():                        # evaluate the consensus, replicas put back after
        evaluate(model)
    fabric.save("ckpt.pt", {"model": model, "optimizer": optimizer})   # consensus + every rank's replica
    fabric.strategy.finalize()                               # end: every rank holds the consensus

GradAlign re-runs the step's forward/backward, so under Fabric it needs the step's closure:
``optimizer.step(lambda: fabric.backward(loss_fn(model(batch))))``.

Fault tolerance (torchft, docs/fault_tolerance.md) works as under the Trainer: each Fabric job is one
replica group::

    strategy = LocalSGDStrategy(algorithm=DiLoCo(64), fault_tolerance=TorchFT(min_replicas=2))
    fabric = Fabric(devices=8, strategy=strategy)
    fabric.launch()
    model, optimizer = fabric.setup(model, optimizer)
    scheduler = strategy.register_scheduler(torch.optim.lr_scheduler.StepLR(optimizer, 100))  # travels when healing
    state = {"model": model, "optimizer": optimizer}
    if resume: fabric.load(path, state)                     # torchft's step comes back with it
    while strategy.step < max_steps:                        # a returning group starts at the others' step
        loss = loss_fn(model(next(batches)))                # the first forward joins the live groups
        fabric.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    strategy.finalize()
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, Precision
from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy
from lightning.fabric.strategies.strategy import _BackwardSyncControl
from lightning.fabric.utilities.types import _Stateful
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_localsgd._checks import check_bool, check_seconds
from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.algorithms.periodic import PeriodicAveraging
from lightning_localsgd.checkpoint_io import AtomicCheckpointIO
from lightning_localsgd.contract import FrontEnd, GradientModifier, SyncContext, SyncObserver, scale_of
from lightning_localsgd.engine import (
    FaultTolerancePlugin,
    FaultTolerantSession,
    ReplicaHost,
    SyncEngine,
    WaitsForBackgroundSyncs,
)
from lightning_localsgd.resume import (
    CHECKPOINT_KEY,
    ResumeState,
    drop_stale_parts,
    part_reader,
    rank_payload,
    write_part,
)
from lightning_localsgd.transport.collectives import Collectives, Group, destroy_groups, new_group
from lightning_localsgd.transport.process_group import (
    DEFAULT_INIT_TIMEOUT,
    DEFAULT_TIMEOUT,
    init_strategy_process_group,
    serialize_threads,
)
from lightning_localsgd.transport.replicas import (
    broadcast_module_,
    check_within_node,
    counted_allreduce_hook,
    node_groups,
    replica_group,
)
from lightning_localsgd.tuning.model import AutoTune
from lightning_localsgd.tuning.tuner import may_overlap, tuner_for

__all__ = ["FabricHost", "LocalSGDStrategy"]

FT_CHECKPOINT_KEY = "localsgd_fault_tolerance"  # (the Trainer's key too: trainer/strategy.py)

log = logging.getLogger(__name__)


class _NothingToSkip(_BackwardSyncControl):
    """``fabric.no_backward_sync`` is free here: backward never communicates."""

    @override
    def no_backward_sync(self, module: Module, enabled: bool) -> AbstractContextManager:
        return nullcontext()


class LocalSGDStrategy(WaitsForBackgroundSyncs, DDPStrategy, FrontEnd):
    """Fabric strategy: local optimizer steps, and the algorithm's synchronization instead of DDP's allreduce.

    Args:
        algorithm: the consensus algorithm (default ``PeriodicAveraging(sync_every=8)``).
        gradient_modifier: e.g. :class:`~lightning_localsgd.GradAlign` (needs ``optimizer.step(closure)``).
        observers: sync observers (their ``on_sync`` is called at every sync).
        comm_dtype: what travels at a sync (as in the Trainer's ``LocalSGDStrategy``).
        bucket_mb: largest single collective in megabytes.
        save_replicas: ``fabric.save`` stores every rank's replica and optimizer state (exact resume).
        checkpoint_io: how ``fabric.save`` writes; default
            :class:`~lightning_localsgd.checkpoint_io.AtomicCheckpointIO` (a file is replaced whole or
            not at all, as under the Trainer).
        timeout: how long any collective waits (default 10 minutes), then an error naming the rank.
        init_timeout: how long creating the process group waits (default 5 minutes); torchrun restarts
            come up (see ``process_group.py``).
        within_node: ``None`` (every process is a replica) or ``"ddp"`` (every node is one replica:
            ``fabric.setup`` wraps the model in ``DistributedDataParallel`` over the node's processes
            and the algorithm syncs across nodes; see the Trainer's ``LocalSGDStrategy`` and
            docs/multinode.md).
        ddp_kwargs: arguments of ``DistributedDataParallel`` under ``within_node="ddp"``.
        autotune: the auto-tuner's bounds and target (:class:`~lightning_localsgd.AutoTune`), for
            ``comm_dtype="auto"`` and an algorithm given ``"auto"`` settings (docs/autotune.md).
        fault_tolerance: :class:`~lightning_localsgd.TorchFT` makes this job one replica group of a
            fault-tolerant job (docs/fault_tolerance.md): the first forward pass joins the live groups
            (a returning group heals: model, optimizer, :meth:`register_scheduler`'d schedulers and
            :attr:`step` become a live peer's); ``fabric.save`` keeps torchft's step.
        accelerator, parallel_devices, cluster_environment, precision, process_group_backend,
        start_method: as in Fabric's ``DDPStrategy``.
    """

    def __init__(
        self,
        algorithm: ConsensusAlgorithm | None = None,
        gradient_modifier: GradientModifier | None = None,
        observers: Sequence[SyncObserver] = (),
        comm_dtype: str | torch.dtype | None = None,
        bucket_mb: float = 256.0,
        save_replicas: bool = True,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = DEFAULT_TIMEOUT,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        init_timeout: timedelta = DEFAULT_INIT_TIMEOUT,
        within_node: Literal["ddp"] | None = None,
        ddp_kwargs: dict[str, Any] | None = None,
        autotune: AutoTune | None = None,
        fault_tolerance: FaultTolerancePlugin | None = None,
    ) -> None:
        ddp_kwargs = dict(ddp_kwargs or {})
        tuner = tuner_for(comm_dtype, autotune)
        comm_dtype = None if tuner.tune_format else comm_dtype
        if within_node == "fsdp":
            raise ValueError(
                "within_node='fsdp' (FSDP2 inside each node) is available with the Trainer's LocalSGDStrategy only: "
                "use lightning_localsgd.LocalSGDStrategy(within_node='fsdp') with a Trainer, or within_node='ddp' "
                "here (docs/fsdp.md)"
            )
        if fault_tolerance is not None and not isinstance(fault_tolerance, FaultTolerancePlugin):
            raise TypeError(f"fault_tolerance must be a TorchFT(...) or None, got {type(fault_tolerance).__name__}")
        check_within_node(within_node, ddp_kwargs, fault_tolerance is not None)
        if within_node is not None and fault_tolerance is not None:
            raise ValueError(
                "fault_tolerance with within_node under Fabric is not supported yet: use the Trainer's "
                "LocalSGDStrategy(within_node='ddp', fault_tolerance=...) or drop within_node"
            )
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO(),
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **ddp_kwargs,
        )
        if algorithm is None:
            algorithm = PeriodicAveraging()
        if not isinstance(algorithm, ConsensusAlgorithm):
            raise TypeError(
                f"algorithm must be a ConsensusAlgorithm such as DiLoCo(64), got {type(algorithm).__name__}"
            )
        if gradient_modifier is not None and not isinstance(gradient_modifier, GradientModifier):
            raise TypeError(
                f"gradient_modifier must be a GradientModifier such as GradAlign(beta=0.025), "
                f"got {type(gradient_modifier).__name__}"
            )
        self.init_timeout = check_seconds("init_timeout", init_timeout)
        if timeout is not None:
            check_seconds("timeout", timeout)
        if fault_tolerance is not None and tuner.active(algorithm):
            raise ValueError(
                "fault_tolerance does not combine with the auto-tuner yet: give comm_dtype and the algorithm's "
                "sync_every/overlap_steps/fragments numbers (docs/autotune.md)"
            )
        self._engine = SyncEngine(algorithm, gradient_modifier, observers, tuner)
        self._fault_tolerance = fault_tolerance
        if fault_tolerance is not None:
            self._comm = fault_tolerance.collectives(comm_dtype, bucket_mb)
        else:
            self._comm = Collectives(comm_dtype=comm_dtype, bucket_mb=bucket_mb)
        self._session: FaultTolerantSession | None = None
        self._joined = False
        self._ft_resume: dict[str, Any] | None = None
        self._optimizer_list: list[Optimizer] = []
        self._schedulers: list[Any] = []
        self._pending_step: int | None = None  # a healing inside a step: the step count it ends at
        self.save_replicas = check_bool("save_replicas", save_replicas)
        self._within_node = within_node
        self._world_group = Group(None, [0], 0)
        self._node_group = Group(None, [0], 0)
        self._replica_world = self._world_group  # the group the algorithm syncs over
        self._background_group: Group | None = None
        self._groups: list[Group] = []  # the process groups this strategy made (destroyed at teardown)
        self._step = 0  # completed optimizer steps
        self._module: Module | None = None
        self._optimizers = 0
        if within_node is None:  # with DDP inside a node, Fabric's DDP control of the backward sync stays
            self._backward_sync_control = _NothingToSkip()

    @property
    def engine(self) -> SyncEngine:
        return self._engine

    @property
    @override
    def algorithm(self) -> ConsensusAlgorithm:
        return self._engine.algorithm

    @property
    @override
    def comm(self) -> Collectives:
        """The transport (its ``counters`` are what this rank sent)."""
        return self._comm

    @property
    def world_group(self) -> Group:
        return self._world_group

    @property
    def node_group(self) -> Group:
        return self._node_group

    @property
    def replica_group(self) -> Group:
        """The group the consensus algorithm syncs over (one rank per node under ``within_node``)."""
        return self._replica_world

    @property
    @override
    def within_node(self) -> str | None:
        return self._within_node

    @property
    def step(self) -> int:
        """Completed optimizer steps (restored by ``fabric.load``; under fault tolerance a returning group's
        becomes the others' when it joins)."""
        return self._step

    @property
    def ft_session(self) -> FaultTolerantSession | None:
        """The fault-tolerant session (``None`` without ``fault_tolerance``)."""
        return self._session

    def register_scheduler(self, scheduler: Any) -> Any:
        """An LR scheduler stepped once per optimizer step whose state should travel when a replica group heals
        (fault tolerance); returns it. Without fault tolerance it is only kept."""
        if not callable(getattr(scheduler, "state_dict", None)) or not callable(getattr(scheduler, "step", None)):
            raise TypeError(f"register_scheduler takes an LR scheduler (state_dict, step), got {type(scheduler)}")
        self._schedulers.append(scheduler)
        return scheduler

    @property
    @override
    def loss_scaling(self) -> bool:
        return getattr(self.precision, "scaler", None) is not None

    # ------------------------------------------------------------------ setup
    @override
    def _setup_distributed(self) -> None:
        self._set_world_ranks()
        init_strategy_process_group(self)
        super()._setup_distributed()  # Lightning's own init finds the group and goes on
        self._comm.serialize_threads = serialize_threads()

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self._engine.check(self)
        world, rank = self.world_size, self.global_rank
        log.debug(
            "fabric LocalSGDStrategy.setup_environment: rank %d of %d drives %s",
            rank,
            world,
            type(self.algorithm).__name__,
        )
        if self._fault_tolerance is not None:
            self._fault_tolerance.check_supported(self._engine, self._comm, world)
        self._world_group = Group(None, list(range(world)), rank)
        self._node_group = node_groups(world, self.num_nodes, rank, self._timeout, created=self._groups)
        self._replica_world = self._world_group
        if self._within_node is not None:
            node = self._node_group
            self._replica_world = replica_group(world, self.num_nodes, rank, node, self._timeout, self._groups)
        # (under fault tolerance an overlapped sync's SUM runs in torchft's process group: no group of ours)
        if may_overlap(self.algorithm) and self._replica_world.size > 1 and self._fault_tolerance is None:
            if self._within_node is not None:  # its own cross and node groups
                self._background_group = replica_group(world, self.num_nodes, rank, None, self._timeout, self._groups)
            else:
                self._background_group = new_group(list(range(world)), rank, self._timeout)
                self._groups.append(self._background_group)

    @override
    def setup_module(self, module: Module) -> Module:
        if self._module is not None:
            raise ValueError("lightning_localsgd.fabric.LocalSGDStrategy drives one model: call fabric.setup once")
        broadcast_module_(self._comm, module, self._world_group)  # replicas start equal
        self._module = module
        if self._fault_tolerance is not None:  # the world is the quorum of replica groups
            self._session = self._fault_tolerance.start(
                FabricHost(self), self._engine, self._world_group, self._comm, self.broadcast
            )
            module.register_forward_pre_hook(self._join_before_forward)
            self._replica_world = self._session.group
        self._bind(self._step, None)
        if self._within_node == "ddp" and self._node_group.size > 1:  # DDP over this node's processes only
            self._ddp_kwargs = {**self._ddp_kwargs, "process_group": self._node_group.handle}
            wrapped = super().setup_module(module)
            self._ddp_kwargs.pop("process_group")
            wrapped.register_comm_hook(None, counted_allreduce_hook(self._comm.counters, self._node_group))
            return wrapped
        return module  # no DDP wrapper: a backward sends nothing

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        self._optimizers += 1
        if self._optimizers > 1:
            raise ValueError("LocalSGDStrategy supports exactly one optimizer: combine parameter groups into one")
        self._optimizer_list.append(optimizer)
        return optimizer

    def _join_before_forward(self, module: Module, args: Any) -> None:
        """The first forward pass under fault tolerance joins the live groups (after ``fabric.load``, before any
        gradient: a returning group computes its first step on the model it healed to)."""
        self.join()

    def join(self) -> None:
        """Join the live replica groups now (fault tolerance; the first forward pass does it)."""
        if self._session is None or self._joined:
            return
        self._joined = True
        if self._ft_resume is not None:
            self._session.load_state_dict(self._ft_resume)
            self._ft_resume = None
        self._session.join()

    def _bind(self, step: int, restored: Any) -> None:
        assert self._module is not None
        ctx = SyncContext(
            self._module,
            self._comm,
            self._replica_world,
            self._node_group,
            self._background_group,
            self._engine.observers,
            gradient_scale=lambda: scale_of(getattr(self.precision, "scaler", None)),
            everyone=self._world_group,
        )
        self._engine.bind(ctx, step, restored)

    # ------------------------------------------------------------------ the training step
    @override
    def backward(self, tensor: Tensor, module: Module | None, *args: Any, **kwargs: Any) -> None:
        self._engine.note_loss(tensor)
        if self._within_node is not None:  # DDP's backward communicates on this thread (NCCL: one at a time)
            self._comm.before_collective()
        super().backward(tensor, module, *args, **kwargs)

    @override
    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        # Without a closure, fabric.backward already ran: the step's closure only hands back its loss.
        closure: Callable[[], Any] = kwargs.pop("closure", None) or (lambda: self._engine.last_loss)
        self.join()  # (normally done by the first forward pass)
        step = self._step + 1
        out = self._engine.step(step, closure, lambda wrapped: self._run_step(optimizer, wrapped, **kwargs), optimizer)
        if self._session is not None:
            self._session.after_step()
        self._step, self._pending_step = (step if self._pending_step is None else self._pending_step), None
        return out

    def _run_step(self, optimizer: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        """The optimizer step through Fabric's precision plugin, with the engine's closure.

        fp16 loss scaling: ``GradScaler.step`` refuses a closure, so the closure runs first (its
        additions to the gradients carry the scale, see ``SyncContext.gradient_scale``) and the
        scaler then unscales, skips the step on Inf/NaN, and updates its scale.
        """
        if self.loss_scaling:
            closure()
            return super().optimizer_step(optimizer, **kwargs)
        return super().optimizer_step(optimizer, closure=closure, **kwargs)

    # ------------------------------------------------------------------ evaluation and the end
    @contextmanager
    def consensus(self) -> Iterator[None]:
        """Within the block the model is the consensus; the replicas come back exactly afterwards."""
        log.debug("fabric LocalSGDStrategy.consensus at step %d", self._step)
        self.algorithm.begin_evaluation(self._step)
        try:
            yield
        finally:
            self.algorithm.end_evaluation()

    def finalize(self) -> None:
        """End of training: merge syncs in flight and leave the consensus on every rank."""
        log.debug("fabric LocalSGDStrategy.finalize at step %d", self._step)
        self.algorithm.finalize(self._step)

    # ------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(
        self,
        path: Any,
        state: dict[str, Module | Optimizer | Any],
        storage_options: Any | None = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,
    ) -> None:
        algorithm, module = self.algorithm, self._module
        assert module is not None, "fabric.setup(model, optimizer) first"
        log.debug("fabric LocalSGDStrategy.save_checkpoint: %s at step %d", path, self._step)
        extra: dict[str, Any] = {
            CHECKPOINT_KEY: {"step": self._step, "algorithm": algorithm.state_dict(), "world_size": self.world_size}
        }
        if self._session is not None:  # torchft's step: a whole-job restart resumes every group where it was
            extra[FT_CHECKPOINT_KEY] = self._session.state_dict()
        if self.save_replicas:  # every rank writes its own part: rank 0 never holds the others' (resume.py)
            optimizers = [o for o in state.values() if isinstance(o, Optimizer)]
            mine = rank_payload(
                algorithm.replica_state_dict(), [o.state_dict() for o in optimizers], algorithm.rank_state_dict()
            )
            write_part(self.checkpoint_io, mine, path, self._step, self.global_rank)
            extra[CHECKPOINT_KEY]["parts"] = True
        consensus = algorithm.consensus_state_dict(module.state_dict(), self._step)
        converted = self._convert_stateful_objects_in_state(state, filter=(filter or {}))
        for key, obj in state.items():
            if obj is module:
                converted[key] = consensus
        converted.update(extra)
        if self.is_global_zero:
            self.checkpoint_io.save_checkpoint(checkpoint=converted, path=path, storage_options=storage_options)
        if self.save_replicas:  # the file that refers to the new parts exists: the older ones go
            barrier = lambda: self.barrier("lightning_localsgd.parts")  # noqa: E731
            drop_stale_parts(self.checkpoint_io, barrier, path, self._step, self.global_rank)

    @override
    def load_checkpoint(
        self,
        path: Any,
        state: Module | Optimizer | dict[str, Module | Optimizer | Any] | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if not isinstance(state, dict) or not state:
            return super().load_checkpoint(path, state, strict, weights_only)
        checkpoint = self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
        saved = checkpoint.pop(CHECKPOINT_KEY, None)
        ft_state = checkpoint.pop(FT_CHECKPOINT_KEY, None)
        if self._session is not None:
            self._ft_resume = ft_state  # applied before the join
        if saved is None:
            raise ValueError(
                f"{path} was not written by lightning_localsgd.fabric.LocalSGDStrategy: load it with "
                "fabric.load(path) (no state) and restore the objects yourself"
            )
        step, world_size = int(saved["step"]), int(saved["world_size"])
        if saved.get("parts"):
            read = lambda p: self.checkpoint_io.load_checkpoint(p, weights_only=weights_only)  # noqa: E731
            resume = ResumeState(step, world_size, read_part=part_reader(path, step, read))
        else:  # the parts inside the file (before 0.2), or none (save_replicas=False)
            resume = ResumeState(step, world_size if "ranks" in saved else None, saved.get("ranks"))
        log.debug("fabric LocalSGDStrategy.load_checkpoint: %s at step %d", path, resume.step)
        self.algorithm.load_state_dict(saved["algorithm"])
        mine = resume.for_rank(self.global_rank, self.world_size, self.algorithm)
        for name, obj in list(state.items()):
            if name not in checkpoint:
                continue
            entry = checkpoint.pop(name)
            if isinstance(obj, Module):
                obj.load_state_dict(mine.model if mine is not None and mine.exact else entry, strict=strict)
            elif isinstance(obj, Optimizer):
                obj.load_state_dict(mine.optimizer_states[0] if mine is not None else entry)
            elif isinstance(obj, _Stateful):
                obj.load_state_dict(entry)
            else:
                state[name] = entry
        self._step = resume.step
        self._bind(self._step, mine)
        return checkpoint

    @override
    def teardown(self) -> None:
        if self._session is not None:
            self._session.shutdown()
        self._comm.close()  # the background thread's syncs end first: they use the groups
        destroy_groups(self._groups)
        self._groups.clear()
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (("localsgd", "popen"), ("localsgd_spawn", "spawn")):
            if name not in strategy_registry:
                strategy_registry.register(
                    name,
                    cls,
                    description=f"Local SGD for Fabric, start_method={start_method!r}",
                    start_method=start_method,
                )


LocalSGDStrategy.register_strategies(STRATEGY_REGISTRY)


class FabricHost(ReplicaHost):
    """The Fabric strategy's model, optimizer, registered LR schedulers and step count, for fault tolerance."""

    def __init__(self, strategy: LocalSGDStrategy) -> None:
        self.strategy = strategy

    @property
    def module(self) -> Module:
        assert self.strategy._module is not None
        return self.strategy._module

    @property
    def step(self) -> int:
        return self.strategy._step

    def optimizers(self) -> list[Optimizer]:
        return list(self.strategy._optimizer_list)

    def schedulers(self) -> list[Any]:
        return list(self.strategy._schedulers)

    def set_step(self, completed: int, ready: int | None = None) -> None:
        if ready is None:
            self.strategy._step = int(completed)
        else:  # inside an optimizer step: the step it ends at
            self.strategy._pending_step = int(ready)

    def step_schedulers(self, step: int) -> None:
        """The update the user's loop makes after optimizer step ``step`` (registered schedulers: once per step)."""
        with warnings.catch_warnings():  # a joining group steps them before its own first optimizer step
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            for scheduler in self.strategy._schedulers:
                scheduler.step()
