"""``lightning-localsgd``: the recipes' command line (LightningCLI).

Usage::

    lightning-localsgd fit --config configs/image_classification/base.yaml \
        --config configs/image_classification/localsgd.yaml [--trainer.devices 4 ...]
    python -m recipes.cli fit --config ...                   # the same without installing the script
    lightning-localsgd fit --config base.yaml --print_config  # the merged configuration

The model is :class:`~recipes.image_classification.ImageClassifier`; the data is any
:class:`~recipes.data.PartitionedDataModule` subclass given by ``class_path``. ``model.num_classes``
follows the data module. Importing :mod:`lightning_localsgd` registers the strategy names
``localsgd``, ``localsgd_spawn`` and ``localsgd_bf16``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import lightning_localsgd  # noqa: F401  (registers the strategy names)

from .data import PartitionedDataModule
from .image_classification import ImageClassifier


class RecipeCLI(LightningCLI):
    """LightningCLI over :class:`ImageClassifier` and the partitioned data modules."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def cli(args: list[str] | None = None, run: bool = True) -> RecipeCLI:
    """Build (and with ``run=True`` run) the CLI; ``args`` instead of ``sys.argv``, e.g. in tests."""
    return RecipeCLI(
        ImageClassifier,
        PartitionedDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def main() -> None:
    """The console entry point ``lightning-localsgd`` (returns nothing: its value becomes the exit code)."""
    cli()


if __name__ == "__main__":
    main()
