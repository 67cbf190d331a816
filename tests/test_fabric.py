"""Fabric front end: the same training under Fabric and under the Trainer gives bit-identical replicas;
fabric.save/fabric.load resume exactly; registration and bad input."""

from typing import Any

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


def test_fault_tolerance_plugs_into_fabric_join_at_the_first_forward_and_adopt_a_healed_step():
    """The Fabric front end's fault-tolerance plumbing with a scripted plugin (the torchft rounds themselves run in
    tests/test_fault_tolerance.py's Fabric launch case): the session's group is the world the algorithm syncs
    over; a checkpoint's FT state is loaded before the join; the join happens at the first forward pass (before
    any gradient); a step count a healing gives inside a step is the step's; registered schedulers travel."""
    from lightning.fabric.plugins import Precision

    from lightning_localsgd.engine import FaultTolerancePlugin, FaultTolerantSession
    from lightning_localsgd.transport.collectives import Collectives, Group

    calls: list[tuple] = []

    class Session(FaultTolerantSession):
        def __init__(self, host: Any) -> None:
            self.host, self._group = host, Group(None, [0], 0)

        @property
        def group(self) -> Group:
            return self._group

        def join(self) -> None:
            calls.append(("join", self.host.step, [s.state_dict()["last_epoch"] for s in self.host.schedulers()]))
            self.host.set_step(12)  # healed into the others' step
            self.host.step_schedulers(12)

        def after_step(self) -> None:
            calls.append(("after_step", self.host.step))
            if self.host.step == 12:  # (inside step 13) a healing gave step 20
                self.host.set_step(19, ready=20)

        def shutdown(self) -> None:
            calls.append(("shutdown",))

        def load_state_dict(self, state: dict[str, Any]) -> None:
            calls.append(("load", state))

    class Plugin(FaultTolerancePlugin):
        def collectives(self, comm_dtype: Any, bucket_mb: float) -> Collectives:
            return Collectives(comm_dtype, bucket_mb)

        def check_supported(self, engine: Any, comm: Any, processes: int = 1) -> None:
            calls.append(("check", processes))

        def start(self, host: Any, engine: Any, job: Any, comm: Any, broadcast: Any) -> FaultTolerantSession:
            self.session = Session(host)
            return self.session

    plugin = Plugin()
    strategy = LocalSGDStrategy(algorithm=PeriodicAveraging(4), fault_tolerance=plugin)
    strategy.precision = Precision()
    with pytest.raises(ValueError, match="does not combine with the auto-tuner"):
        LocalSGDStrategy(algorithm=PeriodicAveraging("auto"), fault_tolerance=plugin)
    module = strategy.setup_module(torch.nn.Linear(2, 1))
    optimizer = strategy.setup_optimizer(torch.optim.SGD(module.parameters(), lr=0.1))
    scheduler = strategy.register_scheduler(torch.optim.lr_scheduler.StepLR(optimizer, 5))
    assert strategy.algorithm.world is plugin.session.group and strategy.ft_session is plugin.session
    strategy._ft_resume = {"manager": {"step": 3}}  # what fabric.load found in the checkpoint
    assert calls == []
    loss = module(torch.ones(1, 2)).sum()  # the first forward pass joins
    assert calls == [("load", {"manager": {"step": 3}}), ("join", 0, [0])]
    assert strategy.step == 12 and scheduler.state_dict()["last_epoch"] == 1
    loss.backward()
    strategy.optimizer_step(optimizer)
    assert calls[-1] == ("after_step", 12) and strategy.step == 20  # the step count the healing gave
    module(torch.ones(1, 2)).sum().backward()
    strategy.optimizer_step(optimizer)
    assert calls[-1] == ("after_step", 20) and strategy.step == 21
    assert [c for c in calls if c[0] == "join"] == [("join", 0, [0])]  # once
    from lightning.fabric.accelerators import CPUAccelerator
    from lightning.fabric.plugins.environments import LightningEnvironment

    strategy.cluster_environment, strategy.accelerator = LightningEnvironment(), CPUAccelerator()
    strategy.teardown()
    assert calls[-1] == ("shutdown",)
