"""Scenario: process groups a strategy creates are destroyed at its teardown (no pile-up over a sweep of fits)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist
from lightning.pytorch import Trainer, seed_everything

from lightning_localsgd import AsyncLocalSGDStrategy, LocalSGDStrategy, PeriodicAveraging
from tests.models import TinyNet, loader, regression_data, trainer_kwargs

TIMEOUT = timedelta(seconds=60)


def live_groups() -> int:
    """Process groups this rank holds (the default one included): torch's own registry."""
    return len(dist.distributed_c10d._world.pg_map)  # a private table: the only count torch keeps


def fits(out_dir: str, devices: int, num_nodes: int) -> dict[str, Any]:
    out: dict[str, list[int]] = {"during": [], "after": []}

    class Count(PeriodicAveraging):  # counts the groups while the fit holds them
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            out["during"].append(live_groups())

    for strategy, callbacks in (
        (LocalSGDStrategy(timeout=TIMEOUT), [Count(2, overlap_steps=1)]),  # node groups + the background group
        (LocalSGDStrategy(timeout=TIMEOUT), [Count(2, overlap_steps=1)]),
        (AsyncLocalSGDStrategy(sync_every=2, timeout=TIMEOUT), []),  # + the server's gloo group
    ):
        seed_everything(0)
        trainer = Trainer(strategy=strategy, max_steps=4, callbacks=callbacks, **trainer_kwargs(devices, num_nodes))
        trainer.fit(TinyNet(), loader(regression_data(32)))
        out["after"].append(live_groups())
    return out
