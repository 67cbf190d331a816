"""No silent hangs: a collective whose peer is gone fails with an error naming the rank and operation."""

import pytest

from lightning_localsgd import LocalSGDStrategy
from lightning_localsgd.trainer.replica import DEFAULT_TIMEOUT
from tests.launch import run_ranks


def test_a_sync_whose_peer_left_fails_with_the_rank_the_operation_and_the_peers():
    r0, r1 = run_ranks("tests.scenarios_failures:peer_gone", world=2, timeout=240, fresh=True)  # rank 1's process ends
    assert r1["error"] is None
    assert r0["error"].startswith("rank 0 gave up on an allreduce (sync) with ranks [0, 1] after ")
    assert "raise the strategy's timeout=" in r0["error"]


def test_the_default_timeout_is_minutes_not_lightnings_half_hour():
    assert DEFAULT_TIMEOUT.total_seconds() == 600
    assert LocalSGDStrategy()._timeout == DEFAULT_TIMEOUT
    with pytest.raises(ValueError, match="sync_every must be an integer >= 1"):
        LocalSGDStrategy(sync_every=0)
