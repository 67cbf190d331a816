"""Inputs once accepted that then failed or misbehaved are refused with the fix (GPU issue, item 8)."""

from __future__ import annotations

import math
import re
from datetime import timedelta

import pytest
import torch

from lightning_localsgd import AsyncLocalSGDStrategy, DelayedNesterov, LocalSGDStrategy, OuterSGD, PeriodicAveraging
from lightning_localsgd.asynchronous.protocol import MessageType, ProtocolError, Status, parse_request
from lightning_localsgd.asynchronous.server import ParameterServer
from lightning_localsgd.fabric import LocalSGDStrategy as FabricLocalSGDStrategy
from lightning_localsgd.transport.collectives import Collectives, NonFiniteReplicaError
from tests.fakes import FakeCollectives, Toy, bind_fake


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", torch.float8_e5m2, "float64", torch.float64])
def test_float8_and_float64_wires_are_refused_with_the_fix(dtype):
    with pytest.raises(ValueError, match=r"float8: use 'int8'.*float64: use None"):
        LocalSGDStrategy(comm_dtype=dtype)
    assert Collectives(comm_dtype="float32").comm_dtype is torch.float32  # an fp64 model's deltas in fp32


def test_a_float16_delta_that_overflows_on_the_wire_is_caught_after_the_cast():
    """Finite in fp32, ±inf in fp16: the flag is taken after the cast, so no rank receives an Inf mean."""
    module, comm = Toy(), FakeCollectives(torch.float16)
    algorithm = PeriodicAveraging(2)
    bind_fake(algorithm, module, comm)  # the anchor: [1, 2, 0.5]
    module.set_([1.0 + 1e5, 2.0, 0.5])  # a delta of 1e5 > 65504, fp16's largest
    before = module.flat()
    with pytest.raises(NonFiniteReplicaError, match=r"rank\(s\) \[0\] overflows torch.float16 on the wire at step 2"):
        algorithm.after_step(2)
    assert torch.equal(module.flat(), before)  # no replica was changed
    flags = comm.sent[0][-2:]  # this rank's code rode in the allreduce: 2 = overflowed on the wire
    assert flags.tolist() == [2.0, 0.0]
    module.set_([1.0 + 6e4, 2.0, 0.5])  # within range: averaged as usual (the other rank sent zeros)
    algorithm.after_step(4)
    assert module.flat().tolist() == pytest.approx([1.0 + 3e4, 2.0, 0.5], rel=1e-3)  # the other sent a zero delta


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LocalSGDStrategy(timeout=timedelta(0)), "timeout must be positive"),
        (lambda: LocalSGDStrategy(init_timeout=timedelta(seconds=-1)), "init_timeout must be positive"),
        (lambda: AsyncLocalSGDStrategy(timeout=timedelta(0)), "timeout must be positive"),
        (lambda: FabricLocalSGDStrategy(timeout=timedelta(0)), "timeout must be positive"),
        (lambda: LocalSGDStrategy(bucket_mb=math.nan), "bucket_mb must be a positive number such as 256"),
        (lambda: OuterSGD(lr=math.inf), "lr must be a positive number such as 0.7, got inf"),
        (lambda: DelayedNesterov(lr=math.nan), "lr must be a positive number"),
        (lambda: AsyncLocalSGDStrategy(slowdown={0: math.nan}), r"slowdown\[0\] must be a finite number >= 1"),
        (lambda: AsyncLocalSGDStrategy(speed_smoothing=math.nan), r"speed_smoothing must be a number in \[0, 1\)"),
        (lambda: PeriodicAveraging(4, overlap_steps=1, merge_alpha=math.nan), r"merge_alpha must be a number"),
        (lambda: LocalSGDStrategy(save_replicas="no"), "save_replicas must be True or False"),
    ],
)
def test_values_that_were_accepted_and_then_misbehaved_are_refused(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def server() -> ParameterServer:
    return ParameterServer(
        torch.tensor([1.0, -1.0], dtype=torch.float64), 2, DelayedNesterov(), 2, sync_every=4, dynamic_local_steps=True
    )


@pytest.mark.parametrize(
    ("steps", "speed", "match"),
    [(4, math.inf, r"speed=inf"), (4, math.nan, r"speed=nan"), (-1, 2.0, r"steps=-1"), (2.5, 2.0, "steps=2.5")],
)
def test_a_malformed_push_is_refused_whole_and_aborts_the_run_with_its_reason(steps, speed, match):
    srv = server()
    reply = srv.handle(MessageType.PUSH, 1, steps, speed, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert reply is not None and reply.status == Status.ABORT
    assert srv.state.tolist() == [1.0, -1.0] and srv.updates == 0 and srv.pushes == [0, 0]  # nothing applied
    assert srv.abort_reason is not None and "worker rank 1 sent a malformed request" in srv.abort_reason
    assert re.search(match, srv.abort_reason)


@pytest.mark.parametrize(
    ("header", "match"),
    [([9.0, 1.0, 1.0], "unknown message type 9.0"), ([math.nan, 1, 1], "unknown message type nan"),
     ([1.0, math.inf, 1.0], "steps=inf"), ([1.0, 3.0, -2.0], "speed=-2.0")],
)  # fmt: skip
def test_request_headers_are_validated_before_anything_is_read_from_them(header, match):
    with pytest.raises(ProtocolError, match=match):
        parse_request(torch.tensor([*header, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert parse_request(torch.tensor([1.0, 3.0, 2.5, 0, 0, 0], dtype=torch.float64)) == (MessageType.PUSH, 3, 2.5)


def test_groups_made_for_a_fit_are_destroyed_at_its_teardown():
    """4 ranks as 2 nodes x 2: each fit makes node groups and a background group (and the async strategy its
    server group); after each teardown only the default group is left, so a sweep does not pile them up."""
    from tests.launch import run_ranks

    for result in run_ranks("tests.scenarios_teardown:fits", world=4, nodes=2, timeout=300):
        assert result["during"] == [3, 3]  # default + this rank's node group + the background group
        assert result["after"] == [1, 1, 1]
