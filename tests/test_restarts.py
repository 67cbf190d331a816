"""Acceptance of issue 11 for the synchronous algorithms: a worker SIGKILLed under
``torchrun --max-restarts=1`` and the final model equal, bit for bit (float64), to an uninterrupted run.

Each case runs two torchrun jobs side by side (``benchmarks/restart_worker.py``): the uninterrupted
run and the run in which rank 1 kills itself after optimizer step 13. The restarted attempt resumes
from ``last.ckpt`` of step 12, in the middle of an epoch (5 batches per epoch, each rank shuffling
its own shard with its own seed through a ``StatefulDataLoader``). The process group is created
through ``RestartSafeStrategy`` (``LocalSGDStrategy`` + ``process_group.init_process_group``, the
wiring proposed for ``setup_distributed``) and the loader positions are kept per rank
(``PerRankLoaderState``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks.restarts import LIGHTNING, run_job

JOB_TIMEOUT = 240.0  # seconds per torchrun job; a hang fails the test


@pytest.mark.parametrize("algorithm", ["periodic", "diloco"])
def test_killed_worker_resumes_bit_exactly(tmp_path: Path, algorithm: str) -> None:
    cfg = {**LIGHTNING, "algorithm": algorithm, "fixed": True}
    batches_per_epoch = cfg["samples"] // cfg["batch_size"]
    resume_step = cfg["kill_step"] // cfg["save_every"] * cfg["save_every"]
    assert batches_per_epoch == 5 and resume_step == 12 and resume_step % batches_per_epoch != 0  # mid-epoch

    with ThreadPoolExecutor(2) as pool:
        killed_f = pool.submit(run_job, {**cfg, "kill_attempts": [0]}, tmp_path / "killed", JOB_TIMEOUT)
        whole_f = pool.submit(run_job, {**cfg, "kill_attempts": []}, tmp_path / "whole", JOB_TIMEOUT)
        killed, whole = killed_f.result(), whole_f.result()

    assert whole["rc"] == 0 and killed["rc"] == 0, killed["log_tail"] + whole["log_tail"]
    kills = [e for e in killed["events"] if e["event"] == "kill"]
    assert [(e["rank"], e["attempt"], e["step"]) for e in kills] == [(1, 0, 13)]
    restarted = sorted(
        (e["rank"], e["step"]) for e in killed["events"] if e["event"] == "group_up" and e["attempt"] == 1
    )
    assert restarted == [(0, resume_step), (1, resume_step)]  # the restarted group came up and resumed at step 12
    for rank in (0, 1):
        got, want = killed["results"][rank], whole["results"][rank]
        assert got["attempt"] == 1 and got["global_step"] == want["global_step"] == cfg["steps"]
        # the data each rank saw after the restart is the uninterrupted run's, batch for batch
        assert got["batch_sums"] == want["batch_sums"][resume_step:]
        assert got["params"] == want["params"]  # float64, compared as hex strings: bit-equal
    assert killed["results"][0]["params"] == killed["results"][1]["params"]  # every rank holds the consensus


def test_per_rank_loader_state_hands_each_rank_its_own_position() -> None:
    from types import SimpleNamespace

    from lightning_localsgd.loader_state import PerRankLoaderState

    def checkpoint(state: object) -> dict:
        return {"loops": {"fit_loop": {"state_dict": {"combined_loader": state}}}}

    cb = PerRankLoaderState()
    saved = checkpoint(["rank 0's position"])
    cb.on_save_checkpoint(SimpleNamespace(world_size=1, global_rank=0), None, saved)  # one process: no collective
    assert saved["per_rank_loader_states"] == {"world_size": 1, "ranks": [["rank 0's position"]]}

    # a checkpoint written by rank 0 of two ranks, loaded on rank 1
    loaded = checkpoint(["rank 0's position"])
    loaded["per_rank_loader_states"] = {"world_size": 2, "ranks": [["rank 0's position"], ["rank 1's position"]]}
    cb.on_load_checkpoint(SimpleNamespace(world_size=2, global_rank=1), None, loaded)
    assert loaded["loops"]["fit_loop"]["state_dict"]["combined_loader"] == ["rank 1's position"]

    # on another world size the saved positions do not map onto the ranks: rank 0's stays, with a warning
    other = checkpoint(["rank 0's position"])
    other["per_rank_loader_states"] = loaded["per_rank_loader_states"]
    with pytest.warns(UserWarning, match="dataloader positions of 2 ranks but this run has 3"):
        cb.on_load_checkpoint(SimpleNamespace(world_size=3, global_rank=2), None, other)
    assert other["loops"]["fit_loop"]["state_dict"]["combined_loader"] == ["rank 0's position"]
