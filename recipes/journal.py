"""RunJournal: validation accuracy against training wall-clock, bytes sent and syncs, as JSON.

The same record for every strategy, so runs can be compared (``recipes.demo`` plots them):

* ``train_seconds``: wall-clock since the first training batch, validation excluded (validation
  costs the same for every strategy and is not part of training);
* ``MB_sent``: what this rank sent, in 10^6 bytes. Under :class:`~lightning_localsgd.LocalSGDStrategy`
  it is the library's counter (every collective it ran: setup broadcast, syncs, warm-up gradients,
  evaluation averages). Under any other strategy it is the closed form of what DDP sends with a
  ring allreduce: ``(n−1)/n · S`` for the initial broadcast of the model state (``S`` bytes of
  parameters and buffers) plus ``2·(n−1)/n · G`` per optimizer step for the gradients (``G``
  bytes of trainable parameters), on ``n`` ranks — the same formula the library's counter uses;
* ``syncs``: the algorithm's world synchronizations, or one per optimizer step for DDP.

``evaluate_every=k`` (deferred evaluation) replaces Lightning's validation during the fit: after
every k-th optimizer step each rank only copies its replica to memory (the clock paused for the
copy), and after the last step the consensus of each copy, the replicas' average (what
:meth:`ConsensusAlgorithm.write_consensus` evaluates for every algorithm that does not override it,
and DDP's model), is evaluated on the validation loader. Nothing crosses the wire and no
communication runs while training is paused, so a sync in flight (``overlap_steps``) cannot make
progress in time the clock does not count, which it does during a live validation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_localsgd.transport.tensors import flatten, unflatten_


def ddp_bytes(world: int, steps: int, grad_bytes: int, state_bytes: int) -> float:
    """Bytes one rank sends under DDP (ring allreduce): initial broadcast plus one gradient allreduce per step."""
    if world <= 1:
        return 0.0
    return (world - 1) / world * state_bytes + steps * 2.0 * (world - 1) / world * grad_bytes


@torch.no_grad()
def evaluate_accuracy(module: torch.nn.Module, loader: Any) -> float:
    """Top-1 accuracy of ``module``'s class scores over ``loader``'s (inputs, labels) batches."""
    correct = total = 0
    for x, y in loader:
        correct += int((module(x).argmax(-1) == y).sum())
        total += len(y)
    return correct / total


class RunJournal(Callback):
    """Append one record per validation (during ``fit``) and write them to ``path`` as JSON (rank 0).

    Args:
        path: the JSON file; rewritten after every validation, so a killed run leaves its curve.
        metric: the logged metric to record as ``value``.
        label: a name for the run (defaults to the strategy's and algorithm's class names).
        evaluate_every: 0 (default): record at Lightning's validations. k > 0: deferred evaluation
            (module docstring) of the replicas after every k-th step; needs ``limit_val_batches=0``
            and a module whose ``forward`` returns class scores (the metric is then the accuracy).
    """

    def __init__(self, path: str, metric: str = "val/acc", label: str | None = None, evaluate_every: int = 0) -> None:
        if evaluate_every < 0:
            raise ValueError(
                f"evaluate_every must be 0 (Lightning's validation) or a number of steps, got {evaluate_every}"
            )
        self.path = Path(path)
        self.metric, self.label = metric, label
        self.evaluate_every = evaluate_every
        self._snapshots: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []
        self.records: list[dict[str, float]] = []
        self._train_seconds = 0.0
        self._resumed_at: float | None = None
        self._fit_start = 0.0

    # ------------------------------------------------------------------ clock
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.evaluate_every and trainer.limit_val_batches != 0:
            raise ValueError(
                "RunJournal(evaluate_every=k) evaluates after the fit and replaces Lightning's validation: "
                "set Trainer(limit_val_batches=0), or use evaluate_every=0 to record Lightning's validations"
            )
        algorithm = getattr(trainer.strategy, "algorithm", None)
        if self.evaluate_every and algorithm is not None:
            from lightning_localsgd.algorithms.base import ConsensusAlgorithm

            if type(algorithm).write_consensus is not ConsensusAlgorithm.write_consensus:
                raise ValueError(
                    f"RunJournal(evaluate_every=k) evaluates the replicas' average, but {type(algorithm).__name__} "
                    "evaluates another consensus: use evaluate_every=0 (Lightning's validation) for it"
                )
        self._fit_start = time.perf_counter()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._resumed_at is None:
            self._resumed_at = time.perf_counter()

    def _pause(self) -> None:
        if self._resumed_at is not None:
            self._train_seconds += time.perf_counter() - self._resumed_at
            self._resumed_at = None

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.evaluate_every and step % self.evaluate_every == 0 and self._resumed_at is not None:
            self._pause()
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self._snapshots.append(
                ({"step": step, "epoch": trainer.current_epoch, **self.totals(trainer, pl_module)}, state)
            )
            self._resumed_at = time.perf_counter()  # the copy is not charged; the next batch's loading is

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Deferred evaluation: the replicas' average of every snapshot, on the validation loader."""
        if not self._snapshots:
            return
        self._pause()
        current = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        loader = (trainer.datamodule if trainer.datamodule is not None else pl_module).val_dataloader()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        was_training = pl_module.training
        pl_module.eval()
        for record, state in self._snapshots:
            if world > 1:  # one allreduce per copy: its floating tensors flattened, cast back per tensor
                floats = [t for t in state.values() if torch.is_floating_point(t)]
                total = flatten(floats)
                dist.all_reduce(total)
                unflatten_(total.div_(world), floats)
            pl_module.load_state_dict(state)
            record["value"] = evaluate_accuracy(pl_module, loader)
            self.records.append(record)
        self._snapshots = []
        pl_module.load_state_dict(current)
        pl_module.train(was_training)
        self._write(trainer, pl_module)
        self._resumed_at = time.perf_counter()  # the strategy's closing sync (after this hook) is training

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pause()  # callbacks run before the strategy's evaluation swap: its bytes count, its time does not

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        value = trainer.callback_metrics.get(self.metric)
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, **self.totals(trainer, pl_module)}
        record["value"] = float(value) if value is not None else float("nan")
        self.records.append(record)
        self._write(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pause()
        self._write(trainer, pl_module, final=True)

    # ------------------------------------------------------------------ what was sent
    def totals(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        from lightning_localsgd import LocalSGDStrategy

        strategy = trainer.strategy
        running = 0.0 if self._resumed_at is None else time.perf_counter() - self._resumed_at
        out = {"train_seconds": self._train_seconds + running, "wall_seconds": time.perf_counter() - self._fit_start}
        if isinstance(strategy, LocalSGDStrategy):
            out["MB_sent"] = strategy.comm.counters.bytes_sent / 1e6
            out["syncs"] = float(strategy.algorithm.num_syncs if strategy.algorithm is not None else 0)
        else:
            grad = sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad)
            state = sum(t.numel() * t.element_size() for t in [*pl_module.parameters(), *pl_module.buffers()])
            out["MB_sent"] = ddp_bytes(trainer.world_size, trainer.global_step, grad, state) / 1e6
            out["syncs"] = float(trainer.global_step if trainer.world_size > 1 else 0)
        return out

    def _write(self, trainer: Trainer, pl_module: LightningModule, final: bool = False) -> None:
        if not trainer.is_global_zero:
            return
        from lightning_localsgd import LocalSGDStrategy

        strategy = trainer.strategy
        algorithm = getattr(strategy, "algorithm", None)
        label = self.label or type(strategy).__name__ + (f"+{type(algorithm).__name__}" if algorithm else "")
        doc: dict[str, Any] = {
            "label": label,
            "metric": self.metric,
            "world_size": trainer.world_size,
            "bytes_source": "library counter" if isinstance(strategy, LocalSGDStrategy) else "closed form (ring)",
            "records": self.records,
        }
        if final:
            doc["final"] = {"step": trainer.global_step, **self.totals(trainer, pl_module)}
            if isinstance(strategy, LocalSGDStrategy):
                doc["final"]["MB_by_kind"] = {k: v / 1e6 for k, v in strategy.comm.counters.bytes_by_purpose.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(self.path)
