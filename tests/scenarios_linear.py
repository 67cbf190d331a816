"""Scenarios of the linear recipe's tests, run on every rank (see tests/launch.py)."""

from __future__ import annotations

import time
from typing import Any

import torch

from recipes.linear import Trajectory, main


def fit_recipe(out_dir: str, devices: int, num_nodes: int, runs: list[list[str]]) -> list[dict[str, Any]]:
    """``python -m recipes.linear fit <args>`` for each entry of ``runs``, in this process, one after another.

    Returns, per run, the consensus at every sync (:class:`~recipes.linear.Trajectory`), the final
    weights, the number of syncs and the bytes this rank sent.
    """
    out = []
    for args in runs:
        quiet = [
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={out_dir}",
        ]
        cli = main(args=[*args, *quiet], run=False, save_config_callback=None)
        trajectory = Trajectory()
        cli.trainer.callbacks.append(trajectory)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        strategy = cli.trainer.strategy
        out.append(
            {
                "steps": trajectory.steps,
                "weights": torch.stack(trajectory.weights),
                "final": torch.cat([p.detach().reshape(-1) for p in cli.model.parameters()]).clone(),
                "num_syncs": strategy.algorithm.num_syncs,
                "bytes": dict(strategy.comm.counters.bytes_by_purpose),
                "seconds": time.perf_counter() - start,
            }
        )
    return out
