"""Small LightningModules, data and a recorder shared by the tests."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def whole(t: Tensor) -> Tensor:
    """``t`` itself, or a sharded DTensor gathered whole (collective: every rank of its mesh calls it alike)."""
    full = getattr(t, "full_tensor", None)
    return (full() if full is not None else t).detach()


def flat_params(module: nn.Module) -> Tensor:
    return torch.cat([whole(p).reshape(-1).clone() for p in module.parameters()])


class TinyNet(LightningModule):
    """A 2-layer tanh MLP regressor trained with SGD (optionally with momentum)."""

    def __init__(self, d_in: int = 5, hidden: int = 8, lr: float = 0.1, momentum: float = 0.0, batchnorm: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(d_in, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.Tanh(), nn.Linear(hidden, 1)]
        self.net = nn.Sequential(*layers)
        self.lr, self.momentum = lr, momentum
        self.val_params: list[Tensor] = []
        self.seen: list[float] = []  # sum of each training batch's inputs, to check the data order

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self.seen.append(float(x.sum()))
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.val_params.append(flat_params(self))
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class LeastSquares(LightningModule):
    """x ↦ w·x without bias, w starts at zero, loss = mean squared error / 2; plain SGD."""

    def __init__(self, d: int, lr: float):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return 0.5 * ((x @ self.w - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class FixedBatches(torch.utils.data.IterableDataset):
    """Yields the same full batch ``steps`` times (full-batch gradient descent on one shard)."""

    def __init__(self, x: Tensor, y: Tensor, steps: int):
        self.x, self.y, self.steps = x, y, steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.x, self.y

    def __len__(self) -> int:
        return self.steps


def regression_data(n: int = 32, d: int = 5, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1)) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return TensorDataset(x, y)


def loader(ds: TensorDataset, batch_size: int = 4, shuffle: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


class Recorder(Callback):
    """Records the flat parameters after every optimizer step (after any sync)."""

    def __init__(self) -> None:
        self.after: list[Tensor] = []
        self.before_update: list[tuple[Tensor, Tensor]] = []  # (params, grads) right before the update
        self.buffers_before: list[dict[str, Tensor]] = []  # buffers after the forward, before any sync
        self.buffers_after: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        params = list(pl_module.parameters())
        self.before_update.append(
            (flat_params(pl_module), torch.cat([whole(p.grad).reshape(-1).clone() for p in params]))
        )
        self.buffers_before.append({k: b.detach().clone() for k, b in pl_module.named_buffers()})

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.after.append(flat_params(pl_module))
        self.buffers_after.append({k: b.detach().clone() for k, b in pl_module.named_buffers()})


def trainer_kwargs(devices: int, num_nodes: int, **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision="64-true",
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs
