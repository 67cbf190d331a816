"""Extra memory of every configuration, in model copies, counted from the tensors an algorithm and its
transport hold (docs/memory.md has the table; each algorithm's docstring its row).

"Extra" is beyond what training without this library holds (parameters, gradients, the inner
optimizer's state). The count walks every object reachable from the algorithm and the transport
(attributes, lists, dicts, outer optimizers; not the model itself), keeps each tensor storage once
(the anchor and its views count once), and sums their bytes, at the end of every step of a run
with syncs (and syncs in flight): the largest sum is the live extra memory. Temporaries inside a
sync (e.g. the flat copy of the model an average makes) are not held between steps and are not
counted here: they add to the peak, which ``make gpu-check`` measures on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_localsgd import DiLoCo, ElasticAveraging, LeaderSGD, ModifiedLocalGD, PeriodicAveraging
from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.contract import SyncContext
from lightning_localsgd.engine import SyncEngine
from lightning_localsgd.transport.collectives import DryCollectives, Group

P = 4096  # parameters of the model: one 64 x 64 weight, fp32


class Wire(DryCollectives):
    """The other rank sends what this one sends: the transport's local work runs (the integer path too), and the
    allreduce doubles (the other rank's values are this rank's), so the mean is the values themselves."""

    def all_reduce_sum_(self, flat: Tensor, group: Group, purpose: str) -> Tensor:
        return flat.mul_(2)


def storages(root: Any, skip: set[int]) -> Iterator[tuple[str, Tensor]]:
    """(path, tensor) of every tensor reachable from ``root`` whose storage is not in ``skip``."""
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("", root)]
    while stack:
        path, obj = stack.pop()
        if isinstance(obj, Tensor):
            key = obj.untyped_storage().data_ptr()
            if key not in skip and key not in seen and obj.untyped_storage().nbytes():
                seen.add(key)
                yield path, obj
            continue
        if id(obj) in seen or isinstance(obj, nn.Module | type | str | bytes | int | float | bool) or obj is None:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            stack += [(f"{path}[{k!r}]", v) for k, v in obj.items()]
        elif isinstance(obj, list | tuple | set):
            stack += [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
        elif isinstance(obj, torch.optim.Optimizer):
            stack += [(f"{path}.state", obj.state), (f"{path}.param_groups", obj.param_groups)]
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("lightning_localsgd", "tests")):
            stack += [(f"{path}.{k}", v) for k, v in vars(obj).items()]
        elif isinstance(obj, SyncContext):
            stack.append((f"{path}.comm", obj.comm))


def live_extra(make: Callable[[], ConsensusAlgorithm], comm_dtype: Any = None, steps: int = 12) -> float:
    """The largest extra memory held between steps, in copies of the model's fp32 parameters."""
    return run(make, comm_dtype, steps)[0]


def run(make: Callable[[], ConsensusAlgorithm], comm_dtype: Any = None, steps: int = 12) -> tuple[float, Tensor]:
    """(the largest extra memory held between steps in fp32 model copies, the final parameters)."""
    torch.manual_seed(0)
    module = nn.Linear(64, 64, bias=False)
    comm = Wire(comm_dtype)
    algorithm = make()
    world = Group(None, [0, 1], 0)
    algorithm.bind(SyncContext(module, comm, world, world), 0)
    engine = SyncEngine(algorithm)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = module(x).pow(2).mean()
        loss.backward()
        engine.note_loss(loss)
        return loss

    largest = 0
    for step in range(1, steps + 1):
        engine.step(step, closure, lambda c: optimizer.step(c), optimizer)
        own = {t.untyped_storage().data_ptr() for t in module.parameters()}
        own |= {p.grad.untyped_storage().data_ptr() for p in module.parameters() if p.grad is not None}
        own |= {
            v.untyped_storage().data_ptr()
            for s in optimizer.state.values()
            for v in s.values()
            if isinstance(v, Tensor)
        }
        held = sum(t.untyped_storage().nbytes() for _, t in storages(algorithm, own))
        largest = max(largest, held)
    comm.close()
    return largest / (P * 4), module.weight.detach().clone()


