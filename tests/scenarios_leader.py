"""Scenarios of LeaderSGD, ElasticAveraging and GradAlign run on every rank (see tests/launch.py),
and the plain-torch pieces the tests recompute them with."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_localsgd import LocalSGDStrategy, PeriodicAveraging
from lightning_localsgd.algorithms.elastic import ElasticAveraging
from lightning_localsgd.algorithms.gradalign import GradAlign
from lightning_localsgd.algorithms.leader import LeaderSGD
from tests.models import Recorder, TinyNet, flat_params, loader, regression_data, trainer_kwargs

TIMEOUT = timedelta(seconds=60)


class StepLog(Callback):
    """Per batch: the loss Lightning reports, and attributes of the algorithm callbacks."""

    def __init__(self, watch: Callback | None = None, attrs: tuple[str, ...] = ()) -> None:
        self.losses: list[float] = []
        self.attrs: dict[str, list[Any]] = {a: [] for a in attrs}
        self.val_steps: list[int] = []
        self.watch = watch

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(float(outputs["loss"]))
        for a, values in self.attrs.items():
            values.append(getattr(self.watch, a))

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.val_steps.append(trainer.global_step)


def _fit(
    devices: int,
    num_nodes: int,
    algorithms: list[Callback],
    steps: int,
    make: Callable[[], LightningModule] = TinyNet,
    train: DataLoader | None = None,
    val: DataLoader | None = None,
    ckpt_path: str | None = None,
    attrs: tuple[str, ...] = (),
    extra: list[Callback] | None = None,
    strategy: LocalSGDStrategy | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Fit (TinyNet on regression data by default) and return what the tests compare."""
    seed_everything(0)
    model = make()
    rec, log = Recorder(), StepLog(algorithms[-1] if algorithms else None, attrs)
    callbacks = [*algorithms, rec, log, *(extra or [])]
    trainer = Trainer(
        strategy=strategy if strategy is not None else LocalSGDStrategy(timeout=TIMEOUT),
        max_steps=steps,
        callbacks=callbacks,
        **trainer_kwargs(devices, num_nodes, **overrides),
    )
    trainer.fit(model, train if train is not None else loader(regression_data(64)), val, ckpt_path=ckpt_path)
    counters = trainer.strategy.comm.counters
    return {
        "before": [p for p, _ in rec.before_update],
        "grads": [g for _, g in rec.before_update],
        "after": rec.after,
        "losses": log.losses,
        "attrs": log.attrs,
        "val_steps": log.val_steps,
        "val_params": getattr(model, "val_params", []),
        "final": flat_params(model),
        "calls": dict(counters.calls_by_purpose),
        "bytes": dict(counters.bytes_by_purpose),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "training_step_calls": getattr(model, "training_step_calls", None),
    }


# ---------------------------------------------------------------------------------------------- LeaderSGD
def leader_runs(
    out_dir: str,
    devices: int,
    num_nodes: int,
    steps: int,
    configs: list[dict[str, Any]],
    validate: list[bool] | None = None,
) -> list[dict[str, Any]]:
    """One fit of TinyNet (SGD lr 0.1) per LeaderSGD config; optional validation every 3 batches."""
    out = []
    for i, cfg in enumerate(configs):
        val = loader(regression_data(8, seed=1)) if validate and validate[i] else None
        kw = dict(val_check_interval=3, limit_val_batches=1) if val is not None else dict(limit_val_batches=0)
        out.append(_fit(devices, num_nodes, [LeaderSGD(**cfg)], steps, val=val, attrs=("leader",), **kw))
    return out


class SaveAtStep(Callback):
    """``trainer.save_checkpoint`` at the end of batch ``step`` (what ModelCheckpoint(every_n_train_steps) does)."""

    def __init__(self, path: str, step: int, algorithm: LeaderSGD) -> None:
        self.path, self.step, self.algorithm, self.saved_state = path, step, algorithm, None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            self.saved_state = self.algorithm.rank_state_dict()


class RankStateAtStart(Callback):
    def __init__(self, algorithm: LeaderSGD) -> None:
        self.algorithm, self.state = algorithm, None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.state = self.algorithm.rank_state_dict()


