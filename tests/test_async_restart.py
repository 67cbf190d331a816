"""Issue 11 item 5: every async worker resumes from its own part of the checkpoint, exactly.

Unit tests (no processes): two workers at different steps write their parts, and each gets back its
own global step, loop progress, dataloader position, inner optimizer state, scheduler, callbacks and
replica (literal numbers); a part that does not match the server's cut is reconciled (a push the cut
holds is not pushed again, a push it lacks is reported lost). The acceptance runs under
``torchrun --max-restarts=1`` (``benchmarks/restart_worker.py``): rank 1 is SIGKILLed after its step
13 while rank 0 has gone on to step 19, and the resumed run is checked against an independent
plain-torch replay of the whole asynchronous run in the server's arrival order.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from lightning_localsgd.algorithms.delayed_nesterov import DelayedNesterov, OuterSGD
from lightning_localsgd.async_protocol import LocalClient
from lightning_localsgd.async_server import ParameterServer
from lightning_localsgd.async_strategy import AsyncLocalSGDStrategy
from lightning_localsgd.async_worker import AsyncWorker, reconcile

f64 = torch.float64


class TwoWeights(LightningModule):
    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=f64))
        self._trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING))  # what the strategy asks


def _strategy(rank: int, module: LightningModule, world: int = 2) -> AsyncLocalSGDStrategy:
    class RankOf(AsyncLocalSGDStrategy):  # what the strategy knows on rank `rank` of `world` while fitting
        global_rank = rank  # type: ignore[assignment]
        world_size = world  # type: ignore[assignment]

        def fitting(self) -> bool:
            return True

    strategy = RankOf(sync_every=4, dynamic_local_steps=False)
    strategy._lightning_module = module
    strategy._names = ["w"]
    return strategy


def _lightning_dump(module: TwoWeights, step: int, momentum: list[float], position: str) -> dict[str, Any]:
    """The parts of Lightning's dump_checkpoint that differ per worker, with literal values."""
    opt = torch.optim.SGD([module.w], lr=0.05, momentum=0.9)
    opt.state[module.w]["momentum_buffer"] = torch.tensor(momentum, dtype=f64)
    loops = {"fit_loop": {"state_dict": {"combined_loader": [position]},
                          "epoch_loop.batch_progress": {"total": {"completed": step}}}}  # fmt: skip
    return {
        "epoch": step // 5, "global_step": step, "state_dict": module.state_dict(), "loops": loops,
        "optimizer_states": [opt.state_dict()], "lr_schedulers": [{"last_epoch": step}],
        "callbacks": {"ModelCheckpoint": {"last_model_path": f"written at step {step}"}},
    }  # fmt: skip


def _write_two_workers(path: Path) -> ParameterServer:
    """Rank 0 at its step 18 (2 steps into its round, 4 pushes) writes the file and its part; rank 1 at
    its step 12 (just pushed its 3rd round) writes its part. The server's cut holds pushes [4, 3]."""
    server = ParameterServer(torch.tensor([1.0, -1.0], dtype=f64), 2, DelayedNesterov(), 2, sync_every=4,
                             dynamic_local_steps=False)  # fmt: skip
    server.updates, server.pushes, server.steps = 7, [4, 3], [16, 12]
    places = [([0.5, -1.25], [0.75, -1.0], 18, 2, 4, [0.125, -0.5], "rank 0 at sample 12"),
              ([2.0, 3.0], [1.5, 2.5], 12, 0, 3, [-0.25, 0.5], "rank 1 at sample 8")]  # fmt: skip
    for rank, (replica, anchor, step, since, pushes, momentum, position) in enumerate(places):
        module = TwoWeights(replica)
        strategy = _strategy(rank, module)
        client = LocalClient(server, rank)
        worker = AsyncWorker(client, lambda m=module: [m.w], 2, torch.tensor(anchor, dtype=f64), sync_every=4)
        worker.steps, worker.steps_since_pull, worker.pushes = step, since, pushes
        strategy.worker, strategy.server = worker, server if rank == 0 else None
        strategy.save_checkpoint(_lightning_dump(module, step, momentum, position), path)
    return server


