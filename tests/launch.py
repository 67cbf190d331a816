"""Run a scenario function on several real gloo processes on 127.0.0.1 and collect its results.

``run_ranks("tests.scenarios_core:ddp_equivalence", world=2, nodes=1, kwargs)`` runs the function on
``world`` Python processes that carry the environment variables Lightning's ``LightningEnvironment``
reads (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``); each calls
the function with ``kwargs`` plus ``out_dir``, ``devices`` and ``num_nodes`` and saves what it returns
with ``torch.save``. Every launch has a timeout: a hang is killed and fails the test, and a rank that
raises fails the test with its traceback and the tail of every rank's output.

**Shared processes.** Starting a rank costs seconds of CPU (torch and Lightning imports), so by
default the ranks come from a pool of long-lived processes, one pool per ``(world, nodes)``, that run
one scenario after another (:class:`RankPool`, worker side in ``tests/worker.py``). Each scenario
starts as it would in a fresh process: no process group (the previous one was destroyed, and every
scenario rendezvouses on a new ``MASTER_PORT``), the environment, working directory (a new temporary
directory), warning filters, signal handlers, torch's global settings and RNG of a freshly started
rank. A worker that cannot vouch for that after a scenario (a thread or a process group left behind,
a signal handler not restored) is retired together with its pool, and the next scenario gets new
processes. A scenario that fails or times out kills its pool.

``fresh=True`` starts new processes for that launch only (``recipes.launch.run_local_ranks``): for
scenarios whose ranks exit, are killed or leave without a word, or that test timeouts of the process
group itself. ``LOCALSGD_TEST_FRESH=1`` makes every launch fresh (to compare the two).
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch

from recipes.launch import free_port, run_local_ranks
from tests.worker import EXPECTED_RETIREMENT

ROOT = Path(__file__).resolve().parents[1]
LOG_TAIL = 6000  # characters of each rank's output in the error of a failed launch
PRELOAD = ("lightning.pytorch", "lightning_localsgd")  # imported by a pool's ranks before their first scenario


def run_ranks(
    target: str, world: int = 2, nodes: int = 1, timeout: float = 300, fresh: bool = False, **kwargs: Any
) -> list[Any]:
    """Run ``target`` on ``world`` ranks as ``nodes`` nodes and return each rank's result, in rank order.

    If any rank fails or the run exceeds ``timeout`` seconds, every rank is killed and
    ``RuntimeError`` carries the failing rank's traceback and every rank's output.
    """
    if world % nodes:
        raise ValueError(f"world={world} must be a multiple of nodes={nodes}")
    if fresh or os.environ.get("LOCALSGD_TEST_FRESH") == "1":
        return _run_fresh(target, world, nodes, timeout, kwargs)
    pool = _POOLS.get((world, nodes))
    if pool is None or not pool.alive():
        pool = _POOLS[(world, nodes)] = RankPool(world, nodes)
    return pool.run(target, kwargs, timeout)


def _run_fresh(target: str, world: int, nodes: int, timeout: float, kwargs: dict[str, Any]) -> list[Any]:
    per_node = world // nodes
    with tempfile.TemporaryDirectory() as tmp:
        args_path = Path(tmp) / "kwargs.pt"
        torch.save(kwargs, args_path)
        cmd = [sys.executable, "-m", "tests.worker", target, str(args_path), tmp, str(per_node), str(nodes)]
        run_local_ranks(cmd, world, nodes, log_dir=tmp, timeout=timeout, cwd=tmp, pythonpath=ROOT)
        return [torch.load(Path(tmp) / f"result{r}.pt", weights_only=False) for r in range(world)]


def rank_environment(rank: int, world: int, per_node: int, port: int) -> dict[str, str]:
    """What ``recipes.launch.run_local_ranks`` gives a rank: Lightning's variables, one thread, this checkout."""
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        NODE_RANK=str(rank // per_node),
        LOCAL_RANK=str(rank % per_node),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    for key in ("GROUP_RANK", "LOCAL_WORLD_SIZE", "RANK"):  # torchrun's, which would override ours
        env.pop(key, None)
    return env


class RankPool:
    """``world`` long-lived rank processes (``nodes`` × ``world // nodes``) that run scenarios on request.

    Each worker talks to this process over its own socket pair: it receives ``{"target", "kwargs",
    "out_dir", "port"}``, runs the scenario and answers ``{"error", "dirty"}`` (``error``: the
    traceback, ``dirty``: why the process cannot run another scenario as if fresh). Outputs go to
    one log file per rank; a failure shows the part written during the failed scenario.
    """

    def __init__(self, world: int, nodes: int, preload: tuple[str, ...] = PRELOAD) -> None:
        self.world, self.nodes, self.per_node = world, nodes, world // nodes
        self.dir = tempfile.TemporaryDirectory(prefix=f"rank-pool-{world}x{nodes}-")
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        self.busy = False
        for rank in range(world):
            parent, child = socket.socketpair()
            env = rank_environment(rank, world, self.per_node, port=0)  # every scenario sets its own port
            cmd = [sys.executable, "-m", "tests.worker", "--serve", str(child.fileno()), str(self.per_node), str(nodes)]
            cmd += preload
            with open(self.log(rank), "w") as log:
                proc = subprocess.Popen(
                    cmd, env=env, cwd=self.dir.name, stdout=log, stderr=subprocess.STDOUT, pass_fds=(child.fileno(),)
                )
            child.close()
            self.procs.append(proc)
            self.conns.append(Connection(parent.detach()))

    def log(self, rank: int) -> Path:
        return Path(self.dir.name) / f"rank{rank}.log"

    def alive(self) -> bool:
        return bool(self.procs) and not self.busy and all(p.poll() is None for p in self.procs)

    def run(self, target: str, kwargs: dict[str, Any], timeout: float) -> list[Any]:
        offsets = [self.log(r).stat().st_size for r in range(self.world)]
        deadline = time.monotonic() + timeout
        with tempfile.TemporaryDirectory() as tmp:
            self.busy = True  # stays set if this call is interrupted: the pool is then never reused
            try:
                job = {"target": target, "kwargs": kwargs, "out_dir": tmp, "port": free_port()}
                for conn in self.conns:
                    conn.send(job)
                replies = self._collect(deadline, timeout, offsets)
            except BaseException:
                self.close(kill=True)
                raise
            self.busy = False
            dirty = {r: reply["dirty"] for r, reply in replies.items() if reply["dirty"]}
            if dirty:
                self.close()
                unexpected = {r: [p for p in d if p != EXPECTED_RETIREMENT] for r, d in dirty.items()}
                if any(unexpected.values()):
                    warnings.warn(f"rank pool {self.world}x{self.nodes} retired after {target}: {dirty}", stacklevel=3)
            return [torch.load(Path(tmp) / f"result{r}.pt", weights_only=False) for r in range(self.world)]

    def _collect(self, deadline: float, timeout: float, offsets: list[int]) -> dict[int, dict[str, Any]]:
        replies: dict[int, dict[str, Any]] = {}
        waiting = dict(enumerate(self.conns))
        while waiting:
            ready = wait(list(waiting.values()), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self._fail(f"timeout after {timeout:.0f} s (ranks {sorted(waiting)} still running)", offsets)
            for rank in [r for r, c in waiting.items() if c in ready]:
                try:
                    reply = waiting.pop(rank).recv()
                except EOFError:
                    time.sleep(0.2)  # let the exit status arrive
                    self._fail(f"rank {rank} exited (code {self.procs[rank].poll()}) during the scenario", offsets)
                if reply["error"] is not None:
                    self._fail(f"rank {rank}", offsets, reply["error"])
                replies[rank] = reply
        return replies

    def _fail(self, what: str, offsets: list[int], traceback: str | None = None) -> None:
        self.stop(kill=True)  # before reading the logs: nothing more is written to them
        logs = []
        for r in range(self.world):
            with open(self.log(r), errors="replace") as f:
                f.seek(offsets[r])
                logs.append(f"----- rank {r} -----\n" + f.read()[-LOG_TAIL:])
        where = f"\n----- traceback of the failing rank -----\n{traceback}" if traceback else ""
        raise RuntimeError(f"distributed run failed ({what}):\n" + "\n".join(logs) + where)

    def close(self, kill: bool = False) -> None:
        """Stop the workers and remove their logs."""
        self.stop(kill)
        self.dir.cleanup()

    def stop(self, kill: bool = False) -> None:
        """Stop the workers (closing the sockets ends their loop; ``kill`` or a stuck worker: SIGKILL)."""
        for conn in self.conns:
            conn.close()
        for p in self.procs:
            if kill:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs, self.conns = [], []


_POOLS: dict[tuple[int, int], RankPool] = {}


def shutdown_pools() -> None:
    """Stop every pool (end of the test session)."""
    while _POOLS:
        _, pool = _POOLS.popitem()
        if pool.procs:
            pool.close(kill=pool.busy)


atexit.register(shutdown_pools)
