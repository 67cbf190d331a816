"""ElasticAveraging (EASGD): literal numbers with a fake transport, and 2 gloo ranks vs plain torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_localsgd.algorithms.elastic import ElasticAveraging
from tests.fakes import FakeCollectives, bind_fake
from tests.launch import run_ranks
from tests.scenarios_leader import shard_batch, tinynet_start


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(sync_every=0), "sync_every must be an integer >= 1"),
        (dict(sync_every=2, alpha=0.0), r"alpha must be a number in \(0, 1\]"),
        (dict(sync_every=2, beta=1.5), r"beta must be a number in \(0, 1\]"),
        (dict(sync_every=2, beta="0.9"), r"beta must be a number in \(0, 1\]"),
    ],
)
def test_arguments_are_validated_with_a_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ElasticAveraging(**kwargs)


def attached(algo: ElasticAveraging, x: list[float], center: list[float], other: list[float]):
    """This rank (0 of 2) holds ``x``, rank 1 holds ``other``, the center is ``center``."""
    module = nn.Linear(1, 1).double()
    comm = FakeCollectives()
    bind_fake(algo, module, comm)
    with torch.no_grad():
        module.weight.fill_(x[0]), module.bias.fill_(x[1])
        algo.anchor.copy_(torch.tensor(center, dtype=torch.float64))
    set_other(algo, comm, other)
    return module, comm


def set_other(algo: ElasticAveraging, comm: FakeCollectives, other: list[float]) -> None:
    """Rank 1 holds ``other``: it sends its replica minus the current center."""
    comm.other = torch.tensor(other, dtype=torch.float64) - algo.anchor


def values(tensors) -> list[float]:
    return [float(t.detach()) for t in tensors]


def test_easgd_update_by_hand():
    # x_0 = (3, 0), x_1 = (1, 4), x̃ = (1, 2); β = 0.5, α = β/n = 0.25; m = (2, 2)
    algo = ElasticAveraging(sync_every=2, beta=0.5)
    module, comm = attached(algo, x=[3.0, 0.0], center=[1.0, 2.0], other=[1.0, 4.0])
    assert algo.moving_rate == 0.25
    algo.after_step(1)
    assert comm.sent == [] and values(module.parameters()) == [3.0, 0.0]  # a local step
    algo.after_step(2)
    assert len(comm.sent) == 1
    assert values(module.parameters()) == [2.5, 0.5]  # x_0 − 0.25·(x_0 − x̃) with the old x̃
    assert values(algo.center) == [1.5, 2.0]  # x̃ + 0.5·(m − x̃) with the old x_i
    assert algo.num_syncs == 1 and algo.last_sync_step == 2


def test_easgd_with_the_lsgd_authors_beta_by_hand():
    # β = 0.43 (EASGD in the LSGD authors' train.sh), α = β/n = 0.215;
    # x_0 = (3, 0), x_1 = (1, 4), x̃ = (1, 2), m = (2, 2)
    algo = ElasticAveraging(sync_every=1, beta=0.43)
    module, _ = attached(algo, x=[3.0, 0.0], center=[1.0, 2.0], other=[1.0, 4.0])
    assert algo.moving_rate == 0.215
    algo.after_step(1)
    assert values(module.parameters()) == pytest.approx([2.57, 0.43], abs=1e-15)  # x_0 − 0.215·(x_0 − x̃)
    assert values(algo.center) == pytest.approx([1.43, 2.0], abs=1e-15)  # x̃ + 0.43·(m − x̃)


def test_explicit_alpha_and_the_model_is_the_center():
    algo = ElasticAveraging(sync_every=2, alpha=0.5, beta=0.5)
    module, comm = attached(algo, x=[3.0, 0.0], center=[1.0, 2.0], other=[1.0, 4.0])
    algo.after_step(2)
    assert values(module.parameters()) == [2.0, 1.0] and values(algo.center) == [1.5, 2.0]
    # evaluation swaps in the center and back, exactly; the checkpoint stores the center; no communication
    algo.begin_evaluation(2)
    assert values(module.parameters()) == [1.5, 2.0]
    algo.end_evaluation()
    assert values(module.parameters()) == [2.0, 1.0]
    saved = algo.consensus_state_dict(module.state_dict(), 2)
    assert float(saved["weight"]) == 1.5 and float(saved["bias"]) == 2.0 and len(comm.sent) == 1
    assert values(module.parameters()) == [2.0, 1.0]
    assert algo.state_dict()["anchor"].tolist() == [1.5, 2.0]
    # fit ends after a local step: one last elastic update (other rank at (1, 4)), then x ← x̃
    set_other(algo, comm, [1.0, 4.0])
    algo.finalize(3)
    # m = ((2, 1) + (1, 4)) / 2 = (1.5, 2.5); x̃ = (1.5, 2) + 0.5·((1.5, 2.5) − (1.5, 2)) = (1.5, 2.25)
    assert len(comm.sent) == 2 and values(algo.center) == [1.5, 2.25]
    assert values(module.parameters()) == [1.5, 2.25]


def easgd_reference(steps: int, sync_every: int, alpha: float, beta: float, lr: float = 0.1, momentum: float = 0.5):
    """Two plain-torch replicas with SGD(momentum) and the EASGD rule; returns per-step params, centers."""
    models = [tinynet_start(momentum) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in models]
    flat = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()])  # noqa: E731
    center = flat(models[0]).clone()
    after, centers = [[], []], []

    def elastic() -> None:
        nonlocal center
        xs = [flat(m) for m in models]
        mean = (xs[0] + xs[1]) / 2
        for m, x in zip(models, xs):
            torch.nn.utils.vector_to_parameters(x - alpha * (x - center), m.parameters())
        center = center + beta * (mean - center)

    for s in range(1, steps + 1):
        for r, (m, opt) in enumerate(zip(models, opts)):
            x, y = shard_batch(s - 1, r, 2)
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
        if s % sync_every == 0:
            elastic()
        for r in range(2):
            after[r].append(flat(models[r]))
        centers.append(center.clone())
    elastic()  # fit ends after a local step: one last update, then every replica is the center
    return after, centers, center


def test_two_ranks_match_a_plain_torch_easgd():
    runs = run_ranks("tests.scenarios_leader:elastic_run", world=2, steps=10, cfg=dict(sync_every=3, beta=0.5))
    after, centers, final = easgd_reference(10, 3, alpha=0.25, beta=0.5)
    for r in range(2):
        got = torch.stack(runs[r]["after"])
        assert got.shape == (10, 57) and (got - torch.stack(after[r])).abs().max() <= 1e-9
        assert (runs[r]["center"] - final).abs().max() <= 1e-9
        assert (runs[r]["final"] - final).abs().max() <= 1e-9  # every rank holds the center after fit
        assert torch.equal(runs[r]["state_center"], runs[0]["state_center"])
    # validation after step 5 ran on the center of step 3's update; training was not perturbed (above)
    assert runs[0]["val_steps"] == [5] and (runs[0]["val_params"][0] - centers[4]).abs().max() <= 1e-9
    assert (after[0][4] - centers[4]).abs().max() > 1e-3
    # syncs at 3, 6, 9 and the final one; each one allreduce of 57 float64 + 2 flags; evaluation is free
    assert runs[0]["calls"] == {"setup": 1, "sync": 4}
    assert runs[0]["bytes"]["sync"] == 4 * 2 * (1 / 2) * (57 * 8 + 2 * 8)
