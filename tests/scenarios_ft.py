"""Replica groups of a fault-tolerant run (each one Lightning job), started by recipes/ft_launch.py.

Every group fits full-batch least squares on its own data (float64, SGD with momentum), so the
whole run is deterministic given which groups contributed to each sync: the test replays it in
plain torch (:func:`replay`) and compares. ``die_at`` makes the first start of group ``die_group``
SIGKILL itself after that optimizer step; ``die_in_sync`` inside the sync round of that step,
after the quorum and the agreement on the contributors, before the values travel.

Restarting a Python process takes 5 to 90 s on this shared 2-core machine, so the harness (not
the library) makes the timeline deterministic (recipes/ft_launch.py's ``RestartGate``): every
first start waits for the others before its join round, and the surviving groups pause after
step ``gate_at`` until the restarted group has reached its join round. Those pauses are reported
apart from the library's own waits.
"""

from __future__ import annotations

import functools
import os
import signal
from types import SimpleNamespace
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_localsgd import DiLoCo, LocalSGDStrategy, PeriodicAveraging, TorchFT
from recipes.ft_launch import INCARNATION_ENV, KillInSync, KillSelf, Pace, RestartGate

D, N = 4, 12  # features, samples per group


def group_data(group: int) -> tuple[Tensor, Tensor]:
    """Group ``group``'s samples: each group's own linear target, so averaging matters."""
    gen = torch.Generator().manual_seed(1000 + group)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    w_true = torch.linspace(-1.0, 1.0, D, dtype=torch.float64) + 0.5 * group
    return x, x @ w_true


def initial_weights(group: int) -> Tensor:
    """Every group starts from its own random weights: the join round must make them equal."""
    return torch.randn(D, generator=torch.Generator().manual_seed(7 + group), dtype=torch.float64)


