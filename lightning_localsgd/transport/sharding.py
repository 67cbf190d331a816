"""Sharded replicas: FSDP2 inside each node, the consensus algorithm across nodes.

With ``LocalSGDStrategy(within_node="fsdp")`` a replica is a node: its k processes hold the model
sharded with FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) over the ``"shard"`` dimension of a
2-D device mesh ``(nodes, k)`` named ``("replicate", "shard")``. FSDP2 all-gathers and
reduce-scatters inside the node at every step (the fast link); nothing crosses nodes between syncs.
At a sync, local rank j of every node holds shard j of its node's replica, so the consensus
algorithm works on each rank's *shard* (:func:`~lightning_localsgd.transport.tensors.local`) over
the ``"replicate"`` dimension (:func:`sharded_group`): the same arithmetic as a whole-model
average, cut into k independent pieces, and every model-sized tensor an algorithm holds (DiLoCo's
anchor and outer momentum, the error-feedback residual, an overlapped sync's snapshot, fragments)
is 1/k of the model per rank.

This module holds what the strategy needs beyond that and nothing Lightning: the mesh, the shard
policy, the checks of a user-sharded module, the setup broadcast, and a shard's state in and out of
checkpoints (each rank keeps its own shard; the consensus is exported whole).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_localsgd.transport.collectives import Collectives, Group
from lightning_localsgd.transport.tensors import local

__all__ = [
    "FSDP_KWARGS",
    "MESH_DIMS",
    "apply_shard_policy",
    "broadcast_sharded_module_",
    "check_sharded_module",
    "full_state_dict",
    "is_sharded",
    "load_full_state_dict_",
    "load_local_state_",
    "local_optimizer_state",
    "local_state_dict",
    "reshard_",
    "rewrap_optimizer_state_",
    "shard_mesh",
    "sharded_group",
]

MESH_DIMS = ("replicate", "shard")
"""The device mesh's dimensions: across nodes (the consensus algorithm) and inside a node (FSDP2)."""

FSDP_KWARGS = ("reshard_after_forward", "mp_policy", "offload_policy")
"""The ``fully_shard`` arguments ``fsdp_kwargs`` may hold (the mesh is the strategy's)."""


def _dtensor_class() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (the module went through ``fully_shard``)."""
    dtensor = _dtensor_class()
    return any(isinstance(p, dtensor) for p in module.parameters())


def shard_mesh(world_size: int, num_nodes: int, device_type: str) -> Any:
    """The ``(nodes, processes per node)`` device mesh with dimensions :data:`MESH_DIMS` (every rank calls it)."""
    from torch.distributed.device_mesh import init_device_mesh

    per_node = world_size // num_nodes
    return init_device_mesh(device_type, (num_nodes, per_node), mesh_dim_names=MESH_DIMS)


def sharded_group(cross: Group) -> Group:
    """``cross`` (a replica group, :func:`~lightning_localsgd.transport.replicas.replica_group`) as a sharded
    replica's group: the same cross ranks, whose values are shards (no split), with the node as ``shards``."""
    assert cross.node is not None
    return Group(cross.handle, cross.ranks, cross.rank, shards=cross.node)


def _matches(module: nn.Module, classes: Iterable[type | str]) -> bool:
    return any(
        isinstance(module, c) if isinstance(c, type) else type(module).__name__ == c or type(module).__qualname__ == c
        for c in classes
    )


