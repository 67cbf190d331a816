"""The parameter server of :class:`~lightning_localsgd.AsyncLocalSGDStrategy` (rank 0).

The server state is one flat vector ``[θ | float buffers]``; the outer optimizer steps θ once per
push, in arrival order; buffers are replaced by the pushing worker's (last writer wins).
:meth:`ParameterServer.handle` is the whole logic and does no communication: rank 0's own worker
calls it directly, remote workers reach it through :meth:`ParameterServer.serve`, a thread on
rank 0 speaking the protocol of :mod:`lightning_localsgd.asynchronous.protocol`. One lock guards the
state, so a push is applied completely or not at all, and a checkpoint is a cut between two pushes.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_localsgd.asynchronous.optimizers import ServerOptimizer
from lightning_localsgd.asynchronous.protocol import (
    HEADER,
    TAG_MODEL,
    TAG_PUSH,
    TAG_REPLY,
    TAG_REQUEST,
    AsyncTrainingError,
    MessageType,
    ProtocolError,
    Reply,
    Status,
    check_request,
    parse_request,
)
from lightning_localsgd.transport.collectives import Collectives, Group

__all__ = ["LocalClient", "ParameterServer", "PushRecord"]


@dataclass
class PushRecord:
    """What observers (``AsyncLocalSGDStrategy.push_observers``) learn about each applied push.

    Observers are called as ``observer(record, g)`` under the server lock, after the update; ``g`` is
    the pushed pseudo-gradient, valid only during the call (clone it to keep it).
    """

    worker: int
    update: int  # 1-based index of this push in the server's arrival order
    staleness: int  # server updates between the worker's pull and this push
    steps: int  # local steps behind the pseudo-gradient
    speed: float  # the worker's reported optimizer steps per second
    max_speed: float  # max_j v_j when H_i was computed
    local_steps: int  # the H_i given back to the worker


class ParameterServer:
    """Global model, outer optimizer and per-worker bookkeeping, guarded by one lock."""

    def __init__(
        self,
        state: Tensor,
        num_params: int,
        optimizer: ServerOptimizer,
        num_workers: int,
        *,
        sync_every: int,
        dynamic_local_steps: bool,
        max_updates: int | None = None,
        timeout: float = 1800.0,
    ) -> None:
        self.state, self.num_params, self.n = state, num_params, num_workers
        self.optimizer = optimizer
        optimizer.bind([state[:num_params]], num_workers)  # a view: θ is stepped inside the flat state
        self.sync_every, self.dynamic = sync_every, dynamic_local_steps
        self.max_updates, self.timeout = max_updates, timeout
        self.updates = 0
        self.pushes, self.steps = [0] * num_workers, [0] * num_workers
        self.speeds, self.local_steps = [0.0] * num_workers, [sync_every] * num_workers
        self.staleness_sum, self.staleness_max = 0, 0
        self.pulled_at = [0] * num_workers
        self.done, self.final_sent = [False] * num_workers, [False] * num_workers
        self.last_heard = [time.monotonic()] * num_workers
        self.abort_reason: str | None = None
        self.observers: list[Callable[[PushRecord, Tensor], None]] = []
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the logic (no communication)
    def handle(
        self, message: MessageType, worker: int, steps: int = 0, speed: float = 0.0, payload: Tensor | None = None
    ) -> Reply | None:
        """Answer one request of ``worker`` (``None`` for FAIL); a PUSH is applied here, once."""
        with self.lock:
            self.last_heard[worker] = time.monotonic()
            try:
                message, steps, speed = check_request(float(message), float(steps), float(speed))
            except ProtocolError as err:  # refused whole: nothing of it is applied
                self.abort(f"worker rank {worker} sent a malformed request: {err}")
                return Reply(Status.ABORT)
            if message == MessageType.FAIL:
                self.abort(f"worker rank {worker} failed (its log has the traceback)")
                return None
            if self.abort_reason is None:
                self._check_stalls()
            if self.abort_reason is not None:
                return Reply(Status.ABORT)
            if message == MessageType.PUSH:
                assert payload is not None
                return self._apply(worker, steps, speed, payload)
            if message == MessageType.PULL:
                return Reply(Status.MODEL, self.state.clone(), self.updates, self.local_steps[worker])
            self.done[worker] = True  # DONE or POLL
            if not all(self.done):
                return Reply(Status.WAIT, updates=self.updates)
            self.final_sent[worker] = True
            self.lock.notify_all()
            return Reply(Status.FINAL, self.state.clone(), self.updates, self.local_steps[worker])

    def _apply(self, worker: int, steps: int, speed: float, payload: Tensor) -> Reply:
        g, buffers = payload[: self.num_params], payload[self.num_params :]
        if not bool(torch.isfinite(payload).all()):
            self.abort(f"worker rank {worker} pushed NaN/Inf after {steps} local steps; lower the inner learning rate")
            return Reply(Status.ABORT)
        staleness = self.updates - self.pulled_at[worker]
        self.optimizer.step([g])
        self.state[self.num_params :].copy_(buffers)
        self.updates += 1
        self.pushes[worker] += 1
        self.steps[worker] += steps
        if speed > 0:
            self.speeds[worker] = speed
        self.staleness_sum += staleness
        self.staleness_max = max(self.staleness_max, staleness)
        self.pulled_at[worker] = self.updates
        h = self.local_steps[worker] = self._local_steps_for(worker)
        record = PushRecord(worker, self.updates, staleness, steps, speed, max(self.speeds), h)
        for observer in self.observers:
            observer(record, g)
        stop = self.max_updates is not None and self.updates >= self.max_updates
        return Reply(Status.MODEL, self.state.clone(), self.updates, h, staleness, stop)

    def _local_steps_for(self, worker: int) -> int:
        """DyLU: ``H_i = max(1, ceil(H · v_i / max_j v_j))`` over the speeds reported so far.

        Rounded up as the open HALoS implementation of the paper does (``max(1, math.ceil(H · v_i / v_max))``
        in its ``simulation/common.py``), so a slow worker never gets less than its proportional share of
        steps; rounding down (the paper's formula as other implementations quote it) differs by at most
        one step.
        """
        fastest, v = max(self.speeds), self.speeds[worker]
        if not self.dynamic or fastest <= 0 or v <= 0:
            return self.sync_every
        return max(1, math.ceil(self.sync_every * (v / fastest)))  # v / v is exactly 1: the fastest gets H

    def abort(self, reason: str) -> None:
        with self.lock:
            if self.abort_reason is None:
                self.abort_reason = reason
            self.lock.notify_all()

    def _check_stalls(self) -> None:
        now = time.monotonic()
        for w in range(self.n):
            silent = now - self.last_heard[w]
            if not self.final_sent[w] and silent > self.timeout:
                self.abort(
                    f"worker rank {w} has sent nothing for {silent:.1f} s (timeout {self.timeout:g} s): it died or "
                    "stalled (its own log says why). If it is only slow, raise AsyncLocalSGDStrategy(timeout=...) "
                    "above its longest round of local steps or validation."
                )

    def check(self, worker: int) -> None:
        """Heartbeat of the in-process worker; raises :class:`AsyncTrainingError` if the run was aborted."""
        with self.lock:
            self.last_heard[worker] = time.monotonic()
            if self.abort_reason is None:
                self._check_stalls()
            if self.abort_reason is not None:
                raise AsyncTrainingError(f"asynchronous training aborted: {self.abort_reason}")

    def wait(self, worker: int, seconds: float) -> None:
        with self.lock:
            self.lock.wait(seconds)
        self.check(worker)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """A consistent cut: taken under the lock, between two pushes."""
        with self.lock:
            return {
                "optimizer": self.optimizer.state_dict(),
                "buffers": self.state[self.num_params :].clone(),
                "num_workers": self.n,
                "updates": self.updates,
                "pushes": list(self.pushes),
                "steps": list(self.steps),
                "speeds": list(self.speeds),
                "local_steps": list(self.local_steps),
                "staleness_sum": self.staleness_sum,
                "staleness_max": self.staleness_max,
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_workers"]) != self.n:
            raise ValueError(
                f"the checkpoint's parameter server had {state['num_workers']} workers, this run has {self.n}: "
                "resume on the same number of processes, or start a new run from the checkpoint's state_dict"
            )
        with self.lock:
            self.optimizer.load_state_dict(state["optimizer"])
            self.state[self.num_params :].copy_(state["buffers"])
            self.updates = int(state["updates"])
            self.pushes, self.steps = list(state["pushes"]), list(state["steps"])
            self.speeds, self.local_steps = list(state["speeds"]), list(state["local_steps"])
            self.staleness_sum, self.staleness_max = int(state["staleness_sum"]), int(state["staleness_max"])
            self.pulled_at = [self.updates] * self.n  # every worker starts from the restored θ

    # ------------------------------------------------------------------ transport (rank 0's thread)
    def start(self, comm: Collectives, group: Group) -> None:
        self.thread = threading.Thread(target=self.serve, args=(comm, group), name="async-localsgd-server", daemon=True)
        self.thread.start()

    def serve(self, comm: Collectives, group: Group) -> None:
        """Answer remote workers until each has received the final model (or the run is aborted)."""
        remote = [w for w in group.ranks if w != group.ranks[0]]
        header = torch.zeros(HEADER, dtype=torch.float64)
        payload = torch.empty_like(self.state)
        try:
            while not all(self.final_sent[w] for w in remote):
                src = comm.recv_(header, None, group, purpose="server_wait", tag=TAG_REQUEST)
                try:
                    message, steps, speed = parse_request(header)
                except ProtocolError as err:
                    self.abort(f"worker rank {src} sent a malformed request: {err}")
                    comm.send(Reply(Status.ABORT).header(), src, group, purpose="pull", tag=TAG_REPLY)
                    continue
                if message == MessageType.PUSH:
                    comm.recv_(payload, src, group, purpose="server_wait", tag=TAG_PUSH)
                reply = self.handle(message, src, steps, speed, payload if message == MessageType.PUSH else None)
                if reply is None:
                    continue
                comm.send(reply.header(), src, group, purpose="pull", tag=TAG_REPLY)
                if reply.state is not None:
                    comm.send(reply.state, src, group, purpose="pull", tag=TAG_MODEL)
        except Exception as err:
            with self.lock:
                self._check_stalls()  # a timed-out receive: name the silent worker if there is one
            waiting = [w for w in remote if not self.final_sent[w]]
            self.abort(f"the parameter server thread failed while workers {waiting} were running: {err}")


class LocalClient:
    """Rank 0's own worker: calls the server in-process (no network)."""

    def __init__(self, server: ParameterServer, rank: int = 0) -> None:
        self.server, self.rank = server, rank

    def request(
        self, message: MessageType, steps: int = 0, speed: float = 0.0, payload: Tensor | None = None
    ) -> Reply | None:
        if payload is not None:  # the server's θ lives in host memory
            payload = payload.to(self.server.state.device)
        reply = self.server.handle(message, self.rank, steps, speed, payload)
        if reply is not None and reply.status == Status.ABORT:
            raise AsyncTrainingError(f"asynchronous training aborted: {self.server.abort_reason}")
        return reply

    def check(self) -> None:
        """Heartbeat; raises if the run was aborted (e.g. a remote worker went silent)."""
        self.server.check(self.rank)

    def wait(self, seconds: float) -> None:
        self.server.wait(self.rank, seconds)
