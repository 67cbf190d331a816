"""The int8/int4 wire under fault tolerance (issue 23, part 2): shared-scale integers a SUM allreduce adds.

First the pure math of :mod:`lightning_localsgd.transport.summable` with literal numbers and its
no-overflow bound at its worst case; then the real :class:`QuorumCollectives` rounds of three
"groups" (threads whose SUMs meet in memory, added in the wire's own dtype as gloo does: uint8
wraps modulo 256) against a plain-torch replay of the formula, through a group dying inside a
round, coming back healed, and contributing again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lightning_localsgd.fault_tolerance.collectives import QuorumCollectives, QuorumGroup, _QuorumHandle
from lightning_localsgd.fault_tolerance.session import ReplicaGroupSession
from lightning_localsgd.transport.collectives import Group
from lightning_localsgd.transport.quantize import BLOCK, LEVELS
from lightning_localsgd.transport.summable import block_absmax, decode_sum_, encode, shared_levels, summable_bytes
from tests.scenarios_ft import shared_scale_sum

F64 = torch.float64


def block(*values: float) -> torch.Tensor:
    """One block: ``values`` then zeros."""
    out = torch.zeros(BLOCK, dtype=F64)
    out[: len(values)] = torch.tensor(values, dtype=F64)
    return out


# ====================================================================== the pure wire
def test_levels_leave_room_for_the_sum_and_refuse_what_does_not_fit():
    assert [shared_levels("int8", c) for c in (1, 2, 3, 4, 253)] == [127, 126, 126, 125, 1]
    assert [shared_levels("int4", c) for c in (1, 2, 3, 4, 12, 13)] == [7, 6, 6, 5, 1, 1]
    with pytest.raises(ValueError, match="at most 13 fit. Use comm_dtype='int8'"):
        shared_levels("int4", 14)
    with pytest.raises(ValueError, match="at most 253 fit"):
        shared_levels("int8", 254)


def test_two_int4_contributors_by_hand():
    # v1 = [0.75, -0.375], v2 = [0.25, 0.5]: A = 0.75 + 0.5 = 1.25, L_2 = 6, s = 1.25/6
    v1, v2 = block(0.75, -0.375), block(0.25, 0.5)
    absmax = block_absmax(v1) + block_absmax(v2)
    assert absmax.tolist() == [1.25]
    levels = shared_levels("int4", 2)
    e1, e2 = torch.empty_like(v1), torch.empty_like(v2)
    p1, p2 = encode(v1, absmax, "int4", levels, error=e1), encode(v2, absmax, "int4", levels, error=e2)
    # q1 = round([3.6, -1.8]) = [4, -2] → u = q + 6 = [10, 4] → byte 10 | 4 << 4; q2 = round([1.2, 2.4]) = [1, 2]
    assert p1[0].item() == 10 | 4 << 4 and p2[0].item() == 7 | 8 << 4
    assert p1[1:].tolist() == [6 | 6 << 4] * 63 and p1.numel() == summable_bytes(BLOCK, "int4") == 64
    s = 1.25 / 6
    torch.testing.assert_close(e1[:2], torch.tensor([0.75 - 4 * s, -0.375 + 2 * s], dtype=F64), rtol=0, atol=1e-15)
    summed = p1 + p2  # uint8: 74 + 135 = 209, no wrap yet; the zeros: 102 + 102 wraps to 204 - 256... mod 256
    out = decode_sum_(summed, absmax, "int4", levels, 2, torch.empty(BLOCK, dtype=F64))
    torch.testing.assert_close(out[:2], torch.tensor([5 * s, 0.0], dtype=F64), rtol=0, atol=1e-15)  # Σq = [5, 0]
    assert out[2:].abs().max().item() == 0.0
    torch.testing.assert_close(out, v1 + v2 - e1 - e2, rtol=0, atol=1e-15)  # what was sent, exactly


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_sum_never_overflows_even_when_every_rounding_goes_the_same_way(fmt):
    """Identical contributors on a grid that hits every .5 tie: each rounds up by 1/2, the sum by c/2."""
    for c in range(1, 2 * LEVELS[fmt]):
        levels = shared_levels(fmt, c)
        grid = torch.linspace(-1.0, 1.0, 4 * BLOCK, dtype=F64)
        peak = grid.view(-1, BLOCK).abs().amax(1, keepdim=True)
        # values whose v/s = k + 1/2 (s = c·peak/levels): the worst case for the bound
        ties = ((grid.view(-1, BLOCK) / peak * levels / c).floor() + 0.5) * c * peak / levels
        ties = ties.clamp(-peak, peak).reshape(-1)
        absmax = block_absmax(ties) * c
        acc = torch.zeros(summable_bytes(ties.numel(), fmt), dtype=torch.uint8)
        error = torch.empty_like(ties)
        for _ in range(c):
            acc.add_(encode(ties, absmax, fmt, levels, error=error))  # uint8 adds modulo 256, as gloo's SUM
        out = decode_sum_(acc, absmax, fmt, levels, c, torch.empty_like(ties))
        torch.testing.assert_close(out, c * (ties - error), rtol=0, atol=1e-12)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_random_contributors_sum_exactly_what_they_sent(fmt):
    gen = torch.Generator().manual_seed(0)
    for c in (1, 2, 3, 5, 13):
        values = [torch.randn(3 * BLOCK, generator=gen, dtype=F64) * 10.0 ** (k % 4 - 2) for k in range(c)]
        values[0][:BLOCK] = 0.0  # a block of zeros from one contributor
        absmax = sum(block_absmax(v) for v in values)
        levels = shared_levels(fmt, c)
        acc = torch.zeros(summable_bytes(3 * BLOCK, fmt), dtype=torch.uint8)
        sent = torch.zeros(3 * BLOCK, dtype=F64)
        for v in values:
            error = torch.empty_like(v)
            acc.add_(encode(v, absmax, fmt, levels, error=error))
            sent += v - error
            step = (absmax / levels).repeat_interleave(BLOCK)
            assert bool((error.abs() <= step / 2 + 1e-15).all())  # rounding drops at most half a step
        out = decode_sum_(acc, absmax, fmt, levels, c, torch.empty(3 * BLOCK, dtype=F64))
        torch.testing.assert_close(out, sent, rtol=0, atol=1e-12)


# ====================================================================== rounds of three groups in one process
@dataclass
class Attempt:
    members: tuple[str, ...]  # the groups in this attempt's quorum
    dies: str | None = None  # this group dies at call ``at`` (its peers' SUM fails there)
    at: int = 3  # 1: the agreement, 2: the scales, 3: the integers
    barrier: threading.Barrier = field(init=False)
    slots: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.barrier = threading.Barrier(len(self.members))


class Died(Exception):
    pass


class ThreadSession(ReplicaGroupSession):
    """A group's real rounds (agree, the integer wire, commit) whose quorum is other threads of this process."""

    def __init__(self, name: str, rounds: list[list[Attempt]]) -> None:
        self.name, self.rounds, self.round_index, self.attempt_index = name, rounds, 0, 0
        self.replica_id, self.max_attempts, self.job = name, 3, Group(None, [0], 0)
        self.one_replica = False
        self.contributes, self.round_step, self.round_kind = True, 0, "sync"
        self.manager = SimpleNamespace(errored=lambda: "a peer died")
        self._open, self._adopted, self._healed, self._source = False, None, False, ""
        self.host = None
        self.wire: list[torch.Tensor] = []  # what this group put on the wire, per SUM
        self.summed: list[torch.Tensor] = []  # what the SUM gave back
        self.redos: list[bool] = []  # per attempt: opened as the survivors' redo of a round that failed in flight

    def open_round(self, step: int, kind: str, redo: bool = False) -> None:
        if not self._open:
            self.redos.append(redo)
            self._open, self.round_step, self.calls, self.ok = True, step, 0, True
            self.attempt = self.rounds[self.round_index][self.attempt_index]

    def start_sum_(self, flat: torch.Tensor, purpose: str) -> Any:
        ok = self.sum_(flat, purpose)
        return lambda: ok

    def sum_(self, flat: torch.Tensor, purpose: str) -> bool:
        self.calls += 1
        a = self.attempt
        if a.dies is not None and self.calls == a.at:
            if a.dies == self.name:
                raise Died
            self.ok = False
            return False  # the peer vanished: this SUM fails, the round will not commit
        self.wire.append(flat.clone())
        a.slots[self.name] = flat.clone()
        a.barrier.wait()
        total = torch.zeros_like(flat)
        for name in a.members:  # in the wire's dtype: uint8 wraps modulo 256 like gloo's SUM
            total.add_(a.slots[name])
        a.barrier.wait()
        flat.copy_(total)
        self.summed.append(total)
        return True

    def close_round(self, contributors: int) -> bool:
        self._open = False
        committed = self.ok
        if committed:
            self.contributes, self.round_index, self.attempt_index = True, self.round_index + 1, 0
        else:
            self.attempt_index += 1
        return committed