def leader_resume(out_dir: str, devices: int, num_nodes: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """16 steps (8 per epoch) uninterrupted, saving after step 8; then resume from it
    (and once more with the per-rank state dropped, to show that it matters)."""
    path = str(Path(out_dir) / "lsgd.ckpt")
    # float64 from construction: Lightning restores a checkpoint before converting the module to
    # float64 ("64-true"), so an fp32-built module would round the restored replica to fp32.
    kw: dict[str, Any] = dict(limit_val_batches=0, make=lambda: TinyNet(momentum=0.9).double())
    algo = LeaderSGD(**cfg)
    saver = SaveAtStep(path, 8, algo)
    full = _fit(devices, num_nodes, [algo], 16, extra=[saver], **kw)
    algo = LeaderSGD(**cfg)
    probe = RankStateAtStart(algo)
    resumed = _fit(devices, num_nodes, [algo], 16, ckpt_path=path, extra=[probe], **kw)
    algo = LeaderSGD(**cfg)
    algo.load_rank_state_dict = lambda state: None  # type: ignore[method-assign]
    dropped = _fit(devices, num_nodes, [algo], 16, ckpt_path=path, **kw)
    return {
        "full": full,
        "resumed": resumed,
        "dropped": dropped,
        "saved_state": saver.saved_state,
        "restored_state": probe.state,
    }


# ---------------------------------------------------------------------------------------------- ElasticAveraging
def elastic_run(out_dir: str, devices: int, num_nodes: int, steps: int, cfg: dict[str, Any]) -> dict[str, Any]:
    algo = ElasticAveraging(**cfg)
    val = loader(regression_data(8, seed=1))
    out = _fit(
        devices,
        num_nodes,
        [algo],
        steps,
        make=partial(TinyNet, momentum=0.5),
        val=val,
        val_check_interval=5,
        limit_val_batches=1,
    )
    out["center"] = torch.cat([c.reshape(-1) for c in algo.center])
    out["state_center"] = algo.state_dict()["anchor"]
    return out


# ---------------------------------------------------------------------------------------------- GradAlign
A = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[2.0, 1.0], [1.0, 3.0]]], dtype=torch.float64)
B = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)


class Quadratic(LightningModule):
    """f_i(x) = ½ (x − b_i)ᵀ A_i (x − b_i) on rank i, x ∈ R² starting at 0; plain SGD."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.lr = lr
        self.training_step_calls = 0

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.training_step_calls += 1
        r = self.x - B[self.global_rank]
        return 0.5 * r @ A[self.global_rank] @ r

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def gradalign_runs(out_dir: str, devices: int, num_nodes: int, beta: float, lr: float) -> dict[str, Any]:
    """Quadratics with GradAlign K = 1 (5 steps) and FedGA K = 3 (7 steps); TinyNet GradAlign(beta=0) vs DDP."""
    data = DataLoader(TensorDataset(torch.zeros(64, 1, dtype=torch.float64)), batch_size=1)
    out: dict[str, Any] = {}
    for name, sync_every, steps in (("k1", 1, 5), ("fedga", 3, 7)):
        ga = GradAlign(beta=beta)
        out[name] = _fit(
            devices,
            num_nodes,
            [PeriodicAveraging(sync_every=sync_every), ga],
            steps,
            make=partial(Quadratic, lr),
            train=data,
            attrs=("alignment",),
            limit_val_batches=0,
        )
    ga = GradAlign(beta=0.0)
    out["beta0"] = _fit(devices, num_nodes, [PeriodicAveraging(sync_every=1), ga], 6, limit_val_batches=0)
    seed_everything(0)
    rec, ddp = Recorder(), TinyNet()
    trainer = Trainer(
        strategy=DDPStrategy(timeout=TIMEOUT),
        max_steps=6,
        callbacks=[rec],
        **trainer_kwargs(devices, num_nodes, limit_val_batches=0),
    )
    trainer.fit(ddp, loader(regression_data(64)))
    out["ddp"] = rec.after
    return out


# ---------------------------------------------------------------------------------------------- plain torch
def shard_batch(step: int, rank: int, world: int, n: int = 64, batch: int = 4) -> tuple[Tensor, Tensor]:
    """Batch ``step`` (0-based) of ``rank``: Lightning shards a training loader with
    DistributedSampler(shuffle=True, seed=0) and calls set_epoch(epoch) every epoch."""
    x, y = regression_data(n).tensors
    sampler = DistributedSampler(TensorDataset(x, y), num_replicas=world, rank=rank, shuffle=True, seed=0)
    per_epoch = len(sampler) // batch
    sampler.set_epoch(step // per_epoch)
    sel = torch.tensor(list(sampler))[(step % per_epoch) * batch : (step % per_epoch + 1) * batch]
    return x[sel], y[sel]


def tinynet_start(momentum: float = 0.0) -> TinyNet:
    seed_everything(0)
    return TinyNet(momentum=momentum).double()
