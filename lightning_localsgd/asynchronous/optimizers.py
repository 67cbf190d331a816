"""Outer optimizers of the asynchronous parameter server: Delayed Nesterov and the plain baselines.

A server optimizer is applied once per *push* (one worker's pseudo-gradient), not once per round of
all workers. It owns the global model θ (a list of fp32-or-wider tensors it updates in place) and
its own state, so that a checkpoint of ``state_dict()`` resumes the server exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_localsgd._checks import check_bool, check_int, check_number

__all__ = ["DelayedNesterov", "OuterSGD", "ServerOptimizer"]


class ServerOptimizer:
    """The interface the parameter server drives: :meth:`bind` to θ, then :meth:`step` once per push."""

    def __init__(self, lr: float) -> None:
        check_number("lr", lr, 0, low_open=True, example="0.7")
        self.lr = float(lr)
        self.params: list[Tensor] = []
        self.t = 0  # pushes applied since bind

    def bind(self, params: Sequence[Tensor], num_workers: int) -> None:
        """Take ``params`` (θ, updated in place from now on) and reset the state for ``num_workers``."""
        self.params = list(params)
        self.t = 0

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor]) -> None:
        """Apply one push's pseudo-gradient ``g = x_pulled − x_worker`` (one tensor per θ tensor)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"theta": [p.detach().clone() for p in self.params], "t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore θ (in place) and the state; call after :meth:`bind`."""
        theta = state["theta"]
        if [tuple(t.shape) for t in theta] != [tuple(p.shape) for p in self.params]:
            raise ValueError("the saved server model has other shapes than this model: resume with the same model")
        with torch.no_grad():
            for p, saved in zip(self.params, theta):
                p.copy_(saved)
        self.t = int(state["t"])


class DelayedNesterov(ServerOptimizer):
    r"""Delayed Nesterov (DN): Nesterov momentum refreshed once per block of N pushes.

    With outer learning rate :math:`\varepsilon` (``lr``), momentum :math:`\beta`, buffer size
    :math:`N` and momentum activation :math:`c`, every push :math:`g_t` does

    .. math::
        \Delta &\leftarrow \Delta + g_t \\
        \text{if } (t+1) \bmod N = 0:\quad m &\leftarrow \beta m + \Delta / N,\qquad
            \theta \leftarrow \theta - \varepsilon\big((1 - cN + c)\,\beta m + g_t / N\big),\qquad
            \Delta \leftarrow 0 \\
        \text{else:}\quad \theta &\leftarrow \theta - \varepsilon\,(c\,\beta m + g_t / N) \\
        t &\leftarrow t + 1

    With :math:`c = 0` a block of N pushes moves θ by exactly one Nesterov step (learning rate ε)
    on the mean of its N pseudo-gradients, while every push still refreshes θ by
    :math:`\varepsilon g_t / N`. For a constant pseudo-gradient g the momentum reaches
    :math:`m = g/(1-\beta)` and a block moves θ by :math:`\varepsilon g/(1-\beta)`: the 1/N of each
    push is undone by the N pushes of a block, so DN at ε takes the steady-state step of synchronous
    DiLoCo at outer lr ε per n pushes (N = n), hence the default ε = 0.7 (DiLoCo's). Naive per-push
    Nesterov (:class:`OuterSGD`) at lr α moves :math:`n\alpha g/(1-\beta)` per n pushes. With
    :math:`N = 1, c = 0` this is
    ``torch.optim.SGD(lr, momentum, nesterov=True)``. :math:`c \in [0, 1/N]` spreads the momentum
    term over the pushes of the block (:math:`c = 1/N`: :math:`\beta m/N` on every push).
    Liu et al., "Asynchronous Local-SGD Training for Language Modeling", arXiv 2401.09135.

    Example::

        AsyncLocalSGDStrategy(sync_every=20, outer_optimizer=DelayedNesterov(lr=0.7, momentum=0.9))

    Args:
        lr: ε, the outer learning rate (default 0.7: the step per n pushes of sync DiLoCo at 0.7).
        momentum: β in [0, 1).
        buffer_size: N, pushes per momentum refresh; ``None``: the number of workers.
        activation: c in [0, 1/N].
    """

    def __init__(
        self, lr: float = 0.7, momentum: float = 0.9, buffer_size: int | None = None, activation: float = 0.0
    ) -> None:
        super().__init__(lr)
        self.momentum = check_number("momentum", momentum, 0, 1, high_open=True, example="0.9")
        if buffer_size is not None:
            check_int("buffer_size (None: the number of workers)", buffer_size)
        self.buffer_size = buffer_size
        self.activation = check_number("activation", activation, 0, 1.0 / (buffer_size or 1), example="0.0")
        self.n = buffer_size or 1  # N in use, fixed at bind
        self.m: list[Tensor] = []
        self.delta: list[Tensor] = []

    def bind(self, params: Sequence[Tensor], num_workers: int) -> None:
        super().bind(params, num_workers)
        self.n = self.buffer_size or num_workers
        if self.activation > 1.0 / self.n:
            raise ValueError(
                f"activation={self.activation} is above 1/N = {1.0 / self.n:g} for buffer_size N={self.n}: "
                f"use activation in [0, {1.0 / self.n:g}]"
            )
        self.m = [torch.zeros_like(p) for p in self.params]
        self.delta = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor]) -> None:
        n, beta, c, lr = self.n, self.momentum, self.activation, self.lr
        block_end = (self.t + 1) % n == 0
        for theta, m, delta, g in zip(self.params, self.m, self.delta, grads, strict=True):
            g = g.to(theta.dtype)
            delta.add_(g)
            if block_end:
                m.mul_(beta).add_(delta, alpha=1.0 / n)
                update = (g / n).add(m, alpha=(1.0 - c * n + c) * beta)
                delta.zero_()
            else:
                update = (g / n).add(m, alpha=c * beta)
            theta.add_(update, alpha=-lr)
        self.t += 1

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(m=[t.clone() for t in self.m], delta=[t.clone() for t in self.delta], buffer_size=self.n)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["buffer_size"]) != self.n:
            raise ValueError(
                f"the checkpoint's Delayed Nesterov used buffer_size N={state['buffer_size']}, this run N={self.n}: "
                f"pass DelayedNesterov(..., buffer_size={state['buffer_size']}) to resume exactly"
            )
        super().load_state_dict(state)
        with torch.no_grad():
            for dst, src in zip(self.m + self.delta, list(state["m"]) + list(state["delta"]), strict=True):
                dst.copy_(src)


