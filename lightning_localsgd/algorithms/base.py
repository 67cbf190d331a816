"""ConsensusAlgorithm: the base of every algorithm that keeps the replicas together (one per run).

A consensus algorithm is a Lightning :class:`~lightning.pytorch.callbacks.Callback` (so it sits in
``callbacks=[...]`` and its global state rides in the checkpoint) that a front end *drives* through
the calls below; it never reads the Trainer. The front end is
:class:`~lightning_localsgd.LocalSGDStrategy` (Trainer) or
:class:`lightning_localsgd.fabric.LocalSGDStrategy` (Fabric), through
:class:`~lightning_localsgd.engine.SyncEngine`.

=====================================  =========================================================
front-end event                        call
=====================================  =========================================================
training starts (optimizers exist)     :meth:`bind` — the :class:`~lightning_localsgd.contract.SyncContext`,
                                       the current step, this rank's restored state (or ``None``)
gradients ready, before the update     :meth:`wrap_closure` — warm-up gradient averaging
after every optimizer step             :meth:`after_step` — the sync schedule
evaluation start / end                 :meth:`begin_evaluation` / :meth:`end_evaluation`
end of training                        :meth:`finalize` — the consensus on every rank
saving                                 :meth:`consensus_state_dict`, :meth:`replica_state_dict`,
                                       :meth:`rank_state_dict` (+ Lightning's ``state_dict``)
=====================================  =========================================================

Steps are *completed optimizer steps* (``trainer.global_step`` after the step), so
``accumulate_grad_batches`` works unchanged.

What the base owns, written once for every algorithm:

* **The anchor**: the last consensus of the synchronized tensors, one flat fp32 (fp64 for an fp64
  model) tensor identical on every rank. Algorithms that need one (:meth:`needs_anchor`: DiLoCo's
  θ, EASGD's center, and any algorithm under a reduced-precision transport) get it at
  :meth:`bind`: restored from the checkpoint, agreed on by one average when resuming mid-period
  without one, and re-taken at every warm-up step (the replicas are equal there).
* **The error-feedback residual** of the integer transport (per rank, in checkpoints).
* **Fragments and overlap** (algorithms with ``overlappable = True``): the synchronized tensors are
  cut into ``fragments`` contiguous groups; fragment p syncs every H steps at offset
  :math:`\\lfloor (p+1)H/P \\rfloor`. With ``overlap_steps = τ > 0`` a fragment's average starts in
  the background at its sync step s and is merged τ steps later (see :meth:`merge`).
* **The evaluation swap**: evaluation and checkpoints see the consensus (:meth:`write_consensus`,
  the replicas' average by default); the replicas are put back exactly afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.profiler import record_function

from lightning_localsgd._checks import check_bool, check_int, check_number
from lightning_localsgd.contract import FrontEnd, RoundPosition, StepReport, SyncContext, SyncEvent
from lightning_localsgd.transport.collectives import Collectives, Group, NonFinitePolicy, PendingMean
from lightning_localsgd.transport.tensors import (
    BUFFER_POLICIES,
    BufferPolicy,
    Fragment,
    copy_,
    flat_layout,
    flatten,
    flatten_into,
    host_copy,
    local,
    partition,
    snapshot,
    sync_tensors,
    views,
)

__all__ = ["MERGE_RANGE", "SYNC_RANGE", "WAIT_RANGE", "Auto", "ConsensusAlgorithm", "InFlight"]

log = logging.getLogger(__name__)

Auto = Literal["auto"]
"""``"auto"``: the auto-tuner chooses this setting (docs/autotune.md)."""

# Profiler ranges (torch.profiler / Kineto traces): where a sync is issued, where the training thread
# waits for one that ran in the background, and where an overlapped sync is merged into the replica.
SYNC_RANGE = "lightning_localsgd::sync"
WAIT_RANGE = "lightning_localsgd::wait"
MERGE_RANGE = "lightning_localsgd::merge"


@dataclass
class InFlight:
    """A fragment's average started at step ``start``: ``pending`` gives the mean, ``sent`` what this rank sent."""

    start: int
    pending: PendingMean | None  # None once ``mean`` is known
    sent: Tensor  # this rank's values of the fragment at ``start`` (flat, full precision)
    mean: Tensor | None = None

    def result(self) -> Tensor:
        if self.mean is None:
            assert self.pending is not None
            self.mean, self.pending = self.pending.wait(), None
        return self.mean


