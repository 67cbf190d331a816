"""LSGD: Leader Stochastic Gradient Descent, single- and multi-leader (Teng et al., NeurIPS 2019, arXiv 1905.10395)."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_localsgd._checks import check_bool, check_int, check_number
from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.contract import FrontEnd, StepReport
from lightning_localsgd.transport.collectives import Group, NonFinitePolicy, NonFiniteReplicaError
from lightning_localsgd.transport.tensors import BufferPolicy, all_finite, copy_, flatten, lerp_, views

__all__ = ["Evaluate", "LeaderSGD"]

Evaluate = Literal["average", "leader"]


class LeaderSGD(ConsensusAlgorithm):
    r"""LSGD: every ``sync_every`` steps each replica is pulled toward the current best replica.

    .. math::
        \text{every step:}\quad & x_i \leftarrow \text{inner\_step}(x_i);\quad
            x_i \leftarrow x_i - \lambda_G\,(x_i - \tilde x_{\text{last}});\quad
            x_i \leftarrow x_i - \lambda_{\text{node}}\,(x_i - \tilde x_{\text{node,last}})\\
        \text{every } \tau_{\text{node}} \text{ steps:}\quad & x_i \leftarrow (1 - c_{\text{node}})\,x_i
            + c_{\text{node}}\,\tilde x_{\text{node}(i)}\\
        \text{every } \tau \text{ steps:}\quad & x_i \leftarrow (1 - c)\,x_i + c\,\tilde x,
            \qquad \tilde x = x_{\ell},\ \ \ell = \arg\min_j \tfrac1k \textstyle\sum_{b=1}^{k} L_j^{(t-b)}

    The leader :math:`\ell` is the rank whose training loss, averaged over its last ``k =
    loss_window`` batches, is lowest (ties go to the lowest rank; a rank with no loss yet reports
    +inf). The loss is the one passed to ``backward`` in the step (the batch that completed it;
    under gradient accumulation, its last micro-batch), and the window of a pull at step t holds
    the steps *before* t.
    :math:`\tilde x_{\text{node}(i)}` is the leader among the ranks of i's node. When a node pull
    and a global pull fall on one step only the global one runs, unless
    ``node_pull_on_global_step=True`` (the authors' scripts): then the node pull runs first and
    the global pull after it. The per-step pulls (the paper's :math:`\lambda` terms) move toward
    the last received *global* leader copy :math:`\tilde x_{\text{last}}` (``step_pull`` =
    :math:`\lambda_G`) and the last received *node* leader copy :math:`\tilde x_{\text{node,last}}`
    (``node_step_pull`` = :math:`\lambda_{\text{node}}`); each starts with its first pull and runs
    after the inner step, before that step's scheduled pull. With ``step_pull_per_period=True``
    the weights are :math:`\lambda_G = p/\tau` and :math:`\lambda_{\text{node}} = p_{\text{node}}/\tau_{\text{node}}`
    for ``step_pull = p`` and ``node_step_pull = p_node``: the authors' training scripts use
    p = p_node = 0.1 this way (``codes/worker_stoc_optim.py`` of github.com/yunfei-teng/LSGD).
    Floating buffers follow ``buffers``: ``"average"`` pulls them like parameters,
    ``"broadcast"`` replaces them by the leader's, ``"local"`` keeps them.

    Evaluation during fit, the model after fit and a checkpoint's ``state_dict`` are the
    ``evaluate="average"`` of the replicas (the paper evaluates this center variable) or the
    current global ``"leader"``'s replica; the replicas are restored exactly after evaluation.

    **Cost.** Election: one all-gather of two float64 numbers per rank (windowed loss, "holds
    NaN/Inf" flag). Pull: *one* broadcast of P values from the leader (about (m−1)/m·P values sent
    per rank of an m-rank group: half an allreduce), so Comm/DDP ≈ 1/(2τ) for the global pulls,
    plus node-local traffic every τ_node steps. Memory: a P-sized receive buffer during a pull, kept
    as the global (node) leader copy when ``step_pull > 0`` (``node_step_pull > 0``); the loss
    window (k floats).

    Example::

        # 2 nodes x 4 GPUs: node leaders every 4 steps, the global leader every 16
        trainer = Trainer(strategy="localsgd", num_nodes=2, devices=4,
                          callbacks=[LeaderSGD(sync_every=16, node_sync_every=4)])

    Args:
        sync_every: τ, optimizer steps between global leader pulls.
        pull: c, strength of the global pull (1: every rank becomes the leader; 0: no pull).
        loss_window: k, batches in the windowed loss that elects leaders.
        node_sync_every: τ_node, steps between node-leader pulls (``None``: single leader).
        node_pull: c_node (default 0.1); only with ``node_sync_every``.
        step_pull: λ_G in [0, 1), per-step pull toward the last global leader copy (0: off); with
            ``step_pull_per_period`` it is p and the weight per step is p/τ.
        node_step_pull: λ_node in [0, 1), the same toward the last node leader copy (``None``: 0);
            only with ``node_sync_every``; with ``step_pull_per_period`` the weight is p_node/τ_node.
        step_pull_per_period: divide the per-step pulls by their periods (the authors' p/τ).
        node_pull_on_global_step: on a global step, the node pull first, then the global pull
            (the authors' scripts); ``False``: the global pull only.
        evaluate: ``"average"`` or ``"leader"``: the model used for evaluation, returned and saved.
        warmup_steps: DDP-style gradient averaging for this many first steps.
        buffers: ``"average"``, ``"broadcast"`` or ``"local"`` floating buffers (see above).
        nonfinite: a replica holding NaN/Inf at a pull: ``"raise"``, or ``"skip"`` it (it is never
            the leader and takes the leader's copy whole).
        overlap_steps, fragments: must stay 0 and 1: a pull moves the replica toward the leader it has now,
            so the sync cannot arrive late or in pieces (PeriodicAveraging and DiLoCo can).
        offload: every model-sized tensor it holds between steps in (pinned) host memory
            (see :class:`~lightning_localsgd.ConsensusAlgorithm`).
    """

    needs_loss = True  # the leader is the replica with the lowest windowed training loss

    def __init__(
        self,
        sync_every: int = 4,
        pull: float = 0.1,
        loss_window: int = 10,
        node_sync_every: int | None = None,
        node_pull: float | None = None,
        step_pull: float = 0.0,
        evaluate: Evaluate = "average",
        *,
        node_step_pull: float | None = None,
        step_pull_per_period: bool = False,
        node_pull_on_global_step: bool = False,
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
        self.pull = check_number("pull", pull, 0, 1, example="0.1")
        self.loss_window = check_int("loss_window", loss_window)
        if node_sync_every is not None:
            check_int("node_sync_every", node_sync_every)
            if node_sync_every >= sync_every or sync_every % node_sync_every != 0:
                raise ValueError(
                    f"node_sync_every={node_sync_every} must be smaller than sync_every={sync_every} and divide it "
                    f"(e.g. node_sync_every={max(1, sync_every // 4)}, sync_every={sync_every})"
                )
        else:
            for name, value in (("node_pull", node_pull), ("node_step_pull", node_step_pull)):
                if value is not None:
                    raise ValueError(
                        f"{name} has no effect without node_sync_every: pass node_sync_every=... or drop it"
                    )
            if node_pull_on_global_step:
                raise ValueError(
                    "node_pull_on_global_step=True needs node_sync_every: pass node_sync_every=... or drop it"
                )
        flags = {"step_pull_per_period": step_pull_per_period, "node_pull_on_global_step": node_pull_on_global_step}
        for name, flag in flags.items():
            check_bool(name, flag)
        self.node_sync_every = node_sync_every
        self.node_pull = check_number("node_pull", 0.1 if node_pull is None else node_pull, 0, 1, example="0.1")
        self.step_pull = check_number("step_pull", step_pull, 0, 1, high_open=True, example="0.1")
        node_step_pull = 0.0 if node_step_pull is None else node_step_pull
        self.node_step_pull = check_number("node_step_pull", node_step_pull, 0, 1, high_open=True, example="0.1")
        self.step_pull_per_period, self.node_pull_on_global_step = step_pull_per_period, node_pull_on_global_step
        if evaluate not in ("average", "leader"):
            raise ValueError(f"evaluate must be 'average' or 'leader', got {evaluate!r}")
        self.evaluate: Evaluate = evaluate
        if self.pull == 0 and self.step_pull == 0 and self.node_step_pull == 0 and node_sync_every is None:
            rank_zero_warn(
                "LeaderSGD(pull=0, step_pull=0): the replicas never interact; use pull > 0 unless "
                "this is meant as an independent-workers baseline."
            )
        self.num_node_syncs = 0
        self.leader: int | None = None  # global rank of the last global leader
        self.leader_loss = math.inf
        self.leader_counts: dict[int, int] = {}
        self._losses: deque[float] = deque(maxlen=self.loss_window)
        self._copy: Tensor | None = None  # last received global leader copy (flat), kept when step_pull > 0
        self._node_copy: Tensor | None = None  # last received node leader copy, kept when node_step_pull > 0
        self._log_leader = False

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        if self._log_leader:
            values = {"leader/rank": float(self.leader or 0), "leader/loss": self.leader_loss}
            pl_module.log_dict(values, on_step=True, on_epoch=False, rank_zero_only=True)
            self._log_leader = False

    # ------------------------------------------------------------------ driven by the strategy
    def on_bind(self, fresh: bool) -> None:
        if self.comm.comm_dtype is not None:
            raise ValueError(
                f"comm_dtype={self.comm.comm_dtype} would have no effect: LeaderSGD broadcasts the leader's raw "
                "parameters (there is no shared anchor to send differences against). Use "
                "LocalSGDStrategy(comm_dtype=None) with LeaderSGD."
            )
        node, world = self.node, self.world
        if self.node_sync_every is not None and node.size in (1, world.size):
            rank_zero_warn(
                f"node_sync_every={self.node_sync_every} has no effect: the node groups have {node.size} process(es) "
                f"out of {world.size}. Use it with num_nodes > 1 and devices > 1, or drop it."
            )
        self._losses.clear()  # per-rank state: restored by load_rank_state_dict when resuming
        self._copy = self._node_copy = None

    def after_step(self, step: int, report: StepReport | None = None) -> None:
        if self.in_warmup(step):
            self.mark_equal(step)  # gradients were averaged: the replicas are still equal
        else:
            global_weight, node_weight = self.step_pull, self.node_step_pull
            if self.step_pull_per_period:
                global_weight /= self.sync_every
                node_weight /= self.node_sync_every or 1
            for copy, weight in ((self._copy, global_weight), (self._node_copy, node_weight)):
                if weight > 0 and copy is not None:
                    averaged, _ = self.sync_tensors()
                    lerp_(averaged, views(copy, averaged), weight)
            if self.is_due(step, self.sync_every):
                if self.node_sync_every is not None and self.node_pull_on_global_step:
                    self.pull_toward_leader(step, node=True)
                    self.num_node_syncs += 1
                self.sync(step)
                self.num_syncs += 1
            elif self.node_sync_every is not None and self.is_due(step, self.node_sync_every):
                self.pull_toward_leader(step, node=True)
                self.num_node_syncs += 1
        if report is None or report.loss is None:
            raise ValueError(
                "LeaderSGD elects the leader by training loss: return the loss from training_step (or call "
                "fabric.backward(loss)) so that the step's backward sees it"
            )
        self._losses.append(report.loss)  # after the election: the window of a pull holds earlier steps

    def sync(self, step: int) -> None:
        self.pull_toward_leader(step, node=False)

    def window_loss(self) -> float:
        """This rank's mean loss over its last ``loss_window`` batches (+inf before the first)."""
        return sum(self._losses) / len(self._losses) if self._losses else math.inf

    def check_front_end(self, front_end: FrontEnd) -> None:
        if front_end.within_node is not None:
            raise ValueError(
                f"{type(self).__name__} elects the process with the lowest training loss, but under within_node="
                f"{front_end.within_node!r} the processes of a node are one replica with per-process losses. Use "
                "LocalSGDStrategy(within_node=None) (one replica per process) with LeaderSGD, or PeriodicAveraging / "
                "DiLoCo / EASGD with replica groups"
            )

    def elect(self, group: Group, step: int | None = None) -> tuple[int, list[int]]:
        """``(leader's global rank, ranks holding NaN/Inf)`` in ``group``: one all-gather, same on all ranks."""
        averaged, _ = self.sync_tensors()
        local = torch.tensor([self.window_loss(), 0.0 if all_finite(averaged) else 1.0], dtype=torch.float64)
        table = self.comm.all_gather(local.to(averaged[0].device), group, purpose="leader").cpu()
        losses, bad = table[:, 0].clone(), table[:, 1] != 0
        bad_ranks = [group.ranks[j] for j in range(group.size) if bad[j]]
        if bad_ranks and (self.nonfinite == "raise" or len(bad_ranks) == group.size):
            where = f" at step {step}" if step is not None else ""
            raise NonFiniteReplicaError(
                f"the replica of rank(s) {bad_ranks} holds NaN/Inf{where}; no replica was changed. Lower the learning "
                "rate or clip gradients, or pass nonfinite='skip' to LeaderSGD to let them take the leader's copy."
            )
        losses[torch.isnan(losses) | bad] = math.inf
        j = int(torch.argmin(losses))  # the first minimum: ties go to the lowest rank
        if group is self.world:
            self.leader_loss = float(losses[j])
        return group.ranks[j], bad_ranks

    def pull_toward_leader(self, step: int, *, node: bool) -> None:
        """Elect the (node or global) leader, broadcast its replica, pull every rank toward it."""
        group = self.node if node else self.world
        leader, bad = self.elect(group, step)
        averaged, copied = self.sync_tensors()
        flat = flatten(averaged + copied)
        self.comm.broadcast_(flat, src=leader, group=group, purpose="sync")
        target = views(flat, averaged + copied)
        mine = group.ranks[group.rank]
        weight = 1.0 if mine in bad else (self.node_pull if node else self.pull)
        lerp_(averaged, target[: len(averaged)], weight)
        copy_(copied, target[len(averaged) :])
        if (self.node_step_pull if node else self.step_pull) > 0:
            copy = flat[: sum(t.numel() for t in averaged)]
            if node:
                self._node_copy = self.hold(copy)
            else:
                self._copy = self.hold(copy)
        if not node:
            self.leader = leader
            self.leader_counts[leader] = self.leader_counts.get(leader, 0) + 1
            self._log_leader = True
            if self.pull == 1.0:
                self.mark_equal(step)  # c = 1: every replica is the leader now

    # ------------------------------------------------------------------ the consensus model
    def _leader_state(self, purpose: str) -> dict[str, Tensor]:
        """The global leader's parameters and floating buffers, by state-dict name (collective)."""
        named = self._named_state()
        leader, _ = self.elect(self.world)
        flat = flatten(list(named.values()))
        self.comm.broadcast_(flat, src=leader, group=self.world, purpose=purpose)
        return dict(zip(named.keys(), views(flat, list(named.values())), strict=True))

    def write_consensus(self, purpose: str = "eval") -> None:
        if self.evaluate == "average":
            return super().write_consensus(purpose)
        named = self._named_state()
        copy_(list(named.values()), list(self._leader_state(purpose).values()))

    def finalize(self, step: int) -> None:
        if self.is_synced(step):
            return
        named = list(self._named_state().values())
        if self.evaluate == "average":
            self.comm.mean_(named, self.world, purpose="sync", nonfinite=self.nonfinite, step=step)
        else:
            copy_(named, list(self._leader_state("sync").values()))
        self.mark_equal(step)
        self.num_syncs += 1

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(num_node_syncs=self.num_node_syncs, leader=self.leader, leader_counts=dict(self.leader_counts))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_node_syncs = int(state_dict.get("num_node_syncs", 0))
        self.leader = state_dict.get("leader")
        self.leader_counts = dict(state_dict.get("leader_counts", {}))

    def rank_state_dict(self) -> dict[str, Any]:
        def saved(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {
            "losses": list(self._losses),
            "leader_copy": saved(self._copy),
            "node_leader_copy": saved(self._node_copy),
        }

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        self._losses = deque((float(v) for v in state.get("losses", [])), maxlen=self.loss_window)
        device = next(self.module.parameters()).device
        copy, node_copy = state.get("leader_copy"), state.get("node_leader_copy")
        self._copy = None if copy is None else self.hold(copy.to(device))
        self._node_copy = None if node_copy is None else self.hold(node_copy.to(device))

    @staticmethod
    def reduce_rank_states(states: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
        """Another world size: every rank restarts with an empty loss window and no leader copies."""
        return [{} for _ in range(world_size)]
