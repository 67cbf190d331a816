"""Local-SGD / FedAvg / Local-GD: periodic parameter averaging."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_localsgd._checks import check_int
from lightning_localsgd.algorithms.base import Auto, ConsensusAlgorithm
from lightning_localsgd.contract import FrontEnd, StepReport
from lightning_localsgd.transport.collectives import NonFinitePolicy
from lightning_localsgd.transport.tensors import BufferPolicy, float_buffers

__all__ = ["PeriodicAveraging"]


class PeriodicAveraging(ConsensusAlgorithm):
    r"""Local SGD: local optimizer steps, and every ``sync_every`` steps the replicas are averaged.

    .. math::
        \text{every step:}\quad x_i &\leftarrow \text{inner\_step}(x_i, \nabla f_i(x_i;\ \text{batch}))
            \qquad\text{(no communication)}\\
        \text{every } H \text{ steps:}\quad \bar x &\leftarrow \tfrac1n \textstyle\sum_i x_i,
            \qquad x_i \leftarrow \bar x

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

    **Overlap and fragments** (``overlap_steps = τ``, ``fragments = P``): the model's flat values
    are cut into P equal ranges; range p is averaged every H steps at offset
    :math:`\lfloor (p+1)H/P \rfloor`, so no step sends more than 1/P of the model. With τ > 0 the
    average of the values sent at step s runs in the background while τ more local steps run, and
    is merged at s + τ (:meth:`~lightning_localsgd.ConsensusAlgorithm.merge`):
    :math:`x_i \leftarrow x_i + (\bar x^{(s)} - x_i^{(s)})` keeps each rank's progress of those τ
    steps (``merge_alpha=None``, the default), :math:`x_i \leftarrow (1-\alpha)\bar x^{(s)} +
    \alpha x_i` is torchft's mix. τ = 0 and P = 1 are the blocking sync, bit for bit.

    **Cost.** One allreduce of P values every H steps: bytes per step are 1/H of DDP's
    (``comm_dtype=torch.bfloat16`` on the strategy halves them again; ``"int8"`` sends about a
    quarter). Memory held between steps, in fp32 model copies (docs/gpu.md, counted by
    tests/test_memory.py): 1.0 (the transport's flat buffer); 2.5 with a bf16 wire, 4.0 with int8
    (anchor, residual, packets); 2.0 with overlap τ > 0 (values sent + the mean in flight), 2.0/P
    with P fragments.

    Example::

        trainer = Trainer(strategy="localsgd", devices=4, callbacks=[PeriodicAveraging(sync_every=16)])
        # a slow link: 4 staggered quarters, each hidden behind 3 local steps
        PeriodicAveraging(sync_every=16, fragments=4, overlap_steps=3)

    Args:
        sync_every: H, optimizer steps between world averages.
        node_sync_every: k, optimizer steps between node-local averages (``None``: no hierarchy).
        warmup_steps: DDP-style gradient averaging for this many first steps.
        buffers: ``"average"``, ``"broadcast"`` (rank 0's) or ``"local"`` floating buffers.
        nonfinite: ``"raise"`` or ``"skip"`` a replica holding NaN/Inf at a sync.
        overlap_steps: τ < H, local steps a sync's communication overlaps (0: blocking).
        fragments: P <= H, staggered groups of values (1: the whole model at once).
        merge_alpha: ``None`` (keep local progress) or α in [0, 1] (torchft's mix); needs τ > 0.
        offload: every model-sized tensor it holds between steps in (pinned) host memory
            (see :class:`~lightning_localsgd.ConsensusAlgorithm`).
    """

    overlappable = True
    tunable = True
    fault_tolerant = True

    def __init__(
        self,
        sync_every: int | Auto = 8,
        *,
        node_sync_every: int | None = None,
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
        if node_sync_every is not None:
            check_int("node_sync_every", node_sync_every)
            if self.auto:
                raise ValueError("node_sync_every (hierarchical averaging) is not auto-tuned: give sync_every a number")
            if node_sync_every >= sync_every or sync_every % node_sync_every != 0:
                raise ValueError(
                    f"node_sync_every={node_sync_every} must be smaller than sync_every={sync_every} and divide it "
                    f"(e.g. node_sync_every={max(1, sync_every // 4)}, sync_every={sync_every})"
                )
            if overlap_steps or fragments != 1:
                raise ValueError(
                    "node_sync_every (hierarchical averaging) works with blocking whole-model syncs: drop "
                    "overlap_steps/fragments, or drop node_sync_every"
                )
        self.node_sync_every = node_sync_every
        self.num_node_syncs = 0

    def check_front_end(self, front_end: FrontEnd) -> None:
        if self.node_sync_every is not None and front_end.within_node is not None:
            raise ValueError(
                f"node_sync_every averages the processes of a node, but under within_node={front_end.within_node!r} "
                "they are one replica already (DDP inside the node): drop node_sync_every"
            )

    def on_bind(self, fresh: bool) -> None:
        node, world = self.node, self.world
        if self.node_sync_every is not None and node.size in (1, world.size):
            rank_zero_warn(
                f"node_sync_every={self.node_sync_every} has no effect: the node groups have "
                f"{node.size} process(es) out of {world.size}. Use it with num_nodes > 1 and devices > 1, or drop it."
            )

    def after_step(self, step: int, report: StepReport | None = None) -> None:
        if report is not None and report.gradients_averaged and self.is_synced(step - 1) and not self.in_warmup(step):
            # Equal replicas took the same averaged-gradient step (GradAlign K = 1): they are still
            # equal, so only the floating buffers (updated by each rank's own forward) need a sync.
            buffers = float_buffers(self.module)
            if self.buffers == "average":
                self.average_(buffers, step)
            elif self.buffers == "broadcast":
                self.broadcast_buffers_(buffers)
            self.mark_equal(step)
            return
        super().after_step(step, report)
        if (
            self.node_sync_every is not None
            and self.is_due(step, self.node_sync_every)
            and not self.is_due(step, self.sync_every)
        ):
            averaged, broadcast = self.sync_tensors()
            # integer transport is for the slow world link; node averages travel in a float dtype
            anchor = None if self.comm.quantized else self.wire_anchor(self._fragments[0])
            self.average_(averaged, step, node=True, anchor=anchor)
            self.broadcast_buffers_(broadcast, node=True)
            self.num_node_syncs += 1

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["num_node_syncs"] = self.num_node_syncs
        return state

    def load_shared_state_(self, state: dict[str, Any]) -> None:
        super().load_shared_state_(state)
        self.num_node_syncs = int(state.get("num_node_syncs", 0))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_node_syncs = int(state_dict.get("num_node_syncs", 0))
