"""What the benchmarks share: launching ranks, the environment record, number formatting, time to a
target, and the probe callback of the MNIST reproductions (:mod:`benchmarks.gradalign_label_skew`,
:mod:`benchmarks.lsgd_vs_easgd`).

* :func:`launch_ranks` runs ``python -m <module> --worker cfg.json`` on ``world`` ranks through
  :func:`recipes.launch.run_local_ranks`; the worker side is :func:`recipes.launch.run_rank_from_file`.
  :func:`recipe_env` (from :mod:`recipes.launch`) is the environment of a recipe process that starts
  its own ranks (Lightning's launcher).
* :func:`environment` is the record every results JSON carries (versions, cores, load average, date, link).
* :func:`fmt` / :func:`fmt_spec` print numbers in tables (``-`` for a missing one).
* :func:`time_to`, :func:`time_held` and :func:`time_to_interpolated`: when a curve reaches a target.

The environment record and the time-to-target helpers live in :mod:`recipes.measure` (the demo uses
them too, and recipes never import benchmarks); they are re-exported here under the same names.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from recipes.launch import read_loopback_bytes, recipe_env, run_local_ranks
from recipes.measure import environment, loadavg, time_held, time_to, time_to_interpolated

__all__ = [
    "DOCS_IMG",
    "HELD_GROUPS",
    "QUIET_TRAINER",
    "RESULTS",
    "ROOT",
    "TRAIN_KINDS",
    "ddp_closed_form_bytes_per_step",
    "environment",
    "fmt",
    "fmt_spec",
    "global_rank",
    "held_bytes",
    "interleaved_schedule",
    "launch_ranks",
    "load_text",
    "loadavg",
    "make_probe_callback",
    "recipe_env",
    "time_held",
    "time_to",
    "time_to_interpolated",
    "write_report",
]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DOCS_IMG = ROOT / "docs" / "results" / "img"

QUIET_TRAINER: dict[str, Any] = {
    "accelerator": "cpu",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}
"""The Trainer arguments of a measured run: CPU, no logger, checkpoints, progress bar, summary or validation."""

HELD_GROUPS = ("model", "grads", "optimizer", "algorithm", "transport")
"""The groups :func:`held_bytes` counts."""

# kinds of the library's byte counter that are training traffic (not setup, evaluation or checkpoints)
TRAIN_KINDS = ("sync", "grad", "leader", "gradalign")


# ====================================================================== launching
def launch_ranks(
    module: str,
    cfg: dict[str, Any],
    world: int,
    nodes: int = 1,
    *,
    timeout: float,
    link: str | None = None,
    node_namespaces: bool = False,
    independent_nodes: bool = False,
    traffic: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]] | None, str]:
    """Run ``python -m <module> --worker cfg.json`` on ``world`` processes as ``nodes`` nodes.

    The worker reads ``cfg`` plus ``out_dir``, ``world``, ``nodes`` and ``per_node`` and writes
    ``rank<r>.json`` (:func:`recipes.launch.run_rank_from_file`). ``link`` (e.g. ``"100mbit"``) puts
    the ranks behind a shaped loopback. ``node_namespaces`` / ``independent_nodes``: two simulated
    nodes joined by a link of ``link`` / each node its own job (:func:`recipes.launch.run_local_ranks`);
    ``traffic`` (a dict) then receives the run's bytes per path. Returns every rank's result in rank
    order and ``""``, or ``None`` and the tail of every rank's log.
    """
    per_node = world // nodes
    with tempfile.TemporaryDirectory(prefix=f"{module.rsplit('.', 1)[-1]}_") as tmp:
        cfg = dict(cfg, out_dir=tmp, world=world, nodes=nodes, per_node=per_node)
        cfg_path = Path(tmp) / "cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        cmd = [sys.executable, "-m", module, "--worker", str(cfg_path)]
        try:
            paths = run_local_ranks(
                cmd,
                world,
                nodes,
                log_dir=tmp,
                timeout=timeout,
                cwd=ROOT,
                pythonpath=ROOT,
                log_tail=4000,
                link=link,
                node_namespaces=node_namespaces,
                independent_nodes=independent_nodes,
            )
        except RuntimeError as err:
            return None, str(err)
        if traffic is not None and paths is not None:
            traffic.update(paths)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)], ""


def global_rank(per_node: int) -> int:
    """This process's rank from the launcher's ``NODE_RANK`` and ``LOCAL_RANK`` (``per_node`` ranks a node)."""
    return int(os.environ["NODE_RANK"]) * per_node + int(os.environ["LOCAL_RANK"])


def interleaved_schedule(names: list[str], repeats: int, seed: int) -> list[dict[str, Any]]:
    """Every variant once per repeat, the order rotated by one each repeat, repeat ``r`` with seed
    ``seed + r``: ``{"variant", "repeat", "seed"}`` in the order the fits run."""
    schedule = []
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        schedule += [{"variant": n, "repeat": rep, "seed": seed + rep} for n in order]
    return schedule


def load_text(summary: dict[str, Any]) -> str:
    """``", load avg a-b on N cores"`` over the ``loadavg_before_each`` of a summary's variants (empty
    when none was recorded)."""
    loads = [load for s in summary["variants"].values() for load in s["loadavg_before_each"] if load]
    if not loads:
        return ""
    low, high = min(load[0] for load in loads), max(load[0] for load in loads)
    return f", load avg {low:.1f}-{high:.1f} on {os.cpu_count()} cores"


# ====================================================================== formatting
def fmt(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    """``value × scale`` with ``digits`` decimals; ``-`` for ``None`` or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def fmt_spec(value: Any, spec: str) -> str:
    """``format(value, spec)`` (e.g. ``"+.1%"``); ``-`` for ``None``."""
    return "-" if value is None else format(value, spec)


