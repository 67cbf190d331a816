"""SyncEngine: the part of local SGD that does not depend on the Trainer, driven by both front ends.

:class:`~lightning_localsgd.LocalSGDStrategy` (Trainer) and
:class:`lightning_localsgd.fabric.LocalSGDStrategy` (Fabric) each own one engine and call it at the
same points; everything between those calls is the algorithms' (see
:mod:`lightning_localsgd.contract`). Resuming goes through one object, :class:`ResumeState`, read
from the checkpoint once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.contract import GradientModifier, StepReport, SyncContext, SyncObserver

CHECKPOINT_KEY = "localsgd"


class SyncEngine:
    """One consensus algorithm, at most one gradient modifier and the sync observers of one process.

    Args:
        algorithm: the consensus algorithm.
        modifier: a gradient modifier (e.g. GradAlign) or ``None``.
        observers: told about every sync (e.g. ReplicaDrift).
    """

    def __init__(
        self,
        algorithm: ConsensusAlgorithm,
        modifier: GradientModifier | None = None,
        observers: Sequence[SyncObserver] = (),
    ) -> None:
        self.algorithm = algorithm
        self.modifier = modifier
        self.observers = tuple(observers)
        self.last_loss: Tensor | None = None  # what backward saw in the current step

    @staticmethod
    def find(callbacks: Iterable[Any]) -> tuple[list[ConsensusAlgorithm], list[GradientModifier], list[SyncObserver]]:
        """The callbacks that take part, by kind; exactly one algorithm and at most one modifier are allowed."""
        callbacks = list(callbacks)
        algorithms = [cb for cb in callbacks if isinstance(cb, ConsensusAlgorithm)]
        modifiers = [cb for cb in callbacks if isinstance(cb, GradientModifier)]
        observers = [cb for cb in callbacks if isinstance(cb, SyncObserver)]
        if len(algorithms) > 1:
            names = ", ".join(type(cb).__name__ for cb in algorithms)
            raise ValueError(f"exactly one consensus algorithm may be active, got {names}: keep one of them")
        if len(modifiers) > 1:
            names = ", ".join(type(cb).__name__ for cb in modifiers)
            raise ValueError(f"at most one gradient modifier may be active (each re-runs the step), got {names}")
        return algorithms, modifiers, observers

    def bind(self, ctx: SyncContext, step: int, restored: RankResume | None) -> None:
        """Hand the context to everyone; ``restored`` is this rank's slice of a checkpoint (or ``None``)."""
        self.algorithm.bind(ctx, step, None if restored is None else restored.algorithm)
        if self.modifier is not None:
            self.modifier.bind(ctx)

    def note_loss(self, loss: Tensor) -> None:
        """The loss a backward pass of this step saw (called by the front end's backward hook)."""
        self.last_loss = loss.detach()

    def step(
        self,
        step: int,
        closure: Callable[[], Any],
        run: Callable[[Callable[[], Any]], Any],
        optimizer: Optimizer | None = None,
    ) -> Any:
        """Optimizer step ``step``: wrap ``closure``, ``run(closure)`` (``optimizer``'s step), then the schedule."""
        report = StepReport(step)
        if self.modifier is not None:
            closure = self.modifier.wrap_closure(closure, self.algorithm.position(step), report)
        closure = self.algorithm.wrap_closure(closure, step)
        out = run(closure)
        report.loss = None if self.last_loss is None else float(self.last_loss)
        self.last_loss = None  # the next step's backward sets it again
        syncs = self.algorithm.num_syncs
        self.algorithm.after_step(step, report)
        if optimizer is not None and self.algorithm.nonfinite == "skip" and self.algorithm.num_syncs != syncs:
            reset_nonfinite_state(optimizer)
        return out

    @staticmethod
    def rank_payload(replica: dict[str, Tensor], optimizer_states: list[Any], algorithm_state: dict[str, Any]) -> dict:
        """What one rank contributes to a checkpoint."""
        return {"model": replica, "optimizer_states": optimizer_states, "algorithm": algorithm_state}


