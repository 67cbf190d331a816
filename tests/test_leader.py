"""LeaderSGD: unit tests with fake collectives, and runs on 2 and 4 (2 nodes × 2) gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_localsgd.algorithms.leader import LeaderSGD
from lightning_localsgd.contract import StepReport
from lightning_localsgd.transport.collectives import Group, NonFiniteReplicaError
from tests.fakes import FakeCollectives, bind_fake
from tests.launch import run_ranks
from tests.scenarios_leader import shard_batch, tinynet_start

LR, P = 0.1, 57  # TinyNet's SGD learning rate and parameter count


# ---------------------------------------------------------------------------------------------- unit tests
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(pull=1.5), "pull must be a number in"),
        (dict(pull=True), "pull must be a number in"),
        (dict(loss_window=0), "loss_window must be an integer >= 1"),
        (dict(sync_every=4, node_sync_every=3), "must be smaller than sync_every=4 and divide it"),
        (dict(sync_every=4, node_sync_every=4), "must be smaller than sync_every=4 and divide it"),
        (dict(node_pull=0.3), "node_pull has no effect without node_sync_every"),
        (dict(step_pull=1.0), "step_pull must be a number in"),
        (dict(node_step_pull=0.1), "node_step_pull has no effect without node_sync_every"),
        (dict(node_pull_on_global_step=True), "node_pull_on_global_step=True needs node_sync_every"),
        (dict(step_pull_per_period=1), "step_pull_per_period must be True or False"),
        (dict(evaluate="center"), "evaluate must be 'average' or 'leader'"),
    ],
)
def test_arguments_are_validated_with_a_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LeaderSGD(**kwargs)


def test_a_reduced_comm_dtype_is_refused():
    with pytest.raises(ValueError, match=r"would have no effect.*LocalSGDStrategy\(comm_dtype=None\)"):
        bind_fake(LeaderSGD(), nn.Linear(1, 1), FakeCollectives("bfloat16"))


def fake(rows: dict[int, list[float]], leader_params: dict[int, torch.Tensor]) -> FakeCollectives:
    """Three ranks; this process is rank 1. The other ranks' election rows and the leader's parameters."""
    comm = FakeCollectives()
    comm.rows, comm.broadcasts = rows, leader_params
    return comm


def attached(algo: LeaderSGD, comm: FakeCollectives, x: list[float], node: Group | None = None) -> nn.Module:
    module = nn.Linear(1, 1, bias=True).double()
    bind_fake(algo, module, comm, world=Group(None, [0, 1, 2], 1), node=node)
    with torch.no_grad():
        module.weight.fill_(x[0]), module.bias.fill_(x[1])
    return module


def test_election_is_the_argmin_of_windowed_losses_and_the_pull_is_a_lerp():
    algo = LeaderSGD(sync_every=2, pull=0.25, loss_window=2)
    comm = fake({0: [0.9, 0.0], 2: [0.5, 0.0]}, {2: torch.tensor([4.0, -8.0], dtype=torch.float64)})
    module = attached(algo, comm, [0.0, 0.0])
    for loss in (0.1, 0.6, 0.8):  # window of 2: mean(0.6, 0.8) = 0.7 > rank 2's 0.5
        algo._losses.append(loss)
    assert algo.window_loss() == pytest.approx(0.7)
    algo.pull_toward_leader(step=2, node=False)
    assert comm.broadcast_log == [(2, "sync")] and algo.leader == 2
    assert module.weight.item() == 1.0 and module.bias.item() == -2.0  # 0.75·0 + 0.25·(4, −8)


def test_election_ties_go_to_the_lowest_rank_and_nan_never_leads():
    algo = LeaderSGD(pull=1.0, nonfinite="skip")
    comm = fake({0: [math.nan, 0.0], 2: [0.3, 1.0]}, {})
    attached(algo, comm, [1.0, 2.0])
    algo._losses.append(0.4)
    assert algo.elect(algo.world) == (1, [2])  # rank 0 NaN, rank 2 holds NaN/Inf
    comm.rows = {0: [0.4, 0.0], 2: [0.4, 0.0]}
    assert algo.elect(algo.world) == (0, [])  # three-way tie
    algo.nonfinite = "raise"
    comm.rows = {0: [0.4, 0.0], 2: [0.1, 1.0]}
    with pytest.raises(NonFiniteReplicaError, match=r"rank\(s\) \[2\] holds NaN/Inf at step 7"):
        algo.elect(algo.world, step=7)


def test_step_pull_moves_toward_the_last_leader_copy_before_the_scheduled_pull():
    algo = LeaderSGD(sync_every=2, pull=0.25, step_pull=0.5)
    comm = fake({0: [0.9, 0.0], 2: [0.5, 0.0]}, {2: torch.tensor([4.0, -8.0], dtype=torch.float64)})
    module = attached(algo, comm, [0.0, 0.0])
    algo.after_step(1, StepReport(1, loss=0.7))  # no leader copy yet: nothing happens
    assert [module.weight.item(), module.bias.item()] == [0.0, 0.0]
    algo.after_step(2, StepReport(2, loss=0.6))  # pull: 0.75·(0, 0) + 0.25·(4, −8)
    assert [module.weight.item(), module.bias.item()] == [1.0, -2.0]
    algo.after_step(3, StepReport(3, loss=0.5))  # λ-pull toward the copy (4, −8): (1, −2) + 0.5·((4, −8) − (1, −2))
    assert [module.weight.item(), module.bias.item()] == [2.5, -5.0]
    algo.after_step(
        4, StepReport(4, loss=0.4)
    )  # λ-pull to (3.25, −6.5), then the pull: 0.75·(3.25, −6.5) + 0.25·(4, −8)
    assert [module.weight.item(), module.bias.item()] == [3.4375, -6.875]
    state = algo.rank_state_dict()
    assert state["losses"] == [0.7, 0.6, 0.5, 0.4] and state["leader_copy"].tolist() == [4.0, -8.0]
    assert algo.num_syncs == 2


def test_the_step_loss_enters_the_window_after_the_election():
    algo = LeaderSGD(sync_every=1, pull=0.5, loss_window=2)
    comm = fake({0: [0.9, 0.0], 2: [0.5, 0.0]}, {2: torch.tensor([3.0, 0.0], dtype=torch.float64)})
    module = attached(algo, comm, [1.0, 2.0])
    algo.after_step(1, StepReport(1, loss=0.1))  # window empty at the election (+inf): rank 2 leads
    assert algo.leader == 2 and algo.window_loss() == pytest.approx(0.1)
    assert [module.weight.item(), module.bias.item()] == [2.0, 1.0]  # 0.5·(1, 2) + 0.5·(3, 0)
    algo.after_step(2, StepReport(2, loss=0.3))  # window (0.1) < 0.5: this rank leads, nothing moves
    assert algo.leader == 1 and algo.window_loss() == pytest.approx(0.2)
    assert [module.weight.item(), module.bias.item()] == [2.0, 1.0]
    with pytest.raises(ValueError, match="elects the leader by training loss"):
        algo.after_step(3, StepReport(3))


def test_authors_schedule_node_then_global_pull_and_per_step_pulls_of_p_over_tau():
    # the LSGD authors' scripts: per step x ← x − (p/τ)(x − x̃_G) − (p_node/τ_node)(x − x̃_node);
    # on a global step the node pull, then the global pull. Rank 1 of world {0, 1, 2}, node {0, 1}:
    # node leader rank 0 at (2, 2), global leader rank 2 at (4, −8). λ_G = 0.4/4 = λ_node = 0.2/2 = 0.1.
    algo = LeaderSGD(
        sync_every=4,
        node_sync_every=2,
        pull=0.5,
        node_pull=0.25,
        step_pull=0.4,
        node_step_pull=0.2,
        step_pull_per_period=True,
        node_pull_on_global_step=True,
        loss_window=1,
    )
    leaders = {0: torch.tensor([2.0, 2.0], dtype=torch.float64), 2: torch.tensor([4.0, -8.0], dtype=torch.float64)}
    comm = fake({0: [0.5, 0.0], 2: [0.1, 0.0]}, leaders)
    module = attached(algo, comm, [0.0, 0.0], node=Group(None, [0, 1], 1))

    def x() -> list[float]:
        return [module.weight.item(), module.bias.item()]

    algo.after_step(1, StepReport(1, loss=0.7))  # no copy yet
    assert x() == [0.0, 0.0]
    algo.after_step(2, StepReport(2, loss=0.7))  # node pull: 0.75·(0, 0) + 0.25·(2, 2)
    assert x() == [0.5, 0.5] and comm.broadcast_log == [(0, "sync")]
    algo.after_step(3, StepReport(3, loss=0.7))  # toward the node copy: (0.5, 0.5) + 0.1·((2, 2) − (0.5, 0.5))
    assert x() == pytest.approx([0.65, 0.65], abs=1e-15)
    algo.after_step(
        4, StepReport(4, loss=0.7)
    )  # per-step (0.785, 0.785); node pull (1.08875, 1.08875); global pull 0.5 toward (4, −8)
    assert x() == pytest.approx([2.544375, -3.455625], abs=1e-14)
    assert comm.broadcast_log == [(0, "sync"), (0, "sync"), (2, "sync")]
    algo.after_step(
        5, StepReport(5, loss=0.7)
    )  # toward the global copy (4, −8) by 0.1, then toward the node copy (2, 2) by 0.1
    assert x() == pytest.approx([2.62094375, -3.31905625], abs=1e-14)
    assert (algo.num_node_syncs, algo.num_syncs, algo.leader) == (2, 1, 2)
    state = algo.rank_state_dict()
    assert state["leader_copy"].tolist() == [4.0, -8.0] and state["node_leader_copy"].tolist() == [2.0, 2.0]


def test_default_multi_leader_runs_only_the_global_pull_on_a_global_step():
    algo = LeaderSGD(sync_every=4, node_sync_every=2, pull=0.5, node_pull=0.25, loss_window=1)
    leaders = {0: torch.tensor([2.0, 2.0], dtype=torch.float64), 2: torch.tensor([4.0, -8.0], dtype=torch.float64)}
    comm = fake({0: [0.5, 0.0], 2: [0.1, 0.0]}, leaders)
    module = attached(algo, comm, [0.0, 0.0], node=Group(None, [0, 1], 1))
    for step in range(1, 5):
        algo.after_step(step, StepReport(step, loss=0.7))  # this rank's window (0.7) never leads
    assert [module.weight.item(), module.bias.item()] == [2.25, -3.75]  # 0.5·(0.5, 0.5) + 0.5·(4, −8)
    assert comm.broadcast_log == [(0, "sync"), (2, "sync")] and algo.num_node_syncs == 1


def test_evaluate_leader_uses_the_leaders_replica_everywhere():
    algo = LeaderSGD(sync_every=2, pull=0.5, evaluate="leader")
    comm = fake({0: [0.9, 0.0], 2: [0.5, 0.0]}, {2: torch.tensor([4.0, -8.0], dtype=torch.float64)})
    module = attached(algo, comm, [1.0, 2.0])
    algo._losses.append(0.7)
    algo.begin_evaluation(3)  # a local step since the last sync
    assert [module.weight.item(), module.bias.item()] == [4.0, -8.0]
    algo.end_evaluation()  # the replica comes back exactly
    assert [module.weight.item(), module.bias.item()] == [1.0, 2.0]
    saved = algo.consensus_state_dict(module.state_dict(), 3)
    assert [float(saved["weight"]), float(saved["bias"])] == [4.0, -8.0]
    assert [module.weight.item(), module.bias.item()] == [1.0, 2.0]
    algo.finalize(3)
    assert [module.weight.item(), module.bias.item()] == [4.0, -8.0] and algo.is_synced(3)
    assert comm.broadcast_log == [(2, "eval"), (2, "checkpoint"), (2, "sync")]


# ---------------------------------------------------------------------------------------------- helpers
def post_step(run: dict, s: int) -> torch.Tensor:
    """Rank's parameters right after the inner SGD step of step s (1-based), before any pull."""
    return run["before"][s - 1] - LR * run["grads"][s - 1]


