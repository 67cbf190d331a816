"""GradAlign and its local-steps form FedGA: gradient-alignment regularization (seed 002)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loops.optimization.closure import AbstractClosure
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_localsgd._checks import check_int, check_number
from lightning_localsgd.contract import FrontEnd, GradientModifier, RoundPosition, StepReport, SyncContext
from lightning_localsgd.transport.tensors import copy_, flatten, unflatten_

__all__ = ["GradAlign"]


def _grads(params: list[Tensor]) -> Tensor:
    """The parameters' gradients as one flat copy (zeros for a parameter without a gradient)."""
    return flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """cos(a, b) in the vectors' own dtype (a logged diagnostic; a float64 copy of two model-sized
    vectors cost ~90 ms per round for resnet18 on one CPU thread), returned as float64."""
    norms = (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)).double()
    return (a @ b).double() / norms.clamp_min(1e-300)


class GradAlign(GradientModifier):
    r"""Gradient alignment: each rank displaces itself against its gradient's misalignment.

    .. math::
        g_i = \nabla f_i(x),\qquad g = \tfrac1n \textstyle\sum_j g_j \quad\text{(allreduce 1)},\qquad
        x_i' = x - \beta\,(g - g_i)

    **K = 1 form** (the consensus algorithm's ``sync_every`` is 1, e.g. ``PeriodicAveraging(1)``):

    .. math::
        x \leftarrow \text{optimizer\_step}\bigl(x,\ \tfrac1n \textstyle\sum_i \nabla f_i(x_i')\bigr)
        \quad\text{(allreduce 2)}

    Per update: forward/backward at x (gradient :math:`g_i`), allreduce 1, displace to
    :math:`x_i'`, a second forward/backward on the *same batch* at :math:`x_i'`, allreduce 2 of
    those gradients, restore x exactly; the user's optimizer then steps from x with the averaged
    displaced gradient, so the replicas stay equal. For quadratic :math:`f_i` this is exactly the
    gradient of :math:`f + \frac{\beta}{2}\,\frac1n\sum_i \lVert\nabla f_i - \nabla f\rVert^2`
    (to first order in general): an explicit penalty on gradient misalignment, the regularizer
    small-batch SGD has implicitly (Dandi et al., "Implicit Gradient Alignment in Distributed and
    Federated Learning", AAAI 2022).

    **FedGA, K > 1 local steps** (``sync_every = K > 1``): only the first step of each round (the
    first step after a sync, or after warm-up) is special: forward/backward at the round's start
    :math:`x_i` gives :math:`g_i`, allreduce 1 gives g, the rank moves *for good* to
    :math:`x_i' = x_i - \beta(g - g_i)`, and a second forward/backward on the same batch at
    :math:`x_i'` gives the gradient of that step. The round is then K ordinary local steps starting
    at :math:`x_i'`, and the consensus algorithm syncs as usual. With plain SGD and K = 1 the two
    forms coincide. Under LeaderSGD or ElasticAveraging the replicas differ at a round start and x
    is each rank's own replica.

    ``every = r`` applies this to every r-th update (K = 1) or round (FedGA) only; the others are
    ordinary steps. Nothing happens during the algorithm's warm-up (gradients are averaged there).
    Buffers (BatchNorm statistics) are put back after the second pass to their values after the
    first, so each batch updates them once. The loss Lightning reports (``outputs["loss"]``,
    progress bar) is the first pass's, at x; ``self.log`` calls in ``training_step`` run in both
    passes, so on-step values logged there show the second, displaced pass.

    The mean cosine :math:`\frac1n\sum_i \cos(g_i, g)` is logged as ``gradalign/alignment``
    (K = 1: it rides in allreduce 2; FedGA: one all-gather of a scalar per round).

    Under Fabric there is no Lightning closure: pass one to the step,
    ``optimizer.step(lambda: fabric.backward(loss_fn(model, batch)))``, so the second pass can run.

    **Cost.** K = 1: 2 forward/backward passes and 2 allreduces of P values per update (about 2×
    DDP's bytes and compute); ``PeriodicAveraging(1)`` then skips its parameter average (the
    replicas took the same step and are still equal) and only syncs floating buffers. FedGA: 1 extra
    forward/backward and 1 allreduce of P values per round. Memory: about three model-sized vectors during an update.

    Example::

        # GradAlign (K = 1), beta = lr / 2 as in the paper
        Trainer(strategy="localsgd", callbacks=[PeriodicAveraging(sync_every=1), GradAlign(beta=0.025)])
        # FedGA: a displacement per round of 16 local steps
        Trainer(strategy="localsgd", callbacks=[PeriodicAveraging(sync_every=16), GradAlign(beta=0.025)])

    Args:
        beta: β >= 0, the displacement size (the paper uses half the learning rate).
        every: apply the alignment to every ``every``-th update (K = 1) or round (FedGA).
        log_alignment: log ``gradalign/alignment`` (FedGA: costs one scalar all-gather per round).
    """

    def __init__(self, beta: float, every: int = 1, log_alignment: bool = True) -> None:
        check_number("beta", beta, 0, example="lr / 2 (the paper's choice)")
        if beta == 0:
            rank_zero_warn("GradAlign(beta=0) only averages gradients (K = 1) at twice DDP's cost; use beta > 0.")
        self.beta = float(beta)
        self.every = check_int("every", every)
        self.log_alignment = bool(log_alignment)
        self.alignment: float | None = None  # mean cosine of the last aligned update
        self.num_updates = 0
        self._ctx: SyncContext | None = None
        self._fresh = False

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(trainer.strategy, FrontEnd):
            raise TypeError(
                "GradAlign needs the local-SGD strategy: use Trainer(strategy='localsgd', callbacks=[PeriodicAveraging("
                f"sync_every=1), GradAlign(...)]) instead of strategy={type(trainer.strategy).__name__}"
            )
        if not pl_module.automatic_optimization:
            raise ValueError("GradAlign re-runs the training-step closure: use automatic optimization")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "GradAlign's second pass can only re-run the last micro-batch: use accumulate_grad_batches=1 "
                "and a larger batch size instead"
            )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._fresh and self.log_alignment and self.alignment is not None:
            pl_module.log("gradalign/alignment", self.alignment, on_step=True, on_epoch=False)
        self._fresh = False

    # ------------------------------------------------------------------ the contract
    def check_front_end(self, front_end: FrontEnd) -> None:
        if front_end.loss_scaling:
            raise ValueError("GradAlign does not support fp16 loss scaling: use precision='bf16-mixed' or '32-true'")
        if front_end.within_node is not None:
            raise ValueError(
                f"GradAlign aligns each process's own gradient with the average; under within_node="
                f"{front_end.within_node!r} the processes of a node share one gradient (DDP's or FSDP's). Use "
                "LocalSGDStrategy(within_node=None) (one replica per process) with GradAlign"
            )

    def bind(self, ctx: SyncContext) -> None:
        self._ctx = ctx

    def wrap_closure(
        self, closure: Callable[[], Any], position: RoundPosition, report: StepReport
    ) -> Callable[[], Any]:
        """The aligned update replaces the closure at the first step of every ``every``-th round (K = 1: update)."""
        if position.warmup or position.index_in_round != 0 or position.round_index % self.every != 0:
            return closure
        return partial(self._aligned, closure, position.step, position.sync_every == 1, report)

    def _aligned(self, closure: Callable[[], Any], step: int, k1: bool, report: StepReport) -> Any:
        ctx = self._ctx
        assert ctx is not None, "GradAlign is not bound: it is bound when fit starts"
        module = ctx.module
        params = [p for p in module.parameters() if p.requires_grad]
        loss = closure()  # pass 1 at x: .grad = g_i
        local = _grads(params)
        mean = local.clone()
        ctx.comm.mean_([mean], ctx.world, purpose="gradalign", step=step)  # allreduce 1: g
        cosine = _cosine(local, mean)
        x = [p.detach().clone() for p in params] if k1 else []
        buffers = [b.detach().clone() for b in module.buffers()]
        with torch.no_grad():
            displacement = (mean - local).mul_(self.beta)  # x_i' = x − β(g − g_i)
            del local, mean
            offset = 0
            for p in params:
                p.sub_(displacement[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            del displacement
        for p in params:
            p.grad = None
        # pass 2 at x_i'; AbstractClosure.closure() leaves Lightning's cached result (pass 1's) alone
        if isinstance(closure, AbstractClosure):
            closure.closure()
        else:
            closure()
        copy_(list(module.buffers()), buffers)
        if k1:
            second = _grads(params)
            if self.log_alignment:
                second = torch.cat([second, cosine.to(second.dtype).reshape(1)])
            ctx.comm.mean_([second], ctx.world, purpose="gradalign", step=step)  # allreduce 2
            copy_(params, x)  # restore x exactly
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            n = sum(p.numel() for p in params)
            unflatten_(second[:n], [p.grad for p in params])
            report.gradients_averaged = True  # equal replicas stay equal: no parameter sync needed
            self.alignment = float(second[n]) if self.log_alignment else None
        elif self.log_alignment:
            everyone = ctx.comm.all_gather(cosine.reshape(1), ctx.world, purpose="monitor")
            self.alignment = float(everyone.mean())
        self.num_updates += 1
        self._fresh = True
        return loss
