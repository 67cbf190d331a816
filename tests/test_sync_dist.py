"""What a sync does, checked against hand-computed means on real gloo ranks."""

import pytest
import torch

from tests.launch import run_ranks


def pre_sync(record: dict, step: int) -> torch.Tensor:
    """A replica right after its local SGD update of ``step`` (1-based), before any sync: p − lr·g."""
    params, grads = record["before_update"][step - 1]
    return params - record["lr"] * grads


@pytest.mark.parametrize("policy", ["average", "broadcast", "local"])
def test_buffer_policies_on_batchnorm(policy):
    ranks = run_ranks(
        "tests.scenarios_core:record_run",
        world=2,
        steps=4,
        algorithm={"sync_every": 2, "buffers": policy},
        model={"batchnorm": True},
    )
    key = "net.1.running_mean"
    for step in (2, 4):  # sync steps
        before = [r["buffers_before"][step - 1] for r in ranks]
        assert not torch.allclose(before[0][key], before[1][key])  # the shards really differ
        for rank, r in enumerate(ranks):
            after = r["buffers_after"][step - 1]
            for name in ("net.1.running_mean", "net.1.running_var"):
                expected = {
                    "average": (before[0][name] + before[1][name]) / 2,
                    "broadcast": before[0][name],
                    "local": before[rank][name],
                }[policy]
                assert (after[name] - expected).abs().max() <= 1e-12
            # integer buffers are never averaged: each rank counted its own batches
            assert int(after["net.1.num_batches_tracked"]) == step
            # parameters are averaged whatever the buffer policy
            mean = (pre_sync(ranks[0], step) + pre_sync(ranks[1], step)) / 2
            assert (r["after"][step - 1] - mean).abs().max() <= 1e-12
    if policy == "broadcast":
        assert ranks[0]["calls"]["sync"] == 2 * 2  # one allreduce + one broadcast per sync


def test_hierarchical_averaging_two_nodes_of_two():
    """4 processes as 2 nodes × 2: node averages every 2 steps, world averages every 4."""
    ranks = run_ranks(
        "tests.scenarios_core:record_run",
        world=4,
        nodes=2,
        steps=8,
        algorithm={"sync_every": 4, "node_sync_every": 2},
        monitors=True,
    )
    nodes = [[0, 1], [2, 3]]
    for step in range(1, 9):
        pre = [pre_sync(r, step) for r in ranks]
        for rank, r in enumerate(ranks):
            if step % 4 == 0:
                expected = sum(pre) / 4
            elif step % 2 == 0:
                node = nodes[rank // 2]
                expected = (pre[node[0]] + pre[node[1]]) / 2
            else:
                expected = pre[rank]
            assert (r["after"][step - 1] - expected).abs().max() <= 1e-12, (step, rank)
        # ReplicaDrift: distances of the pre-sync replicas from the mean that the sync computed
        if step % 2 == 0:
            group = range(4) if step % 4 == 0 else nodes[0]
            mean = sum(pre[i] for i in group) / len(group)
            d = torch.stack([(pre[i] - mean).norm() for i in group])
            prefix = "replica_drift/" if step % 4 == 0 else "replica_drift/node_"
            logged = ranks[0]["drifts"][step - 1]
            assert logged[prefix + "mean"] == pytest.approx(float(d.mean()), rel=1e-5)
            assert logged[prefix + "max"] == pytest.approx(float(d.max()), rel=1e-5)
    # bytes: world syncs 2·(4−1)/4 of the payload, node syncs 2·(2−1)/2, fp64 + one flag per rank
    P = 57
    world_sync = 2 * 3 / 4 * (P + 4) * 8
    node_sync = 2 * 1 / 2 * (P + 2) * 8
    assert ranks[0]["bytes"]["sync"] == pytest.approx(2 * world_sync + 2 * node_sync)
    # CommStats logs the same counters (MB; every byte this rank sent: setup broadcast, syncs, monitor)
    logged = ranks[0]["logged"]
    assert logged["comm/MB_sent"] == pytest.approx(sum(ranks[0]["bytes"].values()) / 1e6, rel=1e-6)
    assert logged["comm/syncs"] == 2  # world syncs at steps 4 and 8; node syncs are not world syncs


def test_nonfinite_replica_raises_naming_rank_and_step():
    ranks = run_ranks("tests.scenarios_core:record_run", world=2, steps=4, algorithm={"sync_every": 2}, nan_at=(1, 2))
    for r in ranks:
        assert r["error"] is not None and "NonFiniteReplicaError" in r["error"]
        assert "rank(s) [1]" in r["error"] and "step 2" in r["error"]
        assert len(r["after"]) == 1  # training stopped at the bad sync


def test_nonfinite_replica_skipped_on_request():
    ranks = run_ranks(
        "tests.scenarios_core:record_run",
        world=2,
        steps=2,
        algorithm={"sync_every": 2, "nonfinite": "skip"},
        nan_at=(1, 2),
    )
    healthy = pre_sync(ranks[0], 2)
    for r in ranks:
        assert r["error"] is None
        assert (r["after"][1] - healthy).abs().max() <= 1e-12  # everyone gets the finite replica


def test_bf16_transport_halves_bytes_and_stays_close():
    fp = run_ranks("tests.scenarios_core:record_run", world=2, steps=4, algorithm={"sync_every": 2})
    bf = run_ranks(
        "tests.scenarios_core:record_run",
        world=2,
        steps=4,
        algorithm={"sync_every": 2},
        strategy={"comm_dtype": "bfloat16"},
        model={"lr": 0.1},
    )
    P = 57
    assert fp[0]["bytes"]["sync"] == 2 * (P + 2) * 8  # fp64 model, 2 syncs, ring factor 2·(2−1)/2 = 1
    assert bf[0]["bytes"]["sync"] == 2 * (P + 2) * 2  # bf16 on the wire
    # first sync: the mean of bf16(x_i − x0) added to the fp64 anchor x0 (identical start)
    x0 = bf[0]["before_update"][0][0]
    exact = (pre_sync(bf[0], 2) + pre_sync(bf[1], 2)) / 2
    deltas = [(pre_sync(r, 2) - x0).to(torch.bfloat16) for r in bf]
    emulated = x0 + (deltas[0] + deltas[1]).double() / 2
    got = bf[0]["after"][1]
    assert (got - emulated).abs().max() <= 1e-12  # exactly the documented transport
    assert 0 < (got - exact).abs().max() <= 1e-2 * (exact - x0).abs().max()  # rounding only on the deltas
    assert torch.equal(bf[0]["after"][1], bf[1]["after"][1])
