"""Scenario: what each rank writes when a checkpoint is saved (bytes of the tensors in each file it writes)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_localsgd import AtomicCheckpointIO, LocalSGDStrategy, PeriodicAveraging
from tests.models import TinyNet, loader, regression_data, trainer_kwargs


class CountingIO(AtomicCheckpointIO):
    """Writes as usual and records, per file, the bytes of the tensors it held."""

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[str, int] = {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        sizes: list[int] = []
        apply_to_collection(checkpoint, torch.Tensor, lambda t: sizes.append(t.numel() * t.element_size()))
        self.written[Path(path).name] = sum(sizes)
        super().save_checkpoint(checkpoint, path, storage_options)


def save_once(out_dir: str, devices: int, num_nodes: int) -> dict[str, Any]:
    seed_everything(0)
    io = CountingIO()
    strategy = LocalSGDStrategy(timeout=timedelta(seconds=60), checkpoint_io=io)
    trainer = Trainer(
        strategy=strategy, callbacks=[PeriodicAveraging(4)], max_steps=2, **trainer_kwargs(devices, num_nodes)
    )
    trainer.fit(TinyNet(momentum=0.9), loader(regression_data(32)))
    trainer.save_checkpoint(Path(out_dir) / "ckpt")  # mid-period: the replicas differ
    return {"written": io.written}
