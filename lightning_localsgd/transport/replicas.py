"""The groups replicas live in and how replicas are made equal: node groups, the module broadcast.

Both front ends (the Trainer's and Fabric's strategies) and the fault-tolerance wing use these; they
hold no Lightning object, only a module, a transport and groups.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_localsgd.transport.collectives import Collectives, CommCounters, Group, new_group

__all__ = ["broadcast_module_", "check_within_node", "counted_allreduce_hook", "node_groups", "replica_group"]


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


def replica_group(
    world_size: int,
    num_nodes: int,
    rank: int,
    node: Group | None,
    timeout: timedelta | None,
    created: list[Group] | None = None,
) -> Group:
    """The group a consensus algorithm syncs over when a replica is a node (replica groups).

    Every rank creates the k cross groups ``{j, j + k, j + 2k, ...}`` (local rank j of every node,
    k ranks per node), in the same order; this rank's becomes the handle of the returned group and
    ``node`` its replica (see :class:`~lightning_localsgd.transport.collectives.Group`); ``node=None``
    creates fresh node groups too (a background thread's groups, shared with nothing else). With one
    node the group holds one replica and nothing is ever sent over it.
    """
    if num_nodes < 1 or world_size % num_nodes:
        raise ValueError(
            f"replica groups need the same number of processes on every node: {world_size} processes do not "
            f"divide into {num_nodes} nodes. Launch devices={max(1, world_size // max(num_nodes, 1))} per node on "
            "every node (or fix num_nodes)"
        )
    per_node = world_size // num_nodes
    if node is None:
        node = node_groups(world_size, num_nodes, rank, timeout, created=created)
    if node.size != per_node:
        raise ValueError(f"this rank's node group has {node.size} ranks, expected {per_node}")
    local = rank % per_node
    mine = Group(None, [rank], 0, node=node)
    for j in range(per_node):
        ranks = [j + n * per_node for n in range(num_nodes)]
        if num_nodes == 1:
            continue
        group = new_group(ranks, rank, timeout)
        if created is not None:
            created.append(group)
        if j == local:
            mine = Group(group.handle, group.ranks, group.rank, node=node)
    return mine


def broadcast_module_(comm: Collectives, module: torch.nn.Module, world: Group) -> None:
    """Every rank takes rank 0's parameters and buffers (one flat broadcast per dtype)."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        comm.broadcast_tensors_(group, src=0, group=world, purpose="setup")


def check_within_node(
    within_node: Any,
    ddp_kwargs: Mapping[str, Any],
    fault_tolerant: bool = False,
    fsdp_kwargs: Mapping[str, Any] | None = None,
    fsdp_modules: Any = None,
) -> None:
    """Refuse, with the fix, a ``within_node`` value or DDP / FSDP arguments that cannot work."""
    if within_node not in (None, "ddp", "fsdp"):
        raise ValueError(
            "within_node must be None (every process is a replica), 'ddp' (every node is one replica, DDP inside "
            f"it) or 'fsdp' (every node is one replica sharded with FSDP2 inside it), got {within_node!r}"
        )
    if ddp_kwargs and within_node != "ddp":
        raise TypeError(
            f"ddp_kwargs={dict(ddp_kwargs)} needs within_node='ddp' (otherwise the module is not wrapped in "
            "DistributedDataParallel): pass within_node='ddp' or drop ddp_kwargs"
        )
    if (fsdp_kwargs or fsdp_modules is not None) and within_node != "fsdp":
        raise TypeError("fsdp_kwargs and fsdp_modules need within_node='fsdp': pass it, or drop them")
    accepted = set(inspect.signature(DistributedDataParallel.__init__).parameters) - {"self", "module", "device_ids"}
    accepted -= {"process_group", "output_device"}
    unknown = sorted(set(ddp_kwargs) - accepted)
    if unknown:
        raise TypeError(
            f"ddp_kwargs holds {unknown}, which DistributedDataParallel does not take or the strategy sets "
            f"(process_group: the node's processes; device_ids: this rank's device). It takes {sorted(accepted)}"
        )
    from lightning_localsgd.transport.sharding import FSDP_KWARGS

    unknown = sorted(set(fsdp_kwargs or {}) - set(FSDP_KWARGS))
    if unknown:
        raise TypeError(
            f"fsdp_kwargs holds {unknown}; it takes fully_shard's {list(FSDP_KWARGS)} (the mesh is the strategy's: "
            "the node's processes)"
        )
    if fsdp_modules is not None and (
        isinstance(fsdp_modules, str | type) or not all(isinstance(m, str | type) for m in fsdp_modules)
    ):
        raise TypeError(
            f"fsdp_modules must be a list of module classes or class names (e.g. ['Block']), got {fsdp_modules!r}"
        )
    if within_node == "fsdp" and fault_tolerant:
        raise ValueError(
            "fault_tolerance with within_node='fsdp' is not supported yet: use within_node='ddp' (a replica group "
            "is then one node running DDP) or drop one of them (docs/fault_tolerance.md)"
        )


def counted_allreduce_hook(counters: CommCounters, node: Group) -> Callable[[Any, Any], Any]:
    """A DDP communication hook for replica groups: DDP's own bucketed mean over the node
    (``default_hooks.allreduce_hook``, the arithmetic DDP uses without a hook), each bucket's bytes
    booked as ``"grad/node"`` (ring estimate 2·(k−1)/k·B; no seconds: the allreduce runs behind backward)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    k = node.size

    def hook(state: Any, bucket: Any) -> Any:
        flat = bucket.buffer()
        counters.add("grad/node", 2.0 * (k - 1) / k * flat.numel() * flat.element_size(), 0.0)
        return default_hooks.allreduce_hook(node.handle, bucket)

    # DDP checks the annotations themselves (objects, not this module's postponed strings)
    hook.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[Tensor]}
    return hook
