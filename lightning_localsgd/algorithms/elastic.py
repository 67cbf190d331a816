"""EASGD: Elastic Averaging SGD (Zhang, Choromanska, LeCun, NeurIPS 2015), LSGD's baseline."""

from __future__ import annotations

from torch import Tensor

from lightning_localsgd._checks import check_number
from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.transport.collectives import NonFinitePolicy
from lightning_localsgd.transport.tensors import BufferPolicy, all_finite, copy_, flatten, lerp_, views

__all__ = ["ElasticAveraging"]


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
    on every rank and lives in the checkpoint (it is the algorithm's anchor). What travels is
    :math:`x_i - \tilde x`, so ``LocalSGDStrategy(comm_dtype="bfloat16")`` (or ``"int8"``) works
    with the center as the shared anchor.

    **The model is the center.** Evaluation during fit, the model a checkpoint's ``state_dict``
    stores and the model every rank holds after fit are :math:`\tilde x`; the replicas are swapped
    back exactly after evaluation. When fit ends with local steps since the last sync, one last
    elastic update runs first so that those steps count. None of this communicates (except
    rank 0's buffers under ``buffers="broadcast"``).

    **Cost.** One allreduce of P values every τ steps, the same bytes as
    :class:`~lightning_localsgd.PeriodicAveraging` (1/τ of DDP's). Memory held between steps:
    the center (one fp32-or-wider copy of the model) and the transport's flat buffer, 2.0 model
    copies (docs/gpu.md).

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
        overlap_steps, fragments: must stay 0 and 1: the elastic force uses the center of the sync step,
            so the sync cannot arrive late or in pieces (PeriodicAveraging and DiLoCo can).
        offload: every model-sized tensor it holds between steps in (pinned) host memory
            (see :class:`~lightning_localsgd.ConsensusAlgorithm`).
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
        self.alpha = None if alpha is None else check_number("alpha", alpha, 0, 1, low_open=True, example="0.9")
        self.beta = check_number("beta", beta, 0, 1, low_open=True, example="0.9")

    @property
    def moving_rate(self) -> float:
        """α in use: the given one, or β / n once bound."""
        return self.alpha if self.alpha is not None else self.beta / self.world.size

    @property
    def center(self) -> list[Tensor]:
        """The center variable x̃, shaped like the synchronized tensors (views of the anchor)."""
        return self.anchor_views()

    def needs_anchor(self) -> bool:
        return True  # the center

    def sync(self, step: int) -> None:
        averaged, broadcast = self.sync_tensors()
        center = self.center
        finite = all_finite(averaged)
        mean = flatten(averaged)  # becomes m; x_i − x̃ travels (the center is the shared anchor)
        self.comm.mean_(
            [mean],
            self.world,
            purpose="sync",
            anchor=self.anchor.to(mean.device),  # the wire's device (the center may be offloaded)
            residual=self.residual,
            nonfinite=self.nonfinite,
            step=step,
            observer=self.observer_for(step),
        )
        if finite:
            lerp_(averaged, center, self.moving_rate)  # x_i ← x_i − α(x_i − x̃), the old x̃
        else:  # nonfinite="skip" (else mean_ raised): this replica restarts from the center
            copy_(averaged, center)
        lerp_(center, views(mean, center), self.beta)  # x̃ ← x̃ + β(m − x̃)
        if broadcast:  # buffers="broadcast": rank 0's
            self.broadcast_buffers_(broadcast)

    # ------------------------------------------------------------------ the model is the center
    def holds_consensus(self, step: int) -> bool:
        return False  # replicas differ from the center even right after a sync

    def write_consensus(self, purpose: str = "eval") -> None:
        averaged, broadcast = self.sync_tensors()
        copy_(averaged, self.center)
        if broadcast:  # buffers="broadcast": rank 0's
            self.broadcast_buffers_(broadcast)

    def finalize(self, step: int) -> None:
        super().finalize(step)  # one last elastic update when local steps ran since the last one
        copy_(self.sync_tensors()[0], self.center)
