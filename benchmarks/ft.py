"""What a lost replica group costs under fault_tolerance=TorchFT(...) (issue 12 benchmark).

    python -m benchmarks.ft --docs                   # 3 seeds × {periodic, diloco} × {fault, no fault}
    python -m benchmarks.ft --seeds 0 --algorithms periodic --name smoke
    python -m benchmarks.ft --report-only --docs     # table, plot and page data again from the JSON
    python -m benchmarks.ft --merge a/ft.partial.json b/ft.json --docs   # pool the runs of several invocations
    python -m benchmarks.ft --matrix --name ft_matrix --docs   # the fault matrix rows: a group killed while
        # its overlapped sync is in flight, while it heals, while it writes a checkpoint; the Lighthouse down

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


FAULT_KINDS = ("after_step", "in_flight", "checkpoint", "heal", "lighthouse")
"""What happens in a fault run: group 2 SIGKILLed after step ``die_at`` (``after_step``); as the integers of
its overlapped sync of step ``die_at`` start to travel (``in_flight``, algorithm ``diloco_overlap``); in the
middle of writing the checkpoint of the first save at or after ``die_at`` (``checkpoint``: it restarts from
its newest complete one); after ``die_at`` and then again while it heals on its return (``heal``); or the
Lighthouse shut down when group 0 reaches ``die_at`` and started again on its address ``lighthouse_down_s``
later (``lighthouse``)."""


def fault_kind(cfg: dict[str, Any]) -> str | None:
    """The run's fault (``None``: no fault); the JSON of earlier versions says ``fault: true`` for ``after_step``."""
    fault = cfg.get("fault")
    return "after_step" if fault is True else (fault or None)


