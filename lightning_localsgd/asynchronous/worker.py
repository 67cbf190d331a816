"""One rank's side of asynchronous Local-SGD: rounds of local steps, pushes and pulls (no Lightning here)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_localsgd.asynchronous.protocol import MessageType, RemoteClient, Reply, Status
from lightning_localsgd.asynchronous.server import LocalClient
from lightning_localsgd.transport.tensors import flatten, unflatten_

__all__ = ["AsyncWorker", "reconcile", "resume_problem", "state_dtype"]


def state_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype of the global state: float64 for a float64 model, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def resume_problem(part: dict[str, Any] | None, path: str, world_size: int) -> str | None:
    """Why a worker's part ``path`` (``None``: no file) cannot be resumed from exactly, or ``None``."""
    if part is None:
        return f"{path} does not exist (the worker's part of the checkpoint)"
    if "lightning" not in part:
        return f"{path} holds no loop state (written by an older lightning-localsgd)"
    if part["world_size"] != world_size:
        return f"{path} was written by {part['world_size']} workers, this run has {world_size}"
    return None


def reconcile(
    worker: dict[str, Any], server: dict[str, Any], rank: int
) -> tuple[dict[str, Any], tuple[int, int] | None]:
    """Match a worker's part (its :meth:`AsyncWorker.state_dict`) with the server's cut in rank 0's file.

    Rank 0 writes the cut at its own step, the worker its part at its own; they agree when the cut holds
    exactly the pushes the part counts. If the cut holds more (pushed after the part, before the cut),
    the replay ``(steps, pushes)`` for :class:`AsyncWorker` is returned: those steps are trained again
    without pushing. If it holds fewer (pushed after the cut was written), those pseudo-gradients are
    not in θ: lost, with a warning, and the worker's push and step counters are set back by them so that
    they keep matching the server's. Returns the worker state to resume from and the replay (or ``None``).
    """
    mine, held = int(worker["pushes"]), int(server["pushes"][rank])
    pushed_steps, held_steps = int(worker["steps"]) - int(worker["steps_since_pull"]), int(server["steps"][rank])
    if held > mine:
        warnings.warn(
            f"rank {rank}: the server's cut in the checkpoint already holds {held - mine} push(es) this worker made "
            f"after writing its part (its local steps {pushed_steps + 1}..{held_steps}): it trains steps "
            f"{int(worker['steps']) + 1}..{held_steps} again to restore its optimizer state and data position without "
            "pushing them (each step is in the global model once), then pulls the global model; its inner optimizer "
            "state after the replay is not the first run's (docs/async.md, 'Resuming')",
            UserWarning,
            stacklevel=2,
        )
        return worker, (held_steps, held)
    if held < mine:
        warnings.warn(
            f"rank {rank}: {mine - held} push(es) of this worker (its local steps {held_steps + 1}..{pushed_steps}) "
            "reached the server after rank 0 wrote the checkpoint's cut: their pseudo-gradients are not in the "
            "restored global model (lost); the worker continues from its own part (docs/async.md, 'Resuming')",
            UserWarning,
            stacklevel=2,
        )
        return {**worker, "pushes": held, "steps": int(worker["steps"]) - (pushed_steps - held_steps)}, None
    return worker, None


