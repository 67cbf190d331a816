"""The NCCL rule for two communicating threads: with ``serialize_threads`` the training thread waits for the
comm thread before its own collective; results are the same either way (the mean is kept for its merge step)."""

from __future__ import annotations

import threading
import time

import torch

from lightning_localsgd.transport.collectives import Group
from tests.fakes import FakeCollectives
from tests.launch import run_ranks


class SlowWire(FakeCollectives):
    """The background allreduce takes 0.3 s; the log says when it ran."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def all_reduce_sum_(self, flat, group, purpose):
        self.log.append("comm thread starts")
        time.sleep(0.3)
        self.log.append("comm thread ends")
        return super().all_reduce_sum_(flat, group, purpose)


def run(serialize: bool) -> tuple[list[str], int]:
    log: list[str] = []
    comm = SlowWire(log)
    comm.serialize_threads = serialize
    pending = comm.start_mean(torch.ones(4), Group(None, [0, 1], 0))
    while "comm thread starts" not in log:
        time.sleep(0.01)
    comm._timed("monitor", 0.0, lambda: log.append(f"training thread's collective ({threading.current_thread().name})"))
    assert pending.wait().tolist() == [0.5] * 4  # the other rank sent zeros: the mean of 1 and 0
    comm.close()
    return log, comm.counters.serialized


def test_with_serialize_threads_the_training_thread_waits_for_the_sync_in_flight():
    log, serialized = run(serialize=True)
    assert log == ["comm thread starts", "comm thread ends", "training thread's collective (MainThread)"]
    assert serialized == 1


def test_on_gloo_the_two_threads_communicate_side_by_side():
    log, serialized = run(serialize=False)
    assert log == ["comm thread starts", "training thread's collective (MainThread)", "comm thread ends"]
    assert serialized == 0


def test_serializing_changes_no_number_of_an_overlapped_run():
    """2 ranks, DiLoCo with 2 fragments and τ = 1, validation (a consensus average and a sync_dist log) and
    ReplicaDrift's all-gather while syncs are in flight: bit-identical with and without the rule."""
    for rank, result in enumerate(run_ranks("tests.scenarios_threads:overlapped", world=2, timeout=300)):
        assert torch.equal(result[False]["params"], result[True]["params"]), rank
        assert result[False]["serialized"] == 0 and result[True]["serialized"] > 0, result


class ProbeWire(FakeCollectives):
    """Counts the probe's allreduces; the other rank asks to stop at its ``other_stops_at``-th flag check."""

    def __init__(self, stop: threading.Event, stop_after: int | None, other_stops_at: int | None) -> None:
        super().__init__()
        self.stop, self.stop_after, self.other_stops_at = stop, stop_after, other_stops_at
        self.sums, self.checks = 0, 0

    def all_reduce_sum_(self, flat, group, purpose):
        self.sums += 1
        if self.sums == self.stop_after:
            self.stop.set()  # this rank reaches step W while its call is on the wire
        return flat

    def all_reduce_max_(self, flat, group, purpose, op=""):
        self.checks += 1
        if self.checks == self.other_stops_at:
            flat.fill_(1.0)  # the other rank's flag: the MAX is 1
        return flat


def test_the_link_probe_stops_where_the_ranks_agree():
    """Collectives.start_transfer(stop=...): every rank ends after the same call, whichever rank asked."""
    for stop_after, other_stops_at, done in [(3, None, 3), (None, 5, 5), (None, None, 40), (2, 1, 1)]:
        stop = threading.Event()
        comm = ProbeWire(stop, stop_after, other_stops_at)
        future = comm.start_transfer(
            8,
            Group(None, [0, 1], 0),
            calls=40,
            dtype=torch.float32,
            device=torch.device("cpu"),
            purpose="tune",
            stop=stop,
        )
        calls, seconds = future.result(timeout=30)
        comm.close()
        assert (calls, comm.sums) == (done, done) and seconds >= 0
        assert comm.checks == (done if done < 40 else 39)  # a check before every call after the first
