"""Resuming: one checkpoint layout for both front ends, read once.

A checkpoint written by either front end holds the consensus as the model and, under
:data:`CHECKPOINT_KEY`, every rank's replica, inner optimizer state and per-rank algorithm state
(``{"world_size": n, "ranks": [{"model", "optimizer_states", "algorithm", ...}, ...]}``).
:class:`ResumeState` is what resuming needs from it; :meth:`ResumeState.for_rank` gives one rank's
part, :class:`RankResume`: its own state on the same world size, or the consensus with the
optimizer states averaged and the algorithm's per-rank state reduced on another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_localsgd.algorithms.base import ConsensusAlgorithm

__all__ = ["CHECKPOINT_KEY", "RankResume", "ResumeState", "average_optimizer_states", "rank_payload"]

CHECKPOINT_KEY = "localsgd"
"""The checkpoint entry that holds every rank's part (both front ends)."""


def rank_payload(replica: dict[str, Tensor], optimizer_states: list[Any], algorithm_state: dict[str, Any]) -> dict:
    """What one rank contributes to a checkpoint."""
    return {"model": replica, "optimizer_states": optimizer_states, "algorithm": algorithm_state}


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
