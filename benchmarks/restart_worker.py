"""One rank of a run under ``torchrun --max-restarts`` in which a worker is killed: the entry of
``benchmarks/restarts.py`` and ``tests/test_restarts.py``.

``torchrun --nproc-per-node=2 --max-restarts=1 -m benchmarks.restart_worker CONFIG.json``

Two kinds of run (``kind`` in the JSON config):

* ``"torch"``: a plain torch script: create the gloo group, one allreduce, rank ``victim`` exits in
  the first attempt, the restarted group does one more allreduce (the issue's minimal repro);
* ``"lightning"``: ``LocalSGDStrategy`` with PeriodicAveraging or DiLoCo, float64, several batches
  per epoch from a ``StatefulDataLoader`` that shuffles each rank's shard with its own seed,
  ``ModelCheckpoint(every_n_train_steps, save_last=True)``; rank ``victim`` is SIGKILLed after
  optimizer step ``kill_step`` in the attempts listed in ``kill_attempts``; each attempt resumes
  from ``last.ckpt`` when it exists.

Faults other than the kill above (a kill inside a step or during a checkpoint write, NaN
gradients, slow checkpoint writes, sleeps between steps) come from
:mod:`benchmarks.fault_injection`; ``algorithm: "async"`` runs ``AsyncLocalSGDStrategy`` instead.
For the async acceptance (``tests/test_async_restart.py``): ``log_pushes`` logs the initial model
and every push the server applies (worker, update, steps) as events, and rank 0's result carries
the server's final counters; ``waits`` orders events across ranks: ``{"rank", "step", "attempt",
"until": {event fields}, "hold": bool}`` makes that rank, after that optimizer step of that attempt,
log a ``waiting`` event and wait until an event with those fields is logged (``hold``: then stay
until the agent stops it).
Without torchrun (ranks started by ``recipes.launch.run_local_ranks``) the rank is read from
``NODE_RANK``/``LOCAL_RANK`` and the attempt is 0. An exception is logged as an ``error`` event.

``fixed: true`` creates the process group with :func:`lightning_localsgd.transport.process_group.init_process_group`
(the Lightning run through :class:`RestartSafeStrategy`, the wiring proposed for
``LocalSGDStrategy.setup_distributed``); ``false`` is the stock path. Each rank writes
``out_dir/rank<r>.json`` at the end (the final parameters as float64 hex strings, bit-exact) and
``out_dir/events.jsonl`` gets one line per attempt start, group creation and kill.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lightning_localsgd.transport.process_group import DEFAULT_INIT_TIMEOUT, init_process_group
from lightning_localsgd.transport.tensors import flatten


@functools.cache  # read once: Lightning's teardown removes WORLD_SIZE from the environment
def local_world() -> tuple[int, int]:
    """``(processes on this node, nodes)`` under torchrun or ``run_local_ranks``."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])), int(os.environ.get("GROUP_WORLD_SIZE", 1))


@functools.cache
def rank_and_attempt() -> tuple[int, int]:
    """This process's global rank and torchrun's restart count (0 without torchrun)."""
    if "RANK" in os.environ:
        rank = int(os.environ["RANK"])
    else:
        rank = int(os.environ.get("NODE_RANK", 0)) * local_world()[0] + int(os.environ["LOCAL_RANK"])
    return rank, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def log_event(cfg: dict[str, Any], **event: Any) -> None:
    rank, attempt = rank_and_attempt()
    event.update(t=time.time(), rank=rank, attempt=attempt)
    with open(Path(cfg["out_dir"]) / "events.jsonl", "a") as f:
        f.write(json.dumps(event) + "\n")


def create_group(cfg: dict[str, Any]) -> None:
    (rank, _), world = rank_and_attempt(), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(seconds=cfg["timeout"])
    if cfg["fixed"]:
        init_process_group(
            "gloo",
            rank,
            world,
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            timeout=timeout,
            init_timeout=timedelta(seconds=cfg["init_timeout"]),
        )
    else:
        dist.init_process_group("gloo", timeout=timeout)


