"""What the fault matrix (benchmarks/faults.py) found, pinned down without launching processes."""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks.faults import agent_noticed, checkpoints_intact
from lightning_localsgd import PeriodicAveraging
from lightning_localsgd.comm import NonFiniteReplicaError
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
    log = "\n".join([
        "W1130 14:39:50.100000 30416 torch/distributed/elastic/multiprocessing/api.py:1028] something earlier",
        "[rank0]: W1130 14:39:54.000000 1 x.py:1] a worker's line, not the agent's",
        "W1130 14:39:53.928000 30416 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 30421 "
        "closing signal SIGTERM",
        "E1130 14:39:54.246000 30416 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -9)",
    ])  # fmt: skip
    assert agent_noticed(log, kill) == pytest.approx(kill + 0.386, abs=1e-6)
    assert agent_noticed(log, kill + 10) is None


def test_checkpoints_intact_finds_torn_and_missing_files(tmp_path) -> None:
    torch.save({"global_step": 6}, tmp_path / "step=6.ckpt")
    torch.save({"global_step": 12}, tmp_path / "last.ckpt")
    assert checkpoints_intact(tmp_path, []) == (True, "2 files load")
    (tmp_path / "step=12.ckpt").write_bytes(b"PK\x03\x04 torn")
    (tmp_path / ".last.ckpt.tmp-99").write_bytes(b"half")
    events = [{"event": "save_end", "file": ".step=18.ckpt.tmp-7", "step": 18}]
    ok, note = checkpoints_intact(tmp_path, events)
    assert not ok and "step=12.ckpt does not load" in note and "step=18.ckpt was written (step 18) and is gone" in note
