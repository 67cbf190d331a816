"""DiLoCo's outer lr and momentum for short rounds: the ``make demo`` fine-tuning with several settings.

The demo (``recipes/demo.py``) fine-tunes with rounds of 8 inner SGD steps. DiLoCo's paper settings
(outer Nesterov lr 0.7, momentum 0.9) multiply the averaged round by about lr/(1−β) = 7 once the
momentum has built up; consecutive pseudo-gradients of 8-step rounds point the same way, so it does.
This runs the demo's DiLoCo fit (same command, same budget, same seed) for each ``lr/momentum``
pair and prints the final accuracy, the lowest accuracy on the way and the first step at DDP's
final − 0.5 points (``--target``, from the demo's DDP run).

    python -m benchmarks.diloco_short_rounds                       # 5 settings, ~6 min on 2 cores
    python -m benchmarks.diloco_short_rounds --settings 0.7/0.9 0.7/0.5 --target 0.9922

Writes ``benchmarks/results/<name>/diloco_short_rounds.json`` (and ``--docs``: a copy in docs/results/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

import recipes.demo as demo_module
from benchmarks.common import environment, time_held, time_to
from recipes.demo import CONFIGS, ROOT, finetune, parse_args, pretrain, pretrained_path

RESULTS = ROOT / "benchmarks" / "results"


def with_overlay(lr: float, momentum: float, out: Path) -> str:
    """A copy of ``diloco.yaml`` with this outer lr and momentum, registered as a demo overlay name."""
    cfg = yaml.safe_load((CONFIGS / "diloco.yaml").read_text())
    cfg["trainer"]["callbacks+"][0]["init_args"].update(outer_lr=lr, outer_momentum=momentum)
    name = f"diloco_lr{lr:g}_m{momentum:g}"
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return name


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.diloco_short_rounds", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--settings",
        nargs="+",
        default=["0.7/0.9", "0.7/0.5", "0.35/0.8", "0.2/0.9", "0.1/0.9"],
        help="outer lr/momentum pairs",
    )
    ap.add_argument(
        "--target", type=float, default=None, help="accuracy target (default: the demo's DDP final − 0.005)"
    )
    ap.add_argument("--name", default="diloco_short_rounds")
    ap.add_argument("--timeout", type=float, default=3000, help="seconds per fine-tuning run")
    ap.add_argument("--docs", action="store_true")
    args = ap.parse_args(argv)
    out = RESULTS / args.name
    demo = parse_args(["--results-dir", str(out), "--timeout", str(args.timeout)])
    weights = pretrained_path(demo)
    if not weights.is_file():
        pretrain(demo, weights)
    target = args.target
    if target is None:
        ddp = ROOT / "benchmarks" / "results" / "demo" / "ddp.json"
        target = json.loads(ddp.read_text())["records"][-1]["value"] - 0.005 if ddp.is_file() else 0.9922
    rows = {}
    for setting in args.settings:
        lr, momentum = (float(x) for x in setting.split("/"))
        name = with_overlay(lr, momentum, out)
        (out / "configs" / "base.yaml").write_text((CONFIGS / "base.yaml").read_text())
        with mock.patch.object(demo_module, "CONFIGS", out / "configs"):  # the demo reads <CONFIGS>/<name>.yaml
            doc = finetune(name, demo, weights)
        acc = [r["value"] for r in doc["records"]]
        hit, held = time_to(doc["records"], target, "step"), time_held(doc["records"], target, "step")
        rows[setting] = {
            "outer_lr": lr,
            "outer_momentum": momentum,
            "amplification": lr / (1 - momentum),
            "final_acc": acc[-1],
            "lowest_acc": min(acc),
            "first_step_at_target": hit,
            "held_from_step": held,
            "train_seconds": doc["final"]["train_seconds"],
            "loadavg_before": doc.get("loadavg_before"),
            "records": doc["records"],
        }
    print(f"\ntarget {100 * target:.2f}% (DDP's final − 0.5 points)")
    print(f"{'lr/momentum':<12}{'lr/(1-β)':>9}{'final':>8}{'lowest':>8}{'step at target':>16}{'held from':>11}")
    for s, r in rows.items():
        print(
            f"{s:<12}{r['amplification']:>9.1f}{100 * r['final_acc']:>7.2f}%{100 * r['lowest_acc']:>7.1f}%"
            f"{r['first_step_at_target'] or 'never'!s:>16}{r['held_from_step'] or '-'!s:>11}"
        )
    doc = {
        "target": target,
        "rows": rows,
        "environment": environment(),
        "command": "python -m benchmarks.diloco_short_rounds " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    (out / "diloco_short_rounds.json").write_text(json.dumps(doc, indent=1))
    if args.docs:
        (ROOT / "docs" / "results" / "diloco_short_rounds.json").write_text(json.dumps(doc))
    return doc


if __name__ == "__main__":
    main()
