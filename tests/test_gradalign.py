"""GradAlign / FedGA: the penalized-gradient identity on quadratics, DDP equivalence, costs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lightning_localsgd import LocalSGDStrategy
from lightning_localsgd.algorithms.gradalign import GradAlign
from tests.launch import run_ranks
from tests.scenarios_leader import A, B

BETA, LR = 0.5, 0.1


# ---------------------------------------------------------------------------------------------- unit tests
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(beta=-0.1), "beta must be a finite number >= 0"),
        (dict(beta=math.nan), "beta must be a finite number >= 0"),
        (dict(beta=True), "beta must be a finite number >= 0"),
        (dict(beta=0.1, every=0), "every must be an integer >= 1"),
    ],
)
def test_arguments_are_validated_with_a_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradAlign(**kwargs)


def fake_trainer(strategy, accumulate=1, scaler=None):
    return SimpleNamespace(
        strategy=strategy, accumulate_grad_batches=accumulate, precision_plugin=SimpleNamespace(scaler=scaler)
    )


@pytest.mark.parametrize(
    ("trainer", "automatic", "error", "message"),
    [
        (fake_trainer(SimpleNamespace()), True, TypeError, "GradAlign needs the local-SGD strategy"),
        (fake_trainer(LocalSGDStrategy()), False, ValueError, "use automatic optimization"),
        (fake_trainer(LocalSGDStrategy(), accumulate=2), True, ValueError, "use accumulate_grad_batches=1"),
    ],
)
def test_refuses_what_it_cannot_do(trainer, automatic, error, message):
    with pytest.raises(error, match=message):
        GradAlign(0.1).setup(trainer, SimpleNamespace(automatic_optimization=automatic), "fit")


def test_fp16_loss_scaling_is_refused_at_setup_under_the_trainer_and_under_fabric():
    """The check lives in ``check_front_end``, which both front ends run at setup (it was Trainer-only)."""
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.precision import MixedPrecision as FabricMixedPrecision
    from lightning.pytorch import Trainer
    from lightning.pytorch.plugins.precision import MixedPrecision

    from lightning_localsgd import PeriodicAveraging
    from lightning_localsgd.fabric import LocalSGDStrategy as FabricLocalSGDStrategy
    from tests.models import TinyNet, loader, regression_data, trainer_kwargs

    message = "GradAlign does not support fp16 loss scaling"
    kwargs = trainer_kwargs(1, 1, precision=None, plugins=[MixedPrecision("16-mixed", "cpu")], max_steps=1)
    trainer = Trainer(strategy=LocalSGDStrategy(), callbacks=[PeriodicAveraging(1), GradAlign(0.1)], **kwargs)
    with pytest.raises(ValueError, match=message):
        trainer.fit(TinyNet(), loader(regression_data(8)))
    strategy = FabricLocalSGDStrategy(algorithm=PeriodicAveraging(1), gradient_modifier=GradAlign(0.1))
    fabric = Fabric(accelerator="cpu", devices=1, strategy=strategy, plugins=[FabricMixedPrecision("16-mixed", "cpu")])
    with pytest.raises(ValueError, match=message):
        fabric.launch()
    # bf16 needs no scaler: both accept it
    strategy = FabricLocalSGDStrategy(algorithm=PeriodicAveraging(1), gradient_modifier=GradAlign(0.1))
    Fabric(accelerator="cpu", devices=1, strategy=strategy, precision="bf16-mixed").strategy.engine.check(strategy)


# ---------------------------------------------------------------------------------------------- references
def grad_f(i: int, x: torch.Tensor) -> torch.Tensor:
    return A[i] @ (x - B[i])


def penalized(x: torch.Tensor) -> torch.Tensor:
    """F(x) = f(x) + (β/2)·mean_i ||∇f_i(x) − ∇f(x)||², f = mean_i f_i, with ∇f_i written out."""
    g = [A[i] @ (x - B[i]) for i in range(2)]
    f = sum(0.5 * (x - B[i]) @ A[i] @ (x - B[i]) for i in range(2)) / 2
    return f + BETA / 2 * sum(((gi - (g[0] + g[1]) / 2) ** 2).sum() for gi in g) / 2


def grad_penalized(x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(penalized(x), x)[0]


def mean_cosine(x_per_rank: list[torch.Tensor]) -> float:
    g = [grad_f(i, x_per_rank[i]) for i in range(2)]
    mean = (g[0] + g[1]) / 2
    return sum(float(gi @ mean / (gi.norm() * mean.norm())) for gi in g) / 2


@pytest.fixture(scope="module")
def runs():
    return run_ranks("tests.scenarios_leader:gradalign_runs", world=2, beta=BETA, lr=LR)


# ---------------------------------------------------------------------------------------------- K = 1
def test_k1_step_is_gradient_descent_on_f_plus_the_misalignment_penalty(runs):
    # step 1 by hand: g_0 = (−1, 0), g_1 = (−1, −3), g = (−1, −1.5); x_0' = (0, 0.75), x_1' = (0, −0.75);
    # ∇f_0(x_0') = (−1, 1.5), ∇f_1(x_1') = (−1.75, −5.25); their mean (−1.375, −1.875)
    for r in range(2):
        k1 = runs[r]["k1"]
        assert k1["grads"][0].tolist() == [-1.375, -1.875]
        assert k1["after"][0].tolist() == pytest.approx([0.1375, 0.1875], abs=1e-15)
        assert k1["losses"][0] == [0.5, 1.5][r]  # Lightning reports the first pass's loss, f_i(x)
    assert grad_penalized(torch.zeros(2, dtype=torch.float64)).tolist() == pytest.approx([-1.375, -1.875], abs=1e-15)
    x = torch.zeros(2, dtype=torch.float64)
    for s in range(5):  # the whole run is plain gradient descent on F, on both ranks
        for r in range(2):
            assert (runs[r]["k1"]["before"][s] - x).abs().max() <= 1e-12
            assert (runs[r]["k1"]["grads"][s] - grad_penalized(x)).abs().max() <= 1e-12
            assert runs[r]["k1"]["attrs"]["alignment"][s] == pytest.approx(mean_cosine([x, x]), abs=1e-12)
        x = x - LR * grad_penalized(x)
    assert runs[0]["k1"]["attrs"]["alignment"][0] == pytest.approx((1 / math.sqrt(3.25) + 5.5 / math.sqrt(32.5)) / 2)
    logged = runs[0]["k1"]["metrics"]["gradalign/alignment"]  # Lightning stores logged floats in float32
    assert logged == pytest.approx(runs[0]["k1"]["attrs"]["alignment"][-1], rel=1e-6)


def test_k1_costs_two_passes_and_two_allreduces_per_update(runs):
    k1 = runs[0]["k1"]
    assert k1["training_step_calls"] == 2 * 5
    assert k1["calls"]["gradalign"] == 2 * 5 and "grad" not in k1["calls"]
    # allreduce 1: 2 gradient values + 2 flags; allreduce 2: 2 values + the cosine + 2 flags (float64, n = 2)
    assert k1["bytes"]["gradalign"] == 5 * 2 * (1 / 2) * ((2 + 2) * 8 + (3 + 2) * 8)
    assert "sync" not in k1["calls"]  # equal replicas took the same step: PeriodicAveraging(1) sends nothing


def test_k1_with_beta_0_equals_lightning_ddp_step_for_step(runs):
    for r in range(2):
        got, ddp = torch.stack(runs[r]["beta0"]["after"]), torch.stack(runs[r]["ddp"])
        assert got.shape == ddp.shape == (6, 57) and (got - ddp).abs().max() <= 1e-9
    assert runs[0]["beta0"]["calls"]["gradalign"] == 2 * 6
    assert runs[0]["beta0"]["bytes"]["gradalign"] == 6 * 2 * (1 / 2) * ((57 + 2) * 8 + (58 + 2) * 8)


# ---------------------------------------------------------------------------------------------- FedGA
def test_fedga_displaces_once_per_round_then_takes_local_steps(runs):
    x = [torch.zeros(2, dtype=torch.float64) for _ in range(2)]  # plain-torch FedGA, K = 3, 7 steps
    for s in range(1, 8):
        if s in (1, 4, 7):  # round starts: x_i ← x_i − β(g − g_i), g_i on this step's batch
            g = [grad_f(i, x[i]) for i in range(2)]
            alignment = mean_cosine(x)
            x = [x[i] - BETA * ((g[0] + g[1]) / 2 - g[i]) for i in range(2)]
        for r in range(2):
            fedga = runs[r]["fedga"]
            assert (fedga["before"][s - 1] - x[r]).abs().max() <= 1e-12, (s, r)  # the step starts at x_i'
            assert (fedga["grads"][s - 1] - grad_f(r, x[r])).abs().max() <= 1e-12  # ... with ∇f_i(x_i')
            if s in (1, 4, 7):
                assert fedga["attrs"]["alignment"][s - 1] == pytest.approx(alignment, abs=1e-12)
        x = [x[i] - LR * grad_f(i, x[i]) for i in range(2)]
        if s % 3 == 0:
            x = [(x[0] + x[1]) / 2] * 2
        for r in range(2):
            assert (runs[r]["fedga"]["after"][s - 1] - x[r]).abs().max() <= 1e-12, (s, r)
    final = (x[0] + x[1]) / 2  # fit ends mid-round: the strategy's final average
    assert all((runs[r]["fedga"]["final"] - final).abs().max() <= 1e-12 for r in range(2))
    calls = runs[0]["fedga"]["calls"]
    assert runs[0]["fedga"]["training_step_calls"] == 7 + 3  # one extra pass per round
    assert calls["gradalign"] == 3 and calls["monitor"] == 3  # one allreduce per round, one scalar all-gather
