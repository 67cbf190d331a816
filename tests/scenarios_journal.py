"""Scenario of tests/test_journal.py: RunJournal's deferred evaluation on 2 gloo ranks."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_localsgd import LocalSGDStrategy, PeriodicAveraging
from recipes.journal import RunJournal
from tests.models import trainer_kwargs


def classification_data(n: int, seed: int) -> TensorDataset:
    """5 features, 3 classes given by the argmax of a fixed linear map plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    y = (x @ w + 0.5 * torch.randn(n, 3, generator=g, dtype=torch.float64)).argmax(1)
    return TensorDataset(x, y)


class TinyClassifier(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(classification_data(40, seed=1), batch_size=16)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Snapshots(Callback):
    """This rank's state after every optimizer step (the reference the journal's copies are checked against)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, Tensor]] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.states[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def deferred(out_dir: str, devices: int, num_nodes: int, steps: int, every: int) -> dict[str, Any]:
    """Fit twice from the same seed, with and without ``RunJournal(evaluate_every=every)``."""
    out: dict[str, Any] = {}
    for with_journal in (True, False):
        seed_everything(0)
        model, snaps = TinyClassifier(), Snapshots()
        callbacks: list[Callback] = [PeriodicAveraging(sync_every=3, overlap_steps=1), snaps]
        journal = RunJournal(f"{out_dir}/journal.json", evaluate_every=every)
        if with_journal:
            callbacks.insert(1, journal)
        trainer = Trainer(
            strategy=LocalSGDStrategy(timeout=timedelta(seconds=60)),
            max_steps=steps,
            callbacks=callbacks,
            **trainer_kwargs(devices, num_nodes, limit_val_batches=0),
        )
        trainer.fit(model, DataLoader(classification_data(64, seed=0), batch_size=4))
        key = "journal" if with_journal else "plain"
        out[key] = {
            "states": snaps.states,
            "records": journal.records,
            "final": {k: v.clone() for k, v in model.state_dict().items()},
        }
    return out
