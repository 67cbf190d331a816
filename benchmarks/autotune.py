"""The auto-tuner against a grid of fixed settings, side by side on one shaped link (issue 24's targets).

One run of :mod:`benchmarks.step_time` (2 CPU ranks, resnet18 32×32, batch 32/rank, SGD momentum 0.9)
holds, interleaved in one list:

* ``floor`` (no communication in the measured window);
* ``localsgd_auto``: ``PeriodicAveraging(sync_every="auto", overlap_steps="auto", fragments="auto")``
  with ``LocalSGDStrategy(comm_dtype="auto")`` and the default :class:`~lightning_localsgd.AutoTune`
  (3 % overhead target, H in [8, 256]);
* the grid ``{fp32, bf16, int8, int4} × τ ∈ {0, H−1} × H ∈ --grid-h`` (``localsgd_H{H}[_tau{H-1}][_fmt]``).

Every variant measures ``--steps`` steps after ``--warmup`` unmeasured ones (the warm-up covers the
tuner's measuring steps, so the auto variant is measured on its choice). Reported, slowest rank:

* each variant's step time over the floor's, the best grid setting, and the auto run's step time
  over the best's (target ≤ 1.03);
* the tuner's choice and its measurements (from the auto run's checkpointable record);
* the tuner's own cost: its measuring steps' time beyond the floor's (probes, the loaded transfer and
  the blocking collectives included), as a share of a 300-step run at the floor's pace (target ≤ 2 %;
  on two nodes beyond ``node_ddp``'s, the DDP inside each node that every step of the run pays):
  against the floor's median step, against the floor's own steps at the same positions of its
  launch (like for like: a launch's first steps run slow whatever the variant), and as the least
  over the ranks of each rank's window beyond its own median step (the rank that never waited for
  the other at the tuner's collectives: the skew a fixed setting pays at its first sync left out).

Run (root, iproute2; about 1 minute per variant)::

    python -m benchmarks.autotune --link 1gbit
    python -m benchmarks.autotune --link 100mbit --grid-h 32,128
    python -m benchmarks.autotune --link 1gbit --steps 8 --warmup 16 --grid-h 8 --name smoke   # a quick check

Writes ``benchmarks/results/autotune_<link>/step_time.json`` (step_time's) and ``autotune.json``
beside it, and prints a table. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks import step_time
from benchmarks.common import RESULTS
from lightning_localsgd import AutoTune

FORMATS = {"fp32": "", "bf16": "_bf16", "int8": "_int8", "int4": "_int4"}
RUN_STEPS = 300  # the run length the tuner's cost is stated for


def grid(hs: list[int], formats: list[str]) -> list[str]:
    names = []
    for h in hs:
        for fmt in formats:
            for tau in (0, h - 1):
                names.append(f"localsgd_H{h}{f'_tau{tau}' if tau else ''}{FORMATS[fmt]}")
    return names


def window_seconds(result: dict[str, Any], variant: str, window: slice) -> float:
    """The slowest rank's time over the steps ``window`` of a launch of ``variant``, mean over its repeats."""
    runs = [run for run in result["runs"][variant] if run["ranks"]]
    return statistics.fmean(max(sum(r["step_times_all"][window]) for r in run["ranks"]) for run in runs)


def own_overhead(runs: list[dict[str, Any]]) -> float:
    """Mean over repeats of the slowest rank's mean step over its median step."""
    ratios = [
        max(statistics.fmean(r["step_times"]) / statistics.median(r["step_times"]) for r in run["ranks"])
        for run in runs
        if run["ranks"]
    ]
    return statistics.fmean(ratios) if ratios else float("nan")


