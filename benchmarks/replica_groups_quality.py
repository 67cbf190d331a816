"""Replica groups against per-process local SGD and DDP, at equal optimizer steps (the replica-group issue).

Four processes as 2 nodes × 2, the same data per step across the world, the same seeds:

* ``ddp``: one replica of all 4 processes (``within_node="ddp"`` on one node of 4, which is DDP
  step for step: tests/test_replica_groups.py);
* ``groups``: 2 replicas (``within_node="ddp"``, 2 nodes × 2), the algorithm across nodes;
* ``per_process``: 4 replicas (today's default), the algorithm across all 4.

Part **char_lm** (``recipes.char_lm_fabric``, AdamW inside): final validation loss on the consensus.
Targets: ``groups`` at least as good as ``per_process`` with the same H (mean over seeds), and
within 2% of ``ddp``. The demo's image fine-tune part is ``recipes.demo --nodes 2`` (docs/multinode.md).

Run::

    python -m benchmarks.replica_groups_quality                   # seeds 0,1,2, 300 steps
    python -m benchmarks.replica_groups_quality --seeds 0 --steps 60   # a quick check

Writes ``benchmarks/results/<name>/replica_groups_quality.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, ROOT, environment
from recipes.launch import run_local_ranks

VARIANTS: dict[str, dict[str, Any]] = {
    "ddp": {"nodes": 1, "within_node": "ddp"},
    "groups": {"nodes": 2, "within_node": "ddp"},
    "per_process": {"nodes": 2, "within_node": None},
}


def char_run(variant: str, algorithm: str, h: int, seed: int, steps: int, out: Path) -> dict[str, Any]:
    """One char-LM run of ``variant`` on 4 processes; the final validation loss on the consensus."""
    spec = VARIANTS[variant]
    path = out / f"char_{variant}_{algorithm}_H{h}_steps{steps}_{seed}.json"
    done = path.with_suffix(".result.json")
    if done.is_file():  # a finished run of an interrupted benchmark
        return json.loads(done.read_text())
    cmd = [
        sys.executable,
        "-m",
        "recipes.char_lm_fabric",
        "--devices",
        str(4 // spec["nodes"]),
        "--num-nodes",
        str(spec["nodes"]),
        "--algorithm",
        algorithm,
        "--sync-every",
        str(h),
        "--max-steps",
        str(steps),
        "--val-every",
        str(max(steps // 4, 1)),
        "--seed",
        str(seed),
        "--max-bytes",
        "1000000",
        "--json",
        str(path),
    ]
    if algorithm == "diloco":
        cmd += ["--outer-lr", "0.7", "--outer-momentum", "0.5"]
    if spec["within_node"]:
        cmd += ["--within-node", spec["within_node"]]
    logs = out / f"logs_{variant}_{algorithm}_{seed}"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run_local_ranks(cmd, world=4, nodes=spec["nodes"], log_dir=logs, timeout=3600, cwd=ROOT, pythonpath=ROOT)
    doc = json.loads(path.read_text())
    result = {
        "final_val_loss": doc["final_val_loss"],
        "curve": doc["curve"],
        "MB_sent": doc["MB_sent"],
        "seconds": time.perf_counter() - start,
    }
    done.write_text(json.dumps(result))
    return result


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out = {}
    for name, rs in runs.items():
        values = [r["final_val_loss"] for r in rs]
        out[name] = {
            "mean": statistics.mean(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values,
            "MB_sent_rank0": statistics.mean(r["MB_sent"] for r in rs),
        }
    return out


def verdicts(summary: dict[str, Any], algorithms: list[str], h: dict[str, int]) -> dict[str, Any]:
    out = {}
    ddp = summary["ddp"]["mean"]
    for algorithm in algorithms:
        groups = summary[f"groups_{algorithm}_H{h[algorithm]}"]["mean"]
        per_process = summary[f"per_process_{algorithm}_H{h[algorithm]}"]["mean"]
        out[algorithm] = {
            "groups_vs_per_process": groups - per_process,
            "groups_at_least_as_good": groups <= per_process,
            "groups_vs_ddp_relative": groups / ddp - 1,
            "groups_within_2pct_of_ddp": groups / ddp - 1 <= 0.02,
        }
    return out


def table(summary: dict[str, Any]) -> str:
    lines = ["| variant | final val loss (mean ± sd over seeds) | seeds | MB sent by rank 0 |", "|---|---|---|---|"]
    for name, s in summary.items():
        values = ", ".join(f"{v:.4f}" for v in s["values"])
        lines.append(f"| {name} | {s['mean']:.4f} ± {s['stdev']:.4f} | {values} | {s['MB_sent_rank0']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", default="replica_groups_quality")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--algorithms", default="periodic,diloco")
    p.add_argument("--h", type=int, default=16, help="sync period of both algorithms")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    algorithms = [a for a in args.algorithms.split(",") if a]
    h = dict.fromkeys(algorithms, args.h)
    out = RESULTS / args.name
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    work = out / "runs"  # each finished run is kept: a rerun after an interruption goes on where it stopped
    work.mkdir(exist_ok=True)
    for seed in seeds:  # interleaved: every variant of a seed before the next seed
        runs.setdefault("ddp", []).append(char_run("ddp", "periodic", 1, seed, args.steps, work))
        for algorithm in algorithms:
            for variant in ("groups", "per_process"):
                key = f"{variant}_{algorithm}_H{h[algorithm]}"
                runs.setdefault(key, []).append(char_run(variant, algorithm, h[algorithm], seed, args.steps, work))
        print(f"seed {seed} done", flush=True)
    summary = summarize(runs)
    doc = {
        "environment": environment(),
        "args": vars(args),
        "runs": runs,
        "summary": summary,
        "verdicts": verdicts(summary, algorithms, h),
    }
    (out / "replica_groups_quality.json").write_text(json.dumps(doc, indent=1))
    print(table(summary))
    print(json.dumps(doc["verdicts"], indent=1))
    return doc


if __name__ == "__main__":
    main()
