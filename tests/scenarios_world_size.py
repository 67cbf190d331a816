"""Scenarios of tests/test_world_size.py: save mid-period on one world size, resume on another.

The model is a point ``w`` in R² pulled toward this rank's target ``c_r = (r + 1, 4 − r)``
(loss ½‖w − c_r‖², so the gradient is ``w − c_r``), trained from 0 in float64 with
``SGD(lr=0.5, momentum=0.5)``. Every number on the way is a dyadic fraction, so the test can
compare with hand-computed literals exactly.
"""

from __future__ import annotations

import copy
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_localsgd import DiLoCo, LocalSGDStrategy, PeriodicAveraging
from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from tests.models import FixedBatches, trainer_kwargs

TIMEOUT = timedelta(seconds=60)
LR, MOMENTUM = 0.5, 0.5
ALGORITHMS: dict[str, dict[str, Any]] = {  # name → (class, kwargs); DiLoCo's outer SGD without Nesterov
    "periodic": dict(cls="periodic", sync_every=4),
    "diloco": dict(cls="diloco", sync_every=2, outer_lr=0.5, outer_momentum=0.5, nesterov=False),
    "diloco_overlap": dict(
        cls="diloco", sync_every=2, outer_lr=0.5, outer_momentum=0.5, nesterov=False, overlap_steps=1
    ),
}


def target(rank: int) -> Tensor:
    return torch.tensor([rank + 1.0, 4.0 - rank], dtype=torch.float64)


def build(name: str) -> ConsensusAlgorithm:
    kwargs = dict(ALGORITHMS[name])
    cls = {"periodic": PeriodicAveraging, "diloco": DiLoCo}[kwargs.pop("cls")]
    return cls(**kwargs)


class Pull(LightningModule):
    """``w`` pulled toward the batch's target: loss ½‖w − c‖²."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        c, _ = batch
        return 0.5 * ((self.w - c) ** 2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


class Probe(Callback):
    """What this rank holds when training (re)starts, every step's ``w``, and a checkpoint at ``save_at``."""

    def __init__(self, algorithm: ConsensusAlgorithm, save_at: int | None = None, path: str | None = None) -> None:
        self.algorithm, self.save_at, self.path = algorithm, save_at, path
        self.start: dict[str, Any] = {}
        self.after: list[Tensor] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # optimizer and algorithm state are restored by now (strategy.setup, then restore_training_state)
        state = trainer.optimizers[0].state.get(pl_module.w, {})
        algo = self.algorithm
        self.start = {
            "step": trainer.global_step,
            "w": pl_module.w.detach().clone(),
            "momentum": None if "momentum_buffer" not in state else state["momentum_buffer"].clone(),
            "anchor": None if algo.anchor is None else algo.anchor.clone(),
            "outer": None if not getattr(algo, "outers", None) else copy.deepcopy(algo.outers[0].state_dict()),
            "last_sync_step": algo.last_sync_step,
            "inflight": sorted(algo._inflight),
        }

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.after.append(pl_module.w.detach().clone())
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.path)  # a collective: every rank calls it, rank 0 writes


def fit(
    name: str, devices: int, num_nodes: int, steps: int, probe_kwargs: dict[str, Any], ckpt_path: str | None = None
) -> dict[str, Any]:
    rank = int(os.environ["NODE_RANK"]) * devices + int(os.environ["LOCAL_RANK"])
    c = target(rank)
    algorithm = build(name)
    probe = Probe(algorithm, **probe_kwargs)
    model = Pull()
    trainer = Trainer(
        strategy=LocalSGDStrategy(timeout=TIMEOUT),
        max_steps=steps,
        callbacks=[algorithm, probe],
        use_distributed_sampler=False,
        **trainer_kwargs(devices, num_nodes),
    )
    trainer.fit(model, DataLoader(FixedBatches(c, c, 10_000), batch_size=None), ckpt_path=ckpt_path)
    return {"start": probe.start, "after": torch.stack(probe.after), "final": model.w.detach().clone()}


def save_mid_period(out_dir: str, devices: int, num_nodes: int, ckpt_dir: str, steps: dict[str, int]) -> dict:
    """For each algorithm: train ``steps[name]`` steps and save ``<name>.ckpt`` after the last one
    (before the end of fit closes the period)."""
    out = {}
    for name, save_at in steps.items():
        path = str(Path(ckpt_dir) / f"{name}.ckpt")
        out[name] = fit(name, devices, num_nodes, save_at, dict(save_at=save_at, path=path))
    return out


def resume(out_dir: str, devices: int, num_nodes: int, ckpt_dir: str, steps: dict[str, int]) -> dict:
    """For each algorithm: resume from ``<name>.ckpt`` and train to ``steps[name]``."""
    out = {}
    for name, total in steps.items():
        out[name] = fit(name, devices, num_nodes, total, {}, ckpt_path=str(Path(ckpt_dir) / f"{name}.ckpt"))
    return out
