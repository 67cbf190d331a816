"""Resume on another world size (issue 11, item 4): 2→1, 2→4 and 4→2 on real gloo ranks.

A checkpoint is written mid-period by one world size and resumed by another. Every new rank must
start from the consensus (the replicas' average) with the inner SGD momentum *averaged* over the
saved ranks (not rank 0's); DiLoCo's anchor θ and outer momentum are global and carry over
unchanged; a sync in flight (overlap_steps=1) lands on time. The model (``tests/scenarios_world_size.py``)
is a point in R² pulled toward each rank's own target, so the first numbers after resuming are
worked out by hand below, and the rest is compared with a plain-torch replay (:func:`replay`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.algorithms.leader import LeaderSGD
from lightning_localsgd.resume import average_optimizer_states, read_parts
from tests.launch import run_ranks
from tests.scenarios_world_size import ALGORITHMS, LR, MOMENTUM, target

SAVE_AT = {"periodic": 3, "diloco": 3, "diloco_overlap": 2}  # mid-period; diloco_overlap: a sync in flight
STEPS = {"periodic": 6, "diloco": 6, "diloco_overlap": 5}
EXACT = dict(rtol=0, atol=0)  # dyadic numbers all the way: no rounding anywhere


# ---------------------------------------------------------------------------- the plain-torch replay
def mean(tensors: list[Tensor]) -> Tensor:
    return torch.stack(tensors).mean(0)


class Replay:
    """The algorithms in plain torch on ``world`` points; ``resize`` does what a resume on another world size must."""

    def __init__(self, name: str, world: int) -> None:
        cfg = ALGORITHMS[name]
        self.every, self.tau, self.outer = cfg["sync_every"], cfg.get("overlap_steps", 0), cfg["cls"] == "diloco"
        self.outer_lr, self.outer_momentum = cfg.get("outer_lr"), cfg.get("outer_momentum")
        self.w = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
        self.buf: list[Tensor | None] = [None] * world
        self.theta, self.outer_buf = torch.zeros(2, dtype=torch.float64), None
        self.last_sync, self.flight = 0, None  # flight: (start, mean, what each rank sent)
        self.after: list[list[Tensor]] = []  # per step, every rank's w

    def consensus(self, m: Tensor) -> Tensor:
        """PeriodicAveraging: the mean. DiLoCo: outer SGD on Δ = θ − mean."""
        if not self.outer:
            return m.clone()
        delta = self.theta - m
        self.outer_buf = delta.clone() if self.outer_buf is None else self.outer_momentum * self.outer_buf + delta
        self.theta = self.theta - self.outer_lr * self.outer_buf
        return self.theta.clone()

    def land(self) -> None:
        _, m, sent = self.flight
        c = self.consensus(m)
        self.w = [w + (c - s) for w, s in zip(self.w, sent)]  # keep the τ steps' local progress
        self.flight = None

    def run(self, first: int, last: int) -> None:
        for step in range(first, last + 1):
            for r in range(len(self.w)):  # SGD with momentum on ½‖w − c_r‖², as torch.optim.SGD does it
                g = self.w[r] - target(r)
                self.buf[r] = g.clone() if self.buf[r] is None else MOMENTUM * self.buf[r] + g
                self.w[r] = self.w[r] - LR * self.buf[r]
            if self.flight is not None and self.flight[0] + self.tau == step:
                self.land()
            if step % self.every == 0:
                if self.tau == 0:
                    self.w = [self.consensus(mean(self.w))] * len(self.w)
                    self.last_sync = step
                else:
                    self.flight = (step, mean(self.w), [w.clone() for w in self.w])
            self.after.append(list(self.w))

    def resize(self, world: int) -> None:
        """Every rank from the average, momentum averaged, what was sent averaged; θ, outer state as they were."""
        self.w = [mean(self.w)] * world
        self.buf = [mean(self.buf)] * world
        if self.flight is not None:
            start, m, sent = self.flight
            self.flight = (start, m, [mean(sent)] * world)

    def finalize(self, step: int) -> None:
        if self.flight is not None:
            self.land()
        if self.last_sync != step:
            self.w = [self.consensus(mean(self.w))] * len(self.w)


def replay(name: str, before: int, after: int) -> tuple[Replay, dict[str, Any]]:
    """Train on ``before`` ranks to the save step, resize to ``after`` and train to the end."""
    sim = Replay(name, before)
    sim.run(1, SAVE_AT[name])
    saved = {
        "w": [w.clone() for w in sim.w],
        "buf": list(sim.buf),
        "theta": sim.theta.clone(),
        "outer_buf": sim.outer_buf,
        "last_sync": sim.last_sync,
    }
    sim.resize(after)
    sim.after = []
    sim.run(SAVE_AT[name] + 1, STEPS[name])
    sim.finalize(STEPS[name])
    return sim, saved


# ---------------------------------------------------------------------------- the launches
def save_on(world: int, ckpt_dir: Path) -> list[dict[str, Any]]:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    nodes = 2 if world == 4 else 1
    return run_ranks(
        "tests.scenarios_world_size:save_mid_period", world=world, nodes=nodes, ckpt_dir=str(ckpt_dir), steps=SAVE_AT
    )


def resume_on(world: int, ckpt_dir: Path) -> list[dict[str, Any]]:
    nodes = 2 if world == 4 else 1
    return run_ranks("tests.scenarios_world_size:resume", world=world, nodes=nodes, ckpt_dir=str(ckpt_dir), steps=STEPS)


@pytest.fixture(scope="module")
def saved_on_two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    folder = tmp_path_factory.mktemp("world2")
    return folder, save_on(2, folder)


def check_resume(name: str, before: int, after: int, ckpt_dir: Path, saved: list[dict], runs: list[dict]) -> None:
    """Every new rank against the replay; the checkpoint's global state against what the new ranks restored."""
    sim, at_save = replay(name, before, after)
    for r in range(before):  # the saving run itself followed the replay
        torch.testing.assert_close(saved[r][name]["after"][-1], at_save["w"][r], **EXACT)
    ckpt = torch.load(ckpt_dir / f"{name}.ckpt", weights_only=False)
    assert ckpt["localsgd"]["world_size"] == before and ckpt["global_step"] == SAVE_AT[name]
    torch.testing.assert_close(ckpt["state_dict"]["w"], mean(at_save["w"]), **EXACT)  # the consensus
    rank0_momentum = read_parts(ckpt_dir / f"{name}.ckpt")[0]["optimizer_states"][0]["state"][0]["momentum_buffer"]
    assert not torch.equal(rank0_momentum, mean(at_save["buf"]))  # so averaging is distinguishable from rank 0's
    (algo_state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith(("DiLoCo", "Periodic"))]
    assert len(runs) == after
    for r, run in enumerate(runs):
        got = run[name]
        start = got["start"]
        assert start["step"] == SAVE_AT[name] and start["last_sync_step"] == at_save["last_sync"]
        torch.testing.assert_close(start["w"], mean(at_save["w"]), **EXACT)  # the consensus, on every rank
        torch.testing.assert_close(start["momentum"], mean(at_save["buf"]), **EXACT)  # averaged, not rank 0's
        if ALGORITHMS[name]["cls"] == "diloco":  # global state: exactly what the checkpoint holds
            torch.testing.assert_close(start["anchor"], at_save["theta"], **EXACT)
            torch.testing.assert_close(start["anchor"], algo_state["anchor"], **EXACT)
            saved_outer = algo_state["outer_optimizer"][0]["state"]
            if at_save["outer_buf"] is None:  # no outer step yet (diloco_overlap: the first one is in flight)
                assert saved_outer == {} and start["outer"]["state"] == {}
            else:
                torch.testing.assert_close(saved_outer[0]["momentum_buffer"], at_save["outer_buf"], **EXACT)
                torch.testing.assert_close(start["outer"]["state"][0]["momentum_buffer"], at_save["outer_buf"], **EXACT)
        assert start["inflight"] == ([0] if name == "diloco_overlap" else [])
        want = torch.stack([step[r] for step in sim.after])
        torch.testing.assert_close(got["after"], want, **EXACT)
        torch.testing.assert_close(got["final"], sim.w[r], **EXACT)
        torch.testing.assert_close(got["final"], runs[0][name]["final"], **EXACT)  # every rank ends on the consensus


