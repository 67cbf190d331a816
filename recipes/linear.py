"""Linear models trained by full-batch GD on per-rank heterogeneous shards: the seed-000 setting.

Zhu, Vardhan, Mazumdar, "Distributed Gradient Descent with Many Local Steps in Overparameterized
Models" (arXiv 2412.07971): Local-GD on linear models, from zero, with plain GD on every worker's
whole shard. Every rank's loss is the *mean* over its shard and the shards are equally large, so
the global objective is ``f = mean_i f_i``, the loss of one process holding all the data.

    python -m recipes.linear fit --config configs/linear/base.yaml --config configs/linear/localgd.yaml
    python -m recipes.linear fit --config configs/linear/base.yaml --config configs/linear/modified_localgd.yaml \
        --data.source=separable --data.dim=50 --data.samples_per_shard=20
    python -m recipes.linear fit --config configs/linear/base.yaml --trainer.devices=1 --trainer.strategy=auto

``LinearModel`` takes its shape and loss from the data (``num_features``, ``num_outputs`` and
``task`` are linked by :class:`LinearCLI`). ``LinearDataModule`` makes or loads the data and gives
each rank its own shard, so ``trainer.use_distributed_sampler`` must be ``false``. The last line
above is the centralized reference: one process holding both shards. :class:`Trajectory` records
the consensus at every sync (``benchmarks/local_gd_implicit_bias.py`` uses it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

import lightning_localsgd  # noqa: F401  (registers the strategy names)

Task = Literal["regression", "binary", "multiclass"]
Source = Literal["regression", "separable", "features"]


class LinearModel(LightningModule):
    """``x ↦ W x`` (no bias unless asked), weights start at zero, plain SGD on the loss of ``task``.

    * ``"regression"``: ``½·mean((w·x − y)²)``;
    * ``"binary"``: logistic loss ``mean(log(1 + exp(−y·w·x)))`` with labels ``y ∈ {−1, +1}``;
    * ``"multiclass"``: cross-entropy of ``W x`` with integer labels (``W`` is ``num_outputs × d``).

    Args:
        num_features: d (LinearCLI links it from the data).
        num_outputs: 1 for regression and binary, the number of classes for multiclass (linked).
        task: the loss (linked from the data).
        lr: the SGD step size; with full batches every step is one step of gradient descent.
        bias: add a bias (also starting at zero). The implicit-bias results assume none.
    """

    def __init__(
        self, num_features: int, num_outputs: int = 1, task: Task = "regression", lr: float = 1.0, bias: bool = False
    ) -> None:
        super().__init__()
        if task not in ("regression", "binary", "multiclass"):
            raise ValueError(f"task must be 'regression', 'binary' or 'multiclass', got {task!r}")
        if task != "multiclass" and num_outputs != 1:
            raise ValueError(f"task={task!r} has one output, got num_outputs={num_outputs}: use task='multiclass'")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.save_hyperparameters()
        self.linear = nn.Linear(num_features, num_outputs, bias=bias)
        with torch.no_grad():
            for p in self.linear.parameters():
                p.zero_()

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear(x)
        return out if self.hparams.task == "multiclass" else out.squeeze(-1)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        task = self.hparams.task
        if task == "regression":
            return 0.5 * (out - y).pow(2).mean()
        if task == "binary":
            return F.softplus(-y * out).mean()
        return F.cross_entropy(out, y)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self._last_loss = loss.detach()
        return loss

    @override
    def on_train_epoch_end(self) -> None:
        # Once per epoch, not per step: self.log costs more than a whole step of a small linear model.
        self.log("train/loss", self._last_loss)  # this rank's shard, at the epoch's last step

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # Every rank evaluates the whole test set on the consensus model: the values agree.
        x, y = batch
        out = self(x)
        self.log("val/loss", self.loss(out, y), sync_dist=True)
        if self.hparams.task != "regression":
            pred = out.argmax(-1) if self.hparams.task == "multiclass" else torch.where(out >= 0, 1.0, -1.0)
            self.log("val/acc", (pred == y).to(out.dtype).mean(), sync_dist=True)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class FullBatch(Dataset):
    """``repeats`` items, each the whole ``(x, y)``: one epoch is ``repeats`` steps of full-batch GD."""

    def __init__(self, x: Tensor, y: Tensor, repeats: int) -> None:
        self.x, self.y, self.repeats = x, y, repeats

    def __len__(self) -> int:
        return self.repeats

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x, self.y


def gaussian_shard(g: torch.Generator, n: int, dim: int, block: slice, shift: float, skew: float) -> Tensor:
    """``n`` rows ``0.5·z + μ + skew·z_block``, unit norm: a shard mean ``μ ~ shift·N(0, I)`` and extra
    variance on the shard's own block of coordinates (so the shards' row spaces differ)."""
    mu = shift * torch.randn(dim, generator=g, dtype=torch.float64)
    x = 0.5 * torch.randn(n, dim, generator=g, dtype=torch.float64) + mu
    x[:, block] += skew * torch.randn(n, block.stop - block.start, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


class LinearDataModule(LightningDataModule):
    """Per-shard data for linear models; rank r trains on shards ``r, r + world, ...`` (full batch).

    ``source``:

    * ``"regression"``: overparameterized least squares. Shard i's rows come from
      :func:`gaussian_shard` (its own mean and its own block of ``dim / num_shards`` strong
      coordinates) and its targets from its own teacher: ``y = x·w_i + noise·N(0, 1)``.
    * ``"separable"``: binary labels ``sign(x·w*)`` of one hyperplane through the origin shared by
      all shards; shard i's rows as above, with the mean orthogonal to ``w*`` so every shard holds
      both classes, then pushed ``margin`` away from the hyperplane (a margin of about ``margin``).
    * ``"features"``: precomputed features from ``features_file`` (``.npz`` with ``x_train``,
      ``y_train``, ``x_test``, ``y_test``), split into shards by ``partition`` (label skew with
      ``"classes"`` or ``"dirichlet"``; :func:`recipes.partition.partition`, equal shard sizes).
      Integer labels give ``task="multiclass"``, float labels ``"regression"``.

    The data are the same for any world size: ``num_shards=2`` on one process trains the
    centralized model on all of it. Every test set is held out from the same distributions.

    Args:
        source: see above.
        dim: d of the synthetic data.
        samples_per_shard: training rows per synthetic shard (overparameterized: total < d).
        test_samples_per_shard: held-out rows per synthetic shard.
        num_shards: shards of the data (default: the world size); a multiple of the world size.
        shift: scale of each shard's mean offset (synthetic).
        skew: extra standard deviation on each shard's own coordinate block (synthetic).
        noise: target noise of ``"regression"``.
        margin: how far ``"separable"`` points are pushed from the true hyperplane before normalizing.
        features_file: the ``.npz`` of ``source="features"``.
        partition: ``"iid"``, ``"dirichlet"`` or ``"classes"`` for ``"features"``.
        alpha: Dirichlet concentration (small: strong label skew).
        classes_per_rank: classes in each shard for ``partition="classes"``.
        steps_per_epoch: full-batch steps per epoch (validation runs at epoch ends).
        seed: of the synthetic data and of the partition.
    """

    def __init__(
        self,
        source: Source = "regression",
        dim: int = 200,
        samples_per_shard: int = 10,
        test_samples_per_shard: int = 100,
        num_shards: int | None = None,
        shift: float = 0.3,
        skew: float = 1.5,
        noise: float = 0.1,
        margin: float = 0.1,
        features_file: str | None = None,
        partition: Literal["iid", "dirichlet", "classes"] = "classes",
        alpha: float = 0.5,
        classes_per_rank: int = 5,
        steps_per_epoch: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if source not in ("regression", "separable", "features"):
            raise ValueError(f"source must be 'regression', 'separable' or 'features', got {source!r}")
        if (source == "features") != (features_file is not None):
            raise ValueError(
                "source='features' needs features_file (an .npz), and features_file needs source='features'"
            )
        if source == "features" and not Path(features_file).expanduser().is_file():
            raise FileNotFoundError(f"features_file {features_file!r} does not exist")
        if num_shards is not None and num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.source, self.dim, self.samples_per_shard = source, dim, samples_per_shard
        self.test_samples_per_shard, self.num_shards = test_samples_per_shard, num_shards
        self.shift, self.skew, self.noise, self.margin = shift, skew, noise, margin
        self.features_file = None if features_file is None else str(Path(features_file).expanduser())
        self.partition, self.alpha, self.classes_per_rank = partition, alpha, classes_per_rank
        self.steps_per_epoch, self.seed = steps_per_epoch, seed
        self.train_xy: tuple[Tensor, Tensor] | None = None  # this rank's shards, concatenated
        self.test_xy: tuple[Tensor, Tensor] | None = None
        self._file: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ what the model links to
    def _arrays(self) -> dict[str, np.ndarray]:
        if self._file is None:
            with np.load(self.features_file) as f:
                self._file = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        return self._file

    @property
    def task(self) -> Task:
        if self.source == "regression":
            return "regression"
        if self.source == "separable":
            return "binary"
        y = self._arrays()["y_train"]
        return "multiclass" if np.issubdtype(y.dtype, np.integer) else "regression"

    @property
    def num_features(self) -> int:
        return self.dim if self.source != "features" else int(self._arrays()["x_train"].shape[1])

    @property
    def num_outputs(self) -> int:
        return int(self._arrays()["y_train"].max()) + 1 if self.task == "multiclass" else 1

    # ------------------------------------------------------------------ the data
    def shards(self, num_shards: int) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
        """``([(x_i, y_i) for every shard], (x_test, y_test))``, identical for any world size."""
        if self.source == "features":
            return self._feature_shards(num_shards)
        g = torch.Generator().manual_seed(self.seed)
        d, m, m_test = self.dim, self.samples_per_shard, self.test_samples_per_shard
        w_star = torch.randn(d, generator=g, dtype=torch.float64)
        w_star /= w_star.norm()
        width = d // num_shards
        train, tx, ty = [], [], []
        for i in range(num_shards):
            x = gaussian_shard(g, m + m_test, d, slice(i * width, (i + 1) * width), self.shift, self.skew)
            if self.source == "regression":
                teacher = torch.randn(d, generator=g, dtype=torch.float64)
                y = x @ teacher + self.noise * torch.randn(m + m_test, generator=g, dtype=torch.float64)
            else:
                x = x - (x.mean(0) @ w_star) * w_star  # the shard's mean off the hyperplane's normal: both classes
                y = torch.where(x @ w_star >= 0, 1.0, -1.0).to(torch.float64)
                x = x + self.margin * y[:, None] * w_star
                x = x / x.norm(dim=1, keepdim=True)
            train.append((x[:m], y[:m]))
            tx.append(x[m:])
            ty.append(y[m:])
        return train, (torch.cat(tx), torch.cat(ty))

    def _feature_shards(self, num_shards: int) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
        from .partition import partition

        a = self._arrays()
        x, y = torch.from_numpy(a["x_train"]).double(), torch.from_numpy(a["y_train"])
        y = y.long() if self.task == "multiclass" else y.double()
        parts = partition(
            a["y_train"],
            num_shards,
            self.partition,
            alpha=self.alpha,
            classes_per_rank=self.classes_per_rank,
            seed=self.seed,
        )
        test_y = torch.from_numpy(a["y_test"])
        test_y = test_y.long() if self.task == "multiclass" else test_y.double()
        return [(x[idx], y[idx]) for idx in parts], (torch.from_numpy(a["x_test"]).double(), test_y)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        # Lightning would cut our shard again with a DistributedSampler (the flag has no public getter).
        if trainer.world_size > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError(
                "LinearDataModule gives every rank its own shard: set Trainer(use_distributed_sampler=False) "
                "(trainer.use_distributed_sampler: false in YAML)"
            )
        return trainer.global_rank, trainer.world_size

    @override
    def setup(self, stage: str) -> None:
        if self.train_xy is not None:
            return
        rank, world = self._rank_world()
        num_shards = self.num_shards or world
        if num_shards % world:
            raise ValueError(
                f"num_shards={num_shards} is not a multiple of the world size {world}: every rank "
                "needs as many shards (e.g. num_shards: null for one shard per rank)"
            )
        train, self.test_xy = self.shards(num_shards)
        mine = train[rank::world]
        self.train_xy = (torch.cat([x for x, _ in mine]), torch.cat([y for _, y in mine]))

    @override
    def train_dataloader(self) -> DataLoader:
        assert self.train_xy is not None, "call setup() first"
        return DataLoader(FullBatch(*self.train_xy, self.steps_per_epoch), batch_size=None)

    @override
    def val_dataloader(self) -> DataLoader:
        assert self.test_xy is not None, "call setup() first"
        return DataLoader(FullBatch(*self.test_xy, 1), batch_size=None)


class Trajectory(Callback):
    """Keeps the model's flat weights at step 0, at every synchronization of the consensus
    algorithm (or every ``every`` steps) and at the end of ``fit``; rank 0 saves them to ``path``.

    At a sync every replica holds the consensus, so ``weights[k]`` is the global model after
    ``steps[k]`` optimizer steps. The end-of-fit record is the consensus the strategy leaves.

    Args:
        every: record every this many steps instead of at syncs (needed without a consensus
            algorithm, e.g. one process or DDP).
        path: a ``torch.save`` file of ``{"steps": [...], "weights": (K, P) tensor}`` (rank 0).
    """

    def __init__(self, every: int | None = None, path: str | None = None) -> None:
        if every is not None and every < 1:
            raise ValueError(f"every must be >= 1 or null (at every sync), got {every}")
        self.every, self.path = every, path
        self.steps: list[int] = []
        self.weights: list[Tensor] = []

    def _record(self, step: int, module: LightningModule) -> None:
        self.steps.append(step)
        self.weights.append(torch.cat([p.detach().reshape(-1) for p in module.parameters()]).cpu().clone())

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.steps, self.weights = [], []
        self._algorithm = getattr(trainer.strategy, "algorithm", None)
        if self.every is None and self._algorithm is None:
            raise ValueError(
                "Trajectory(every=None) records at syncs, and this run has no consensus algorithm: give every=N (steps)"
            )
        self._record(trainer.global_step, pl_module)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        due = step % self.every == 0 if self.every else self._algorithm.last_sync_step == step
        if due:
            self._record(step, pl_module)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.steps and self.steps[-1] != trainer.global_step:  # a partial round, closed by the strategy
            self._record(trainer.global_step, pl_module)
        if self.path is not None and trainer.is_global_zero:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"steps": self.steps, "weights": torch.stack(self.weights)}, self.path)


class LinearCLI(LightningCLI):
    """LightningCLI over :class:`LinearModel` and :class:`LinearDataModule`; the data decide the model's shape."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("num_features", "num_outputs", "task"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")


def main(args: list[str] | None = None, run: bool = True, **cli_kwargs: Any) -> LinearCLI:
    """``python -m recipes.linear fit --config ...``; ``args`` instead of ``sys.argv`` for tests."""
    cli_kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return LinearCLI(LinearModel, LinearDataModule, args=args, run=run, **cli_kwargs)


if __name__ == "__main__":
    main()