def apply_shard_policy(
    module: nn.Module, mesh: Any, modules: Iterable[type | str] | None, fsdp_kwargs: Mapping[str, Any]
) -> list[str]:
    """``fully_shard`` the blocks of ``module`` over ``mesh`` (the node's dimension), innermost first, then its roots.

    ``modules``: the classes (or class names) to shard as units, as Lightning's ``FSDPStrategy``
    takes them; ``None``: every child of an ``nn.ModuleList`` / ``nn.Sequential`` that holds
    parameters (a transformer's blocks, a ResNet stage's blocks). Each unit's parameters are
    all-gathered together at its forward and resharded after it.

    The roots hold the parameters outside the units. If ``module`` (the LightningModule) registers
    parameters itself (a learned position table, say), ``module`` is the one root: its ``forward``
    gathers them, so ``training_step`` must run the model through ``self(...)``. Otherwise each of
    its children that holds parameters is a root (``training_step`` may call its networks directly).
    Returns the names of the units and roots (``""``: ``module`` itself).
    """
    from torch.distributed.fsdp import fully_shard

    units: list[tuple[str, nn.Module]] = []
    if modules is None:
        for parent_name, parent in module.named_modules():
            if isinstance(parent, nn.ModuleList | nn.Sequential) and parent is not module:
                for child_name, child in parent.named_children():
                    if any(True for _ in child.parameters()):
                        units.append((f"{parent_name}.{child_name}", child))
    else:
        classes = list(modules)
        units = [(name, m) for name, m in module.named_modules() if m is not module and _matches(m, classes)]
        if not units:
            found = sorted({type(m).__name__ for m in module.modules()})
            raise ValueError(f"fsdp_modules={classes} matches no module of the model; its classes are {found}")
    for _, unit in reversed(units):  # named_modules is pre-order: children come after parents
        fully_shard(unit, mesh=mesh, **fsdp_kwargs)
    if any(True for _ in module.parameters(recurse=False)):
        roots = [("", module)]
    else:
        sharded = {id(m) for _, m in units}
        roots = [
            (name, child)
            for name, child in module.named_children()
            if id(child) not in sharded and any(True for _ in child.parameters())
        ]
    for _, root in roots:
        fully_shard(root, mesh=mesh, **fsdp_kwargs)
    return [name for name, _ in units + roots]


def reshard_(module: nn.Module) -> None:
    """Put every FSDP2 module of ``module`` in its sharded state.

    A forward pass without a backward (validation) leaves an FSDP root's parameters gathered, and
    the module then holds full tensors instead of its DTensor shards: writes into the shards would
    not reach the next forward. The strategy calls this before the algorithm reads or writes shards
    outside a training step (evaluation swap, checkpoints, the end of fit).
    """
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def check_sharded_module(module: nn.Module, mesh: Any) -> None:
    """Refuse, with the fix, a module the strategy cannot shard or sync.

    The module must not be wrapped in DDP or FSDP1; if ``configure_model`` sharded it, every parameter
    must be a DTensor sharded over the node's dimension ``mesh`` only.
    """
    from torch.distributed.tensor import Shard

    dtensor = _dtensor_class()
    for name, sub in module.named_modules():
        if isinstance(sub, nn.parallel.DistributedDataParallel) or type(sub).__name__ == "FullyShardedDataParallel":
            raise TypeError(
                f"{name or 'the model'} is wrapped in {type(sub).__name__}, but within_node='fsdp' shards the "
                "model with FSDP2 itself: drop the wrapper (call fully_shard(..., mesh=self.device_mesh['shard']) in "
                "configure_model, or let the strategy shard by its policy)"
            )
    if not is_sharded(module):
        return  # the strategy shards it by its policy
    plain = [name for name, p in module.named_parameters() if not isinstance(p, dtensor)]
    if plain:
        raise ValueError(
            f"configure_model sharded some parameters but not {plain[:3]}{'...' if len(plain) > 3 else ''}: "
            "call fully_shard(model, mesh=self.device_mesh['shard']) on the root module too, or shard nothing "
            "and let the strategy apply its policy"
        )
    for name, p in module.named_parameters():
        spec = p.device_mesh
        if spec.ndim != 1 or spec.mesh.tolist() != mesh.mesh.tolist():
            raise ValueError(
                f"parameter {name} is sharded over {spec} but within_node='fsdp' shards inside each node only: "
                "pass mesh=self.device_mesh['shard'] to fully_shard (the 'replicate' dimension is the consensus "
                "algorithm's: HSDP over it would allreduce gradients across nodes at every step)"
            )
        if not all(isinstance(placement, Shard) for placement in p.placements):
            raise ValueError(f"parameter {name} has placements {p.placements}; within_node='fsdp' needs Shard")


