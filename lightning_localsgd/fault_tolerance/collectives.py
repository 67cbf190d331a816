"""The transport under fault tolerance: the algorithm's world mean becomes a torchft round.

The consensus algorithm is unchanged: it calls ``comm.mean_(tensors, ctx.world, ...)`` as always.
Under ``fault_tolerance`` the world it was bound with is a :class:`QuorumGroup` (the replica groups
of the current quorum, not a fixed process group) and the transport a :class:`QuorumCollectives`,
which turns a sync (``purpose="sync"``) into one round of the group's
:class:`~lightning_localsgd.fault_tolerance.session.ReplicaGroupSession`:

.. math::
    c_j &= [\\text{replica } j \\text{ contributes}],\\qquad
    \\text{meta} = \\textstyle\\sum_j (c_j,\\ [x_j \\notin \\mathbb{R}^n],\\ c_j s_j,\\ c_j s_j^2)
        \\quad\\text{(float64)}\\\\
    \\bar x &= a + \\frac{\\sum_j c_j (x_j - a)}{\\sum_j c_j}
        \\quad\\text{(one SUM allreduce in the wire dtype; } a \\text{ the anchor, or 0)}

over every process j of every group in the quorum (first within the job over its fixed process
group, then across groups with ``Manager.allreduce``). With ``comm_dtype="int8"`` / ``"int4"`` the
sum travels as integers on one shared scale per block, which a SUM allreduce can add
(:mod:`lightning_localsgd.transport.summable`), with error feedback: each contributor adds its
residual :math:`r_j` to its delta and keeps what rounding drops, :math:`r_j \\leftarrow v_j - s\\,q_j`,
only when the round commits (a failed attempt re-quantizes the same :math:`v_j` with the next
quorum's scale). A group that heals starts from a zero residual
(:func:`~lightning_localsgd.fault_tolerance.state.restore_peer_state_`); the survivors keep theirs.

A group that healed in this round (it just received a peer's state) has :math:`c_j = 0`: its
replica is a copy, counting it would weight that peer twice. The step sums check that every
contributor syncs at the same step :math:`s`. The mean is written into the tensors only after
``should_commit``; a failed attempt leaves them untouched and the round is repeated (a new quorum
without the dead group).

Evaluation, checkpoint and setup averages (``purpose`` ``"eval"``, ``"checkpoint"``, ``"setup"``)
stay inside the job: they happen at each group's own pace and need no quorum. Every other
collective over the quorum raises: nothing falls back silently to a fixed group.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_localsgd.transport.collectives import Collectives, Group, NonFinitePolicy, PendingMean
from lightning_localsgd.transport.quantize import BLOCK, IntFormat
from lightning_localsgd.transport.summable import block_absmax, decode_sum_, encode, shared_levels, summable_bytes
from lightning_localsgd.transport.tensors import all_finite, flatten, unflatten_

if TYPE_CHECKING:
    from lightning_localsgd.fault_tolerance.session import ReplicaGroupSession

__all__ = ["JOB_LOCAL_PURPOSES", "QuorumCollectives", "QuorumGroup"]

JOB_LOCAL_PURPOSES = ("eval", "checkpoint", "setup")


class _QuorumHandle:
    """Stands where a torch process group would: a direct ``torch.distributed`` call with it fails loudly."""

    def __repr__(self) -> str:
        return "<the replica groups of the current torchft quorum>"


@dataclass
class QuorumGroup(Group):
    """The world of a fault-tolerant run: this job's ranks plus the other replica groups of the quorum.

    ``ranks`` / ``rank`` are this job's (the groups around it change from round to round);
    ``session`` runs the rounds.
    """

    session: Any = None  # ReplicaGroupSession


class QuorumCollectives(Collectives):
    """:class:`~lightning_localsgd.transport.Collectives` whose means over a :class:`QuorumGroup` are torchft rounds."""

    # ------------------------------------------------------------------ the one supported collective
    @torch.no_grad()
    def mean_(
        self,
        tensors: Sequence[Tensor],
        group: Group,
        *,
        purpose: str = "sync",
        anchor: Tensor | Sequence[Tensor] | None = None,
        residual: Tensor | None = None,
        nonfinite: NonFinitePolicy = "raise",
        step: int | None = None,
        observer: Callable[[Tensor, Tensor], None] | None = None,
    ) -> None:
        if not isinstance(group, QuorumGroup):
            return super().mean_(
                tensors,
                group,
                purpose=purpose,
                anchor=anchor,
                residual=residual,
                nonfinite=nonfinite,
                step=step,
                observer=observer,
            )
        job = group.session.job
        if purpose in JOB_LOCAL_PURPOSES:
            return super().mean_(
                tensors, job, purpose=purpose, anchor=anchor, residual=residual, nonfinite=nonfinite, step=step
            )
        if purpose != "sync" or observer is not None or (residual is not None and not self.quantized):
            raise self._unsupported(f"an average of purpose {purpose!r} (residual/observer)")
        if not tensors:
            return
        self._round_mean_(tensors, group.session, anchor, residual, nonfinite, step)

    def _round_mean_(
        self,
        tensors: Sequence[Tensor],
        session: ReplicaGroupSession,
        anchor: Tensor | Sequence[Tensor] | None,
        residual: Tensor | None,
        nonfinite: NonFinitePolicy,
        step: int | None,
    ) -> None:
        for attempt in range(1, session.max_attempts + 1):  # noqa: B007 (the else clause reports it)
            session.open_round(step if step is not None else -1, "sync")  # may heal: the anchor changes in place
            base = None if anchor is None else (anchor if isinstance(anchor, Tensor) else flatten(anchor))
            dtype = tensors[0].dtype if base is None else base.dtype
            reduced = isinstance(self.comm_dtype, torch.dtype) and base is not None
            wire_dtype = self.comm_dtype if reduced else dtype
            local = flatten(tensors, dtype)
            finite = all_finite([local])
            contributes = session.contributes and (finite or nonfinite == "raise")
            count = session.agree(contributes, finite, nonfinite, device=local.device)
            wire: Tensor | None = None
            kept: Tensor | None = None  # the integer wire's new residual, written only if the round commits
            if count is not None:
                if base is not None:
                    local.sub_(base)
                if self.quantized:
                    summed = self._integer_sum(local, base, residual, contributes, count, session)
                    wire, kept = (None, None) if summed is None else summed
                else:
                    wire = local.to(wire_dtype) if contributes else torch.zeros_like(local, dtype=wire_dtype)
                    if not session.sum_(wire, "sync"):
                        wire = None  # this attempt failed: this group's should_commit says False
            committed = session.close_round(contributors=count if wire is not None else 0)
            if committed and wire is not None:
                mean = wire.to(dtype).div_(float(count))
                if base is not None:
                    mean.add_(base)
                unflatten_(mean, tensors)
                if kept is not None and contributes:
                    residual.copy_(kept)  # type: ignore[union-attr]
                return
        raise session.gave_up(attempt)

    def _integer_sum(
        self,
        delta: Tensor,
        base: Tensor | None,
        residual: Tensor | None,
        contributes: bool,
        count: int,
        session: ReplicaGroupSession,
    ) -> tuple[Tensor, Tensor] | None:
        """:math:`(s \\sum_j q_j,\\ v - s q)` of this attempt on the shared-scale integer wire; ``None``: it failed.

        Two SUMs over the quorum: the per-block maxima (float64), then the integers (``uint8``); see
        :mod:`lightning_localsgd.transport.summable`. ``residual`` is read, not written.
        """
        fmt: IntFormat = self.comm_dtype  # type: ignore[assignment]
        if base is None or residual is None:
            raise ValueError(f"comm_dtype={fmt!r} needs an anchor and an error-feedback residual: pass both to mean_")
        levels = shared_levels(fmt, count)
        n = delta.numel()
        values = torch.zeros(-(-n // BLOCK) * BLOCK, dtype=delta.dtype, device=delta.device)
        if contributes:
            values[:n].copy_(delta).add_(residual.to(delta.device))
        absmax = block_absmax(values)  # zeros for a process that does not contribute
        if not session.sum_(absmax, "sync"):
            return None
        error = torch.empty_like(values)
        if contributes:
            packet = encode(values, absmax, fmt, levels, error=error)
        else:  # zero bytes, not encoded zeros (those would carry the offset L_c)
            packet = torch.zeros(summable_bytes(values.numel(), fmt), dtype=torch.uint8, device=delta.device)
        if not session.sum_(packet, "sync"):
            return None
        summed = decode_sum_(packet, absmax, fmt, levels, count, out=values)
        return summed[:n], error[:n]

    # ------------------------------------------------------------------ everything else over the quorum refuses
    @staticmethod
    def _unsupported(what: str) -> RuntimeError:
        return RuntimeError(
            f"{what} over the replica groups is not supported under fault_tolerance: only the consensus "
            "algorithm's sync average goes through torchft rounds"
        )

    def all_reduce_sum_(self, flat: Tensor, group: Group, purpose: str) -> Tensor:
        if isinstance(group, QuorumGroup):
            raise self._unsupported("an allreduce")
        return super().all_reduce_sum_(flat, group, purpose)

    def all_to_all_(self, out: Tensor, local: Tensor, group: Group, purpose: str) -> Tensor:
        if isinstance(group, QuorumGroup):
            raise self._unsupported("an all-to-all")
        return super().all_to_all_(out, local, group, purpose)

    def broadcast_(self, flat: Tensor, src: int, group: Group, purpose: str) -> Tensor:
        if isinstance(group, QuorumGroup):
            raise self._unsupported("a broadcast")
        return super().broadcast_(flat, src, group, purpose)

    def broadcast_tensors_(self, tensors: Sequence[Tensor], src: int, group: Group, purpose: str) -> None:
        if isinstance(group, QuorumGroup):
            raise self._unsupported("a broadcast")
        super().broadcast_tensors_(tensors, src, group, purpose)

    def all_gather(self, local: Tensor, group: Group, purpose: str) -> Tensor:
        if isinstance(group, QuorumGroup):
            raise self._unsupported("an all-gather")
        return super().all_gather(local, group, purpose)

    def gather_object(self, obj: Any, group: Group, purpose: str) -> list[Any] | None:
        if isinstance(group, QuorumGroup):
            raise self._unsupported("gathering objects")
        return super().gather_object(obj, group, purpose)

    def start_mean(self, local: Tensor, group: Group, **kwargs: Any) -> PendingMean:
        if isinstance(group, QuorumGroup):
            raise self._unsupported("a background (overlapped) average")
        return super().start_mean(local, group, **kwargs)

    def send(self, tensor: Tensor, dst: int, group: Group, purpose: str, tag: int = 0) -> None:
        if isinstance(group, QuorumGroup):
            raise self._unsupported("a send")
        super().send(tensor, dst, group, purpose, tag)

    def recv_(self, tensor: Tensor, src: int | None, group: Group, purpose: str, tag: int = 0) -> int:
        if isinstance(group, QuorumGroup):
            raise self._unsupported("a receive")
        return super().recv_(tensor, src, group, purpose, tag)

    def timed_sum_(self, flat: Tensor, purpose: str, participants: int, run: Callable[[], bool]) -> bool:
        """Book ``run`` (a cross-group SUM of ``flat`` over ``participants`` groups) in the counters."""
        start = time.perf_counter()
        ok = run()
        m = max(participants, 1)
        self.counters.add(purpose, 2.0 * (m - 1) / m * flat.numel() * flat.element_size(), time.perf_counter() - start)
        return ok
