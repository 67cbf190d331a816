"""Local-SGD / FedAvg / Local-GD: periodic parameter averaging."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_localsgd.algorithms.base import ConsensusAlgorithm, check_positive_int
from lightning_localsgd.comm import NonFinitePolicy
from lightning_localsgd.params import BufferPolicy, flatten, flatten_into, float_buffers, snapshot


class PeriodicAveraging(ConsensusAlgorithm):
    r"""Local SGD: local optimizer steps, and every ``sync_every`` steps the replicas are averaged.

    .. math::
        \text{every step:}\quad x_i &\leftarrow \text{inner\_step}(x_i, \nabla f_i(x_i;\ \text{batch}))
            \qquad\text{(no communication)}\\
        \text{every } H \text{ steps:}\quad \bar x &\leftarrow \tfrac1n \textstyle\sum_i x_i,\qquad x_i \leftarrow \bar x

    The inner optimizer's state (momentum, Adam moments) stays local. With ``H = 1`` and plain SGD
    this is DDP step for step. For overparameterized least squares with full-batch GD on every
    worker, :math:`\bar x` converges to the minimum-norm interpolator of *all* the data for any H
    (Zhu et al., "Distributed Gradient Descent with Many Local Steps in Overparameterized
    Models", arXiv 2412.07971, Theorem 1).

    **Hierarchical averaging.** With ``node_sync_every = k`` the replicas are also averaged within
    each node every k steps; the world average runs every ``sync_every = K`` steps (K a multiple of
    k). When both fall on one step, only the world average runs.

    **Warm-up.** For the first ``warmup_steps`` optimizer steps gradients are averaged every step
    exactly as DDP does (post-local SGD, Lin et al. 2020); local steps start afterwards.

    **Cost.** One allreduce of P values every H steps: bytes per step are 1/H of DDP's
    (``comm_dtype=torch.bfloat16`` on the strategy halves them again). Memory: none extra, or one
    fp32 anchor copy of the model when a reduced-precision transport is used.

    Example::

        trainer = Trainer(strategy="localsgd", devices=4, callbacks=[PeriodicAveraging(sync_every=16)])

    Args:
        sync_every: H, optimizer steps between world averages.
        node_sync_every: k, optimizer steps between node-local averages (``None``: no hierarchy).
        warmup_steps: DDP-style gradient averaging for this many first steps.
        buffers: ``"average"``, ``"broadcast"`` (rank 0's) or ``"local"`` floating buffers.
        nonfinite: ``"raise"`` or ``"skip"`` a replica holding NaN/Inf at a sync.
    """

    def __init__(
        self,
        sync_every: int = 8,
        *,
        node_sync_every: int | None = None,
        warmup_steps: int = 0,
        buffers: BufferPolicy = "average",
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(sync_every, warmup_steps=warmup_steps, buffers=buffers, nonfinite=nonfinite)
        if node_sync_every is not None:
            check_positive_int("node_sync_every", node_sync_every)
            if node_sync_every >= sync_every or sync_every % node_sync_every != 0:
                raise ValueError(
                    f"node_sync_every={node_sync_every} must be smaller than sync_every={sync_every} and divide it "
                    f"(e.g. node_sync_every={max(1, sync_every // 4)}, sync_every={sync_every})"
                )
        self.node_sync_every = node_sync_every
        self.num_node_syncs = 0
        self._anchor: Tensor | None = None  # flat last world consensus, kept for reduced-precision transport
        self._pending_anchor: Tensor | None = None  # anchor read from a checkpoint, applied at attach

    def attach(self, strategy: Any) -> None:
        super().attach(strategy)
        if self.node_sync_every is not None and strategy.node_group.size in (1, strategy.world_group.size):
            rank_zero_warn(
                f"node_sync_every={self.node_sync_every} has no effect: the node groups have "
                f"{strategy.node_group.size} process(es) out of {strategy.world_group.size}. Use it with "
                "num_nodes > 1 and devices > 1, or drop it."
            )
        self._anchor = None
        if strategy.comm.comm_dtype is not None:
            averaged, _ = self.tensors()
            self._anchor = flatten(snapshot(averaged))  # one flat fp32 (or fp64) copy
            if self._pending_anchor is not None:  # restored from a checkpoint
                self._anchor.copy_(self._pending_anchor)
            elif not self.is_synced():  # restored mid-period from a checkpoint without one: agree on one
                strategy.comm.mean_([self._anchor], strategy.world_group, kind="setup")
        self._pending_anchor = None

    def after_step(self, step: int) -> None:
        if self._grads_averaged_at == step and self.last_sync_step == step - 1 and not self.in_warmup(step):
            # Equal replicas took the same averaged-gradient step (GradAlign K = 1): they are still
            # equal, so only the floating buffers (updated by each rank's own forward) need a sync.
            buffers = float_buffers(self.module)
            if self.buffers == "average":
                self.average_(buffers, step)
            elif self.buffers == "broadcast":
                self.broadcast_buffers_(buffers)
            self.last_sync_step = step
            return
        super().after_step(step)
        if (
            self.node_sync_every is not None
            and self.is_due(step, self.node_sync_every)
            and not self.is_due(step, self.sync_every)
        ):
            averaged, broadcast = self.tensors()
            self.average_(averaged, step, node=True, anchor=self._anchor)
            self.broadcast_buffers_(broadcast, node=True)
            self.num_node_syncs += 1

    def sync(self, step: int) -> None:
        averaged, broadcast = self.tensors()
        self.average_(averaged, step, anchor=self._anchor)
        self.broadcast_buffers_(broadcast)
        if self._anchor is not None:
            flatten_into(averaged, self._anchor)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["num_node_syncs"] = self.num_node_syncs
        if self._anchor is not None:
            state["anchor"] = self._anchor.detach().cpu().clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_node_syncs = int(state_dict.get("num_node_syncs", 0))
        self._pending_anchor = state_dict.get("anchor")
