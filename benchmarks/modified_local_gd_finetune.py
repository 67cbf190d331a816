"""Modified Local-GD vs plain Local-GD with many local steps under label skew (the seed 000 paper on the timm recipe).

Zhu, Vardhan, Mazumdar, "Distributed Gradient Descent with Many Local Steps in Overparameterized
Models" (arXiv 2412.07971) propose Modified Local-GD (proximal local problems, corrected
aggregation) for fine-tuning pretrained networks when the workers' data differ. Here the whole
network is fine-tuned (not only the last layer, see ``benchmarks/local_gd_implicit_bias.py`` part c):

* ``resnet18`` pretrained on MNIST-5k by ``recipes.demo`` stage 1 (cached; pretrained here if missing),
  fine-tuned on scikit-learn's digits (32×32) with ``recipes/image_classification.py`` on 2 CPU
  processes: ``python -m recipes.cli fit --config configs/image_classification/base.yaml --config
  <overlay>`` with the recipe's SGD (lr 0.025, momentum 0.9, cosine), batch 8 per rank;
* label skew: ``partition: classes``, 5 classes per rank (rank 0 digits 0–4, rank 1 digits 5–9);
* H local steps per round (``--H``, default 64: about 0.7 passes over a rank's 719 images), the
  model validated on all 359 held-out digits after every round;
* variants: ``localgd`` = ``PeriodicAveraging(H)``, ``modified`` = ``ModifiedLocalGD(H, prox=λ)``,
  ``ddp`` (the same number of optimizer steps, validated every H steps) as the centralized reference.

    python -m benchmarks.modified_local_gd_finetune --seeds 0 1 2 --docs     # ~15 min on 2 cores
    python -m benchmarks.modified_local_gd_finetune --variants modified --prox 0.01 0.1 1.0 --seeds 100 \\
        --name modified_local_gd_prox_pilot
    python -m benchmarks.modified_local_gd_finetune --replot --docs

Writes ``benchmarks/results/<name>/modified_local_gd_finetune.json`` and ``.png``; ``--docs`` copies both
to ``docs/results/`` (the plot to ``docs/results/img/``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import RESULTS, ROOT, environment, recipe_env

CONFIGS = ROOT / "configs" / "image_classification"
DOCS = ROOT / "docs" / "results"
NAME = "modified_local_gd_finetune"
OVERLAYS = {"localgd": "localsgd", "modified": "modified_localgd", "ddp": "ddp"}


def overlay(variant: str, H: int, prox: float | None, out: Path) -> Path:
    """The variant's overlay with ``sync_every = H`` (and ``prox``) written to ``out``."""
    cfg = yaml.safe_load((CONFIGS / f"{OVERLAYS[variant]}.yaml").read_text())
    for cb in cfg.get("trainer", {}).get("callbacks+", []):
        args = cb.setdefault("init_args", {})
        args["sync_every"] = H
        if prox is not None and "prox" in args:
            args["prox"] = prox
    path = out / f"{variant}_{H}_{prox}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(
    variant: str, seed: int, prox: float | None, args: argparse.Namespace, weights: Path, out: Path
) -> dict[str, Any]:
    label = f"{variant}" + (f"_prox{prox:g}" if variant == "modified" else "") + f"_seed{seed}"
    journal = out / f"{label}.json"
    journal.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "recipes.cli",
        "fit",
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(overlay(variant, args.H, prox, out)),
        f"--seed_everything={seed}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.num_nodes=1",
        f"--trainer.max_steps={args.H * args.rounds}",
        f"--trainer.val_check_interval={args.H}",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out / 'runs' / label}",
        f"--model.pretrained_file={weights}",
        f"--model.lr={args.lr}",
        "--data.partition=classes",
        "--data.classes_per_rank=5",
        "--trainer.callbacks+=recipes.journal.RunJournal",
        f"--trainer.callbacks.path={journal}",
        f"--trainer.callbacks.label={label}",
    ]
    load = os.getloadavg()
    start = time.perf_counter()
    subprocess.run(cmd, env=recipe_env(), cwd=ROOT, check=True, timeout=args.timeout, stdout=subprocess.DEVNULL)
    doc = json.loads(journal.read_text())
    acc = [r["value"] for r in doc["records"]]
    print(
        f"{label:<26} accuracy per round {' '.join(f'{a:.3f}' for a in acc)} ({time.perf_counter() - start:.0f} s, "
        f"load {load[0]:.1f})",
        flush=True,
    )
    return {
        "variant": variant,
        "prox": prox,
        "seed": seed,
        "label": label,
        "accuracy": acc,
        "records": doc["records"],
        "loadavg_before": load,
        "seconds": time.perf_counter() - start,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r["label"].rsplit("_seed", 1)[0], []).append(r)
    out: dict[str, Any] = {}
    for name, rs in groups.items():
        rounds = min(len(r["accuracy"]) for r in rs)
        per_round = [[r["accuracy"][k] for r in rs] for k in range(rounds)]
        out[name] = {
            "seeds": [r["seed"] for r in rs],
            "mean": [statistics.fmean(v) for v in per_round],
            "min": [min(v) for v in per_round],
            "max": [max(v) for v in per_round],
            "final_each": [r["accuracy"][rounds - 1] for r in rs],
            "mean_over_rounds_each": [statistics.fmean(r["accuracy"][:rounds]) for r in rs],
        }
    return out


