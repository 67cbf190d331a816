"""Scenarios run on every rank by the multi-process tests of the strategy (see tests/launch.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.strategies import DDPStrategy

from lightning_localsgd import LocalSGDStrategy
from tests.models import Recorder, TinyNet, loader, regression_data, trainer_kwargs

TIMEOUT = timedelta(seconds=60)


def ddp_equivalence(out_dir: str, devices: int, num_nodes: int, steps: int, localsgd: dict[str, Any]) -> dict[str, Any]:
    """Train TinyNet with Lightning DDP, then with LocalSGDStrategy(**localsgd), same data and seed."""
    out: dict[str, Any] = {}
    for name in ("ddp", "localsgd"):
        seed_everything(0)
        model = TinyNet()
        rec = Recorder()
        strategy = DDPStrategy(timeout=TIMEOUT) if name == "ddp" else LocalSGDStrategy(timeout=TIMEOUT, **localsgd)
        trainer = Trainer(strategy=strategy, max_steps=steps, callbacks=[rec], **trainer_kwargs(devices, num_nodes))
        trainer.fit(model, loader(regression_data(64)))
        out[name] = torch.stack(rec.after)
        if name == "localsgd":
            counters = trainer.strategy.comm.counters
            out["calls"] = dict(counters.calls_by_kind)
            out["bytes"] = dict(counters.bytes_by_kind)
            out["final"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return out