def test_each_worker_resumes_its_own_step_loops_optimizer_and_replica(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    _write_two_workers(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.rank0", "last.ckpt.rank1"]
    expected = {0: (18, "rank 0 at sample 12", [0.125, -0.5], [0.5, -1.25], [0.75, -1.0], 2),
                1: (12, "rank 1 at sample 8", [-0.25, 0.5], [2.0, 3.0], [1.5, 2.5], 0)}  # fmt: skip
    for rank, (step, position, momentum, replica, anchor, since) in expected.items():
        module = TwoWeights([0.0, 0.0])
        strategy = _strategy(rank, module)
        ckpt = strategy.load_checkpoint(path)  # every rank reads rank 0's file and its own part
        assert ckpt["global_step"] == step and ckpt["epoch"] == step // 5
        fit_loop = ckpt["loops"]["fit_loop"]
        assert fit_loop["epoch_loop.batch_progress"]["total"]["completed"] == step
        assert fit_loop["state_dict"]["combined_loader"] == [position]
        assert ckpt["lr_schedulers"] == [{"last_epoch": step}]
        assert ckpt["callbacks"]["ModelCheckpoint"]["last_model_path"] == f"written at step {step}"
        assert ckpt["async_localsgd"]["pushes"] == [4, 3]  # the server's cut is rank 0's, for everyone
        assert ckpt["state_dict"]["w"].tolist() == [1.0, -1.0]  # the global model θ
        strategy.load_model_state_dict(ckpt)
        assert module.w.tolist() == replica  # its own replica, not θ
        opt = torch.optim.SGD([module.w], lr=0.05, momentum=0.9)
        opt.load_state_dict(ckpt["optimizer_states"][0])
        assert opt.state[module.w]["momentum_buffer"].tolist() == momentum
        assert strategy._replay is None  # the cut holds exactly the pushes the part counts
        worker = strategy._resumed_worker["worker"]
        assert (worker["steps"], worker["steps_since_pull"], worker["anchor"].tolist()) == (step, since, anchor)


def test_a_part_that_cannot_be_used_says_so_and_what_happens_instead(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    _write_two_workers(path)
    (tmp_path / "last.ckpt.rank1").unlink()
    strategy = _strategy(1, TwoWeights([0.0, 0.0]))
    with pytest.warns(UserWarning, match=r"rank 1: .*last.ckpt.rank1 does not exist .* fresh round .* rank 0's step \(18\)"):
        ckpt = strategy.load_checkpoint(path)
    assert ckpt["global_step"] == 18 and strategy._resumed_worker is None
    part = torch.load(tmp_path / "last.ckpt.rank0", weights_only=False)
    torch.save({**part, "world_size": 3}, tmp_path / "last.ckpt.rank0")
    with pytest.warns(UserWarning, match=r"rank 0: .*rank0 was written by 3 workers, this run has 2"):
        _strategy(0, TwoWeights([0.0, 0.0])).load_checkpoint(path)


def test_a_push_the_cut_holds_is_trained_again_but_not_pushed_and_a_missing_one_is_reported():
    theta = torch.tensor([1.0, -1.0], dtype=f64)
    server = ParameterServer(theta.clone(), 2, OuterSGD(lr=1.0), 2, sync_every=4, dynamic_local_steps=False)
    server.updates, server.pushes, server.steps = 3, [1, 2], [4, 8]
    cut = server.state_dict()
    # rank 1 wrote its part after its 1st push (step 4), then pushed again at step 8 before rank 0's cut
    part = {"anchor": torch.tensor([0.0, 0.0], dtype=f64), "steps_since_pull": 0, "round_time": 0.0,
            "local_steps": 4, "speed": 1.0, "pushes": 1, "steps": 4, "staleness": 0}  # fmt: skip
    with pytest.warns(UserWarning, match=r"rank 1: .* holds 1 push\(es\) .* local steps 5..8\): it trains steps 5..8 again"):
        replay = reconcile(part, cut, 1)
    assert replay == (8, 2)
    w = nn.Parameter(torch.tensor([2.0, 2.0], dtype=f64))
    worker = AsyncWorker(LocalClient(server, 1), lambda: [w], 2, torch.zeros(2, dtype=f64), sync_every=4,
                         restored=cut, rank=1, resumed=part, replay=replay)  # fmt: skip
    replies = []
    for _ in range(4):  # steps 5..8: in θ already, trained again, not pushed; then θ is pulled
        with torch.no_grad():
            w.sub_(0.5)
        replies.append(worker.after_step())
    assert replies[:3] == [None, None, None] and server.updates == 3 and server.pushes == [1, 2]
    assert w.tolist() == [1.0, -1.0] and worker.anchor.tolist() == [1.0, -1.0]  # adopted θ, unchanged
    assert (worker.pushes, worker.steps, worker.steps_since_pull) == (2, 8, 0)
    for _ in range(4):  # steps 9..12: a real round, pushed once: g = anchor − x = [2, 2], θ ← θ − g
        with torch.no_grad():
            w.sub_(0.5)
        worker.after_step()
    assert server.updates == 4 and server.pushes == [1, 3] and server.steps == [4, 12]
    assert server.state.tolist() == [-1.0, -3.0] and w.tolist() == [-1.0, -3.0]
    # the other way round: the part counts 3 pushes (steps 12), the cut only 2 (steps 8): one is lost
    with pytest.warns(UserWarning, match=r"rank 1: 1 push\(es\) of this worker \(its local steps 9..12\) .*\(lost\)"):
        assert reconcile({**part, "pushes": 3, "steps": 12}, cut, 1) is None
