"""Unit tests of the collectives and the parameter math, with a fake allreduce and literal numbers."""

import pytest
import torch

from lightning_localsgd.transport import collectives as comm_module
from lightning_localsgd.transport.collectives import Collectives, Group, NonFiniteReplicaError, nonfinite_flag
from lightning_localsgd.transport.tensors import (
    all_finite,
    any_nonfinite,
    flatten,
    lerp_,
    pseudo_gradient,
    sync_tensors,
    unflatten_,
)

RANK0_OF_2 = Group(handle=None, ranks=[0, 1], rank=0)


@pytest.fixture
def fake_allreduce(monkeypatch):
    """An allreduce in which "rank 1" contributes the flat vector(s) queued in ``other`` (one per call)."""
    calls = []
    other: list[torch.Tensor] = []

    def all_reduce(t, op=None, group=None):
        contribution = other.pop(0) if other else torch.zeros_like(t)
        calls.append(t.clone())
        t.add_(contribution.to(t.dtype))

    monkeypatch.setattr(comm_module.dist, "all_reduce", all_reduce)
    return calls, other


def test_mean_is_one_flat_allreduce_then_divide(fake_allreduce):
    calls, other = fake_allreduce
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])
    other.append(torch.tensor([3.0, 4.0, 5.0, 0.0, 0.0]))  # rank 1's replica [3, 4], [[5]] and its flags
    c = Collectives()
    c.mean_([a, b], RANK0_OF_2)
    assert a.tolist() == [2.0, 3.0] and b.tolist() == [[4.0]]
    assert len(calls) == 1 and calls[0].tolist() == [1.0, 2.0, 3.0, 0.0, 0.0]  # payload + one flag per rank
    assert c.counters.bytes_by_purpose["sync"] == 2 * (2 - 1) / 2 * 5 * 4  # ring allreduce of 5 fp32 values
    assert c.counters.calls == 1


def test_buckets_split_one_buffer_into_several_calls(fake_allreduce):
    calls, _ = fake_allreduce
    c = Collectives(bucket_mb=8 / 2**20)  # 8 bytes = 2 fp32 values per call
    x = torch.arange(3.0)
    c.mean_([x], RANK0_OF_2)  # 3 values + 2 flags = 5 values -> 3 calls
    assert [t.numel() for t in calls] == [2, 2, 1]
    assert x.tolist() == [0.0, 0.5, 1.0]  # the other rank contributed zeros
    assert c.counters.calls == 1  # one logical collective


def test_bf16_transport_sends_deltas_from_the_anchor(fake_allreduce):
    calls, other = fake_allreduce
    anchor = [torch.tensor([100.0, -50.0])]
    x = torch.tensor([100.5, -50.25])  # deltas 0.5, -0.25 are exact in bf16
    other.append(torch.tensor([1.5, 0.75, 0.0, 0.0]))  # rank 1's deltas -> replica [101.5, -49.25]
    c = Collectives(comm_dtype=torch.bfloat16)
    c.mean_([x], RANK0_OF_2, anchor=anchor)
    assert anchor[0].tolist() == [100.0, -50.0]  # the anchor is read, never written
    assert calls[0].dtype == torch.bfloat16 and calls[0].tolist() == [0.5, -0.25, 0.0, 0.0]
    assert x.tolist() == [101.0, -49.75]  # anchor + mean delta, in fp32
    assert c.counters.bytes_by_purpose["sync"] == 4 * 2  # 4 bf16 values, ring factor 1 for 2 ranks


def test_without_an_anchor_values_travel_in_full_precision(fake_allreduce):
    calls, other = fake_allreduce
    x = torch.tensor([1.0 + 2**-20])  # not representable in bf16
    other.append(torch.tensor([3.0, 0.0, 0.0]))
    Collectives(comm_dtype=torch.bfloat16).mean_([x], RANK0_OF_2)  # e.g. warm-up gradients
    assert calls[0].dtype == torch.float32 and x.item() == (4.0 + 2**-20) / 2


def test_nonfinite_flag_names_the_rank_and_changes_nothing(fake_allreduce):
    _, other = fake_allreduce
    x = torch.tensor([1.0, 2.0])
    other.append(torch.tensor([float("nan"), 0.0, 0.0, 1.0]))  # rank 1 raises its flag
    with pytest.raises(NonFiniteReplicaError, match=r"rank\(s\) \[1\].*step 7"):
        Collectives().mean_([x], RANK0_OF_2, step=7)
    assert x.tolist() == [1.0, 2.0]


