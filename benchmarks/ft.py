"""What a lost replica group costs under fault_tolerance=TorchFT(...) (issue 12 benchmark).

    python -m benchmarks.ft --docs                   # 3 seeds × {periodic, diloco} × {fault, no fault}
    python -m benchmarks.ft --seeds 0 --algorithms periodic --name smoke
    python -m benchmarks.ft --report-only --docs     # table, plot and page data again from the JSON
    python -m benchmarks.ft --merge a/ft.partial.json b/ft.json --docs   # pool the runs of several invocations

Each run is a torchft Lighthouse (in this process, ``--heartbeat-ms``) and 3 replica groups of one
CPU process (recipes/ft_launch.py). Every group trains a 16-32-4 tanh MLP on its own 1024 samples of
a 4-class Gaussian-blob problem (SGD lr 0.05, momentum 0.9, batch 32, ``--steps`` steps, sync
every ``--sync-every``; DiLoCo's outer SGD lr 0.7, momentum 0.5, Nesterov), each group from its own
random initialization (the first round makes them equal). In a *fault* run group 2 is SIGKILLed
after step ``--die-at`` and started again at once; the live groups pause after step ``--gate-at``
(harness, not library) until the restarted process is up, so every seed loses the same steps
whatever the load of the machine, and the pause is reported apart. A *no fault* run is the same
seed without the kill. Measured:

* **time to detect**: the kill → the quorum without group 2 (survivors' ``quorum_seconds`` of that
  sync, and kill → that quorum's wall-clock time);
* **steps lost by the survivors**: ``--steps`` minus the optimizer steps they ran, and the sync
  attempts they had to repeat (target 0);
* **back in the quorum**: the restarted process's start → its first committed round, split into
  process start-up (→ the join round) and joining (→ committed);
* **final validation accuracy and loss** of the final model (equal on every group: checked) on
  2000 held-out samples, fault against no fault, per seed.

Conditions alternate order by seed; ``os.getloadavg()`` is recorded before each run. Writes
``benchmarks/results/<name>/ft.json`` and ``ft.png`` (``--docs``: copies under docs/results/).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DOCS = ROOT / "docs" / "results"


# ====================================================================== one group's process
def blobs(seed: int, n: int, stream: int) -> tuple[Any, Any]:
    import torch

    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed)) * 0.6
    gen = torch.Generator().manual_seed(seed * 1000 + stream)
    y = torch.randint(0, 4, (n,), generator=gen)
    return centers[y] + torch.randn(n, 16, generator=gen), y


def run_group(cfg: dict[str, Any]) -> None:
    import torch
    from lightning.pytorch import LightningModule, Trainer
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_localsgd import DiLoCo, LocalSGDStrategy, PeriodicAveraging, TorchFT
    from recipes.ft_launch import INCARNATION_ENV, KillSelf, Pace, RestartGate

    group, incarnation = int(os.environ["REPLICA_GROUP_ID"]), int(os.environ[INCARNATION_ENV])
    torch.set_num_threads(1)
    torch.manual_seed(cfg["seed"] * 100 + group)

    class MLP(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
            self.steps = 0

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            self.steps += 1
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    if cfg["algorithm"] == "periodic":
        algorithm: Any = PeriodicAveraging(cfg["sync_every"])
    else:
        algorithm = DiLoCo(cfg["sync_every"], outer_lr=0.7, outer_momentum=0.5)
    gate = RestartGate(cfg["dir"], 3, cfg["gate_at"] if cfg["fault"] else None, restarting=2)
    callbacks = [algorithm, Pace(cfg["pace"]), gate]
    if cfg["fault"] and group == 2 and incarnation == 0:
        callbacks.append(KillSelf(cfg["die_at"], Path(cfg["dir"]) / "killed_at"))
    ft = TorchFT(min_replicas=2, timeout=30, quorum_timeout=300)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=LocalSGDStrategy(fault_tolerance=ft),
        max_steps=cfg["steps"],
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    x, y = blobs(cfg["seed"], 1024, group)
    model = MLP()
    loader = DataLoader(
        TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(group)
    )
    trainer.fit(model, loader)
    vx, vy = blobs(cfg["seed"], 2000, 99)
    with torch.no_grad():
        logits = model.net(vx)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    out = {
        "group": group,
        "incarnation": incarnation,
        "steps": model.steps,
        "global_step": trainer.global_step,
        "val_acc": float((logits.argmax(1) == vy).float().mean()),
        "val_loss": float(nn.functional.cross_entropy(logits, vy)),
        "params_hash": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
        "history": trainer.strategy.ft_session.records(),
        "harness_pause_s": gate.paused,
        "announced_at": gate.announced_at,
    }
    Path(cfg["out"]).write_text(json.dumps(out))


# ====================================================================== one run, the driver
def run(cfg: dict[str, Any], log_root: Path) -> dict[str, Any]:
    from recipes.ft_launch import run_replica_groups

    tmp = Path(tempfile.mkdtemp(dir=log_root))
    base = {**cfg, "dir": str(tmp)}

    def cmd_for(group: int, incarnation: int) -> list[str]:
        path = tmp / f"cfg{group}.{incarnation}.json"
        path.write_text(json.dumps({**base, "out": str(tmp / f"result{group}.{incarnation}.json")}))
        return [sys.executable, "-m", "benchmarks.ft", "--worker", str(path)]

    load, start = os.getloadavg(), time.time()
    runs = run_replica_groups(
        cmd_for,
        3,
        log_dir=tmp,
        timeout=cfg["run_timeout"],
        restarts={2: 1} if cfg["fault"] else {},
        min_replicas=2,
        heartbeat_timeout_ms=cfg["heartbeat_ms"],
        cwd=ROOT,
        pythonpath=ROOT,
    )
    groups = {}
    for incs in runs:
        for inc in incs:
            path = tmp / f"result{inc.group}.{inc.index}.json"
            entry = {"started": inc.started, "ended": inc.ended, "returncode": inc.returncode}
            if path.exists():
                entry.update(json.loads(path.read_text()))
            groups[f"{inc.group}.{inc.index}"] = entry
    killed = tmp / "killed_at"
    out = {
        "config": cfg,
        "loadavg_before": load,
        "wall_s": time.time() - start,
        "groups": groups,
        "killed_at": float(killed.read_text()) if killed.exists() else None,
    }
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def fault_metrics(r: dict[str, Any]) -> dict[str, Any]:
    """Detection, steps lost, time back in the quorum for one fault run."""
    survivors, joiner, steps = [r["groups"]["0.0"], r["groups"]["1.0"]], r["groups"]["2.1"], r["config"]["steps"]
    detect, extra = [], []
    for s in survivors:
        syncs = [h for h in s["history"] if h["kind"] == "sync" and h["committed"]]
        first = next(h for h in syncs if h["participants"] == 2)
        formed = first["wall_time"] - first["seconds"] + first["quorum_seconds"]
        detect.append(formed - r["killed_at"])
        usual = statistics.median(h["quorum_seconds"] for h in syncs if h is not first)
        extra.append(first["quorum_seconds"] - usual)
    back = next(h for h in joiner["history"] if h["committed"])
    return {
        "kill_to_quorum_without_it_s": statistics.mean(detect),
        "survivors_extra_wait_s": statistics.mean(extra),
        "survivor_steps_lost": [steps - s["steps"] for s in survivors],
        "survivor_failed_attempts": [sum(not h["committed"] for h in s["history"]) for s in survivors],
        "restart_to_back_in_quorum_s": back["wall_time"] - joiner["started"],
        "restart_startup_s": joiner["announced_at"] - joiner["started"],
        "join_s": back["wall_time"] - joiner["announced_at"],
        "join_step": back["step"],
        "steps_missed_by_group2": back["step"] - r["config"]["die_at"],
        "survivor_harness_pause_s": statistics.mean(s["harness_pause_s"] for s in survivors),
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    runs, summary = result["runs"], {}
    for algorithm in result["algorithms"]:
        rows = []
        for seed in result["seeds"]:
            pick = {
                c: next(
                    r
                    for r in runs
                    if r["config"]["algorithm"] == algorithm
                    and r["config"]["seed"] == seed
                    and r["config"]["fault"] == c
                )
                for c in (True, False)
            }
            finals = {c: [g for g in pick[c]["groups"].values() if "val_acc" in g] for c in pick}
            equal = all(len({g["params_hash"] for g in finals[c]}) == 1 for c in finals)
            rows.append(
                {
                    "seed": seed,
                    "equal_final_models": equal,
                    **fault_metrics(pick[True]),
                    **{
                        f"val_{m}_{'fault' if c else 'no_fault'}": finals[c][0][f"val_{m}"]
                        for c in (True, False)
                        for m in ("acc", "loss")
                    },
                }
            )
        no_fault = [r["val_acc_no_fault"] for r in rows]
        diffs = [r["val_acc_fault"] - r["val_acc_no_fault"] for r in rows]
        summary[algorithm] = {
            "rows": rows,
            "mean_acc_diff": statistics.mean(diffs),
            "seed_sd_acc_no_fault": statistics.stdev(no_fault) if len(no_fault) > 1 else None,
            "steps_lost_total": sum(sum(r["survivor_steps_lost"]) for r in rows),
            "failed_attempts_total": sum(sum(r["survivor_failed_attempts"]) for r in rows),
        }
    return summary


def table(summary: dict[str, Any]) -> str:
    head = (
        "| algorithm | seed | kill → quorum without it (s) | survivors' extra wait (s) | steps lost | "
        "restart → back in quorum (s) (start-up + join) | group 2 missed steps | val acc fault / no fault |"
    )
    lines = [head, "|" + "---|" * 8]
    for algorithm, s in summary.items():
        for r in s["rows"]:
            lines.append(
                f"| {algorithm} | {r['seed']} | {r['kill_to_quorum_without_it_s']:.2f} "
                f"| {r['survivors_extra_wait_s']:.2f} "
                f"| {sum(r['survivor_steps_lost'])} | {r['restart_to_back_in_quorum_s']:.1f} "
                f"({r['restart_startup_s']:.1f} + "
                f"{r['join_s']:.1f}) | {r['steps_missed_by_group2']} "
                f"| {r['val_acc_fault']:.4f} / {r['val_acc_no_fault']:.4f} |"
            )
    return "\n".join(lines)


def plot(result: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    run = next(r for r in result["runs"] if r["config"]["fault"])
    cfg = run["config"]
    for key, label, style in (("0.0", "group 0 (group 1: the same)", "-o"), ("2.1", "group 2 (restarted)", "^")):
        hist = run["groups"][key].get("history", [])
        pts = [(h["step"], h["participants"]) for h in hist if h["committed"] and h["kind"] == "sync"]
        if pts:
            ax1.plot(*zip(*pts), style, label=label, markersize=4)
    ax1.axvline(cfg["die_at"], color="red", ls="--", lw=1, label=f"group 2 killed (after step {cfg['die_at']})")
    ax1.set(
        xlabel="optimizer step of the sync",
        ylabel="replica groups in the quorum",
        yticks=[1, 2, 3],
        ylim=(0.5, 3.5),
        title=f"{cfg['algorithm']}, seed {cfg['seed']}: quorum at every committed sync",
    )
    ax1.legend(fontsize=7, loc="lower right")
    for i, s in enumerate(summary.values()):
        for j, r in enumerate(s["rows"]):
            x = i + (j - (len(s["rows"]) - 1) / 2) * 0.15  # one pair per seed
            ax2.plot([x, x], [r["val_acc_no_fault"], r["val_acc_fault"]], "k-", lw=0.8)
            ax2.plot(x, r["val_acc_no_fault"], "o", color="tab:blue", label="no fault" if i == j == 0 else None)
            ax2.plot(
                x,
                r["val_acc_fault"],
                "x",
                color="tab:red",
                label="group 2 killed and restarted" if i == j == 0 else None,
            )
    ax2.set_xticks(range(len(summary)), list(summary))
    ax2.set_xlim(-0.5, len(summary) - 0.5)
    ax2.set(ylabel="final validation accuracy", title="final model, per seed")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(result: dict[str, Any], out_dir: Path, docs: bool) -> None:
    summary = summarize(result)
    result["summary"] = summary
    (out_dir / "ft.json").write_text(json.dumps(result, indent=1))
    plot(result, summary, out_dir / "ft.png")
    print(table(summary))
    for algorithm, s in summary.items():
        print(
            f"{algorithm}: steps lost {s['steps_lost_total']}, repeated attempts {s['failed_attempts_total']}, "
            f"mean acc diff {s['mean_acc_diff']:+.4f}, seed sd (no fault) {s['seed_sd_acc_no_fault']}"
        )
    if docs:
        shutil.copy(out_dir / "ft.png", DOCS / "img" / "fault_tolerance.png")
        shutil.copy(out_dir / "ft.json", DOCS / "fault_tolerance.json")


def merge(paths: list[str], seeds: list[int], algorithms: list[str]) -> dict[str, Any]:
    """The runs of several invocations as one result (each (seed, algorithm, fault) taken once, first file first)."""
    parts = [json.loads(Path(path).read_text()) for path in paths]
    runs: dict[tuple, dict[str, Any]] = {}
    for path, part in zip(paths, parts):
        for r in part["runs"]:
            c = r["config"]
            r["source"] = str(path)
            runs.setdefault((c["seed"], c["algorithm"], c["fault"]), r)
    want = [(s, a, f) for s in seeds for a in algorithms for f in (True, False)]
    missing = [k for k in want if k not in runs]
    if missing:
        raise SystemExit(f"--merge: no run for (seed, algorithm, fault) {missing}; run them with --seeds/--algorithms")
    return {
        **{k: v for k, v in parts[0].items() if k != "runs"},
        "seeds": seeds,
        "algorithms": algorithms,
        "merged_from": [str(p) for p in paths],
        "runs": [runs[k] for k in want],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--algorithms", default="periodic,diloco")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--sync-every", type=int, default=10)
    p.add_argument("--die-at", type=int, default=59)
    p.add_argument("--gate-at", type=int, default=100)
    p.add_argument("--pace", type=float, default=0.02)
    p.add_argument("--heartbeat-ms", type=int, default=1000)
    p.add_argument("--run-timeout", type=float, default=900)
    p.add_argument("--name", default="ft")
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="pool the runs of these ft.json / ft.partial.json files (same config) into <name>/ft.json and report",
    )
    p.add_argument("--docs", action="store_true")
    args = p.parse_args(argv)
    if args.worker:
        run_group(json.loads(Path(args.worker).read_text()))
        return 0
    out_dir = RESULTS / args.name
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        report(json.loads((out_dir / "ft.json").read_text()), out_dir, args.docs)
        return 0
    seeds, algorithms = [int(s) for s in args.seeds.split(",")], args.algorithms.split(",")
    if args.merge:
        report(merge(args.merge, seeds, algorithms), out_dir, args.docs)
        return 0
    import torch

    result: dict[str, Any] = {
        "seeds": seeds,
        "algorithms": algorithms,
        "runs": [],
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
    }
    for seed in seeds:
        for algorithm in algorithms:
            for fault in (True, False) if seed % 2 == 0 else (False, True):  # alternate the order
                cfg = {
                    "seed": seed,
                    "algorithm": algorithm,
                    "fault": fault,
                    "steps": args.steps,
                    "sync_every": args.sync_every,
                    "die_at": args.die_at,
                    "gate_at": args.gate_at,
                    "pace": args.pace,
                    "heartbeat_ms": args.heartbeat_ms,
                    "run_timeout": args.run_timeout,
                }
                r = run(cfg, out_dir)
                print(
                    f"seed {seed} {algorithm} fault={fault}: {r['wall_s']:.0f} s, load {r['loadavg_before'][0]:.1f}",
                    flush=True,
                )
                result["runs"].append(r)
                (out_dir / "ft.partial.json").write_text(json.dumps(result))
    report(result, out_dir, args.docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
