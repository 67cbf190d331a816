"""Asynchronous Local-SGD reproduction (seed 001): sync DiLoCo vs async Nesterov, DN and DN + DyLU.

Liu et al., "Asynchronous Local-SGD Training for Language Modeling" (arXiv 2401.09135), toy setup:
4 workers at 0.58 / 0.75 / 1.51 / 3.33 s per step, H = 20 (10 here), inner AdamW, synchronous outer
Nesterov (lr 0.7, momentum 0.9), asynchronous outer lr 10× smaller (0.07).

Here the model is the char-level GPT of ``recipes/char_lm.py`` (reduced to 2 layers, width 96,
batch 8, so that compute stays below the emulated step times on a loaded 2-core machine) on
the standard library's source, 4 gloo processes on 127.0.0.1. Heterogeneity is emulated **the same
way for all four variants**: a callback makes rank ``r``'s optimizer step take ``scale × [0.58,
0.75, 1.51, 3.33][r]`` seconds of wall-clock (it sleeps for the rest of the step after the
compute, before ``optimizer.step``, so the async worker's speed measurement and DyLU see it). The
scale is chosen so that even the fastest rank's step is mostly sleep: the run needs less than the
machine's cores although 4 ranks share 2, and the emulated speeds, not CPU contention, set the
pace. (``AsyncLocalSGDStrategy(slowdown=...)`` sleeps in proportion to each step's *measured*
compute, which is noisy when 4 processes share 2 cores and leaves the fastest rank unslowed; a
fixed step time is also what a sleep in the synchronous run can reproduce exactly.)

Variants:

=================  ==========================================================================
sync_diloco        ``LocalSGDStrategy`` + ``DiLoCo(sync_every=H, outer_lr=0.7, momentum 0.9)``:
                   each round waits for the slowest worker
async_nesterov     ``AsyncLocalSGDStrategy(outer_optimizer=OuterSGD(0.07, 0.9, nesterov=True),
                   dynamic_local_steps=False)``: the naive baseline
async_dn           ``DelayedNesterov(0.07, 0.9)`` (N = 4), every worker H steps per round
async_dn_dylu      ``DelayedNesterov(0.07, 0.9)`` + DyLU
=================  ==========================================================================

Measurement: rank 0 snapshots the global model (sync: after every outer step; async: the
server's θ after every ``n`` = 4 pushes, from a push observer) with the wall-clock since its
``on_train_start``. After ``fit`` every snapshot is evaluated on the same validation windows, so
validation never perturbs the timing. "Outer updates" = pseudo-gradients applied / n: one sync
round applies n (averaged), an async push applies 1, so k updates of either have consumed the
same number of pseudo-gradients (for DN with N = n, one momentum block).

Run::

    python -m benchmarks.async_repro                  # ~8 minutes on 2 cores
    python -m benchmarks.async_repro --rounds 4 --name async_repro_smoke   # a quick check

Writes ``benchmarks/results/<name>/async_repro.json`` and ``async_repro.png`` and prints a table.
Nothing is asserted: the paper's targets are reported.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, environment, fmt_spec, launch_ranks, time_to_interpolated
from recipes.launch import run_rank_from_file

PAPER_STEP_SECONDS = [0.58, 0.75, 1.51, 3.33]
VARIANTS = ["sync_diloco", "async_nesterov", "async_dn", "async_dn_dylu"]


# ====================================================================== one rank
def run_rank(cfg: dict[str, Any]) -> dict[str, Any] | None:
    import warnings
    from datetime import timedelta

    warnings.filterwarnings("ignore")
    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything

    from lightning_localsgd import LocalSGDStrategy
    from lightning_localsgd.algorithms.diloco import DiLoCo
    from lightning_localsgd.asynchronous.optimizers import DelayedNesterov, OuterSGD
    from lightning_localsgd.asynchronous.strategy import AsyncLocalSGDStrategy
    from lightning_localsgd.transport.tensors import flatten, unflatten_
    from recipes.char_lm import CharGPT, StdlibCorpusDataModule

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["LOCAL_RANK"])  # one node
    variant, H, n = cfg["variant"], cfg["H"], world
    step_seconds = cfg["scale"] * PAPER_STEP_SECONDS[rank]
    seed_everything(cfg["seed"], workers=True)
    model = CharGPT(**cfg["model"])
    data = StdlibCorpusDataModule(**cfg["data"])
    timeout = timedelta(seconds=cfg["timeout"])

    class FixedStepTime(Callback):
        """Each optimizer step of this rank takes ``step_seconds`` of wall-clock (compute, then sleep)."""

        def __init__(self) -> None:
            self.start, self.compute = 0.0, []

        def on_train_batch_start(self, *args: Any) -> None:
            self.start = time.monotonic()

        def on_before_optimizer_step(self, *args: Any) -> None:
            spent = time.monotonic() - self.start
            self.compute.append(spent)
            time.sleep(max(0.0, step_seconds - spent))

    snaps: list[dict[str, Any]] = []
    t0 = [0.0]

    class Snapshots(Callback):
        def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
            t0[0] = time.monotonic()
            if rank == 0:
                snaps.append({"updates": 0.0, "time": 0.0, "theta": flatten(list(pl_module.parameters())).clone()})

        def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
            if variant == "sync_diloco" and rank == 0 and trainer.global_step % H == 0:  # right after a sync
                snaps.append(
                    {
                        "updates": float(trainer.global_step // H),
                        "time": time.monotonic() - t0[0],
                        "theta": flatten(list(pl_module.parameters())).clone(),
                    }
                )

    timer, callbacks = FixedStepTime(), []
    if variant == "sync_diloco":
        strategy = LocalSGDStrategy(timeout=timeout)
        callbacks.append(DiLoCo(sync_every=H, outer_lr=cfg["sync_outer_lr"], outer_momentum=0.9, nesterov=True))
        max_steps = cfg["rounds"] * H
    else:
        if variant == "async_nesterov":
            outer = OuterSGD(lr=cfg.get("naive_outer_lr", cfg["async_outer_lr"]), momentum=0.9, nesterov=True)
        else:
            outer = DelayedNesterov(lr=cfg["async_outer_lr"], momentum=0.9)
        strategy = AsyncLocalSGDStrategy(
            sync_every=H,
            outer_optimizer=outer,
            dynamic_local_steps=variant == "async_dn_dylu",
            max_updates=cfg["async_updates"] * n,
            timeout=timeout,
        )
        max_steps = 10**7

        def observe(record: Any, g: Any) -> None:  # under the server lock, after the update
            if record.update % n == 0:
                server = strategy.server
                snaps.append(
                    {
                        "updates": record.update / n,
                        "time": time.monotonic() - t0[0],
                        "theta": server.state[: server.num_params].clone(),
                    }
                )

        if rank == 0:
            strategy.push_observers.append(observe)
    callbacks += [timer, Snapshots()]
    trainer = Trainer(
        accelerator="cpu",
        devices=world,
        num_nodes=1,
        strategy=strategy,
        max_steps=max_steps,
        max_epochs=-1,
        callbacks=callbacks,
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    fit_start = time.monotonic()
    trainer.fit(model, datamodule=data)
    fit_seconds = time.monotonic() - fit_start
    train_seconds = time.monotonic() - t0[0]
    compute = timer.compute[5:] or timer.compute
    result: dict[str, Any] = {
        "rank": rank,
        "steps": trainer.global_step,
        "step_seconds": step_seconds,
        "compute_mean": sum(compute) / max(len(compute), 1),
        "train_seconds": train_seconds,
        "fit_seconds": fit_seconds,
    }
    if rank != 0:
        return result
    if variant != "sync_diloco":
        server = strategy.server
        result["server"] = {
            "updates": server.updates,
            "pushes": list(server.pushes),
            "steps": list(server.steps),
            "speeds": list(server.speeds),
            "local_steps": list(server.local_steps),
            "staleness_mean": server.staleness_sum / max(server.updates, 1),
            "staleness_max": server.staleness_max,
        }
        # the final model after every last push (may be up to n-1 pushes after the last snapshot)
        snaps.append(
            {
                "updates": server.updates / n,
                "time": train_seconds,
                "theta": flatten(list(model.parameters())).clone(),
                "final": True,
            }
        )
    else:
        result["server"] = None
    # evaluate every snapshot on the same validation windows, on this process alone
    data.prepare(0, 1)
    val = torch.utils.data.DataLoader(data.full_val_dataset(), batch_size=128)
    evaluator = CharGPT(**cfg["model"]).eval()
    params = list(evaluator.parameters())
    curve = []
    with torch.no_grad():
        for s in snaps:
            unflatten_(s["theta"], params)
            total, count = 0.0, 0
            for x, y in val:
                total += float(evaluator.loss((x, y))) * x.shape[0]
                count += x.shape[0]
            curve.append(
                {
                    "updates": s["updates"],
                    "time": s["time"],
                    "val_loss": total / count,
                    "final": bool(s.get("final", False)),
                }
            )
    result["curve"] = curve
    result["num_params"] = sum(p.numel() for p in params)
    result["val_tokens"] = count * data.context
    return result


# ====================================================================== summary
def interp_at(curve: list[dict[str, Any]], key: str, x: float) -> float | None:
    pts = sorted((c[key], c["val_loss"]) for c in curve)
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def summarize(runs: dict[str, Any], rounds: int) -> dict[str, Any]:
    sync = runs["sync_diloco"]["curve"]
    sync_final = sync[-1]["val_loss"]
    sync_time = sync[-1]["time"]
    out: dict[str, Any] = {"sync_final_loss": sync_final, "sync_final_time": sync_time, "variants": {}}
    for name, run in runs.items():
        curve = [c for c in run["curve"] if not c.get("final")]
        at_r = interp_at(curve, "updates", rounds)
        # mean relative gap to sync over the shared update counts (1..rounds)
        gaps = [
            (interp_at(curve, "updates", k) - interp_at(sync, "updates", k)) / interp_at(sync, "updates", k)
            for k in range(1, rounds + 1)
            if interp_at(curve, "updates", k) is not None
        ]
        t_hit = time_to_interpolated(run["curve"], sync_final)
        out["variants"][name] = {
            "loss_at_sync_updates": at_r,
            "gap_at_sync_updates": None if at_r is None else (at_r - sync_final) / sync_final,
            "mean_gap_per_update": sum(gaps) / len(gaps) if gaps else None,
            "time_to_sync_final": t_hit,
            "speedup_to_sync_final": None if t_hit is None or t_hit <= 0 else sync_time / t_hit,
            "final_loss": run["curve"][-1]["val_loss"],
            "final_updates": run["curve"][-1]["updates"],
            "train_seconds": run["train_seconds"],
        }
    return out


def plot(runs: dict[str, Any], path: Path, title: str, dpi: int = 90) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        c = run["curve"]
        axes[0].plot([p["updates"] for p in c], [p["val_loss"] for p in c], marker=".", label=name)
        axes[1].plot([p["time"] for p in c], [p["val_loss"] for p in c], marker=".", label=name)
    axes[0].set_xlabel("outer updates (pseudo-gradients applied / 4)")
    axes[1].set_xlabel("wall-clock since train start (s)")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="async_repro")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--H", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=12, help="sync outer rounds")
    ap.add_argument("--async-factor", type=float, default=1.5, help="async runs apply this × rounds × n pushes")
    ap.add_argument("--scale", type=float, default=0.2, help="seconds of emulated step = scale × paper seconds")
    ap.add_argument("--sync-outer-lr", type=float, default=0.7)
    ap.add_argument("--async-outer-lr", type=float, default=0.07, help="DN's ε")
    ap.add_argument(
        "--naive-outer-lr", type=float, default=None, help="naive async Nesterov's α (default: --async-outer-lr)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=float, default=600, help="seconds before a variant's run is killed")
    args = ap.parse_args()
    if args.worker:
        run_rank_from_file(args.worker, run_rank)
        return
    world = 4
    cfg = {
        "H": args.H,
        "rounds": args.rounds,
        "async_updates": round(args.rounds * args.async_factor),
        "scale": args.scale,
        "sync_outer_lr": args.sync_outer_lr,
        "async_outer_lr": args.async_outer_lr,
        "naive_outer_lr": args.async_outer_lr if args.naive_outer_lr is None else args.naive_outer_lr,
        "seed": args.seed,
        "timeout": 300,
        "model": {"n_layer": 2, "n_head": 4, "d_model": 96, "context": 64, "lr": 3e-3, "warmup_steps": 20},
        "data": {"context": 64, "batch_size": 8, "max_bytes": 2_000_000, "max_val_windows": 256},
    }
    out_dir = RESULTS / args.name
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    runs, per_rank = {}, {}
    started = time.monotonic()
    for v in args.variants:
        t = time.monotonic()
        ranks, logs = launch_ranks("benchmarks.async_repro", dict(cfg, variant=v), world, timeout=args.limit)
        if ranks is None:
            raise RuntimeError(f"{v} failed: {logs}")
        r0 = ranks[0]
        runs[v] = {"curve": r0["curve"], "train_seconds": r0["train_seconds"], "server": r0["server"]}
        keys = ("rank", "steps", "step_seconds", "compute_mean", "train_seconds")
        per_rank[v] = [{k: r[k] for k in keys} for r in ranks]
        print(f"{v}: {time.monotonic() - t:.0f} s (load {os.getloadavg()[0]:.2f})", flush=True)
    summary = summarize(runs, args.rounds) if "sync_diloco" in runs else None
    result = {
        "benchmark": "async_repro",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "host": {
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "total_seconds": time.monotonic() - started,
        },
        "config": cfg,
        "paper_step_seconds": PAPER_STEP_SECONDS,
        "runs": runs,
        "per_rank": per_rank,
        "summary": summary,
    }
    (out_dir / "async_repro.json").write_text(json.dumps(result, indent=1))
    plot(
        runs,
        out_dir / "async_repro.png",
        f"char-GPT on stdlib source, 4 workers at {args.scale:g}×(0.58,0.75,1.51,3.33) s/step, "
        f"H={args.H}, seed {args.seed}",
    )
    # table
    print(f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; {os.cpu_count()} cpus")
    print(
        f"{'variant':16s} {'updates':>8s} {'final':>7s} {'@R upd':>7s} {'gap@R':>7s} {'meangap':>8s} "
        f"{'t→sync':>7s} {'speedup':>7s} {'train s':>7s} {'stale μ/max':>11s}"
    )
    for v, run in runs.items():
        s = summary["variants"][v] if summary else {}
        srv = run["server"]

        stale = "-" if srv is None else f"{srv['staleness_mean']:.1f}/{srv['staleness_max']}"
        print(
            f"{v:16s} {fmt_spec(s.get('final_updates'), '8.2f')} {fmt_spec(s.get('final_loss'), '7.3f')} "
            f"{fmt_spec(s.get('loss_at_sync_updates'), '7.3f')} {fmt_spec(s.get('gap_at_sync_updates'), '+7.1%')} "
            f"{fmt_spec(s.get('mean_gap_per_update'), '+8.1%')} {fmt_spec(s.get('time_to_sync_final'), '7.1f')} "
            f"{fmt_spec(s.get('speedup_to_sync_final'), '7.2f')} {run['train_seconds']:7.1f} {stale:>11s}"
        )
    for v in runs:
        srv = runs[v]["server"]
        print(
            v,
            "steps per rank:",
            [r["steps"] for r in per_rank[v]],
            "compute s/step:",
            [round(r["compute_mean"], 3) for r in per_rank[v]],
            "" if srv is None else f"pushes {srv['pushes']} H_i {srv['local_steps']}",
        )
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
