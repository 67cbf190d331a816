"""Lightning's lockstep collectives, made safe while asynchronous workers run at their own pace.

During asynchronous training every rank is at a different step, so any collective Lightning issues
on the world group would pair unrelated calls: lockstep at best, a hang or a mismatch at the end.
:class:`LockstepGuards` turns them rank-local while ``_active`` (from ``on_train_start`` until every
rank holds the final model) and leaves them untouched otherwise (setup, after ``fit``, validate/test).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

SIGTERM_BROADCAST = "_broadcast_sigterm_tensor"  # Lightning's per-batch collective (training_epoch_loop.py)


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
        # The one use of a private Lightning attribute in this library: Lightning (2.x) broadcasts a
        # SIGTERM flag from rank 0 before every training batch, straight through torch.distributed;
        # with ranks at different steps that would put them back in lockstep. The instance attribute
        # shadows the method for this loop only; tests/test_async.py fails if Lightning renames it.
        loop = self.lightning_module.trainer.fit_loop.epoch_loop
        if not callable(getattr(type(loop), SIGTERM_BROADCAST, None)):
            raise RuntimeError(
                f"this Lightning version has no {type(loop).__name__}.{SIGTERM_BROADCAST}: the async strategy cannot "
                "keep the per-batch SIGTERM broadcast from putting ranks back in lockstep; use lightning 2.4-2.6"
            )
        if active:
            setattr(loop, SIGTERM_BROADCAST, self._local_sigterm_check)
        else:
            loop.__dict__.pop(SIGTERM_BROADCAST, None)

    def _local_sigterm_check(self) -> None:
        if getattr(self.lightning_module.trainer, "received_sigterm", False):
            raise SIGTERMException()

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
