"""The same training under the Trainer and under Fabric, run on every rank (see tests/launch.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from lightning.fabric import Fabric
from lightning.pytorch import Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_localsgd import (
    AutoTune,
    DiLoCo,
    ElasticAveraging,
    GradAlign,
    LeaderSGD,
    LocalSGDStrategy,
    ModifiedLocalGD,
    PeriodicAveraging,
)
from lightning_localsgd import fabric as localsgd_fabric
from tests.models import Recorder, TinyNet, flat_params, loader, regression_data, trainer_kwargs
from tests.scenarios_diloco import this_rank

TIMEOUT = timedelta(seconds=60)

# name -> (consensus algorithm, gradient modifier); momentum SGD so that inner state matters
SETUPS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "periodic": lambda: (PeriodicAveraging(3, warmup_steps=2), None),
    "periodic_overlap": lambda: (PeriodicAveraging(4, fragments=2, overlap_steps=1), None),
    "diloco": lambda: (DiLoCo(3, outer_lr=0.5, outer_momentum=0.8), None),
    "diloco_streaming": lambda: (DiLoCo(4, outer_lr=0.5, outer_momentum=0.8, fragments=2, overlap_steps=1), None),
    "modified_localgd": lambda: (ModifiedLocalGD(3, prox=0.1), None),
    "lsgd": lambda: (LeaderSGD(sync_every=2, pull=0.3, loss_window=2, step_pull=0.1), None),
    "easgd": lambda: (ElasticAveraging(3, beta=0.5), None),
    "gradalign": lambda: (PeriodicAveraging(1), GradAlign(beta=0.05)),
    "fedga": lambda: (PeriodicAveraging(3), GradAlign(beta=0.05)),
}

# name -> (setup, the strategy's arguments): what the auto-tuner chooses (tests/test_autotune_dist.py)
TUNED: dict[str, tuple[Callable[[], tuple[Any, Any]], dict[str, Any]]] = {
    "auto": (
        lambda: (PeriodicAveraging(sync_every="auto", overlap_steps="auto", fragments="auto"), None),
        dict(comm_dtype="auto", autotune=AutoTune(measure_steps=4, settle_steps=0, retune_every=0)),
    ),
}


def _setup(name: str) -> tuple[Any, Any, dict[str, Any]]:
    """(algorithm, modifier, strategy arguments) of a setup."""
    if name in TUNED:
        make, kwargs = TUNED[name]
        return (*make(), kwargs)
    return (*SETUPS[name](), {})


def _data(devices: int, num_nodes: int) -> Any:
    """This rank's shard (every world-th sample), in order; both engines take it as it is."""
    rank, world = this_rank(devices), devices * num_nodes
    x, y = regression_data(64).tensors
    return loader(TensorDataset(x[rank::world], y[rank::world]))


def trainer_run(setup: str, steps: int, devices: int, num_nodes: int) -> list[Tensor]:
    """The replica after each optimizer step (after any sync), under the Trainer."""
    seed_everything(0)
    model = TinyNet(momentum=0.9)
    algorithm, modifier, strategy_kwargs = _setup(setup)
    rec = Recorder()
    callbacks = [algorithm, rec] + ([modifier] if modifier is not None else [])
    trainer = Trainer(
        strategy=LocalSGDStrategy(timeout=TIMEOUT, **strategy_kwargs),
        max_steps=steps,
        callbacks=callbacks,
        **trainer_kwargs(devices, num_nodes, limit_val_batches=0, use_distributed_sampler=False),
    )
    trainer.fit(model, _data(devices, num_nodes))
    return rec.after


def fabric_run(
    setup: str,
    steps: int,
    devices: int,
    num_nodes: int,
    *,
    save_at: int | None = None,
    path: str | None = None,
    resume: bool = False,
) -> list[Tensor]:
    """The same training written as a Fabric loop: ``fabric.backward(loss); optimizer.step()``.

    ``save_at``: save after that many steps and stop; ``resume``: load ``path`` first, then go on to ``steps``.
    """
    seed_everything(0)
    model = TinyNet(momentum=0.9)
    optimizer = model.configure_optimizers()
    algorithm, modifier, strategy_kwargs = _setup(setup)
    strategy = localsgd_fabric.LocalSGDStrategy(
        algorithm=algorithm, gradient_modifier=modifier, timeout=TIMEOUT, **strategy_kwargs
    )
    fabric = Fabric(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy=strategy, precision="64-true")
    fabric.launch()
    model, optimizer = fabric.setup(model, optimizer)
    data = fabric.setup_dataloaders(_data(devices, num_nodes), use_distributed_sampler=False)
    start = 0
    if resume:
        assert path is not None
        fabric.load(path, {"model": model, "optimizer": optimizer})
        start = strategy.step
    after: list[Tensor] = []
    batches = iter(data)
    for _ in range(start):  # the data position of the saved run (one epoch holds every step here)
        next(batches)
    for step in range(start + 1, steps + 1):
        x, y = next(batches)

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:  # this step's batch, bound now
            with fabric.autocast():  # the loss in the precision's context, as the Trainer's training_step
                loss = nn.functional.mse_loss(model(x), y)
            fabric.backward(loss)
            return loss

        if modifier is None:
            closure()  # the usual Fabric loop: backward, then a bare step
            optimizer.step()
        else:
            optimizer.step(closure)  # GradAlign re-runs the closure
        optimizer.zero_grad()
        after.append(flat_params(model))
        if save_at is not None and step == save_at:
            fabric.save(path, {"model": model, "optimizer": optimizer})
            return after
    return after


def trainer_vs_fabric(out_dir: str, devices: int, num_nodes: int, setups: list[str], steps: int) -> dict[str, Any]:
    return {
        setup: {
            "trainer": trainer_run(setup, steps, devices, num_nodes),
            "fabric": fabric_run(setup, steps, devices, num_nodes),
        }
        for setup in setups
    }


def fabric_resume(
    out_dir: str, devices: int, num_nodes: int, setups: list[str], steps: int, save_at: int
) -> dict[str, Any]:
    """Uninterrupted vs saved at ``save_at`` and resumed in fresh objects, per setup."""
    out = {}
    for setup in setups:
        path = f"{out_dir}/{setup}.ckpt"
        whole = fabric_run(setup, steps, devices, num_nodes)
        first = fabric_run(setup, steps, devices, num_nodes, save_at=save_at, path=path)
        second = fabric_run(setup, steps, devices, num_nodes, path=path, resume=True)
        out[setup] = {"whole": whole, "resumed": first + second}
    return out