def newest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint completed in ``folder`` (a torn temporary file is hidden: ``.name.tmp-...``)."""
    done = [p for p in folder.glob("*.ckpt") if not p.name.startswith(".")]
    return max(done, key=lambda p: p.stat().st_mtime) if done else None


def run_group(cfg: dict[str, Any]) -> None:
    import torch
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_localsgd import AtomicCheckpointIO, DiLoCo, LocalSGDStrategy, PeriodicAveraging, TorchFT
    from recipes.ft_launch import (
        INCARNATION_ENV,
        KillInSync,
        KillSelf,
        KillWhileHealing,
        Pace,
        RestartGate,
        TornCheckpointIO,
        Touch,
    )

    group, incarnation = int(os.environ["REPLICA_GROUP_ID"]), int(os.environ[INCARNATION_ENV])
    kind = fault_kind(cfg)
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

    comm_dtype = None
    if cfg["algorithm"] == "periodic":
        algorithm: Any = PeriodicAveraging(cfg["sync_every"])
    elif cfg["algorithm"] == "diloco":
        algorithm = DiLoCo(cfg["sync_every"], outer_lr=0.7, outer_momentum=0.5)
    else:  # "diloco_overlap": 2 fragments, each overlapped over half a period, int8 on the wire
        overlap = cfg["sync_every"] // 2
        algorithm = DiLoCo(cfg["sync_every"], outer_lr=0.7, outer_momentum=0.5, fragments=2, overlap_steps=overlap)
        comm_dtype = "int8"
    restarting = kind in ("after_step", "in_flight", "checkpoint", "heal")
    second = (cfg["gate_at"] + 50, 2) if kind == "heal" else None  # the start after the one killed while healing
    gate = RestartGate(cfg["dir"], 3, cfg["gate_at"] if restarting else None, restarting=2, second=second)
    callbacks = [algorithm, Pace(cfg["pace"]), gate]
    record = Path(cfg["dir"]) / "killed_at"
    if group == 2 and incarnation == 0 and kind in ("after_step", "heal"):
        callbacks.append(KillSelf(cfg["die_at"], record))
    elif group == 2 and incarnation == 0 and kind == "in_flight":
        callbacks.append(KillInSync(cfg["die_at"], 3, record))  # as the integers of its sync start to travel
    elif group == 2 and incarnation == 1 and kind == "heal":
        callbacks.append(KillWhileHealing(Path(cfg["dir"]) / "killed_healing_at"))
    elif group == 0 and kind == "lighthouse":
        callbacks.append(Touch(cfg["die_at"], Path(cfg["dir"]) / "lighthouse_down"))
    checkpoint_io, resume = None, None
    if kind == "checkpoint":  # every group writes its own checkpoints; group 2 is killed in the middle of one
        folder = Path(cfg["dir"]) / f"ckpt{group}"
        callbacks.append(ModelCheckpoint(dirpath=folder, every_n_train_steps=cfg["ckpt_every"], save_top_k=-1))
        dying = group == 2 and incarnation == 0
        checkpoint_io = TornCheckpointIO(cfg["die_at"], record) if dying else AtomicCheckpointIO()
        resume = newest_checkpoint(folder) if incarnation > 0 else None
    ft = TorchFT(min_replicas=2, timeout=30, quorum_timeout=cfg.get("quorum_timeout", 300))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=LocalSGDStrategy(fault_tolerance=ft, comm_dtype=comm_dtype, checkpoint_io=checkpoint_io),
        max_steps=cfg["steps"],
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=kind == "checkpoint",
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
    trainer.fit(model, loader, ckpt_path=None if resume is None else str(resume))
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
        "resumed_from": None if resume is None else resume.name,
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

    kind = fault_kind(cfg)
    restarts = {2: 2} if kind == "heal" else ({2: 1} if kind in ("after_step", "in_flight", "checkpoint") else {})
    outage = None
    if kind == "lighthouse":
        outage = (tmp / "lighthouse_down", float(cfg["lighthouse_down_s"]), tmp / "outage.json")
    load, start = os.getloadavg(), time.time()
    failure = None
    try:
        runs = run_replica_groups(
            cmd_for,
            3,
            log_dir=tmp,
            timeout=cfg["run_timeout"],
            restarts=restarts,
            min_replicas=2,
            heartbeat_timeout_ms=cfg["heartbeat_ms"],
            cwd=ROOT,
            pythonpath=ROOT,
            lighthouse_outage=outage,
        )
    except RuntimeError as err:  # the run failed (a group without restarts left): reported as such
        failure, runs = str(err)[:4000], []
    groups = {}
    for incs in runs:
        for inc in incs:
            path = tmp / f"result{inc.group}.{inc.index}.json"
            entry = {"started": inc.started, "ended": inc.ended, "returncode": inc.returncode}
            if path.exists():
                entry.update(json.loads(path.read_text()))
            groups[f"{inc.group}.{inc.index}"] = entry
    killed, healing = tmp / "killed_at", tmp / "killed_healing_at"
    out = {
        "config": cfg,
        "loadavg_before": load,
        "wall_s": time.time() - start,
        "groups": groups,
        "killed_at": float(killed.read_text()) if killed.exists() else None,
        "killed_healing_at": float(healing.read_text()) if healing.exists() else None,
        "outage": json.loads((tmp / "outage.json").read_text()) if (tmp / "outage.json").exists() else None,
        "failure": failure,
    }
    if not os.environ.get("LOCALSGD_KEEP_FT_LOGS"):  # set it to keep each run's logs and files
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


# ====================================================================== the fault matrix rows (issue 23, part 7)
def matrix_row(fault: dict[str, Any], clean: dict[str, Any] | None) -> dict[str, Any]:
    """One fault run against the no-fault run of the same algorithm and seed."""
    cfg, groups = fault["config"], fault["groups"]
    kind, steps = fault_kind(cfg), cfg["steps"]
    survivors = [groups[k] for k in ("0.0", "1.0") if k in groups]
    if kind == "lighthouse" and "2.0" in groups:
        survivors.append(groups["2.0"])
    row: dict[str, Any] = {
        "seed": cfg["seed"],
        "algorithm": cfg["algorithm"],
        "fault": kind,
        "failure": fault["failure"],
    }
    if fault["failure"] is not None:  # the job stopped: say how, from the groups' own error
        text = fault["failure"]
        start = text.find("FaultToleranceError: ")
        reason = text[start + len("FaultToleranceError: ") :].split(". Check")[0] if start >= 0 else text[:200]
        row["failure"] = f"the job stopped after {fault['wall_s']:.0f} s: {reason}"
        return row
    if len(survivors) < 2:
        return row
    row["survivor_steps_lost"] = [steps - g["steps"] for g in survivors]
    row["survivor_failed_attempts"] = [sum(not h["committed"] for h in g["history"]) for g in survivors]
    row["longest_quorum_wait_s"] = max(h["quorum_seconds"] for g in survivors for h in g["history"])

    def detection(t: float | None) -> float | None:  # the kill at t → the first quorum formed without the group
        if t is None:
            return None
        formed = [
            h["wall_time"] - h["seconds"] + h["quorum_seconds"]
            for g in survivors
            for h in g["history"]
            if h["committed"] and h["kind"] == "sync" and h["participants"] == 2
        ]
        later = [f - t for f in formed if f > t]
        return min(later) if later else None

    row["detect_s"] = detection(fault["killed_at"])
    row["detect_heal_kill_s"] = detection(fault["killed_healing_at"])
    last = max((k for k in groups if k.startswith("2.")), default=None)
    if kind != "lighthouse" and last is not None and "history" in groups[last]:
        joiner = groups[last]
        back = next(h for h in joiner["history"] if h["committed"])
        row["group2_back_in_quorum_s"] = back["wall_time"] - joiner["started"]
        row["group2_join_step"] = back["step"]
        row["group2_resumed_from"] = joiner.get("resumed_from")
    if fault["outage"] is not None:
        row["lighthouse_down_s"] = fault["outage"]["up"] - fault["outage"]["down"]
    finals = [g for g in groups.values() if "val_acc" in g]
    row["equal_final_models"] = len({g["params_hash"] for g in finals}) == 1
    row["val_acc_fault"] = finals[0]["val_acc"]
    if clean is not None and clean["failure"] is None:
        row["val_acc_no_fault"] = next(g for g in clean["groups"].values() if "val_acc" in g)["val_acc"]
    return row


def matrix_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| algorithm | fault | seed | kill → quorum without it (s) | survivors' steps lost | survivors' failed "
        "attempts | group 2 back in the quorum (s) | equal final models | val acc fault / no fault |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if r.get("failure"):
            lines.append(f"| {r['algorithm']} | {r['fault']} | {r['seed']} | run failed: {r['failure'][:160]!r} |")
            continue
        detect = r.get("detect_s")
        if r.get("detect_heal_kill_s") is not None:
            detect = f"{detect:.2f}, heal kill {r['detect_heal_kill_s']:.2f}"
        elif r.get("lighthouse_down_s") is not None:
            detect = f"Lighthouse down {r['lighthouse_down_s']:.1f} s"
        elif detect is not None:
            detect = f"{detect:.2f}"
        back = r.get("group2_back_in_quorum_s")
        back = "—" if back is None else f"{back:.1f} (step {r['group2_join_step']})"
        if r.get("group2_resumed_from"):
            back += f", resumed {r['group2_resumed_from']}"
        clean = r.get("val_acc_no_fault")
        lines.append(
            f"| {r['algorithm']} | {r['fault']} | {r['seed']} | {detect} | {sum(r['survivor_steps_lost'])} "
            f"| {sum(r['survivor_failed_attempts'])} | {back} | {r['equal_final_models']} "
            f"| {r['val_acc_fault']:.4f} / {'—' if clean is None else f'{clean:.4f}'} |"
        )
    return "\n".join(lines)


def matrix(args: argparse.Namespace, out_dir: Path) -> int:
    """``--matrix``: the fault kinds of ``--scenarios`` (algorithm:fault, ...) and each algorithm's no-fault run."""
    path = out_dir / "ft_matrix.json"
    if args.report_only:
        result = json.loads(path.read_text())
    else:
        import torch

        seeds = [int(s) for s in args.seeds.split(",")]
        scenarios = [tuple(item.split(":")) for item in args.scenarios.split(",")]
        bad = [f for _, f in scenarios if f not in FAULT_KINDS]
        if bad:
            raise SystemExit(f"--scenarios: unknown fault {bad}; choose from {FAULT_KINDS}")
        result = {"runs": [], "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
        wanted = [(a, None) for a in dict.fromkeys(a for a, _ in scenarios)] + list(scenarios)
        for seed in seeds:
            for algorithm, fault in wanted:
                cfg = run_config(args, seed, algorithm, fault)
                if fault == "in_flight":  # a round start of fragment 0 (offset H/2): its sync is then in flight
                    cfg["die_at"] = args.die_at - args.die_at % args.sync_every + args.sync_every // 2
                r = run(cfg, out_dir)
                print(
                    f"seed {seed} {algorithm} {fault}: {r['wall_s']:.0f} s, failure={r['failure'] is not None}",
                    flush=True,
                )
                result["runs"].append(r)
                path.write_text(json.dumps(result))
    rows = []
    for r in result["runs"]:
        c = r["config"]
        if fault_kind(c) is None:
            continue
        clean = next(
            (
                x
                for x in result["runs"]
                if x["config"]["seed"] == c["seed"]
                and x["config"]["algorithm"] == c["algorithm"]
                and fault_kind(x["config"]) is None
            ),
            None,
        )
        rows.append(matrix_row(r, clean))
    result["rows"] = rows
    path.write_text(json.dumps(result, indent=1))
    print(matrix_table(rows))
    if args.docs:
        shutil.copy(path, DOCS / "fault_tolerance_matrix.json")
    return 0


def run_config(args: argparse.Namespace, seed: int, algorithm: str, fault: bool | str | None) -> dict[str, Any]:
    """One run's configuration from the command line."""
    return {
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
        "ckpt_every": args.ckpt_every,
        "lighthouse_down_s": args.lighthouse_down_s,
        "quorum_timeout": args.quorum_timeout,
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
    p.add_argument("--matrix", action="store_true", help="the fault matrix rows of --scenarios (issue 23, part 7)")
    p.add_argument(
        "--scenarios",
        default="diloco_overlap:in_flight,diloco:heal,diloco:checkpoint,diloco:lighthouse",
        help="algorithm:fault pairs for --matrix; faults: " + ", ".join(FAULT_KINDS),
    )
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--lighthouse-down-s", type=float, default=3.0)
    p.add_argument("--quorum-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    if args.worker:
        run_group(json.loads(Path(args.worker).read_text()))
        return 0
    out_dir = RESULTS / args.name
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.matrix:
        return matrix(args, out_dir)
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
                cfg = run_config(args, seed, algorithm, fault)
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
