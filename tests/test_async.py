"""AsyncLocalSGDStrategy and Delayed Nesterov: the DN rule with literal numbers, the parameter server's
bookkeeping in-process, and real gloo runs (2 ranks, one slowed 3x) replayed against a plain-torch DN."""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch

from lightning_localsgd.asynchronous.optimizers import DelayedNesterov, OuterSGD
from lightning_localsgd.asynchronous.protocol import AsyncTrainingError, MessageType, Status
from lightning_localsgd.asynchronous.server import ParameterServer
from lightning_localsgd.asynchronous.strategy import AsyncLocalSGDStrategy
from tests.launch import run_ranks

P = 57  # TinyNet's parameter count


def replay_dn(theta, grads, lr, beta, n, c, m=None, delta=None, t=0):
    """An independent few-line Delayed Nesterov (ALGORITHMS.md section 4); returns θ after every push."""
    theta = theta.clone()
    m = torch.zeros_like(theta) if m is None else m.clone()
    delta = torch.zeros_like(theta) if delta is None else delta.clone()
    trajectory = [theta]
    for g in grads:
        delta = delta + g
        if (t + 1) % n == 0:
            m = beta * m + delta / n
            theta = theta - lr * ((1 - c * n + c) * beta * m + g / n)
            delta = torch.zeros_like(theta)
        else:
            theta = theta - lr * (c * beta * m + g / n)
        t += 1
        trajectory.append(theta)
    return trajectory


# ---------------------------------------------------------------------------------------------- the DN rule
def test_delayed_nesterov_literal_numbers():
    """lr 0.1, β 0.5, N 2, c 0.25 from θ = 1 with pushes 2, 4, −2, 0 (worked by hand in the comments)."""
    theta = torch.tensor([1.0], dtype=torch.float64)
    dn = DelayedNesterov(lr=0.1, momentum=0.5, buffer_size=2, activation=0.25)
    dn.bind([theta], num_workers=7)  # an explicit buffer_size wins over the number of workers
    expected = [
        0.9,  # Δ=2, mid-block: θ − 0.1·(0.25·0.5·0 + 2/2)
        0.5875,  # Δ=6, block end: m = 3; θ − 0.1·((1 − 0.5 + 0.25)·0.5·3 + 4/2)
        0.65,  # Δ=−2, mid-block: θ − 0.1·(0.25·0.5·3 − 1)
        0.63125,  # Δ=−2, block end: m = 1.5 − 1 = 0.5; θ − 0.1·(0.75·0.5·0.5 + 0)
    ]
    for g, want in zip([2.0, 4.0, -2.0, 0.0], expected):
        dn.step([torch.tensor([g], dtype=torch.float64)])
        assert theta.item() == pytest.approx(want, abs=1e-15)
    assert dn.t == 4 and dn.m[0].item() == pytest.approx(0.5) and dn.delta[0].item() == 0.0


def test_delayed_nesterov_n1_c0_is_torch_nesterov_step_for_step():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,)]
    ours = [torch.randn(s, generator=g) for s in shapes]
    ref = [p.clone().requires_grad_() for p in ours]
    dn = DelayedNesterov(lr=0.3, momentum=0.8, buffer_size=1)
    dn.bind(ours, num_workers=4)
    sgd = torch.optim.SGD(ref, lr=0.3, momentum=0.8, nesterov=True, foreach=False)
    for _ in range(10):
        grads = [torch.randn(s, generator=g) for s in shapes]
        dn.step(grads)
        for p, gr in zip(ref, grads):
            p.grad = gr.clone()
        sgd.step()
        for a, b in zip(ours, ref):
            assert torch.equal(a, b.detach())  # the same operations in the same order: bit for bit


def test_delayed_nesterov_c0_block_is_one_nesterov_step_on_the_mean():
    """Closed form: within block k θ moves by lr·g/N per push; at its end θ_k = θ_{k−1} − lr·(ḡ_k + β·m_k),
    m_k = β·m_{k−1} + ḡ_k, where ḡ_k is the mean of the block's N pseudo-gradients."""
    n, lr, beta = 3, 0.7, 0.9
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(4 * n)]
    theta = torch.randn(6, generator=gen, dtype=torch.float64)
    start, m = theta.clone(), torch.zeros(6, dtype=torch.float64)
    dn = DelayedNesterov(lr=lr, momentum=beta, buffer_size=n)
    dn.bind([theta], num_workers=2)
    for k in range(4):
        block = grads[k * n : (k + 1) * n]
        for j, g in enumerate(block):
            dn.step([g])
            if j < n - 1:  # mid-block: only the plain g/N refresh
                assert torch.allclose(theta, start - lr * sum(block[: j + 1]) / n, atol=1e-12)
        mean = sum(block) / n
        m = beta * m + mean
        start = start - lr * (mean + beta * m)  # one Nesterov step on the block mean
        assert torch.allclose(theta, start, atol=1e-12)


