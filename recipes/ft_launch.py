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

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer

from lightning_localsgd.checkpoint_io import AtomicCheckpointIO
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
    lighthouse_outage: tuple[Path, float, Path] | None = None,
) -> list[list[Incarnation]]:
    """Start a Lighthouse and ``groups`` replica groups running ``cmd_for(group, incarnation)``; wait.

    ``lighthouse_outage=(trigger, seconds, record)``: the Lighthouse runs in a process of its own;
    when the file ``trigger`` appears (a group writes it) that process is SIGKILLed, and a new
    Lighthouse starts on the same address ``seconds`` later (in this process); the two times go to
    ``record`` (JSON). Returns every group's incarnations in start order.
    Raises ``RuntimeError`` (with the logs) when a group fails with no restart left, or when the
    run exceeds ``timeout`` seconds.
    """
    left = dict(restarts or {})
    options = {
        "min_replicas": min_replicas,
        "heartbeat_timeout_ms": heartbeat_timeout_ms,
        "join_timeout_ms": join_timeout_ms,
    }
    outage = lighthouse_outage
    victim: subprocess.Popen | None = None
    if outage is None:
        lighthouse: Any = start_lighthouse(**options)
        address = lighthouse.address()
    else:  # a Lighthouse process that can be killed
        address = f"http://127.0.0.1:{free_port()}"
        code = (
            "import sys, time\nfrom lightning_localsgd.fault_tolerance.config import start_lighthouse\n"
            f"server = start_lighthouse(bind={address.removeprefix('http://')!r}, **{options!r})\n"  # kept alive
            "print('up', flush=True)\ntime.sleep(1e9)\n"
        )
        victim = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=cwd, env=dict(os.environ))
        assert victim.stdout is not None and victim.stdout.readline().strip() == b"up", "the Lighthouse did not start"
        lighthouse = None
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
            if outage is not None and outage[0].exists():
                _, seconds, record = outage
                outage, down = None, time.time()
                assert victim is not None
                victim.kill()  # SIGKILL: its connections die with it
                victim.wait()
                time.sleep(seconds)
                lighthouse = start_lighthouse(bind=address.removeprefix("http://"), **options)
                record.write_text(json.dumps({"down": down, "up": time.time()}))
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
        if victim is not None:
            victim.kill()
            victim.wait()
        if lighthouse is not None:
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


class KillInSync(Callback):
    """SIGKILL this process inside the sync round of ``step``, at its ``call``-th SUM over the quorum.

    The SUMs of a round start in this order: 1 the agreement on the contributors, 2 the values (a
    float wire) or the blocks' maxima (an integer wire), 3 the integers. With an overlapped sync
    the last one is what travels while local steps go on: killing there kills the group while its
    sync is in flight, and the survivors' round fails at its merge step. The time goes to ``record``.
    """

    def __init__(self, step: int, call: int = 2, record: str | Path | None = None) -> None:
        self.step, self.call, self.record = step, call, record

    def on_train_start(self, trainer: Trainer, *args: Any) -> None:
        self.arm(trainer.strategy.ft_session)

    def arm(self, session: Any) -> None:
        """Wrap ``session``'s SUMs (a Fabric loop calls this itself, before its first forward pass)."""
        plain_start, calls = session.start_sum_, []

        def dying_start(flat: Any, kind: str) -> Any:  # every SUM over the quorum starts here
            if session.round_kind == "sync" and session.round_step == self.step:
                calls.append(kind)
                if len(calls) == self.call:
                    if self.record is not None:
                        Path(self.record).write_text(str(time.time()))
                    os.kill(os.getpid(), signal.SIGKILL)
            return plain_start(flat, kind)

        session.start_sum_ = dying_start


class KillWhileHealing(Callback):
    """SIGKILL this process as soon as it has received a peer's state (inside its join round, before the round
    completes: the others' attempt fails). The time goes to ``record``."""

    def __init__(self, record: str | Path | None = None) -> None:
        self.record = record

    def on_train_start(self, trainer: Trainer, *args: Any) -> None:
        session = trainer.strategy.ft_session
        plain_restore = session._restore

        def dying_restore(state: dict[str, Any]) -> None:
            plain_restore(state)
            if self.record is not None:
                Path(self.record).write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)

        # torchft keeps the function registered at the session's start (a harness may reach into its dict)
        session.manager._load_state_dict_fns["lightning_localsgd"] = dying_restore


class Touch(Callback):
    """Write the time into ``path`` after optimizer step ``step`` (a trigger for the launcher, e.g. an outage)."""

    def __init__(self, step: int, path: str | Path) -> None:
        self.step, self.path = step, Path(path)

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and not self.path.exists():
            self.path.write_text(str(time.time()))


class TornCheckpointIO(AtomicCheckpointIO):
    """Checkpoint IO that SIGKILLs its process half-way through writing the first checkpoint at or after ``step``.

    It writes half of the serialized checkpoint where :class:`AtomicCheckpointIO` writes (the hidden
    temporary file next to the target) and dies, as a process killed during a save does; the time
    goes to ``record``. Earlier checkpoints are written normally.
    """

    def __init__(self, step: int, record: str | Path | None = None) -> None:
        super().__init__()
        self.step, self.record = step, record

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if checkpoint.get("global_step", -1) < self.step:  # (a rank's part file has no global_step: written whole)
            return super().save_checkpoint(checkpoint, path, storage_options)
        data = io.BytesIO()
        torch.save(checkpoint, data)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.tmp-{os.getpid()}", "wb") as f:
            f.write(data.getbuffer()[: len(data.getbuffer()) // 2])
            f.flush()
            os.fsync(f.fileno())
        if self.record is not None:
            Path(self.record).write_text(str(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)


class RestartGate(Callback):
    """Harness pauses, through files in ``folder``: a common start, and live groups waiting for a restart.

    At ``on_train_start`` (before the strategy's first round) every process announces
    ``start.<group>`` (first start) or ``restart.<group>`` and ``restart.<group>.<start>``; first
    starts wait for all ``groups`` announcements. After step ``gate_at`` every group but
    ``restarting`` waits for ``restart.<restarting>``; ``second=(step, start)``: after ``step`` also
    for that start's announcement (a group restarted twice). ``paused`` sums the seconds waited.
    """

    def __init__(
        self,
        folder: str | Path,
        groups: int,
        gate_at: int | None = None,
        restarting: int = -1,
        limit: float = 300.0,
        second: tuple[int, int] | None = None,
    ) -> None:
        self.folder, self.groups, self.gate_at, self.restarting, self.limit = (
            Path(folder),
            groups,
            gate_at,
            restarting,
            limit,
        )
        self.second = second
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
        self.announce()

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self.after_step(trainer.global_step)

    def announce(self) -> None:
        """Before the first round (a Fabric loop calls this itself)."""
        self.announced_at = time.time()
        (self.folder / f"{'start' if self.incarnation == 0 else 'restart'}.{self.group}").touch()
        if self.incarnation > 0:
            (self.folder / f"restart.{self.group}.{self.incarnation}").touch()
        if self.incarnation == 0:
            self._wait([f"start.{g}" for g in range(self.groups)])

    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` (a Fabric loop calls this itself)."""
        if self.group == self.restarting:
            return
        if step == self.gate_at:
            self._wait([f"restart.{self.restarting}"])
        if self.second is not None and step == self.second[0]:
            self._wait([f"restart.{self.restarting}.{self.second[1]}"])
