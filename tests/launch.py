"""Run a scenario function on several real gloo processes on 127.0.0.1 and collect its results.

``run_ranks("tests.scenarios_core:ddp_equivalence", world=2, nodes=1, kwargs)`` starts ``world``
Python processes with the environment variables Lightning's ``LightningEnvironment`` reads
(``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``); each calls the
function with ``kwargs`` plus ``out_dir``, ``devices`` and ``num_nodes`` and saves what it returns
with ``torch.save``. Every launch has a timeout: a hang is killed and fails the test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target: str, world: int = 2, nodes: int = 1, timeout: float = 240, **kwargs: Any) -> list[Any]:
    """Launch ``world`` ranks as ``nodes`` nodes and return each rank's result, in rank order.

    If any rank fails, every rank is killed and ``RuntimeError`` carries the failing rank's stderr.
    """
    per_node = world // nodes
    assert per_node * nodes == world
    with tempfile.TemporaryDirectory() as tmp:
        args_path = Path(tmp) / "kwargs.pt"
        torch.save(kwargs, args_path)
        port = free_port()
        procs = []
        for rank in range(world):
            env = dict(os.environ)
            env.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                WORLD_SIZE=str(world),
                NODE_RANK=str(rank // per_node),
                LOCAL_RANK=str(rank % per_node),
                OMP_NUM_THREADS="1",
                PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
            )
            env.pop("GROUP_RANK", None)
            cmd = [sys.executable, "-m", "tests.worker", target, str(args_path), tmp, str(per_node), str(nodes)]
            log = open(Path(tmp) / f"rank{rank}.log", "w")
            procs.append((subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT), log))
        failed = None
        try:
            for rank, (p, _) in enumerate(procs):
                rc = p.wait(timeout=timeout)
                if rc != 0 and failed is None:
                    failed = rank
        except subprocess.TimeoutExpired:
            failed = "timeout"
        finally:
            for p, log in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                log.close()
        if failed is not None:
            logs = "\n".join(
                f"----- rank {r} -----\n" + (Path(tmp) / f"rank{r}.log").read_text()[-6000:] for r in range(world)
            )
            raise RuntimeError(f"distributed run failed (rank {failed}):\n{logs}")
        return [torch.load(Path(tmp) / f"result{r}.pt", weights_only=False) for r in range(world)]
