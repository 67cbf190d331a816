"""DiLoCo / FedOpt: a stock outer optimizer stepping on the replicas' pseudo-gradient."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.comm import NonFinitePolicy
from lightning_localsgd.params import BufferPolicy, copy_, flatten, snapshot, unflatten_

OuterOptimizer = Callable[[Iterable[Tensor]], Optimizer]
"""``params -> Optimizer``, e.g. ``functools.partial(torch.optim.Adam, lr=1e-3)`` (jsonargparse's OptimizerCallable)."""


def outer_optimizer_factory(spec: OuterOptimizer | Mapping[str, Any]) -> OuterOptimizer:
    """Turn ``{"class_path": "torch.optim.Adam", "init_args": {...}}`` or a callable into a factory."""
    if isinstance(spec, Mapping):
        if "class_path" not in spec or set(spec) - {"class_path", "init_args"}:
            raise ValueError(
                "outer_optimizer as a dict takes the keys 'class_path' and 'init_args', e.g. "
                f"{{'class_path': 'torch.optim.Adam', 'init_args': {{'lr': 0.001}}}}; got keys {sorted(spec)}"
            )
        path = str(spec["class_path"])
        module_name, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name or "torch.optim"), name)
        except (ImportError, AttributeError):
            cls = None
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
            raise ValueError(
                f"outer_optimizer class_path {path!r} is not a torch.optim.Optimizer: use e.g. 'torch.optim.SGD'"
            )
        return functools.partial(cls, **dict(spec.get("init_args") or {}))
    if not callable(spec):
        raise TypeError(
            "outer_optimizer must be a callable params -> Optimizer such as "
            "functools.partial(torch.optim.Adam, lr=1e-3), or a dict with 'class_path' and 'init_args'; "
            f"got {type(spec).__name__}"
        )
    return spec


