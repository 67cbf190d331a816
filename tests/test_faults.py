"""What the fault matrix (benchmarks/faults.py) found, pinned down without launching processes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import pytest
import torch

from benchmarks.faults import agent_noticed, checkpoints_intact
from lightning_localsgd import PeriodicAveraging
from lightning_localsgd.engine import SyncEngine
from lightning_localsgd.transport.collectives import NonFiniteReplicaError
from tests.fakes import FakeCollectives, Toy, bind_fake


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_checkpoint_mid_period_follows_the_nonfinite_policy(policy: str) -> None:
    # Found by the fault matrix: with nonfinite="skip" a NaN replica crashed the next checkpoint
    # (and validation) mid-period, because the consensus written there ignored the policy.
    algo = PeriodicAveraging(sync_every=4, nonfinite=policy)
    module, comm = Toy(), FakeCollectives()
    bind_fake(algo, module, comm)
    module.set_([float("nan"), 1.0, 2.0])  # this rank (0 of 2) went NaN after step 1
    comm.other = torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64)  # rank 1's finite replica
    if policy == "raise":
        with pytest.raises(NonFiniteReplicaError, match=r"rank\(s\) \[0\]"):
            algo.consensus_state_dict(module.state_dict(), step=1)
        return
    saved = algo.consensus_state_dict(module.state_dict(), step=1)
    assert saved["w"].tolist() == [3.0, 4.0] and saved["b"].tolist() == [5.0]  # the finite replica's mean
    assert torch.isnan(module.w[0]) and module.w[1].item() == 1.0  # this replica put back as it was


def test_the_agent_log_time_of_a_failed_worker() -> None:
    kill = time.mktime((2026, 11, 30, 14, 39, 53, 0, 0, -1)) + 0.542
    api = "torch/distributed/elastic/multiprocessing/api.py"
    lines = [
        f"W1130 14:39:50.100000 30416 {api}:1028] something earlier",
        "[rank0]: W1130 14:39:54.000000 1 x.py:1] a worker's line, not the agent's",
        f"W1130 14:39:53.928000 30416 {api}:1028] Sending process 30421 closing signal SIGTERM",
        f"E1130 14:39:54.246000 30416 {api}:1002] failed (exitcode: -9)",
    ]
    log = "\n".join(lines)
    assert agent_noticed(log, kill) == pytest.approx(kill + 0.386, abs=1e-6)
    assert agent_noticed(log, kill + 10) is None


def test_checkpoints_intact_finds_torn_and_missing_files(tmp_path) -> None:
    torch.save({"global_step": 6}, tmp_path / "step=6.ckpt")
    torch.save({"global_step": 12}, tmp_path / "last.ckpt")
    torch.save({"world_size": 2, "model": {}}, tmp_path / "last.ckpt.rank1")  # an async worker's part: no step
    assert checkpoints_intact(tmp_path, []) == (True, "3 files load")
    (tmp_path / "last.ckpt.rank0").write_bytes(b"torn part")
    (tmp_path / "step=12.ckpt").write_bytes(b"PK\x03\x04 torn")
    (tmp_path / ".last.ckpt.tmp-99").write_bytes(b"half")
    events = [{"event": "save_end", "file": ".step=18.ckpt.tmp-7", "step": 18}]
    ok, note = checkpoints_intact(tmp_path, events)
    assert not ok and "step=12.ckpt does not load" in note and "step=18.ckpt was written (step 18) and is gone" in note
    assert "last.ckpt.rank0 does not load" in note


def test_checkpoints_intact_wants_the_parts_a_file_refers_to_and_not_the_superseded_ones(tmp_path) -> None:
    torch.save({"global_step": 12, "localsgd": {"world_size": 2, "step": 12}}, tmp_path / "last.ckpt")
    torch.save({"model": {}}, tmp_path / "last.ckpt.step12.rank0")
    superseded = [{"event": "save_end", "file": ".last.ckpt.step6.rank1.tmp-3", "step": 6}]  # removed by design
    ok, note = checkpoints_intact(tmp_path, superseded)
    assert not ok and note == "last.ckpt's part of rank 1 (step 12) is missing"
    torch.save({"model": {}}, tmp_path / "last.ckpt.step12.rank1")
    assert checkpoints_intact(tmp_path, superseded) == (True, "3 files load")


@pytest.mark.parametrize("fixed", [True, False])
def test_a_skipped_replica_rejoins_with_its_nonfinite_momentum_reset(fixed: bool) -> None:
    # Found by the fault matrix's NaN row: under nonfinite="skip" the NaN replica received the
    # others' mean at the sync, but its SGD momentum stayed NaN, so its next step made it NaN again
    # and it was skipped at every later sync (its data never reached the model again).
    algo = PeriodicAveraging(sync_every=2, nonfinite="skip")
    module, comm = Toy(), FakeCollectives()  # this rank: w = [1, 2], b = [0.5]; rank 1 is scripted
    bind_fake(algo, module, comm)
    engine = SyncEngine(algo)
    sgd = torch.optim.SGD(module.parameters(), lr=0.5, momentum=0.5)

    def closure(nan: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            sgd.zero_grad()
            loss = 0.5 * torch.cat([module.w, module.b]).pow(2).sum()  # gradient = the values
            loss.backward()
            if nan:
                module.w.grad[0] = float("nan")
            return loss

        return run

    def step(s: int, nan: bool) -> None:
        engine.step(s, closure(nan), sgd.step, sgd if fixed else None)

    step(1, True)  # NaN gradient: w[0] and its momentum go NaN; b = 0.5 - 0.25 = 0.25
    comm.other = torch.tensor([4.0, 8.0, 2.0], dtype=torch.float64)  # rank 1's finite replica at step 2
    with pytest.warns(UserWarning, match="reset to 0") if fixed else contextlib.nullcontext():
        step(2, False)  # the sync skips this rank: every rank gets rank 1's replica
    assert module.flat().tolist() == [4.0, 8.0, 2.0]
    step(3, False)
    if not fixed:  # the momentum was still NaN: the replica is NaN again after one step
        assert torch.isnan(module.w[0]) and not torch.isnan(module.w[1])
        return
    # w[0]: momentum reset to 0, so buf = 0.5·0 + 4 = 4 and w = 4 − 0.5·4 = 2.
    # w[1]: buf after step 1 = 2, step 2: 0.5·2 + 1 = 2 (w was 1 after step 1), step 3: 0.5·2 + 8 = 9, w = 8 − 4.5
    # b: buf 0.5, then 0.5·0.5 + 0.25 = 0.5, then 0.5·0.5 + 2 = 2.25, b = 2 − 1.125
    assert module.flat().tolist() == [2.0, 3.5, 0.875]


@pytest.mark.parametrize(("resumed", "lost", "skipped"), [({0: 18, 1: 12}, 1, 0), ({0: 18, 1: 18}, 1, 5)])
def test_steps_lost_and_skipped_are_counted_per_rank(tmp_path, resumed, lost, skipped) -> None:
    """Async workers resume at their own steps: rank 0 did 19 steps and rank 1 13 before the kill."""
    from benchmarks.faults import BASE, analyse

    events = [
        {"event": "step", "attempt": 0, "rank": r, "step": s, "t": float(s)}
        for r, n in ((0, 19), (1, 13))
        for s in range(1, n + 1)
    ]
    events += [{"event": "kill", "t": 13.5, "rank": 1, "attempt": 0, "step": 13}]
    events += [{"event": "group_up", "attempt": 1, "rank": r, "step": s, "t": 30.0} for r, s in resumed.items()]
    job = {"events": events, "results": {}, "rc": 0, "seconds": 40.0, "log_tail": ""}
    spec = {"fault": "kill_async", "cfg": {**BASE, "algorithm": "async", "kill_step": 13, "victim": 1}}
    (tmp_path / "ckpt").mkdir()
    record = analyse(spec, job, tmp_path, refs={})
    assert (record["steps_lost"], record["steps_skipped"]) == (lost, skipped)
    assert record["resumed_by_rank"] == resumed and record["resumed_from"] == min(resumed.values())
