"""Fabric front end: the same training under Fabric and under the Trainer gives bit-identical replicas;
fabric.save/fabric.load resume exactly; registration and bad input."""

import pytest
import torch
from lightning.fabric import Fabric

from lightning_localsgd import DiLoCo, GradAlign, PeriodicAveraging
from lightning_localsgd.fabric import LocalSGDStrategy
from tests.launch import run_ranks
from tests.scenarios_fabric import SETUPS

STEPS = 8  # one epoch of each rank's shard


def test_trainer_and_fabric_give_bit_identical_replicas_for_every_synchronous_algorithm():
    runs = run_ranks("tests.scenarios_fabric:trainer_vs_fabric", world=2, timeout=300, setups=list(SETUPS), steps=STEPS)
    for setup in SETUPS:
        for rank, run in enumerate(runs):
            trainer, fabric = run[setup]["trainer"], run[setup]["fabric"]
            assert len(trainer) == len(fabric) == STEPS, setup
            for step, (a, b) in enumerate(zip(trainer, fabric), start=1):
                assert torch.equal(a, b), (
                    f"{setup}: rank {rank} differs after step {step} by {float((a - b).abs().max())}"
                )
        # equality is not trivial: the model moved, and (but for GradAlign K = 1, whose replicas stay equal)
        # the ranks' replicas differ between syncs
        assert not torch.equal(runs[0][setup]["fabric"][0], runs[0][setup]["fabric"][-1]), setup
        differ = any(not torch.equal(x, y) for x, y in zip(runs[0][setup]["fabric"], runs[1][setup]["fabric"]))
        assert differ == (setup != "gradalign"), setup


def test_fabric_save_and_load_resume_exactly_mid_period_and_with_a_sync_in_flight():
    setups = ["periodic", "diloco_streaming", "modified_localgd", "lsgd"]
    runs = run_ranks(
        "tests.scenarios_fabric:fabric_resume", world=2, timeout=300, setups=setups, steps=STEPS, save_at=5
    )
    for setup in setups:
        for rank, run in enumerate(runs):
            whole, resumed = run[setup]["whole"], run[setup]["resumed"]
            assert len(whole) == len(resumed) == STEPS
            assert all(torch.equal(a, b) for a, b in zip(whole, resumed)), f"{setup}: rank {rank}"


def test_registered_with_fabric_and_refuses_bad_input():
    fabric = Fabric(accelerator="cpu", devices=2, strategy="localsgd")
    assert isinstance(fabric.strategy, LocalSGDStrategy)
    assert isinstance(fabric.strategy.algorithm, PeriodicAveraging) and fabric.strategy.algorithm.sync_every == 8
    strategy = LocalSGDStrategy(algorithm=DiLoCo(16), gradient_modifier=GradAlign(beta=0.1), comm_dtype="int8")
    assert strategy.algorithm.sync_every == 16 and strategy.comm.comm_dtype == "int8"
    with pytest.raises(TypeError, match=r"algorithm must be a ConsensusAlgorithm such as DiLoCo\(64\)"):
        LocalSGDStrategy(algorithm=GradAlign(beta=0.1))
    with pytest.raises(TypeError, match="gradient_modifier must be a GradientModifier"):
        LocalSGDStrategy(gradient_modifier=DiLoCo(16))
