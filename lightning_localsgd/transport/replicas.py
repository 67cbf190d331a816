"""The groups replicas live in and how replicas are made equal: node groups, the module broadcast.

Both front ends (the Trainer's and Fabric's strategies) and the fault-tolerance wing use these; they
hold no Lightning object, only a module, a transport and groups.
"""

from __future__ import annotations

from datetime import timedelta

import torch
from torch import Tensor

from lightning_localsgd.transport.collectives import Collectives, Group, new_group

__all__ = ["broadcast_module_", "node_groups"]


def node_groups(
    world_size: int, num_nodes: int, rank: int, timeout: timedelta | None, created: list[Group] | None = None
) -> Group:
    """This rank's node group (every rank creates every node's group, in the same order).

    The groups it creates are appended to ``created`` (to be destroyed at teardown).
    """
    per_node = world_size // num_nodes
    mine = Group(None, list(range(world_size)), rank)
    if num_nodes == 1:
        return mine
    for n in range(num_nodes):
        ranks = list(range(n * per_node, (n + 1) * per_node))
        group = (
            new_group(ranks, rank, timeout)
            if per_node > 1
            else Group(None, ranks, ranks.index(rank) if rank in ranks else -1)
        )
        if per_node > 1 and created is not None:
            created.append(group)
        if rank in ranks:
            mine = group
    return mine


def broadcast_module_(comm: Collectives, module: torch.nn.Module, world: Group) -> None:
    """Every rank takes rank 0's parameters and buffers (one flat broadcast per dtype)."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        comm.broadcast_tensors_(group, src=0, group=world, purpose="setup")
