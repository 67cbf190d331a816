"""The ranks of benchmark workers, run on shared rank processes (see tests/launch.py).

Each scenario writes the worker's JSON config as the benchmark's launcher would and calls the
worker's own entry point with it, so the rank runs exactly the code of a launched worker; only the
process around it is shared.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _rank(devices: int) -> int:
    return int(os.environ["NODE_RANK"]) * devices + int(os.environ["LOCAL_RANK"])


def restart_reference(out_dir: str, devices: int, num_nodes: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """The uninterrupted run of ``benchmarks/restart_worker.py`` (``cfg["kill_attempts"]`` must be empty):
    what ``benchmarks.restarts.run_job`` runs under torchrun, here on this rank; returns its ``rank<r>.json``."""
    from benchmarks import restart_worker

    assert not cfg["kill_attempts"], "the reference run is the one without a kill"
    rank = _rank(devices)
    cfg = {**cfg, "out_dir": str(Path(out_dir) / "out"), "ckpt_dir": str(Path(out_dir) / "ckpt")}
    Path(cfg["out_dir"]).mkdir(exist_ok=True)
    path = Path(out_dir) / f"cfg{rank}.json"
    path.write_text(json.dumps(cfg))
    restart_worker.main(str(path))
    return json.loads((Path(cfg["out_dir"]) / f"rank{rank}.json").read_text())


def lsgd_vs_easgd_worker(out_dir: str, devices: int, num_nodes: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """``python -m benchmarks.lsgd_vs_easgd --worker cfg.json`` on this rank, with the config that
    ``benchmarks.common.launch_ranks`` writes; returns the rank's ``rank<r>.json``."""
    from benchmarks import lsgd_vs_easgd

    rank = _rank(devices)
    cfg = dict(cfg, out_dir=out_dir, world=devices * num_nodes, nodes=num_nodes, per_node=devices)
    path = Path(out_dir) / f"cfg{rank}.json"
    path.write_text(json.dumps(cfg))
    assert lsgd_vs_easgd.main(["--worker", str(path)]) == 0
    return json.loads((Path(out_dir) / f"rank{rank}.json").read_text())