def analyse(result: dict[str, Any], measure_steps: int, settle_steps: int = 0) -> dict[str, Any]:
    """The comparison of the auto run with the grid, from step_time's result."""
    summary = result["summary"]
    floor = summary["floor"]["slowest_rank_step_time_s"]
    rows = {
        name: s["slowest_rank_step_time_s"] / floor
        for name, s in summary.items()
        if name != "floor" and "slowest_rank_step_time_s" in s
    }
    floors = ("node_ddp",)  # measured beside the floor on two nodes: not a setting of the grid
    grid_rows = {n: v for n, v in rows.items() if not n.endswith("_auto") and n not in floors}
    best = min(grid_rows, key=grid_rows.get) if grid_rows else None
    # Drift-corrected: each run's mean step over its own median step (the median step is a local step in runs
    # that sync rarely), so a launch whose local steps ran faster or slower does not count. Under-counts a setting
    # that has a sync in flight at most steps (its median is slowed too).
    own = {name: own_overhead(result["runs"][name]) for name in rows}
    own_grid = {n: v for n, v in own.items() if n in grid_rows}
    own_best = min(own_grid, key=own_grid.get) if own_grid else None
    out: dict[str, Any] = {
        "floor_step_s": floor,
        "x_floor": rows,
        "best_grid": best,
        "best_grid_x_floor": grid_rows.get(best) if best else None,
        "x_own_median": own,
        "best_grid_own_median": own_best,
    }
    # the tuner's measuring steps (after the settle steps) are counted beyond the pace every step of the run pays
    # anyway: the floor's on one node; on two nodes node_ddp's, since the DDP inside each node runs at every step of
    # a replica-group run, the tuner's measuring steps included (against the floor it would count as the tuner's)
    pace = "node_ddp" if "node_ddp" in summary else "floor"
    pace_median, pace_step = summary[pace]["step_time_median_s"], summary[pace]["slowest_rank_step_time_s"]
    window = slice(settle_steps, settle_steps + measure_steps)
    pace_spent = window_seconds(result, pace, window)
    for name in [n for n in rows if n.endswith("_auto")]:
        ranks = [rank for run in result["runs"][name] if run["ranks"] for rank in run["ranks"]]
        record = next((r["tuning"] for r in ranks if r.get("tuning")), None)
        spent = max(sum(r["step_times_all"][window]) for r in ranks)
        cost = spent - measure_steps * pace_median
        # like for like: the pace's own steps at the same positions of its launch (the first steps of a launch run
        # slow whatever the variant)
        auto_spent = window_seconds(result, name, window)
        # the tuner's own work: each rank's window beyond its own median step in this launch, the least over the
        # ranks (the rank that never waited: a faster rank waits at the tuner's first collective for the skew
        # the unmeasured steps built up, which a fixed setting pays at its first sync instead)
        own_work = statistics.fmean(
            min(
                sum(r["step_times_all"][window]) - measure_steps * statistics.median(r["step_times"])
                for r in run["ranks"]
            )
            for run in result["runs"][name]
            if run["ranks"]
        )
        out[name] = {
            "x_floor": rows[name],
            "x_best_grid": rows[name] / grid_rows[best] if best else None,
            "x_best_grid_own_median": own[name] / own_grid[own_best] if own_best else None,
            "decision": None if record is None else record["decision"],
            "measurements": None if record is None else record["measurements"],
            "history": None if record is None else record["history"],
            "measuring_pace": pace,
            "measuring_seconds": spent,
            "measuring_cost_seconds": cost,
            "measuring_cost_of_300_steps": cost / (RUN_STEPS * pace_step),
            "measuring_cost_vs_floor_steps_seconds": auto_spent - pace_spent,
            "measuring_cost_vs_floor_steps_of_300_steps": (auto_spent - pace_spent) / (RUN_STEPS * pace_step),
            "measuring_own_work_seconds": own_work,
            "measuring_own_work_of_300_steps": own_work / (RUN_STEPS * pace_step),
        }
    return out


