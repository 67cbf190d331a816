"""LocalSGDStrategy: data-parallel training without the per-step gradient allreduce (the Trainer front end)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_localsgd._checks import check_bool
from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.algorithms.periodic import PeriodicAveraging
from lightning_localsgd.contract import FrontEnd, SyncContext, scale_of
from lightning_localsgd.engine import SyncEngine
from lightning_localsgd.resume import CHECKPOINT_KEY, drop_stale_parts, rank_payload, to_host, write_part
from lightning_localsgd.trainer.plugins import FaultTolerancePlugin, FaultTolerantSession, TrainerHost
from lightning_localsgd.trainer.replica import DEFAULT_TIMEOUT, ReplicaStrategy, loader_state
from lightning_localsgd.trainer.sigterm import replace_sigterm_check, restore_sigterm_check, sigterm_check_at
from lightning_localsgd.transport.collectives import Group, NonFinitePolicy
from lightning_localsgd.transport.process_group import DEFAULT_INIT_TIMEOUT
from lightning_localsgd.transport.replicas import (
    broadcast_module_,
    check_within_node,
    counted_allreduce_hook,
    replica_group,
)
from lightning_localsgd.transport.sharding import (
    apply_shard_policy,
    broadcast_sharded_module_,
    check_sharded_module,
    full_state_dict,
    is_sharded,
    load_full_state_dict_,
    load_local_state_,
    local_optimizer_state,
    local_state_dict,
    reshard_,
    rewrap_optimizer_state_,
    shard_mesh,
    sharded_group,
)
from lightning_localsgd.transport.tensors import BufferPolicy
from lightning_localsgd.tuning.model import AutoTune
from lightning_localsgd.tuning.tuner import may_overlap, tuner_for

__all__ = ["LocalSGDStrategy"]

log = logging.getLogger(__name__)

FT_CHECKPOINT_KEY = "localsgd_fault_tolerance"
"""The checkpoint entry with the fault-tolerant session's state (torchft's step): a whole-job restart resumes it."""


class LocalSGDStrategy(ReplicaStrategy, FrontEnd):
    """Data-parallel training with local steps and periodic synchronization (``strategy="localsgd"``).

    Unlike :class:`~lightning.pytorch.strategies.DDPStrategy`, the module is **not** wrapped in
    ``DistributedDataParallel``: a backward pass sends nothing. Each rank steps its own replica;
    a consensus algorithm (a callback such as :class:`~lightning_localsgd.PeriodicAveraging` or
    :class:`~lightning_localsgd.DiLoCo`) brings the replicas together on its schedule. With no
    algorithm among the callbacks, ``PeriodicAveraging(sync_every, warmup_steps, node_sync_every,
    buffers, nonfinite)`` is used with the arguments given here.

    Guarantees:

    * every replica starts equal (parameters and buffers broadcast from rank 0 at setup);
    * validation during ``fit`` runs on the consensus (the replicas' average, or the algorithm's
      own consensus such as EASGD's center), and the replicas are put back exactly afterwards, so
      evaluating never perturbs training;
    * after ``fit`` every rank holds the consensus model, and a checkpoint's ``state_dict`` is the
      consensus model;
    * a checkpoint also carries every rank's replica, inner optimizer state and per-rank algorithm
      state (and a sync in flight), so resuming on the same world size continues exactly; on
      another world size every rank starts from the consensus with the inner optimizer state
      averaged over the saved ranks (with a warning).

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
        comm_dtype: what travels at a sync: ``None`` (the parameters' own dtype), ``"bfloat16"`` /
            ``"float16"`` (replica − anchor travels; the mean is added back in fp32), or ``"int8"`` /
            ``"int4"`` (replica − anchor as per-block integers with error feedback; about 0.26 / 0.13
            of fp32's bytes); ``"auto"``: chosen by the auto-tuner from the measured link (docs/autotune.md).
        bucket_mb: largest single collective in megabytes.
        save_replicas: store every rank's replica and optimizer state in checkpoints (rank 0 holds
            them all while saving). ``False`` stores only the consensus: resume restarts every
            rank from it.
        timeout: how long any collective waits (default 10 minutes): a rank that never arrives makes
            the others fail with an error naming the rank, the operation and the peers.
        init_timeout: how long creating the process group waits (default 5 minutes); creation survives
            torchrun restarts (a fresh store namespace per attempt, see ``process_group.py``).
        within_node: what a replica is. ``None`` (default): every process is a replica. ``"ddp"``:
            every node is one replica (replica groups, docs/multinode.md): the module is wrapped in
            ``DistributedDataParallel`` over the node's processes (gradients averaged every step on
            the fast link inside the node, overlapped with backward), and the consensus algorithm
            syncs across nodes only. At a sync each of a node's k processes averages 1/k of the
            model with its peers on the other nodes, then the node all-gathers the slices: one
            model's worth per node crosses the slow link.
            ``"fsdp"``: every node is one replica sharded with FSDP2 over the node's processes
            (sharded replicas, docs/fsdp.md): ``configure_model`` receives ``self.device_mesh`` with
            dimensions ``("replicate", "shard")`` and may call ``fully_shard(...,
            mesh=self.device_mesh["shard"])`` itself; otherwise the strategy shards by its policy
            (``fsdp_modules``). The consensus algorithm syncs each rank's shard with the same shard of
            the other nodes, and keeps its own state per shard (1/k of the model per rank).
        ddp_kwargs: arguments of ``DistributedDataParallel`` under ``within_node="ddp"`` (what
            Lightning's ``DDPStrategy(**kwargs)`` takes, e.g. ``{"find_unused_parameters": True}``).
        fsdp_kwargs: arguments of ``fully_shard`` under ``within_node="fsdp"`` when the strategy shards:
            ``reshard_after_forward``, ``mp_policy``, ``offload_policy``.
        autotune: the auto-tuner's bounds and target (:class:`~lightning_localsgd.AutoTune`), for
            ``comm_dtype="auto"`` and an algorithm given ``"auto"`` settings (docs/autotune.md).
        fsdp_modules: the module classes (or class names) the strategy shards as units under
            ``within_node="fsdp"``, e.g. ``["Block"]``; ``None``: every child of an ``nn.ModuleList`` /
            ``nn.Sequential`` that holds parameters. Each network of the LightningModule is a root.
        fault_tolerance: :class:`~lightning_localsgd.TorchFT` (any
            :class:`~lightning_localsgd.trainer.plugins.FaultTolerancePlugin`) to make this job one
            replica group of a torchft job: syncs go through torchft rounds, groups may die and come
            back (docs/fault_tolerance.md). ``None``: the fixed world of this job.
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
        timeout: timedelta | None = DEFAULT_TIMEOUT,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        init_timeout: timedelta = DEFAULT_INIT_TIMEOUT,
        fault_tolerance: FaultTolerancePlugin | None = None,
        within_node: Literal["ddp", "fsdp"] | None = None,
        ddp_kwargs: dict[str, Any] | None = None,
        fsdp_kwargs: dict[str, Any] | None = None,
        fsdp_modules: list[str] | None = None,
        autotune: AutoTune | None = None,
    ) -> None:
        ddp_kwargs = dict(ddp_kwargs or {})
        self._tuner = tuner_for(comm_dtype, autotune)
        comm_dtype = None if self._tuner.tune_format else comm_dtype
        check_within_node(within_node, ddp_kwargs, fault_tolerance is not None, fsdp_kwargs, fsdp_modules)
        if within_node == "fsdp" and not save_replicas:
            raise ValueError(
                "within_node='fsdp' keeps each rank's shard of its replica and algorithm state in the rank's own "
                "checkpoint part: save_replicas=False would lose them. Keep save_replicas=True (the checkpoint "
                "file still holds the whole consensus model for inference)"
            )
        super().__init__(
            comm_dtype=comm_dtype,
            bucket_mb=bucket_mb,
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            init_timeout=init_timeout,
        )
        self._ddp_kwargs = ddp_kwargs  # DistributedDataParallel's arguments (within_node="ddp")
        self._fsdp_kwargs = dict(fsdp_kwargs or {})  # fully_shard's arguments (within_node="fsdp")
        self._fsdp_modules = None if fsdp_modules is None else list(fsdp_modules)
        self._within_node = within_node
        self._mesh: Any = None  # the ("replicate", "shard") device mesh (within_node="fsdp")
        self._resume_shards: dict[str, Tensor] | None = None  # this rank's saved shards, loaded once sharded
        self._resume_algorithm: dict[str, Any] | None = None  # this rank's saved algorithm state (sharded)
        self._replica_world: Group = self._world_group  # the group the algorithm syncs over
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
        PeriodicAveraging(**self._default_kwargs)
        self.save_replicas = check_bool("save_replicas", save_replicas)
        self._engine: SyncEngine | None = None
        self._background_group: Group | None = None
        self._bound = False  # the engine drives this strategy's module (from setup in fit on)
        # Fault tolerance is a plugin (trainer/plugins.py): the strategy calls it at five points, nothing else.
        if fault_tolerance is not None and not isinstance(fault_tolerance, FaultTolerancePlugin):
            raise TypeError(f"fault_tolerance must be a TorchFT(...) or None, got {type(fault_tolerance).__name__}")
        self._fault_tolerance = fault_tolerance
        self._session: FaultTolerantSession | None = None
        self._ft_resume: dict[str, Any] | None = None  # the session's state from the checkpoint being resumed
        if fault_tolerance is not None:
            self._comm = fault_tolerance.collectives(comm_dtype, bucket_mb)

    @property
    def engine(self) -> SyncEngine | None:
        """The engine of the current (or last) fit (``None`` before the first fit)."""
        return self._engine

    @property
    @override
    def algorithm(self) -> ConsensusAlgorithm | None:
        """The consensus algorithm of the current (or last) fit."""
        return None if self._engine is None else self._engine.algorithm

    @property
    def fault_tolerance(self) -> FaultTolerancePlugin | None:
        """The fault-tolerance plugin given at construction (``None``: the fixed world of this job)."""
        return self._fault_tolerance

    @property
    def ft_session(self) -> FaultTolerantSession | None:
        """The fault-tolerant session of the current (or last) fit (``None`` without ``fault_tolerance``)."""
        return self._session

    @property
    @override
    def loss_scaling(self) -> bool:
        return getattr(self.precision_plugin, "scaler", None) is not None

    @property
    @override
    def within_node(self) -> str | None:
        """``None``: every process is a replica; ``"ddp"`` / ``"fsdp"``: every node is one (DDP / FSDP2 inside)."""
        return self._within_node

    @property
    def device_mesh(self) -> Any:
        """The ``("replicate", "shard")`` device mesh under ``within_node="fsdp"`` (``None`` otherwise)."""
        return self._mesh

    @property
    def replica_group(self) -> Group:
        """The group the consensus algorithm syncs over: every rank, or under ``within_node`` one rank
        per node with the node as its replica (see :class:`~lightning_localsgd.transport.collectives.Group`)."""
        return self._replica_world

    # ------------------------------------------------------------------ replica groups
    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        self._replica_world = self._world_group
        args = (self.world_size, self.num_nodes, self.global_rank, self._node_group, self._timeout, self._groups)
        if self._within_node == "ddp":
            self._replica_world = replica_group(*args)
        elif self._within_node == "fsdp":
            self._replica_world = sharded_group(replica_group(*args))  # the cross group; equal nodes checked
            self._mesh = shard_mesh(self.world_size, self.num_nodes, self.root_device.type)

    def _check_layer_sync(self) -> None:
        """``Trainer(sync_batchnorm=True)``: batch statistics synchronized inside the replica, never across nodes."""
        if self._layer_sync is None:
            return
        if self._within_node is None:
            raise ValueError(
                "sync_batchnorm=True would allreduce batch statistics over every process at every forward "
                "pass, the per-step traffic LocalSGDStrategy avoids: drop it, or use "
                "LocalSGDStrategy(within_node='ddp') to synchronize BatchNorm inside each node"
            )
        if isinstance(self._layer_sync, TorchSyncBatchNorm):
            self._layer_sync = NodeSyncBatchNorm(self._node_group.handle)

    @override
    def configure_ddp(self) -> None:
        if self._within_node == "fsdp":
            self._configure_fsdp()
            return
        super().configure_ddp()  # replicas start equal (rank 0's module, or each rank's restored replica)
        if self._within_node == "ddp" and self._node_group.size > 1:
            log.debug("LocalSGDStrategy.configure_ddp: DDP over the %d processes of this node", self._node_group.size)
            self._ddp_kwargs = {**self._ddp_kwargs, "process_group": self._node_group.handle}
            self.model = self._setup_model(self.model)  # Lightning's DDP wrapper, over this node only
            self._ddp_kwargs.pop("process_group")
            self.model.register_comm_hook(None, counted_allreduce_hook(self._comm.counters, self._node_group))

    def _configure_fsdp(self) -> None:
        """Shard the module inside the node (the policy, or the user's ``configure_model``); replicas start equal."""
        model, shard = self.model, self._mesh["shard"]
        assert model is not None
        restored, self._resume_shards = self._resume_shards, None
        check_sharded_module(model, shard)
        if not is_sharded(model):
            if restored is None:  # rank 0's whole module everywhere, then sharded alike on every node
                broadcast_module_(self._comm, model, self._world_group)
            units = apply_shard_policy(model, shard, self._fsdp_modules, self._fsdp_kwargs)
            log.debug("LocalSGDStrategy: sharded %s over the node's %d processes", units, self._node_group.size)
        else:
            if restored is None:  # node 0's shards on every node (inside a node they are one model already)
                broadcast_sharded_module_(self._comm, model, self._replica_world, self._world_group)
        if restored is not None:
            load_local_state_(model, restored)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.model, DistributedDataParallel) or self._within_node == "fsdp":
            # DDP's or FSDP's forward and backward communicate on this thread: on NCCL one thread at a time
            # (docs/gpu.md), so a sync in flight finishes first there; on gloo this does nothing.
            self._comm.before_collective()
        return super().training_step(*args, **kwargs)

    # ------------------------------------------------------------------ setup
    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self._bound, self._resume_state = False, None  # a new fit: loaded again if resuming
        if self._mesh is not None:  # configure_model(self) reads self.device_mesh, as under ModelParallelStrategy
            self.lightning_module._device_mesh = self._mesh
        if not self.fitting():
            return
        self._resolve_engine(self.lightning_module.trainer)
        assert self._engine is not None
        log.debug(
            "LocalSGDStrategy.setup_environment: rank %d of %d drives %s",
            self.global_rank,
            self.world_size,
            type(self._engine.algorithm).__name__,
        )
        self._engine.check(self)
        self._check_layer_sync()
        if self._fault_tolerance is not None:
            if self._tuner.active(self._engine.algorithm):
                raise ValueError(
                    "fault_tolerance does not combine with the auto-tuner yet: give comm_dtype and the algorithm's "
                    "sync_every/overlap_steps/fragments numbers (docs/autotune.md)"
                )
            self._fault_tolerance.check_supported(self._engine, self._comm, self.world_size)
            if self._within_node == "ddp" and self.num_nodes > 1:
                raise ValueError(
                    f"fault_tolerance with within_node='ddp' makes each job one replica group of one node running "
                    f"DDP; this job has num_nodes={self.num_nodes}: launch one job per node (each its own replica_id)"
                )
        # (under fault tolerance an overlapped sync's SUM runs in torchft's process group: no group of ours)
        needs_background = (
            may_overlap(self._engine.algorithm) and self._replica_world.size > 1 and self._fault_tolerance is None
        )
        self._background_group = None  # every rank decides alike
        if needs_background:
            args = (self.world_size, self.num_nodes, self.global_rank, None, self._timeout, self._groups)
            if self._within_node == "ddp":  # its own cross and node groups
                self._background_group = replica_group(*args)
            elif self._within_node == "fsdp":
                self._background_group = sharded_group(replica_group(*args))
            else:
                self._background_group = self._new_group()
        if self.world_size == 1 and self._fault_tolerance is None:  # a 1-process replica group syncs with others
            rank_zero_warn("LocalSGDStrategy runs on a single process: there is nothing to synchronize.")

    def _resolve_engine(self, trainer: Trainer) -> None:
        algorithms, modifiers, observers = SyncEngine.find(trainer.callbacks)
        if self._engine is not None and algorithms == [self._engine.algorithm]:
            return  # a second fit with the same trainer
        if algorithms and self._default_kwargs:
            name = type(algorithms[0]).__name__
            raise ValueError(
                f"{sorted(self._default_kwargs)} given to LocalSGDStrategy would have no effect next to "
                f"{name}: pass them to {name}(...) instead"
            )
        if algorithms:
            algorithm = algorithms[0]
        else:
            algorithm = PeriodicAveraging(**self._default_kwargs)
            trainer.callbacks.append(algorithm)
        self._engine = SyncEngine(algorithm, modifiers[0] if modifiers else None, observers, self._tuner)

    @override
    def setup(self, trainer: Trainer) -> None:
        if self._within_node == "fsdp" and trainer.state.fn != TrainerFn.FITTING and is_sharded(self.model):
            self._setup_sharded_evaluation(trainer)
            return
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        engine = self._engine
        assert engine is not None
        world = self._replica_world
        if self._fault_tolerance is not None:  # the world is the quorum of replica groups
            host = TrainerHost(trainer)
            one = self._within_node == "ddp"  # the job (one node, DDP inside) is one replica
            self._session = self._fault_tolerance.start(
                host, engine, self._world_group, self._comm, self.broadcast, one_replica=one
            )
            world = self._session.group
        ctx = SyncContext(
            self.lightning_module,
            self._comm,
            world,
            self._node_group,
            self._background_group,
            engine.observers,
            gradient_scale=lambda: scale_of(getattr(self.precision_plugin, "scaler", None)),
            everyone=self._world_group,
        )
        if self._resume_algorithm is not None:  # sharded: this rank's own global state (its shard's anchor, ...)
            engine.algorithm.load_state_dict(self._resume_algorithm)
            self._resume_algorithm = None
        step = trainer.global_step if self._resume_state is None else self._resume_state.step
        log.debug("LocalSGDStrategy.setup: binding at step %d (resuming: %s)", step, self._rank_resume is not None)
        engine.bind(ctx, step, self._rank_resume)
        self._bound, self._resume_state = True, None

    def _setup_sharded_evaluation(self, trainer: Trainer) -> None:
        """validate/test/predict with a sharded module (after fit, or sharded in configure_model): DDPStrategy's
        setup would broadcast whole tensors; node 0's shards go to the same shard of every node instead."""
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self._reshard()
        check_sharded_module(self.model, self._mesh["shard"])
        broadcast_sharded_module_(self._comm, self.model, self._replica_world, self._world_group)
        self.setup_precision_plugin()

    # ------------------------------------------------------------------ the training step
    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        if not self._bound or not self.fitting():
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        assert self._engine is not None
        step = self.lightning_module.trainer.global_step + 1  # the optimizer step this call completes
        run = lambda wrapped: super(LocalSGDStrategy, self).optimizer_step(optimizer, wrapped, model, **kwargs)  # noqa: E731
        out = self._engine.step(step, closure, run)
        if self._session is not None:  # a healing in this step's sync gave this group the peers' step
            self._session.after_step()
        return out

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        if self._engine is not None:
            self._engine.note_loss(closure_loss)

    # ------------------------------------------------------------------ evaluation on the consensus
    def _reshard(self) -> None:
        if self._within_node == "fsdp" and self.model is not None:
            reshard_(self.model)

    def _driving(self) -> bool:
        return self._bound and self.fitting()

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._reshard()
        if self._driving():
            log.debug("LocalSGDStrategy.on_validation_start: the consensus goes in")
            self.algorithm.begin_evaluation(self.lightning_module.trainer.global_step)

    @override
    def on_validation_end(self) -> None:
        self._reshard()  # a forward without backward leaves FSDP roots gathered
        if self._driving():
            log.debug("LocalSGDStrategy.on_validation_end: the replicas come back")
            self.algorithm.end_evaluation()
        super().on_validation_end()

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        if self._session is not None and self._driving():  # join the live replica groups
            if self._ft_resume is not None:  # torchft's step from the checkpoint: level groups do not heal
                self._session.load_state_dict(self._ft_resume)
                self._ft_resume = None
            self._session.join()
        if self._driving() and self.world_size > 1:  # no per-step message between syncs (sigterm.py)
            trainer = self.lightning_module.trainer
            check = sigterm_check_at(trainer, self.algorithm.agrees_at, before=self._comm.before_collective)
            replace_sigterm_check(trainer, check)

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        self._reshard()
        if self._driving():
            log.debug("LocalSGDStrategy.on_train_end: finalize at step %d", self.lightning_module.trainer.global_step)
            restore_sigterm_check(self.lightning_module.trainer)
            self.algorithm.finalize(self.lightning_module.trainer.global_step)

    # ------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        # Called on every rank (Trainer.save_checkpoint), so collectives are allowed here.
        step, parts = self.lightning_module.trainer.global_step, False
        sharded = self._within_node == "fsdp"
        self._reshard()
        if self._bound:
            log.debug("LocalSGDStrategy.save_checkpoint: %s (replicas: %s)", filepath, self.save_replicas)
            algorithm = self.algorithm
            checkpoint["state_dict"] = algorithm.consensus_state_dict(checkpoint["state_dict"], step)
            parts = self.save_replicas and "optimizer_states" in checkpoint
            if parts:
                replica = algorithm.replica_state_dict()
                mine = rank_payload(
                    local_state_dict(replica) if sharded else replica,
                    [self.optimizer_state(opt) for opt in self.optimizers],
                    algorithm.rank_state_dict(),
                )
                if sharded:  # the "global" state is this shard's: every rank keeps its own
                    mine["algorithm_global"] = to_host(algorithm.state_dict())
                loops = loader_state(checkpoint)
                mine["loader"] = None if loops is None else loops.get("combined_loader")  # this rank's position
                checkpoint[CHECKPOINT_KEY] = {"world_size": self.world_size, "step": step}
                write_part(self.checkpoint_io, mine, filepath, step, self.global_rank)  # rank 0 never holds others'
            if self._session is not None:
                checkpoint[FT_CHECKPOINT_KEY] = self._session.state_dict()
        if sharded:  # the file holds the whole consensus (for inference); every rank of a node gathers alike
            checkpoint["state_dict"] = full_state_dict(checkpoint["state_dict"])
        super().save_checkpoint(checkpoint, filepath, storage_options)  # the file (rank 0)
        if parts:
            barrier = lambda: self.barrier("lightning_localsgd.parts")  # noqa: E731
            drop_stale_parts(self.checkpoint_io, barrier, filepath, step, self.global_rank)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._ft_resume = checkpoint.get(FT_CHECKPOINT_KEY) if self._fault_tolerance is not None else None
        return checkpoint

    @override
    def teardown(self) -> None:
        log.debug("LocalSGDStrategy.teardown")
        if self._session is not None:  # leave the quorum (the session's history stays readable)
            self._session.shutdown()
        super().teardown()

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        state = super().optimizer_state(optimizer)
        return local_optimizer_state(state) if self._within_node == "fsdp" else state

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        super().load_optimizer_state_dict(checkpoint)
        if self._within_node == "fsdp":
            for optimizer in self.optimizers:
                rewrap_optimizer_state_(optimizer)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        self._rank_resume = None
        resume = self._resume_state
        if self._within_node == "fsdp" and resume is not None and self._engine is not None:
            self._load_shards(resume)
            return
        if self._within_node == "fsdp" and self.lightning_module is not None and is_sharded(self.lightning_module):
            load_full_state_dict_(self.lightning_module, checkpoint["state_dict"], strict)  # the whole consensus
            return
        if resume is not None and self._engine is not None:
            self._rank_resume = resume.for_rank(self.global_rank, self.world_size, self._engine.algorithm)
        if self._rank_resume is not None and self._rank_resume.exact:
            self.lightning_module.load_state_dict(self._rank_resume.model, strict=strict)
            return
        if self._rank_resume is not None and resume is not None:
            rank_zero_warn(
                f"The checkpoint holds replicas of {resume.world_size} ranks but this run has "
                f"{self.world_size}: every rank starts from the consensus model with the inner optimizer state "
                "averaged over the saved ranks; per-rank algorithm state is reduced as each algorithm documents. "
                "Resume on the original world size to continue exactly."
            )
        super().load_model_state_dict(checkpoint, strict)

    def _load_shards(self, resume: Any) -> None:
        """Sharded replicas resume exactly on the same world size: each rank its own shards and state."""
        if resume.world_size != self.world_size or not resume.has_parts:
            raise ValueError(
                f"this checkpoint holds sharded replicas of {resume.world_size} processes but this run has "
                f"{self.world_size}: within_node='fsdp' resumes on the same world size and nodes only. To start "
                "elsewhere from the consensus, load the checkpoint file's state_dict into the model and fit "
                "without ckpt_path"
            )
        assert self._engine is not None
        self._rank_resume = resume.for_rank(self.global_rank, self.world_size, self._engine.algorithm)
        part = resume.part(self.global_rank)
        self._resume_shards = self._rank_resume.model  # copied in once the module is sharded (configure_ddp)
        self._resume_algorithm = part.get("algorithm_global")

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


class NodeSyncBatchNorm(TorchSyncBatchNorm):
    """``sync_batchnorm=True`` under replica groups: BatchNorm statistics synchronized over the node's processes."""

    def __init__(self, process_group: Any) -> None:
        self.process_group = process_group

    @override
    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=self.process_group)


LocalSGDStrategy.register_strategies(StrategyRegistry)