def test_nonfinite_skip_repeats_without_the_bad_rank(fake_allreduce):
    calls, other = fake_allreduce
    x = torch.tensor([1.0, 2.0])
    other += [torch.tensor([float("nan"), 0.0, 0.0, 1.0]), torch.tensor([0.0, 0.0])]
    Collectives().mean_([x], RANK0_OF_2, nonfinite="skip")
    assert len(calls) == 2 and calls[1].tolist() == [1.0, 2.0]
    assert x.tolist() == [1.0, 2.0]  # the mean of the one finite replica


def test_single_process_group_is_a_no_op(fake_allreduce):
    calls, _ = fake_allreduce
    x = torch.tensor([1.0])
    Collectives().mean_([x], Group(None, [0], 0))
    assert calls == [] and x.tolist() == [1.0]


def test_bad_transport_arguments():
    with pytest.raises(ValueError, match="bfloat16"):
        Collectives(comm_dtype=torch.int8)
    with pytest.raises(ValueError, match="positive"):
        Collectives(bucket_mb=0)


def test_parameter_math_literals():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([[3.0, 4.0]])
    flat = flatten([a, b])
    assert flat.tolist() == [1.0, 2.0, 3.0, 4.0]
    unflatten_(torch.tensor([5.0, 6.0, 7.0, 8.0]), [a, b])
    assert a.tolist() == [5.0, 6.0] and b.tolist() == [[7.0, 8.0]]
    with pytest.raises(ValueError, match="tensors hold 4"):
        unflatten_(torch.zeros(3), [a, b])
    lerp_([a], [torch.tensor([15.0, 16.0])], 0.1)
    assert torch.allclose(a, torch.tensor([6.0, 7.0]))
    assert pseudo_gradient([torch.tensor([1.0])], [torch.tensor([0.25])])[0].tolist() == [0.75]


def test_sync_tensors_follow_the_buffer_policy():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    params = list(net.parameters())
    floats = [net[1].running_mean, net[1].running_var]  # num_batches_tracked (int) never appears
    avg, bc = sync_tensors(net, "average")
    assert [id(t) for t in avg] == [id(t) for t in params + floats] and bc == []
    avg, bc = sync_tensors(net, "broadcast")
    assert [id(t) for t in avg] == [id(t) for t in params] and [id(t) for t in bc] == [id(t) for t in floats]
    avg, bc = sync_tensors(net, "local")
    assert [id(t) for t in avg] == [id(t) for t in params] and bc == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_nonfinite_check_agrees_with_isfinite(dtype):
    """``any_nonfinite`` (one aminmax pass) against the reference ``~isfinite(x).all()``, case by case."""
    big = torch.finfo(dtype).max
    cases = [
        [0.0, 1.0, -2.0],
        [big, big, -big],  # finite at both ends of the range: no overflow in the check
        [1.0, float("nan"), 2.0],
        [float("inf"), 0.0],
        [0.0, -float("inf")],
        [float("inf"), -float("inf")],
        [float("nan"), float("inf")],
        [float("inf"), float("nan")],
        [0.0] * 999 + [float("nan")],  # the last value
    ]
    for values in cases:
        x = torch.tensor(values, dtype=dtype)
        expected = bool(~torch.isfinite(x).all())
        assert bool(any_nonfinite(x)) is expected, values
        assert nonfinite_flag(x).item() == float(expected) and nonfinite_flag(x).dtype == torch.float32
        assert all_finite([torch.zeros(2), x]) is not expected
    x = torch.randn(10_000, dtype=dtype)
    x[torch.randperm(10_000)[:3]] = float("nan")
    assert bool(any_nonfinite(x)) and not bool(any_nonfinite(x[~torch.isnan(x)]))
    assert not bool(any_nonfinite(torch.empty(0, dtype=dtype)))


def test_the_nonfinite_check_of_integers_and_empty_tensors():
    assert not bool(any_nonfinite(torch.tensor([1, 2], dtype=torch.int64)))
    assert not bool(any_nonfinite(torch.zeros(0, dtype=torch.uint8)))
    assert all_finite([]) and nonfinite_flag(torch.zeros(0)).item() == 0.0