# ====================================================================== bytes
def ddp_closed_form_bytes_per_step(num_params: int, world: int, bytes_per_value: int = 4) -> float:
    """What one rank sends per DDP step: a ring allreduce of the fp32 gradient, 2·(n−1)/n·4P."""
    return 2.0 * (world - 1) / world * bytes_per_value * num_params


# ====================================================================== the probe callback
def make_probe_callback(rank: int, world: int, extra: Any = None) -> Any:
    """A callback that records, at every validation (and the step-0 sanity check), on rank 0:
    step, training wall-clock (validation time excluded; the slowest rank's), test error/loss
    (summed over ranks with torch.distributed, outside the library's counters), the library's
    training bytes by kind, load average; and the lo bytes over the whole fit, every step's time
    and training loss.

    The module keeps ``val_sums``, a (2, 3) float64 tensor of (correct, count, loss sum) per
    validation loader (0: test, 1: an optional training subset) that its ``validation_step`` adds to.
    ``extra(trainer, module) -> dict`` runs on every rank at each evaluation (on the consensus)
    and its values are stored with the point (gradalign_label_skew's gradient alignment).
    """
    import torch
    import torch.distributed as dist
    from lightning.pytorch import Callback

    class Probe(Callback):
        def __init__(self) -> None:
            self.points: list[dict[str, Any]] = []
            self.t0 = 0.0
            self.eval_seconds = 0.0
            self._t_eval = 0.0
            self._clock = 0.0
            self.counter0: dict[str, float] = {}
            self.lo0: tuple[int, int] | None = None
            self.lo1: tuple[int, int] | None = None
            self.train_seconds = 0.0
            self.train_losses: list[float] = []
            self.step_seconds: list[float] = []  # on_train_batch_start -> end (forward, backward, step, sync)
            self._t_batch = 0.0

        @staticmethod
        def _counter(trainer: Any) -> dict[str, float]:
            comm = getattr(trainer.strategy, "comm", None)
            return dict(comm.counters.bytes_by_purpose) if comm is not None else {}

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.counter0 = self._counter(trainer)
            self.lo0 = read_loopback_bytes() if rank == 0 else None
            self.eval_seconds = 0.0
            self.t0 = time.perf_counter()

        def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            self._t_batch = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args: Any) -> None:
            self.step_seconds.append(time.perf_counter() - self._t_batch)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.train_losses.append(float(loss))

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            # callbacks run before the strategy's hook: the consensus swap is charged to evaluation
            self._t_eval = time.perf_counter()
            self._clock = 0.0 if trainer.sanity_checking else self._t_eval - self.t0 - self.eval_seconds

        def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            pl_module.val_sums.zero_()

        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            sums = pl_module.val_sums.clone()
            dist.all_reduce(sums)
            clock = torch.tensor([self._clock], dtype=torch.float64)
            dist.all_reduce(clock, op=dist.ReduceOp.MAX)
            extras = extra(trainer, pl_module) if extra is not None else {}
            now = self._counter(trainer)
            by_kind = {k: now.get(k, 0.0) - self.counter0.get(k, 0.0) for k in now}
            train_bytes = sum(by_kind.get(k, 0.0) for k in TRAIN_KINDS)
            point = {
                "step": 0 if trainer.sanity_checking else int(trainer.global_step),
                "wall_s": float(clock),
                "test_error": 1.0 - float(sums[0, 0] / sums[0, 1]),
                "test_loss": float(sums[0, 2] / sums[0, 1]),
                "test_count": int(sums[0, 1]),
                "train_bytes_counter": 0.0 if trainer.sanity_checking else train_bytes,
                "bytes_by_kind": {} if trainer.sanity_checking else by_kind,
                "loadavg": loadavg(),
                **extras,
            }
            if sums[1, 1] > 0:  # a second validation loader: error on (a subset of) the training data
                point.update(
                    train_error=1.0 - float(sums[1, 0] / sums[1, 1]), train_loss=float(sums[1, 2] / sums[1, 1])
                )
            self.points.append(point)

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                self.eval_seconds += time.perf_counter() - self._t_eval

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.train_seconds = time.perf_counter() - self.t0 - self.eval_seconds
            self.lo1 = read_loopback_bytes() if rank == 0 else None

        def lo_tx(self) -> int | None:
            return None if self.lo0 is None or self.lo1 is None else self.lo1[1] - self.lo0[1]

    return Probe()


