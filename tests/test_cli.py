"""The strategy and algorithms as LightningCLI users write them: a string, or class_path YAML."""

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_localsgd import LocalSGDStrategy, PeriodicAveraging
from tests.models import TinyNet


def cli(tmp_path, yaml_text):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml_text)
    return LightningCLI(TinyNet, run=False, args=["--config", str(cfg)], save_config_callback=None)


def test_strategy_by_registered_name(tmp_path):
    c = cli(tmp_path, "trainer:\n  strategy: localsgd\n  accelerator: cpu\n  devices: 2\n")
    assert isinstance(c.trainer.strategy, LocalSGDStrategy)
    c = cli(tmp_path, "trainer:\n  strategy: localsgd_bf16\n  accelerator: cpu\n  devices: 2\n")
    assert c.trainer.strategy.comm.comm_dtype is torch.bfloat16


def test_strategy_and_algorithm_by_class_path(tmp_path):
    c = cli(
        tmp_path,
        """
trainer:
  accelerator: cpu
  devices: 2
  strategy:
    class_path: lightning_localsgd.LocalSGDStrategy
    init_args:
      comm_dtype: bfloat16
      bucket_mb: 64
  callbacks:
    - class_path: lightning_localsgd.PeriodicAveraging
      init_args:
        sync_every: 16
        warmup_steps: 100
        buffers: broadcast
""",
    )
    strategy = c.trainer.strategy
    assert isinstance(strategy, LocalSGDStrategy)
    assert strategy.comm.comm_dtype is torch.bfloat16 and strategy.comm.bucket_mb == 64
    (algo,) = [cb for cb in c.trainer.callbacks if isinstance(cb, PeriodicAveraging)]
    assert (algo.sync_every, algo.warmup_steps, algo.buffers) == (16, 100, "broadcast")


def test_bad_yaml_value_is_reported_with_the_algorithms_own_message(tmp_path):
    with pytest.raises(ValueError, match="sync_every must be an integer >= 1, got 0"):
        cli(
            tmp_path,
            "trainer:\n  callbacks:\n    - class_path: lightning_localsgd.PeriodicAveraging\n"
            "      init_args:\n        sync_every: 0\n",
        )
    with pytest.raises(ValueError, match=r"overlap_steps=8 must be smaller than sync_every=8"):
        cli(
            tmp_path,
            "trainer:\n  callbacks:\n    - class_path: lightning_localsgd.DiLoCo\n"
            "      init_args:\n        sync_every: 8\n        overlap_steps: 8\n",
        )
