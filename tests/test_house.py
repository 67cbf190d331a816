"""House rules that are not numbers elsewhere: atomic writes under Fabric too, read-only strategy internals,
one name per meaning (the byte counters' purpose), profiler ranges around sync / wait / merge."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lightning_localsgd import AsyncLocalSGDStrategy, AtomicCheckpointIO, LocalSGDStrategy, PeriodicAveraging
from lightning_localsgd.fabric import LocalSGDStrategy as FabricLocalSGDStrategy
from lightning_localsgd.transport.collectives import Collectives
from tests.fakes import FakeCollectives, Toy, bind_fake


def test_fabric_writes_checkpoints_atomically_by_default_like_the_trainer():
    assert isinstance(FabricLocalSGDStrategy().checkpoint_io, AtomicCheckpointIO)
    assert isinstance(LocalSGDStrategy().checkpoint_io, AtomicCheckpointIO)


@pytest.mark.parametrize(
    ("make", "name"),
    [(make, name) for make in (LocalSGDStrategy, FabricLocalSGDStrategy) for name in ("comm", "world_group", "engine")]
    + [(AsyncLocalSGDStrategy, name) for name in ("comm", "world_group", "server", "worker", "server_comm")],
)
def test_strategy_internals_are_read_only(make, name):
    strategy = make()
    with pytest.raises(AttributeError):
        setattr(strategy, name, None)


def test_the_byte_counters_are_split_by_purpose():
    comm = Collectives()
    comm.counters.add("sync", 8.0, 0.25)
    comm.counters.add("eval", 4.0, 0.5)
    assert dict(comm.counters.bytes_by_purpose) == {"sync": 8.0, "eval": 4.0}
    assert comm.counters.bytes_sent == 12.0 and comm.counters.seconds == 0.75 and comm.counters.calls == 2


def test_syncs_waits_and_merges_show_as_profiler_ranges():
    module, comm = Toy(), FakeCollectives()
    algorithm = PeriodicAveraging(2, overlap_steps=1)
    bind_fake(algorithm, module, comm)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        algorithm.after_step(2)  # starts the sync in the background
        algorithm.after_step(3)  # waits for it and merges
    comm.close()
    names = {event.name for event in prof.events()}
    assert {"lightning_localsgd::sync", "lightning_localsgd::wait", "lightning_localsgd::merge"} <= names
    assert torch.isfinite(module.flat()).all()


class Event:
    """A device event as torch.cuda.Event behaves: recorded at a time, complete or not."""

    def __init__(self, ms: float, done: bool = True) -> None:
        self.ms, self.done = ms, done

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, end: Event) -> float:
        return end.ms - self.ms


def test_device_time_is_added_when_the_collective_has_completed():
    comm = Collectives()
    comm.counters.add_device_timed("sync", 100.0, Event(0.0), Event(250.0))  # 250 ms, complete
    late_end = Event(1500.0, done=False)
    comm.counters.add_device_timed("sync", 100.0, Event(1000.0), late_end)  # still running
    assert comm.counters.bytes_sent == 200.0 and comm.counters.calls == 2  # booked at once
    assert comm.counters.seconds == 0.25  # only the completed one
    late_end.done = True
    assert comm.counters.seconds == 0.75 and dict(comm.counters.seconds_by_purpose) == {"sync": 0.75}
