"""Scenarios of the DiLoCo and ModifiedLocalGD tests, run on every rank (see tests/launch.py)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_localsgd import LocalSGDStrategy, PeriodicAveraging
from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.algorithms.diloco import DiLoCo
from lightning_localsgd.algorithms.modified_localgd import ModifiedLocalGD
from tests.models import FixedBatches, LeastSquares, Recorder, TinyNet, regression_data, trainer_kwargs

TIMEOUT = timedelta(seconds=60)
ALGORITHMS: dict[str, type[ConsensusAlgorithm]] = {
    "periodic": PeriodicAveraging,
    "diloco": DiLoCo,
    "modified_localgd": ModifiedLocalGD,
}


def this_rank(devices: int) -> int:
    return int(os.environ["NODE_RANK"]) * devices + int(os.environ["LOCAL_RANK"])


def full_batches(x: Tensor, y: Tensor, steps: int) -> DataLoader:
    return DataLoader(FixedBatches(x, y, steps), batch_size=None)


def fit(
    model: LightningModule,
    algorithm: ConsensusAlgorithm,
    data: DataLoader,
    steps: int,
    devices: int,
    num_nodes: int,
    callbacks: tuple[Callback, ...] | list[Callback] = (),
    ckpt_path: str | None = None,
) -> Trainer:
    trainer = Trainer(
        strategy=LocalSGDStrategy(timeout=TIMEOUT),
        max_steps=steps,
        callbacks=[algorithm, *callbacks],
        use_distributed_sampler=False,
        **trainer_kwargs(devices, num_nodes),
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


# ---------------------------------------------------------------------------------------- DiLoCo
def least_squares_shard(rank: int, d: int = 4, m: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(m, d, generator=g, dtype=torch.float64), torch.randn(m, generator=g, dtype=torch.float64)


def diloco_least_squares(
    out_dir: str, devices: int, num_nodes: int, steps: int, lr: float, algorithm: dict[str, Any]
) -> dict[str, Any]:
    """Full-batch GD from w = 0 on this rank's least-squares shard under DiLoCo(**algorithm)."""
    x, y = least_squares_shard(this_rank(devices))
    model, rec = LeastSquares(x.shape[1], lr), Recorder()
    trainer = fit(model, DiLoCo(**algorithm), full_batches(x, y, steps), steps, devices, num_nodes, [rec])
    return {
        "after": torch.stack(rec.after),  # before the end-of-fit outer step
        "final": model.w.detach().clone(),
        "calls": dict(trainer.strategy.comm.counters.calls_by_purpose),
    }


def compare_algorithms(
    out_dir: str, devices: int, num_nodes: int, steps: int, runs: dict[str, tuple[str, dict[str, Any]]]
) -> dict[str, Any]:
    """TinyNet (BatchNorm, SGD momentum) on this rank's mini-batches under each named algorithm."""
    out: dict[str, Any] = {}
    data = regression_data(16, seed=this_rank(devices))
    for name, (algorithm, kwargs) in runs.items():
        seed_everything(0)
        model, rec = TinyNet(momentum=0.9, batchnorm=True), Recorder()
        loader = DataLoader(data, batch_size=4)
        trainer = fit(model, ALGORITHMS[algorithm](**kwargs), loader, steps, devices, num_nodes, [rec])
        out[name] = torch.stack(rec.after)
        out[name + "_buffers"] = torch.cat([b.reshape(-1) for b in model.buffers() if b.is_floating_point()])
        out[name + "_calls"] = dict(trainer.strategy.comm.counters.calls_by_purpose)
    return out


class SaveAt(Callback):
    """Writes ``step{k}.ckpt`` after optimizer step k, for every k in ``steps`` (a collective)."""

    def __init__(self, steps: tuple[int, ...], folder: str) -> None:
        self.steps, self.folder = steps, folder

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step in self.steps:
            trainer.save_checkpoint(str(Path(self.folder) / f"step{trainer.global_step}.ckpt"))


def resume(
    out_dir: str,
    devices: int,
    num_nodes: int,
    steps: int,
    save_at: tuple[int, ...],
    algorithm: str,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """Train ``steps`` steps saving checkpoints at ``save_at``; then resume from each checkpoint.

    Returns this rank's parameters after every step of each run, and the algorithm's per-rank
    correction q_i (ModifiedLocalGD) at the end of each run.
    """
    x, y = regression_data(12, seed=this_rank(devices)).tensors
    out: dict[str, Any] = {}
    for start in (0, *save_at):
        seed_everything(0)
        # float64 before the checkpoint is loaded: Lightning restores weights before precision="64-true" converts
        model, rec, alg = TinyNet(momentum=0.9).double(), Recorder(), ALGORITHMS[algorithm](**kwargs)
        saver = SaveAt(save_at if start == 0 else (), out_dir)
        ckpt = str(Path(out_dir) / f"step{start}.ckpt") if start else None
        fit(model, alg, full_batches(x, y, 10_000), steps, devices, num_nodes, [rec, saver], ckpt_path=ckpt)
        out[start] = torch.stack(rec.after)
        out[f"q{start}"] = torch.cat([q.reshape(-1) for q in alg._q]) if getattr(alg, "_q", None) else None
        if start == 0:  # what the first checkpoint stores as the model: the replicas' average
            out["ckpt_state"] = torch.load(Path(out_dir) / f"step{save_at[0]}.ckpt", weights_only=False)["state_dict"]
    return out


# ------------------------------------------------------------------------------- ModifiedLocalGD
def separable_shards(world: int = 2, d: int = 30, m: int = 10, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Unit-norm points, labelled ±1 by a common hyperplane through 0; each rank's cloud has its own mean."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=g, dtype=torch.float64)
    shards = []
    for _ in range(world):
        mu = 2.0 * torch.randn(d, generator=g, dtype=torch.float64)
        x = torch.randn(m, d, generator=g, dtype=torch.float64) + mu
        x = x / x.norm(dim=1, keepdim=True)
        shards.append((x, torch.sign(x @ w_star)))
    return shards


def logistic_loss(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Mean logistic loss (1/m) Σ_j log(1 + exp(−y_j w·x_j)) of a linear classifier without bias."""
    return nn.functional.softplus(-y * (x @ w)).mean()


class LogisticRegression(LightningModule):
    def __init__(self, d: int, lr: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return logistic_loss(self.w, *batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def modified_localgd_logistic(
    out_dir: str, devices: int, num_nodes: int, rounds: int, local_steps: int, prox: float, lr: float
) -> dict[bool, Tensor]:
    """Full-batch GD on this rank's separable shard under ModifiedLocalGD, with and without correction."""
    x, y = separable_shards(world=devices * num_nodes)[this_rank(devices)]
    out = {}
    for correction in (True, False):
        model = LogisticRegression(x.shape[1], lr)
        steps = rounds * local_steps
        fit(model, ModifiedLocalGD(local_steps, prox, correction), full_batches(x, y, steps), steps, devices, num_nodes)
        out[correction] = model.w.detach().clone()
    return out
