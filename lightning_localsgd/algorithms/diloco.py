"""DiLoCo / FedOpt: a stock outer optimizer stepping on the replicas' pseudo-gradient."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_localsgd._checks import check_bool, check_number
from lightning_localsgd.algorithms.base import Auto, ConsensusAlgorithm
from lightning_localsgd.transport.collectives import NonFinitePolicy
from lightning_localsgd.transport.tensors import BufferPolicy, Fragment, local_parameters

__all__ = ["DiLoCo", "OuterOptimizer", "outer_optimizer_factory"]

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

    **Streaming** (``fragments = P``, ``overlap_steps = τ``; Douillard et al., "Streaming DiLoCo",
    arXiv 2501.18512). The model's flat values are cut into P equal ranges, each with its own
    outer optimizer (and state); range p takes its outer step every H steps at offset
    :math:`\lfloor (p+1)H/P \rfloor`, on the pseudo-gradient of the values sent then. With τ > 0
    that average travels while τ more inner steps run, and the outer-stepped values are merged at
    s + τ: :math:`x_i \leftarrow x_i + (\theta' - x_i^{(s)})` (``merge_alpha=None``: keep the τ
    steps' progress) or :math:`x_i \leftarrow (1-\alpha)\theta' + \alpha x_i` (torchft's
    ``fragment_update_alpha``).

    **Choosing the outer settings.** With momentum β the outer SGD moves θ by about
    :math:`\mathrm{lr}/(1-\beta)` times a steady pseudo-gradient per round (7 for 0.7/0.9). That
    suits long rounds (H in the hundreds), whose pseudo-gradients vary; with short rounds
    (H ≈ 8) consecutive pseudo-gradients agree and the momentum overshoots: keep
    :math:`\mathrm{lr}/(1-\beta)` near 1–2 there (docs/algorithms/diloco.md).

    **Cost.** One allreduce of P values every H steps: 1/H of DDP's bytes (half again with
    ``LocalSGDStrategy(comm_dtype="bfloat16")``, where only ``replica − anchor`` travels). Memory held
    between steps (docs/gpu.md, counted by tests/test_memory.py): the anchor θ (P values in fp32,
    on ``anchor_device``), the outer optimizer's state (P more for SGD momentum, 2P for Adam) and
    the transport's flat buffer: 3.0 model copies with Nesterov; 6.0 with overlap and an int8 wire
    (values sent, the mean in flight, residual, packets); a transient P for the pseudo-gradient.
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
        overlap_steps: τ < H, inner steps an outer step's communication overlaps (0: blocking).
        fragments: P <= H, staggered ranges of values, each with its own outer optimizer.
        merge_alpha: ``None`` (keep local progress) or α in [0, 1] (torchft's mix); needs τ > 0.
        offload: every model-sized tensor it holds between steps in (pinned) host memory
            (see :class:`~lightning_localsgd.ConsensusAlgorithm`).
    """

    overlappable = True
    tunable = True
    fault_tolerant = True

    def __init__(
        self,
        sync_every: int | Auto = 500,
        *,
        outer_optimizer: OuterOptimizer | dict[str, Any] | None = None,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        anchor_device: str | torch.device | None = None,
        warmup_steps: int = 0,
        buffers: BufferPolicy = "average",
        nonfinite: NonFinitePolicy = "raise",
        overlap_steps: int | Auto = 0,
        fragments: int | Auto = 1,
        merge_alpha: float | None = None,
        offload: bool = False,
    ) -> None:
        super().__init__(
            sync_every,
            warmup_steps=warmup_steps,
            buffers=buffers,
            nonfinite=nonfinite,
            overlap_steps=overlap_steps,
            fragments=fragments,
            merge_alpha=merge_alpha,
            offload=offload,
        )
        check_number("outer_lr", outer_lr, 0, low_open=True, example="0.7")
        check_number("outer_momentum", outer_momentum, 0, 1, high_open=True, example="0.9")
        check_bool("nesterov", nesterov)
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
            device = None if anchor_device is None else torch.device(anchor_device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"anchor_device must be None, 'cpu' or a torch.device, got {anchor_device!r}") from err
        if self.offload and device is not None and device.type != "cpu":
            raise ValueError(f"offload=True keeps the anchor in host memory: drop anchor_device={anchor_device!r}")
        if device is not None:
            self.anchor_device = device
        self.outer_factory = factory
        self.outers: list[Optimizer | None] = []  # one outer optimizer per fragment (None: nothing trainable)
        self._thetas: list[list[tuple[Tensor, bool]]] = []  # per fragment: (θ piece, stepped by the outer optimizer)

    @property
    def outer(self) -> Optimizer | None:
        """The outer optimizer (of the first fragment when there are several)."""
        return self.outers[0] if self.outers else None

    def needs_anchor(self) -> bool:
        return True  # θ, the global model the outer optimizer steps

    def on_bind(self, fresh: bool) -> None:
        averaged, _ = self.sync_tensors()
        thetas = self.anchor_views()
        trainable = {id(p) for p in local_parameters(self.module, trainable_only=True)}
        stepped = [id(t) in trainable for t in averaged]
        saved = None if self._loaded is None else self._loaded.get("outer_optimizer")
        if isinstance(saved, Mapping):  # a checkpoint written before fragments existed
            saved = [saved]
        self._thetas, self.outers = [], []
        for fragment in self._fragments:
            pieces = fragment.tensors(thetas)
            flags = [stepped[i] for i, _, _ in fragment.spans]
            self._thetas.append(list(zip(pieces, flags, strict=True)))
            params = [theta.requires_grad_() for theta, flag in zip(pieces, flags) if flag]
            outer = self.outer_factory(params) if params else None
            if outer is not None and saved is not None:
                outer.load_state_dict(saved[fragment.index])
            self.outers.append(outer)

    @torch.no_grad()
    def consensus_of(self, fragment: Fragment, mean: list[Tensor]) -> list[Tensor]:
        """θ ← outer_step(θ, Δ = θ − mean) for the fragment's trainable values; the rest take the mean."""
        pieces = self._thetas[fragment.index]
        for (theta, stepped), m in zip(pieces, mean, strict=True):
            if stepped:
                theta.grad = theta - m.to(theta)
            else:
                theta.copy_(m)  # buffers and frozen parameters: the plain average
        outer = self.outers[fragment.index]
        if outer is not None:
            outer.step()
            outer.zero_grad(set_to_none=True)
        return [theta for theta, _ in pieces]

    @torch.no_grad()
    def load_shared_state_(self, state: dict[str, Any]) -> None:
        super().load_shared_state_(state)
        for outer, outer_state in zip(self.outers, state.get("outer_optimizer") or [], strict=True):
            if outer is not None:
                outer.load_state_dict(outer_state)

    def shared_tensors(self) -> list[Tensor]:
        tensors = super().shared_tensors()
        for outer in self.outers:
            for values in [] if outer is None else outer.state.values():
                tensors += [v for v in values.values() if isinstance(v, Tensor) and v.is_floating_point()]
        return tensors

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.outers:
            state["outer_optimizer"] = [None if o is None else o.state_dict() for o in self.outers]
        elif self._loaded is not None and "outer_optimizer" in self._loaded:
            state["outer_optimizer"] = self._loaded["outer_optimizer"]
        return state