class ConsensusAlgorithm(Callback):
    """Base class of the algorithms that keep the replicas together (one per run).

    Args:
        sync_every: optimizer steps between synchronizations (H); ``"auto"``: chosen by the auto-tuner
            (algorithms with ``tunable = True``; docs/autotune.md).
        warmup_steps: for the first ``warmup_steps`` optimizer steps gradients are averaged every
            step exactly like DDP ("post-local SGD"); local steps start afterwards.
        buffers: floating buffers (BatchNorm statistics) at a sync: ``"average"`` them,
            ``"broadcast"`` rank 0's, or keep them ``"local"``. Integer buffers always stay local.
        nonfinite: a replica holding NaN/Inf at a sync: ``"raise"`` an error naming the rank and
            step, or ``"skip"`` it (the others are averaged and every rank receives their mean).
        overlap_steps: τ, local steps a sync's communication overlaps (0: blocking). Only for
            algorithms with ``overlappable = True``. ``"auto"``: chosen by the auto-tuner.
        fragments: P, groups of tensors synced at staggered steps (1: the whole model at once);
            ``"auto"``: chosen by the auto-tuner.
        merge_alpha: how an overlapped sync is merged (see :meth:`merge`); ``None``: keep the
            local progress made during the overlap.
        offload: keep every model-sized tensor this algorithm holds between steps (the anchor,
            DiLoCo's outer state, the error-feedback residual, the values an overlapped sync was sent
            with, ModifiedLocalGD's z/q, LSGD's leader copies) in host memory, pinned when the model
            is on an accelerator, and let the transport free its flat buffers after each sync.
            Costs host-device copies at each sync (and at each step for ModifiedLocalGD's z);
            docs/gpu.md has what each configuration then holds on the device.
    """

    overlappable: ClassVar[bool] = False  # supports overlap_steps, fragments, merge_alpha
    equalizes: ClassVar[bool] = True  # a whole sync leaves every replica equal (EASGD's does not)
    fault_tolerant: ClassVar[bool] = False  # all its state is global: a healing replica group can receive it
    needs_loss: ClassVar[bool] = False  # reads StepReport.loss (a device-to-host read every step): LSGD only
    tunable: ClassVar[bool] = False  # takes "auto" for sync_every / overlap_steps / fragments (the auto-tuner)

    def __init__(
        self,
        sync_every: int | Auto,
        *,
        warmup_steps: int = 0,
        buffers: BufferPolicy = "average",
        nonfinite: NonFinitePolicy = "raise",
        overlap_steps: int | Auto = 0,
        fragments: int | Auto = 1,
        merge_alpha: float | None = None,
        offload: bool = False,
    ) -> None:
        given = {"sync_every": sync_every, "overlap_steps": overlap_steps, "fragments": fragments}
        self.auto: frozenset[str] = frozenset(k for k, v in given.items() if isinstance(v, str) and v == "auto")
        if self.auto and not self.tunable:
            raise ValueError(
                f"{type(self).__name__} cannot be auto-tuned ({', '.join(sorted(self.auto))}='auto'): give numbers, "
                "or use PeriodicAveraging or DiLoCo"
            )
        if self.auto - {"sync_every"} and not self.overlappable:
            raise ValueError(
                f"{type(self).__name__} cannot overlap or fragment its syncs: drop overlap_steps/fragments"
            )
        # until the tuner decides (docs/autotune.md): no sync is due, and one whole blocking sync is the schedule
        sync_every = _PENDING if sync_every == "auto" else sync_every
        overlap_steps = 0 if overlap_steps == "auto" else overlap_steps
        fragments = 1 if fragments == "auto" else fragments
        self.sync_every = check_int("sync_every", sync_every)
        self.offload = check_bool("offload", offload)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        if buffers not in BUFFER_POLICIES:
            raise ValueError(f"buffers must be one of {BUFFER_POLICIES}, got {buffers!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        self.overlap_steps = check_int("overlap_steps", overlap_steps, minimum=0)
        self.fragments = check_int("fragments", fragments)
        name = type(self).__name__
        if not self.overlappable and (self.overlap_steps or self.fragments != 1 or merge_alpha is not None):
            raise ValueError(
                f"{name} cannot overlap or fragment its syncs (its sync is not an average that can arrive late): "
                "drop overlap_steps/fragments/merge_alpha, or use PeriodicAveraging or DiLoCo"
            )
        if self.overlap_steps >= self.sync_every:
            raise ValueError(
                f"overlap_steps={overlap_steps} must be smaller than sync_every={sync_every} (a sync must land "
                f"before the next one starts): use overlap_steps <= {sync_every - 1}"
            )
        if self.fragments > self.sync_every:
            raise ValueError(
                f"fragments={fragments} needs sync_every >= {fragments} (one fragment starts per step at most): "
                f"raise sync_every or use fragments <= {sync_every}"
            )
        if merge_alpha is not None:
            check_number("merge_alpha", merge_alpha, 0, 1, example="0.5 (or None)")
            if self.overlap_steps == 0 and "overlap_steps" not in self.auto:
                raise ValueError("merge_alpha has no effect without overlap_steps > 0: drop it or set overlap_steps")
        self.merge_alpha = None if merge_alpha is None else float(merge_alpha)
        self.buffers: BufferPolicy = buffers
        self.nonfinite: NonFinitePolicy = nonfinite
        self.last_sync_step = 0  # optimizer step at which the replicas were last made equal
        self.num_syncs = 0  # completed synchronizations (each fragment's counts once)
        self.anchor: Tensor | None = None  # flat last consensus of the synchronized tensors
        self.residual: Tensor | None = None  # flat error-feedback residual (integer transport)
        self.anchor_device: torch.device | None = torch.device("cpu") if self.offload else None
        self._ctx: SyncContext | None = None
        self._fragments: list[Fragment] = []
        self._inflight: dict[int, InFlight] = {}
        self._loaded: dict[str, Any] | None = None  # global state read from a checkpoint, applied at bind
        self._stash: dict[str, Tensor] | None = None  # replicas parked during evaluation
        # The schedule's origin: rounds are counted from step `origin` (None: from the end of warm-up).
        # The auto-tuner moves it to the step where it set sync_every / overlap_steps / fragments.
        self.origin: int | None = None
        self.awaiting_tune = bool(self.auto)  # local steps only, until the tuner's first decision
        self.reserve_anchor = False  # keep an anchor even if needs_anchor() says no (the tuner may pick a wire)
        self.tuning_record: dict[str, Any] | None = None  # the tuner's measurements and decision (checkpointed)
        self.interruptions = 0  # evaluations and checkpoints so far (the tuner leaves their time out)

    # ================================================================== what subclasses implement
    def needs_anchor(self) -> bool:
        """Whether this algorithm keeps an anchor; by default only under a reduced-precision transport."""
        return self.comm.comm_dtype is not None

    def on_bind(self, fresh: bool) -> None:
        """Build derived state after the anchor exists (``fresh``: not restored from a checkpoint)."""

    def sync(self, step: int) -> None:
        """A blocking sync of the whole model at ``step`` (every rank calls it at the same step).

        The default averages every fragment; :meth:`consensus_of` says what each average becomes.
        """
        averaged, broadcast = self.sync_tensors()
        for fragment in self._fragments:
            self._average_fragment(fragment, step, averaged)
        if broadcast:  # buffers="broadcast": rank 0's
            self.broadcast_buffers_(broadcast)

    def consensus_of(self, fragment: Fragment, mean: list[Tensor]) -> list[Tensor]:
        """The new consensus of ``fragment`` given the replicas' average ``mean`` (tensors shaped like
        the fragment's). The default is the average itself; the anchor, if any, follows it."""
        if self.anchor is not None:
            flatten_into(mean, self.anchor[fragment.offset : fragment.offset + fragment.numel])
        return mean

    def write_consensus(self, purpose: str = "eval") -> None:
        """Put the consensus into the module (collective, booked under ``purpose``). Default: the replicas' average
        (under ``nonfinite="skip"`` the average of the finite ones, as at a sync)."""
        self.comm.mean_(list(self._named_state().values()), self.world, purpose=purpose, nonfinite=self.nonfinite)

    def check_front_end(self, front_end: FrontEnd) -> None:
        """Raise, with the fix, if this algorithm cannot run under ``front_end`` (called at setup by both)."""

    # ================================================================== Lightning callback hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and not isinstance(trainer.strategy, FrontEnd):
            raise TypeError(
                f"{type(self).__name__} needs the local-SGD strategy: use Trainer(strategy='localsgd', "
                f"callbacks=[{type(self).__name__}(...)]) instead of strategy={type(trainer.strategy).__name__}."
            )

    def state_dict(self) -> dict[str, Any]:
        """Global state, identical on every rank (rank 0 writes it)."""
        state: dict[str, Any] = {"last_sync_step": self.last_sync_step, "num_syncs": self.num_syncs}
        if self.anchor is not None:
            state["anchor"] = self.anchor.detach().cpu().clone()
        elif self._loaded is not None and "anchor" in self._loaded:
            state["anchor"] = self._loaded["anchor"]
        if self._inflight:  # the averages in flight are finished now so that a resume can merge them on time
            state["inflight"] = {p: {"start": f.start, "mean": f.result().cpu()} for p, f in self._inflight.items()}
        if self.tuning_record is not None and not self.awaiting_tune:  # the tuner's choice: a resume keeps it
            state["schedule"] = {
                "sync_every": self.sync_every,
                "overlap_steps": self.overlap_steps,
                "fragments": self.fragments,
                "origin": self.origin,
            }
            state["autotune"] = self.tuning_record
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_sync_step = int(state_dict["last_sync_step"])
        self.num_syncs = int(state_dict["num_syncs"])
        self._loaded = dict(state_dict)
        schedule = state_dict.get("schedule")
        if schedule is not None:  # the tuned schedule (explicit arguments stay as given)
            for name in self.auto:
                setattr(self, name, int(schedule[name]))
            self.origin = None if schedule["origin"] is None else int(schedule["origin"])
            self.awaiting_tune = False
            self.tuning_record = state_dict.get("autotune")

    # ================================================================== the contract
    def bind(self, ctx: SyncContext, step: int, restored: dict[str, Any] | None = None) -> None:
        """Start driving this algorithm: replicas are equal, or restored from a checkpoint.

        Args:
            ctx: the module, transport and groups.
            step: completed optimizer steps so far (the checkpoint's when resuming).
            restored: this rank's :meth:`rank_state_dict` from the checkpoint; on another world size
                what :meth:`reduce_rank_states` made of the saved ranks' (``None``: fresh).
        """
        self._ctx = ctx
        loaded, fresh = self._loaded, self._loaded is None
        log.debug("%s: bound at step %d (%s)", type(self).__name__, step, "fresh" if fresh else "restored")
        if fresh:
            self.last_sync_step = step
        averaged, _ = self.sync_tensors()
        self._fragments = partition(averaged, self.fragments, flat_layout(self.module, self.buffers))
        self.anchor = self.residual = None
        self._inflight = {}
        if self.needs_anchor() or self.reserve_anchor:
            self.anchor = self.hold(flatten(snapshot(averaged, device=self.anchor_device)))
            if loaded is not None and loaded.get("anchor") is not None:
                saved = loaded["anchor"]
                if saved.numel() != self.anchor.numel():
                    raise ValueError(
                        f"the checkpoint's {type(self).__name__} anchor holds {saved.numel()} values but this model "
                        f"syncs {self.anchor.numel()}: resume with the same model and the same `buffers` policy"
                    )
                self.anchor.copy_(saved)
            elif not self.is_synced(step):  # restored mid-period without an anchor: agree on one
                agreed = self.anchor.to(averaged[0].device)  # the wire's device (the anchor may be offloaded)
                self.comm.mean_([agreed], self.world, purpose="setup")
                self.anchor.copy_(agreed)
            if self.comm.quantized:
                self.residual = self.hold(torch.zeros_like(self.anchor, device=averaged[0].device))
        self.comm.keep_buffers = not self.offload
        self.on_bind(fresh)
        if restored is not None:
            self.load_rank_state_dict(restored)
        if loaded is not None and restored is not None:
            for p, f in (loaded.get("inflight") or {}).items():
                sent = restored.get("inflight_sent", {}).get(p)
                device = averaged[0].device
                sent = self.hold(sent.to(device))
                self._inflight[int(p)] = InFlight(int(f["start"]), None, sent, f["mean"].to(device))
        self._loaded = None

    def wrap_closure(self, closure: Callable[[], Any], step: int) -> Callable[[], Any]:
        """During warm-up, average the gradients after backward, before clipping and the update."""
        if not self.in_warmup(step):
            return closure

        def closure_with_allreduce() -> Any:
            out = closure()
            params = [p for p in self.module.parameters() if p.requires_grad]
            for p in params:
                if p.grad is None:  # unused on this rank: contribute zeros, as DDP does
                    p.grad = torch.zeros_like(p)
            self.comm.mean_([local(p.grad) for p in params], self.world, purpose="grad", step=step)
            return out

        return closure_with_allreduce

    def after_step(self, step: int, report: StepReport | None = None) -> None:
        """Called after optimizer step ``step`` (1-based). Runs the sync schedule."""
        if self.in_warmup(step):
            self.last_sync_step = step  # gradients were averaged: replicas are still equal
            if self.anchor is not None:  # ... and equal to the consensus
                flatten_into(self.sync_tensors()[0], self.anchor)
            return
        if self.awaiting_tune:
            return  # the tuner's measuring steps: local steps only
        for p, flight in list(self._inflight.items()):
            if flight.start + self.overlap_steps == step:
                self._finish(self._fragments[p], step)
        self.syncs_due_(step)

    def syncs_due_(self, step: int) -> None:
        """Run or start the syncs the schedule has at ``step`` (after the merges due there).

        Also how a replica group that joins the others at their sync of ``step`` takes part in it
        (fault tolerance): the same blocking sync, fragment or overlapped start as theirs.
        """
        if self.overlap_steps == 0 and len(self._fragments) == 1:
            if self.is_due(step, self.sync_every):
                self.whole_sync(step)
            return
        for fragment in self._fragments:
            if self._fragment_due(fragment, step):
                if self.overlap_steps == 0:
                    self._sync_blocking(fragment, step)
                else:
                    self._start(fragment, step)

    def position(self, step: int) -> RoundPosition:
        """Where ``step`` falls in the schedule (what a gradient modifier needs to know)."""
        offset = step - 1 - self.schedule_start
        rounds, within = divmod(max(offset, 0), self.sync_every)
        return RoundPosition(step, self.in_warmup(step), rounds, within, self.sync_every)

    def begin_evaluation(self, step: int) -> None:
        """Swap the replicas for the consensus; :meth:`end_evaluation` swaps them back exactly."""
        self.interruptions += 1
        if self._stash is not None or self.holds_consensus(step):
            return
        log.debug("%s: evaluation at step %d sees the consensus", type(self).__name__, step)
        self._park()
        self.write_consensus()

    def end_evaluation(self) -> None:
        if self._stash is None:
            return
        named = self._named_state()
        copy_([named[k] for k in self._stash], list(self._stash.values()))
        self._stash = None

    def finalize(self, step: int) -> None:
        """End of fit: merge what is in flight, then one last blocking sync unless the replicas are equal."""
        log.debug("%s: finalize at step %d (%d syncs in flight)", type(self).__name__, step, len(self._inflight))
        for p in list(self._inflight):
            self._finish(self._fragments[p], step)
        if not self.is_synced(step):
            self.whole_sync(step)

    # ------------------------------------------------------------------ checkpoints
    def replica_state_dict(self) -> dict[str, Tensor]:
        """This rank's own model state (the parked replica while an evaluation swap is active)."""
        state = self.module.state_dict()
        if self._stash is not None:
            state = {k: self._stash.get(k, v) for k, v in state.items()}
        return {k: v.detach().clone() for k, v in state.items()}

    def consensus_state_dict(self, state_dict: dict[str, Any], step: int) -> dict[str, Any]:
        """The model a checkpoint stores: the consensus (collective on every rank)."""
        self.interruptions += 1
        if self._stash is not None or self.holds_consensus(step):
            return state_dict  # the module holds the consensus already
        self._park()
        self.write_consensus("checkpoint")
        out = dict(state_dict)
        out.update((k, v.detach().clone()) for k, v in self.module.state_dict().items() if k in self._stash)
        self.end_evaluation()
        return out

    def rank_state_dict(self) -> dict[str, Any]:
        """Per-rank algorithm state that differs between ranks (saved for every rank)."""
        state: dict[str, Any] = {}
        if self.residual is not None:
            state["residual"] = self.residual.detach().cpu().clone()
        if self._inflight:
            state["inflight_sent"] = {p: f.sent.detach().cpu().clone() for p, f in self._inflight.items()}
        return state

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`rank_state_dict` returned on this rank."""
        if self.residual is not None and state.get("residual") is not None:
            self.residual.copy_(state["residual"])

    @staticmethod
    def reduce_rank_states(states: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
        r"""Per-rank states for a resume on ``world_size`` ranks from the ``states`` of another world size.

        The residual's *sum* over ranks is what error feedback still owes: it is split evenly over
        the new ranks, so nothing is lost. A sync in flight still lands at its step, with the values
        each new rank "sent" set to the saved ranks' average :math:`\bar s`: every rank restarts from
        the replicas' average :math:`\bar x`, and since :meth:`merge` is affine in the replica and
        the sent values, :math:`\bar x + (c - \bar s)` (or :math:`(1-\alpha)c + \alpha\bar x`) is
        exactly the average of what the saved ranks would have merged to; the new consensus
        :math:`c` (e.g. DiLoCo's outer step) is computed from the saved mean as it would have been.
        Subclasses add their own state.
        """
        residuals = [s["residual"] for s in states if s.get("residual") is not None]
        share = torch.stack(residuals).sum(0) / world_size if residuals else None
        sent = [s.get("inflight_sent") or {} for s in states]
        inflight = {p: torch.stack([s[p] for s in sent if p in s]).mean(0) for p in sorted(set().union(*sent))}
        out: list[dict[str, Any]] = []
        for _ in range(world_size):
            mine: dict[str, Any] = {"residual": None if share is None else share.clone()}
            if inflight:
                mine["inflight_sent"] = {p: v.clone() for p, v in inflight.items()}
            out.append(mine)
        return out

    # ------------------------------------------------------------------ global state moved between live jobs
    @torch.no_grad()
    def load_shared_state_(self, state: dict[str, Any]) -> None:
        """Replace this bound algorithm's global state by ``state`` (another replica's :meth:`state_dict`), in place.

        The anchor keeps its storage (DiLoCo's θ pieces and outer optimizer parameters are views of
        it). Used by fault tolerance when a replica group heals from a live peer; subclasses with
        more global state extend it (``fault_tolerant`` algorithms).
        """
        self.last_sync_step = int(state["last_sync_step"])
        self.num_syncs = int(state["num_syncs"])
        if self.anchor is not None:
            self.anchor.copy_(state["anchor"])

    def shared_tensors(self) -> list[Tensor]:
        """The floating tensors of the global state (equal on every rank): the anchor, and what subclasses add."""
        return [] if self.anchor is None else [self.anchor]

    # ================================================================== helpers for subclasses
    @property
    def ctx(self) -> SyncContext:
        if self._ctx is None:
            raise RuntimeError(f"{type(self).__name__} is not bound yet: it is bound when fit starts")
        return self._ctx

    @property
    def module(self) -> nn.Module:
        return self.ctx.module

    @property
    def comm(self) -> Collectives:
        return self.ctx.comm

    @property
    def world(self) -> Group:
        return self.ctx.world

    @property
    def node(self) -> Group:
        return self.ctx.node

    def sync_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        """``(averaged, broadcast)`` tensors of the module under this algorithm's buffer policy."""
        return sync_tensors(self.module, self.buffers)

    def anchor_views(self) -> list[Tensor]:
        """The anchor cut into tensors shaped like :meth:`sync_tensors`' averaged list (views)."""
        assert self.anchor is not None
        return views(self.anchor, self.sync_tensors()[0])

    def average_(
        self,
        tensors: list[Tensor],
        step: int,
        *,
        node: bool = False,
        anchor: Tensor | None = None,
        residual: Tensor | None = None,
    ) -> None:
        """Average ``tensors`` over the world (or this node) with the transport; observers see it."""
        group = self.node if node else self.world
        self.comm.mean_(
            tensors,
            group,
            purpose="sync",
            anchor=anchor,
            residual=residual,
            nonfinite=self.nonfinite,
            step=step,
            observer=self.observer_for(step, node),
        )

    def observer_for(self, step: int, node: bool = False) -> Callable[[Tensor, Tensor], None] | None:
        """``observer(local, mean)`` telling the sync observers about a sync (``None`` if nobody looks)."""
        if not self.ctx.observers:
            return None
        group = self.node if node else self.world
        return lambda local, mean: self.ctx.notify(SyncEvent(step, node, local, mean, group, self.comm))

    def broadcast_buffers_(self, tensors: list[Tensor], *, node: bool = False) -> None:
        """Give every rank of the world (or node) the first rank's copy of ``tensors``."""
        group = self.node if node else self.world
        self.comm.broadcast_tensors_(tensors, src=group.ranks[0], group=group, purpose="sync")

    def in_warmup(self, step: int) -> bool:
        return step <= self.warmup_steps

    @property
    def schedule_start(self) -> int:
        """The step rounds are counted from: the end of warm-up, or where the auto-tuner set the schedule."""
        return self.warmup_steps if self.origin is None else self.origin

    def is_due(self, step: int, every: int) -> bool:
        """True at the steps ``start + every, start + 2·every, ...`` (``start``: :attr:`schedule_start`)."""
        start = self.schedule_start
        return step > start and (step - start) % every == 0

    def agrees_at(self, step: int) -> bool:
        """Whether the ranks meet at ``step`` anyway: a warm-up step or the step that ends a round with its sync.

        The strategy lets Lightning's per-batch SIGTERM broadcast run only before these steps
        (:mod:`lightning_localsgd.trainer.sigterm`): between them a training step sends nothing.
        """
        return self.in_warmup(step) or (not self.awaiting_tune and self.is_due(step, self.sync_every))

    def is_synced(self, step: int) -> bool:
        """Whether the replicas are equal after ``step`` (no local step since they were made equal)."""
        return self.last_sync_step == step

    def holds_consensus(self, step: int) -> bool:
        """Whether the module already holds the consensus at ``step`` (nothing to swap in)."""
        return self.is_synced(step) and not self._inflight

    def mark_equal(self, step: int) -> None:
        """Record that the replicas were made equal at ``step``."""
        self.last_sync_step = step

    def wire_anchor(self, fragment: Fragment) -> Tensor | None:
        """The anchor slice a reduced-precision transport sends differences against (``None``: raw values)."""
        if self.anchor is None or self.comm.comm_dtype is None:
            return None
        piece = self.anchor[fragment.offset : fragment.offset + fragment.numel]
        return piece if piece.device == fragment.device else piece.to(fragment.device)

    def hold(self, tensor: Tensor) -> Tensor:
        """``tensor`` as this algorithm keeps it between steps: itself, or a (pinned) host copy under ``offload``."""
        return host_copy(tensor) if self.offload else tensor

    def residual_of(self, fragment: Fragment) -> Tensor | None:
        if self.residual is None:
            return None
        return self.residual[fragment.offset : fragment.offset + fragment.numel]

    def _named_state(self) -> dict[str, Tensor]:
        """Parameters and floating buffers by state-dict name (what evaluation averages)."""
        module = self.module
        named = {k: local(p) for k, p in module.named_parameters()}  # a sharded parameter: this rank's shard
        if self.buffers != "local":
            named.update((k, b) for k, b in module.named_buffers() if torch.is_floating_point(b))
        return named

    def _park(self) -> None:
        self._stash = {name: t.detach().clone() for name, t in self._named_state().items()}

    # ================================================================== the auto-tuner's entry points
    @property
    def in_flight(self) -> int:
        """How many fragments' syncs are in flight (started, not merged yet)."""
        return len(self._inflight)

    def drain_(self, step: int) -> None:
        """Merge every sync in flight now, at ``step`` (before a schedule change; as :meth:`finalize` does)."""
        for p in list(self._inflight):
            self._finish(self._fragments[p], step)

    @torch.no_grad()
    def apply_schedule_(self, step: int, sync_every: int, overlap_steps: int, fragments: int) -> None:
        """Run the schedule ``(sync_every, overlap_steps, fragments)`` from ``step`` on (the auto-tuner's choice).

        Rounds count from ``step`` (:attr:`schedule_start`): fragment p next syncs at
        ``step + ⌊(p+1)H/P⌋``. Nothing may be in flight (:meth:`drain_`). The first decision, made
        before any sync, may also change the fragments and the wire format: the fragments are cut
        again and the state built on them (DiLoCo's outer optimizers) is built again, fresh; the
        anchor is still the consensus of the bind step, so it stays (or is dropped if the chosen
        wire no longer needs one); an integer wire gets a zero residual. Later changes (re-tuning)
        keep the fragments and the wire: they change H and τ only.
        """
        if self._inflight:
            raise RuntimeError("apply_schedule_ needs no sync in flight: call drain_(step) first")
        first = self.awaiting_tune
        if not first and fragments != self.fragments:
            raise ValueError("the fragments are chosen once, before the first sync: a re-tune keeps them")
        if overlap_steps and not self.overlappable:
            raise ValueError(f"{type(self).__name__} cannot overlap its syncs")
        if overlap_steps >= sync_every or fragments > sync_every:
            raise ValueError(
                f"bad schedule: overlap_steps={overlap_steps}, fragments={fragments}, sync_every={sync_every}"
            )
        self.sync_every, self.overlap_steps, self.fragments = sync_every, overlap_steps, fragments
        self.origin, self.awaiting_tune = step, False
        if first:
            averaged, _ = self.sync_tensors()
            self._fragments = partition(averaged, self.fragments, flat_layout(self.module, self.buffers))
            if self.anchor is not None and not self.needs_anchor():
                self.anchor = None  # a full-precision wire: PeriodicAveraging keeps no anchor
            self.residual = None
            if self.anchor is not None and self.comm.quantized:
                self.residual = self.hold(torch.zeros_like(self.anchor, device=averaged[0].device))
            self.on_bind(True)
        log.info(
            "%s: from step %d on, sync_every=%d, overlap_steps=%d, fragments=%d",
            type(self).__name__,
            step,
            sync_every,
            overlap_steps,
            fragments,
        )

    # ================================================================== fragments and overlap
    def _fragment_due(self, fragment: Fragment, step: int) -> bool:
        """Fragment p starts its sync at ``warmup + ⌊(p+1)H/P⌋ + kH`` (P = 1: every H steps)."""
        offset = (fragment.index + 1) * self.sync_every // len(self._fragments)
        since = step - self.schedule_start - offset
        return since >= 0 and since % self.sync_every == 0

    def whole_sync(self, step: int) -> None:
        """One blocking sync of the whole model at ``step``, counted; the replicas are marked equal if it equalizes."""
        log.debug("%s: blocking sync at step %d", type(self).__name__, step)
        with record_function(SYNC_RANGE):
            self.sync(step)
        self.num_syncs += 1
        if self.equalizes:
            self.mark_equal(step)

    def _average_fragment(self, fragment: Fragment, step: int, averaged: list[Tensor]) -> None:
        """Average one fragment now and put its new consensus into the replica."""
        tensors = fragment.tensors(averaged)
        self.average_(tensors, step, anchor=self.wire_anchor(fragment), residual=self.residual_of(fragment))
        target = self.consensus_of(fragment, tensors)
        if target is not tensors:
            copy_(tensors, target)

    def _sync_blocking(self, fragment: Fragment, step: int) -> None:
        """One fragment's blocking sync on its own schedule (fragments > 1, no overlap)."""
        log.debug("%s: blocking sync of fragment %d at step %d", type(self).__name__, fragment.index, step)
        with record_function(SYNC_RANGE):
            averaged, broadcast = self.sync_tensors()
            self._average_fragment(fragment, step, averaged)
            self._after_fragment(fragment, broadcast)

    def _start(self, fragment: Fragment, step: int) -> None:
        """Start averaging ``fragment`` in the background; local steps go on."""
        log.debug(
            "%s: fragment %d starts its sync at step %d (lands at %d)",
            type(self).__name__,
            fragment.index,
            step,
            step + self.overlap_steps,
        )
        with record_function(SYNC_RANGE):
            tensors = fragment.tensors(self.sync_tensors()[0])
            sent = flatten(tensors)
            if self.anchor is not None:
                sent = sent.to(self.anchor.dtype)
            sent = self.hold(sent)  # kept until the merge: in host memory under offload
            group = self.ctx.background or self.world
            pending = self.comm.start_mean(
                sent,
                group,
                anchor=self.wire_anchor(fragment),
                residual=self.residual_of(fragment),
                nonfinite=self.nonfinite,
                step=step,
                device=tensors[0].device,
            )
        self._inflight[fragment.index] = InFlight(step, pending, sent)

    def _finish(self, fragment: Fragment, step: int) -> None:
        """Wait for ``fragment``'s average, compute its consensus and merge it into the replica."""
        flight = self._inflight.pop(fragment.index)
        log.debug(
            "%s: fragment %d merges the sync of step %d at step %d",
            type(self).__name__,
            fragment.index,
            flight.start,
            step,
        )
        with record_function(WAIT_RANGE):
            mean = flight.result()
        if self.ctx.observers:
            self.ctx.notify(SyncEvent(flight.start, False, flight.sent, mean, self.world, self.comm))
        with record_function(MERGE_RANGE):
            averaged, broadcast = self.sync_tensors()
            tensors = fragment.tensors(averaged)
            target = self.consensus_of(fragment, views(mean, tensors))
            self.merge(tensors, target, views(flight.sent, tensors))
            self._after_fragment(fragment, broadcast)

    @torch.no_grad()
    def merge(self, replica: list[Tensor], target: list[Tensor], sent: list[Tensor]) -> None:
        r"""Merge an overlapped sync into the replica, τ steps after its values were sent.

        With :math:`x_i^{(s)}` the values sent at step s, :math:`c` the new consensus and
        :math:`x_i` the replica now (τ local steps later):

        .. math::
            \text{merge\_alpha = None:}\quad x_i &\leftarrow x_i + (c - x_i^{(s)})
                \qquad\text{(keep the local progress of the τ steps)}\\
            \text{merge\_alpha} = \alpha:\quad x_i &\leftarrow (1-\alpha)\,c + \alpha\,x_i
                \qquad\text{(torchft's } \texttt{fragment\_update\_alpha}\text{)}

        With τ = 0 both give :math:`x_i \leftarrow c`, the blocking sync.
        """
        if self.merge_alpha is None:
            for x, c, s in zip(replica, target, sent, strict=True):
                x.add_(c.to(x) - s.to(x))  # to(x): dtype and device (a CPU anchor_device)
        else:
            for x, c in zip(replica, target, strict=True):
                x.lerp_(c.to(x), 1.0 - self.merge_alpha)

    def _after_fragment(self, fragment: Fragment, broadcast: list[Tensor]) -> None:
        """A fragment's sync is complete (the replicas still differ: other fragments, or local progress)."""
        if fragment.index == len(self._fragments) - 1 and broadcast:  # buffers="broadcast": rank 0's
            self.broadcast_buffers_(broadcast)
        self.num_syncs += 1


check_positive_int = check_int  # the name before 0.2 (lightning_localsgd._checks.check_int)

_PENDING = 1 << 30
"""``sync_every`` until the auto-tuner decides: no sync is due (the tuner's measuring steps are local steps)."""