def leader_of(runs: list[dict], ranks: list[int], batches: int, k: int) -> tuple[int, list[float]]:
    """argmin (lowest rank on ties) of the mean of each rank's last k of its first ``batches`` losses."""
    means = [sum(w) / len(w) if (w := runs[r]["losses"][:batches][-k:]) else math.inf for r in ranks]
    return ranks[min(range(len(ranks)), key=lambda j: (means[j], j))], means


def plain_sgd(rank: int, world: int, steps: int) -> list[torch.Tensor]:
    model = tinynet_start()
    out = []
    for s in range(steps):
        x, y = shard_batch(s, rank, world)
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return out


# ---------------------------------------------------------------------------------------------- 2 ranks
@pytest.fixture(scope="module")
def two_ranks():
    configs = [
        dict(sync_every=2, pull=1.0, loss_window=3, evaluate="average"),
        dict(sync_every=2, pull=0.0, loss_window=3, evaluate="leader"),
    ]
    per_rank = run_ranks("tests.scenarios_leader:leader_runs", world=2, steps=8, configs=configs, validate=[True, True])
    return [[per_rank[r][i] for r in range(2)] for i in range(len(configs))]  # [config][rank]


def test_pull_1_makes_every_rank_the_leader_elected_by_windowed_loss(two_ranks):
    runs = two_ranks[0]
    leaders = []
    for s in range(1, 9):
        if s % 2:  # a local step: the replicas differ
            assert (runs[0]["after"][s - 1] - runs[1]["after"][s - 1]).abs().max() > 1e-4
            continue
        leader, means = leader_of(runs, [0, 1], s - 1, 3)  # the window holds the batches before step s
        assert abs(means[0] - means[1]) > 1e-6 and runs[0]["attrs"]["leader"][s - 1] == leader
        leaders.append(leader)
        for r in (0, 1):
            assert (runs[r]["after"][s - 1] - post_step(runs[leader], s)).abs().max() <= 1e-12
    assert set(leaders) == {0, 1}  # both ranks lead at some point
    # evaluate="average": validation after step 3 sees the mean replica, after step 6 the (equal) replicas
    assert [r["val_steps"] for r in runs] == [[3, 6], [3, 6]]
    mean3 = (runs[0]["after"][2] + runs[1]["after"][2]) / 2
    assert (runs[0]["val_params"][0] - mean3).abs().max() <= 1e-12
    assert torch.equal(runs[0]["val_params"][1], runs[0]["after"][5])


