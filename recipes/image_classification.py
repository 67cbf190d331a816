"""Fine-tune a timm image classifier: the model, the optimizer and the schedule all built by name.

Run it through LightningCLI (see ``configs/image_classification/``)::

    lightning-localsgd fit --config configs/image_classification/base.yaml \
        --config configs/image_classification/localsgd.yaml
    python -m recipes.cli fit --config ...                     # the same
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from lightning.pytorch import LightningModule
from timm.optim import create_optimizer_v2
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override


class ImageClassifier(LightningModule):
    """A timm network (``timm.create_model(model_name)``) trained with cross-entropy.

    Example::

        model = ImageClassifier("resnet18", num_classes=10, pretrained_file="resnet18_mnist.pth", lr=0.05)

    Args:
        model_name: any ``timm.list_models()`` name, e.g. ``"resnet18"``, ``"convnext_atto"``.
        num_classes: classes of this task (LightningCLI links it from the data module).
        pretrained: ``True`` downloads the hub weights of ``model_name`` (needs internet).
        pretrained_file: a local ``state_dict`` file (``.pth``/``.safetensors``) of ``model_name``
            with any number of classes: timm loads it with a fresh classifier head for
            ``num_classes`` (``pretrained_cfg_overlay=dict(file=...)``). Works offline.
        freeze_backbone: train only the classifier head (the backbone's BatchNorm statistics are
            frozen too).
        optimizer: a ``timm.optim.list_optimizers()`` name: ``"sgd"``, ``"adamw"``, ``"lamb"``, ...
        lr: peak learning rate (after warm-up).
        weight_decay: decoupled from biases and norm weights (timm's ``filter_bias_and_bn``).
        momentum: for the optimizers that take one.
        layer_decay: layer-wise lr decay: the layer ``d`` blocks below the head gets
            ``lr · layer_decay^d`` (timm's ``group_matcher``); ``None`` for a single lr.
        scheduler: ``"cosine"`` (to zero over the run) or ``"constant"``, stepped per optimizer step.
        warmup_steps: linear warm-up from 0 over this many optimizer steps.
        label_smoothing: of the cross-entropy loss.
        model_kwargs: extra ``timm.create_model`` arguments, e.g. ``{"drop_rate": 0.1}``.
    """

    def __init__(
        self,
        model_name: str = "resnet18",
        num_classes: int = 10,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        freeze_backbone: bool = False,
        optimizer: str = "sgd",
        lr: float = 0.05,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        layer_decay: float | None = None,
        scheduler: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0,
        label_smoothing: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if pretrained and pretrained_file is not None:
            raise ValueError(
                "pretrained=True downloads hub weights and pretrained_file loads a local file: give one of them"
            )
        if pretrained_file is not None and not Path(pretrained_file).expanduser().is_file():
            raise FileNotFoundError(
                f"pretrained_file {pretrained_file!r} does not exist: run `python -m recipes.demo` to create "
                "one, or set pretrained: true to download hub weights"
            )
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], e.g. 0.75, or null for one lr; got {layer_decay}")
        if scheduler not in ("cosine", "constant"):
            raise ValueError(f"scheduler must be 'cosine' or 'constant', got {scheduler!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.save_hyperparameters()
        kwargs = dict(model_kwargs or {})
        if pretrained_file is not None:
            # timm drops the file's classifier when num_classes differs from the pretrained config's.
            kwargs["pretrained_cfg_overlay"] = dict(file=str(Path(pretrained_file).expanduser()))
        self.net = timm.create_model(
            model_name, pretrained=pretrained or pretrained_file is not None, num_classes=num_classes, **kwargs
        )
        if freeze_backbone:
            head = {id(p) for p in self.net.get_classifier().parameters()}
            for p in self.net.parameters():
                p.requires_grad_(id(p) in head)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_loss = MeanMetric()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss = MeanMetric()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @override
    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if mode and self.hparams.freeze_backbone:
            # Lightning calls train() after every validation: keep the frozen backbone's BatchNorm in eval.
            self.net.eval()
            self.net.get_classifier().train()
        return self

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        self.train_acc(logits, y)
        self.train_loss.update(loss.detach(), weight=len(y))
        # The per-step loss is this rank's own: sync_dist here would add a collective (and a barrier)
        # to every step, which is exactly what local SGD avoids. The epoch means are summed over ranks once.
        self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        # torchmetrics sum correct/total and loss over all ranks at compute: exact with unequal val shards
        self.val_loss.update(self.loss_fn(logits, y), weight=len(y))
        self.val_acc(logits, y)
        self.log("val/loss", self.val_loss, prog_bar=False)
        self.log("val/acc", self.val_acc, prog_bar=True)

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = create_optimizer_v2(
            self.net,
            opt=hp.optimizer,
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            momentum=hp.momentum,
            layer_decay=hp.layer_decay,
        )
        for group in optimizer.param_groups:
            # timm stores layer decay as "lr_scale", which only timm's schedulers apply: apply it here
            # so the torch scheduler below scales each group's own base lr.
            group["lr"] = group["lr"] * group.pop("lr_scale", 1.0)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = lr_factor_fn(hp.scheduler, hp.warmup_steps, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_factor_fn(scheduler: str, warmup_steps: int, total_steps: int):
    """The multiplier of the peak lr after ``step`` optimizer steps: linear warm-up, then cosine or flat."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
