"""Failures on real gloo ranks: a peer that is gone (see tests/launch.py)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lightning_localsgd.transport.collectives import CollectiveError, Collectives, Group


def peer_gone(out_dir: str, devices: int, num_nodes: int) -> dict[str, Any]:
    """Rank 1 leaves before the first sync; rank 0's sync must fail with a CollectiveError, not hang."""
    rank, world = int(os.environ["LOCAL_RANK"]), devices * num_nodes
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=20))
    comm, group = Collectives(), Group(None, list(range(world)), rank)
    comm.mean_([torch.ones(4)], group, purpose="sync")  # both present: fine
    if rank == 1:
        return {"rank": 1, "error": None}
    try:
        comm.mean_([torch.ones(4)], group, purpose="sync", step=7)
    except CollectiveError as err:
        return {"rank": 0, "error": str(err)}
    return {"rank": 0, "error": "no error"}