def _steady_step_per_update(make, pushes_per_update: int, g: float = 1.0, updates: int = 400) -> float:
    """θ's movement over the last update (``pushes_per_update`` pushes of the constant pseudo-gradient g)."""
    theta = torch.zeros(1, dtype=torch.float64)
    opt = make()
    opt.bind([theta], 4)
    for _ in range(updates - 1):
        for _ in range(pushes_per_update):
            opt.step([torch.full((1,), g, dtype=torch.float64)])
    before = float(theta)
    for _ in range(pushes_per_update):
        opt.step([torch.full((1,), g, dtype=torch.float64)])
    return before - float(theta)


def test_steady_state_step_per_update_of_sync_naive_and_delayed_nesterov():
    # constant pseudo-gradient g = 1, β = 0.9, 4 workers; one update = 4 pushes (sync: 1 step on their mean)
    sync = _steady_step_per_update(lambda: OuterSGD(0.7, 0.9, nesterov=True), 1)  # η/(1−β)
    naive = _steady_step_per_update(lambda: OuterSGD(0.07, 0.9, nesterov=True), 4)  # 4·α/(1−β)
    dn_small = _steady_step_per_update(lambda: DelayedNesterov(0.07, 0.9), 4)  # ε/(1−β): the 1/N is counted once
    dn = _steady_step_per_update(lambda: DelayedNesterov(0.7, 0.9), 4)
    assert sync == pytest.approx(7.0, rel=1e-9) and naive == pytest.approx(2.8, rel=1e-9)
    assert dn_small == pytest.approx(0.7, rel=1e-9) and dn == pytest.approx(sync, rel=1e-9)


def test_server_optimizers_resume_exactly_from_state_dict():
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(7)]
    for make in (lambda: DelayedNesterov(0.5, 0.9, buffer_size=3, activation=0.2), lambda: OuterSGD(0.5, 0.9, True)):
        whole, cut = torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        a, b = make(), make()
        a.bind([whole], 2)
        b.bind([cut], 2)
        for g in grads[:4]:
            a.step([g])
            b.step([g])
        saved = b.state_dict()
        b.step([torch.full((4,), 9.0, dtype=torch.float64)])  # moves on after the save: must not leak into it
        c_theta = torch.zeros(4, dtype=torch.float64)
        c = make()
        c.bind([c_theta], 2)
        c.load_state_dict(saved)
        for g in grads[4:]:
            a.step([g])
            c.step([g])
        assert torch.equal(whole, c_theta)


def test_outer_sgd_is_the_plain_baselines():
    theta = torch.tensor([1.0, 2.0])
    plain = OuterSGD(lr=0.5)
    plain.bind([theta], 2)
    plain.step([torch.tensor([1.0, -2.0])])
    assert theta.tolist() == [0.5, 3.0]
    theta = torch.tensor([0.0])
    nesterov = OuterSGD(lr=1.0, momentum=0.5, nesterov=True)
    nesterov.bind([theta], 2)
    nesterov.step([torch.tensor([1.0])])  # b = 1, θ −= 1 + 0.5·1
    nesterov.step([torch.tensor([1.0])])  # b = 1.5, θ −= 1 + 0.75
    assert theta.tolist() == [-3.25]


def test_invalid_arguments_say_what_to_pass():
    with pytest.raises(ValueError, match="lr must be a positive number"):
        DelayedNesterov(lr=0)
    with pytest.raises(ValueError, match=r"buffer_size \(None: the number of workers\) must be an integer >= 1"):
        DelayedNesterov(0.1, buffer_size=0)
    with pytest.raises(ValueError, match=r"activation=0.4 is above 1/N"):
        DelayedNesterov(0.1, activation=0.4).bind([torch.zeros(1)], num_workers=4)
    with pytest.raises(ValueError, match="nesterov=True needs momentum"):
        OuterSGD(0.1, nesterov=True)
    with pytest.raises(TypeError, match="DelayedNesterov"):
        AsyncLocalSGDStrategy(outer_optimizer=torch.optim.SGD)
    with pytest.raises(ValueError, match=r"slowdown\[1\] must be a finite number >= 1"):
        AsyncLocalSGDStrategy(slowdown={1: 0.5})
    with pytest.raises(ValueError, match="max_updates"):
        AsyncLocalSGDStrategy(max_updates=0)


