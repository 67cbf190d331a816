"""Checkpoint contents and the documented fallback when the world size changes (one process)."""

import copy

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_localsgd import LocalSGDStrategy, PeriodicAveraging
from lightning_localsgd.resume import part_path, read_parts
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
    parts = read_parts(tmp_path / "one_rank.ckpt")
    assert ckpt["localsgd"] == {"world_size": 1, "step": 2} and len(parts) == 1
    # Pretend two ranks wrote it (in the layout before 0.2, parts inside the file, which still loads):
    # two different replicas and momenta, the consensus as the model.
    mine = parts[0]
    other = {k: v + 1.0 for k, v in mine["model"].items()}
    momentum = mine["optimizer_states"][0]["state"][0]["momentum_buffer"]
    tripled = copy.deepcopy(mine["optimizer_states"])
    tripled[0]["state"][0]["momentum_buffer"] = 3 * momentum
    ckpt["localsgd"] = {"world_size": 2, "ranks": [mine, dict(mine, model=other, optimizer_states=tripled)]}
    ckpt["state_dict"] = {k: v + 0.5 for k, v in mine["model"].items()}
    torch.save(ckpt, tmp_path / "two_ranks.ckpt")

    with pytest.warns(UserWarning, match="replicas of 2 ranks but this run has 1.*averaged over the saved ranks"):
        _, rec = fit(tmp_path, 3, ckpt_path=tmp_path / "two_ranks.ckpt")
    expected = torch.cat([v.reshape(-1) for k, v in ckpt["state_dict"].items() if "net" in k])
    assert torch.equal(rec.before_update[0][0], expected)  # the consensus, not rank 0's replica
    # the inner optimizer state is the ranks' average, (m + 3m) / 2, not rank 0's: check it through the
    # first update, x' = x − lr·(0.9·buf + g) with buf the averaged momentum
    params, grads = rec.before_update[0]
    buf = torch.cat(
        [
            (2 * momentum).reshape(-1),
            torch.cat(
                [
                    s["momentum_buffer"].reshape(-1)
                    for i, s in sorted(mine["optimizer_states"][0]["state"].items())
                    if i > 0
                ]
            ),
        ]
    )
    torch.testing.assert_close(rec.after[0], params - 0.1 * (0.9 * buf + grads), rtol=0, atol=1e-15)


@pytest.mark.filterwarnings("ignore:.*nothing to synchronize.*")
def test_same_world_size_resume_loads_the_rank_replica(tmp_path):
    fit(tmp_path, 2, save=True)
    ckpt = torch.load(tmp_path / "one_rank.ckpt", weights_only=False)
    (part,) = read_parts(tmp_path / "one_rank.ckpt")  # rank 0's own file beside the checkpoint
    part["model"] = {k: v + 0.25 for k, v in part["model"].items()}
    torch.save(ckpt, tmp_path / "edited.ckpt")
    torch.save(part, part_path(tmp_path / "edited.ckpt", ckpt["localsgd"]["step"], 0))
    model, rec = fit(tmp_path, 3, ckpt_path=tmp_path / "edited.ckpt")
    replica = torch.cat([v.reshape(-1) for v in part["model"].values()])
    assert torch.equal(rec.before_update[0][0], replica)
    assert not torch.equal(flat_params(model), replica)  # and training went on from it