def test_pull_is_one_broadcast_not_an_allreduce(two_ranks):
    calls, sent = two_ranks[0][0]["calls"], two_ranks[0][0]["bytes"]
    assert calls == {"setup": 1, "leader": 4, "sync": 4, "eval": 1}
    assert sent["sync"] == 4 * (1 / 2) * P * 8  # broadcast: (m−1)/m·B; an allreduce would send 2·(m−1)/m·B
    assert sent["leader"] == 4 * 1 * 2 * 8  # all-gather of (loss, flag) in float64
    assert sent["eval"] == 2 * (1 / 2) * (P * 8 + 2 * 8)  # the averaged evaluation: an allreduce with flags


def test_pull_0_leaves_ranks_independent_and_evaluate_leader(two_ranks):
    runs = two_ranks[1]
    for r in (0, 1):
        ref = plain_sgd(r, 2, 8)
        assert max((a - b).abs().max() for a, b in zip(runs[r]["after"], ref)) <= 1e-9
    for i, s in enumerate((3, 6)):  # validation on the leader's replica, elected on batches 1..s
        leader, _ = leader_of(runs, [0, 1], s, 3)
        assert (runs[0]["val_params"][i] - runs[leader]["after"][s - 1]).abs().max() <= 1e-12
    leader, _ = leader_of(runs, [0, 1], 8, 3)
    for r in (0, 1):  # after fit every rank holds the final leader's replica
        assert torch.equal(runs[r]["final"], runs[leader]["after"][7])
    assert runs[0]["calls"] == {"setup": 1, "leader": 4 + 2 + 1, "sync": 4 + 1, "eval": 2}


