"""The contract between :class:`~lightning_localsgd.LocalSGDStrategy` and a consensus algorithm.

A consensus algorithm is a Lightning :class:`~lightning.pytorch.callbacks.Callback` (so it sits in
``Trainer(callbacks=[...])`` and its state rides in the checkpoint) that the strategy *drives*:

=====================================  =========================================================
strategy event                         algorithm hook
=====================================  =========================================================
end of ``strategy.setup`` (fit)        :meth:`attach` — snapshot anchors unless just restored
gradients ready, before the update     :meth:`wrap_closure` — warm-up gradient averaging
after every optimizer step             :meth:`after_step` — the sync schedule
validation / test start and end        :meth:`begin_evaluation` / :meth:`end_evaluation`
end of training                        :meth:`finalize` — leave the consensus on every rank
checkpoint save / load                 :meth:`consensus_state_dict`, :meth:`rank_state_dict`
=====================================  =========================================================

Steps are counted as the number of *completed optimizer steps* (``trainer.global_step`` after the
step), so ``accumulate_grad_batches`` works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_localsgd.comm import NonFinitePolicy
from lightning_localsgd.params import BUFFER_POLICIES, BufferPolicy, copy_, sync_tensors

if TYPE_CHECKING:
    from lightning_localsgd.strategy import LocalSGDStrategy


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Validate an integer argument with a message that says what to pass instead."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class ConsensusAlgorithm(Callback):
    """Base class of the algorithms that keep the replicas together (one per run).

    Args:
        sync_every: optimizer steps between synchronizations (H).
        warmup_steps: for the first ``warmup_steps`` optimizer steps gradients are averaged every
            step exactly like DDP ("post-local SGD"); local steps start afterwards.
        buffers: floating buffers (BatchNorm statistics) at a sync: ``"average"`` them,
            ``"broadcast"`` rank 0's, or keep them ``"local"``. Integer buffers always stay local.
        nonfinite: a replica holding NaN/Inf at a sync: ``"raise"`` an error naming the rank and
            step, or ``"skip"`` it (the others are averaged and every rank receives their mean).
    """

    def __init__(
        self,
        sync_every: int,
        *,
        warmup_steps: int = 0,
        buffers: BufferPolicy = "average",
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        self.sync_every = check_positive_int("sync_every", sync_every)
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps, minimum=0)
        if buffers not in BUFFER_POLICIES:
            raise ValueError(f"buffers must be one of {BUFFER_POLICIES}, got {buffers!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        self.buffers: BufferPolicy = buffers
        self.nonfinite: NonFinitePolicy = nonfinite
        self.last_sync_step = 0  # optimizer step at which the replicas were last made equal
        self.num_syncs = 0
        self._strategy: LocalSGDStrategy | None = None
        self._loaded = False  # state came from a checkpoint: do not re-snapshot anchors
        self._stash: dict[str, Tensor] | None = None  # replicas parked during evaluation
        self._grads_averaged_at = -1  # step whose update used world-averaged gradients (GradAlign K = 1)

    # ------------------------------------------------------------------ Lightning callback hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from lightning_localsgd.strategy import LocalSGDStrategy

        if stage == "fit" and not isinstance(trainer.strategy, LocalSGDStrategy):
            raise TypeError(
                f"{type(self).__name__} needs the local-SGD strategy: use Trainer(strategy='localsgd', "
                f"callbacks=[{type(self).__name__}(...)]) instead of strategy={type(trainer.strategy).__name__}."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"last_sync_step": self.last_sync_step, "num_syncs": self.num_syncs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_sync_step = int(state_dict["last_sync_step"])
        self.num_syncs = int(state_dict["num_syncs"])
        self._loaded = True

    # ------------------------------------------------------------------ helpers for subclasses
    @property
    def strategy(self) -> LocalSGDStrategy:
        if self._strategy is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a LocalSGDStrategy yet")
        return self._strategy

    @property
    def module(self) -> LightningModule:
        module = self.strategy.lightning_module
        assert module is not None
        return module

    def tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        """``(averaged, broadcast)`` tensors of the module under this algorithm's buffer policy."""
        return sync_tensors(self.module, self.buffers)

    def average_(
        self, tensors: list[Tensor], step: int, *, node: bool = False, anchor: Tensor | list[Tensor] | None = None
    ) -> None:
        """Average ``tensors`` over the world (or this node) with the strategy's transport."""
        strategy = self.strategy
        strategy.comm.mean_(
            tensors,
            strategy.node_group if node else strategy.world_group,
            kind="sync",
            anchor=anchor,
            nonfinite=self.nonfinite,
            step=step,
            observer=strategy.sync_observer(step, node=node),
        )

    def broadcast_buffers_(self, tensors: list[Tensor], *, node: bool = False) -> None:
        """Give every rank of the world (or node) the first rank's copy of ``tensors``."""
        group = self.strategy.node_group if node else self.strategy.world_group
        self.strategy.comm.broadcast_tensors_(tensors, src=group.ranks[0], group=group, kind="sync")

    def in_warmup(self, step: int) -> bool:
        return step <= self.warmup_steps

    def is_due(self, step: int, every: int) -> bool:
        """True at the steps ``warmup_steps + every, warmup_steps + 2·every, ...``."""
        return step > self.warmup_steps and (step - self.warmup_steps) % every == 0

    def is_synced(self) -> bool:
        """Whether the replicas are equal right now (no local step since the last sync)."""
        return self.last_sync_step == self.module.trainer.global_step

    # ------------------------------------------------------------------ driven by the strategy
    def attach(self, strategy: LocalSGDStrategy) -> None:
        """Called at the end of ``strategy.setup`` when fitting; replicas are equal or restored."""
        self._strategy = strategy
        if not self._loaded:
            self.last_sync_step = self.module.trainer.global_step
            self.on_fresh_start()

    def on_fresh_start(self) -> None:
        """Snapshot anchors here (not called when the state was loaded from a checkpoint)."""

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
            self.strategy.comm.mean_([p.grad for p in params], self.strategy.world_group, kind="grad", step=step)
            return out

        return closure_with_allreduce

    def after_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based). Runs the sync schedule."""
        if self.in_warmup(step):
            self.last_sync_step = step  # gradients were averaged: replicas are still equal
        elif self.is_due(step, self.sync_every):
            self.sync(step)
            self.last_sync_step = step
            self.num_syncs += 1

    def note_gradients_averaged(self, step: int) -> None:
        """A gradient modifier (GradAlign K = 1) averaged step ``step``'s gradients over the world."""
        self._grads_averaged_at = step

    def sync(self, step: int) -> None:
        """Make the replicas agree; called on every rank at the same step."""
        raise NotImplementedError

    def finalize(self, step: int) -> None:
        """End of fit: leave the consensus model on every rank."""
        if not self.is_synced():
            self.sync(step)
            self.last_sync_step = step
            self.num_syncs += 1

    def begin_evaluation(self) -> None:
        """Swap the replicas for their average; :meth:`end_evaluation` swaps them back exactly."""
        if self.is_synced() or self._stash is not None:
            return
        named = self._named_state()
        self._stash = {name: t.detach().clone() for name, t in named.items()}
        self.strategy.comm.mean_(list(named.values()), self.strategy.world_group, kind="eval")

    def end_evaluation(self) -> None:
        if self._stash is None:
            return
        named = self._named_state()
        copy_([named[k] for k in self._stash], list(self._stash.values()))
        self._stash = None

    def _named_state(self) -> dict[str, Tensor]:
        """Parameters and floating buffers by state-dict name (what evaluation averages)."""
        module = self.module
        named = dict(module.named_parameters())
        if self.buffers != "local":
            named.update((k, b) for k, b in module.named_buffers() if torch.is_floating_point(b))
        return named

    # ------------------------------------------------------------------ checkpoints
    def replica_state_dict(self) -> dict[str, Tensor]:
        """This rank's own model state (the parked replica while an evaluation swap is active)."""
        state = self.module.state_dict()
        if self._stash is not None:
            state = {k: self._stash.get(k, v) for k, v in state.items()}
        return {k: v.detach().clone() for k, v in state.items()}

    def consensus_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The model a checkpoint stores: the replicas' average (collective on every rank)."""
        if self.is_synced() or self._stash is not None:
            return state_dict  # the module holds the consensus already
        named = self._named_state()
        averaged = [t.detach().clone() for t in named.values()]
        self.strategy.comm.mean_(averaged, self.strategy.world_group, kind="checkpoint")
        out = dict(state_dict)
        out.update(zip(named.keys(), averaged))
        return out

    def rank_state_dict(self) -> dict[str, Any]:
        """Per-rank algorithm state that differs between ranks (saved for every rank)."""
        return {}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`rank_state_dict` returned on this rank."""

