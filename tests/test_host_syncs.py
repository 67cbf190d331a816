"""Device-to-host reads on the hot path: none on a step between syncs, one per sync (what the GPU would wait on).

On a GPU every ``.item()``, ``float(t)``, ``bool(t)``, ``int(t)`` or ``.tolist()`` of a device tensor
blocks the host until the stream has caught up, so the library keeps them off the steps between
syncs. Here they are counted on CPU tensors by patching ``torch.Tensor``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from lightning_localsgd.algorithms import DiLoCo, LeaderSGD, PeriodicAveraging
from lightning_localsgd.engine import SyncEngine
from tests.fakes import FakeCollectives, Toy, bind_fake

READS = ("item", "tolist", "__float__", "__int__", "__bool__")


@contextmanager
def counting_host_reads() -> Iterator[list[str]]:
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name: str):
        original = originals[name]

        def read(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        return read

    try:
        for name in READS:
            setattr(torch.Tensor, name, counted(name))
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def train(algorithm, comm_dtype=None, steps: int = 8, rows=None) -> list[int]:
    """Drive ``steps`` optimizer steps through the engine; the host reads each step made."""
    module, comm = Toy(), FakeCollectives(comm_dtype)
    comm.rows = rows or {}
    bind_fake(algorithm, module, comm)
    engine = SyncEngine(algorithm)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    target = torch.tensor([0.25, -1.0, 2.0], dtype=torch.float64)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = ((torch.cat([module.w, module.b]) - target) ** 2).sum()
        loss.backward()
        engine.note_loss(loss)
        return loss

    per_step = []
    for step in range(1, steps + 1):
        with counting_host_reads() as calls:
            engine.step(step, closure, lambda c: optimizer.step(c), optimizer)
        per_step.append(len(calls))
    return per_step


@pytest.mark.parametrize(
    ("make", "comm_dtype"),
    [
        (lambda: PeriodicAveraging(4), None),
        (lambda: PeriodicAveraging(4), torch.float16),
        (lambda: DiLoCo(4), None),
        (lambda: DiLoCo(4), torch.bfloat16),
    ],
    ids=["periodic", "periodic-fp16-wire", "diloco", "diloco-bf16-wire"],
)
def test_no_host_read_between_syncs_and_one_per_sync(make, comm_dtype):
    assert train(make(), comm_dtype) == [0, 0, 0, 1, 0, 0, 0, 1]


def test_only_an_algorithm_that_reads_the_loss_pays_one_read_per_step():
    # LSGD elects its leader by the windowed training loss: one read per step, and its sync adds the
    # election's all-gather (read once) and the leader's broadcast.
    reads = train(LeaderSGD(4, pull=0.5), rows={1: [10.0, 0.0]})  # rank 1's windowed loss: rank 0 leads
    assert reads[:3] == [1, 1, 1] and reads[4:7] == [1, 1, 1]
