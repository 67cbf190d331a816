"""Bad input fails at construction or setup with a message that says what to do instead."""

import warnings

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_localsgd import LocalSGDStrategy, PeriodicAveraging
from tests.models import TinyNet, loader, regression_data, trainer_kwargs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sync_every": 0}, "sync_every must be an integer >= 1"),
        ({"sync_every": 2.5}, "sync_every must be an integer >= 1"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
        ({"buffers": "sum"}, r"buffers must be one of \('average', 'broadcast', 'local'\)"),
        ({"nonfinite": "ignore"}, "nonfinite must be 'raise' or 'skip'"),
        ({"sync_every": 8, "node_sync_every": 3}, "must be smaller than sync_every=8 and divide it"),
        ({"sync_every": 8, "node_sync_every": 8}, "must be smaller than sync_every=8 and divide it"),
    ],
)
def test_bad_algorithm_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PeriodicAveraging(**kwargs)
    with pytest.raises(ValueError, match=message):  # the strategy validates its default algorithm at once
        LocalSGDStrategy(**kwargs)


def test_bad_comm_dtype():
    for bad in ("int16", "uint8", torch.int8, "float8"):
        with pytest.raises(ValueError, match="floating dtype such as 'bfloat16' or 'float16', or 'int8' / 'int4'"):
            LocalSGDStrategy(comm_dtype=bad)
    assert LocalSGDStrategy(comm_dtype="int8").comm.comm_dtype == "int8"
    assert LocalSGDStrategy(comm_dtype="int4").comm.quantized
    assert LocalSGDStrategy(comm_dtype="bfloat16").comm.comm_dtype is torch.bfloat16
    assert LocalSGDStrategy(comm_dtype=torch.float16).comm.comm_dtype is torch.float16


def fit_one_process(strategy, callbacks=(), model=None, **overrides):
    trainer = Trainer(strategy=strategy, max_steps=2, callbacks=list(callbacks), **trainer_kwargs(1, 1, **overrides))
    trainer.fit(model or TinyNet().double(), loader(regression_data(8)))
    return trainer


def test_algorithm_without_the_strategy_is_refused():
    with pytest.raises(TypeError, match="use Trainer\\(strategy='localsgd'"):
        fit_one_process("auto", [PeriodicAveraging(4)])


def test_two_consensus_algorithms_are_refused():
    class OtherAlgorithm(PeriodicAveraging):
        pass

    with pytest.raises(ValueError, match="exactly one consensus algorithm.*PeriodicAveraging, OtherAlgorithm"):
        fit_one_process(LocalSGDStrategy(), [PeriodicAveraging(4), OtherAlgorithm(8)])


def test_strategy_arguments_next_to_an_algorithm_are_refused():
    with pytest.raises(ValueError, match=r"\['sync_every'\] given to LocalSGDStrategy would have no effect"):
        fit_one_process(LocalSGDStrategy(sync_every=4), [PeriodicAveraging(8)])


def test_one_process_warns_nothing_to_synchronize():
    with pytest.warns(UserWarning, match="nothing to synchronize"):
        trainer = fit_one_process(LocalSGDStrategy(sync_every=1))
    assert trainer.global_step == 2 and trainer.strategy.comm.counters.calls == 0


def test_hierarchy_without_nodes_warns_no_effect():
    with pytest.warns(UserWarning, match="node_sync_every=2 has no effect"):
        fit_one_process(LocalSGDStrategy(), [PeriodicAveraging(4, node_sync_every=2)])


def test_two_optimizers_are_refused():
    class TwoOptimizers(TinyNet):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            half = len(list(self.parameters())) // 2
            params = list(self.parameters())
            return torch.optim.SGD(params[:half], lr=0.1), torch.optim.SGD(params[half:], lr=0.1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="exactly one optimizer, got 2"):
            fit_one_process(LocalSGDStrategy(), model=TwoOptimizers().double())
