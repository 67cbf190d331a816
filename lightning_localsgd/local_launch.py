"""Start N ranks of a Python command on this machine, as a cluster launcher would (127.0.0.1).

Each process gets the environment Lightning's ``LightningEnvironment`` reads for externally created
processes (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``NODE_RANK``, ``LOCAL_RANK``), so
``Trainer(devices=per_node, num_nodes=nodes, strategy="localsgd")`` in the command joins one
process group; ``nodes > 1`` emulates several nodes on one machine. Used by the multi-process
tests, the benchmarks and the demo; handy for trying the library on a laptop.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_loopback_bytes() -> tuple[int, int] | None:
    """``(rx_bytes, tx_bytes)`` of the loopback interface, or ``None`` where /proc/net/dev is missing."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, sep, rest = line.partition(":")
                if sep and name.strip() == "lo":
                    fields = rest.split()
                    return int(fields[0]), int(fields[8])
    except OSError:
        pass
    return None


def run_local_ranks(
    cmd: Sequence[str],
    world: int,
    nodes: int = 1,
    *,
    log_dir: str | Path,
    timeout: float,
    cwd: str | Path | None = None,
    pythonpath: str | Path | None = None,
    log_tail: int = 6000,
) -> None:
    """Run ``cmd`` as ``world`` ranks (``nodes`` × ``world // nodes``), one thread each, and wait.

    Every rank writes its output to ``log_dir/rank<r>.log``. If a rank fails or the whole run
    exceeds ``timeout`` seconds, every rank is killed and ``RuntimeError`` carries the tail of each
    rank's log: a hang fails, it never blocks the caller.
    """
    per_node = world // nodes
    if per_node * nodes != world:
        raise ValueError(f"world={world} must be a multiple of nodes={nodes}")
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
            MKL_NUM_THREADS="1",
        )
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
        for key in ("GROUP_RANK", "LOCAL_WORLD_SIZE", "RANK"):  # torchrun's, which would override ours
            env.pop(key, None)
        log = open(Path(log_dir) / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT), log))
    failed: int | str | None = None
    deadline = time.monotonic() + timeout
    try:
        for rank, (p, _) in enumerate(procs):
            if p.wait(timeout=max(1.0, deadline - time.monotonic())) != 0 and failed is None:
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
            f"----- rank {r} -----\n" + (Path(log_dir) / f"rank{r}.log").read_text()[-log_tail:] for r in range(world)
        )
        raise RuntimeError(f"distributed run failed (rank {failed}):\n{logs}")


def run_rank_from_file(cfg_path: str | Path, run_rank: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The worker side of :func:`run_local_ranks` for the benchmarks: read the JSON config at
    ``cfg_path``, call ``run_rank(cfg)`` (its result carries ``"rank"``), write the result to
    ``cfg["out_dir"]/rank<r>.json`` and destroy the process group if one was created."""
    import torch.distributed as dist

    cfg = json.loads(Path(cfg_path).read_text())
    result = run_rank(cfg)
    Path(cfg["out_dir"], f"rank{result['rank']}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()