class OuterSGD(ServerOptimizer):
    r"""``torch.optim.SGD`` applied to θ once per push: the paper's naive asynchronous baselines.

    .. math::
        b \leftarrow \beta b + g_t,\qquad
        \theta \leftarrow \theta - \varepsilon\,(g_t + \beta b)\ \text{(Nesterov)}\quad\text{or}\quad
        \theta \leftarrow \theta - \varepsilon\, b\ \text{(heavy ball; plain SGD when } \beta = 0)

    Plain async Nesterov is ``OuterSGD(lr, momentum=0.9, nesterov=True)``; plain async SGD is
    ``OuterSGD(lr)``. Unlike :class:`DelayedNesterov`, every (possibly stale) push moves the momentum.

    Args:
        lr: ε, the outer learning rate.
        momentum: β in [0, 1).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
    """

    def __init__(self, lr: float, momentum: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(lr)
        self.momentum = check_number("momentum", momentum, 0, 1, high_open=True, example="0.9")
        check_bool("nesterov", nesterov)
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0: pass OuterSGD(lr, momentum=0.9, nesterov=True)")
        self.nesterov = nesterov
        self.optimizer: torch.optim.SGD | None = None

    def bind(self, params: Sequence[Tensor], num_workers: int) -> None:
        super().bind(params, num_workers)
        self.optimizer = torch.optim.SGD(self.params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor]) -> None:
        assert self.optimizer is not None, "bind() first"
        for theta, g in zip(self.params, grads, strict=True):
            theta.grad = g.to(theta.dtype)
        self.optimizer.step()
        for theta in self.params:
            theta.grad = None
        self.t += 1

    def state_dict(self) -> dict[str, Any]:
        assert self.optimizer is not None, "bind() first"
        state = super().state_dict()
        state["sgd"] = copy.deepcopy(self.optimizer.state_dict())  # a snapshot, not live buffers
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None, "bind() first"
        super().load_state_dict(state)
        self.optimizer.load_state_dict(state["sgd"])
