"""tests/launch.py's shared rank processes: each scenario starts from a fresh rank's state, and a scenario
that fails, hangs, exits or leaves something behind is reported or retires its processes.

Each test starts its own pool (ranks that import only torch: cheap), so the session's pools are not disturbed.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
import torch

from tests.launch import RankPool

pytestmark = pytest.mark.launches


@pytest.fixture
def pool() -> Iterator[RankPool]:
    """A pool for one test that ends it."""
    pool = RankPool(2, 1, preload=())
    yield pool
    pool.close(kill=True)


@pytest.fixture(scope="module")
def shared() -> Iterator[RankPool]:
    """A pool for the tests that keep it: the fresh-state test, then the one that retires it."""
    pool = RankPool(2, 1, preload=("recipes.launch",))
    yield pool
    pool.close(kill=True)


def dead(pool_procs: list) -> bool:
    return all(p.poll() is not None for p in pool_procs)


def test_each_scenario_starts_from_a_fresh_ranks_state(shared: RankPool) -> None:
    first = shared.run("tests.scenarios_pool:litter", {}, timeout=120)
    second = shared.run("tests.scenarios_pool:inspect", {}, timeout=120)
    assert all(r["group"] and r["litter"] == "1" and r["cwd"] == "/" for r in first)  # the litter was there
    assert [r["pid"] for r in second] == [r["pid"] for r in first]  # the same processes
    for before, after in zip(first, second):
        assert after["group"] is False  # no process group: the scenario creates its own
        assert after["port"] != before["port"]  # ... on a new rendezvous
        assert after["litter"] is None and after["dtype"] == torch.float32 and after["threads"] == 1
        assert after["grad"] is True and after["sigusr1"] == str(signal.SIG_DFL) and not after["warnings_error"]
        assert after["lightning_level"] == 0  # a logger a scenario quietened is as it was (never set here)
        assert after["cwd"] == after["out_dir"] != before["out_dir"]  # a new temporary directory


def test_a_rank_that_raises_fails_the_launch_with_its_traceback_at_once(pool: RankPool) -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)failed \(rank 1\).*about to give up.*ValueError: rank 1 gives up"):
        pool.run("tests.scenarios_pool:raise_on", {"rank": 1}, timeout=120)
    assert time.monotonic() - start < 60  # rank 0, waiting in a barrier (timeout 120 s), was killed
    assert dead(pool.procs) or not pool.procs


def test_a_rank_that_exits_fails_the_launch(pool: RankPool) -> None:
    procs = list(pool.procs)
    with pytest.raises(RuntimeError, match=r"rank 1 exited \(code 3\) during the scenario"):
        pool.run("tests.scenarios_pool:exit_on", {"rank": 1}, timeout=120)
    assert dead(procs)


def test_a_hang_is_killed_after_the_timeout(pool: RankPool) -> None:
    procs = list(pool.procs)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"timeout after 2 s \(ranks \[0, 1\] still running\)"):
        pool.run("tests.scenarios_pool:sleep", {"seconds": 600}, timeout=2)
    assert time.monotonic() - start < 30 and dead(procs)


def test_what_a_scenario_leaves_that_cannot_be_undone_retires_the_processes(shared: RankPool) -> None:
    procs = list(shared.procs)
    with pytest.warns(UserWarning, match=r"retired after .*left-behind.*replaced: \['recipes.launch.free_port'\]"):
        assert shared.run("tests.scenarios_pool:leave_a_thread_and_a_patch", {}, timeout=120) == ["done", "done"]
    assert dead(procs) and not shared.alive()