def run_torch(cfg: dict[str, Any]) -> dict[str, Any]:
    rank, attempt = rank_and_attempt()
    create_group(cfg)
    log_event(cfg, event="group_up")
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x)
    if attempt in cfg["kill_attempts"] and rank == cfg["victim"]:
        log_event(cfg, event="kill", step=0)
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    return {"rank": rank, "attempt": attempt, "sum": x.item(), "global_step": cfg["steps"]}


def run_lightning(cfg: dict[str, Any]) -> dict[str, Any]:
    from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_localsgd.trainer.replica
    from benchmarks.fault_injection import StepFaults, slow_checkpoint_writes
    from lightning_localsgd import AsyncLocalSGDStrategy, DiLoCo, LocalSGDStrategy, PeriodicAveraging
    from recipes.data import shuffled_loader

    if not cfg["fixed"]:  # the "stock" rows: what Lightning alone does (torch's env:// rendezvous)
        lightning_localsgd.trainer.replica.init_strategy_process_group = lambda *args, **kwargs: None

    class Regressor(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
            self.batch_sums: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            self.batch_sums.append(float(x.sum()))
            return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class Events(Callback):
        logged_server = False

        def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            log_event(cfg, event="group_up", step=trainer.global_step)
            if cfg.get("log_pushes") and attempt == 0 and rank == 0:  # the model every worker starts from
                log_event(
                    cfg, event="theta0", params=[float(v).hex() for v in flatten(list(pl_module.parameters())).tolist()]
                )

        def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
            log_event(cfg, event="train_end", step=trainer.global_step)  # after the last checkpoint write

        def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
            server = getattr(trainer.strategy, "server", None)  # created after the callbacks' on_train_start
            if cfg.get("log_pushes") and server is not None and not self.logged_server:
                self.logged_server = True  # the server's update count this attempt starts from
                log_event(cfg, event="server_start", updates=server.updates, step=trainer.global_step)

        def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
            for rule in cfg.get("waits", []):
                if (rule["rank"], rule["step"], rule["attempt"]) == (rank, trainer.global_step, attempt):
                    wait_for(cfg, rule, lambda: trainer.received_sigterm)
            if cfg.get("trace"):
                trace.append([float(p) for p in torch.cat([q.detach().reshape(-1) for q in pl_module.parameters()])])

    rank, attempt = rank_and_attempt()
    log = functools.partial(log_event, cfg)
    slow_checkpoint_writes(cfg, log, rank, attempt)
    faults = StepFaults(cfg, log, rank, attempt)
    trace: list[list[float]] = []
    seed_everything(cfg["seed"], workers=True)
    shards = [
        torch.randn(cfg["samples"], 5, generator=torch.Generator().manual_seed(1000 + r), dtype=torch.float64)
        for r in range(int(os.environ["WORLD_SIZE"]))
    ]
    x = shards[rank]  # each rank's own shard
    data = TensorDataset(x, torch.sin(x.sum(1)))
    if cfg["loader"] == "stateful":  # the recipes' loader; each rank its own order
        loader = shuffled_loader(data, cfg["batch_size"], seed=cfg["seed"] + rank)
    else:
        shuffle = torch.Generator().manual_seed(cfg["seed"] + rank)
        loader = DataLoader(data, batch_size=cfg["batch_size"], shuffle=True, generator=shuffle)
    timeout = timedelta(seconds=cfg["timeout"])
    init_timeout = timedelta(seconds=cfg["init_timeout"])
    nonfinite = cfg.get("nonfinite", "raise")
    algorithms = {
        "periodic": lambda: PeriodicAveraging(cfg["sync_every"], nonfinite=nonfinite),
        "diloco": lambda: DiLoCo(cfg["sync_every"], outer_lr=0.7, outer_momentum=0.9, nonfinite=nonfinite),
        "async": lambda: None,
    }
    algorithm = algorithms[cfg["algorithm"]]()
    if algorithm is None:  # the server's outer optimizer is the strategy's default (DelayedNesterov)
        strategy: Any = AsyncLocalSGDStrategy(
            sync_every=cfg["sync_every"], dynamic_local_steps=False, timeout=timeout, init_timeout=init_timeout
        )
    else:
        strategy = LocalSGDStrategy(timeout=timeout, init_timeout=init_timeout)
    if algorithm is None and cfg.get("log_pushes"):  # called on rank 0, in the server's arrival order
        strategy.push_observers.append(lambda r, g: log(event="push", worker=r.worker, update=r.update, steps=r.steps))
    ckpt_dir = Path(cfg["ckpt_dir"])
    callbacks = [cb for cb in (algorithm, Events(), faults) if cb is not None]  # the strategy keeps loader positions
    if cfg["save_every"]:
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="{step}",
                every_n_train_steps=cfg["save_every"],
                save_last=True,
                save_top_k=-1,
            )
        )
    devices, nodes = local_world()
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=nodes,
        strategy=strategy,
        max_steps=cfg["steps"],
        precision="64-true",
        callbacks=callbacks,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_checkpointing=bool(cfg["save_every"]),
    )
    model = Regressor().double()  # float64 before the checkpoint is loaded into it (64-true converts later)
    last = ckpt_dir / "last.ckpt"
    trainer.fit(model, loader, ckpt_path=str(last) if last.exists() else None)
    params = flatten(list(model.parameters()))
    server = getattr(strategy, "server", None)  # the async parameter server (rank 0)
    with torch.no_grad():  # the final model's loss on every rank's data
        everything = torch.cat(shards)
        loss = float(nn.functional.mse_loss(model.net(everything).squeeze(-1), torch.sin(everything.sum(1))))
    return {
        "final_loss": loss,
        "nonfinite_steps": faults.nonfinite_steps,
        "rank": rank,
        "attempt": attempt,
        "global_step": trainer.global_step,
        "resumed": last.exists() and attempt > 0,
        "params": [float(v).hex() for v in params.tolist()],
        "batch_sums": model.batch_sums,
        "trace": trace,
        "server": None
        if server is None
        else {"pushes": server.pushes, "steps": server.steps, "updates": server.updates},
    }


