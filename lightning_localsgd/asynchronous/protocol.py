"""The request/reply protocol between asynchronous workers and the parameter server on rank 0.

Every request gets exactly one reply (except ``FAIL``), so the server never sends to a worker that is
not waiting for it, and a worker only ever waits for the answer to its own request:

=========  ====================================  ===============================================
request    payload                               reply
=========  ====================================  ===============================================
PUSH       steps, speed, ``[g | buffers]``       MODEL + new state, its H_i, staleness, stop flag
PULL       –                                     MODEL + current state (validation; no update)
DONE       –                                     FINAL + state when every worker is done, else WAIT
POLL       –                                     as DONE (sent every ``poll_interval`` after WAIT)
FAIL       –                                     none: the server aborts the run
=========  ====================================  ===============================================

After an abort every request is answered ``ABORT``. Headers are 6 float64 values; a request travels
as header (+ payload) with tags ``TAG_REQUEST``/``TAG_PUSH``, a reply as header (+ state) with
``TAG_REPLY``/``TAG_MODEL``, all on a process group used by nothing else. Rank 0's own worker skips
the network: :class:`~lightning_localsgd.asynchronous.server.LocalClient` calls
:meth:`ParameterServer.handle` in-process.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

from lightning_localsgd.transport.collectives import Collectives, Group

__all__ = [
    "AsyncTrainingError",
    "MessageType",
    "ProtocolError",
    "RemoteClient",
    "Reply",
    "Status",
    "check_request",
    "parse_request",
]

HEADER = 6
TAG_REQUEST, TAG_PUSH, TAG_REPLY, TAG_MODEL = 11, 12, 13, 14


class AsyncTrainingError(RuntimeError):
    """Asynchronous training cannot continue: a worker or the parameter server died, stalled or failed."""


class ProtocolError(AsyncTrainingError):
    """A request that does not follow the protocol (unknown type, or steps/speed that are not finite)."""


class MessageType(IntEnum):
    """What a worker's request asks for (the table above); travels as the header's first value.

    Not to be confused with the byte counter's ``purpose`` (``comm.send(..., purpose="push")``), the
    category a transfer is booked under.
    """

    PUSH = 1
    PULL = 2
    DONE = 3
    POLL = 4
    FAIL = 5


class Status(IntEnum):
    MODEL = 1
    WAIT = 2
    FINAL = 3
    ABORT = 4


@dataclass
class Reply:
    status: Status
    state: Tensor | None = None  # [θ | buffers] for MODEL and FINAL
    updates: int = 0  # pushes the server has applied so far
    local_steps: int = 0  # H_i for the worker's next round
    staleness: int = 0  # of the push this replies to
    stop: bool = False  # max_updates reached: finish the current round and stop

    def header(self) -> Tensor:
        values = [float(self.status), self.updates, self.local_steps, self.staleness, float(self.stop), 0.0]
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def from_header(cls, header: Tensor, state: Tensor | None) -> Reply:
        status, updates, local_steps, staleness, stop, _ = header.tolist()
        return cls(Status(int(status)), state, int(updates), int(local_steps), int(staleness), bool(stop))


def check_request(message: float, steps: float, speed: float) -> tuple[MessageType, int, float]:
    """The request's type, steps and speed, or :class:`ProtocolError` naming the bad field.

    The server validates every request before acting on it, so a malformed one is refused whole:
    nothing of it is applied.
    """
    if not math.isfinite(message) or message not in {float(m) for m in MessageType}:
        raise ProtocolError(f"an unknown message type {message!r} (expected one of {[int(m) for m in MessageType]})")
    if not math.isfinite(steps) or steps < 0 or steps != int(steps):
        raise ProtocolError(f"steps={steps!r}, not a number of local steps")
    if not math.isfinite(speed) or speed < 0:
        raise ProtocolError(f"speed={speed!r}, not a finite speed >= 0 (steps per second)")
    return MessageType(int(message)), int(steps), float(speed)


def parse_request(header: Tensor) -> tuple[MessageType, int, float]:
    """A request header's type, steps and speed, validated (:func:`check_request`); one host read."""
    message, steps, speed = header[:3].tolist()
    return check_request(message, steps, speed)


class RemoteClient:
    """A worker on rank > 0: requests over the server's dedicated process group, replies from its first rank."""

    def __init__(self, comm: Collectives, group: Group, state_numel: int, dtype: torch.dtype, rank: int) -> None:
        self.comm, self.group, self.rank = comm, group, rank
        self.server_rank = group.ranks[0]
        self.state = torch.empty(state_numel, dtype=dtype)

    def request(
        self, message: MessageType, steps: int = 0, speed: float = 0.0, payload: Tensor | None = None
    ) -> Reply | None:
        header = torch.tensor([float(message), steps, speed, 0.0, 0.0, 0.0], dtype=torch.float64)
        what = "push" if message == MessageType.PUSH else "control"
        try:
            self.comm.send(header, self.server_rank, self.group, purpose=what, tag=TAG_REQUEST)
            if payload is not None:  # staged through host memory: the server's group is gloo
                self.comm.send(payload.to(self.state.device), self.server_rank, self.group, purpose=what, tag=TAG_PUSH)
            if message == MessageType.FAIL:
                return None
            self.comm.recv_(header, self.server_rank, self.group, purpose="wait", tag=TAG_REPLY)
            reply = Reply.from_header(header, None)
            if reply.status in (Status.MODEL, Status.FINAL):
                self.comm.recv_(self.state, self.server_rank, self.group, purpose="wait", tag=TAG_MODEL)
                reply.state = self.state.clone()
        except RuntimeError as err:
            raise AsyncTrainingError(
                f"rank {self.rank} lost the parameter server on rank {self.server_rank} during a {message.name}: "
                f"{err}. "
                f"Rank {self.server_rank} died or stalled (see its log), or the strategy's timeout is shorter than "
                "the server's longest silence."
            ) from err
        if reply.status == Status.ABORT:
            raise AsyncTrainingError(
                f"asynchronous training aborted by the parameter server on rank {self.server_rank}: another worker "
                "died, stalled or failed (rank 0's error names it)"
            )
        return reply

    def check(self) -> None:
        """Nothing to check locally: a lost server shows at the next request."""

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)
