"""Resuming: one checkpoint layout for both front ends, read once.

A checkpoint written by either front end is one file plus one **part per rank** next to it:

* the file (written by rank 0) holds the consensus as the model, the algorithm's global state and,
  under :data:`CHECKPOINT_KEY`, ``{"world_size": n, "step": s}``;
* the part ``<file>.step<s>.rank<r>`` (written by rank r, :func:`part_path`) holds that rank's replica,
  inner optimizer states, per-rank algorithm state and dataloader position, all in host memory.

Every rank writes its own part, so no rank ever holds another's replica (before 0.2 the parts were
gathered into rank 0's file: world size x the model's state on rank 0, and on a GPU the unpickled
tensors landed on the sender's device index). Parts carry the step in their name: a part of a newer
save never replaces the one the file refers to, and older parts are removed only after the file
that replaces them is written (:func:`stale_parts`), so a crash in the middle of a save leaves a
consistent pair. Files of the old layout (``"ranks"`` inside the file) still load.

:class:`ResumeState` is what resuming needs; :meth:`ResumeState.for_rank` gives one rank's part as a
:class:`RankResume`: its own state on the same world size, or the consensus with the optimizer
states averaged and the algorithm's per-rank state reduced on another (every saved part is read).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from torch import Tensor

from lightning_localsgd.algorithms.base import ConsensusAlgorithm

__all__ = [
    "CHECKPOINT_KEY",
    "RankResume",
    "ResumeState",
    "average_optimizer_states",
    "drop_stale_parts",
    "part_path",
    "part_reader",
    "rank_payload",
    "read_parts",
    "stale_parts",
    "to_host",
    "write_part",
]

CHECKPOINT_KEY = "localsgd"
"""The checkpoint entry that says how many parts there are and of which step (both front ends)."""


def part_path(path: Any, step: int, rank: int) -> str:
    """Where rank ``rank`` writes its part of the checkpoint at ``path`` saved at optimizer step ``step``."""
    return f"{path}.step{step}.rank{rank}"


def stale_parts(path: Any, rank: int, keep_step: int | None) -> list[str]:
    """Rank ``rank``'s parts of ``path`` other than step ``keep_step``'s (``None``: all of them)."""
    fs = get_filesystem(str(path))
    found = fs.glob(f"{path}.step*.rank{rank}")
    keep = None if keep_step is None else os.path.basename(part_path(path, keep_step, rank))
    return [f for f in found if os.path.basename(f) != keep]


def write_part(io: Any, part: dict[str, Any], path: Any, step: int, rank: int) -> None:
    """Rank ``rank``'s part of the checkpoint at ``path`` (every rank writes its own, with ``io``: atomically)."""
    io.save_checkpoint(part, part_path(path, step, rank))


def drop_stale_parts(io: Any, barrier: Callable[[], None], path: Any, step: int, rank: int) -> None:
    """After rank 0 wrote the file for ``step`` (the ``barrier``): this rank's parts of earlier saves go."""
    barrier()  # the file that refers to the new parts exists now
    for stale in stale_parts(path, rank, keep_step=step):
        io.remove_checkpoint(stale)


def part_reader(path: Any, step: int, read: Callable[[str], dict[str, Any]]) -> Callable[[int], dict[str, Any]]:
    """``read_part(rank)`` for the parts of the checkpoint at ``path`` saved at ``step``."""
    return lambda rank: read(part_path(path, step, rank))


def to_host(obj: Any) -> Any:
    """``obj`` with every tensor detached and copied to host memory (dicts, lists and tuples rebuilt)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_host(v) for v in obj)
    return obj


def rank_payload(replica: dict[str, Tensor], optimizer_states: list[Any], algorithm_state: dict[str, Any]) -> dict:
    """What one rank contributes to a checkpoint (in host memory)."""
    return to_host({"model": replica, "optimizer_states": optimizer_states, "algorithm": algorithm_state})


def read_parts(path: Any, read: Callable[[str], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every rank's part of the checkpoint at ``path``, in rank order (either layout); for tools and tests."""
    read = read or (lambda p: torch.load(p, map_location="cpu", weights_only=False))
    saved = read(str(path)).get(CHECKPOINT_KEY)
    if saved is None:
        return []
    if "ranks" in saved:
        return list(saved["ranks"])
    return [read(part_path(path, int(saved["step"]), r)) for r in range(int(saved["world_size"]))]


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

    ``step``: the optimizer steps the checkpoint had completed. ``world_size``: how many ranks saved
    parts (``None`` when the checkpoint has none, e.g. ``save_replicas=False``: every rank then
    resumes from the consensus). ``ranks``: the parts inside the file (the layout before 0.2);
    ``read_part(r)``: rank r's part file (read at most once each).
    """

    step: int
    world_size: int | None = None
    ranks: list[dict[str, Any]] | None = None
    read_part: Callable[[int], dict[str, Any]] | None = None
    _parts: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_checkpoint(
        cls, checkpoint: dict[str, Any], path: Any = None, read: Callable[[str], dict[str, Any]] | None = None
    ) -> ResumeState:
        """``read(path)`` loads a part file (the strategy's ``CheckpointIO``), needed for the parts layout."""
        saved = checkpoint.get(CHECKPOINT_KEY)
        step = int(checkpoint.get("global_step", 0))
        if saved is None:
            return cls(step)
        if "ranks" in saved:
            return cls(step, int(saved["world_size"]), list(saved["ranks"]))
        if read is None or path is None:
            raise ValueError("this checkpoint keeps each rank's state in part files: pass its path and a reader")
        return cls(step, int(saved["world_size"]), read_part=part_reader(path, int(saved["step"]), read))

    @property
    def has_parts(self) -> bool:
        return self.ranks is not None or self.read_part is not None

    def part(self, rank: int) -> dict[str, Any]:
        """Rank ``rank``'s saved state (its replica, optimizer states, algorithm state, loader position)."""
        if self.ranks is not None:
            return self.ranks[rank]
        if rank not in self._parts:
            assert self.read_part is not None
            try:
                self._parts[rank] = self.read_part(rank)
            except FileNotFoundError as err:
                raise FileNotFoundError(
                    f"rank {rank}'s part of the checkpoint is missing ({err}): every rank writes its "
                    "own part next to the checkpoint file (docs/design.md, Checkpoints); copy the parts with the "
                    "file, or load only the consensus (the file's state_dict) into the model and fit without "
                    "ckpt_path"
                ) from err
        return self._parts[rank]

    def for_rank(self, rank: int, world_size: int, algorithm: ConsensusAlgorithm) -> RankResume | None:
        """This rank's part (``None`` when the checkpoint holds no replicas)."""
        if not self.has_parts:
            return None
        assert self.world_size is not None
        if world_size == self.world_size:
            mine = self.part(rank)
            return RankResume(mine["model"], mine["optimizer_states"], mine.get("algorithm", {}), exact=True)
        parts = [self.part(r) for r in range(self.world_size)]
        optimizer_states = average_optimizer_states([p["optimizer_states"] for p in parts])
        reduced = algorithm.reduce_rank_states([p.get("algorithm", {}) for p in parts], world_size)
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