@pytest.mark.launches
def test_two_ranks_to_one(saved_on_two: tuple[Path, list[dict[str, Any]]]) -> None:
    folder, saved = saved_on_two
    runs = resume_on(1, folder)
    # By hand, PeriodicAveraging(H=4), c_0 = (1, 4), c_1 = (2, 3), lr = μ = 1/2, from w = 0:
    # step 1: g = −c, buf = −c, w = c/2; step 2: g = −c/2, buf = −c, w = c; step 3: g = 0, buf = −c/2, w = 5c/4.
    # Saved mid-period at step 3. Consensus w̄ = 5/4·(1.5, 3.5) = (1.875, 4.375); averaged momentum
    # −1/2·(1.5, 3.5) = (−0.75, −1.75) (rank 0's would be (−0.5, −2)).
    start = runs[0]["periodic"]["start"]
    assert start["w"].tolist() == [1.875, 4.375] and start["momentum"].tolist() == [-0.75, -1.75]
    # first step on 1 rank (c_0 = (1, 4)): g = (0.875, 0.375), buf = ½·(−0.75, −1.75) + g = (0.5, −0.5),
    # w = w̄ − ½·buf = (1.625, 4.625); step 4 is a sync step, on one rank the average is w itself.
    assert runs[0]["periodic"]["after"][0].tolist() == [1.625, 4.625]
    # DiLoCo(H=2, outer SGD lr ½, momentum ½): steps 1, 2 as above (w_i = c_i), outer step at 2 from θ = 0:
    # Δ = −c̄, outer buf = −c̄, θ = c̄/2 = (0.75, 1.75), w_i = θ. Step 3: g = c̄/2 − c_i, buf_i = c̄/2 − 3c_i/2,
    # w_i = c̄/4 + 3c_i/4. Consensus c̄ = (1.5, 3.5); averaged momentum c̄/2 − 3c̄/2 = −c̄ = (−1.5, −3.5).
    start = runs[0]["diloco"]["start"]
    assert start["w"].tolist() == [1.5, 3.5] and start["momentum"].tolist() == [-1.5, -3.5]
    assert start["anchor"].tolist() == [0.75, 1.75]
    assert start["outer"]["state"][0]["momentum_buffer"].tolist() == [-1.5, -3.5]
    # step 4 on 1 rank: buf = −c̄/2 + c̄ − c_0, w = 3c̄/4 + c_0/2; outer step: Δ = θ − w = −c̄/4 − c_0/2,
    # outer buf = −c̄/2 + Δ, θ = c̄/2 − ½·outer buf = 7c̄/8 + c_0/4 = (1.5625, 4.0625).
    assert runs[0]["diloco"]["after"][0].tolist() == [1.5625, 4.0625]
    for name in SAVE_AT:
        check_resume(name, 2, 1, folder, saved, runs)