def wait_for(cfg: dict[str, Any], rule: dict[str, Any], stopped: Any = lambda: False) -> None:
    """Log ``waiting``, then poll ``events.jsonl`` until an event matches ``rule["until"]``; with ``hold``,
    then stay until the agent stops this process (``stopped()``: its SIGTERM reached Lightning's handler)."""
    log_event(cfg, event="waiting", step=rule["step"])
    deadline = time.monotonic() + cfg["timeout"]
    path = Path(cfg["out_dir"]) / "events.jsonl"
    while time.monotonic() < deadline:
        events = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line another process is still writing
                events.append(json.loads(line))
        if any(all(e.get(k) == v for k, v in rule["until"].items()) for e in events):
            break
        time.sleep(0.05)
    else:
        raise TimeoutError(f"waited {cfg['timeout']} s for an event {rule['until']}")
    while rule.get("hold") and time.monotonic() < deadline:
        if stopped():
            raise SystemExit("stopped by the agent while held")
        time.sleep(0.05)


def main(cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    cfg.setdefault("init_timeout", DEFAULT_INIT_TIMEOUT.total_seconds())
    torch.set_num_threads(1)
    log_event(cfg, event="start")
    try:
        result = run_torch(cfg) if cfg["kind"] == "torch" else run_lightning(cfg)
    except BaseException as err:  # noted with its time (seconds to detect a fault), then raised as it was
        frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_tb(err.__traceback__)]
        log_event(cfg, event="error", error=f"{type(err).__name__}: {err}"[:600], where=frames[-6:])
        raise
    Path(cfg["out_dir"], f"rank{result['rank']}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