def loss_of(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return 0.5 * ((x @ w - y) ** 2).mean()


def shared_scale_sum(values: dict[Any, Tensor], fmt: str) -> tuple[Tensor, dict[Any, Tensor]]:
    """The integer wire of a fault-tolerant round in plain torch (the formula of ``transport/summable.py``).

    ``values``: each contributor's :math:`v = x - a + r` (a multiple of 128 values). Returns
    (:math:`s \\sum_j q_j`, each contributor's :math:`v - s q`).
    """
    block, levels = 128, {"int8": 127, "int4": 7}[fmt] - len(values) // 2
    absmax = torch.zeros(next(iter(values.values())).numel() // block, dtype=torch.float64)
    for v in values.values():
        top = v.view(-1, block).abs().amax(1)
        single = top.float()  # rounded up to float32
        up = torch.where(single.double() < top, torch.nextafter(single, torch.full_like(single, float("inf"))), single)
        absmax += up.double()
    s = (absmax / levels).repeat_interleave(block)
    qs = {k: torch.where(s > 0, v / torch.where(s > 0, s, 1.0), 0.0).round() for k, v in values.items()}
    return sum(qs.values()) * s, {k: values[k] - qs[k] * s for k in values}


class FullBatch(Dataset):
    """The same full batch at every index (``batch_size=None``): data order cannot matter."""

    def __init__(self, group: int, length: int) -> None:
        self.batch, self.length = group_data(group), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.batch


class LeastSquaresGroup(LightningModule):
    def __init__(self, group: int, lr: float, momentum: float) -> None:
        super().__init__()
        self.w = nn.Parameter(initial_weights(group))
        self.lr, self.momentum, self.steps = lr, momentum, 0

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.steps += 1
        return loss_of(self.w, *batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class Listeners(Callback):
    """The TCP listeners of this process at the end of training (the torchft manager, store and transports live)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def on_train_end(self, trainer: Trainer, *args: Any) -> None:
        from tests.netstat import listening

        self.seen = listening()


def group_trainer(
    devices: int,
    num_nodes: int,
    min_replicas: int,
    max_steps: int,
    callbacks: list[Callback],
    heal: str = "pg",
    comm_dtype: str | None = None,
    within_node: str | None = None,
) -> tuple[Trainer, LocalSGDStrategy]:
    """One replica group's Trainer under ``TorchFT`` (timeouts short enough for a test to fail fast)."""
    ft = TorchFT(min_replicas=min_replicas, timeout=10, quorum_timeout=60, connect_timeout=10, heal_transport=heal)
    strategy = LocalSGDStrategy(fault_tolerance=ft, comm_dtype=comm_dtype, within_node=within_node)
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    return trainer, strategy


def train_group(
    out_dir: str,
    devices: int,
    num_nodes: int,
    algorithm: str = "periodic",
    sync_every: int = 5,
    max_steps: int = 60,
    lr: float = 0.05,
    momentum: float = 0.5,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.5,
    die_group: int = 2,
    die_at: int | None = None,
    die_in_sync: bool = False,
    pace: float = 0.05,
    min_replicas: int = 2,
    barrier_dir: str | None = None,
    groups: int = 3,
    gate_at: int | None = None,
    heal_transport: str = "pg",
    comm_dtype: str | None = None,
    fragments: int = 1,
    overlap_steps: int = 0,
    within_node: str | None = None,
) -> dict[str, Any]:
    group, incarnation = int(os.environ["REPLICA_GROUP_ID"]), int(os.environ[INCARNATION_ENV])
    torch.set_num_threads(1)
    consensus = consensus_for(algorithm, sync_every, outer_lr, outer_momentum, fragments, overlap_steps)
    gate = None if barrier_dir is None else RestartGate(barrier_dir, groups, gate_at, die_group)
    listeners = Listeners()
    callbacks: list[Callback] = [consensus, Pace(pace), listeners] + ([gate] if gate is not None else [])
    if die_at is not None and group == die_group and incarnation == 0:
        callbacks.append(KillInSync(die_at, 3 if comm_dtype else 2) if die_in_sync else KillSelf(die_at))
    trainer, strategy = group_trainer(
        devices, num_nodes, min_replicas, max_steps, callbacks, heal_transport, comm_dtype, within_node
    )
    model = LeastSquaresGroup(group, lr, momentum)
    shard = group * devices + int(os.environ["LOCAL_RANK"])  # every process of every group has its own data
    trainer.fit(model, DataLoader(FullBatch(shard, 10 * max_steps), batch_size=None))
    optimizer = trainer.strategy.optimizers[0]
    return group_result(
        model.w, optimizer, model.steps, trainer.global_step, consensus, strategy.ft_session, gate, listeners.seen
    )


def consensus_for(
    algorithm: str, sync_every: int, outer_lr: float, outer_momentum: float, fragments: int, overlap_steps: int
) -> Any:
    """The run's PeriodicAveraging or DiLoCo (outer SGD)."""
    schedule = {"fragments": fragments, "overlap_steps": overlap_steps}
    if algorithm == "periodic":
        return PeriodicAveraging(sync_every, **schedule)
    outer = functools.partial(torch.optim.SGD, lr=outer_lr, momentum=outer_momentum)
    return DiLoCo(sync_every, outer_optimizer=outer, **schedule)


def group_result(
    w: Tensor,
    optimizer: torch.optim.Optimizer,
    steps: int,
    global_step: int,
    consensus: Any,
    session: Any,
    gate: RestartGate | None,
    listeners: list[tuple[str, int]],
) -> dict[str, Any]:
    """What a group's process reports to the test (its replica, inner and outer state, rounds, harness pauses)."""
    out: dict[str, Any] = {
        "group": int(os.environ["REPLICA_GROUP_ID"]),
        "rank": int(os.environ["LOCAL_RANK"]),
        "incarnation": int(os.environ[INCARNATION_ENV]),
        "w": w.detach().clone(),
        "momentum": optimizer.state[w]["momentum_buffer"].clone(),
        "steps": steps,
        "global_step": global_step,
        "num_syncs": consensus.num_syncs,
        "history": session.records(),
        "harness_pause": 0.0 if gate is None else gate.paused,
        "listeners": listeners,
        "master_port": int(os.environ.get("MASTER_PORT", 0)),
    }
    if isinstance(consensus, DiLoCo):
        out["anchor"] = consensus.anchor.clone()
        buffers = [o.state_dict()["state"][0]["momentum_buffer"] for o in consensus.outers]  # one per fragment
        out["outer_momentum"] = torch.cat(buffers).clone()
    return out


# ---------------------------------------------------------------------- the same group under Fabric (issue 23, part 4)
class LinearModel(nn.Module):
    """x ↦ x·w: its forward pass is what joins the live groups under Fabric."""

    def __init__(self, group: int) -> None:
        super().__init__()
        self.w = nn.Parameter(initial_weights(group))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w


def train_fabric_group(out_dir: str, devices: int, num_nodes: int, **kwargs: Any) -> dict[str, Any]:
    """:func:`train_group`'s run (its parameters) written as a Fabric loop (``lightning_localsgd.fabric``)."""
    import inspect
    import time

    from lightning.fabric import Fabric

    from lightning_localsgd.fabric import LocalSGDStrategy as FabricLocalSGD

    bound = inspect.signature(train_group).bind(out_dir, devices, num_nodes, **kwargs)
    bound.apply_defaults()
    c = SimpleNamespace(**bound.arguments)
    group, incarnation = int(os.environ["REPLICA_GROUP_ID"]), int(os.environ[INCARNATION_ENV])
    torch.set_num_threads(1)
    consensus = consensus_for(c.algorithm, c.sync_every, c.outer_lr, c.outer_momentum, c.fragments, c.overlap_steps)
    ft = TorchFT(
        min_replicas=c.min_replicas, timeout=10, quorum_timeout=60, connect_timeout=10, heal_transport=c.heal_transport
    )
    strategy = FabricLocalSGD(algorithm=consensus, fault_tolerance=ft, comm_dtype=c.comm_dtype)
    fabric = Fabric(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy=strategy)
    fabric.launch()
    model = LinearModel(group)
    optimizer = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum)
    model, optimizer = fabric.setup(model, optimizer)
    gate = None if c.barrier_dir is None else RestartGate(c.barrier_dir, c.groups, c.gate_at, c.die_group)
    dies = c.die_at is not None and group == c.die_group and incarnation == 0
    if dies and c.die_in_sync:
        KillInSync(c.die_at, 3 if c.comm_dtype else 2).arm(strategy.ft_session)
    if gate is not None:
        gate.announce()
    x, y = group_data(group * devices + int(os.environ["LOCAL_RANK"]))
    steps = 0
    while strategy.step < c.max_steps:
        loss = 0.5 * ((model(x) - y) ** 2).mean()  # the first forward pass joins the live groups
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
        time.sleep(c.pace)
        if dies and not c.die_in_sync and strategy.step == c.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if gate is not None:
            gate.after_step(strategy.step)
    strategy.finalize()
    raw = model.module if hasattr(model, "module") else model
    out = group_result(raw.w, optimizer, steps, strategy.step, consensus, strategy.ft_session, gate, [])
    fabric.strategy.teardown()
    return out


# ---------------------------------------------------------------------- a whole-job restart from FT checkpoints
class IndexedBatch(Dataset):
    """Batch ``i``: the group's full batch, targets scaled by ``1 + (i mod 7)/100`` (the data position matters)."""

    def __init__(self, group: int, length: int) -> None:
        self.batch, self.length = group_data(group), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        x, y = self.batch
        return x, y * (1.0 + (index % 7) / 100.0), index


class IndexedGroup(LeastSquaresGroup):
    """Least squares on :class:`IndexedBatch`, an LR halved every 4 steps (StepLR, per step); records what it saw."""

    def __init__(self, group: int, lr: float, momentum: float) -> None:
        super().__init__(group, lr, momentum)
        self.seen: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, index = batch
        self.seen.append(int(index))
        return super().training_step((x, y), batch_idx)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SaveAt(Callback):
    """``trainer.save_checkpoint(path)`` after optimizer step ``step`` (a sync step: the replicas are the consensus)."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def train_durable(
    out_dir: str,
    devices: int,
    num_nodes: int,
    sync_every: int = 5,
    max_steps: int = 30,
    lr: float = 0.05,
    momentum: float = 0.5,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.5,
    min_replicas: int = 2,
    save_at: int | None = None,
    ckpt_dir: str | None = None,
    resume: bool = False,
    comm_dtype: str | None = None,
) -> dict[str, Any]:
    """One group of a DiLoCo run on :class:`IndexedBatch`: saves its own checkpoint at ``save_at``, or resumes it."""
    group = int(os.environ["REPLICA_GROUP_ID"])
    rank = int(os.environ["LOCAL_RANK"])
    torch.set_num_threads(1)
    outer = functools.partial(torch.optim.SGD, lr=outer_lr, momentum=outer_momentum)
    consensus = DiLoCo(sync_every, outer_optimizer=outer)
    path = None if ckpt_dir is None else os.path.join(ckpt_dir, f"group{group}.ckpt")
    callbacks: list[Callback] = [consensus] + ([SaveAt(save_at, path)] if save_at and path else [])
    trainer, strategy = group_trainer(devices, num_nodes, min_replicas, max_steps, callbacks, comm_dtype=comm_dtype)
    model = IndexedGroup(group, lr, momentum)
    shard = group * devices + rank
    from torchdata.stateful_dataloader import StatefulDataLoader  # resumes mid-epoch where this group was

    loader = StatefulDataLoader(IndexedBatch(shard, 1000), batch_size=None)
    trainer.fit(model, loader, ckpt_path=path if resume else None)
    optimizer = trainer.strategy.optimizers[0]
    return {
        "group": group,
        "rank": rank,
        "w": model.w.detach().clone(),
        "momentum": optimizer.state[model.w]["momentum_buffer"].clone(),
        "lr": optimizer.param_groups[0]["lr"],
        "seen": model.seen,
        "global_step": trainer.global_step,
        "num_syncs": consensus.num_syncs,
        "anchor": consensus.anchor.clone(),
        "outer_momentum": consensus.outer.state_dict()["state"][0]["momentum_buffer"].clone(),
        "history": strategy.ft_session.records(),
    }