def test_registered_and_refuses_consensus_algorithms():
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_localsgd import PeriodicAveraging

    assert "async_localsgd" in StrategyRegistry
    AsyncLocalSGDStrategy.register_strategies(StrategyRegistry)  # a second registration is a no-op
    trainer = Trainer(strategy="async_localsgd", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, AsyncLocalSGDStrategy)
    from tests.models import TinyNet, loader, regression_data, trainer_kwargs

    trainer = Trainer(
        strategy=AsyncLocalSGDStrategy(), callbacks=[PeriodicAveraging(4)], max_steps=2, **trainer_kwargs(1, 1)
    )
    with pytest.raises(ValueError, match="cannot drive PeriodicAveraging: remove them from callbacks"):
        trainer.fit(TinyNet(), loader(regression_data(8)))


# ---------------------------------------------------------------------------------------------- the server
def _server(n=2, **kwargs):
    state = torch.zeros(3, dtype=torch.float64)  # 2 parameters + 1 buffer
    opts = dict(sync_every=8, dynamic_local_steps=True, timeout=60.0) | kwargs
    return ParameterServer(state, 2, OuterSGD(lr=1.0), n, **opts)


def _push(server, worker, g, steps=8, speed=0.0, buffer=0.0):
    return server.handle(MessageType.PUSH, worker, steps, speed, torch.tensor([*g, buffer], dtype=torch.float64))


def test_server_applies_each_push_once_and_tracks_staleness_and_dylu():
    server = _server(max_updates=4)
    r = _push(server, 0, [1.0, 0.0], speed=10.0)
    assert (r.status, r.staleness, r.local_steps, r.stop) == (Status.MODEL, 0, 8, False)
    _push(server, 0, [1.0, 0.0], speed=10.0)
    r = _push(server, 1, [0.0, 2.0], steps=8, speed=3.0, buffer=7.0)  # pulled before both of worker 0's pushes
    assert r.staleness == 2 and r.local_steps == math.ceil(8 * 3.0 / 10.0) == 3  # DyLU rounds up (HALoS)
    assert r.state.tolist() == [-2.0, -2.0, 7.0]  # plain SGD lr 1: θ − Σg; buffers: last writer wins
    r = _push(server, 1, [0.0, 1.0], steps=2, speed=3.0)
    assert r.staleness == 0 and r.stop  # max_updates reached
    assert server.pushes == [2, 2] and server.steps == [16, 10] and server.updates == 4
    assert server.staleness_max == 2 and server.staleness_sum == 2


def test_server_end_of_run_protocol_and_pull():
    server = _server()
    _push(server, 0, [1.0, 1.0])
    assert server.handle(MessageType.PULL, 1).state.tolist() == [-1.0, -1.0, 0.0] and server.updates == 1
    assert server.handle(MessageType.DONE, 0).status == Status.WAIT
    assert server.handle(MessageType.POLL, 0).status == Status.WAIT
    final = server.handle(MessageType.DONE, 1)
    assert final.status == Status.FINAL and final.state.tolist() == [-1.0, -1.0, 0.0]
    assert server.handle(MessageType.POLL, 0).status == Status.FINAL


def test_server_names_a_silent_worker_and_aborts_on_nan():
    server = _server(timeout=0.05)
    time.sleep(0.1)
    server.handle(MessageType.PULL, 0)  # worker 0 is alive, worker 1 is not
    with pytest.raises(AsyncTrainingError, match=r"worker rank 1 has sent nothing for .* it died or stalled"):
        server.check(0)
    server = _server()
    assert _push(server, 1, [float("nan"), 0.0]).status == Status.ABORT
    assert server.handle(MessageType.PULL, 0).status == Status.ABORT and server.updates == 0
    with pytest.raises(AsyncTrainingError, match="worker rank 1 pushed NaN"):
        server.check(0)


