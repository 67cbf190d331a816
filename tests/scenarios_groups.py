"""Scenarios of replica groups (``LocalSGDStrategy(within_node="ddp")``), run on every rank (see tests/launch.py).

The data is laid out so that a node of k ranks sees exactly what one process of a per-process run
would see with a k times larger batch: replica r's batch at step t is ``node_batch(r, t)`` (8
rows), and local rank j of a node takes rows ``[j·8/k, (j+1)·8/k)`` of its node's batch. With the
mean-squared-error loss, DDP's average of the k slice gradients is the gradient of the whole
batch, so ``within_node="ddp"`` on 2 nodes × 2 ranks must equal per-process local SGD on 2 ranks
with batches of 8 (up to float64 rounding).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_localsgd import (
    CommStats,
    DiLoCo,
    ElasticAveraging,
    LocalSGDStrategy,
    ModifiedLocalGD,
    PeriodicAveraging,
    ReplicaDrift,
)
from lightning_localsgd.transport.collectives import Collectives, Group
from lightning_localsgd.transport.replicas import node_groups, replica_group
from lightning_localsgd.transport.tensors import local
from tests.models import Recorder, TinyNet, flat_params, trainer_kwargs

TIMEOUT = timedelta(seconds=60)
NODE_BATCH = 8
D_IN = 5


def node_batch(replica: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 rows replica ``replica`` trains on at step ``t`` (0-based), in float64."""
    g = torch.Generator().manual_seed(1000 * replica + t)
    x = torch.randn(NODE_BATCH, D_IN, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1)) + 0.1 * torch.randn(NODE_BATCH, generator=g, dtype=torch.float64)
    return x, y


class Batches(torch.utils.data.IterableDataset):
    """Rows ``part`` of ``parts`` of replica ``replica``'s batch at each step (an epoch of ``steps`` batches)."""

    def __init__(self, replica: int, part: int, parts: int, steps: int) -> None:
        self.replica, self.part, self.parts, self.steps = replica, part, parts, steps

    def __iter__(self):
        rows = NODE_BATCH // self.parts
        for t in range(self.steps):
            x, y = node_batch(self.replica, t)
            yield x[self.part * rows : (self.part + 1) * rows], y[self.part * rows : (self.part + 1) * rows]

    def __len__(self) -> int:
        return self.steps


class Initial(Callback):
    """The parameters when training starts (after the initial broadcast)."""

    def __init__(self) -> None:
        self.params: torch.Tensor | None = None
        self.wrapper = ""  # the class of the strategy's model while training

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.params = flat_params(pl_module)
        self.wrapper = type(trainer.strategy.model).__name__


def _algorithm(name: str, kwargs: dict[str, Any]) -> Any:
    classes = {
        "periodic": PeriodicAveraging,
        "diloco": DiLoCo,
        "modified_localgd": ModifiedLocalGD,
        "easgd": ElasticAveraging,
    }
    return classes[name](**kwargs)


def fit_groups(
    out_dir: str,
    devices: int,
    num_nodes: int,
    runs: list[dict[str, Any]],
) -> dict[str, Any]:
    """Fit TinyNet once per entry of ``runs`` and record it.

    Each run: ``name``, ``groups`` (within_node=``within``, default "ddp"; else one replica per process), ``algorithm``
    and ``kwargs`` (PeriodicAveraging or DiLoCo), ``steps``, optional ``strategy`` (more
    LocalSGDStrategy arguments), ``trainer`` (Trainer arguments),
    ``epoch`` (batches per epoch, default ``steps``), ``resume_at`` (a checkpoint written at that
    step into ``checkpoint_dir``, resumed by a new Trainer to ``steps``), ``resume_from`` (resume
    that checkpoint), ``val_every`` (validate every that many steps), ``monitors``.
    """
    rank = int(os.environ.get("NODE_RANK", 0)) * devices + int(os.environ.get("LOCAL_RANK", 0))
    out: dict[str, Any] = {"rank": rank}
    for run in runs:
        out[run["name"]] = _fit_one(run, rank, devices, num_nodes, out_dir)
    return out


