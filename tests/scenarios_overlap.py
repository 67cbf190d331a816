"""Overlapped, fragmented and integer-transport syncs on real gloo ranks (see tests/launch.py)."""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from typing import Any

import torch

from lightning_localsgd import DiLoCo, PeriodicAveraging
from lightning_localsgd.transport.collectives import Collectives, Group
from tests.models import TinyNet
from tests.scenarios_diloco import this_rank
from tests.scenarios_leader import _fit

ALGORITHMS = {"periodic": PeriodicAveraging, "diloco": DiLoCo}


def overlap_run(
    out_dir: str,
    devices: int,
    num_nodes: int,
    steps: int,
    algorithm: str,
    kwargs: dict[str, Any],
    comm_dtype: str | None = None,
) -> dict[str, Any]:
    """TinyNet (SGD lr 0.1, momentum 0.5) on this rank's shuffled shard under the given algorithm."""
    return _fit(devices, num_nodes, [ALGORITHMS[algorithm](**kwargs)], steps, make=partial(TinyNet, momentum=0.5))


def error_feedback(out_dir: str, devices: int, num_nodes: int, fmt: str, rounds: int, n: int) -> dict[str, Any]:
    """``rounds`` integer-transport averages of known deltas δ_{i,t} (every rank can recompute everyone's).

    Returns what each round delivered (the mean, minus the anchor 0), this rank's final residual, the
    sum of everyone's true deltas, and the bytes booked per round.
    """
    world = devices * num_nodes
    rank = this_rank(devices)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    comm = Collectives(comm_dtype=fmt)
    group = Group(None, list(range(world)), rank)
    anchor = torch.zeros(n, dtype=torch.float64)
    residual = torch.zeros(n, dtype=torch.float64)

    def delta(i: int, t: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * t + i)
        return torch.randn(n, generator=g, dtype=torch.float64) * (1 + i) * 0.01

    delivered, truth = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    before = dict(comm.counters.bytes_by_purpose)
    for t in range(rounds):
        x = delta(rank, t).clone()
        comm.mean_([x], group, anchor=anchor, residual=residual)
        delivered += x * world  # the sum over ranks this round delivered
        truth += sum(delta(i, t) for i in range(world))
    sent = comm.counters.bytes_by_purpose["sync"] - before.get("sync", 0.0)
    return {
        "delivered": delivered,
        "residual": residual.clone(),
        "truth": truth,
        "bytes_per_round": sent / rounds,
        "last_mean": x,
    }
