"""Each rank writes its own part of a checkpoint: rank 0 never holds the others' state, and a save that dies
half-way leaves the previous file and its parts consistent (lightning_localsgd/resume.py)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_localsgd import LocalSGDStrategy, PeriodicAveraging
from lightning_localsgd.resume import part_path, read_parts
from tests.launch import run_ranks
from tests.models import Recorder, TinyNet, loader, regression_data, trainer_kwargs

P_BYTES = (5 * 8 + 8 + 8 + 1) * 8  # TinyNet's 57 float64 parameters


def test_rank_zero_writes_one_replica_whatever_the_world_size():
    """4 ranks, one save: every rank's part is its replica + its momentum (2 x P); rank 0's file adds the
    consensus and Lightning's own dump of rank 0's momentum (2 x P). Before, rank 0's file held all 4 parts."""
    for rank, result in enumerate(run_ranks("tests.scenarios_parts:save_once", world=4, timeout=300)):
        written = result["written"]
        assert written[f"ckpt.step2.rank{rank}"] == 2 * P_BYTES
        if rank == 0:
            assert written == {"ckpt.step2.rank0": 2 * P_BYTES, "ckpt": 2 * P_BYTES}
        else:
            assert list(written) == [f"ckpt.step2.rank{rank}"]


class SaveAt(Callback):
    def __init__(self, path, steps):
        self.path, self.steps = path, steps

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step in self.steps:
            trainer.save_checkpoint(self.path)


def fit(tmp_path, steps, callbacks=(), ckpt_path=None, **overrides):
    model, rec = TinyNet(momentum=0.9).double(), Recorder()
    trainer = Trainer(
        strategy=LocalSGDStrategy(),
        callbacks=[rec, PeriodicAveraging(3), *callbacks],
        max_steps=steps,
        **trainer_kwargs(1, 1, default_root_dir=tmp_path, **overrides),
    )
    trainer.fit(model, loader(regression_data(8)), ckpt_path=ckpt_path)
    return trainer, model, rec


@pytest.mark.filterwarnings("ignore:.*nothing to synchronize.*")
def test_a_newer_save_replaces_the_parts_only_after_its_file_is_written(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    _, _, rec = fit(tmp_path, 4, [SaveAt(path, {2, 4})])
    assert sorted(p.name for p in tmp_path.glob("last.ckpt*")) == ["last.ckpt", "last.ckpt.step4.rank0"]
    assert torch.equal(read_parts(path)[0]["model"]["net.0.weight"].reshape(-1), rec.after[3][:40])

    # A save at step 2 dies after writing its part and before the file: the step-4 pair stays whole.
    from lightning_localsgd import AtomicCheckpointIO

    real = AtomicCheckpointIO.save_checkpoint

    def dies_on_the_file(self, checkpoint, p, storage_options=None):
        if str(p) == str(path):
            raise RuntimeError("killed while writing the file")
        return real(self, checkpoint, p, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", dies_on_the_file)
    with pytest.raises(RuntimeError, match="killed while writing the file"):
        fit(tmp_path / "other", 2, [SaveAt(path, {2})])
    monkeypatch.undo()
    assert (tmp_path / part_path("last.ckpt", 2, 0)).exists()  # the orphan of the dead save
    trainer, _, _ = fit(tmp_path / "resume", 5, ckpt_path=path)  # resumes from step 4, its own replica
    assert trainer.global_step == 5


@pytest.mark.filterwarnings("ignore:.*nothing to synchronize.*")
def test_a_missing_part_says_where_it_should_be_and_what_to_do(tmp_path):
    path = tmp_path / "last.ckpt"
    fit(tmp_path, 2, [SaveAt(path, {2})])
    (tmp_path / part_path("last.ckpt", 2, 0)).unlink()
    with pytest.raises(FileNotFoundError, match=r"rank 0's part of the checkpoint is missing .*last.ckpt.step2.rank0"):
        fit(tmp_path / "resume", 3, ckpt_path=path)


@pytest.mark.filterwarnings("ignore:.*nothing to synchronize.*")
def test_model_checkpoint_removes_the_parts_of_the_checkpoints_it_drops(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    keep = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=1, monitor="step", mode="max")
    fit(tmp_path, 3, [keep], enable_checkpointing=True)
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    (kept,) = [n for n in names if n.endswith(".ckpt")]  # the last of 3 saves
    assert names == [kept, f"{kept}.step3.rank0"], names