def unpack(packet: torch.Tensor, fmt: str) -> torch.Tensor:
    """The integers u of one contributor's packet (plain torch: int4 is value 2k in the low nibble)."""
    u = packet.to(torch.int64)
    return u if fmt == "int8" else torch.stack([u & 0x0F, u >> 4], dim=1).reshape(-1)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_three_groups_one_dies_inside_a_round_then_heals_and_contributes_again(fmt):
    """Rounds 1-4 of PeriodicAveraging's integer wire over groups a, b, c (2 blocks of values each):

    1. a, b, c contribute;
    2. c dies after the scales' SUM, before the integers': the attempt fails; a and b repeat it alone;
    3. c is back (healed: the peers' anchor, a zero residual, contributes nothing); a and b contribute;
    4. all three contribute.

    Every mean equals the replay of the formula; the failed attempt left the residuals untouched
    (else the replay of round 2 would differ); what each survivor sent over the rounds plus its
    final residual is exactly the sum of its deltas: nothing it rounded away is lost.
    """
    n = 2 * BLOCK - 7  # not a whole number of blocks: the wire pads
    names = ("a", "b", "c")
    rounds = [
        [Attempt(names)],
        [Attempt(names, dies="c", at=3), Attempt(("a", "b"))],
        [Attempt(names)],
        [Attempt(names)],
    ]
    gen = torch.Generator().manual_seed(3)
    deltas = {(k, r): torch.randn(n, generator=gen, dtype=F64) * (0.1 + r) for k in names for r in range(4)}
    x0 = torch.randn(n, generator=gen, dtype=F64)
    results: dict[tuple[str, int], torch.Tensor] = {}
    residuals: dict[tuple[str, int], torch.Tensor] = {}
    sessions: dict[str, ThreadSession] = {}
    errors: list[BaseException] = []
    consensus_2 = threading.Event()

    def group(name: str, first_round: int) -> None:
        session = sessions[name] = ThreadSession(name, rounds)
        session.round_index = first_round
        world = QuorumGroup(_QuorumHandle(), [0], 0, session=session)
        comm = QuorumCollectives(fmt)
        residual = torch.zeros(n, dtype=F64)
        if first_round == 0:
            anchor = x0.clone()
        else:  # healed from a peer: its consensus, and (its own) zero residual; no contribution this round
            consensus_2.wait(30)
            anchor, session.contributes = results["a", 1].clone(), False
        try:
            for r in range(first_round, 4):
                x = anchor + deltas[name, r]
                comm.mean_([x], world, purpose="sync", step=10 * (r + 1), anchor=anchor, residual=residual)
                results[name, r], residuals[name, r] = x.clone(), residual.clone()
                if (name, r) == ("a", 1):
                    consensus_2.set()
                anchor = x.clone()  # PeriodicAveraging: the consensus is the next anchor
        except Died:
            residuals[name, -1] = residual.clone()
        except BaseException as err:  # reported below
            errors.append(err)
            for attempt in (a for attempts in rounds for a in attempts):
                attempt.barrier.abort()

    threads = [threading.Thread(target=group, args=(k, 0)) for k in names]
    for t in threads:
        t.start()
    threads[2].join(30)  # c died in round 2
    threads.append(threading.Thread(target=group, args=("c", 2)))
    threads[-1].start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    # the replay of the formula, from which groups contributed to each round
    contributing = [names, ("a", "b"), ("a", "b"), names]
    anchor, owed = x0.clone(), {k: torch.zeros(n, dtype=F64) for k in names}
    for r, members in enumerate(contributing):
        padded = {k: torch.nn.functional.pad(deltas[k, r] + owed[k], (0, 7)) for k in members}
        summed, kept = shared_scale_sum(padded, fmt)
        mean = anchor + summed[:n] / len(members)
        for k in members:
            owed[k] = kept[k][:n]
        if r == 1:
            owed["c"] = torch.zeros(n, dtype=F64)  # c's next life starts from zero
        for k in names if r != 1 else ("a", "b"):
            torch.testing.assert_close(results[k, r], mean, rtol=0, atol=1e-12)
            torch.testing.assert_close(residuals[k, r], owed[k], rtol=0, atol=1e-12)
        anchor = mean
    assert residuals["c", 2].abs().max().item() == 0.0  # healed: nothing owed, nothing sent

    # error feedback: each survivor's integers (decoded with the round's scale) + its last residual = its deltas
    for k in ("a", "b"):
        sent_wire, summed_wire, sent = sessions[k].wire, sessions[k].summed, torch.zeros(n, dtype=F64)
        committed = (0, 5, 8, 11)  # first call of each committed attempt (round 2's first stopped after 2 calls)
        assert len(sent_wire) == 14
        for first in committed:
            c = int(summed_wire[first][0])  # the agreement: contributors of the round
            absmax, packet = summed_wire[first + 1], sent_wire[first + 2]
            levels = LEVELS[fmt] - c // 2
            q = (unpack(packet, fmt) - levels).to(F64)
            sent += (q * (absmax / levels).repeat_interleave(BLOCK))[:n]
        assert [int(summed_wire[f][0]) for f in committed] == [3, 2, 2, 3]
        torch.testing.assert_close(sent + residuals[k, 3], sum(deltas[k, r] for r in range(4)), rtol=0, atol=1e-12)


