"""Scenarios run on every rank by the multi-process tests of the strategy (see tests/launch.py)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.strategies import DDPStrategy

from lightning_localsgd import LocalSGDStrategy
from lightning_localsgd.resume import read_parts
from tests.models import Recorder, TinyNet, loader, regression_data, trainer_kwargs

TIMEOUT = timedelta(seconds=60)


class ManualTinyNet(TinyNet):
    """TinyNet with manual optimization: zero_grad, manual_backward, step."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        opt.step()


def ddp_equivalence(
    out_dir: str,
    devices: int,
    num_nodes: int,
    steps: int,
    localsgd: dict[str, Any],
    manual: bool = False,
    trainer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train TinyNet with Lightning DDP, then with LocalSGDStrategy(**localsgd), same data and seed."""
    out: dict[str, Any] = {}
    overrides = trainer or {}
    for name in ("ddp", "localsgd"):
        seed_everything(0)
        model = ManualTinyNet() if manual else TinyNet()
        rec = Recorder()
        strategy = DDPStrategy(timeout=TIMEOUT) if name == "ddp" else LocalSGDStrategy(timeout=TIMEOUT, **localsgd)
        trainer = Trainer(
            strategy=strategy, max_steps=steps, callbacks=[rec], **trainer_kwargs(devices, num_nodes, **overrides)
        )
        trainer.fit(model, loader(regression_data(64)))
        out[name] = torch.stack(rec.after)
        if name == "localsgd":
            counters = trainer.strategy.comm.counters
            out["calls"] = dict(counters.calls_by_purpose)
            out["bytes"] = dict(counters.bytes_by_purpose)
            out["final"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return out


def least_squares_shards(d: int = 40, m: int = 4, world: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Overparameterized, heterogeneous least squares: rank i's features live mostly on its own coordinates."""
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    block = d // world
    for i in range(world):
        x = 0.3 * torch.randn(m, d, generator=g, dtype=torch.float64)
        x[:, i * block : (i + 1) * block] += torch.randn(m, block, generator=g, dtype=torch.float64)
        xs.append(x)
        ys.append(torch.randn(m, generator=g, dtype=torch.float64))
    return xs, ys


def local_gd_least_squares(out_dir: str, devices: int, num_nodes: int, runs: list[tuple[int, int]], lr: float) -> dict:
    """Full-batch GD from zero on this rank's shard with PeriodicAveraging(H) for each (H, steps)."""
    from torch.utils.data import DataLoader

    from lightning_localsgd import PeriodicAveraging
    from tests.models import FixedBatches, LeastSquares

    rank = int(os.environ["NODE_RANK"]) * devices + int(os.environ["LOCAL_RANK"])
    xs, ys = least_squares_shards(world=devices * num_nodes)
    out = {}
    for H, steps in runs:
        model = LeastSquares(xs[0].shape[1], lr)
        data = DataLoader(FixedBatches(xs[rank], ys[rank], steps), batch_size=None)
        trainer = Trainer(
            strategy=LocalSGDStrategy(timeout=TIMEOUT),
            max_steps=steps,
            callbacks=[PeriodicAveraging(sync_every=H)],
            use_distributed_sampler=False,
            **trainer_kwargs(devices, num_nodes),
        )
        trainer.fit(model, data)
        out[H] = model.w.detach().clone()
    return out


def record_run(
    out_dir: str,
    devices: int,
    num_nodes: int,
    steps: int,
    algorithm: dict[str, Any] | None = None,
    strategy: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    nan_at: tuple[int, int] | None = None,
    monitors: bool = False,
) -> dict[str, Any]:
    """Train TinyNet on this rank's shard and record parameters/grads/buffers around every step.

    ``nan_at=(rank, step)`` puts a NaN into that rank's replica during that step's backward.
    Returns the records, the communication counters, and the error message if training raised.
    """
    from lightning.pytorch import Callback

    from lightning_localsgd import CommStats, PeriodicAveraging, ReplicaDrift

    seed_everything(0)
    net = TinyNet(**(model or {}))
    rec = Recorder()
    callbacks: list[Callback] = [rec]
    if algorithm is not None:
        callbacks.append(PeriodicAveraging(**algorithm))
    drift, drifts = ReplicaDrift(), []
    if monitors:

        class Keep(Callback):
            def on_train_batch_end(self, *args: Any) -> None:
                drifts.append(dict(drift.last))

        callbacks += [drift, CommStats(), Keep()]
    if nan_at is not None:
        bad_rank, bad_step = nan_at

        class Poison(Callback):
            def on_before_optimizer_step(self, trainer: Trainer, pl_module: Any, optimizer: Any) -> None:
                if trainer.global_rank == bad_rank and trainer.global_step + 1 == bad_step:
                    next(pl_module.parameters()).grad[0, 0] = float("nan")

        callbacks.append(Poison())
    trainer = Trainer(
        strategy=LocalSGDStrategy(timeout=TIMEOUT, **(strategy or {})),
        max_steps=steps,
        callbacks=callbacks,
        **trainer_kwargs(devices, num_nodes),
    )
    error = None
    try:
        trainer.fit(net, loader(regression_data(16 * devices * num_nodes), batch_size=4))
    except Exception as exc:  # the test inspects it
        error = f"{type(exc).__name__}: {exc}"
    counters = trainer.strategy.comm.counters
    return {
        "before_update": rec.before_update,
        "after": rec.after,
        "buffers_before": rec.buffers_before,
        "buffers_after": rec.buffers_after,
        "calls": dict(counters.calls_by_purpose),
        "bytes": dict(counters.bytes_by_purpose),
        "drifts": drifts,
        "logged": {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("comm/")},
        "error": error,
        "lr": net.lr,
        "final": [p.detach().clone() for p in net.parameters()],
    }


def resume_and_evaluate(out_dir: str, devices: int, num_nodes: int, steps: int, sync_every: int) -> dict[str, Any]:
    """Four fits of TinyNet (SGD momentum 0.9, a shuffled shard of one batch per epoch, so that a step is
    an epoch and Lightning's data-order bookkeeping on resume cannot shift batches):

    * ``full``: validation and a checkpoint after every step (= every epoch);
    * ``plain``: the same without validation or checkpoints (the trajectory must not change);
    * ``resumed_<s>``: resumed from the checkpoint written after step ``s`` (mid-period and at a sync).
    """
    from pathlib import Path

    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_localsgd import PeriodicAveraging

    ckpt_dir = Path(out_dir) / "ckpts"
    data = regression_data(4 * devices * num_nodes)
    out: dict[str, Any] = {}

    def fit(
        name: str, validate: bool, save: bool, ckpt_path: str | None = None, comm_dtype: str | None = None
    ) -> TinyNet:
        seed_everything(0)
        model = TinyNet(momentum=0.9).double()  # built in float64 so loading a checkpoint does not round
        rec = Recorder()
        callbacks: list[Any] = [rec, PeriodicAveraging(sync_every=sync_every)]
        if save:
            callbacks.append(
                ModelCheckpoint(dirpath=ckpt_dir / name, filename="{step}", save_top_k=-1, every_n_epochs=1)
            )
        kwargs = trainer_kwargs(devices, num_nodes, enable_checkpointing=save)
        trainer = Trainer(
            strategy=LocalSGDStrategy(timeout=TIMEOUT, comm_dtype=comm_dtype),
            max_steps=steps,
            callbacks=callbacks,
            limit_val_batches=1.0 if validate else 0,
            **kwargs,
        )
        trainer.fit(
            model,
            loader(data, batch_size=4, shuffle=True),
            loader(data, batch_size=4) if validate else None,
            ckpt_path=ckpt_path,
        )
        out[name] = {
            "after": torch.stack(rec.after),
            "val_params": model.val_params,
            "final": flat(model),
            "seen": model.seen,
        }
        return model

    def flat(model: TinyNet) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])

    fit("full", validate=True, save=True)
    fit("plain", validate=False, save=False)
    for s in (4, 6):
        fit(f"resumed_{s}", validate=False, save=False, ckpt_path=str(ckpt_dir / "full" / f"step={s}.ckpt"))
    out["checkpoints"] = {}
    for s in (3, 4, 6):  # the file, with every rank's part beside it (lightning_localsgd/resume.py)
        path = ckpt_dir / "full" / f"step={s}.ckpt"
        out["checkpoints"][s] = dict(torch.load(path, weights_only=False), parts=read_parts(path))
    # the bf16 transport keeps an anchor: it must come back from the checkpoint too
    fit("bf16_full", validate=False, save=True, comm_dtype="bfloat16")
    fit("bf16_resumed_4", False, False, str(ckpt_dir / "bf16_full" / "step=4.ckpt"), comm_dtype="bfloat16")
    return out
