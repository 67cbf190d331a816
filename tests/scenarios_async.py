"""Scenarios of AsyncLocalSGDStrategy run on every rank by tests/test_async.py (see tests/launch.py)."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_localsgd.asynchronous.optimizers import DelayedNesterov, OuterSGD
from lightning_localsgd.asynchronous.strategy import AsyncLocalSGDStrategy
from tests.models import TinyNet, flat_params, loader, regression_data, trainer_kwargs


def _rank(devices: int) -> int:
    return int(os.environ["NODE_RANK"]) * devices + int(os.environ["LOCAL_RANK"])


class _Die(Callback):
    """Rank ``rank`` leaves without a word after optimizer step ``step`` (its result file written first)."""

    def __init__(self, rank: int, step: int, out_dir: str) -> None:
        self.rank, self.step, self.out_dir = rank, step, out_dir

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            torch.save({"died_at": time.time()}, Path(self.out_dir) / f"result{self.rank}.pt")
            os._exit(0)


class _SaveAt(Callback):
    """Every rank calls ``trainer.save_checkpoint`` after its own optimizer step ``step`` (rank 0 writes)."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


class _Start(Callback):
    """The model every worker starts from (after the initial broadcast or the checkpoint load)."""

    def __init__(self) -> None:
        self.theta0: torch.Tensor | None = None

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.theta0 = flat_params(pl_module)
        state = trainer.optimizers[0].state_dict()["state"]
        self.momentum0 = state[0]["momentum_buffer"].clone() if 0 in state and "momentum_buffer" in state[0] else None