@pytest.mark.launches
def test_two_ranks_to_four(saved_on_two: tuple[Path, list[dict[str, Any]]]) -> None:
    folder, saved = saved_on_two
    runs = resume_on(4, folder)
    # PeriodicAveraging: the start of test_two_ranks_to_one on all 4 ranks. Step 4 (a sync): rank r steps to
    # w̄ − ½·(½·(−0.75, −1.75) + w̄ − c_r) = w̄/2 + (0.1875, 0.4375) + c_r/2; the average over c_0..c_3
    # (c̄ = (2.5, 2.5)) is (0.9375, 2.1875) + (0.1875, 0.4375) + (1.25, 1.25) = (2.375, 3.875).
    for r in range(4):
        start = runs[r]["periodic"]["start"]
        assert start["w"].tolist() == [1.875, 4.375] and start["momentum"].tolist() == [-0.75, -1.75]
        assert runs[r]["periodic"]["after"][0].tolist() == [2.375, 3.875]
    for name in SAVE_AT:
        check_resume(name, 2, 4, folder, saved, runs)


@pytest.mark.launches
def test_four_ranks_to_two(tmp_path: Path) -> None:
    saved = save_on(4, tmp_path)
    runs = resume_on(2, tmp_path)
    # PeriodicAveraging: c̄ over 4 ranks = (2.5, 2.5): consensus 5/4·c̄, momentum −c̄/2, on both new ranks
    for r in range(2):
        assert runs[r]["periodic"]["start"]["w"].tolist() == [3.125, 3.125]
        assert runs[r]["periodic"]["start"]["momentum"].tolist() == [-1.25, -1.25]
    for name in SAVE_AT:
        check_resume(name, 4, 2, tmp_path, saved, runs)