def test_a_group_that_heals_starts_from_a_zero_residual():
    from lightning_localsgd.fault_tolerance.state import restore_peer_state_

    module = torch.nn.Linear(2, 1)
    host = SimpleNamespace(module=module, optimizers=list, schedulers=list)
    loaded: list[dict[str, Any]] = []
    residual = torch.tensor([0.25, -0.5, 0.125])
    storage = residual.data_ptr()
    algorithm = SimpleNamespace(residual=residual, load_shared_state_=loaded.append)
    peer = {"module": {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}, "algorithm": {"num_syncs": 4}}
    restore_peer_state_(host, algorithm, {**peer, "optimizers": [], "schedulers": []})
    assert loaded == [{"num_syncs": 4}] and module.weight.tolist() == [[1.0, 1.0]]
    assert residual.tolist() == [0.0, 0.0, 0.0] and residual.data_ptr() == storage  # in place: fragments view it


@pytest.mark.parametrize("fmt", [None, "int8"])
def test_an_overlapped_round_that_fails_in_flight_is_redone_by_the_survivors_from_what_they_sent(fmt):
    """Two overlapped syncs (start at s, τ local steps, merge) of groups a, b, c; c dies while the values of
    the second travel. Each survivor's merge is x_now + (mean − sent) with the mean of the round
    redone by a and b from the values they sent at s (a shrink-only quorum), as the replay says."""
    n, names = BLOCK, ("a", "b", "c")
    rounds = [[Attempt(names)], [Attempt(names, dies="c", at=2 if fmt is None else 3), Attempt(("a", "b"))]]
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(n, generator=gen, dtype=F64)
    sent = {(k, r): x0 + torch.randn(n, generator=gen, dtype=F64) for k in names for r in range(2)}
    progress = {(k, r): 0.01 * torch.randn(n, generator=gen, dtype=F64) for k in names for r in range(2)}
    merged: dict[tuple[str, int], torch.Tensor] = {}
    sessions: dict[str, ThreadSession] = {}
    errors: list[BaseException] = []

    def group(name: str) -> None:
        session = sessions[name] = ThreadSession(name, rounds)
        world = QuorumGroup(_QuorumHandle(), [0], 0, session=session)
        comm = QuorumCollectives(fmt)
        anchor = x0.clone() if fmt else None
        residual = torch.zeros(n, dtype=F64) if fmt else None
        try:
            for r in range(2):
                flight = comm.start_mean(
                    sent[name, r], world, anchor=anchor, residual=residual, step=10 * (r + 1), device=x0.device
                )
                now = sent[name, r] + progress[name, r]  # τ local steps while the values travel
                mean = flight.wait()
                merged[name, r] = now + (mean - sent[name, r])
                if anchor is not None:
                    anchor = mean.clone()
        except Died:
            pass
        except BaseException as err:  # reported below
            errors.append(err)
            for attempt in (a for attempts in rounds for a in attempts):
                attempt.barrier.abort()

    threads = [threading.Thread(target=group, args=(k,)) for k in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sessions["a"].redos == [False, False, True]  # round 2 failed in flight, then was redone shrink-only

    # the replay: round 1 of a, b, c; round 2 of a and b, from the values they sent at its start
    anchor, owed = x0.clone(), {k: torch.zeros(n, dtype=F64) for k in names}
    for r, members in enumerate([names, ("a", "b")]):
        if fmt is None:
            mean = torch.stack([sent[k, r] for k in members]).mean(0)
        else:
            summed, kept = shared_scale_sum({k: sent[k, r] - anchor + owed[k] for k in members}, fmt)
            mean = anchor + summed / len(members)
            owed.update(kept)
            anchor = mean
        for k in ("a", "b"):
            expected = sent[k, r] + progress[k, r] + (mean - sent[k, r])  # local progress kept
            torch.testing.assert_close(merged[k, r], expected, rtol=0, atol=1e-12)
