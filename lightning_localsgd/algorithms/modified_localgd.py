"""Modified Local-GD: proximal local problems and a per-worker corrected aggregation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_localsgd._checks import check_bool, check_number
from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.contract import StepReport
from lightning_localsgd.transport.collectives import NonFinitePolicy
from lightning_localsgd.transport.tensors import (
    BufferPolicy,
    all_finite,
    copy_,
    flatten,
    local,
    local_parameters,
    snapshot,
    unflatten_,
)

__all__ = ["ModifiedLocalGD"]


class ModifiedLocalGD(ConsensusAlgorithm):
    r"""Local steps on a proximal problem around a per-worker center, with a correction at each sync.

    .. math::
        \text{state per worker:}\quad & q_i = 0\\
        \text{round } t:\quad & z_i = \bar x + q_i\\
        & x_i \approx \arg\min_w\ f_i(w) + \tfrac{\lambda}{2}\lVert w - z_i\rVert^2
            \qquad (H \text{ local steps: } \lambda (w - z_i) \text{ is added to } \nabla f_i)\\
        & \bar x_{\text{new}} = \tfrac1n \textstyle\sum_i x_i \qquad\text{(one allreduce)}\\
        & q_i \leftarrow z_i - x_i,\qquad \bar x \leftarrow \bar x_{\text{new}},\qquad x_i \leftarrow \bar x

    :math:`f_i` is the loss ``training_step`` returns on worker i. Since
    :math:`\sum_i q_i + n\bar x` never changes, a fixed point satisfies
    :math:`\sum_i \nabla f_i(\bar x) + n\lambda(\bar x - \bar x_0) = 0`: with enough local steps the
    consensus converges (linearly) to the *centralized* model
    :math:`\arg\min_w \tfrac1n\sum_i f_i(w) + \tfrac\lambda2\lVert w - \bar x_0\rVert^2`, where
    :math:`\bar x_0` is the model at the first round. This is the parallel Dykstra-like proximal
    scheme the project uses for the refined aggregation of "Modified Local-GD" (Zhu et al.,
    arXiv 2412.07971); ``correction=False`` keeps :math:`q_i \equiv 0` (FedProx-style plain
    averaging of the same local problems), which does not reach that model.

    The proximal gradient is added after ``backward`` and before gradient clipping and the inner
    optimizer's update; the loss the user logs is unchanged. Parameters with
    ``requires_grad=False`` are only averaged; floating buffers follow ``buffers``. During warm-up
    no proximal term is added (DDP-style steps); the first round starts at the end of warm-up.
    Between syncs, validation and checkpoints use the replicas' average; the end of ``fit`` closes
    a partial round with one more sync.

    **Cost.** One allreduce of P values every H steps (1/H of DDP's bytes). Memory held between
    steps: z_i and q_i (two model-sized copies in fp32 per worker; one with ``correction=False``) and
    the transport's flat buffer, 3.0 (2.0) model copies (docs/gpu.md), and an fp32 anchor with a
    reduced-precision transport. Each rank's z_i and q_i ride in
    the checkpoint (resuming on another world size restarts them from the consensus).

    Example::

        trainer = Trainer(strategy="localsgd", devices=4, callbacks=[ModifiedLocalGD(sync_every=100, prox=0.01)])

    Args:
        sync_every: H, local steps per round (the local problems should be solved well).
        prox: λ > 0, the weight of the proximal term.
        correction: keep the per-worker correction q_i (``False``: q_i ≡ 0, plain FedProx-style).
        warmup_steps: DDP-style gradient averaging for this many first steps.
        buffers: ``"average"``, ``"broadcast"`` (rank 0's) or ``"local"`` floating buffers.
        nonfinite: ``"raise"`` or ``"skip"`` a replica holding NaN/Inf at a sync (a skipped
            worker's q_i restarts at 0).
        overlap_steps, fragments: must stay 0 and 1: the proximal centers z_i need the consensus at the sync step,
            so the sync cannot arrive late or in pieces (PeriodicAveraging and DiLoCo can).
        offload: every model-sized tensor it holds between steps in (pinned) host memory
            (see :class:`~lightning_localsgd.ConsensusAlgorithm`).
    """

    def __init__(
        self,
        sync_every: int,
        prox: float,
        correction: bool = True,
        *,
        warmup_steps: int = 0,
        buffers: BufferPolicy = "average",
        nonfinite: NonFinitePolicy = "raise",
        overlap_steps: int = 0,
        fragments: int = 1,
        offload: bool = False,
    ) -> None:
        super().__init__(
            sync_every,
            warmup_steps=warmup_steps,
            buffers=buffers,
            nonfinite=nonfinite,
            overlap_steps=overlap_steps,
            fragments=fragments,
            offload=offload,
        )
        check_number("prox", prox, 0, low_open=True, example="0.01 (for prox=0 use PeriodicAveraging)")
        check_bool("correction", correction)
        self.prox = float(prox)
        self.correction = correction
        self._z: list[Tensor] | None = None  # center of this worker's proximal term, per trainable parameter
        self._q: list[Tensor] | None = None  # this worker's correction (None when correction=False)

    def _trainable(self) -> list[Tensor]:
        return local_parameters(self.module, trainable_only=True)  # a sharded parameter: this rank's shard

    def on_bind(self, fresh: bool) -> None:
        self._z = [self.hold(z) for z in snapshot(self._trainable())]  # overwritten by an exact resume
        self._q = [self.hold(torch.zeros_like(z)) for z in self._z] if self.correction else None

    def wrap_closure(self, closure: Callable[[], Any], step: int) -> Callable[[], Any]:
        closure = super().wrap_closure(closure, step)
        if self.in_warmup(step):
            return closure

        def closure_with_prox() -> Any:
            out = closure()
            if out is None:  # training_step skipped this batch: no step, no proximal term
                return out
            assert self._z is not None
            with torch.no_grad():
                trainable = [p for p in self.module.parameters() if p.requires_grad]
                for p in trainable:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                params, grads = self._trainable(), [local(p.grad) for p in trainable]
                centers = [z.to(p, non_blocking=True) for p, z in zip(params, self._z, strict=True)]
                scale = self.ctx.gradient_scale()
                if scale is None:  # ∇ of (λ/2)||w − z_i||² = λw − λz_i, added in place (no model-sized temporary)
                    torch._foreach_add_(grads, params, alpha=self.prox)
                    torch._foreach_add_(grads, centers, alpha=-self.prox)
                else:  # fp16 loss scaling: the gradients carry the scale S, so the term must too (S·λ(w − z_i))
                    term = torch._foreach_sub(params, centers)
                    torch._foreach_mul_(term, scale * self.prox)
                    torch._foreach_add_(grads, term)
            return out

        return closure_with_prox

    def after_step(self, step: int, report: StepReport | None = None) -> None:
        super().after_step(step, report)
        if step == self.warmup_steps and self._z is not None:  # the first round starts after warm-up
            copy_(self._z, self._trainable())

    @torch.no_grad()
    def sync(self, step: int) -> None:
        assert self._z is not None
        averaged, broadcast = self.sync_tensors()
        params = self._trainable()
        q_new = None
        if self._q is not None:
            q_new = [z - p.to(z) for z, p in zip(self._z, params)]  # q_i ← z_i − x_i, pre-sync replica
            if self.nonfinite == "skip" and not all_finite(params):
                q_new = [torch.zeros_like(q) for q in q_new]  # this replica is dropped from the mean
        whole = self._fragments[0]
        self.average_(averaged, step, anchor=self.wire_anchor(whole), residual=self.residual_of(whole))  # x_i ← x̄_new
        self.broadcast_buffers_(broadcast)
        if q_new is not None:
            self._q = q_new
        for z, p, q in zip(self._z, params, self._q or [None] * len(params)):
            z.copy_(p if q is None else p.to(z) + q)  # z_i = x̄ + q_i
        if self.anchor is not None:
            self.consensus_of(whole, averaged)  # the anchor follows the consensus

    # ------------------------------------------------------------------ checkpoints
    def rank_state_dict(self) -> dict[str, Any]:
        state = super().rank_state_dict()
        if self._z is not None:
            state["z"] = flatten(self._z).cpu()
        if self._q is not None:
            state["q"] = flatten(self._q).cpu()
        return state

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        super().load_rank_state_dict(state)
        if self._z is not None and "z" in state:
            unflatten_(state["z"].to(self._z[0].device), self._z)
        if self._q is not None and "q" in state:
            unflatten_(state["q"].to(self._q[0].device), self._q)
