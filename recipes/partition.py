"""Split a labelled data set across ranks: iid, Dirichlet label skew, or k classes per rank.

Every function is deterministic given ``seed`` and returns one index array per rank. :func:`partition`
then makes every shard the same size, ``len(labels) // world``, so every rank runs the same number
of batches per epoch and the ranks' collectives never mismatch:

* a larger shard is truncated to a random subset of itself;
* a smaller shard is padded with samples drawn (with replacement) from itself, so a rank never
  sees another rank's data.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np

Scheme = Literal["iid", "dirichlet", "classes"]
SCHEMES = ("iid", "dirichlet", "classes")


def _check(labels: np.ndarray, world: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if world < 1 or len(labels) < world:
        raise ValueError(f"cannot split {len(labels)} samples across world={world} ranks")
    return labels


def partition_iid(labels: np.ndarray, world: int, seed: int = 0) -> list[np.ndarray]:
    """A seeded permutation cut into ``world`` equal parts of ``len(labels) // world`` (remainder dropped)."""
    labels = _check(labels, world)
    size = len(labels) // world
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [perm[r * size : (r + 1) * size] for r in range(world)]


def dirichlet_proportions(num_classes: int, world: int, alpha: float, seed: int = 0) -> np.ndarray:
    """``(num_classes, world)`` shares: row c ~ Dir(alpha·1), the fraction of class c each rank gets."""
    return np.random.default_rng(seed).dirichlet(np.full(world, float(alpha)), size=num_classes)


def partition_dirichlet(labels: np.ndarray, world: int, alpha: float, seed: int = 0) -> list[np.ndarray]:
    """Label skew (Hsu et al., arXiv 1909.06335): class c is cut by ``dirichlet_proportions`` row c.

    The samples of the c-th smallest label (shuffled with ``default_rng([seed, 1])``) are split at
    ``floor(cumsum(p_c)[:-1] · n_c)``. Small ``alpha`` (0.1) gives each rank few classes; large
    ``alpha`` (100) is close to iid.
    """
    labels = _check(labels, world)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (0.1: strong skew, 100: nearly iid), got {alpha}")
    classes = np.unique(labels)
    props = dirichlet_proportions(len(classes), world, alpha, seed)
    shuffle = np.random.default_rng([seed, 1])
    parts: list[list[np.ndarray]] = [[] for _ in range(world)]
    for c, p in zip(classes, props):
        idx = shuffle.permutation(np.flatnonzero(labels == c))
        cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(int)
        for r, chunk in enumerate(np.split(idx, cuts)):
            parts[r].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def class_assignment(num_classes: int, world: int, classes_per_rank: int) -> list[list[int]]:
    """Rank r holds the class indices ``(r·k + j) mod num_classes`` for ``j < k``."""
    if not 1 <= classes_per_rank <= num_classes:
        raise ValueError(f"classes_per_rank must be in [1, {num_classes}], got {classes_per_rank}")
    return [[(r * classes_per_rank + j) % num_classes for j in range(classes_per_rank)] for r in range(world)]


def partition_classes(labels: np.ndarray, world: int, classes_per_rank: int, seed: int = 0) -> list[np.ndarray]:
    """Pathological non-iid (McMahan et al. 2017): rank r sees only the classes of :func:`class_assignment`.

    The samples of a class (shuffled with ``default_rng(seed)``) are split evenly, in rank order,
    among the ranks that hold it (``np.array_split``).
    """
    labels = _check(labels, world)
    classes = np.unique(labels)
    assignment = class_assignment(len(classes), world, classes_per_rank)
    held = sorted({c for a in assignment for c in a})
    if len(held) < len(classes):
        warnings.warn(
            f"classes_per_rank={classes_per_rank} on {world} ranks leaves {len(classes) - len(held)} of "
            f"{len(classes)} classes unseen by every rank; raise classes_per_rank to at least "
            f"{-(-len(classes) // world)} to cover them",
            stacklevel=2,
        )
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(world)]
    for ci, c in enumerate(classes):
        holders = [r for r in range(world) if ci in assignment[r]]
        if not holders:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        for r, chunk in zip(holders, np.array_split(idx, len(holders))):
            parts[r].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]


def equalize(parts: list[np.ndarray], size: int, seed: int = 0) -> list[np.ndarray]:
    """Truncate or pad (resampling a shard's own indices) every shard to exactly ``size`` indices."""
    out = []
    for r, idx in enumerate(parts):
        if len(idx) == 0:
            raise ValueError(f"rank {r} received no samples; raise alpha or classes_per_rank, or use another seed")
        rng = np.random.default_rng([seed, 2, r])
        if len(idx) >= size:
            out.append(np.sort(rng.choice(idx, size=size, replace=False)))
        else:
            out.append(np.concatenate([idx, rng.choice(idx, size=size - len(idx), replace=True)]))
    return out


def partition(
    labels: np.ndarray,
    world: int,
    scheme: Scheme = "iid",
    *,
    alpha: float = 0.5,
    classes_per_rank: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """One index array per rank, each of exactly ``len(labels) // world`` indices."""
    labels = _check(labels, world)
    if scheme == "iid":
        return partition_iid(labels, world, seed)
    if scheme == "dirichlet":
        parts = partition_dirichlet(labels, world, alpha, seed)
    elif scheme == "classes":
        parts = partition_classes(labels, world, classes_per_rank, seed)
    else:
        raise ValueError(f"partition must be one of {SCHEMES}, got {scheme!r}")
    return equalize(parts, len(labels) // world, seed)
