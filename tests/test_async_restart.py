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

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from lightning_localsgd.asynchronous.optimizers import DelayedNesterov, OuterSGD
from lightning_localsgd.asynchronous.server import LocalClient, ParameterServer
from lightning_localsgd.asynchronous.strategy import AsyncLocalSGDStrategy
from lightning_localsgd.asynchronous.worker import AsyncWorker, reconcile

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
    loops = {
        "fit_loop": {
            "state_dict": {"combined_loader": [position]},
            "epoch_loop.batch_progress": {"total": {"completed": step}},
        }
    }
    return {
        "epoch": step // 5,
        "global_step": step,
        "state_dict": module.state_dict(),
        "loops": loops,
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [{"last_epoch": step}],
        "callbacks": {"ModelCheckpoint": {"last_model_path": f"written at step {step}"}},
    }


def _write_two_workers(path: Path) -> ParameterServer:
    """Rank 0 at its step 18 (2 steps into its round, 4 pushes) writes the file and its part; rank 1 at
    its step 12 (just pushed its 3rd round) writes its part. The server's cut holds pushes [4, 3]."""
    server = ParameterServer(
        torch.tensor([1.0, -1.0], dtype=f64), 2, DelayedNesterov(), 2, sync_every=4, dynamic_local_steps=False
    )
    server.updates, server.pushes, server.steps = 7, [4, 3], [16, 12]
    places = [
        ([0.5, -1.25], [0.75, -1.0], 18, 2, 4, [0.125, -0.5], "rank 0 at sample 12"),
        ([2.0, 3.0], [1.5, 2.5], 12, 0, 3, [-0.25, 0.5], "rank 1 at sample 8"),
    ]
    for rank, (replica, anchor, step, since, pushes, momentum, position) in enumerate(places):
        module = TwoWeights(replica)
        strategy = _strategy(rank, module)
        client = LocalClient(server, rank)
        worker = AsyncWorker(client, lambda m=module: [m.w], 2, torch.tensor(anchor, dtype=f64), sync_every=4)
        worker.steps, worker.steps_since_pull, worker.pushes = step, since, pushes
        strategy._worker, strategy._server = worker, server if rank == 0 else None  # as a fit would leave them
        strategy.save_checkpoint(_lightning_dump(module, step, momentum, position), path)
    return server


