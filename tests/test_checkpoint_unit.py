"""Checkpoint contents and the documented fallback when the world size changes (one process)."""

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_localsgd import LocalSGDStrategy, PeriodicAveraging
from tests.models import Recorder, TinyNet, flat_params, loader, regression_data, trainer_kwargs


def fit(tmp_path, max_steps, ckpt_path=None, save=False):
    model = TinyNet(momentum=0.9).double()
    rec = Recorder()
    trainer = Trainer(
        strategy=LocalSGDStrategy(),
        callbacks=[rec, PeriodicAveraging(sync_every=3)],
        max_steps=max_steps,
        **trainer_kwargs(1, 1, default_root_dir=tmp_path),
    )
    trainer.fit(model, loader(regression_data(8)), ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(tmp_path / "one_rank.ckpt")
    return model, rec


@pytest.mark.filterwarnings("ignore:.*nothing to synchronize.*")
def test_resume_on_a_different_world_size_starts_every_rank_from_the_consensus(tmp_path):
    fit(tmp_path, 2, save=True)
    ckpt = torch.load(tmp_path / "one_rank.ckpt", weights_only=False)
    assert ckpt["localsgd"]["world_size"] == 1 and len(ckpt["localsgd"]["ranks"]) == 1
    # Pretend two ranks wrote it: two different replicas, the consensus as the model.
    mine = ckpt["localsgd"]["ranks"][0]
    other = {k: v + 1.0 for k, v in mine["model"].items()}
    ckpt["localsgd"] = {"world_size": 2, "ranks": [mine, dict(mine, model=other)]}
    ckpt["state_dict"] = {k: v + 0.5 for k, v in mine["model"].items()}
    torch.save(ckpt, tmp_path / "two_ranks.ckpt")

    with pytest.warns(UserWarning, match="replicas of 2 ranks but this run has 1"):
        model, rec = fit(tmp_path, 3, ckpt_path=tmp_path / "two_ranks.ckpt")
    expected = torch.cat([v.reshape(-1) for k, v in ckpt["state_dict"].items() if "net" in k])
    assert torch.equal(rec.before_update[0][0], expected)  # the consensus, not rank 0's replica
    # rank 0's inner optimizer state came along (momentum buffer of the first weight)
    opt_state = model.trainer.optimizers[0].state_dict()["state"][0]["momentum_buffer"]
    assert opt_state.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:.*nothing to synchronize.*")
def test_same_world_size_resume_loads_the_rank_replica(tmp_path):
    fit(tmp_path, 2, save=True)
    ckpt = torch.load(tmp_path / "one_rank.ckpt", weights_only=False)
    ckpt["localsgd"]["ranks"][0]["model"] = {k: v + 0.25 for k, v in ckpt["localsgd"]["ranks"][0]["model"].items()}
    torch.save(ckpt, tmp_path / "edited.ckpt")
    model, rec = fit(tmp_path, 3, ckpt_path=tmp_path / "edited.ckpt")
    replica = torch.cat([v.reshape(-1) for v in ckpt["localsgd"]["ranks"][0]["model"].values()])
    assert torch.equal(rec.before_update[0][0], replica)
    assert not torch.equal(flat_params(model), replica)  # and training went on from it