def reset_nonfinite_state(optimizer: Optimizer) -> int:
    """Zero the NaN/Inf entries of the optimizer state of every parameter that is finite; returns how many.

    Under ``nonfinite="skip"`` a replica that went NaN/Inf receives the finite replicas' mean at a
    sync, but its momentum (Adam's moments, ...) still holds NaN/Inf and would make it non-finite
    again at its next step, so that it stayed out of every later sync. Called after each sync.
    """
    reset = 0
    for param, state in optimizer.state.items():
        if not bool(torch.isfinite(param).all()):
            continue  # not synced yet (another fragment): its state is reset when it is
        for value in state.values():
            if isinstance(value, Tensor) and value.is_floating_point() and value.shape == param.shape:
                bad = ~torch.isfinite(value)
                if bool(bad.any()):
                    value.masked_fill_(bad, 0.0)
                    reset += int(bad.sum())
    if reset:
        warnings.warn(
            f"{reset} NaN/Inf values of the optimizer state were reset to 0 after this replica was "
            "skipped at a sync (nonfinite='skip') and received the others' mean",
            stacklevel=2,
        )
    return reset


@dataclass
class RankResume:
    """What one rank resumes from: its replica (``None``: the consensus), inner optimizer states, algorithm state.

    ``exact`` is True when the checkpoint was written by the same world size (each rank gets its own
    state back); otherwise every rank starts from the consensus with the optimizer states averaged
    over the saved ranks and the algorithm's per-rank state reduced by the algorithm.
    """

    model: dict[str, Tensor] | None
    optimizer_states: list[Any]
    algorithm: dict[str, Any]
    exact: bool


@dataclass
class ResumeState:
    """What resuming needs from a checkpoint, read once when it is loaded.

    ``step``: the optimizer steps the checkpoint had completed. ``world_size`` and ``ranks``: every
    saved rank's replica, optimizer and algorithm state (``None`` when the checkpoint has none,
    e.g. ``save_replicas=False``: every rank then resumes from the consensus).
    """

    step: int
    world_size: int | None = None
    ranks: list[dict[str, Any]] | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> ResumeState:
        saved = checkpoint.get(CHECKPOINT_KEY)
        step = int(checkpoint.get("global_step", 0))
        if saved is None:
            return cls(step)
        return cls(step, int(saved["world_size"]), list(saved["ranks"]))

    def for_rank(self, rank: int, world_size: int, algorithm: ConsensusAlgorithm) -> RankResume | None:
        """This rank's part (``None`` when the checkpoint holds no replicas)."""
        if self.ranks is None:
            return None
        if world_size == self.world_size:
            mine = self.ranks[rank]
            return RankResume(mine["model"], mine["optimizer_states"], mine.get("algorithm", {}), exact=True)
        optimizer_states = average_optimizer_states([r["optimizer_states"] for r in self.ranks])
        reduced = algorithm.reduce_rank_states([r.get("algorithm", {}) for r in self.ranks], world_size)
        return RankResume(None, optimizer_states, reduced[rank], exact=False)


def average_optimizer_states(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Optimizer state dicts averaged over ranks: floating tensors elementwise, everything else rank 0's.

    Momentum buffers and Adam moments become the mean of the saved ranks' (a scalar parameter's
    0-dim buffer too); values equal on every rank, such as step counters, are kept exactly as
    saved; hyperparameters (``param_groups``) are rank 0's. A parameter that has state on only some
    ranks (it got no gradient on the others) gets the mean over the ranks that have it.
    """
    out = []
    for states in zip(*per_rank, strict=True):
        indices = list(dict.fromkeys(index for s in states for index in s["state"]))  # rank 0's order first
        averaged: dict[Any, dict[str, Any]] = {}
        for index in indices:
            entries = [s["state"][index] for s in states if index in s["state"]]
            averaged[index] = {}
            for key, value in entries[0].items():
                values = [e[key] for e in entries if key in e]
                floating = all(isinstance(v, Tensor) and v.is_floating_point() for v in values)
                if floating and not all(torch.equal(v, value) for v in values):
                    value = torch.stack(values).mean(0)
                averaged[index][key] = value
        out.append({"state": averaged, "param_groups": states[0]["param_groups"]})
    return out