# ====================================================================== the report's tail
def write_report(
    result: dict[str, Any],
    summary: dict[str, Any],
    out_dir: Path,
    name: str,
    title: str,
    plot_fn: Any,
    table_text: str,
    docs_png: str | None,
) -> None:
    """``<name>.json``, ``<name>.png`` (and a small copy ``docs/results/img/<docs_png>``), then the table."""
    result["summary"] = summary
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(result, indent=1))
    png = out_dir / f"{name}.png"
    plot_fn(result, summary, png, title)
    if docs_png is not None:
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        plot_fn(result, summary, DOCS_IMG / docs_png, title, dpi=75)
    print()
    print(table_text)
    print(f"\nwrote {json_path}\nwrote {png}\ntotal {result.get('total_seconds', 0):.0f} s")


def held_bytes(trainer: Any) -> dict[str, int]:
    """Storage bytes of the tensors this rank holds, each storage once, by group (:data:`HELD_GROUPS`): the model
    (a sharded parameter: its shard) and buffers, the gradients, the inner optimizer's state, every tensor the
    consensus algorithm object reaches, the transport's persistent buffers (used by benchmarks.fsdp_memory
    and benchmarks.step_time)."""
    import dataclasses

    import torch

    from lightning_localsgd.transport.tensors import local

    seen: set[int] = set()

    def count(tensors: list[Any]) -> int:
        total = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            storage = local(t).untyped_storage()
            if storage.data_ptr() == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total

    def reach(obj: Any, depth: int = 0) -> list[Any]:
        if depth > 6:
            return []
        if isinstance(obj, torch.Tensor):
            return [obj]
        if isinstance(obj, torch.optim.Optimizer):
            return [v for s in obj.state.values() for v in s.values()] + [
                p for g in obj.param_groups for p in g["params"]
            ]
        if isinstance(obj, dict):
            return [t for v in obj.values() for t in reach(v, depth + 1)]
        if isinstance(obj, list | tuple):
            return [t for v in obj for t in reach(v, depth + 1)]
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return [t for f in dataclasses.fields(obj) for t in reach(getattr(obj, f.name), depth + 1)]
        return []

    module, strategy = trainer.lightning_module, trainer.strategy
    algorithm = getattr(strategy, "algorithm", None)  # None: DDP, ModelParallelStrategy
    own = {} if algorithm is None else {k: v for k, v in vars(algorithm).items() if k not in ("_ctx", "_loaded")}
    comm = getattr(strategy, "comm", None)
    optimizer = trainer.optimizers[0]
    return {
        "model": count(list(module.parameters()) + list(module.buffers())),
        "grads": count([p.grad for p in module.parameters()]),
        "optimizer": count([v for s in optimizer.state.values() for v in s.values()]),
        "algorithm": count(reach(own)),
        "transport": count([] if comm is None else list(comm._buffers.values())),
    }