def _fit_one(run: dict[str, Any], rank: int, devices: int, num_nodes: int, out_dir: str) -> dict[str, Any]:
    groups = run.get("groups", True)
    replica, part, parts = (rank // devices, rank % devices, devices) if groups else (rank, 0, 1)
    data = Batches(replica, part, parts, run.get("epoch", run["steps"]))

    within = run.get("within", "ddp") if groups else None

    def trainer_for(max_steps: int, callbacks: list[Callback]) -> Trainer:
        strategy = LocalSGDStrategy(timeout=TIMEOUT, within_node=within, **run.get("strategy", {}))
        return Trainer(
            strategy=strategy,
            max_steps=max_steps,
            callbacks=callbacks,
            **trainer_kwargs(
                devices, num_nodes, use_distributed_sampler=False, enable_checkpointing=True, **run.get("trainer", {})
            ),
        )

    seed_everything(0)
    out: dict[str, Any] = {}
    rec, init = Recorder(), Initial()
    drift = ReplicaDrift()
    drifts: list[dict[str, float]] = []

    class Keep(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            drifts.append(dict(drift.last))

    algorithm = _algorithm(run["algorithm"], run["kwargs"])
    held: dict[str, int] = {"inflight_sent": 0}  # the values the algorithm holds (sharded replicas: per shard)

    class Held(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            sent = sum(f.sent.numel() for f in getattr(algorithm, "_inflight", {}).values())
            held["inflight_sent"] = max(held["inflight_sent"], sent)

    callbacks: list[Callback] = [rec, init, algorithm, Held()]
    if run.get("monitors"):
        callbacks += [drift, CommStats(), Keep()]
    net = TinyNet().double()  # fp64 before a checkpoint is loaded into it (64-true converts later)
    resume_at, checkpoints = run.get("resume_at"), run.get("checkpoint_dir", out_dir)
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    if run.get("resume_from"):  # another world size's checkpoint
        trainer = trainer_for(run["steps"], callbacks)
        trainer.fit(net, loader, ckpt_path=run["resume_from"])
    elif run.get("val_every"):  # validation on the consensus every val_every steps (one batch)
        run = {**run, "trainer": {"val_check_interval": run["val_every"], "check_val_every_n_epoch": None}}
        trainer = trainer_for(run["steps"], callbacks)
        trainer.fit(net, loader, torch.utils.data.DataLoader([node_batch(99, 0)], batch_size=None))
    elif resume_at is None:
        trainer = trainer_for(run["steps"], callbacks)
        trainer.fit(net, loader)
    else:  # a checkpoint written while training at step resume_at, resumed by a new Trainer and model
        saver = ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=resume_at, save_top_k=-1)
        straight = trainer_for(run["steps"], [*callbacks, saver])
        straight.fit(net, loader)
        seed_everything(1)  # the resumed run must not depend on the RNG
        net, resumed = TinyNet().double(), Recorder()
        trainer = trainer_for(run["steps"], [resumed, _algorithm(run["algorithm"], run["kwargs"])])
        trainer.fit(net, loader, ckpt_path=Path(checkpoints) / f"epoch=0-step={resume_at}.ckpt")
        out["resumed"] = torch.stack(resumed.after)  # the steps after resume_at, to compare with the straight run's
    counters = trainer.strategy.comm.counters
    out.update(
        {
            "initial": init.params,
            "after": torch.stack(rec.after),
            "final": flat_params(net),
            "bytes": dict(counters.bytes_by_purpose),
            "calls": dict(counters.calls_by_purpose),
            "drifts": drifts,
            "wrapped": init.wrapper,
            "replicas": trainer.strategy.replica_group.size,
            "val_params": list(net.val_params),
            "shard_numel": sum(local(p).numel() for p in net.parameters()),
            "tuning": algorithm.tuning_record,
            "comm_dtype": str(trainer.strategy.comm.comm_dtype),
            "held": {
                **held,
                "anchor": 0 if algorithm.anchor is None else algorithm.anchor.numel(),
                "residual": 0 if algorithm.residual is None else algorithm.residual.numel(),
                "outer": sum(
                    v.numel()
                    for o in getattr(algorithm, "outers", [])
                    if o is not None
                    for state in o.state.values()
                    for v in state.values()
                    if torch.is_tensor(v) and v.dim() > 0
                ),
            },
        }
    )
    return out


def split_means(out_dir: str, devices: int, num_nodes: int, n: int, nan_slice: int | None = None) -> dict[str, Any]:
    """The transport alone: means over a replica group (split) and over the plain cross group (whole buffer).

    Every rank of node v holds the same values ``x_v`` (float64); ``nan_slice`` puts a NaN into
    that slice of node 1's values (as seen by every rank of node 1) for the ``nonfinite`` checks.
    """
    world, rank = devices * num_nodes, int(os.environ["NODE_RANK"]) * devices + int(os.environ["LOCAL_RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        created: list[Group] = []
        node = node_groups(world, num_nodes, rank, TIMEOUT, created=created)
        groups = replica_group(world, num_nodes, rank, node, TIMEOUT, created)
        cross = Group(groups.handle, groups.ranks, groups.rank)
        v = rank // devices
        g = torch.Generator().manual_seed(v)
        x = torch.randn(n, dtype=torch.float64, generator=g)
        anchor = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(99))
        out: dict[str, Any] = {"rank": rank, "node": v, "x": x.clone(), "anchor": anchor.clone()}
        for label, dtype in (("fp64", None), ("bf16", "bfloat16"), ("int8", "int8")):
            results = {}
            for name, group in (("split", groups), ("whole", cross)):
                comm = Collectives(comm_dtype=dtype)
                t = x.clone()
                residual = torch.zeros(n, dtype=torch.float64) if dtype == "int8" else None
                comm.mean_([t], group, anchor=None if dtype is None else anchor, residual=residual)
                results[name] = {
                    "mean": t,
                    "residual": residual,
                    "bytes": dict(comm.counters.bytes_by_purpose),
                    "calls": dict(comm.counters.calls_by_purpose),
                }
            out[label] = results
        # the background path (start_mean) over the replica group
        comm = Collectives()
        out["background"] = comm.start_mean(x.clone(), groups).wait()
        comm.close()
        if nan_slice is not None:
            bad = x.clone()
            chunk = -(-n // devices)
            if v == 1:
                bad[nan_slice * chunk] = float("nan")
            verdicts = {}
            for policy in ("skip", "raise"):
                t = bad.clone()
                try:
                    Collectives().mean_([t], groups, nonfinite=policy)
                    verdicts[policy] = t
                except FloatingPointError as err:
                    verdicts[policy] = str(err)
            out["nonfinite"] = verdicts
        for group in created:
            dist.destroy_process_group(group.handle)
        return out
    finally:
        dist.destroy_process_group()


def fabric_groups(out_dir: str, devices: int, num_nodes: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs of :func:`fit_groups` (``groups`` only) as a Fabric loop under Fabric's ``within_node="ddp"``."""
    from lightning.fabric import Fabric

    from lightning_localsgd import fabric as localsgd_fabric

    rank = int(os.environ.get("NODE_RANK", 0)) * devices + int(os.environ.get("LOCAL_RANK", 0))
    out: dict[str, Any] = {"rank": rank}
    for run in runs:
        seed_everything(0)
        model = TinyNet().double()
        optimizer = model.configure_optimizers()
        strategy = localsgd_fabric.LocalSGDStrategy(
            algorithm=_algorithm(run["algorithm"], run["kwargs"]), timeout=TIMEOUT, within_node="ddp"
        )
        fabric = Fabric(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy=strategy, precision="64-true")
        fabric.launch()
        model, optimizer = fabric.setup(model, optimizer)
        wrapper = type(model._forward_module).__name__
        after = []
        for x, y in Batches(rank // devices, rank % devices, devices, run["steps"]):
            with fabric.autocast():  # 64-true: the output stays float64 inside (as under the Trainer)
                loss = torch.nn.functional.mse_loss(model(x), y)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            after.append(flat_params(model))
        out[run["name"]] = {"after": torch.stack(after), "wrapped": wrapper}
        strategy.teardown()
    return out


def wire_main(out_dir: str, n: int, syncs: int) -> None:
    """One rank of a replica-group mean on two simulated nodes (``python -m tests.scenarios_groups``).

    Started by ``recipes.launch.run_local_ranks(..., node_namespaces=True)`` as 2 nodes × 2; writes its
    ``CommCounters`` to ``out_dir/rank<r>.json`` so the test can hold them against the interfaces' counters.
    """
    import json

    world, per_node = int(os.environ["WORLD_SIZE"]), 2
    rank = int(os.environ["NODE_RANK"]) * per_node + int(os.environ["LOCAL_RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    created: list[Group] = []
    node = node_groups(world, world // per_node, rank, TIMEOUT, created=created)
    groups = replica_group(world, world // per_node, rank, node, TIMEOUT, created)
    comm = Collectives()
    x = torch.full((n,), float(rank // per_node))
    for _ in range(syncs):
        comm.mean_([x], groups)
    assert torch.equal(x, torch.full((n,), 0.5))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(dict(comm.counters.bytes_by_purpose)))
    for group in created:
        dist.destroy_process_group(group.handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    wire_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