def test_each_worker_resumes_its_own_step_loops_optimizer_and_replica(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    _write_two_workers(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.rank0", "last.ckpt.rank1"]
    expected = {
        0: (18, "rank 0 at sample 12", [0.125, -0.5], [0.5, -1.25], [0.75, -1.0], 2),
        1: (12, "rank 1 at sample 8", [-0.25, 0.5], [2.0, 3.0], [1.5, 2.5], 0),
    }
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


def test_a_part_that_cannot_be_used_says_so_and_what_happens_instead(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    _write_two_workers(path)
    (tmp_path / "last.ckpt.rank1").unlink()
    module = TwoWeights([0.0, 0.0])
    strategy = _strategy(1, module)
    with pytest.warns(
        UserWarning, match=r"rank 1: .*last.ckpt.rank1 does not exist .* fresh round .* rank 0's step \(18\)"
    ):
        ckpt = strategy.load_checkpoint(path)
    assert ckpt["global_step"] == 18 and strategy._resumed_worker is None
    strategy.load_model_state_dict(ckpt)
    assert module.w.tolist() == [1.0, -1.0]  # the global model θ, from the file
    broadcasts: list[object] = []
    monkeypatch.setattr("lightning_localsgd.trainer.replica.broadcast_module_", lambda *a: broadcasts.append(a))
    strategy.configure_ddp()  # no broadcast: the ranks that have a part would not join it
    assert broadcasts == []
    _strategy(1, module).configure_ddp()  # a fresh start does broadcast rank 0's model
    assert len(broadcasts) == 1
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
    part = {
        "anchor": torch.tensor([0.0, 0.0], dtype=f64),
        "steps_since_pull": 0,
        "round_time": 0.0,
        "local_steps": 4,
        "speed": 1.0,
        "pushes": 1,
        "steps": 4,
        "staleness": 0,
    }
    with pytest.warns(
        UserWarning, match=r"rank 1: .* holds 1 push\(es\) .* local steps 5..8\): it trains steps 5..8 again"
    ):
        resumed, replay = reconcile(part, cut, 1)
    assert replay == (8, 2) and resumed == part
    w = nn.Parameter(torch.tensor([2.0, 2.0], dtype=f64))
    worker = AsyncWorker(
        LocalClient(server, 1),
        lambda: [w],
        2,
        torch.zeros(2, dtype=f64),
        sync_every=4,
        restored=cut,
        rank=1,
        resumed=resumed,
        replay=replay,
    )
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
    # the other way round: the part counts 3 pushes (steps 12) and is 1 step into its next round, the cut
    # only 2 pushes (steps 8): one is lost, and the worker's counters go back to the server's (2, 8 + 1)
    ahead = {**part, "pushes": 3, "steps": 13, "steps_since_pull": 1}
    with pytest.warns(UserWarning, match=r"rank 1: 1 push\(es\) of this worker \(its local steps 9..12\) .*\(lost\)"):
        resumed, replay = reconcile(ahead, cut, 1)
    assert replay is None and (resumed["pushes"], resumed["steps"], resumed["steps_since_pull"]) == (2, 9, 1)


# ---------------------------------------------------------------------------------------------- under torchrun
JOB_TIMEOUT = 240.0  # seconds for the torchrun job; a hang fails the test


def _wait(rank: int, step: int, attempt: int, until: dict[str, Any], hold: bool = False) -> dict[str, Any]:
    return {"rank": rank, "step": step, "attempt": attempt, "until": until, "hold": hold}


def _killed_async_run(tmp_path: Path, kill_step: int, waits: list[dict[str, Any]]) -> dict[str, Any]:
    from benchmarks.restarts import LIGHTNING, run_job

    cfg = {
        **LIGHTNING,
        "algorithm": "async",
        "fixed": True,
        "kill_attempts": [0],
        "victim": 1,
        "kill_step": kill_step,
        "log_steps": True,
        "log_pushes": True,
        "waits": waits,
    }
    assert (cfg["steps"], cfg["sync_every"], cfg["save_every"], cfg["samples"] // cfg["batch_size"]) == (24, 4, 6, 5)
    job = run_job(cfg, tmp_path, JOB_TIMEOUT)
    assert job["rc"] == 0, job["log_tail"]
    return job


def _batches(rank: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s batches, step by step, from the loader rebuilt here (seed 0 + rank, 5 batches per epoch)."""
    from torch.utils.data import TensorDataset

    from recipes.data import shuffled_loader

    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(1000 + rank), dtype=f64)
    loader = shuffled_loader(TensorDataset(x, torch.sin(x.sum(1))), 4, seed=rank)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(out) < steps:
        out.extend(iter(loader))  # one epoch
    return out[:steps]


def _replay(
    theta0: torch.Tensor, pushes: list[tuple[int, int]], restart: int, pull_at_restart: set[int]
) -> torch.Tensor:
    """The asynchronous run in plain torch, in the server's order: each push ``(worker, steps)`` trains that
    worker's replica ``steps`` SGD steps (lr 0.05, momentum 0.9) on its next batches, and Delayed Nesterov
    (lr 0.7, β 0.9, N = 2, c = 0; ALGORITHMS.md section 4) applies g = anchor − replica; the worker adopts θ.
    At push index ``restart`` the workers in ``pull_at_restart`` adopt the current θ (a resumed worker that
    replayed steps the cut held pulls θ instead of pushing them again)."""
    from torch.nn.utils import parameters_to_vector

    def load(net: nn.Module, vec: torch.Tensor) -> None:  # copies (vector_to_parameters would alias vec)
        with torch.no_grad():
            offset = 0
            for p in net.parameters():
                p.copy_(vec[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    nets, opts, anchors, cursor = {}, {}, {}, {0: 0, 1: 0}
    batches = {w: _batches(w, 24) for w in (0, 1)}
    for w in (0, 1):
        nets[w] = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        load(nets[w], theta0)
        opts[w] = torch.optim.SGD(nets[w].parameters(), lr=0.05, momentum=0.9)
        anchors[w] = theta0.clone()
    theta, m, delta = theta0.clone(), torch.zeros_like(theta0), torch.zeros_like(theta0)
    for t, (w, steps) in enumerate(pushes):
        if t == restart:
            for v in pull_at_restart:
                anchors[v] = theta.clone()
                load(nets[v], theta)
        for _ in range(steps):
            x, y = batches[w][cursor[w]]
            cursor[w] += 1
            opts[w].zero_grad()
            nn.functional.mse_loss(nets[w](x).squeeze(-1), y).backward()
            opts[w].step()
        with torch.no_grad():
            g = anchors[w] - parameters_to_vector(nets[w].parameters())
            delta = delta + g
            if (t + 1) % 2 == 0:
                m = 0.9 * m + delta / 2
                theta = theta - 0.7 * (0.9 * m + g / 2)
                delta = torch.zeros_like(theta)
            else:
                theta = theta - 0.7 * (g / 2)
            anchors[w] = theta.clone()
            load(nets[w], theta)
    assert cursor == {0: 24, 1: 24}
    return theta


def _check_resumed_run(job: dict[str, Any], kill_step: int, resumed_at: dict[int, int], replayed: dict[int, int]):
    events, results = job["events"], job["results"]
    assert [(e["rank"], e["attempt"], e["step"]) for e in events if e["event"] == "kill"] == [(1, 0, kill_step)]
    up = {e["rank"]: e["step"] for e in events if e["event"] == "group_up" and e["attempt"] == 1}
    assert up == resumed_at  # each worker resumed at its own step (rank 0's file was written at its step 18)
    trained = {
        (r, a): [e["step"] for e in events if e["event"] == "step" and (e["rank"], e["attempt"]) == (r, a)]
        for r in (0, 1)
        for a in (0, 1)
    }
    # rank 0 was held after step 19 (before that step's event) until the agent stopped it
    assert trained[0, 0] == list(range(1, 19)) and trained[1, 0] == list(range(1, kill_step + 1))
    for rank in (0, 1):  # no step skipped: attempt 1 continues right after the worker's own part
        assert trained[rank, 1] == list(range(resumed_at[rank] + 1, 25)), rank
        own = _batches(rank, 24)[resumed_at[rank] :]
        assert results[rank]["batch_sums"] == [float(x.sum()) for x, _ in own], rank  # its own data position
    cut = next(e["updates"] for e in events if e["event"] == "server_start" and e["attempt"] == 1)
    before = sorted(
        (e for e in events if e["event"] == "push" and e["attempt"] == 0 and e["update"] <= cut),
        key=lambda e: e["update"],
    )
    after = sorted((e for e in events if e["event"] == "push" and e["attempt"] == 1), key=lambda e: e["update"])
    history = before + after
    assert [e["update"] for e in history] == list(range(1, len(history) + 1))  # every update once, in order
    for rank in (0, 1):  # no step repeated: the pushes in θ cover steps 1..24 of each worker once
        pushed = [e["steps"] for e in history if e["worker"] == rank]
        assert [sum(pushed[: i + 1]) for i in range(len(pushed))] == [4, 8, 12, 16, 20, 24], rank
        assert len([e for e in after if e["worker"] == rank]) == 6 - (resumed_at[rank] + replayed[rank]) // 4
    assert results[0]["server"] == {"pushes": [6, 6], "steps": [24, 24], "updates": 12}
    theta0 = torch.tensor(
        [float.fromhex(v) for v in next(e["params"] for e in events if e["event"] == "theta0")], dtype=f64
    )
    pull = {r for r in (0, 1) if replayed[r]}
    expected = _replay(theta0, [(e["worker"], e["steps"]) for e in history], len(before), pull)
    for rank in (0, 1):
        final = torch.tensor([float.fromhex(v) for v in results[rank]["params"]], dtype=f64)
        assert torch.allclose(final, expected, rtol=0, atol=1e-12), (rank, (final - expected).abs().max())


@pytest.mark.launches
def test_a_killed_worker_resumes_its_own_step_under_torchrun(tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed after its step 13 (its part: step 12, after its 3rd push) while rank 0 went on to
    step 19 (its last.ckpt: step 18, written after rank 1's 3rd push). The waits fix that order; the
    pushes' order otherwise is whatever it is, and the replay follows the logged order."""
    waits = [
        _wait(0, 17, 0, {"event": "waiting", "rank": 1, "step": 13, "attempt": 0}),
        _wait(1, 13, 0, {"event": "waiting", "rank": 0, "step": 19, "attempt": 0}),
        _wait(0, 19, 0, {"event": "kill", "rank": 1}, hold=True),  # until torchrun's agent stops it
    ]
    job = _killed_async_run(tmp_path, 13, waits)
    _check_resumed_run(job, 13, resumed_at={0: 18, 1: 12}, replayed={0: 0, 1: 0})


@pytest.mark.launches
def test_a_push_made_after_the_part_is_not_pushed_again_under_torchrun(tmp_path: Path) -> None:
    """Rank 1 pushes its 4th round (step 16) after its part of step 12 and before rank 0's cut (step 18), then
    dies after step 17: resumed at 12, it trains 13..16 again without pushing, pulls θ, and goes on.
    Rank 0 waits in the second attempt until that pull is done, so that the replay knows which θ it got."""
    waits = [
        _wait(0, 17, 0, {"event": "waiting", "rank": 1, "step": 17, "attempt": 0}),
        _wait(1, 17, 0, {"event": "waiting", "rank": 0, "step": 19, "attempt": 0}),
        _wait(0, 19, 0, {"event": "kill", "rank": 1}, hold=True),
        _wait(1, 17, 1, {"event": "group_up", "rank": 1, "attempt": 1}),  # just logs: past its pull at 16
        _wait(0, 19, 1, {"event": "waiting", "rank": 1, "step": 17, "attempt": 1}),
    ]
    job = _killed_async_run(tmp_path, 17, waits)
    _check_resumed_run(job, 17, resumed_at={0: 18, 1: 12}, replayed={0: 0, 1: 4})


@pytest.mark.launches
def test_the_server_rank_serves_after_a_restart_even_when_its_own_training_was_done(tmp_path: Path) -> None:
    """Rank 0 trained all 24 steps and wrote last.ckpt at 24 before rank 1 died after its step 13. On the
    restart Lightning skips rank 0's training loop (its part is at max_steps): rank 0 must still host the
    server until rank 1 has trained 13..24, and both ranks must end with the same global model."""
    waits = [
        _wait(0, 23, 0, {"event": "waiting", "rank": 1, "step": 13, "attempt": 0}),  # rank 1's 3rd push is in
        _wait(1, 13, 0, {"event": "train_end", "rank": 0, "attempt": 0}),  # rank 0's cut of step 24 is written
    ]
    job = _killed_async_run(tmp_path, 13, waits)
    events, results = job["events"], job["results"]
    assert [(e["rank"], e["attempt"], e["step"]) for e in events if e["event"] == "kill"] == [(1, 0, 13)]
    up = {e["rank"]: e["step"] for e in events if e["event"] == "group_up" and e["attempt"] == 1}
    assert up == {1: 12}  # rank 0's training loop was skipped: no on_train_start
    trained = {
        (r, a): [e["step"] for e in events if e["event"] == "step" and (e["rank"], e["attempt"]) == (r, a)]
        for r in (0, 1)
        for a in (0, 1)
    }
    assert (trained[0, 0], trained[1, 0]) == (list(range(1, 25)), list(range(1, 14)))
    assert (trained[0, 1], trained[1, 1]) == ([], list(range(13, 25)))
    assert results[1]["batch_sums"] == [float(x.sum()) for x, _ in _batches(1, 24)[12:]]  # its own data position
    before = sorted((e for e in events if e["event"] == "push" and e["attempt"] == 0), key=lambda e: e["update"])
    after = sorted((e for e in events if e["event"] == "push" and e["attempt"] == 1), key=lambda e: e["update"])
    assert [e["update"] for e in before + after] == list(range(1, 13))  # rank 0's cut held all 9 earlier updates
    assert [e["worker"] for e in after] == [1, 1, 1]
    assert results[0]["server"] == {"pushes": [6, 6], "steps": [24, 24], "updates": 12}
    theta0 = torch.tensor(
        [float.fromhex(v) for v in next(e["params"] for e in events if e["event"] == "theta0")], dtype=f64
    )
    expected = _replay(theta0, [(e["worker"], e["steps"]) for e in before + after], len(before), set())
    for rank in (0, 1):
        final = torch.tensor([float.fromhex(v) for v in results[rank]["params"]], dtype=f64)
        assert torch.allclose(final, expected, rtol=0, atol=1e-12), (rank, (final - expected).abs().max())