def test_a_failing_worker_aborts_the_run_at_once():
    server = _server()
    assert server.handle(MessageType.FAIL, 1) is None
    assert server.handle(MessageType.PULL, 0).status == Status.ABORT
    with pytest.raises(AsyncTrainingError, match="worker rank 1 failed"):
        server.check(0)


def test_server_state_dict_round_trip():
    server = _server()
    for k in range(3):
        _push(server, k % 2, [1.0, -1.0], speed=5.0 + k)
    saved = server.state_dict()
    _push(server, 0, [5.0, 5.0])  # after the cut
    fresh = _server()
    fresh.load_state_dict(saved)
    assert fresh.state.tolist() == [-3.0, 3.0, 0.0] and fresh.updates == 3
    assert fresh.pushes == [2, 1] and fresh.speeds == [7.0, 6.0] and fresh.pulled_at == [3, 3]
    with pytest.raises(ValueError, match="same number of processes"):
        _server(n=3).load_state_dict(saved)


# ---------------------------------------------------------------------------------------------- real ranks
def _check_replay_and_counts(r0, r1, lr, beta, c):
    records, grads = r0["records"], r0["grads"]
    assert [rec.update for rec in records] == list(range(1, r0["updates"] + 1))  # arrival order, no gaps
    # every push applied exactly once: the server's count equals what each worker sent
    assert r0["server_pushes"] == [r0["worker_pushes"], r1["worker_pushes"]]
    assert r0["server_steps"] == [r0["worker_steps"], r1["worker_steps"]]
    assert r0["updates"] == r0["worker_pushes"] + r1["worker_pushes"] == len(grads)
    # staleness = server updates between the worker's previous push (its pull) and this one
    last = {0: 0, 1: 0}
    for rec in records:
        assert rec.staleness == rec.update - 1 - last[rec.worker]
        last[rec.worker] = rec.update
    # consensus, and the plain-torch DN replay of the logged pushes
    assert torch.equal(r0["final"], r1["final"])
    expected = replay_dn(r0["theta0"], grads, lr, beta, 2, c)[-1]
    assert torch.allclose(r0["final"], expected, rtol=0, atol=1e-12), (r0["final"] - expected).abs().max()


def test_slow_rank_does_not_hold_back_the_fast_one():
    """Rank 1 sleeps 3x its step time after each step (4x slower), fixed H: over the same run rank 0
    completes at least twice the local steps and pushes (half the nominal ratio: rank 0 also serves the
    pushes, and on 2 shared cores its steps slow down when the suite is busy); every push is applied
    once; final θ = replay."""
    r0, r1 = run_ranks(
        "tests.scenarios_async:async_run",
        world=2,
        sync_every=4,
        max_updates=30,
        slowdown={1: 4.0},
        outer={"dn": {"lr": 0.5, "momentum": 0.9, "activation": 0.25}},
    )
    assert r0["error"] is None and r1["error"] is None
    assert 30 <= r0["updates"] <= 31  # the budget, plus at most one round in flight per other worker
    assert r0["worker_steps"] >= 2 * r1["worker_steps"] and r0["worker_pushes"] >= 2 * r1["worker_pushes"]
    _check_replay_and_counts(r0, r1, lr=0.5, beta=0.9, c=0.25)
    assert r1["bytes"]["push"] == r1["worker_pushes"] * (6 * 8 + P * 8)  # header + fp64 pseudo-gradient


