"""The linear recipe (recipes/linear.py) and its configs: every YAML parses into the intended
objects, the data and losses are what the docstrings say, and a real 2-rank run of the recipe
lands where plain-torch references computed here say it must (seed 000)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch.nn import functional as F

from lightning_localsgd import LocalSGDStrategy, ModifiedLocalGD, PeriodicAveraging
from recipes.linear import LinearDataModule, LinearModel, main
from tests.launch import ROOT, run_ranks

CONFIGS = ROOT / "configs" / "linear"
F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")  # pytest's own argv is in sys.argv

# What each overlay must produce on top of base.yaml: (strategy type, algorithm type, algorithm attributes,
# data attributes, model hyperparameters). A new YAML needs a line here.
EXPECTED = {
    "base": (DDPStrategy, None, {}, {"source": "regression", "dim": 200, "num_shards": 2}, {"task": "regression"}),
    "localgd": (LocalSGDStrategy, PeriodicAveraging, {"sync_every": 100}, {"source": "regression"}, {}),
    "modified_localgd": (
        LocalSGDStrategy,
        ModifiedLocalGD,
        {"sync_every": 100, "prox": 0.001, "correction": True},
        {},
        {},
    ),
    "modified_localgd_nocorrection": (
        LocalSGDStrategy,
        ModifiedLocalGD,
        {"sync_every": 100, "prox": 0.001, "correction": False},
        {},
        {},
    ),
}
SEPARABLE = ["--data.source=separable", "--data.dim=50", "--data.samples_per_shard=20"]  # as base.yaml documents


def parse(*names: str, extra: tuple[str, ...] = ()):
    args = [a for n in names for a in ("--config", str(CONFIGS / f"{n}.yaml"))]
    return main(args=[*args, "--trainer.logger=false", *extra], run=False, save_config_callback=None)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_parses_into_the_intended_objects(path: Path):
    assert path.stem in EXPECTED, f"add the expectations of {path.name} to EXPECTED"
    strategy_type, algorithm_type, algorithm_attrs, data_attrs, model_hparams = EXPECTED[path.stem]
    cli = parse(*dict.fromkeys(["base", path.stem]))
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    assert type(trainer.strategy) is strategy_type
    algorithms = [cb for cb in trainer.callbacks if isinstance(cb, (PeriodicAveraging, ModifiedLocalGD))]
    assert [type(a) for a in algorithms] == ([algorithm_type] if algorithm_type else [])
    for key, value in algorithm_attrs.items():
        assert getattr(algorithms[0], key) == value, key
    assert isinstance(data, LinearDataModule) and isinstance(model, LinearModel)
    for key, value in data_attrs.items():
        assert getattr(data, key) == value, key
    for key, value in model_hparams.items():
        assert model.hparams[key] == value, key
    # linked from the data; a linear model without bias that starts at zero
    assert (model.hparams.num_features, model.hparams.task) == (data.num_features, data.task)
    assert model.linear.bias is None and not model.linear.weight.any()
    assert trainer.precision == "64-true"
    assert not trainer._accelerator_connector.use_distributed_sampler


def test_documented_command_line_variants():
    cli = parse("base", "modified_localgd", extra=tuple(SEPARABLE))  # separable classification
    hp = cli.model.hparams
    assert (cli.datamodule.source, hp.task, hp.num_features) == ("separable", "binary", 50)
    assert cli.model.linear.weight.shape == (1, 50)
    cli = parse("base", extra=("--trainer.devices=1", "--trainer.strategy=auto"))  # the centralized reference
    assert type(cli.trainer.strategy) is SingleDeviceStrategy and cli.datamodule.num_shards == 2


def test_synthetic_shards_are_heterogeneous_overparameterized_and_separable():
    reg = LinearDataModule(source="regression", dim=200, samples_per_shard=10)
    (x0, _), (x1, _) = reg.shards(2)[0]
    assert x0.shape == (10, 200) and x0.dtype == F64
    torch.testing.assert_close(x0.norm(dim=1), torch.ones(10, dtype=F64))
    assert torch.linalg.matrix_rank(torch.cat([x0, x1])) == 20  # 20 rows in 200 dims: interpolable
    # each shard's extra variance sits on its own half of the coordinates
    assert x0[:, :100].pow(2).sum() > 2 * x0[:, 100:].pow(2).sum()
    assert x1[:, 100:].pow(2).sum() > 2 * x1[:, :100].pow(2).sum()
    assert torch.equal(reg.shards(2)[0][0][0], x0)  # deterministic

    sep = LinearDataModule(source="separable", dim=50, samples_per_shard=20, margin=0.1)
    shards, (xt, yt) = sep.shards(2)
    for _, y in shards:
        assert set(y.tolist()) == {-1.0, 1.0}  # both classes on every shard
    # one hyperplane through 0, the generator's first draw w*, separates all of it, train and test
    x_all = torch.cat([x for x, _ in shards] + [xt])
    y_all = torch.cat([y for _, y in shards] + [yt])
    g = torch.Generator().manual_seed(0)
    w_star = torch.randn(50, generator=g, dtype=F64)
    assert ((y_all * (x_all @ w_star)) > 0).all()


def test_feature_file_shards_follow_the_label_skew(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "features.npz"
    y = np.repeat(np.arange(10), 8)
    np.savez(path, x_train=rng.normal(size=(80, 6)), y_train=y, x_test=rng.normal(size=(20, 6)), y_test=y[:20])
    data = LinearDataModule(source="features", features_file=str(path), partition="classes", classes_per_rank=5)
    assert (data.task, data.num_features, data.num_outputs) == ("multiclass", 6, 10)
    (x0, y0), (_, y1) = data.shards(2)[0]
    assert set(y0.tolist()) == {0, 1, 2, 3, 4} and set(y1.tolist()) == {5, 6, 7, 8, 9}
    assert y0.dtype == torch.long and x0.dtype == F64 and len(y0) == len(y1) == 40
    with pytest.raises(ValueError, match="needs features_file"):
        LinearDataModule(source="features")


def test_losses_are_the_documented_formulas():
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=F64)  # with w = [0.3, −0.2] the scores are [−0.1, 0.35]
    expected = {
        "regression": (torch.tensor([1.0, 0.0], dtype=F64), 0.5 * (1.1**2 + 0.35**2) / 2),  # ½·mean((s − y)²)
        "binary": (torch.tensor([1.0, -1.0], dtype=F64), (math.log1p(math.exp(0.1)) + math.log1p(math.exp(0.35))) / 2),
    }
    for task, (y, value) in expected.items():
        model = LinearModel(2, 1, task, lr=0.1).double()
        with torch.no_grad():
            model.linear.weight.copy_(torch.tensor([[0.3, -0.2]], dtype=F64))
        torch.testing.assert_close(model.loss(model(x), y), torch.tensor(value, dtype=F64), rtol=0, atol=1e-15)
    model = LinearModel(2, 3, "multiclass").double()
    assert model(x).shape == (2, 3) and not model(x).any()  # zero weights: uniform softmax, loss log 3
    torch.testing.assert_close(model.loss(model(x), torch.tensor([0, 2])), torch.tensor(math.log(3.0), dtype=F64))
    with pytest.raises(ValueError, match="use task='multiclass'"):
        LinearModel(2, 3, "binary")


# ---------------------------------------------------------------------------------- a real 2-rank run
def simulate_rounds(shards, grad, lr: float, H: int, rounds: int, prox: float = 0.0, correction: bool = False):
    """Plain-torch Local-GD (prox = 0) or Modified Local-GD: the consensus after each round, from w = 0."""
    d = shards[0][0].shape[1]
    w = torch.zeros(d, dtype=F64)
    q = [torch.zeros(d, dtype=F64) for _ in shards]
    out = [w]
    for _ in range(rounds):
        local = []
        for i, (x, y) in enumerate(shards):
            z, v = w + q[i], w.clone()
            for _ in range(H):
                v = v - lr * (grad(v, x, y) + prox * (v - z))
            local.append(v)
            if correction:
                q[i] = z - v
        w = sum(local) / len(local)
        out.append(w)
    return torch.stack(out)


def least_squares_grad(w, x, y):
    return x.T @ (x @ w - y) / len(y)


def logistic_grad(w, x, y):
    return -(x * (y * torch.sigmoid(-y * (x @ w)))[:, None]).mean(0)


def regularized_logistic(shards, prox: float) -> torch.Tensor:
    """argmin_w mean_i f_i(w) + (prox/2)||w||² by L-BFGS (f_i: the mean logistic loss of shard i)."""
    w = torch.zeros(shards[0][0].shape[1], dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w],
        lr=1,
        max_iter=5000,
        history_size=50,
        tolerance_grad=1e-15,
        tolerance_change=1e-18,
        line_search_fn="strong_wolfe",
    )

    def objective():
        opt.zero_grad()
        loss = sum(F.softplus(-y * (x @ w)).mean() for x, y in shards) / len(shards) + prox / 2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(objective)
    assert w.grad.abs().max() < 1e-9
    return w.detach()


def test_two_rank_recipe_runs_reach_the_centralized_references():
    r"""``python -m recipes.linear fit`` with the repository's YAMLs on 2 gloo ranks, twice in one launch:

    1. base + localgd, H = 10, 600 steps (60 rounds): Local-GD on the overparameterized
       regression shards must reach the minimum-norm interpolator pinv(X)·y of all the data
       (Theorem 1 of seed 000). The benchmark's run of the same rounds: 1.2e-11 after 50 rounds.
    2. base + modified_localgd + SEPARABLE, H = 50, 2000 steps (40 rounds), prox 1e-3: the consensus
       must reach argmin mean_i f_i + (prox/2)||w||² (L-BFGS here). Simulation: 2.0e-5 after 40 rounds.

    Every sync of both runs must also equal the plain-torch simulation of the same rounds.
    """
    c = {n: str(CONFIGS / f"{n}.yaml") for n in ("base", "localgd", "modified_localgd")}
    runs = [
        [
            "--config",
            c["base"],
            "--config",
            c["localgd"],
            "--trainer.max_steps=600",
            "--trainer.callbacks.sync_every=10",
        ],
        [
            "--config",
            c["base"],
            "--config",
            c["modified_localgd"],
            *SEPARABLE,
            "--trainer.max_steps=2000",
            "--trainer.callbacks.sync_every=50",
        ],
    ]
    rank0, rank1 = run_ranks("tests.scenarios_linear:fit_recipe", world=2, timeout=120, runs=runs)
    for a, b in zip(rank0, rank1):
        assert torch.equal(a["final"], b["final"])  # every rank ends on the consensus
    regression, modified = rank0

    shards, _ = LinearDataModule(source="regression", dim=200, samples_per_shard=10).shards(2)
    x, y = torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards])
    w_min_norm = torch.linalg.pinv(x) @ y
    assert regression["steps"] == list(range(0, 601, 10)) and regression["num_syncs"] == 60
    err = float((regression["final"] - w_min_norm).norm() / w_min_norm.norm())
    assert err < 1e-10, err
    sim = simulate_rounds(shards, least_squares_grad, lr=4.0, H=10, rounds=60)
    assert (regression["weights"] - sim).norm(dim=1).max() < 1e-10 * w_min_norm.norm()
    # bytes: 60 syncs of 200 float64 values plus one "non-finite" flag per rank; ring factor 2(n−1)/n = 1
    assert regression["bytes"]["sync"] == 60 * 8 * (200 + 2)

    shards, _ = LinearDataModule(source="separable", dim=50, samples_per_shard=20).shards(2)
    w_reg = regularized_logistic(shards, prox=1e-3)
    assert modified["steps"] == list(range(0, 2001, 50))
    err = float((modified["final"] - w_reg).norm() / w_reg.norm())
    assert err < 1e-4, err
    sim = simulate_rounds(shards, logistic_grad, lr=4.0, H=50, rounds=40, prox=1e-3, correction=True)
    assert (modified["weights"] - sim).norm(dim=1).max() < 1e-9 * w_reg.norm()
