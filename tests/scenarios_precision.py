"""Scenario: every algorithm under bf16-mixed and 16-mixed (CPU autocast, a CPU GradScaler) against its fp32 run."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import MixedPrecision as FabricMixedPrecision
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import TensorDataset

from lightning_localsgd import (
    DiLoCo,
    ElasticAveraging,
    GradAlign,
    LeaderSGD,
    LocalSGDStrategy,
    ModifiedLocalGD,
    PeriodicAveraging,
)
from lightning_localsgd.fabric import LocalSGDStrategy as FabricLocalSGDStrategy
from tests.models import TinyNet, flat_params, loader, regression_data, trainer_kwargs

TIMEOUT = timedelta(seconds=60)
STEPS = 12
SETUPS: dict[str, Any] = {
    "periodic": lambda: [PeriodicAveraging(4)],
    "diloco": lambda: [DiLoCo(4, outer_lr=0.7)],
    "modified_localgd": lambda: [ModifiedLocalGD(4, prox=2.0)],  # a large λ: a lost term would show
    "lsgd": lambda: [LeaderSGD(4, pull=0.5)],
    "easgd": lambda: [ElasticAveraging(4, alpha=0.5)],
    "gradalign": lambda: [PeriodicAveraging(1), GradAlign(beta=0.05)],  # no fp16 (refused): bf16 only
}


def scaler() -> torch.amp.GradScaler:
    """2**10, not the default 2**16: at 2**16 the first steps overflow and are skipped, which is the
    scaler working as designed but makes a 12-step run incomparable with fp32."""
    return torch.amp.GradScaler("cpu", init_scale=2.0**10)


def shard(rank: int) -> TensorDataset:
    x, y = regression_data(64, seed=rank).tensors
    return TensorDataset(x.float(), y.float())


def precision_kwargs(precision: str) -> dict[str, Any]:
    if precision == "16-mixed":  # Lightning turns "16-mixed" on CPU into bf16: give the plugin itself
        return {"precision": None, "plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler())]}
    return {"precision": precision}


def runs(out_dir: str, devices: int, num_nodes: int, precisions: list[str]) -> dict[str, Any]:
    """The Trainer runs, then the Fabric runs, in one launch."""
    return {"trainer": trainer_runs(devices, num_nodes, precisions), "fabric": fabric_runs(devices, num_nodes)}


def trainer_runs(devices: int, num_nodes: int, precisions: list[str]) -> dict[str, Any]:
    rank = int(os.environ["NODE_RANK"]) * devices + int(os.environ["LOCAL_RANK"])
    out: dict[str, Any] = {}
    for name, make in SETUPS.items():
        for precision in precisions:
            if name == "gradalign" and precision == "16-mixed":
                continue
            seed_everything(0)
            model = TinyNet(lr=0.05)
            start = flat_params(model)
            kwargs = trainer_kwargs(devices, num_nodes, max_steps=STEPS, **precision_kwargs(precision))
            trainer = Trainer(strategy=LocalSGDStrategy(timeout=TIMEOUT), callbacks=make(), **kwargs)
            trainer.fit(model, loader(shard(rank)))
            out[f"{name}/{precision}"] = {"start": start, "end": flat_params(model)}
    return out


def fabric_runs(devices: int, num_nodes: int) -> dict[str, Any]:
    """Fabric with fp16 loss scaling (GradScaler refuses a closure: the strategy runs it first)."""
    out: dict[str, Any] = {}
    for name, make in (
        ("periodic", lambda: PeriodicAveraging(4)),
        ("modified_localgd", lambda: ModifiedLocalGD(4, prox=2.0)),
    ):
        for precision in ("32-true", "16-mixed"):
            seed_everything(0)
            plugins = [FabricMixedPrecision("16-mixed", "cpu", scaler=scaler())] if precision == "16-mixed" else []
            strategy = FabricLocalSGDStrategy(algorithm=make(), timeout=TIMEOUT)
            fabric = Fabric(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy=strategy, plugins=plugins)
            fabric.launch()
            model = TinyNet(lr=0.05)
            start = flat_params(model)
            module, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.05))
            x, y = shard(fabric.global_rank).tensors
            for step in range(STEPS):
                i = (step * 4) % len(x)
                loss = torch.nn.functional.mse_loss(module(x[i : i + 4]), y[i : i + 4])
                fabric.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            strategy.finalize()
            out[f"{name}/{precision}"] = {"start": start, "end": flat_params(model)}
    return out
