"""Run a scenario function on several real gloo processes on 127.0.0.1 and collect its results.

``run_ranks("tests.scenarios_core:ddp_equivalence", world=2, nodes=1, kwargs)`` starts ``world``
Python processes with the environment variables Lightning's ``LightningEnvironment`` reads
(``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``); each calls the
function with ``kwargs`` plus ``out_dir``, ``devices`` and ``num_nodes`` and saves what it returns
with ``torch.save``. Every launch has a timeout: a hang is killed and fails the test.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from recipes.launch import run_local_ranks

ROOT = Path(__file__).resolve().parents[1]


def run_ranks(target: str, world: int = 2, nodes: int = 1, timeout: float = 300, **kwargs: Any) -> list[Any]:
    """Launch ``world`` ranks as ``nodes`` nodes and return each rank's result, in rank order.

    If any rank fails, every rank is killed and ``RuntimeError`` carries the failing rank's stderr.
    """
    per_node = world // nodes
    with tempfile.TemporaryDirectory() as tmp:
        args_path = Path(tmp) / "kwargs.pt"
        torch.save(kwargs, args_path)
        cmd = [sys.executable, "-m", "tests.worker", target, str(args_path), tmp, str(per_node), str(nodes)]
        run_local_ranks(cmd, world, nodes, log_dir=tmp, timeout=timeout, cwd=tmp, pythonpath=ROOT)
        return [torch.load(Path(tmp) / f"result{r}.pt", weights_only=False) for r in range(world)]