class _ReplicaCheck(Callback):
    """Checks that training resumes after each validation on exactly the replica it left."""

    def __init__(self) -> None:
        self.before: torch.Tensor | None = None
        self.restored: list[bool] = []

    def on_validation_start(self, trainer: Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.before = flat_params(pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        if self.before is not None:
            self.restored.append(torch.equal(self.before, flat_params(pl_module)))
            self.before = None

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.on_train_batch_start(trainer, pl_module)  # called before the strategy adopts the final model


def async_run(
    out_dir: str,
    devices: int,
    num_nodes: int,
    sync_every: int = 4,
    max_updates: int | None = 20,
    max_steps: int = 10_000,
    slowdown: dict[int, float] | None = None,
    dynamic: bool = False,
    outer: dict[str, Any] | None = None,
    timeout_s: float = 60,
    die_at: tuple[int, int] | None = None,
    save_at: int | None = None,
    resume: str | None = None,
    validate_every: int | None = None,
    momentum: float = 0.0,
) -> dict[str, Any]:
    """Train TinyNet (fp64) asynchronously; rank 0 also records every push in arrival order.

    ``outer``: ``{"dn": {...}}`` or ``{"sgd": {...}}`` kwargs of DelayedNesterov / OuterSGD.
    """
    rank = _rank(devices)
    seed_everything(0)
    model = TinyNet(
        lr=0.05, momentum=momentum
    ).double()  # float64 before a checkpoint is loaded, so loading does not round
    outer = outer or {"dn": {"lr": 0.5, "momentum": 0.9}}
    ((kind, kwargs),) = outer.items()
    optimizer = DelayedNesterov(**kwargs) if kind == "dn" else OuterSGD(**kwargs)
    strategy = AsyncLocalSGDStrategy(
        sync_every=sync_every,
        outer_optimizer=optimizer,
        dynamic_local_steps=dynamic,
        slowdown=slowdown,
        max_updates=max_updates,
        timeout=timedelta(seconds=timeout_s),
    )
    pushes: list[tuple[Any, torch.Tensor]] = []
    strategy.push_observers.append(lambda record, g: pushes.append((record, g.clone())))
    callbacks: list[Callback] = []
    if die_at is not None:
        callbacks.append(_Die(die_at[0], die_at[1], out_dir))
    if save_at is not None:
        callbacks.append(_SaveAt(save_at, str(Path(out_dir) / "mid.ckpt")))
    replica_check, start_cb = _ReplicaCheck(), _Start()
    callbacks += [replica_check, start_cb]
    overrides: dict[str, Any] = {"limit_val_batches": 0}
    if validate_every is not None:
        overrides = {"limit_val_batches": 1, "val_check_interval": validate_every, "check_val_every_n_epoch": None}
    kwargs = trainer_kwargs(devices, num_nodes, **overrides)
    trainer = Trainer(strategy=strategy, max_steps=max_steps, callbacks=callbacks, **kwargs)
    data = loader(regression_data(64 * devices * num_nodes), batch_size=4)
    start, error = time.time(), None
    try:
        trainer.fit(model, data, loader(regression_data(8)) if validate_every else None, ckpt_path=resume)
    except Exception as exc:  # the test inspects it
        error = f"{type(exc).__name__}: {exc}"
    w = strategy.worker
    server = strategy.server
    out: dict[str, Any] = {
        "error": error,
        "elapsed": time.time() - start,
        "failed_at": time.time(),
        "final": flat_params(model),
        "theta0": start_cb.theta0,
        "momentum0": start_cb.momentum0,
        "worker_pushes": w.pushes if w else None,
        "worker_steps": w.steps if w else None,
        "global_step": trainer.global_step,
        "records": [r for r, _ in pushes],
        "grads": [g for _, g in pushes],
        "val_params": model.val_params,
        "replica_restored": replica_check.restored,
        "bytes": dict(strategy.comm.counters.bytes_by_purpose),
        "server_bytes": dict(strategy.server_comm.counters.bytes_by_purpose),
        "calls": dict(strategy.comm.counters.calls_by_purpose),
        "metrics": strategy.async_metrics(),
        "ckpt": str(Path(out_dir) / "mid.ckpt") if save_at is not None else None,
    }
    if server is not None:
        out.update(server_pushes=list(server.pushes), server_steps=list(server.steps), updates=server.updates)
    if save_at is not None and rank == 0 and error is None:
        out["ckpt_content"] = torch.load(Path(out_dir) / "mid.ckpt", weights_only=False)
    if save_at is not None and error is None:  # this rank's own part, and what it saw at that step
        out["part"] = torch.load(Path(out_dir) / f"mid.ckpt.rank{rank}", weights_only=False)
    return out


def resume_run(
    out_dir: str, devices: int, num_nodes: int, save_at: int, first: dict, second: dict, **cfg: Any
) -> dict[str, Any]:
    """Fit A (``first`` settings) writes a checkpoint mid-run, at rank 0's step ``save_at``; fit B
    (``second`` settings), in the same processes, resumes from it."""
    a = async_run(out_dir, devices, num_nodes, save_at=save_at, **first, **cfg)
    ckpt = str(Path(out_dir) / "mid.ckpt")
    b = async_run(out_dir, devices, num_nodes, resume=ckpt, **second, **cfg)
    return {"first": a, "second": b}


def single_worker(out_dir: str, devices: int, num_nodes: int, steps: int, sync_every: int, resume_step: int) -> dict:
    """One process (deterministic): a fit with validation and a checkpoint every step (one batch per epoch),
    the same fit without either, and a fit resumed from the checkpoint written after ``resume_step``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_dir = Path(out_dir) / "ckpts"
    out: dict[str, Any] = {}
    for name in ("full", "plain", "resumed"):
        seed_everything(0)
        model = TinyNet(lr=0.05, momentum=0.9).double()
        strategy = AsyncLocalSGDStrategy(
            sync_every=sync_every,
            outer_optimizer=DelayedNesterov(lr=0.5, momentum=0.9, buffer_size=2, activation=0.25),
            dynamic_local_steps=False,
            timeout=timedelta(seconds=60),
        )
        grads: list[torch.Tensor] = []
        strategy.push_observers.append(lambda record, g, grads=grads: grads.append(g.clone()))
        start_cb = _Start()
        callbacks: list[Callback] = [start_cb]
        save = name == "full"
        if save:
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", save_top_k=-1, every_n_epochs=1))
        kwargs = trainer_kwargs(devices, num_nodes, enable_checkpointing=save, limit_val_batches=1 if save else 0)
        trainer = Trainer(strategy=strategy, max_steps=steps, callbacks=callbacks, **kwargs)
        ckpt = str(ckpt_dir / f"step={resume_step}.ckpt") if name == "resumed" else None
        trainer.fit(model, loader(regression_data(4), batch_size=4), loader(regression_data(8)), ckpt_path=ckpt)
        out[name] = {
            "final": flat_params(model),
            "grads": grads,
            "theta0": start_cb.theta0,
            "val_params": model.val_params,
            "updates": strategy.server.updates,
        }
    out["ckpt"] = torch.load(ckpt_dir / f"step={resume_step}.ckpt", weights_only=False)
    return out


def p2p_timeout(out_dir: str, devices: int, num_nodes: int, timeout_s: float) -> dict[str, Any]:
    """Rank 1 sends one tensor to whoever listens, then stays silent; rank 0 receives it, then waits in vain."""
    import torch.distributed as dist

    from lightning_localsgd.transport.collectives import Collectives, new_group

    rank = _rank(devices)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    group = new_group([0, 1], rank, timeout=timedelta(seconds=timeout_s))
    comm, out = Collectives(), {}
    if rank == 0:
        buf = torch.zeros(3)
        out["src"] = comm.recv_(buf, None, group, purpose="probe", tag=5)
        out["got"] = buf.tolist()
        start, out["error"] = time.monotonic(), None
        try:
            comm.recv_(buf, 1, group, purpose="probe", tag=6)
        except RuntimeError as err:
            out["error"] = str(err)
        out["waited"] = time.monotonic() - start
    else:
        comm.send(torch.tensor([1.0, 2.0, 3.0]), 0, group, purpose="probe", tag=5)
        time.sleep(timeout_s + 2)
    out["bytes"] = dict(comm.counters.bytes_by_purpose)
    return out