@torch.no_grad()
def broadcast_sharded_module_(comm: Collectives, module: nn.Module, cross: Group, world: Group) -> None:
    """Every replica starts as node 0's: each shard from node 0's rank with the same shard
    (over ``cross``), the buffers (replicated, not sharded, under FSDP2) from global rank 0."""
    shards: dict[torch.dtype, list[Tensor]] = {}
    for p in module.parameters():
        shards.setdefault(p.dtype, []).append(local(p))
    for tensors in shards.values():
        comm.broadcast_tensors_(tensors, src=cross.ranks[0], group=cross, purpose="setup")
    buffers: dict[torch.dtype, list[Tensor]] = {}
    for b in module.buffers():
        buffers.setdefault(b.dtype, []).append(local(b))
    for tensors in buffers.values():
        comm.broadcast_tensors_(tensors, src=world.ranks[0], group=world, purpose="setup")


def local_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with every DTensor replaced by this rank's shard (a detached copy)."""
    return {k: local(v).detach().clone() if isinstance(v, Tensor) else v for k, v in state.items()}


def full_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with every DTensor gathered whole, in host memory (collective: every rank of the node calls it)."""
    dtensor = _dtensor_class()
    out = {}
    for k, v in state.items():
        if isinstance(v, dtensor):
            v = v.full_tensor()
        out[k] = v.detach().cpu() if isinstance(v, Tensor) else v
    return out


@torch.no_grad()
def load_local_state_(module: nn.Module, state: Mapping[str, Tensor], strict: bool = True) -> None:
    """Copy this rank's saved shards and buffers (:func:`local_state_dict`) into ``module`` in place."""
    named = dict(module.named_parameters())
    named.update(module.named_buffers())
    missing = sorted(set(named) - set(state))
    unexpected = sorted(set(state) - set(named))
    if strict and (missing or unexpected):
        raise RuntimeError(f"the rank's saved shards do not fit the model: missing {missing}, unexpected {unexpected}")
    for name, t in named.items():
        if name in state:
            mine = local(t)
            saved = state[name]
            if saved.shape != mine.shape:
                raise RuntimeError(
                    f"{name}: the saved shard has shape {tuple(saved.shape)} but this rank's is {tuple(mine.shape)}; "
                    "resume with the same model, world size and nodes"
                )
            mine.copy_(saved)


def load_full_state_dict_(module: nn.Module, state: Mapping[str, Any], strict: bool = True) -> None:
    """Load a whole (unsharded) state dict, such as a checkpoint file's consensus, into a sharded ``module``:
    each rank keeps its shard of every tensor (``torch.distributed.checkpoint.state_dict``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True, strict=strict))


def local_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's ``state_dict()`` with every DTensor state (momenta, moments) replaced by this rank's shard."""
    per_param = {
        index: {k: local(v).detach().clone() if isinstance(v, Tensor) else v for k, v in entries.items()}
        for index, entries in state["state"].items()
    }
    return {**state, "state": per_param}


def rewrap_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of a :func:`local_optimizer_state`: each shard becomes a DTensor again.

    A state tensor is a shard when its parameter is a DTensor and it has the shard's shape (step
    counters are 0-dim and stay as they are).
    """
    dtensor = _dtensor_class()
    for p, entries in optimizer.state.items():
        if not isinstance(p, dtensor):
            continue
        shard = local(p)
        for k, v in list(entries.items()):
            if isinstance(v, Tensor) and not isinstance(v, dtensor) and v.dim() > 0 and v.shape == shard.shape:
                entries[k] = dtensor.from_local(
                    v.to(shard.device), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                )
