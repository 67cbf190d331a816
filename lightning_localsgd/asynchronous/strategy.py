"""AsyncLocalSGDStrategy: asynchronous Local-SGD with a parameter server on rank 0 (seed 001)."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_localsgd._checks import check_bool, check_int, check_number
from lightning_localsgd.asynchronous.guards import LockstepGuards
from lightning_localsgd.asynchronous.optimizers import DelayedNesterov, ServerOptimizer
from lightning_localsgd.asynchronous.protocol import AsyncTrainingError, MessageType, RemoteClient
from lightning_localsgd.asynchronous.server import LocalClient, ParameterServer
from lightning_localsgd.asynchronous.worker import AsyncWorker, reconcile, resume_problem, state_dtype
from lightning_localsgd.engine import SyncEngine
from lightning_localsgd.resume import RankResume
from lightning_localsgd.trainer.replica import DEFAULT_TIMEOUT, ReplicaStrategy
from lightning_localsgd.transport.collectives import Collectives, Group
from lightning_localsgd.transport.process_group import DEFAULT_INIT_TIMEOUT
from lightning_localsgd.transport.tensors import flatten, host_copy, unflatten_

__all__ = ["AsyncLocalSGDStrategy"]

_CHECKPOINT_KEY = "async_localsgd"


class AsyncLocalSGDStrategy(LockstepGuards, ReplicaStrategy):
    r"""Asynchronous Local-SGD (``strategy="async_localsgd"``): workers never wait for each other.

    Every rank is a worker: it runs :math:`H_i` local optimizer steps from the global model it last
    pulled, pushes its pseudo-gradient :math:`g = x_\text{pulled} - x_i` to the parameter server on
    rank 0 and continues from the model the server sends back. The server applies every push once,
    in arrival order, with ``outer_optimizer`` (:class:`~lightning_localsgd.DelayedNesterov` by default;
    :class:`~lightning_localsgd.asynchronous.optimizers.OuterSGD` for the naive baselines). The
    staleness of a push is the number of server updates since that worker's pull. With
    ``dynamic_local_steps`` (DyLU) :math:`H_i = \max(1, \lceil H v_i / \max_j v_j \rceil)`, where
    :math:`v` is each worker's measured optimizer steps per second, so all workers push at about the
    same rate. Design, protocol, limits and restrictions: ``docs/async.md``.

    * **End of training.** A worker ends by its own ``max_steps``/``max_epochs``, or when the server
      has applied ``max_updates`` pushes (the workers then finish their current round: the total is
      between ``max_updates`` and ``max_updates + n − 1``). Its last partial round is pushed too, and
      after ``fit`` every rank holds the final global model.
    * **Validation** during ``fit`` pulls the current global model and puts the replica back after.
    * **Checkpoints** carry the global model as ``state_dict`` and the server's state (θ, momentum,
      Δ, t, speeds, counters) taken between two pushes, written by rank 0; beside it every rank
      writes its own part, ``<path>.rank<r>`` (its replica, place in its round and all Lightning
      state of that rank: loops with its global step and dataloader position, inner optimizer,
      schedulers, callbacks), at its own step. Resuming on the same number of workers restores the
      server exactly and every worker at its own step from its own part; a push the cut holds but
      the part does not is trained again without being pushed, one the cut lacks is lost (warned);
      without its part a worker starts a fresh round from θ at rank 0's step, with a warning
      (docs/async.md, "Resuming").
    * **Lockstep collectives** are impossible while ranks run at their own pace: during training
      ``barrier`` and ``broadcast`` are local, ``self.log(sync_dist=True)`` logs the local value
      (with a warning) and ``all_gather`` raises (:class:`~lightning_localsgd.asynchronous.guards.LockstepGuards`).

    Example::

        Trainer(devices=4, strategy=AsyncLocalSGDStrategy(sync_every=20, max_updates=2000))

    Args:
        sync_every: H, local steps per round (the fastest worker's under DyLU).
        outer_optimizer: the server's optimizer; default ``DelayedNesterov(lr=0.7, momentum=0.9)`` (the
            steady-state step per n pushes of synchronous DiLoCo at outer lr 0.7).
        dynamic_local_steps: DyLU on (``True``) or every worker runs H steps per round.
        slowdown: ``{rank: factor}``: after each optimizer step that rank sleeps ``factor − 1`` times the
            step's measured time, to show heterogeneous workers on one machine.
        max_updates: end training once the server applied this many pushes (``None``: each worker
            stops at its own ``max_steps``/``max_epochs``).
        speed_smoothing: weight of the previous speed estimate in the EMA, in [0, 1).
        poll_interval: seconds between "is everyone done?" requests of a finished worker.
        timeout: of every server message; a worker silent for longer (dead or stalled) ends the run
            with :class:`~lightning_localsgd.asynchronous.server.AsyncTrainingError`. Must exceed the longest
            round of local steps and the longest validation.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
        process_group_backend, start_method: as in ``DDPStrategy``.
    """

    strategy_name = "async_localsgd"

    def __init__(
        self,
        sync_every: int = 20,
        outer_optimizer: ServerOptimizer | None = None,
        dynamic_local_steps: bool = True,
        slowdown: Mapping[int, float] | None = None,
        max_updates: int | None = None,
        speed_smoothing: float = 0.5,
        poll_interval: float = 0.05,
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
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            init_timeout=init_timeout,
        )
        self.sync_every = check_int("sync_every", sync_every)
        if outer_optimizer is None:
            outer_optimizer = DelayedNesterov(lr=0.7, momentum=0.9)
        if not isinstance(outer_optimizer, ServerOptimizer):
            raise TypeError(
                "outer_optimizer must be a server optimizer such as DelayedNesterov(lr=0.7) or "
                f"OuterSGD(lr=0.07, momentum=0.9, nesterov=True), got {type(outer_optimizer).__name__}"
            )
        self.outer_optimizer = outer_optimizer
        self.dynamic_local_steps = check_bool("dynamic_local_steps", dynamic_local_steps)
        self.slowdown = {
            check_int("a slowdown rank", r, minimum=0): check_number(f"slowdown[{r}]", f, 1, example="{1: 3.0}")
            for r, f in dict(slowdown or {}).items()
        }
        self.max_updates = None if max_updates is None else check_int("max_updates", max_updates)
        self.speed_smoothing = check_number("speed_smoothing", speed_smoothing, 0, 1, high_open=True, example="0.5")
        self.poll_interval = check_number("poll_interval (seconds)", poll_interval, 0, low_open=True, example="0.05")
        self._server: ParameterServer | None = None  # rank 0 only
        self._server_comm = Collectives()  # the server thread's own counters (bytes rank 0 sends as replies)
        self._server_group = Group(None, [0], 0)
        self.push_observers: list[Callable[[Any, Tensor], None]] = []  # handed to the server (tests, monitors)
        self._worker: AsyncWorker | None = None
        self._names: list[str] = []
        self._num_params = 0
        self._restored_server: dict[str, Any] | None = None
        self._resumed_worker: dict[str, Any] | None = None  # this rank's part of the checkpoint
        self._replay: tuple[int, int] | None = None  # steps and pushes of this worker the restored server holds

    @property
    def server(self) -> ParameterServer | None:
        """The parameter server (rank 0, during and after a fit; ``None`` elsewhere)."""
        return self._server

    @property
    def worker(self) -> AsyncWorker | None:
        """This rank's worker of the current (or last) fit."""
        return self._worker

    @property
    def server_comm(self) -> Collectives:
        """The server thread's own transport (its counters: the bytes rank 0 sends as replies)."""
        return self._server_comm

    # ------------------------------------------------------------------ setup
    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        if self.world_size > 1:  # used only by the server protocol, so it never mixes with other traffic
            # gloo whatever the world's backend: the server keeps θ and the headers in host memory and
            # needs a receive from any source, which NCCL does not have
            self._server_group = self._new_group(backend="gloo")

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self._restored_server = self._resumed_worker = self._replay = None  # nothing of an earlier fit
        if not self.fitting():
            return
        algorithms, modifiers, observers = SyncEngine.find(self.lightning_module.trainer.callbacks)
        found = [type(cb).__name__ for cb in algorithms + modifiers]
        if found:
            raise ValueError(
                f"AsyncLocalSGDStrategy runs its own parameter server and cannot drive {', '.join(found)}: remove "
                "them from callbacks, or use strategy='localsgd' for synchronous training with them"
            )
        if observers:
            rank_zero_warn("ReplicaDrift has no effect with AsyncLocalSGDStrategy (there are no synchronous syncs)")
        if any(r >= self.world_size for r in self.slowdown):
            raise ValueError(
                f"slowdown names ranks {sorted(self.slowdown)} but the run has ranks 0..{self.world_size - 1}"
            )

    @override
    def configure_ddp(self) -> None:
        # Resuming from an async checkpoint, every rank has loaded its model from it (its own replica, or
        # the global model θ when its part is missing): no broadcast, which a rank with a part would skip.
        if self._restored_server is None:
            super().configure_ddp()

    def _tensors(self) -> list[Tensor]:
        """The state workers push and pull: trainable parameters, then floating buffers."""
        module = self.lightning_module
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        buffers = [(n, b) for n, b in module.named_buffers() if torch.is_floating_point(b)]
        self._names = [n for n, _ in params + buffers]
        self._num_params = sum(p.numel() for _, p in params)
        return [t for _, t in params + buffers]

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        if self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return
        tensors = self._tensors()
        state = flatten(tensors, state_dtype(tensors))
        restored, rank = self._restored_server, self.global_rank
        client: LocalClient | RemoteClient
        if rank == 0:
            self._server = ParameterServer(
                host_copy(state),  # θ in host memory: no model-sized copy on rank 0's accelerator
                self._num_params,
                self.outer_optimizer,
                self.world_size,
                sync_every=self.sync_every,
                dynamic_local_steps=self.dynamic_local_steps,
                max_updates=self.max_updates,
                timeout=self._timeout_seconds(),
            )
            if restored is not None:
                self._server.load_state_dict(restored)
            self._server.observers = self.push_observers
            if self.world_size > 1:
                self._server.start(self._server_comm, self._server_group)
            client = LocalClient(self._server, rank)
        else:
            client = RemoteClient(self.comm, self._server_group, state.numel(), state.dtype, rank)
        self._worker = AsyncWorker(
            client,
            self._tensors,
            self._num_params,
            state,
            sync_every=self.sync_every,
            slowdown=self.slowdown.get(rank, 1.0),
            speed_smoothing=self.speed_smoothing,
            poll_interval=self.poll_interval,
            restored=restored,
            rank=rank,
            resumed=None if self._resumed_worker is None else self._resumed_worker["worker"],
            replay=self._replay,
        )
        self._restored_server = self._resumed_worker = self._replay = None
        self._set_active(True)

    def _timeout_seconds(self) -> float:
        return (self._timeout or DEFAULT_TIMEOUT).total_seconds()

    # ------------------------------------------------------------------ the worker loop
    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._active and self._worker is not None:
            reply = self._worker.after_step()
            if reply is not None:
                if reply.stop:  # max_updates reached on the server
                    self.lightning_module.trainer.should_stop = True
                self.lightning_module.log_dict(self.async_metrics(), on_step=True, on_epoch=False, batch_size=1)
        return out

    def async_metrics(self) -> dict[str, float]:
        """This worker's H_i, speed, pushes and last staleness; on rank 0 also the server's view per worker."""
        out = self._worker.metrics() if self._worker is not None else {}
        server = self._server
        if server is not None:
            with server.lock:
                for r in range(server.n):
                    out[f"async/local_steps_rank{r}"] = float(server.local_steps[r])
                    out[f"async/speed_rank{r}"] = server.speeds[r]
                    out[f"async/pushes_rank{r}"] = float(server.pushes[r])
                out["async/updates"] = float(server.updates)
                out["async/staleness_mean"] = server.staleness_sum / max(server.updates, 1)
                out["async/staleness_max"] = float(server.staleness_max)
        return out

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        if self._active and self._worker is not None:
            self._worker.finish()  # last push, DONE, and the final global model on every rank
            self._set_active(False)
            if self._server is not None and self._server.thread is not None:
                self._server.thread.join(self._timeout_seconds())

    @override
    def teardown(self) -> None:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if (
            trainer is not None
            and self._restored_server is not None
            and self._worker is None
            and trainer.state.fn == TrainerFn.FITTING
            and trainer.state.status == TrainerStatus.RUNNING
        ):
            # Resumed from a part written at max_steps: Lightning skipped the training loop, so neither
            # on_train_start nor on_train_end ran. The other workers still need this rank: rank 0 hosts
            # the server, and every worker owes the server its DONE and takes the final global model.
            self.on_train_start()
            self.on_train_end()
        if self._server is not None and self._server.thread is not None and self._server.thread.is_alive():
            self._groups.remove(self._server_group)  # never pull a group from under a thread blocked on it
        super().teardown()

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        if not self._active:
            return
        self._set_active(False)
        if self._server is not None:
            self._server.abort(f"rank 0 failed: {type(exception).__name__}: {exception}")
        elif self._worker is not None and not isinstance(exception, AsyncTrainingError):
            with contextlib.suppress(AsyncTrainingError):  # tell the server at once instead of letting it time out
                self._worker.client.request(MessageType.FAIL)

    # ------------------------------------------------------------------ validation on the global model
    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self._active and self._worker is not None:
            self._worker.begin_evaluation()  # the server's current global model; the replica is parked

    @override
    def on_validation_end(self) -> None:
        if self._worker is not None:
            self._worker.end_evaluation()
        super().on_validation_end()

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def part_path(filepath: Any, rank: int) -> str:
        """Where rank ``rank`` writes its own part of the checkpoint at ``filepath``."""
        return f"{filepath}.rank{rank}"

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        # No collective: every rank writes its own part now; rank 0 also writes the server's cut and
        # the global model as the state_dict. A round that ended at this step was pushed before (inside
        # optimizer_step): the part counts that push, so a resume never pushes it again.
        if self._worker is not None and "optimizer_states" in checkpoint:
            state = self.lightning_module.state_dict()
            state.update(zip(self._names, (t.clone() for t in self._worker.replica())))
            lightning = {k: v for k, v in checkpoint.items() if k not in ("state_dict", _CHECKPOINT_KEY)}
            part = {
                "world_size": self.world_size,
                "rank": self.global_rank,
                "model": {k: v.detach().clone() for k, v in state.items()},
                "worker": self._worker.state_dict(),
                "lightning": lightning,
            }
            self.checkpoint_io.save_checkpoint(part, self.part_path(filepath, self.global_rank))
        if self._server is not None:
            saved = self._server.state_dict()
            state_dict = dict(checkpoint["state_dict"])
            theta = saved["optimizer"]["theta"][0]
            flat = torch.cat([theta, saved["buffers"]])
            targets = [state_dict[name].clone() for name in self._names]
            unflatten_(flat, targets)
            state_dict.update(zip(self._names, targets))
            checkpoint["state_dict"] = state_dict
            checkpoint[_CHECKPOINT_KEY] = saved
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        super().remove_checkpoint(filepath)
        part = self.part_path(filepath, self.global_rank)
        if os.path.exists(part):
            self.checkpoint_io.remove_checkpoint(part)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._resumed_worker, self._replay = None, None
        if not self.fitting() or _CHECKPOINT_KEY not in checkpoint:
            return checkpoint
        part = self.part_path(checkpoint_path, self.global_rank)
        saved = self.checkpoint_io.load_checkpoint(part, weights_only=weights_only) if os.path.exists(part) else None
        problem = resume_problem(saved, part, self.world_size)
        if problem is not None:
            warnings.warn(
                f"rank {self.global_rank}: {problem}; this worker starts a fresh round from the global model "
                f"with rank 0's step ({checkpoint.get('global_step')}), loop progress, dataloader position "
                "and inner optimizer state (docs/async.md, 'Resuming')",
                UserWarning,
                stacklevel=2,
            )
            return checkpoint
        assert saved is not None
        # everything Lightning dumped on this worker (loops: its global step, batch progress and dataloader
        # position; optimizer, schedulers, callbacks), in place of rank 0's; only the server's cut is rank 0's
        checkpoint.update(saved["lightning"])
        worker, self._replay = reconcile(saved["worker"], checkpoint[_CHECKPOINT_KEY], self.global_rank)
        self._resumed_worker = {**saved, "worker": worker}
        self._rank_resume = RankResume(saved["model"], saved["lightning"]["optimizer_states"], {}, exact=True)
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        self._restored_server = checkpoint.get(_CHECKPOINT_KEY) if fitting else None
        if self._resumed_worker is not None:  # this worker's own replica, not the global model
            self.lightning_module.load_state_dict(self._resumed_worker["model"], strict=strict)
            return
        super().load_model_state_dict(checkpoint, strict)

    # ------------------------------------------------------------------ registration
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (("async_localsgd", "popen"), ("async_localsgd_spawn", "spawn")):
            if name in strategy_registry:
                continue  # imported twice (e.g. reloaded): keep the first registration
            strategy_registry.register(
                name,
                cls,
                description=f"Asynchronous Local SGD with a parameter server on rank 0, start_method={start_method!r}",
                start_method=start_method,
            )


AsyncLocalSGDStrategy.register_strategies(StrategyRegistry)
