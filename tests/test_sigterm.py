"""Lightning's per-batch SIGTERM broadcast: only at the steps where the ranks meet anyway (sigterm.py)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_localsgd import DiLoCo, PeriodicAveraging
from lightning_localsgd.trainer.sigterm import (
    SIGTERM_BROADCAST,
    local_sigterm_check,
    replace_sigterm_check,
    restore_sigterm_check,
    sigterm_check_at,
)


def test_the_one_private_lightning_attribute_still_exists():
    """Fails when Lightning renames or drops its per-batch SIGTERM broadcast."""
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    method = getattr(_TrainingEpochLoop, SIGTERM_BROADCAST)
    assert "torch.distributed.broadcast" in inspect.getsource(method)
    assert SIGTERM_BROADCAST in inspect.getsource(_TrainingEpochLoop.advance)


class Loop:
    """Stands in for Lightning's epoch loop: records every broadcast it is asked for."""

    def __init__(self) -> None:
        self.broadcasts: list[int] = []
        self.trainer: SimpleNamespace | None = None

    def _broadcast_sigterm_tensor(self) -> None:
        assert self.trainer is not None
        self.broadcasts.append(self.trainer.global_step + 1)


def stub_trainer() -> tuple[SimpleNamespace, Loop]:
    loop = Loop()
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=loop), global_step=0, received_sigterm=False)
    loop.trainer = trainer
    return trainer, loop


def run_batches(trainer: SimpleNamespace, loop: Loop, steps: int) -> None:
    for step in range(steps):
        trainer.global_step = step  # the batch that completes step + 1
        loop._broadcast_sigterm_tensor()  # what Lightning's loop calls before every batch


def test_the_broadcast_runs_only_before_warmup_steps_and_the_first_step_of_each_round():
    algo = PeriodicAveraging(sync_every=4, warmup_steps=2)
    assert [algo.agrees_at(s) for s in range(1, 13)] == [True, True] + [False, False, False, True] * 2 + [False] * 2
    trainer, loop = stub_trainer()
    replace_sigterm_check(trainer, sigterm_check_at(trainer, algo.agrees_at))
    run_batches(trainer, loop, 12)
    assert loop.broadcasts == [1, 2, 6, 10]  # 4 messages in 12 steps instead of 12
    restore_sigterm_check(trainer)
    loop.broadcasts.clear()
    run_batches(trainer, loop, 3)
    assert loop.broadcasts == [1, 2, 3]  # Lightning's own again


def test_fragments_do_not_add_meeting_steps():
    algo = DiLoCo(sync_every=8, fragments=4, overlap_steps=1)
    assert [s for s in range(1, 25) if algo.agrees_at(s)] == [8, 16, 24]


def test_the_async_check_reads_only_this_ranks_flag():
    trainer, loop = stub_trainer()
    replace_sigterm_check(trainer, local_sigterm_check(trainer))
    run_batches(trainer, loop, 3)
    assert loop.broadcasts == []
    trainer.received_sigterm = True
    with pytest.raises(SIGTERMException):
        loop._broadcast_sigterm_tensor()


def test_a_loop_without_the_method_is_refused_with_the_versions_that_have_it():
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=object()), global_step=0)
    with pytest.raises(RuntimeError, match="use lightning 2.4-2.6"):
        replace_sigterm_check(trainer, lambda: None)
