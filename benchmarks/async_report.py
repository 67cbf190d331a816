"""Verdicts, table and plot of the asynchronous Local-SGD emulation (:mod:`benchmarks.async_emulation`).

The criteria below were fixed before the decision run (see docs/results/async.md) and are applied
to every seed's JSON in ``benchmarks/results/<name>/``::

    python -m benchmarks.async_report --name async_emulation --docs

``--docs`` copies the plot to ``docs/results/img/async_emulation.png`` and the raw runs plus the
summary to ``docs/results/async_emulation.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, ROOT, fmt_spec, time_to

DOCS = ROOT / "docs" / "results"
# time_to(curve, target, **LOSS): virtual time of the first evaluation at or below the target loss
LOSS = {"clock": "time", "value": "val_loss", "lower_is_better": True}

# ---- fixed before the decision run ----------------------------------------------------------------
PARITY_TOLERANCE = 0.02  # C1: DN+DyLU's mean paired gap to sync over the last half of the updates ≤ +2%
WORSE_MARGIN = 0.02  # C3: naive async Nesterov's mean paired gap > +2% ("needs more updates")
MIN_SPEEDUP = 1.5  # C2: DN+DyLU reaches sync's final loss ≥ 1.5x sooner (virtual wall-clock) in every seed


def loss_at(curve: list[dict[str, Any]], k: float) -> float | None:
    """Validation loss at update ``k`` (the curves are recorded at every whole update)."""
    for c in curve:
        if abs(c["updates"] - k) < 1e-9:
            return c["val_loss"]
    return None


def per_seed(runs: dict[str, Any], sync: str, updates: int) -> dict[str, Any]:
    ref = runs[sync]["curve"]
    half = range(updates // 2 + 1, updates + 1)
    final, t_final = loss_at(ref, updates), ref[-1]["time"]
    out = {}
    for spec, run in runs.items():
        c = run["curve"]
        gaps = [(loss_at(c, k) - loss_at(ref, k)) / loss_at(ref, k) for k in half if loss_at(c, k) is not None]
        t_hit = time_to(c, final, **LOSS)
        out[spec] = {
            "final_loss": loss_at(c, updates),
            "last_half_gap": statistics.fmean(gaps) if len(gaps) == len(half) else None,
            "time_to_sync_final": t_hit,
            "speedup": t_final / t_hit if t_hit else None,
            "virtual_seconds": c[-1]["time"],
            "inner_steps": c[-1]["inner_steps"],
            "staleness_mean": run.get("staleness_mean"),
            "pushes": run.get("pushes"),
            "final_local_steps": run.get("final_local_steps"),
        }
    return out


def longer_runs(docs: list[dict[str, Any]], long_docs: list[dict[str, Any]], sync: str) -> dict[str, Any]:
    """C2 on longer runs of the async variants (same seeds, same settings, more updates): the virtual
    time at which each reaches sync's loss at the decision run's last update."""
    updates = docs[0]["config"]["updates"]
    by_seed = {d["seed"]: d for d in docs}
    out: dict[str, Any] = {}
    for ld in long_docs:
        ref = by_seed[ld["seed"]]["runs"][sync]["curve"]
        final, t_final = loss_at(ref, updates), ref[-1]["time"]
        for spec, run in ld["runs"].items():
            t_hit = time_to(run["curve"], final, **LOSS)
            out.setdefault(spec, {})[ld["seed"]] = {
                "updates_run": run["curve"][-1]["updates"],
                "time_to_sync_final": t_hit,
                "updates_to_sync_final": time_to(run["curve"], final, **dict(LOSS, clock="updates")),
                "speedup": t_final / t_hit if t_hit else None,
            }
    return out


def summarize(
    docs: list[dict[str, Any]], sync: str, dn_dylu: str, naive: str, long_docs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    updates = docs[0]["config"]["updates"]
    seeds = {d["seed"]: per_seed(d["runs"], sync, updates) for d in docs}
    specs = list(docs[0]["runs"])
    table = {}

    def stat(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
        vals = [r[key] for r in rows]
        ok = [v for v in vals if v is not None]
        return {
            "each": vals,
            "mean": statistics.fmean(ok) if len(ok) == len(vals) else None,
            "min": min(ok, default=None),
            "max": max(ok, default=None),
        }

    for spec in specs:
        rows = [seeds[s][spec] for s in seeds]
        table[spec] = {
            k: stat(rows, k) for k in ("final_loss", "last_half_gap", "speedup", "inner_steps", "virtual_seconds")
        }
    c1 = table[dn_dylu]["last_half_gap"]["mean"]
    longer = longer_runs(docs, long_docs, sync) if long_docs else {}
    c2 = table[dn_dylu]["speedup"]["each"]
    if dn_dylu in longer:  # the decision run stopped before reaching sync's final loss: the longer runs decide
        c2 = [longer[dn_dylu][s]["speedup"] for s in sorted(longer[dn_dylu])]
    c3 = table[naive]["last_half_gap"]["mean"]
    verdicts = {
        "C1 DN+DyLU matches sync per update (mean last-half gap <= +2%)": {
            "value": c1,
            "held": c1 is not None and c1 <= PARITY_TOLERANCE,
        },
        "C2 DN+DyLU reaches sync's final loss >= 1.5x sooner, every seed": {
            "value": c2,
            "held": all(s is not None and s >= MIN_SPEEDUP for s in c2),
        },
        "C3 naive async Nesterov needs more updates than sync (mean last-half gap > +2%)": {
            "value": c3,
            "held": c3 is not None and c3 > WORSE_MARGIN,
        },
    }
    return {
        "updates": updates,
        "seeds": sorted(seeds),
        "per_seed": seeds,
        "table": table,
        "verdicts": verdicts,
        "longer_runs": longer,
        "criteria": {
            "parity_tolerance": PARITY_TOLERANCE,
            "worse_margin": WORSE_MARGIN,
            "min_speedup": MIN_SPEEDUP,
            "last_half": [updates // 2 + 1, updates],
            "sync": sync,
            "dn_dylu": dn_dylu,
            "naive": naive,
        },
    }


def format_table(summary: dict[str, Any]) -> str:
    head = (
        f"{'variant':<18}{'final loss':>18}{'last-half gap':>22}{'speed-up to sync final':>26}"
        f"{'inner steps':>13}{'virtual h':>10}"
    )
    lines = [head, "-" * len(head)]
    for spec, t in summary["table"].items():
        fl, gap, sp = t["final_loss"], t["last_half_gap"], t["speedup"]
        lines.append(
            f"{spec:<18}{fmt_spec(fl['mean'], '.4f'):>8} ({fmt_spec(fl['min'], '.3f')}-{fmt_spec(fl['max'], '.3f')})"
            f"{fmt_spec(gap['mean'], '+.2%'):>10} ({fmt_spec(gap['min'], '+.1%')}..{fmt_spec(gap['max'], '+.1%')})"
            f"{' / '.join(fmt_spec(s, '.2f') for s in sp['each']):>26}{fmt_spec(t['inner_steps']['mean'], '.0f'):>13}"
            f"{fmt_spec(t['virtual_seconds']['mean'] / 3600 if t['virtual_seconds']['mean'] else None, '.2f'):>10}"
        )
    lines.append(
        "final loss: mean (min-max) over seeds at the last update; last-half gap: paired (same seed) relative gap "
        "to sync, mean over the updates of the last half, then over seeds (min..max over seeds); speed-up: "
        "sync's virtual time to its final loss / this variant's, per seed ('-': never reached)"
    )
    for spec, per in summary.get("longer_runs", {}).items():
        lines.append(
            f"longer run {spec}: "
            + "; ".join(
                f"seed {s}: sync's final loss at update {fmt_spec(r['updates_to_sync_final'], '.0f')} "
                f"of {r['updates_run']:.0f}, "
                f"{fmt_spec(r['time_to_sync_final'], '.0f')} virtual s, speed-up {fmt_spec(r['speedup'], '.2f')}"
                for s, r in per.items()
            )
        )
    for name, v in summary["verdicts"].items():
        lines.append(f"{'HELD' if v['held'] else 'NOT HELD':<9} {name}: {v['value']}")
    return "\n".join(lines)


def plot(
    docs: list[dict[str, Any]], path: Path, title: str, dpi: int = 100, long_docs: list[dict[str, Any]] | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for i, spec in enumerate(docs[0]["runs"]):
        curves = [d["runs"][spec]["curve"] for d in docs]
        n = min(len(c) for c in curves)
        color = f"C{i}"
        for ax, key in ((axes[0], "updates"), (axes[1], "time")):
            xs = [statistics.fmean(c[j][key] for c in curves) for j in range(n)]
            ys = [[c[j]["val_loss"] for c in curves] for j in range(n)]
            if key == "time":
                xs = [x / 3600 for x in xs]
            ax.plot(xs, [statistics.fmean(y) for y in ys], color=color, label=spec, lw=1.2)
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.2, lw=0)
    colors = {spec: f"C{i}" for i, spec in enumerate(docs[0]["runs"])}
    for spec in long_docs[0]["runs"] if long_docs else []:
        curves = [d["runs"][spec]["curve"] for d in long_docs]
        n = min(len(c) for c in curves)
        xs = [statistics.fmean(c[j]["time"] for c in curves) / 3600 for j in range(n)]
        axes[1].plot(
            xs,
            [statistics.fmean(c[j]["val_loss"] for c in curves) for j in range(n)],
            ls="--",
            color=colors.get(spec, "k"),
            lw=1,
            label=f"{spec}, longer run",
        )
    axes[1].axhline(
        statistics.fmean(d["runs"][next(iter(d["runs"]))]["curve"][-1]["val_loss"] for d in docs),
        color="gray",
        lw=0.7,
        ls=":",
    )
    if long_docs:
        axes[1].legend(fontsize=7)
    axes[0].set_xlabel("outer updates (pseudo-gradients applied / 4)")
    axes[1].set_xlabel("virtual wall-clock (hours; paper's step times)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_ylim(top=3.2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.async_report", description=__doc__.split("\n")[0])
    ap.add_argument("--name", default="async_emulation")
    ap.add_argument("--sync", default="sync@0.7")
    ap.add_argument("--dn-dylu", default="dn_dylu@0.7")
    ap.add_argument("--naive", default="nesterov@0.175")
    ap.add_argument("--long", default=None, help="results name of longer runs of async variants (same seeds)")
    ap.add_argument("--docs", action="store_true")
    args = ap.parse_args(argv)
    out = RESULTS / args.name
    docs = [json.loads(p.read_text()) for p in sorted(out.glob("async_emulation_seed*.json"))]
    long_docs = (
        [json.loads(p.read_text()) for p in sorted((RESULTS / args.long).glob("async_emulation_seed*.json"))]
        if args.long
        else None
    )
    summary = summarize(docs, args.sync, args.dn_dylu, args.naive, long_docs)
    cfg = docs[0]["config"]
    title = (
        f"char-GPT ({cfg['model']['n_layer']} layer, width {cfg['model']['d_model']}) on stdlib source, 4 workers at "
        f"{cfg['time_scale']:g}x(0.58, 0.75, 1.51, 3.33) s/step (virtual), H={cfg['H']}, "
        f"seeds {summary['seeds']} (line: mean, band: min-max)"
    )
    png = out / "async_emulation.png"
    plot(docs, png, title, long_docs=long_docs)
    text = format_table(summary)
    print(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.docs:
        plot(docs, DOCS / "img" / "async_emulation.png", title, dpi=80, long_docs=long_docs)
        (DOCS / "async_emulation.json").write_text(
            json.dumps({"summary": summary, "runs": docs, "longer_runs": long_docs})
        )
        print(f"wrote {DOCS / 'img' / 'async_emulation.png'} and {DOCS / 'async_emulation.json'}")
    return summary


if __name__ == "__main__":
    main()
