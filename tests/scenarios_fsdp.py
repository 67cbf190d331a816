"""Scenarios of sharded replicas (``LocalSGDStrategy(within_node="fsdp")``), run on every rank (see tests/launch.py).

The 2 nodes × 2 comparisons with ``within_node="ddp"`` reuse :func:`tests.scenarios_groups.fit_groups`
(``"within": "fsdp"``); this file holds what only sharded replicas have: Lightning's own FSDP2
training as the one-node reference, a user's ``configure_model``, the refusals that need a process
group, and the per-rank state each rank keeps.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightning_localsgd import LocalSGDStrategy
from tests.models import Recorder, TinyNet, flat_params, loader, regression_data, trainer_kwargs

TIMEOUT = timedelta(seconds=60)


class ShardedTinyNet(TinyNet):
    """TinyNet that shards itself in ``configure_model`` the way Lightning's FSDP2 examples do."""

    def __init__(self, how: str = "shard") -> None:
        super().__init__()
        self.how = how

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh
        if self.how == "hsdp":  # the whole 2-D mesh: replicate across nodes at every step (refused)
            fully_shard(self.net, mesh=mesh)
            return
        if self.how == "ddp":  # a DDP wrapper around a submodule (refused)
            self.net = nn.parallel.DistributedDataParallel(self.net)
            return
        dim = "data_parallel" if "data_parallel" in (mesh.mesh_dim_names or ()) else "shard"
        fully_shard(self.net[0], mesh=mesh[dim])
        if self.how == "partial":  # net[2]'s parameters left whole (refused)
            return
        fully_shard(self.net[2], mesh=mesh[dim])
        fully_shard(self.net, mesh=mesh[dim])


class OwnParameter(TinyNet):
    """A LightningModule with a parameter of its own (the shard policy makes it the FSDP root)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((3,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale.sum() * super().forward(x)


class ShardedOwnParameter(OwnParameter):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net[2], mesh=mesh)
        fully_shard(self, mesh=mesh)


def _strategy(name: str) -> Any:
    if name.startswith("model_parallel"):  # Lightning's FSDP2: the data-parallel dimension shards, nothing replicates
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=TIMEOUT)
    return LocalSGDStrategy(timeout=TIMEOUT, within_node="fsdp")


def model_parallel_equivalence(out_dir: str, devices: int, num_nodes: int, steps: int) -> dict[str, Any]:
    """One node of 2: Lightning's ModelParallelStrategy (FSDP2), then within_node='fsdp' with the same
    configure_model, then within_node='fsdp' sharding by its own policy; the same data and seed."""
    out: dict[str, Any] = {}
    cases = (
        ("model_parallel", ShardedTinyNet),
        ("user", ShardedTinyNet),
        ("policy", TinyNet),
        ("model_parallel_own", ShardedOwnParameter),  # a parameter on the LightningModule: it is the root
        ("policy_own", OwnParameter),
    )
    for name, model_cls in cases:
        seed_everything(0)
        model = model_cls().double()
        rec = Recorder()
        trainer = Trainer(  # fp64 model and data; "32-true" because ModelParallelStrategy refuses "64-true"
            strategy=_strategy(name),
            max_steps=steps,
            callbacks=[rec],
            **trainer_kwargs(devices, num_nodes, precision="32-true"),
        )
        trainer.fit(model, loader(regression_data(64)))
        out[name] = torch.stack(rec.after)
        out[name + "_types"] = sorted({type(p).__name__ for p in model.parameters()})
        if not name.startswith("model_parallel"):
            out[name + "_bytes"] = dict(trainer.strategy.comm.counters.bytes_by_purpose)
    return out


def refusals(out_dir: str, devices: int, num_nodes: int) -> dict[str, str]:
    """What fit raises for modules the strategy cannot sync (every rank raises alike, before any sync)."""
    out: dict[str, str] = {}
    cases: dict[str, Any] = {
        "hsdp": lambda: ShardedTinyNet("hsdp"),
        "ddp": lambda: ShardedTinyNet("ddp"),
        "partial": lambda: ShardedTinyNet("partial"),
    }
    for name, make in cases.items():
        seed_everything(0)
        trainer = Trainer(strategy=_strategy("fsdp"), max_steps=1, **trainer_kwargs(devices, num_nodes))
        try:
            trainer.fit(make().double(), loader(regression_data(8)))
            out[name] = ""
        except (TypeError, ValueError) as err:
            out[name] = str(err)
    return out


def validate_after_fit(out_dir: str, devices: int, num_nodes: int) -> dict[str, Any]:
    """fit (2 nodes × 2, H = 4, 6 steps: mid-round at the end), then trainer.validate on the returned model."""
    from tests.scenarios_groups import Batches, node_batch

    rank = int(os.environ.get("NODE_RANK", 0)) * devices + int(os.environ.get("LOCAL_RANK", 0))
    seed_everything(0)
    net = TinyNet().double()
    trainer = Trainer(
        strategy=LocalSGDStrategy(timeout=TIMEOUT, within_node="fsdp", sync_every=4),
        max_steps=6,
        **trainer_kwargs(devices, num_nodes, use_distributed_sampler=False),
    )
    data = torch.utils.data.DataLoader(Batches(rank // devices, rank % devices, devices, 6), batch_size=None)
    trainer.fit(net, data)
    final = flat_params(net)
    val = torch.utils.data.DataLoader([node_batch(99, 0)], batch_size=None)
    trainer.validate(net, val, verbose=False)
    out = {"rank": rank, "final": final, "validated": net.val_params[-1], "after": flat_params(net)}
    # the checkpoint file's consensus loaded into a freshly sharded model (configure_model), validated
    path = os.path.join(out_dir, "final.ckpt")
    trainer.save_checkpoint(path)
    seed_everything(1)
    fresh = ShardedTinyNet().double()
    tester = Trainer(
        strategy=LocalSGDStrategy(timeout=TIMEOUT, within_node="fsdp"),
        **trainer_kwargs(devices, num_nodes, use_distributed_sampler=False),
    )
    tester.validate(fresh, val, ckpt_path=path, verbose=False)
    out["loaded"] = fresh.val_params[-1]
    return out
