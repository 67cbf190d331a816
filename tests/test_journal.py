"""RunJournal's deferred evaluation (``evaluate_every``): what ``recipes.demo --link`` measures with."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from recipes.journal import RunJournal
from tests.launch import run_ranks
from tests.models import trainer_kwargs
from tests.scenarios_journal import TinyClassifier, classification_data


def test_deferred_evaluation_scores_the_average_of_the_replicas_and_leaves_training_alone() -> None:
    ranks = run_ranks("tests.scenarios_journal:deferred", world=2, steps=8, every=2, timeout=120)
    val = classification_data(40, seed=1)
    for out in ranks:
        records = out["journal"]["records"]
        assert [r["step"] for r in records] == [2, 4, 6, 8]
        times = [r["train_seconds"] for r in records]
        assert times == sorted(times) and times[0] > 0
        for record in records:
            step = record["step"]
            # independent reference: average the two ranks' states at that step, score in plain torch
            w = (
                ranks[0]["journal"]["states"][step]["net.weight"] + ranks[1]["journal"]["states"][step]["net.weight"]
            ) / 2
            b = (ranks[0]["journal"]["states"][step]["net.bias"] + ranks[1]["journal"]["states"][step]["net.bias"]) / 2
            want = float(((val.tensors[0] @ w.T + b).argmax(1) == val.tensors[1]).double().mean())
            assert record["value"] == pytest.approx(want, abs=1e-12)
        # at step 4 (mid-round, a sync in flight) the replicas differ: the average is not one rank's model
        assert not torch.equal(
            ranks[0]["journal"]["states"][4]["net.weight"], ranks[1]["journal"]["states"][4]["net.weight"]
        )
        # the copies and the evaluation did not touch training: bit-equal to the same fit without the journal
        for k, v in out["plain"]["final"].items():
            assert torch.equal(out["journal"]["final"][k], v)
        for step, state in out["plain"]["states"].items():
            assert all(torch.equal(out["journal"]["states"][step][k], v) for k, v in state.items())


def test_deferred_evaluation_needs_lightning_validation_off(tmp_path) -> None:
    trainer = Trainer(
        max_steps=2, callbacks=[RunJournal(str(tmp_path / "j.json"), evaluate_every=1)], **trainer_kwargs(1, 1)
    )
    with pytest.raises(ValueError, match="limit_val_batches=0"):
        trainer.fit(TinyClassifier(), torch.utils.data.DataLoader(classification_data(8, seed=0), batch_size=4))


def test_negative_evaluate_every_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="evaluate_every must be 0"):
        RunJournal(str(tmp_path / "j.json"), evaluate_every=-1)
