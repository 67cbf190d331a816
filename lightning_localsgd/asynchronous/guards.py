"""Lightning's lockstep collectives, made safe while asynchronous workers run at their own pace.

During asynchronous training every rank is at a different step, so any collective Lightning issues
on the world group would pair unrelated calls: lockstep at best, a hang or a mismatch at the end.
:class:`LockstepGuards` turns them rank-local while ``_active`` (from ``on_train_start`` until every
rank holds the final model) and leaves them untouched otherwise (setup, after ``fit``, validate/test).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_localsgd.trainer.sigterm import local_sigterm_check, replace_sigterm_check, restore_sigterm_check

__all__ = ["LockstepGuards"]


class LockstepGuards:
    """Mixin for a DDP-derived strategy (put it first among the bases).

    ============================  ==========================================================
    while asynchronous            behaviour
    ============================  ==========================================================
    ``barrier``                   no-op (e.g. ``Trainer.save_checkpoint``, dataloader setup)
    ``broadcast(obj)``            returns this rank's ``obj``
    ``reduce_boolean_decision``   returns this rank's decision (EarlyStopping, ModelCheckpoint)
    ``reduce`` / ``sync_dist``    returns this rank's value, with a warning once
    ``all_gather``                raises: there is no meaningful local answer
    per-batch SIGTERM broadcast   replaced by a check of this rank's own flag
    ============================  ==========================================================
    """

    _active: bool = False
    _warned_reduce: bool = False
    lightning_module: Any

    def _set_active(self, active: bool) -> None:
        """Enter/leave the asynchronous phase."""
        self._active = active
        # Lightning's per-batch SIGTERM broadcast would put the ranks back in lockstep (sigterm.py)
        trainer = self.lightning_module.trainer
        if active:
            replace_sigterm_check(trainer, local_sigterm_check(trainer))
        else:
            restore_sigterm_check(trainer)

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if not self._active:
            super().barrier(*args, **kwargs)  # type: ignore[misc]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj if self._active else super().broadcast(obj, src)  # type: ignore[misc]

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision if self._active else super().reduce_boolean_decision(decision, all)  # type: ignore[misc]

    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        if not self._active:
            return super().reduce(tensor, group, reduce_op)  # type: ignore[misc]
        if not self._warned_reduce:
            self._warned_reduce = True
            rank_zero_warn(
                "self.log(..., sync_dist=True) and strategy.reduce during async_localsgd training return each rank's "
                "own value: the ranks are not in lockstep. Log without sync_dist to silence this."
            )
        return tensor

    def all_gather(self, tensor: Tensor, group: Any = None, sync_grads: bool = False) -> Tensor:
        if self._active:
            raise RuntimeError(
                "all_gather during async_localsgd training would deadlock (ranks are at different steps): gather "
                "after fit, or use strategy='localsgd' for lockstep training"
            )
        return super().all_gather(tensor, group, sync_grads)  # type: ignore[misc]
