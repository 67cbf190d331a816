"""Multi-process tests of LocalSGDStrategy on 2 real gloo ranks (127.0.0.1)."""

import torch

from tests.launch import run_ranks


def test_sync_every_1_equals_ddp_step_for_step():
    r0, r1 = run_ranks("tests.scenarios_core:ddp_equivalence", world=2, steps=6, localsgd={"sync_every": 1})
    for r in (r0, r1):
        assert r["ddp"].shape == r["localsgd"].shape == (6, 57)
        assert (r["ddp"] - r["localsgd"]).abs().max() <= 1e-9
    # no gradient traffic at all: one parameter allreduce per step
    assert r0["calls"]["sync"] == 6 and "grad" not in r0["calls"]


def test_warmup_steps_equal_ddp_then_local_steps():
    r0, r1 = run_ranks(
        "tests.scenarios_core:ddp_equivalence", world=2, steps=8, localsgd={"sync_every": 4, "warmup_steps": 3}
    )
    for r in (r0, r1):
        diff = (r["ddp"] - r["localsgd"]).abs().amax(dim=1)
        assert diff[:3].max() <= 1e-9  # warm-up: DDP's averaged gradients
        assert diff[3] > 1e-6  # step 4 is a local step on a different shard
    assert r0["calls"]["grad"] == 3  # one gradient allreduce per warm-up step, none afterwards
    grad_bytes = 2 * (2 - 1) / 2 * 57 * 8 + 2 * 8  # fp64 payload + one flag per rank
    assert r0["bytes"]["grad"] == 3 * grad_bytes
    assert r0["calls"]["sync"] == 2  # step 7 (= 3 + 4), and the final average at step 8
    assert torch.equal(r0["final"], r1["final"])  # the consensus on every rank after fit


def test_local_gd_reaches_min_norm_interpolator_for_any_H():
    """Seed 000, Theorem 1: overparameterized least squares (8 points, 40 dims), different data on each
    rank, full-batch GD from zero: the consensus converges to pinv(X)·y of ALL the data, for any H."""
    from tests.scenarios_core import least_squares_shards

    runs = [(1, 300), (10, 800), (100, 3000)]
    r0, r1 = run_ranks("tests.scenarios_core:local_gd_least_squares", world=2, runs=runs, lr=0.15)
    xs, ys = least_squares_shards()
    w_star = torch.linalg.pinv(torch.cat(xs)) @ torch.cat(ys)
    for H, _ in runs:
        assert torch.equal(r0[H], r1[H])
        assert (r0[H] - w_star).abs().max() <= 1e-6, (H, (r0[H] - w_star).abs().max())
    # the min-norm interpolator is not the trivial answer: it fits every point of both shards
    assert (torch.cat(xs) @ w_star - torch.cat(ys)).abs().max() < 1e-10


def test_gradient_accumulation_counts_optimizer_steps():
    """accumulate_grad_batches=2: H counts optimizer steps (global_step), and H=1 still equals DDP."""
    r0, r1 = run_ranks(
        "tests.scenarios_core:ddp_equivalence",
        world=2,
        steps=4,
        localsgd={"sync_every": 1},
        trainer={"accumulate_grad_batches": 2},
    )
    for r in (r0, r1):
        assert r["ddp"].shape[0] == r["localsgd"].shape[0] == 8  # 8 batches, 4 optimizer steps
        assert (r["ddp"] - r["localsgd"]).abs().max() <= 1e-9
    assert r0["calls"]["sync"] == 4  # one sync per optimizer step, not per batch


def test_manual_optimization_with_one_optimizer_equals_ddp():
    r0, r1 = run_ranks(
        "tests.scenarios_core:ddp_equivalence", world=2, steps=5, localsgd={"sync_every": 1}, manual=True
    )
    for r in (r0, r1):
        assert (r["ddp"] - r["localsgd"]).abs().max() <= 1e-9
    assert r0["calls"]["sync"] == 5
