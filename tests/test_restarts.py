"""Acceptance of issue 11 for the synchronous algorithms: a worker SIGKILLed under
``torchrun --max-restarts=1`` and the final model equal, bit for bit (float64), to an uninterrupted run.

Each case runs the worker of ``benchmarks/restart_worker.py`` twice: under torchrun, the run in which
rank 1 kills itself after optimizer step 13, and, as the reference, the uninterrupted run (the same
worker code and config without the kill, on the shared rank processes of ``tests/launch.py``: under
torchrun it would cost three more process starts and compute the same numbers). The restarted attempt resumes
from ``last.ckpt`` of step 12, in the middle of an epoch (5 batches per epoch, each rank shuffling
its own shard with its own seed through a ``StatefulDataLoader``). ``LocalSGDStrategy`` creates the
process group so that the restart comes up (``process_group.init_process_group``) and keeps every
rank's own dataloader position in the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.restarts import LIGHTNING, run_job
from tests.launch import run_ranks

JOB_TIMEOUT = 240.0  # seconds per torchrun job; a hang fails the test


@pytest.mark.parametrize("algorithm", ["periodic", "diloco"])
def test_killed_worker_resumes_bit_exactly(tmp_path: Path, algorithm: str) -> None:
    cfg = {**LIGHTNING, "algorithm": algorithm, "fixed": True}
    batches_per_epoch = cfg["samples"] // cfg["batch_size"]
    resume_step = cfg["kill_step"] // cfg["save_every"] * cfg["save_every"]
    assert batches_per_epoch == 5 and resume_step == 12 and resume_step % batches_per_epoch != 0  # mid-epoch

    killed = run_job({**cfg, "kill_attempts": [0]}, tmp_path / "killed", JOB_TIMEOUT)
    whole = run_ranks("tests.scenarios_bench:restart_reference", timeout=JOB_TIMEOUT, cfg={**cfg, "kill_attempts": []})

    assert killed["rc"] == 0, killed["log_tail"]
    kills = [e for e in killed["events"] if e["event"] == "kill"]
    assert [(e["rank"], e["attempt"], e["step"]) for e in kills] == [(1, 0, 13)]
    restarted = sorted(
        (e["rank"], e["step"]) for e in killed["events"] if e["event"] == "group_up" and e["attempt"] == 1
    )
    assert restarted == [(0, resume_step), (1, resume_step)]  # the restarted group came up and resumed at step 12
    for rank in (0, 1):
        got, want = killed["results"][rank], whole[rank]
        assert got["attempt"] == 1 and got["global_step"] == want["global_step"] == cfg["steps"]
        # the data each rank saw after the restart is the uninterrupted run's, batch for batch
        assert got["batch_sums"] == want["batch_sums"][resume_step:]
        assert got["params"] == want["params"]  # float64, compared as hex strings: bit-equal
    assert killed["results"][0]["params"] == killed["results"][1]["params"]  # every rank holds the consensus


def test_each_rank_gets_its_own_dataloader_position_back(tmp_path: Path) -> None:
    """The strategy stores every rank's loader state; on the same world size rank r gets rank r's."""
    import torch

    from lightning_localsgd import LocalSGDStrategy

    def checkpoint(state: object, ranks: list | None = None) -> dict:
        ckpt = {"global_step": 5, "loops": {"fit_loop": {"state_dict": {"combined_loader": state}}}}
        if ranks is not None:
            ckpt["localsgd"] = {"world_size": len(ranks), "ranks": [{"loader": r} for r in ranks]}
        return ckpt

    class Rank1Of2(LocalSGDStrategy):  # what the strategy knows on rank 1 of 2 while fitting
        global_rank = 1  # type: ignore[assignment]
        world_size = 2  # type: ignore[assignment]

        def fitting(self) -> bool:
            return True

    path = tmp_path / "c.ckpt"
    torch.save(checkpoint(["rank 0's position"], [["rank 0's position"], ["rank 1's position"]]), path)
    loaded = Rank1Of2().load_checkpoint(path)
    assert loaded["loops"]["fit_loop"]["state_dict"]["combined_loader"] == ["rank 1's position"]
    # written by 3 ranks: the positions do not map onto this run's ranks, rank 0's stays
    torch.save(checkpoint(["rank 0's position"], [["a"], ["b"], ["c"]]), path)
    assert Rank1Of2().load_checkpoint(path)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        "rank 0's position"
    ]
