"""EASGD: Elastic Averaging SGD (Zhang, Choromanska, LeCun, NeurIPS 2015), LSGD's baseline."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.comm import NonFinitePolicy
from lightning_localsgd.params import BufferPolicy, all_finite, copy_, flatten, lerp_, snapshot, unflatten_


def _rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r} (e.g. {name}=0.9)")
    return float(value)


class ElasticAveraging(ConsensusAlgorithm):
    r"""EASGD: the replicas and a center variable attract each other every ``sync_every`` steps.

    .. math::
        \text{every step:}\quad & x_i \leftarrow \text{inner\_step}(x_i) \qquad\text{(no communication)}\\
        \text{every } \tau \text{ steps:}\quad & m = \tfrac1n \textstyle\sum_j x_j \qquad\text{(one allreduce)}\\
            & x_i \leftarrow x_i - \alpha\,(x_i - \tilde x)\\
            & \tilde x \leftarrow \tilde x + \beta\,(m - \tilde x)
              = \tilde x + \beta\,\tfrac1n \textstyle\sum_j (x_j - \tilde x)

    Both updates use the values from *before* the sync: the mean m is taken first, then the workers
    move toward the old center, then the center moves toward m. The default
    :math:`\alpha = \beta / n` is the authors' choice (the "symmetric" force: the center moves by
    as much as all workers together); :math:`\beta = 0.9` is the EASGD paper's. The center
    :math:`\tilde x` (parameters, and floating buffers under ``buffers="average"``) is identical
    on every rank and lives in the checkpoint. What travels is :math:`x_i - \tilde x`, so
    ``LocalSGDStrategy(comm_dtype="bfloat16")`` works with the center as the shared anchor.

    **The model is the center.** Evaluation during fit, the model a checkpoint's ``state_dict``
    stores and the model every rank holds after fit are :math:`\tilde x`; the replicas are swapped
    back exactly after evaluation. When fit ends with local steps since the last sync, one last
    elastic update runs first so that those steps count. None of this communicates (except
    rank 0's buffers under ``buffers="broadcast"``).

    **Cost.** One allreduce of P values every τ steps, the same bytes as
    :class:`~lightning_localsgd.PeriodicAveraging` (1/τ of DDP's). Memory: the center (one
    fp32-or-wider copy of the model) plus a P-sized buffer during a sync.

    Example::

        trainer = Trainer(strategy="localsgd", devices=4, callbacks=[ElasticAveraging(sync_every=4, beta=0.9)])

    Args:
        sync_every: τ, optimizer steps between elastic updates.
        alpha: α in (0, 1], the workers' step toward the center (``None``: β / n).
        beta: β in (0, 1], the center's step toward the workers' mean.
        warmup_steps: DDP-style gradient averaging for this many first steps (the center follows).
        buffers: ``"average"`` (elastic like parameters), ``"broadcast"`` (rank 0's) or ``"local"``.
        nonfinite: a replica holding NaN/Inf at a sync: ``"raise"``, or ``"skip"`` it (the center
            moves toward the mean of the finite replicas; the bad replica is reset to the center).
    """

    def __init__(
        self,
        sync_every: int,
        alpha: float | None = None,
        beta: float = 0.9,
        *,
        warmup_steps: int = 0,
        buffers: BufferPolicy = "average",
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(sync_every, warmup_steps=warmup_steps, buffers=buffers, nonfinite=nonfinite)
        self.alpha = None if alpha is None else _rate("alpha", alpha)
        self.beta = _rate("beta", beta)
        self.center: list[Tensor] | None = None
        self._pending_center: Tensor | None = None  # read from a checkpoint, applied at attach

    @property
    def moving_rate(self) -> float:
        """α in use: the given one, or β / n once attached."""
        return self.alpha if self.alpha is not None else self.beta / self.strategy.world_group.size

    # ------------------------------------------------------------------ driven by the strategy
    def attach(self, strategy: Any) -> None:
        super().attach(strategy)
        averaged, _ = self.tensors()
        self.center = snapshot(averaged)
        if self._pending_center is not None:  # restored: identical on every rank (rank 0 saved it)
            unflatten_(self._pending_center.to(self.center[0].device), self.center)
        elif not self.is_synced():  # loaded mid-period from a checkpoint without a center: agree on one
            strategy.comm.mean_(self.center, strategy.world_group, kind="setup")
        self._pending_center = None

    def after_step(self, step: int) -> None:
        if self.in_warmup(step):  # gradients were averaged: replicas are equal, the center follows them
            copy_(self._center(), self.tensors()[0])
        super().after_step(step)

    def sync(self, step: int) -> None:
        averaged, broadcast = self.tensors()
        center = self._center()
        finite = all_finite(averaged)
        mean = flatten(averaged)  # becomes m; x_i − x̃ travels (the center is the shared anchor)
        self.strategy.comm.mean_(
            [mean],
            self.strategy.world_group,
            kind="sync",
            anchor=center,
            nonfinite=self.nonfinite,
            step=step,
            observer=self.strategy.sync_observer(step),
        )
        if finite:
            lerp_(averaged, center, self.moving_rate)  # x_i ← x_i − α(x_i − x̃), the old x̃
        else:  # nonfinite="skip" (else mean_ raised): this replica restarts from the center
            copy_(averaged, center)
        sizes = [t.numel() for t in center]
        m = [c.view_as(t) for c, t in zip(mean.split(sizes), center, strict=True)]
        lerp_(center, m, self.beta)  # x̃ ← x̃ + β(m − x̃)
        if broadcast:  # buffers="broadcast": rank 0's
            self.broadcast_buffers_(broadcast)

    def _center(self) -> list[Tensor]:
        if self.center is None:
            raise RuntimeError("ElasticAveraging has no center yet: it is created when fit starts")
        return self.center

    def _center_names(self) -> list[str]:
        """State-dict names of the center's tensors, in :meth:`tensors` order."""
        module = self.module
        names = [name for name, _ in module.named_parameters()]
        if self.buffers == "average":
            names += [name for name, b in module.named_buffers() if torch.is_floating_point(b)]
        return names

    # ------------------------------------------------------------------ the model is the center
    def begin_evaluation(self) -> None:
        if self._stash is not None:
            return
        named = self._named_state()
        self._stash = {name: t.detach().clone() for name, t in named.items()}
        averaged, broadcast = self.tensors()
        copy_(averaged, self._center())
        if broadcast:  # buffers="broadcast": rank 0's
            self.broadcast_buffers_(broadcast)

    def consensus_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        out = dict(state_dict)
        for name, c in zip(self._center_names(), self._center(), strict=True):
            out[name] = c.detach().to(dtype=state_dict[name].dtype, copy=True)
        return out

    def finalize(self, step: int) -> None:
        if not self.is_synced():
            self.sync(step)
            self.last_sync_step = step
            self.num_syncs += 1
        copy_(self.tensors()[0], self._center())

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.center is not None:
            state["center"] = flatten(self.center).cpu()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._pending_center = state_dict.get("center")
