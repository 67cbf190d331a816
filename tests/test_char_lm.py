"""The char-level LM recipe: configs parse through LightningCLI, data shards and byte encoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_localsgd.algorithms.diloco import DiLoCo
from lightning_localsgd.asynchronous.optimizers import DelayedNesterov, OuterSGD
from lightning_localsgd.asynchronous.strategy import AsyncLocalSGDStrategy
from lightning_localsgd.trainer.strategy import LocalSGDStrategy
from recipes.char_lm import CharGPT, StdlibCorpusDataModule, decode, encode, main, shard, stdlib_corpus

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "char_lm"


def _cli(overlay: str, tmp_path: Path):
    return main(
        args=[
            "--config",
            str(CONFIGS / "base.yaml"),
            "--config",
            str(CONFIGS / overlay),
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        run=False,
        save_config_callback=None,
    )


def test_diloco_config_builds_localsgd_with_diloco(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["char_lm"])
    cli = _cli("diloco.yaml", tmp_path)
    assert type(cli.trainer.strategy) is LocalSGDStrategy
    (diloco,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, DiLoCo)]
    assert diloco.sync_every == 20
    assert isinstance(cli.model, CharGPT) and cli.model.hparams.d_model == 128
    assert 5e5 <= sum(p.numel() for p in cli.model.parameters()) <= 2e6  # 834,304


def test_diloco_fsdp_config_builds_sharded_replicas(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["char_lm"])
    cli = _cli("diloco_fsdp.yaml", tmp_path)
    strategy = cli.trainer.strategy
    assert type(strategy) is LocalSGDStrategy
    assert (strategy.within_node, strategy._fsdp_modules) == ("fsdp", ["Block"])
    (diloco,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, DiLoCo)]
    assert (diloco.sync_every, diloco.overlap_steps) == (16, 8)


@pytest.mark.parametrize(
    "overlay, outer_type, dylu",
    [
        ("async_nesterov.yaml", OuterSGD, False),
        ("async_dn.yaml", DelayedNesterov, False),
        ("async_dn_dylu.yaml", DelayedNesterov, True),
    ],
)
def test_async_configs_build_the_strategy_and_outer_optimizer(tmp_path, monkeypatch, overlay, outer_type, dylu):
    monkeypatch.setattr("sys.argv", ["char_lm"])
    cli = _cli(overlay, tmp_path)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, AsyncLocalSGDStrategy)
    assert (strategy.sync_every, strategy.dynamic_local_steps, strategy.max_updates) == (20, dylu, 80)
    opt = strategy.outer_optimizer
    assert type(opt) is outer_type and (opt.lr, opt.momentum) == (0.07 if outer_type is OuterSGD else 0.7, 0.9)
    if outer_type is OuterSGD:
        assert opt.nesterov
    else:
        assert (opt.buffer_size, opt.activation) == (None, 0.0)
    assert not any(isinstance(cb, DiLoCo) for cb in cli.trainer.callbacks)


def test_byte_encoding_round_trips():
    text = "def f(x):\n    return x ** 2  # é ✓"
    tokens = encode(text)
    assert tokens.dtype == torch.long and int(tokens.max()) < 256
    assert tokens[:4].tolist() == [100, 101, 102, 32]  # b"def "
    assert len(tokens) == len(text.encode("utf-8")) == 37
    assert decode(tokens) == text


def test_shards_are_equal_and_disjoint():
    assert shard(10, 0, 4) == [0, 4] and shard(10, 3, 4) == [3, 7]  # 10 // 4 = 2 each; windows 8, 9 unused
    shards = [set(shard(1003, r, 4)) for r in range(4)]
    assert [len(s) for s in shards] == [250] * 4
    assert len(set().union(*shards)) == 1000


def test_data_module_on_the_stdlib(tmp_path):
    data, files = stdlib_corpus(200_000)
    assert len(data) == 200_000 and files == sorted(files) and files[0].endswith(".py")
    assert stdlib_corpus(200_000)[0] == data  # deterministic
    sizes = []
    for rank in range(4):
        dm = StdlibCorpusDataModule(context=64, batch_size=8, max_bytes=200_000, val_fraction=0.1, max_val_windows=None)
        dm.prepare(rank, 4)
        assert len(dm.train_tokens) == 180_000 and len(dm.val_tokens) == 20_000
        sizes.append((len(dm.train_dataset()), len(dm.val_dataset()), len(dm.train_dataloader())))
        x, y = dm.train_dataset()[0]
        assert x.shape == y.shape == (64,) and torch.equal(x[1:], y[:-1])  # targets are the next bytes
        assert bytes(x.tolist()) == data[rank * 64 : rank * 64 + 64]  # window `rank` is rank's first
    # (180000 - 1) // 64 = 2812 windows -> 703 per rank; (20000 - 1) // 64 = 312 -> 78; 703 // 8 = 87 batches
    assert sizes == [(703, 78, 87)] * 4


def test_model_forward_and_loss_at_init():
    torch.manual_seed(0)
    model = CharGPT(n_layer=1, n_head=2, d_model=32, context=16)
    x = torch.randint(0, 256, (2, 16))
    assert model(x).shape == (2, 16, 256)
    y = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        loss = float(model.loss((x, y)))
    assert abs(loss - torch.log(torch.tensor(256.0)).item()) < 0.2  # near uniform at init: ln 256 = 5.545