class DiLoCo(ConsensusAlgorithm):
    r"""DiLoCo: local inner steps, and every ``sync_every`` steps an *outer* optimizer step.

    .. math::
        \text{every step:}\quad & x_i \leftarrow \text{inner\_step}(x_i, \nabla f_i(x_i;\ \text{batch}))
            \qquad\text{(no communication)}\\
        \text{every } H \text{ steps:}\quad & \Delta = \theta - \tfrac1n \textstyle\sum_i x_i
            \qquad\text{(pseudo-gradient, one allreduce)}\\
        & \theta \leftarrow \text{outer\_opt.step}(\theta,\ \text{grad} = \Delta),\qquad x_i \leftarrow \theta

    :math:`\theta` is the anchor: the last global model, kept in fp32 (fp64 for an fp64 model). The
    default outer optimizer is ``torch.optim.SGD(lr=0.7, momentum=0.9, nesterov=True)`` (Douillard
    et al., "DiLoCo: Distributed Low-Communication Training of Language Models", arXiv 2311.08455);
    any stock optimizer works (FedOpt: Reddi et al., arXiv 2003.00295). Outer SGD with ``lr=1`` and
    no momentum is exactly :class:`~lightning_localsgd.PeriodicAveraging`. Floating buffers
    (BatchNorm statistics) are not stepped by the outer optimizer: they are averaged, broadcast or
    kept local as ``buffers`` says.

    **Which model is "the" model.** At a sync every replica becomes :math:`\theta`. Between syncs,
    validation and the checkpoint's ``state_dict`` use the replicas' plain average (no outer step:
    that would advance the outer momentum). At the end of ``fit`` a partial period is closed by one
    last outer step on its pseudo-gradient, so every rank ends on the anchor.

    **Warm-up.** The first ``warmup_steps`` steps average gradients as DDP does; the anchor is
    re-taken at the end of warm-up so the first pseudo-gradient covers local steps only.

    **Cost.** One allreduce of P values every H steps: 1/H of DDP's bytes (half again with
    ``LocalSGDStrategy(comm_dtype="bfloat16")``, where only ``replica − anchor`` travels). Memory:
    the anchor (P values in fp32, on ``anchor_device``), the outer optimizer's state (P more for
    SGD momentum, 2P for Adam) and a transient P for the pseudo-gradient during the outer step.
    Checkpoints carry the anchor and the outer optimizer's state.

    Example::

        trainer = Trainer(strategy="localsgd", devices=8, callbacks=[DiLoCo(sync_every=500)])
        DiLoCo(100, outer_optimizer=functools.partial(torch.optim.Adam, lr=1e-3), anchor_device="cpu")

    In LightningCLI YAML, ``outer_optimizer`` is written like Lightning's own optimizer callables::

        outer_optimizer:
          class_path: torch.optim.Adam
          init_args: {lr: 0.001}

    Args:
        sync_every: H, inner optimizer steps between outer steps.
        outer_optimizer: a callable ``params -> Optimizer`` or a ``{"class_path", "init_args"}``
            dict; ``None`` builds SGD from ``outer_lr``, ``outer_momentum`` and ``nesterov``.
        outer_lr: learning rate of the default outer SGD.
        outer_momentum: momentum of the default outer SGD, in [0, 1).
        nesterov: Nesterov momentum for the default outer SGD (needs ``outer_momentum > 0``).
        anchor_device: where the anchor and outer state live (``"cpu"`` saves accelerator memory);
            ``None``: beside the parameters.
        warmup_steps: DDP-style gradient averaging for this many first steps.
        buffers: ``"average"``, ``"broadcast"`` (rank 0's) or ``"local"`` floating buffers.
        nonfinite: ``"raise"`` or ``"skip"`` a replica holding NaN/Inf at a sync.
    """

    def __init__(
        self,
        sync_every: int = 500,
        *,
        outer_optimizer: OuterOptimizer | dict[str, Any] | None = None,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        anchor_device: str | torch.device | None = None,
        warmup_steps: int = 0,
        buffers: BufferPolicy = "average",
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(sync_every, warmup_steps=warmup_steps, buffers=buffers, nonfinite=nonfinite)
        if isinstance(outer_lr, bool) or not isinstance(outer_lr, (int, float)) or not outer_lr > 0:
            raise ValueError(f"outer_lr must be a positive number such as 0.7, got {outer_lr!r}")
        momentum_ok = isinstance(outer_momentum, (int, float)) and not isinstance(outer_momentum, bool)
        if not momentum_ok or not 0 <= outer_momentum < 1:
            raise ValueError(f"outer_momentum must be a number in [0, 1) such as 0.9, got {outer_momentum!r}")
        if not isinstance(nesterov, bool):
            raise ValueError(f"nesterov must be True or False, got {nesterov!r}")
        if outer_optimizer is None:
            if nesterov and outer_momentum == 0:
                raise ValueError("nesterov=True needs outer_momentum > 0: pass nesterov=False for plain outer SGD")
            factory: OuterOptimizer = functools.partial(
                torch.optim.SGD, lr=float(outer_lr), momentum=float(outer_momentum), nesterov=nesterov
            )
        else:
            given = {"outer_lr": (outer_lr, 0.7), "outer_momentum": (outer_momentum, 0.9), "nesterov": (nesterov, True)}
            ignored = [f"{k}={v!r}" for k, (v, default) in given.items() if v != default]
            if ignored:
                raise ValueError(
                    f"{', '.join(ignored)} would have no effect next to outer_optimizer: put these settings in "
                    "outer_optimizer (e.g. functools.partial(torch.optim.SGD, lr=0.5, momentum=0.8)) instead"
                )
            factory = outer_optimizer_factory(outer_optimizer)
            probe = factory([torch.zeros(1, requires_grad=True)])  # fail now, not after the first H steps
            if not isinstance(probe, Optimizer):
                raise TypeError(f"outer_optimizer must build a torch.optim.Optimizer, it built {type(probe).__name__}")
        try:
            self.anchor_device = None if anchor_device is None else torch.device(anchor_device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"anchor_device must be None, 'cpu' or a torch.device, got {anchor_device!r}") from err
        self.outer_factory = factory
        self._anchor: list[Tensor] | None = None  # θ for every averaged tensor (parameters first, then buffers)
        self._stepped: list[tuple[Tensor, Tensor]] = []  # (θ_k, parameter_k) pairs the outer optimizer steps
        self.outer: Optimizer | None = None
        self._pending_anchor: Tensor | None = None  # read from a checkpoint, applied at attach
        self._pending_outer: dict[str, Any] | None = None

    def attach(self, strategy: Any) -> None:
        super().attach(strategy)
        averaged, _ = self.tensors()
        self._anchor = snapshot(averaged, device=self.anchor_device)
        if self._pending_anchor is not None:  # restored from a checkpoint
            total = sum(a.numel() for a in self._anchor)
            if self._pending_anchor.numel() != total:
                raise ValueError(
                    f"the checkpoint's DiLoCo anchor holds {self._pending_anchor.numel()} values but this model syncs "
                    f"{total}: resume with the same model and the same `buffers` policy"
                )
            unflatten_(self._pending_anchor, self._anchor)
        elif not self.is_synced():  # restored mid-period without an anchor: agree on one
            strategy.comm.mean_(self._anchor, strategy.world_group, kind="setup")
        params = list(self.module.parameters())
        self._stepped = [(a.requires_grad_(), p) for a, p in zip(self._anchor, params) if p.requires_grad]
        self.outer = self.outer_factory([a for a, _ in self._stepped])
        if self._pending_outer is not None:
            self.outer.load_state_dict(self._pending_outer)
        self._pending_anchor = self._pending_outer = None

    def after_step(self, step: int) -> None:
        super().after_step(step)
        if step == self.warmup_steps and self._anchor is not None:
            copy_(self._anchor, self.tensors()[0])  # the first pseudo-gradient starts after warm-up

    @torch.no_grad()
    def sync(self, step: int) -> None:
        assert self._anchor is not None and self.outer is not None
        averaged, broadcast = self.tensors()
        self.average_(averaged, step, anchor=self._wire_anchor(averaged))  # averaged = mean_i x_i
        self.broadcast_buffers_(broadcast)
        for theta, p in self._stepped:
            theta.grad = theta - p.to(theta)  # Δ = θ − mean_i x_i
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        stepped = {id(p) for _, p in self._stepped}
        for theta, t in zip(self._anchor, averaged, strict=True):
            if id(t) in stepped:
                t.copy_(theta)  # x_i ← θ
            else:
                theta.copy_(t)  # buffers and frozen parameters: the plain average

    def _wire_anchor(self, averaged: list[Tensor]) -> list[Tensor] | None:
        """The anchor for a reduced-precision transport, beside the parameters (None: full precision)."""
        if self.strategy.comm.comm_dtype is None or self._anchor is None:
            return None
        device = averaged[0].device if averaged else None
        return [a if a.device == device else a.to(device) for a in self._anchor]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._anchor is not None and self.outer is not None:
            state["anchor"] = flatten(self._anchor).cpu()
            state["outer_optimizer"] = self.outer.state_dict()
        elif self._pending_anchor is not None:
            state["anchor"], state["outer_optimizer"] = self._pending_anchor, self._pending_outer
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._pending_anchor = state_dict.get("anchor")
        self._pending_outer = state_dict.get("outer_optimizer")
