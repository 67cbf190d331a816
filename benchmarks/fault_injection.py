"""Faults injected into one rank of ``benchmarks/restart_worker.py`` (driven by ``benchmarks/faults.py``).

Keys of the worker's JSON config read here (all optional; the attempts a fault fires in are
``kill_attempts``, default ``[0]``: a restarted attempt runs clean):

| key | fault |
|---|---|
| ``kill_step``, ``victim``, ``kill_when="after_step"`` | SIGKILL after optimizer step ``kill_step`` (before that
  step's checkpoint) |
| ``kill_when="before_step"`` | SIGKILL inside step ``kill_step``, after backward, before the update (at a sync
  step the peers are left in the sync's allreduce) |
| ``kill_when="during_save"`` | SIGKILL halfway through writing ``last.ckpt`` after step ``kill_step`` (``victim``
  must be rank 0, the writer) |
| ``kill_when="while_peer_saves"``, ``kill_delay`` | SIGKILL ``kill_delay`` s after step ``kill_step`` ends, while
  rank 0 still writes that step's checkpoint |
| ``nan_step``, ``nan_rank`` | the gradients of step ``nan_step`` on ``nan_rank`` become NaN (so do that replica and
  its momentum) |
| ``slow_save`` | every checkpoint write takes about this many seconds (written in 8 chunks: a slow disk) |
| ``step_sleep`` | seconds of sleep after every optimizer step (so that a partition falls mid-run) |
| ``log_saves`` | ``save_start``/``save_end`` events around every checkpoint write (also with ``slow_save``) |
| ``log_steps`` | one ``step`` event per optimizer step in ``events.jsonl`` |

Every fault is announced in ``events.jsonl`` (``kill``, ``nan``, ``save_start``/``save_end``) with
``time.time()`` just before it happens.
"""

from __future__ import annotations

import io
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

Log = Callable[..., None]  # log(event=..., **fields): one line of events.jsonl


def die(log: Log, **event: Any) -> None:
    log(event="kill", **event)
    os.kill(os.getpid(), signal.SIGKILL)


class StepFaults(Callback):
    """Kills, NaN gradients, sleeps and step events of one rank, as the config says."""

    def __init__(self, cfg: dict[str, Any], log: Log, rank: int, attempt: int) -> None:
        self.cfg, self.emit, self.rank = cfg, log, rank
        self.armed = attempt in cfg.get("kill_attempts", [0])
        self.victim = self.armed and rank == cfg.get("victim") and cfg.get("kill_step") is not None
        self.when = cfg.get("kill_when", "after_step")
        self.nonfinite_steps: list[int] = []  # steps after which this replica held NaN/Inf

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step + 1  # the optimizer step this backward belongs to
        if self.armed and self.rank == self.cfg.get("nan_rank") and step == self.cfg.get("nan_step"):
            self.emit(event="nan", step=step)
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(math.nan)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.victim and self.when == "before_step" and trainer.global_step + 1 == self.cfg["kill_step"]:
            die(self.emit, step=trainer.global_step + 1, when=self.when)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if not all(bool(torch.isfinite(p).all()) for p in pl_module.parameters()):
            self.nonfinite_steps.append(step)
        if self.cfg.get("log_steps"):
            self.emit(event="step", step=step)
        if self.cfg.get("step_sleep"):
            time.sleep(self.cfg["step_sleep"])
        if not self.victim or step != self.cfg["kill_step"]:
            return
        if self.when == "after_step":
            die(self.emit, step=step, when=self.when)
        elif self.when == "while_peer_saves":  # ModelCheckpoint runs after this hook: rank 0 writes next
            timer = threading.Timer(
                self.cfg.get("kill_delay", 1.0), die, (self.emit,), {"step": step, "when": self.when}
            )
            timer.daemon = True
            timer.start()


def slow_checkpoint_writes(cfg: dict[str, Any], log: Log, rank: int, attempt: int) -> None:
    """Make ``AtomicCheckpointIO`` write each checkpoint in 8 chunks over ``slow_save`` seconds,
    and (``kill_when="during_save"``) SIGKILL this rank halfway through ``last.ckpt`` of ``kill_step``.

    Replaces the ``torch`` name inside :mod:`lightning_localsgd.checkpoint_io` only: the library's
    write path (temp file in the directory, fsync, rename) runs unchanged around the slow write.
    """
    from lightning_localsgd import checkpoint_io

    seconds = float(cfg.get("slow_save") or 0.0)
    armed = attempt in cfg.get("kill_attempts", [0]) and rank == cfg.get("victim")
    kill_here = armed and cfg.get("kill_when") == "during_save"

    def save(obj: Any, f: Any) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        name = os.path.basename(getattr(f, "name", ""))
        log(event="save_start", file=name, step=int(obj.get("global_step", -1)), bytes=len(data))
        chunks = 8
        size = -(-len(data) // chunks)
        for i in range(chunks):
            f.write(data[i * size : (i + 1) * size])
            f.flush()
            last = name.startswith(".last.ckpt") and obj.get("global_step") == cfg["kill_step"]
            if kill_here and last and i == chunks // 2 - 1:
                die(log, step=int(obj["global_step"]), when="during_save", file=name, written=f.tell(), of=len(data))
            time.sleep(seconds / chunks)
        log(event="save_end", file=name, step=int(obj.get("global_step", -1)))

    if seconds > 0 or kill_here or cfg.get("log_saves"):
        checkpoint_io.torch = SimpleNamespace(save=save)  # the module's only use of torch is torch.save
