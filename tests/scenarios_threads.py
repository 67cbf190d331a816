"""Scenario: overlapped training with collectives on the training thread while syncs run in the background."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_localsgd import DiLoCo, LocalSGDStrategy, ReplicaDrift
from tests.models import TinyNet, flat_params, loader, regression_data, trainer_kwargs

TIMEOUT = timedelta(seconds=60)


class Serialize(Callback):
    """Turn the NCCL rule on (or off) on gloo, where the backend would not ask for it."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        trainer.strategy.comm.serialize_threads = self.on


def overlapped(out_dir: str, devices: int, num_nodes: int) -> dict[str, Any]:
    """DiLoCo, 2 fragments, τ = 1, validation every 2 batches with a sync_dist log, ReplicaDrift's all-gather."""
    out: dict[str, Any] = {}
    for on in (False, True):
        seed_everything(0)
        model = TinyNet()
        trainer = Trainer(
            strategy=LocalSGDStrategy(timeout=TIMEOUT),
            callbacks=[DiLoCo(4, fragments=2, overlap_steps=1), ReplicaDrift(), Serialize(on)],
            max_steps=16,
            val_check_interval=2,
            **trainer_kwargs(devices, num_nodes),
        )
        data = loader(regression_data(64))
        trainer.fit(model, data, loader(regression_data(8, seed=1)))
        out[on] = {"params": flat_params(model), "serialized": trainer.strategy.comm.counters.serialized}
    return out