def test_dynamic_local_updates_and_validation_on_the_global_model():
    H = 6
    r0, r1 = run_ranks(
        "tests.scenarios_async:async_run",
        world=2,
        sync_every=H,
        max_updates=24,
        slowdown={1: 4.0},  # nominally 4x slower: H_1 = 2; the speeds are measured, so only H_1 < H is asserted
        dynamic=True,
        validate_every=5,
        outer={"dn": {"lr": 0.5, "momentum": 0.9}},
    )
    assert r0["error"] is None and r1["error"] is None
    records = r0["records"]
    for rec in records:  # H_i = max(1, ceil(H · v_i / max_j v_j)) from the speeds the server held
        assert rec.local_steps == max(1, math.ceil(H * (rec.speed / rec.max_speed)))
    for w in (0, 1):  # each worker runs the H_i it was given (its last push may be a partial round)
        mine = [rec for rec in records if rec.worker == w]
        assert mine[0].steps == H and all(b.steps == a.local_steps for a, b in itertools.pairwise(mine[:-1]))
    assert [rec for rec in records if rec.worker == 0][-1].local_steps == H
    assert [rec for rec in records if rec.worker == 1][-1].local_steps < H  # the slow worker was given fewer
    _check_replay_and_counts(r0, r1, lr=0.5, beta=0.9, c=0.0)
    metrics = r0["metrics"]  # what rank 0 logs: the server's view per worker
    assert metrics["async/pushes_rank1"] == r1["worker_pushes"] and metrics["async/updates"] == len(records)
    assert metrics["async/local_steps_rank1"] == [rec for rec in records if rec.worker == 1][-1].local_steps
    assert metrics["async/staleness_max"] == max(rec.staleness for rec in records)
    assert metrics["async/staleness_mean"] == pytest.approx(sum(rec.staleness for rec in records) / len(records))
    # validation saw the global model at some server update, and training resumed on the replica
    trajectory = replay_dn(r0["theta0"], r0["grads"], 0.5, 0.9, 2, 0.0)
    for r in (r0, r1):
        assert r["val_params"] and all(r["replica_restored"]) and len(r["replica_restored"]) == len(r["val_params"])
        for seen in r["val_params"]:
            assert min((seen - theta).abs().max() for theta in trajectory) <= 1e-12


