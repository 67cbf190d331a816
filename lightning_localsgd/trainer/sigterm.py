"""Where Lightning's per-batch SIGTERM check may talk to the other ranks.

Lightning (2.x) broadcasts a SIGTERM flag from rank 0 before **every** training batch
(``_TrainingEpochLoop._broadcast_sigterm_tensor``, straight through ``torch.distributed``), so
that all ranks stop together when one is told to. Under DDP that is one more tiny message beside
a per-step gradient allreduce. Under local SGD it is the *only* per-step message, and on a slow
link it is an expensive one: it waits behind the bytes of a sync running in the background (a
token-bucket or NIC queue is first in, first out), which puts up to the queue's delay on every
step that an overlapped sync was meant to hide (measured in docs/results/slow_link.md).

:func:`replace_sigterm_check` swaps that method for one of the strategy's, on this trainer's loop
only (an instance attribute shadowing the method; :func:`restore_sigterm_check` removes it):

* :class:`~lightning_localsgd.LocalSGDStrategy` runs Lightning's broadcast only before the batches
  of steps at which the ranks meet anyway (warm-up steps and the last step of each round, which ends with its sync,
  :meth:`ConsensusAlgorithm.agrees_at`). A SIGTERM is then acted on at the next round boundary,
  all ranks together, at most ``sync_every`` steps late (seconds, within any scheduler's grace period).
* :class:`~lightning_localsgd.AsyncLocalSGDStrategy` checks its own rank's flag: its ranks are
  never in lockstep.

This is the library's one use of a private Lightning attribute; tests/test_sigterm.py fails when
Lightning renames or drops it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = [
    "SIGTERM_BROADCAST",
    "lightning_sigterm_check",
    "local_sigterm_check",
    "replace_sigterm_check",
    "restore_sigterm_check",
    "sigterm_check_at",
]

SIGTERM_BROADCAST = "_broadcast_sigterm_tensor"  # Lightning's per-batch collective (training_epoch_loop.py)


def _epoch_loop(trainer: Any) -> Any:
    loop = trainer.fit_loop.epoch_loop
    if not callable(getattr(type(loop), SIGTERM_BROADCAST, None)):
        raise RuntimeError(
            f"this Lightning version has no {type(loop).__name__}.{SIGTERM_BROADCAST}: lightning_localsgd cannot move "
            "the per-batch SIGTERM broadcast off the steps between syncs; use lightning 2.4-2.6 (or report the version)"
        )
    return loop


def lightning_sigterm_check(trainer: Any) -> Callable[[], None]:
    """Lightning's own per-batch SIGTERM broadcast of ``trainer``'s loop (a collective on the world group)."""
    loop = _epoch_loop(trainer)
    return getattr(type(loop), SIGTERM_BROADCAST).__get__(loop)


def replace_sigterm_check(trainer: Any, check: Callable[[], None]) -> None:
    """Run ``check`` instead of Lightning's per-batch SIGTERM broadcast on ``trainer``'s loop."""
    setattr(_epoch_loop(trainer), SIGTERM_BROADCAST, check)


def restore_sigterm_check(trainer: Any) -> None:
    """Lightning's own per-batch SIGTERM broadcast again."""
    trainer.fit_loop.epoch_loop.__dict__.pop(SIGTERM_BROADCAST, None)


def local_sigterm_check(trainer: Any) -> Callable[[], None]:
    """A check of this rank's own flag only (no message): raises Lightning's ``SIGTERMException``."""

    def check() -> None:
        if getattr(trainer, "received_sigterm", False):
            raise SIGTERMException()

    return check


def sigterm_check_at(
    trainer: Any, meets: Callable[[int], bool], before: Callable[[], None] | None = None
) -> Callable[[], None]:
    """Lightning's broadcast before the batches of steps ``s`` (1-based) with ``meets(s)``, nothing otherwise.

    ``meets`` must give every rank the same answer (a function of the step number), since the
    broadcast is a collective. A flag raised in between waits for the next such step. ``before``
    runs first (the transport's ``before_collective``: on NCCL, wait for a background sync).
    """
    broadcast = lightning_sigterm_check(trainer)

    def check() -> None:
        if meets(trainer.global_step + 1):
            if before is not None:
                before()
            broadcast()

    return check
