"""The auto-tuner on real gloo ranks (see tests/launch.py): agreement, the tuned schedule, resume, re-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, Trainer

import lightning_localsgd.tuning.tuner as tuner_module
from lightning_localsgd import AutoTune, DiLoCo, LocalSGDStrategy, PeriodicAveraging
from lightning_localsgd.tuning.model import Decision
from tests.models import TinyNet, regression_data
from tests.scenarios_diloco import full_batches, this_rank
from tests.scenarios_leader import TIMEOUT, _fit

ALGORITHMS = {"periodic": PeriodicAveraging, "diloco": DiLoCo}


class Schedule(Callback):
    """The algorithm's schedule after every step."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int, int | None, bool]] = []

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        a = trainer.strategy.algorithm
        self.rows.append((a.sync_every, a.overlap_steps, a.fragments, a.origin, a.awaiting_tune))


class SaveAt(Callback):
    def __init__(self, step: int | None, folder: str) -> None:
        self.step, self.folder = step, folder

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(str(Path(self.folder) / "tuned.ckpt"))


def tuned(
    out_dir: str,
    devices: int,
    num_nodes: int,
    steps: int,
    algorithm: str,
    kwargs: dict[str, Any],
    autotune: dict[str, Any],
    comm_dtype: str | None = "auto",
    forced: list[dict[str, Any]] | None = None,
    convert_scale: list[float] | None = None,
    save_at: int | None = None,
    resume: bool = False,
    folder: str | None = None,
    full_batch: bool = False,
    forced_first: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """TinyNet (SGD lr 0.1, momentum 0.5) on this rank's shard with what ``kwargs`` leave to the tuner.

    ``forced[rank]``: the decision this rank's ``decide`` returns (rank 0's must win: the broadcast);
    ``forced_first``: the first decision (the re-tunes are the tuner's own);
    ``convert_scale[rank]``: this rank's measured conversion costs are multiplied by it (the slowest
    rank's figures must win: the MAX agreement). Returns the schedule after each step, the tuner's record,
    what this rank measured itself and what ``decide`` was called with.
    """
    rank = this_rank(devices)
    out_dir = folder or out_dir  # where the checkpoint goes (kept between runs when given)
    calls: list[dict[str, Any]] = []
    own: dict[str, float] = {}
    real_decide, real_convert = tuner_module.decide, tuner_module.measure_conversions

    def decide(meas: Any, config: Any, **kw: Any) -> Decision:
        calls.append({"measurements": meas.as_dict(), **{k: v for k, v in kw.items() if k != "comm_dtype"}})
        if forced is not None:
            return Decision(**forced[rank], overhead=0.01, met=True)
        if forced_first is not None and len(calls) == 1:  # the first decision fixed, the re-tunes the tuner's
            return Decision(**forced_first, overhead=0.01, met=True)
        return real_decide(meas, config, **kw)

    def convert(*args: Any) -> dict[str, float]:
        out = {k: v * (convert_scale[rank] if convert_scale else 1.0) for k, v in real_convert(*args).items()}
        own.update(out)
        return out

    tuner_module.decide, tuner_module.measure_conversions = decide, convert
    try:
        alg = ALGORITHMS[algorithm](**kwargs)
        schedule = Schedule()
        strategy = LocalSGDStrategy(timeout=TIMEOUT, comm_dtype=comm_dtype, autotune=AutoTune(**autotune))
        ckpt = str(Path(out_dir) / "tuned.ckpt") if resume else None
        data: dict[str, Any] = {}
        if full_batch:  # the same batch every step: a resume mid-epoch sees what the uninterrupted run saw
            x, y = regression_data(12, seed=rank).tensors
            data = dict(train=full_batches(x, y, 10_000), use_distributed_sampler=False)
        out = _fit(
            devices,
            num_nodes,
            [alg],
            steps,
            make=lambda: TinyNet(momentum=0.5).double(),  # fp64 before a checkpoint is loaded (see scenarios_diloco)
            extra=[schedule, SaveAt(save_at, out_dir)],
            strategy=strategy,
            ckpt_path=ckpt,
            **data,
        )
    finally:
        tuner_module.decide, tuner_module.measure_conversions = real_decide, real_convert
    comm_dtype_now = strategy.comm.comm_dtype
    out.update(
        schedule=schedule.rows,
        record=alg.tuning_record,
        own_convert=own,
        decide_calls=calls,
        comm_dtype=comm_dtype_now if comm_dtype_now is None or isinstance(comm_dtype_now, str) else str(comm_dtype_now),
        tune_calls=out["calls"].get("tune", 0),
    )
    return out


def fabric_auto(out_dir: str, devices: int, num_nodes: int, steps: int, save_at: int) -> dict[str, Any]:
    """The tuned setup under the Trainer and under Fabric, and Fabric's save/resume, with one fixed decision
    (full precision, H = 4, τ = 1, P = 2) so that the runs are comparable bit for bit."""
    from tests.scenarios_fabric import fabric_resume, trainer_vs_fabric

    real = tuner_module.decide
    tuner_module.decide = lambda *a, **k: Decision(None, 4, 1, 2, overhead=0.01, met=True)
    try:
        return {
            "pair": trainer_vs_fabric(out_dir, devices, num_nodes, ["auto"], steps)["auto"],
            "resume": fabric_resume(out_dir, devices, num_nodes, ["auto"], steps, save_at)["auto"],
        }
    finally:
        tuner_module.decide = real