def test_single_worker_validation_and_resume_are_exact():
    """One process, deterministic: validating and checkpointing every step changes nothing, and resuming
    from the checkpoint written at a push boundary reproduces the uninterrupted run bit for bit."""
    (out,) = run_ranks("tests.scenarios_async:single_worker", world=1, steps=12, sync_every=3, resume_step=6)
    full, plain, resumed = out["full"], out["plain"], out["resumed"]
    assert full["updates"] == plain["updates"] == 4 and resumed["updates"] == 4
    assert torch.equal(full["final"], plain["final"]) and torch.equal(full["final"], resumed["final"])
    trajectory = replay_dn(full["theta0"], full["grads"], 0.5, 0.9, 2, 0.25)
    assert torch.allclose(full["final"], trajectory[-1], rtol=0, atol=1e-12)
    for step, seen in enumerate(full["val_params"], start=1):  # validation after step k sees θ after k // 3 pushes
        assert torch.allclose(seen, trajectory[step // 3], rtol=0, atol=1e-12)
    server = out["ckpt"]["async_localsgd"]
    assert server["updates"] == 2 and server["optimizer"]["t"] == 2
    saved_model = torch.cat([v.reshape(-1) for v in out["ckpt"]["state_dict"].values()])
    assert torch.equal(server["optimizer"]["theta"][0], saved_model)  # the checkpoint's model is θ
    assert torch.equal(resumed["theta0"], server["optimizer"]["theta"][0])


def test_per_worker_max_steps_and_resume_on_two_ranks():
    """Fit A ends by each worker's own max_steps=16 with rank 0 slowed 3x: rank 1 finishes first and waits
    (DONE, then POLL) for the final model. Every rank writes its part of a checkpoint at its own step 10
    (rank 0 the server's cut too); fit B resumes from it: its server continues exactly from the
    checkpoint's θ, m, Δ, t and every worker from its own replica, momentum and place in its round."""
    out = run_ranks(
        "tests.scenarios_async:resume_run",
        world=2,
        save_at=10,
        sync_every=4,
        momentum=0.9,
        first={"max_updates": None, "max_steps": 16, "slowdown": {0: 3.0}},
        second={"max_updates": 22},
        outer={"dn": {"lr": 0.5, "momentum": 0.9, "activation": 0.25}},
    )
    (a0, b0), (a1, b1) = (out[0]["first"], out[0]["second"]), (out[1]["first"], out[1]["second"])
    assert a0["worker_steps"] == a1["worker_steps"] == 16 and a0["updates"] == 8
    assert a1["calls"]["control"] >= 2  # DONE answered WAIT, then at least one POLL
    _check_replay_and_counts(a0, a1, lr=0.5, beta=0.9, c=0.25)
    saved = a0["ckpt_content"]["async_localsgd"]
    opt = saved["optimizer"]
    assert b0["records"][0].update == saved["updates"] + 1
    assert b0["server_pushes"] == [
        saved["pushes"][0] + len([r for r in b0["records"] if r.worker == 0]),
        saved["pushes"][1] + len([r for r in b0["records"] if r.worker == 1]),
    ]
    for rank, (a, b) in enumerate(((a0, b0), (a1, b1))):  # each worker resumes from its own part
        part = a["part"]
        replica = torch.cat([v.reshape(-1) for k, v in part["model"].items() if k.startswith("net")])
        assert torch.equal(b["theta0"], replica), rank
        momentum = part["lightning"]["optimizer_states"][0]["state"][0]["momentum_buffer"]  # its own optimizer
        assert torch.equal(b["momentum0"], momentum), rank
        assert part["lightning"]["global_step"] == 10  # its own loop state: resumed at its own step
        assert part["worker"]["steps"] == 10 and part["worker"]["steps_since_pull"] == 10 % 4  # mid-round
    assert not torch.equal(a0["part"]["model"]["net.0.weight"], a1["part"]["model"]["net.0.weight"])
    assert not torch.equal(b0["momentum0"], b1["momentum0"])  # not rank 0's state for everyone
    m, delta = opt["m"][0], opt["delta"][0]
    expected = replay_dn(opt["theta"][0], b0["grads"], 0.5, 0.9, 2, 0.25, m=m, delta=delta, t=opt["t"])
    assert torch.equal(b0["final"], b1["final"])
    assert torch.allclose(b0["final"], expected[-1], rtol=0, atol=1e-12)


def test_point_to_point_counts_bytes_and_times_out():
    """comm.send/recv_: any-source receive names the sender, bytes are booked by the sender, and a receive
    from a peer that never sends fails after the group's timeout (gloo), instead of hanging."""
    r0, r1 = run_ranks("tests.scenarios_async:p2p_timeout", world=2, fresh=True, timeout_s=3)  # a gloo timeout
    assert r0["src"] == 1 and r0["got"] == [1.0, 2.0, 3.0] and r0["bytes"] == {"probe": 0.0}
    assert r1["bytes"] == {"probe": 12.0}  # three fp32 values
    assert r0["error"] is not None and "Timed out" in r0["error"]
    assert 2.5 <= r0["waited"] < 3 + 10


def test_a_dead_worker_ends_the_run_with_a_clear_error_within_the_timeout():
    r0, r1 = run_ranks(
        "tests.scenarios_async:async_run",
        world=2,
        fresh=True,  # a rank leaves without a word
        max_updates=None,
        max_steps=100_000,
        timeout_s=6,  # short: the test waits it out (10 s cost 4 s more of `make test`)
        die_at=(1, 6),
    )
    assert "died_at" in r1
    assert r0["error"] is not None and "worker rank 1 has sent nothing" in r0["error"], r0["error"]
    assert r0["failed_at"] - r1["died_at"] < 6 + 15  # the timeout, plus slack for a loaded machine


def test_a_dead_server_ends_the_workers_with_a_clear_error():
    r0, r1 = run_ranks(
        "tests.scenarios_async:async_run",
        world=2,
        fresh=True,  # a rank leaves without a word
        max_updates=None,
        max_steps=100_000,
        timeout_s=6,  # short: the test waits it out (10 s cost 4 s more of `make test`)
        die_at=(0, 6),
    )
    assert "died_at" in r0
    assert r1["error"] is not None and "lost the parameter server on rank 0" in r1["error"], r1["error"]
    assert r1["failed_at"] - r0["died_at"] < 6 + 15


def test_lightning_cli_yaml_builds_the_strategy_and_its_outer_optimizer(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    from tests.models import TinyNet

    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        """
trainer:
  accelerator: cpu
  devices: 2
  strategy:
    class_path: lightning_localsgd.asynchronous.strategy.AsyncLocalSGDStrategy
    init_args:
      sync_every: 12
      max_updates: 500
      slowdown: {1: 3.0}
      outer_optimizer:
        class_path: lightning_localsgd.asynchronous.optimizers.DelayedNesterov
        init_args: {lr: 0.07, momentum: 0.9, activation: 0.1}
"""
    )
    c = LightningCLI(TinyNet, run=False, args=["--config", str(cfg)], save_config_callback=None)
    strategy = c.trainer.strategy
    assert isinstance(strategy, AsyncLocalSGDStrategy) and strategy.sync_every == 12 and strategy.max_updates == 500
    assert strategy.slowdown == {1: 3.0}
    opt = strategy.outer_optimizer
    assert isinstance(opt, DelayedNesterov) and (opt.lr, opt.momentum, opt.activation) == (0.07, 0.9, 0.1)