def table(analysis: dict[str, Any]) -> str:
    lines = [f"{'variant':<26} {'x floor':>8}", "-" * 35]
    for name, ratio in sorted(analysis["x_floor"].items(), key=lambda kv: kv[1]):
        mark = " <- best grid" if name == analysis["best_grid"] else ""
        lines.append(f"{name:<26} {ratio:>8.3f}{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--link", required=True, help="shaped loopback rate, e.g. 1gbit, 100mbit, 10mbit")
    p.add_argument("--grid-h", default="8,32,128", help="H values of the grid")
    p.add_argument("--variants", default=None, help="instead of the grid: these variants (floor and auto added)")
    p.add_argument("--formats", default="fp32,bf16,int8,int4", help="wire formats of the grid")
    p.add_argument("--steps", type=int, default=256, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=32, help="unmeasured steps (>= 10 settle + 20 measuring)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--name", default=None, help="results folder (default autotune_<link>)")
    p.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="2: two simulated nodes of 2 ranks (replica groups: DDP inside a node, the tuned sync across; the "
        "grid's names get the groups_ prefix, node_ddp is measured beside the floor)",
    )
    p.add_argument("--report-only", action="store_true", help="re-analyse the saved step_time.json")
    args = p.parse_args(argv)
    name = args.name or f"autotune_{args.link}" + ("_2nodes" if args.nodes == 2 else "")
    hs = [int(h) for h in args.grid_h.split(",") if h.strip()]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    chosen = [v for v in (args.variants or "").split(",") if v.strip()] or grid(hs, formats)
    prefix = "groups_" if args.nodes == 2 else ""
    fixed = [v if v.startswith(prefix) else prefix + v for v in chosen]
    variants = ["floor", *(["node_ddp"] if args.nodes == 2 else []), f"{prefix}localsgd_auto", *fixed]
    if not args.report_only:
        code = step_time.main(
            [
                "--link",
                args.link,
                "--variants",
                ",".join(variants),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--repeats",
                str(args.repeats),
                "--name",
                name,
                "--timeout",
                str(1800),
                *(["--nodes", "2"] if args.nodes == 2 else []),
            ]
        )
        if code:
            return code
    folder: Path = RESULTS / name
    result = json.loads((folder / "step_time.json").read_text())
    defaults = AutoTune()
    analysis = analyse(result, measure_steps=defaults.measure_steps, settle_steps=defaults.settle_steps)
    analysis["command"] = "python -m benchmarks.autotune " + " ".join(sys.argv[1:] if argv is None else argv)
    analysis["link"] = args.link
    (folder / "autotune.json").write_text(json.dumps(analysis, indent=1))
    print(table(analysis))
    auto_name = f"{prefix}localsgd_auto"
    auto = analysis.get(auto_name)
    if auto:
        print(
            f"\nauto: {auto['x_floor']:.3f}x floor, {auto['x_best_grid']:.3f}x the best grid setting "
            f"({analysis['best_grid']}, {analysis['best_grid_x_floor']:.3f}x); target <= 1.03"
        )
        own, own_best = analysis["x_own_median"], analysis["best_grid_own_median"]
        print(
            f"drift-corrected (each run's mean over its own median step): auto {own[auto_name]:.3f}, "
            f"best grid {own_best} {own[own_best]:.3f}: {auto['x_best_grid_own_median']:.3f}x"
        )
        print(f"decision: {auto['decision']}")
        print(
            f"measuring: {auto['measuring_cost_seconds']:.2f} s beyond {auto['measuring_pace']}'s pace = "
            f"{100 * auto['measuring_cost_of_300_steps']:.2f}% of a {RUN_STEPS}-step run; target <= 2%; against "
            f"{auto['measuring_pace']}'s own steps at the same positions: "
            f"{auto['measuring_cost_vs_floor_steps_seconds']:.2f} s = "
            f"{100 * auto['measuring_cost_vs_floor_steps_of_300_steps']:.2f}%; the rank that waited least, beyond its "
            f"own median step: {auto['measuring_own_work_seconds']:.2f} s = "
            f"{100 * auto['measuring_own_work_of_300_steps']:.2f}%"
        )
        if auto["history"]:
            print(f"{len(auto['history'])} re-tune checks: {auto['history']}")
    print(f"wrote {folder / 'autotune.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