# ---------------------------------------------------------------------------- the reductions, by hand
def test_optimizer_states_are_averaged_except_what_every_rank_shares() -> None:
    def sgd(buffers: dict[int, list[float]]) -> list[dict[str, Any]]:
        state = {
            i: {"momentum_buffer": torch.tensor(v) if len(v) > 1 else torch.tensor(v[0])} for i, v in buffers.items()
        }
        return [{"state": state, "param_groups": [{"lr": 0.1, "params": [0, 1, 2]}]}]

    # parameter 0 a vector, 1 a scalar (0-dim buffer), 2 without a gradient on rank 1 (no state there)
    rank0 = sgd({0: [1.0, 2.0], 1: [4.0], 2: [8.0]})
    rank1 = sgd({0: [3.0, 6.0], 1: [0.0]})
    (out,) = average_optimizer_states([rank0, rank1])
    assert out["state"][0]["momentum_buffer"].tolist() == [2.0, 4.0]
    assert out["state"][1]["momentum_buffer"].item() == 2.0  # a scalar parameter's momentum is averaged too
    assert out["state"][2]["momentum_buffer"].item() == 8.0  # the mean over the ranks that have it
    assert out["param_groups"] == rank0[0]["param_groups"]
    # Adam: moments averaged, the step counter (equal everywhere) kept bit for bit
    step = torch.tensor(16777217.0, dtype=torch.float64)
    adam = [
        [
            {
                "state": {
                    0: {
                        "step": step.clone(),
                        "exp_avg": torch.tensor([float(r)]),
                        "exp_avg_sq": torch.tensor([float(4 * r)]),
                    }
                },
                "param_groups": [],
            }
        ]
        for r in range(3)
    ]
    (out,) = average_optimizer_states(adam)
    assert torch.equal(out["state"][0]["step"], step)
    assert out["state"][0]["exp_avg"].tolist() == [1.0] and out["state"][0]["exp_avg_sq"].tolist() == [4.0]


def test_rank_states_reduce_residuals_and_syncs_in_flight() -> None:
    saved = [
        {"residual": torch.tensor([1.0, -2.0]), "inflight_sent": {0: torch.tensor([2.0, 2.0]), 1: torch.tensor([1.0])}},
        {"residual": torch.tensor([3.0, 6.0]), "inflight_sent": {0: torch.tensor([4.0, 0.0]), 1: torch.tensor([5.0])}},
    ]
    out = ConsensusAlgorithm.reduce_rank_states(saved, world_size=4)
    assert len(out) == 4
    for mine in out:
        assert mine["residual"].tolist() == [1.0, 1.0]  # the sum (4, 4) that error feedback owes, split evenly
        assert mine["inflight_sent"][0].tolist() == [3.0, 1.0] and mine["inflight_sent"][1].tolist() == [3.0]
    assert ConsensusAlgorithm.reduce_rank_states([{}, {}], world_size=1) == [{"residual": None}]
    assert LeaderSGD.reduce_rank_states([{"losses": [1.0], "leader_copy": None}] * 2, world_size=3) == [{}] * 3