class AsyncWorker:
    r"""Runs :math:`H_i` local steps from the last pulled model, then pushes :math:`g = x_\text{pulled} - x_i`.

    Speed :math:`v_i` is optimizer steps per second of the last round (step time = wall-clock from
    the end of the previous step to the end of this one, validation and communication excluded),
    smoothed as :math:`v \leftarrow s\,v + (1 - s)\,v_\text{round}`; the server turns it into the
    next :math:`H_i`. With ``slowdown = f > 1`` every step is followed by a sleep of
    :math:`(f - 1)\times` its measured time, so this rank is ``f`` times slower.

    Args:
        client: the way to the server (in-process on rank 0, point-to-point elsewhere).
        tensors: returns the synchronized tensors (trainable parameters, then floating buffers).
        num_params: how many leading values of the flat state are parameters.
        anchor: the flat state every worker starts from (the global model).
        sync_every: H, the first round's length (the server assigns the next ones).
        slowdown: this rank's slowdown factor.
        speed_smoothing: s, weight of the previous speed estimate.
        poll_interval: seconds between POLL requests while waiting for the other workers at the end.
        restored: the checkpoint's server state; this worker continues its counters and speed.
        rank: this worker's global rank.
        resumed: this worker's own :meth:`state_dict` from the checkpoint: it continues its round
            exactly (the model it pulled, the steps since, its counters), with its own replica.
        replay: ``(steps, pushes)``: the restored server already holds this worker's pushes up to its
            local step ``steps`` (``pushes`` of them; some made after it wrote ``resumed``): it trains up
            to that step again without pushing (those steps are in θ once), then pulls θ and starts a
            fresh round.
    """

    def __init__(
        self,
        client: LocalClient | RemoteClient,
        tensors: Callable[[], list[Tensor]],
        num_params: int,
        anchor: Tensor,
        *,
        sync_every: int,
        slowdown: float = 1.0,
        speed_smoothing: float = 0.5,
        poll_interval: float = 0.05,
        restored: dict[str, Any] | None = None,
        rank: int = 0,
        resumed: dict[str, Any] | None = None,
        replay: tuple[int, int] | None = None,
    ) -> None:
        self.client, self.tensors, self.num_params, self.anchor = client, tensors, num_params, anchor
        self.slowdown, self.speed_smoothing, self.poll_interval = slowdown, speed_smoothing, poll_interval
        self.local_steps, self.speed, self.pushes, self.steps, self.staleness = sync_every, 0.0, 0, 0, 0
        if restored is not None:  # continue this worker's counters and DyLU state
            self.pushes, self.steps = int(restored["pushes"][rank]), int(restored["steps"][rank])
            self.speed, self.local_steps = float(restored["speeds"][rank]), int(restored["local_steps"][rank])
        self.steps_since_pull, self.round_time = 0, 0.0
        if resumed is not None:  # this worker's own state at its checkpoint: continue the round it was in
            self.anchor = resumed["anchor"].to(anchor.device, anchor.dtype)
            self.steps_since_pull, self.round_time = int(resumed["steps_since_pull"]), float(resumed["round_time"])
            self.local_steps, self.speed = int(resumed["local_steps"]), float(resumed["speed"])
            self.pushes, self.steps = int(resumed["pushes"]), int(resumed["steps"])
            self.staleness = int(resumed["staleness"])
        self.replay_until, self.replay_pushes = (None, 0) if replay is None or replay[0] <= self.steps else replay
        self.step_start = time.monotonic()
        self._stash: list[Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        """This worker's place in its round (what a resume needs besides its replica and optimizer)."""
        return {
            "anchor": self.anchor.detach().cpu().clone(),
            "steps_since_pull": self.steps_since_pull,
            "round_time": self.round_time,
            "local_steps": self.local_steps,
            "speed": self.speed,
            "pushes": self.pushes,
            "steps": self.steps,
            "staleness": self.staleness,
        }

    def replica(self) -> list[Tensor]:
        """This worker's synchronized tensors (the parked replica while a validation swap is active)."""
        return self._stash if self._stash is not None else [t.detach() for t in self.tensors()]

    def after_step(self) -> Reply | None:
        """Call after every optimizer step; pushes (and returns the server's reply) when the round is over."""
        if self.slowdown > 1:  # emulate a slower device: this step takes `slowdown` times as long
            time.sleep((self.slowdown - 1) * (time.monotonic() - self.step_start))
        self.round_time += time.monotonic() - self.step_start
        self.steps_since_pull += 1
        self.steps += 1
        self.client.check()  # rank 0: heartbeat, and fail fast if another worker died or stalled
        if self.replay_until is not None:  # a step the restored server already holds: no push
            reply = self.end_replay() if self.steps >= self.replay_until else None
        else:
            reply = self.push() if self.steps_since_pull >= self.local_steps else None
        self.step_start = time.monotonic()
        return reply

    @torch.no_grad()
    def push(self) -> Reply:
        measured = self.steps_since_pull / max(self.round_time, 1e-9)
        s = self.speed_smoothing
        self.speed = measured if self.speed == 0 else s * self.speed + (1 - s) * measured
        payload = flatten(self.tensors(), self.anchor.dtype)
        payload[: self.num_params].neg_().add_(self.anchor[: self.num_params])  # g = x_pulled − x_i; buffers as is
        reply = self.client.request(MessageType.PUSH, self.steps_since_pull, self.speed, payload)
        assert reply is not None and reply.state is not None
        self.adopt(reply.state)
        self.pushes += 1
        self.staleness, self.local_steps = reply.staleness, reply.local_steps
        self.steps_since_pull, self.round_time = 0, 0.0
        return reply

    def end_replay(self) -> Reply:
        """The steps the server held are trained again: pull θ (it holds each of them once), start a round."""
        reply = self.client.request(MessageType.PULL)
        assert reply is not None and reply.state is not None
        self.adopt(reply.state)
        self.local_steps, self.pushes, self.replay_until = reply.local_steps, self.replay_pushes, None
        self.steps_since_pull, self.round_time = 0, 0.0
        return reply

    def adopt(self, state: Tensor) -> None:
        """Load the server's state (in host memory) into the module; it is the new anchor, on the module's device."""
        state = state.to(self.anchor.device)
        unflatten_(state, self.tensors())
        self.anchor = state

    def finish(self) -> None:
        """Push the last partial round, say DONE, wait for the others and adopt the final global model."""
        if self.steps_since_pull > 0 and self.replay_until is None:  # replayed steps are in θ already
            self.push()
        reply = self.client.request(MessageType.DONE)
        while reply is not None and reply.status == Status.WAIT:
            self.client.wait(self.poll_interval)
            reply = self.client.request(MessageType.POLL)
        assert reply is not None and reply.state is not None
        self.adopt(reply.state)

    def begin_evaluation(self) -> None:
        """Swap the replica for the server's current global model (no update on the server)."""
        reply = self.client.request(MessageType.PULL)
        assert reply is not None and reply.state is not None
        tensors = self.tensors()
        self._stash = [t.detach().clone() for t in tensors]
        unflatten_(reply.state, tensors)

    def end_evaluation(self) -> None:
        if self._stash is None:
            return
        with torch.no_grad():
            for t, saved in zip(self.tensors(), self._stash, strict=True):
                t.copy_(saved)
        self._stash = None
        self.step_start = time.monotonic()  # validation time is not step time

    def metrics(self) -> dict[str, float]:
        return {
            "async/local_steps": float(self.local_steps),
            "async/speed": self.speed,
            "async/pushes": float(self.pushes),
            "async/staleness": float(self.staleness),
        }
