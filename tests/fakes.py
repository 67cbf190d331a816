"""One fake transport for the unit tests: the real averaging code runs, only the wire is scripted.

:class:`FakeCollectives` subclasses the library's :class:`~lightning_localsgd.transport.collectives.Collectives`
and replaces just the primitives that would talk to other processes, so NaN flags, anchors,
reduced-precision casts and buffer handling are the real ones. This process is one rank of a
group; what the *other* ranks put on the wire is given by the test.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.contract import SyncContext, SyncObserver
from lightning_localsgd.transport.collectives import Collectives, Group


class FakeCollectives(Collectives):
    """Scripted peers.

    Attributes:
        other: added to the front of every allreduce buffer: the sum of what the other ranks send
            (their payload, without flags). Set it before the call that uses it.
        rows: ``{global rank: values}``, the other ranks' rows of an all-gather.
        broadcasts: ``{global rank: flat}``, what a broadcast from that rank delivers.
        sent: every allreduce buffer this rank put on the wire (payload, then one flag per rank).
        broadcast_log: ``(src, purpose)`` of every broadcast.
    """

    def __init__(self, comm_dtype: Any = None) -> None:
        super().__init__(comm_dtype)
        self.other = torch.zeros(0)
        self.rows: dict[int, list[float] | Tensor] = {}
        self.broadcasts: dict[int, Tensor] = {}
        self.sent: list[Tensor] = []
        self.broadcast_log: list[tuple[int, str]] = []

    def all_reduce_sum_(self, flat: Tensor, group: Group, purpose: str) -> Tensor:
        self.sent.append(flat.clone())
        flat[: self.other.numel()] += self.other.to(flat.dtype)
        return flat

    def all_gather(self, local: Tensor, group: Group, purpose: str) -> Tensor:
        me = group.ranks[group.rank]
        rows = [local if r == me else torch.as_tensor(self.rows[r], dtype=local.dtype) for r in group.ranks]
        return torch.stack([row.reshape(-1) for row in rows])

    def broadcast_(self, flat: Tensor, src: int, group: Group, purpose: str) -> Tensor:
        self.broadcast_log.append((src, purpose))
        if src != group.ranks[group.rank]:
            flat.copy_(self.broadcasts[src])
        return flat


class Toy(nn.Module):
    """Three parameters in float64: w = [1, 2], b = [0.5]."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))

    def set_(self, values: list[float]) -> None:
        with torch.no_grad():
            self.w.copy_(torch.tensor(values[:2], dtype=torch.float64))
            self.b.copy_(torch.tensor(values[2:], dtype=torch.float64))

    def flat(self) -> Tensor:
        return torch.cat([self.w.detach(), self.b.detach()]).clone()


def bind_fake(
    algorithm: ConsensusAlgorithm,
    module: nn.Module,
    comm: Collectives,
    *,
    step: int = 0,
    world: Group | None = None,
    node: Group | None = None,
    observers: tuple[SyncObserver, ...] = (),
    restored: dict[str, Any] | None = None,
) -> SyncContext:
    """Bind ``algorithm`` as a front end would; by default this process is rank 0 of ranks [0, 1]."""
    world = world or Group(None, [0, 1], 0)
    ctx = SyncContext(module, comm, world, node or world, None, observers)
    algorithm.bind(ctx, step, restored)
    return ctx


def fake_trainer_module(module: nn.Module, step: int = 0) -> nn.Module:
    """Give a plain module the ``trainer.global_step`` some Lightning-facing code reads."""
    module.trainer = SimpleNamespace(global_step=step)  # type: ignore[attr-defined]
    return module