# ---------------------------------------------------------------------------------------------- 2 nodes × 2
def test_multi_leader_on_two_nodes_of_two_against_hand_computed_pulls():
    cfg = dict(sync_every=4, node_sync_every=2, pull=0.5, node_pull=0.3, loss_window=3)
    runs = [r[0] for r in run_ranks("tests.scenarios_leader:leader_runs", world=4, nodes=2, steps=8, configs=[cfg])]
    nodes, seen = [[0, 1], [2, 3]], set()
    for s in range(1, 9):
        y = [post_step(runs[r], s) for r in range(4)]
        expected = list(y)
        if s % 4 == 0:  # global pull toward the best of all four
            leader, _ = leader_of(runs, [0, 1, 2, 3], s - 1, 3)
            expected = [0.5 * y[r] + 0.5 * y[leader] for r in range(4)]
            seen.add(("global", leader))
        elif s % 2 == 0:  # node pulls toward each node's best
            for node in nodes:
                leader, _ = leader_of(runs, node, s - 1, 3)
                for r in node:
                    expected[r] = 0.7 * y[r] + 0.3 * y[leader]
                seen.add(("node", leader))
        for r in range(4):
            assert (runs[r]["after"][s - 1] - expected[r]).abs().max() <= 1e-12, (s, r)
    assert len(seen) >= 3
    calls, sent = runs[0]["calls"], runs[0]["bytes"]
    assert calls == {"setup": 1, "leader": 4, "sync": 4 + 1}  # 2 node + 2 global pulls, the final average
    node_pull, global_pull = (1 / 2) * P * 8, (3 / 4) * P * 8
    final_average = 2 * (3 / 4) * (P * 8 + 4 * 8)
    assert sent["sync"] == 2 * node_pull + 2 * global_pull + final_average
    assert sent["leader"] == 2 * (1 * 16) + 2 * (3 * 16)


# ---------------------------------------------------------------------------------------------- resume
def test_resume_restores_per_rank_state_exactly():
    cfg = dict(sync_every=3, pull=0.5, loss_window=5, step_pull=0.1)
    for r in run_ranks("tests.scenarios_leader:leader_resume", world=2, cfg=cfg):
        saved, restored = r["saved_state"], r["restored_state"]
        assert len(saved["losses"]) == 5 and saved["losses"] == restored["losses"]
        assert torch.equal(saved["leader_copy"], restored["leader_copy"])
        full, resumed, dropped = (torch.stack(r[k]["after"]) for k in ("full", "resumed", "dropped"))
        assert full.shape == (16, P) and resumed.shape == dropped.shape == (8, P)
        assert (full[8:] - resumed).abs().max() <= 1e-9
        assert (full[8:] - dropped).abs().max() > 1e-6  # the per-rank state matters
