"""Every YAML under configs/ parses through its recipe's LightningCLI (run=False), so none rots.

``configs/<recipe>/`` holds a ``base.yaml`` and overlays that add a strategy/callbacks block; every
overlay is parsed on top of its base by the CLI of ``recipes.<recipe>`` (``main(args, run)``; the
image-classification recipe's CLI is ``recipes.cli.cli``), and the objects the known overlays
build are checked.
"""

import importlib
import re
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.strategies import DDPStrategy

from lightning_localsgd import LocalSGDStrategy, PeriodicAveraging
from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from recipes.cli import cli as recipe_cli
from recipes.data import DigitsDataModule
from recipes.image_classification import ImageClassifier

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OVERLAYS = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.name != "base.yaml")
IMAGE = CONFIGS / "image_classification"


def cli_for(recipe: str):
    """The recipe's ``(args, run) -> LightningCLI`` factory."""
    if recipe == "image_classification":
        return recipe_cli
    return importlib.import_module(f"recipes.{recipe}").main


def parse(*files: Path, tmp_path: Path):
    # accelerator=cpu keeps the test independent of the machine; nothing else is overridden.
    args = [a for f in files for a in ("--config", str(f))]
    args += ["--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}"]
    return cli_for(files[0].parent.name)(args, run=False)


def algorithm(cli):
    (algo,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ConsensusAlgorithm)]
    return algo


def test_every_config_the_docs_name_is_one_that_parses_here():
    root = CONFIGS.parent
    named = set()
    for doc in [root / "README.md", *sorted((root / "docs").rglob("*.md")), root / "benchmarks" / "README.md"]:
        named |= set(re.findall(r"configs/[\w/]+\.yaml", doc.read_text()))
    assert len(named) >= 5, named  # the docs do point at configs
    on_disk = {str(p.relative_to(root)) for p in CONFIGS.glob("*/*.yaml")}
    assert named <= on_disk, f"docs name configs that do not exist: {sorted(named - on_disk)}"
    for recipe in {p.parent for p in OVERLAYS}:  # every overlay has the base it is parsed on top of
        assert str((recipe / "base.yaml").relative_to(root)) in on_disk


@pytest.mark.parametrize("base", sorted(CONFIGS.glob("*/base.yaml")), ids=lambda p: p.parent.name)
def test_base_alone_parses(base, tmp_path):
    """Every model and data value the base file sets reaches the objects the CLI builds."""
    cli = parse(base, tmp_path=tmp_path)
    cfg = yaml.safe_load(base.read_text())
    model = cfg["model"].get("init_args", cfg["model"])
    assert {k: cli.model.hparams[k] for k in model} == model
    data = cfg["data"].get("init_args", cfg["data"])
    assert {k: getattr(cli.datamodule, k) for k in data} == data
    assert cli.trainer.max_steps == cfg["trainer"]["max_steps"]
    assert cli.trainer.num_devices == cfg["trainer"]["devices"]


def test_image_classification_base(tmp_path):
    cli = parse(IMAGE / "base.yaml", tmp_path=tmp_path)
    assert isinstance(cli.model, ImageClassifier) and isinstance(cli.datamodule, DigitsDataModule)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 10  # linked from the data
    assert cli.model.net.get_classifier().out_features == 10
    assert cli.datamodule.batch_size == 8 and cli.datamodule.partition == "iid"
    assert cli.trainer.max_steps == 352 and cli.trainer.val_check_interval == 8
    assert cli.trainer._accelerator_connector.use_distributed_sampler is False


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_overlay_parses_on_its_base(overlay, tmp_path):
    block = yaml.safe_load(overlay.read_text())
    if overlay.parent == IMAGE:
        assert set(block) == {"trainer"}, "an overlay only adds a trainer strategy/callbacks block"
        assert set(block["trainer"]) <= {"strategy", "callbacks", "callbacks+"}
    cli = parse(overlay.parent / "base.yaml", overlay, tmp_path=tmp_path)
    strategy = cli.trainer.strategy
    named = block.get("trainer", {}).get("strategy")
    if named == "ddp":
        assert type(strategy) is DDPStrategy
        assert not any(isinstance(cb, ConsensusAlgorithm) for cb in cli.trainer.callbacks)
    elif isinstance(named, str) and named.startswith("localsgd"):
        assert isinstance(strategy, LocalSGDStrategy)
    # every callback class named in the overlay was built, in order, after the base's callbacks
    wanted = [cb["class_path"].rsplit(".", 1)[1] for cb in block.get("trainer", {}).get("callbacks+", [])]
    built = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert [n for n in built if n in wanted] == wanted


def test_known_overlays_values(tmp_path):
    d = IMAGE
    base = d / "base.yaml"

    algo = algorithm(parse(base, d / "localsgd.yaml", tmp_path=tmp_path))
    assert type(algo) is PeriodicAveraging and algo.sync_every == 8 and algo.buffers == "average"

    cli = parse(base, d / "localsgd_bf16.yaml", tmp_path=tmp_path)
    assert cli.trainer.strategy.comm.comm_dtype is torch.bfloat16
    assert algorithm(cli).sync_every == 8

    cli = parse(base, d / "localsgd_groups.yaml", tmp_path=tmp_path)
    assert cli.trainer.strategy.within_node == "ddp"
    assert (algorithm(cli).sync_every, algorithm(cli).overlap_steps) == (8, 7)

    cli = parse(base, d / "localsgd_auto.yaml", tmp_path=tmp_path)  # YAML's `auto` reaches the tuner
    algo = algorithm(cli)
    assert algo.auto == {"sync_every", "overlap_steps", "fragments"} and algo.awaiting_tune
    assert cli.trainer.strategy._tuner.tune_format and cli.trainer.strategy.comm.comm_dtype is None

    algo = algorithm(parse(base, d / "diloco.yaml", tmp_path=tmp_path))
    assert type(algo).__name__ == "DiLoCo" and algo.sync_every == 8
    outer = algo.outer_factory([torch.zeros(1, requires_grad=True)])  # the default outer SGD from the YAML values
    assert type(outer) is torch.optim.SGD
    assert (outer.defaults["lr"], outer.defaults["momentum"], outer.defaults["nesterov"]) == (0.7, 0.5, True)


def test_command_line_overrides_the_overlay(tmp_path):
    d = IMAGE
    cli = recipe_cli(
        [
            "--config",
            str(d / "base.yaml"),
            "--config",
            str(d / "localsgd.yaml"),
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.partition=dirichlet",
            "--data.alpha=0.1",
            "--model.model_name=test_resnet",
            "--model.freeze_backbone=true",
        ],
        run=False,
    )
    assert cli.datamodule.partition == "dirichlet" and cli.datamodule.alpha == 0.1
    trainable = [n for n, p in cli.model.net.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("fc.", "head")) for n in trainable), trainable