def verdict(summary: dict[str, Any], modified: str) -> dict[str, Any] | None:
    """Fixed before the run: Modified Local-GD's accuracy averaged over the rounds is above Local-GD's
    in every seed (paired by seed), and its final accuracy is higher on average."""
    if "localgd" not in summary or modified not in summary:
        return None
    a, b = summary[modified], summary["localgd"]
    paired = [x - y for x, y in zip(a["mean_over_rounds_each"], b["mean_over_rounds_each"])]
    final = statistics.fmean(a["final_each"]) - statistics.fmean(b["final_each"])
    return {
        "mean_over_rounds_gap_each": paired,
        "final_gap_mean": final,
        "held": all(p > 0 for p in paired) and final > 0,
    }


def plot(summary: dict[str, Any], H: int, path: Path, dpi: int = 100) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, s) in enumerate(summary.items()):
        xs = list(range(1, len(s["mean"]) + 1))
        ax.plot(
            xs, [100 * v for v in s["mean"]], marker="o", ms=3, color=f"C{i}", label=f"{name} ({len(s['seeds'])} seeds)"
        )
        ax.fill_between(xs, [100 * v for v in s["min"]], [100 * v for v in s["max"]], color=f"C{i}", alpha=0.2, lw=0)
    ax.set_xlabel(f"round ({H} local steps each; DDP: every {H} steps)")
    ax.set_ylabel("validation accuracy, all 10 digits (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("resnet18 (MNIST-pretrained) fine-tuned on digits, 2 ranks with 5 classes each", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    ap.add_argument("--name", default=NAME)
    ap.add_argument("--variants", default="localgd,modified,ddp")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--H", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--prox", type=float, nargs="+", default=[0.1], help="λ of ModifiedLocalGD (one run per value)")
    ap.add_argument("--lr", type=float, default=0.025)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--docs", action="store_true")
    ap.add_argument("--replot", action="store_true")
    args = ap.parse_args(argv)
    out = RESULTS / args.name
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{NAME}.json"
    if args.replot:
        doc = json.loads(path.read_text())
    else:
        from recipes.demo import pretrain, pretrained_path

        demo_args = argparse.Namespace(
            model="resnet18",
            image_size=32,
            pretrain_epochs=3,
            results_dir=out,
            cache_dir=Path(os.environ.get("LIGHTNING_LOCALSGD_CACHE", "~/.cache/lightning-localsgd")).expanduser(),
        )
        weights = pretrained_path(demo_args)
        if not weights.is_file():
            pretrain(demo_args, weights)
        runs, started = [], time.perf_counter()
        for seed in args.seeds:  # interleaved: every variant of a seed before the next seed
            for v in args.variants.split(","):
                for prox in args.prox if v == "modified" else [None]:
                    runs.append(run(v, seed, prox, args, weights, out))
        doc = {
            "settings": dict(vars(args)),
            "weights": str(weights),
            "runs": runs,
            "seconds": time.perf_counter() - started,
            "environment": environment(),
            "command": f"python -m benchmarks.{NAME} " + " ".join(sys.argv[1:] if argv is None else argv),
        }
    summary = summarize(doc["runs"])
    modified = next((k for k in summary if k.startswith("modified")), "modified")
    doc.update(summary=summary, verdict=verdict(summary, modified))
    path.write_text(json.dumps(doc, indent=1))
    plot(summary, doc["settings"]["H"], out / f"{NAME}.png")
    for name, s in summary.items():
        print(
            f"{name:<18} final {statistics.fmean(s['final_each']):.4f} {s['final_each']}  mean over rounds "
            f"{statistics.fmean(s['mean_over_rounds_each']):.4f}"
        )
    print("verdict:", doc["verdict"])
    if args.docs:
        plot(summary, doc["settings"]["H"], DOCS / "img" / f"{NAME}.png", dpi=80)
        (DOCS / f"{NAME}.json").write_text(json.dumps(doc))
    return doc


if __name__ == "__main__":
    main()