TABLE = {  # configuration -> (algorithm, comm_dtype, extra live memory in fp32 model copies, what holds it)
    "PeriodicAveraging": (lambda: PeriodicAveraging(4), None, 1.0),  # the transport's flat buffer
    "PeriodicAveraging, bf16 wire": (lambda: PeriodicAveraging(4), torch.bfloat16, 2.5),  # + anchor, bf16 wire
    "PeriodicAveraging, int8 wire": (lambda: PeriodicAveraging(4), "int8", 4.0),  # + anchor, residual, packets
    "PeriodicAveraging, overlap τ=1": (lambda: PeriodicAveraging(4, overlap_steps=1), None, 2.0),  # sent + mean
    "PeriodicAveraging, 4 fragments τ=1": (lambda: PeriodicAveraging(4, fragments=4, overlap_steps=1), None, 0.5),
    "DiLoCo": (lambda: DiLoCo(4), None, 3.0),  # θ, Nesterov momentum, the flat buffer
    "DiLoCo, overlap τ=1, int8 wire": (lambda: DiLoCo(4, overlap_steps=1), "int8", 6.0),  # + sent, residual, packets
    "DiLoCo, 4 fragments τ=1, int8 wire": (lambda: DiLoCo(4, fragments=4, overlap_steps=1), "int8", 3.75),
    "ModifiedLocalGD": (lambda: ModifiedLocalGD(4, prox=0.1), None, 3.0),  # z, q, the flat buffer
    "ModifiedLocalGD, correction=False": (lambda: ModifiedLocalGD(4, prox=0.1, correction=False), None, 2.0),
    "LeaderSGD": (lambda: LeaderSGD(4, pull=0.5), None, 0.0),  # the broadcast buffer is a temporary of the pull
    "ElasticAveraging": (lambda: ElasticAveraging(4), None, 2.0),  # the center, the flat buffer
}


@pytest.mark.parametrize("name", list(TABLE))
def test_extra_memory_of_each_configuration_is_the_documented_number_of_model_copies(name):
    make, comm_dtype, copies = TABLE[name]
    assert live_extra(make, comm_dtype) == pytest.approx(copies, abs=0.005)  # + one NaN flag per rank


OFFLOADED = {  # what each configuration still holds under offload=True: all of it in host memory, no flat buffer
    "PeriodicAveraging": 0.0,
    "PeriodicAveraging, bf16 wire": 1.0,  # the anchor
    "PeriodicAveraging, int8 wire": 2.0,  # anchor, residual
    "PeriodicAveraging, overlap τ=1": 2.0,  # the values sent; the buffer in flight (on the wire's device)
    "DiLoCo": 2.0,  # θ, momentum
    "DiLoCo, overlap τ=1, int8 wire": 5.0,  # θ, momentum, residual, values sent; the buffer in flight
    "ModifiedLocalGD": 2.0,  # z, q
    "ElasticAveraging": 1.0,  # the center
}


@pytest.mark.parametrize("name", list(OFFLOADED))
def test_offload_changes_no_number_and_holds_only_host_copies(name):
    """The same trajectory bit for bit; held between steps: the algorithm's own state (all in host memory,
    pinned where an accelerator exists), and no transport buffer. On the CPU the host is the device, so this
    checks the arithmetic and the count; make gpu-check measures what leaves the GPU."""
    make, comm_dtype, _ = TABLE[name]

    def offloaded() -> ConsensusAlgorithm:
        algorithm = make()
        return type(algorithm)(**{**vars_of(algorithm), "offload": True})

    _, params = run(make, comm_dtype)
    held_off, params_off = run(offloaded, comm_dtype)
    assert torch.equal(params, params_off)
    assert held_off == pytest.approx(OFFLOADED[name], abs=0.005)


def vars_of(algorithm: ConsensusAlgorithm) -> dict[str, Any]:
    """The constructor arguments of the configurations above, read back from the instance."""
    import inspect

    names = inspect.signature(type(algorithm).__init__).parameters
    out = {}
    for n in names:
        if n in ("self", "outer_optimizer", "anchor_device", "offload"):
            continue
        if n == "prox":
            out[n] = algorithm.prox
        elif hasattr(algorithm, n):
            out[n] = getattr(algorithm, n)
    return out
