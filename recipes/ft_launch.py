"""Run a fault-tolerant job on this machine: a torchft Lighthouse and N replica groups that may die.

Each replica group is one Lightning job of ``per_group`` processes with its own ``MASTER_PORT``
(its own TCPStore), ``REPLICA_GROUP_ID=g`` and ``TORCHFT_LIGHTHOUSE`` set, which is what
``TorchFT()`` reads. A group whose process exits with an error (or is killed) is killed as a whole,
like torchrun does, and started again while it has restarts left (``restarts={2: 1}``): that is
how a cluster scheduler brings a failed group back. ``LOCALSGD_FT_INCARNATION`` tells a process
which start of its group it is (0 first). Used by tests/test_fault_tolerance.py and benchmarks/ft.py.

Every run has a timeout: a hang kills every process and fails with the tail of every log.

Fault injection and pacing, as Trainer callbacks for the groups' processes: :class:`KillSelf`
(SIGKILL after an optimizer step, writing the time first), :class:`Pace` (sleep after each step)
and :class:`RestartGate`. Restarting a Python process takes 5 to 90 s on a loaded machine, so a
run that must be reproducible lets the gate pause the live groups at one step until the restarted
group is up (and every first start wait for the others before its first round); the pauses are
measured (``RestartGate.paused``) and reported apart from the library's own waits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, Trainer

from lightning_localsgd.fault_tolerance.config import start_lighthouse

from .launch import free_port

INCARNATION_ENV = "LOCALSGD_FT_INCARNATION"


@dataclass
class Incarnation:
    """One start of one replica group."""

    group: int
    index: int  # 0 for the first start
    started: float  # time.time()
    logs: list[Path]
    procs: list[subprocess.Popen] = field(default_factory=list, repr=False)
    returncode: int | None = None  # the first nonzero exit code of its processes, else 0
    ended: float | None = None

    def poll(self) -> bool:
        """True once the group is over: every process exited, or one failed (the rest is then killed)."""
        codes = [p.poll() for p in self.procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed or all(c is not None for c in codes):
            self.kill()
            self.returncode, self.ended = (failed[0] if failed else 0), time.time()
            return True
        return False

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def run_replica_groups(
    cmd_for: Callable[[int, int], list[str]],
    groups: int,
    *,
    log_dir: str | Path,
    timeout: float,
    per_group: int = 1,
    restarts: Mapping[int, int] | None = None,
    min_replicas: int = 1,
    heartbeat_timeout_ms: int = 1000,
    join_timeout_ms: int = 60_000,
    cwd: str | Path | None = None,
    pythonpath: str | Path | None = None,
    log_tail: int = 4000,
) -> list[list[Incarnation]]:
    """Start a Lighthouse and ``groups`` replica groups running ``cmd_for(group, incarnation)``; wait.

    Returns every group's incarnations in start order. Raises ``RuntimeError`` (with the logs) when
    a group fails with no restart left, or when the run exceeds ``timeout`` seconds.
    """
    left = dict(restarts or {})
    lighthouse = start_lighthouse(
        min_replicas=min_replicas, heartbeat_timeout_ms=heartbeat_timeout_ms, join_timeout_ms=join_timeout_ms
    )
    address = lighthouse.address()
    runs: list[list[Incarnation]] = [[] for _ in range(groups)]
    deadline = time.monotonic() + timeout
    failure: str | None = None

    def start(group: int) -> None:
        index = len(runs[group])
        port = free_port()
        inc = Incarnation(group, index, time.time(), [])
        cmd = cmd_for(group, index)
        for local in range(per_group):
            env = dict(os.environ)
            env.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                WORLD_SIZE=str(per_group),
                NODE_RANK="0",
                LOCAL_RANK=str(local),
                REPLICA_GROUP_ID=str(group),
                TORCHFT_LIGHTHOUSE=address,
                OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1",
                **{INCARNATION_ENV: str(index)},
            )
            if pythonpath is not None:
                env["PYTHONPATH"] = str(pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
            for key in ("GROUP_RANK", "LOCAL_WORLD_SIZE", "RANK"):  # torchrun's, which would override ours
                env.pop(key, None)
            path = Path(log_dir) / f"group{group}.{index}.rank{local}.log"
            with open(path, "w") as log:
                inc.procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT))
            inc.logs.append(path)
        runs[group].append(inc)

    try:
        for g in range(groups):
            start(g)
        running = set(range(groups))
        while running and failure is None:
            if time.monotonic() > deadline:
                failure = f"timeout after {timeout:.0f} s"
                break
            for g in sorted(running):
                inc = runs[g][-1]
                if not inc.poll():
                    continue
                running.discard(g)
                if inc.returncode == 0:
                    continue
                if left.get(g, 0) > 0:
                    left[g] -= 1
                    start(g)
                    running.add(g)
                else:
                    failure = f"group {g} (start {inc.index}) exited with {inc.returncode}"
            time.sleep(0.05)
    finally:
        for incs in runs:
            for inc in incs:
                inc.kill()
        lighthouse.shutdown()
    if failure is not None:
        tails = "\n".join(
            f"----- {path.name} -----\n" + path.read_text()[-log_tail:]
            for incs in runs
            for inc in incs
            for path in inc.logs
        )
        raise RuntimeError(f"fault-tolerant run failed: {failure}\n{tails}")
    return runs


# ====================================================================== in the groups' processes
class Pace(Callback):
    """Sleep ``seconds`` after every training batch (a stand-in for a bigger model's step time)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        time.sleep(self.seconds)


class KillSelf(Callback):
    """SIGKILL this process after optimizer step ``step`` (after that step's sync); the time goes to ``record``."""

    def __init__(self, step: int, record: str | Path | None = None) -> None:
        self.step, self.record = step, record

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            if self.record is not None:
                Path(self.record).write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)


class RestartGate(Callback):
    """Harness pauses, through files in ``folder``: a common start, and live groups waiting for a restart.

    At ``on_train_start`` (before the strategy's first round) every process announces
    ``start.<group>`` (first start) or ``restart.<group>``; first starts wait for all ``groups``
    announcements. After step ``gate_at`` every group but ``restarting`` waits for
    ``restart.<restarting>``. ``paused`` sums the seconds waited.
    """

    def __init__(
        self, folder: str | Path, groups: int, gate_at: int | None = None, restarting: int = -1, limit: float = 300.0
    ) -> None:
        self.folder, self.groups, self.gate_at, self.restarting, self.limit = (
            Path(folder),
            groups,
            gate_at,
            restarting,
            limit,
        )
        self.group, self.incarnation = int(os.environ["REPLICA_GROUP_ID"]), int(os.environ[INCARNATION_ENV])
        self.paused = 0.0
        self.announced_at = 0.0  # time.time() of this process's announcement

    def _wait(self, names: list[str]) -> None:
        start = time.monotonic()
        while not all((self.folder / n).exists() for n in names):
            if time.monotonic() - start > self.limit:
                raise TimeoutError(f"harness gate: {names} not all present after {self.limit:.0f} s")
            time.sleep(0.02)
        self.paused += time.monotonic() - start

    def on_train_start(self, trainer: Trainer, *args: Any) -> None:
        self.announced_at = time.time()
        (self.folder / f"{'start' if self.incarnation == 0 else 'restart'}.{self.group}").touch()
        if self.incarnation == 0:
            self._wait([f"start.{g}" for g in range(self.groups)])

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.gate_at and self.group != self.restarting:
            self._wait([f"restart.{self.restarting}"])
