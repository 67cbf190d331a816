"""What overlapped + fragmented + int8 syncs cost in quality, at equal optimizer steps (the overlap issue).

For PeriodicAveraging and DiLoCo, the blocking sync against the "streaming" one (``fragments=4``,
``overlap_steps`` > 0, ``comm_dtype="int8"``), same seeds, same steps:

* **image**: the demo's fine-tune (``recipes.demo``: resnet18 pretrained on MNIST-5k, fine-tuned on
  scikit-learn's digits on 2 processes, the demo's settings), final validation accuracy;
  target: the streaming run within 1 accuracy point of the blocking one (mean over seeds);
* **char_lm**: the char-level GPT on the standard library's source (``recipes.char_lm_fabric``,
  2 processes), final validation loss on the consensus; target: within 2%.

Run::

    python -m benchmarks.overlap_quality                      # both parts, seeds 0,1,2
    python -m benchmarks.overlap_quality --parts char_lm --seeds 0 --char-steps 60   # a quick check
    python -m benchmarks.overlap_quality --parts char_lm --name oq_ablation \
        --char-algorithms "" --char-ablation diloco       # each of fragments / overlap / int8 alone

Writes ``benchmarks/results/<name>/overlap_quality.json`` and ``.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import RESULTS, ROOT, environment, recipe_env

STREAMING = {"fragments": 4, "overlap_steps": 1, "comm_dtype": "int8"}  # the image runs' H is 8: τ < H/P


def streaming_overlay(name: str, out: Path, overlap_steps: int) -> Path:
    """The demo overlay ``name`` with fragments, overlap and int8 added (its other settings kept)."""
    cfg = yaml.safe_load((ROOT / "configs" / "image_classification" / f"{name}.yaml").read_text())
    for cb in cfg["trainer"]["callbacks+"]:
        cb["init_args"].update(fragments=STREAMING["fragments"], overlap_steps=overlap_steps)
    cfg["trainer"]["strategy"] = {
        "class_path": "lightning_localsgd.LocalSGDStrategy",
        "init_args": {"comm_dtype": STREAMING["comm_dtype"]},
    }
    path = out / f"{name}_streaming.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def image_run(name: str, overlay: Path | None, seed: int, out: Path) -> dict[str, Any]:
    """One demo fine-tune (the demo's own code path), final accuracy and the accuracy curve."""
    from recipes import demo

    args = demo.parse_args(["--seed", str(seed), "--results-dir", str(out)])
    weights = demo.pretrained_path(args)
    if not weights.is_file():
        demo.pretrain(args, weights)
    if overlay is not None:  # finetune() reads configs/image_classification/<name>.yaml: point it at ours
        demo.CONFIGS = overlay.parent
        (overlay.parent / "base.yaml").write_text((ROOT / "configs" / "image_classification" / "base.yaml").read_text())
    try:
        doc = demo.finetune(overlay.stem if overlay is not None else name, args, weights)
    finally:
        demo.CONFIGS = ROOT / "configs" / "image_classification"
    records = doc["records"]
    return {
        "final_acc": records[-1]["value"],
        "best_acc": max(r["value"] for r in records),
        "steps": records[-1]["step"],
        "MB_sent": doc["final"].get("MB_sent"),
    }


CHAR_STREAMING = {
    "fragments": ["--fragments", "4"],
    "overlap": ["--overlap-steps", "2"],
    "int8": ["--comm-dtype", "int8"],
}


def char_run(algorithm: str, streaming: bool | str, seed: int, steps: int, out: Path) -> dict[str, Any]:
    """One ``recipes.char_lm_fabric`` run on 2 processes; final validation loss on the consensus.

    ``streaming``: False (blocking), True (fragments=4, overlap 2 steps, int8) or one of
    :data:`CHAR_STREAMING`'s keys (that component alone: the ablation).
    """
    label = streaming if isinstance(streaming, str) else ("streaming" if streaming else "blocking")
    path = out / f"char_{algorithm}_{label}_{seed}.json"
    h = 16 if algorithm == "periodic" else 20
    cmd = [
        sys.executable,
        "-m",
        "recipes.char_lm_fabric",
        "--devices",
        "2",
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
    if isinstance(streaming, str):
        cmd += CHAR_STREAMING[streaming]
    elif streaming:
        cmd += [arg for part in CHAR_STREAMING.values() for arg in part]
    subprocess.run(cmd, env=recipe_env(), cwd=ROOT, check=True, timeout=3600)
    doc = json.loads(path.read_text())
    return {"final_val_loss": doc["final_val_loss"], "curve": doc["curve"], "MB_sent": doc["MB_sent"]}


def summarize(runs: dict[str, list[dict[str, Any]]], key: str) -> dict[str, Any]:
    out = {}
    for variant, rs in runs.items():
        values = [r[key] for r in rs]
        out[variant] = {
            "mean": statistics.fmean(values),
            "min": min(values),
            "max": max(values),
            "n": len(values),
            "values": values,
        }
    return out


def verdicts(summary: dict[str, Any]) -> dict[str, Any]:
    """Streaming vs blocking, per algorithm: accuracy points (image) and relative loss (char LM)."""
    v: dict[str, Any] = {}
    for algorithm in ("localsgd", "diloco"):
        b, s = summary.get("image", {}).get(algorithm), summary.get("image", {}).get(f"{algorithm}_streaming")
        if b and s:
            gap = 100 * (b["mean"] - s["mean"])
            v[f"image_{algorithm}"] = {
                "blocking_acc": b["mean"],
                "streaming_acc": s["mean"],
                "gap_points": gap,
                "target_points": 1.0,
                "met": gap <= 1.0,
            }
    for algorithm in ("periodic", "diloco"):
        b, s = summary.get("char_lm", {}).get(algorithm), summary.get("char_lm", {}).get(f"{algorithm}_streaming")
        if b and s:
            rel = s["mean"] / b["mean"] - 1
            v[f"char_lm_{algorithm}"] = {
                "blocking_loss": b["mean"],
                "streaming_loss": s["mean"],
                "relative": rel,
                "target": 0.02,
                "met": rel <= 0.02,
            }
    return v


def report(doc: dict[str, Any], out: Path) -> None:
    lines = ["part     variant               mean      min      max   n"]
    for part, key in (("image", "final_acc"), ("char_lm", "final_val_loss")):
        for variant, s in doc["summary"].get(part, {}).items():
            scale = 100 if key == "final_acc" else 1
            lines.append(
                f"{part:<8} {variant:<20} {s['mean'] * scale:8.3f} {s['min'] * scale:8.3f} "
                f"{s['max'] * scale:8.3f} {s['n']:3d}"
            )
    print("\n".join(lines))
    for name, v in doc["verdicts"].items():
        if name.startswith("image"):
            print(
                f"{name}: streaming {100 * v['streaming_acc']:.2f}% vs blocking {100 * v['blocking_acc']:.2f}%: "
                f"{v['gap_points']:+.2f} points behind (target <= 1): {'met' if v['met'] else 'NOT met'}"
            )
        else:
            print(
                f"{name}: streaming {v['streaming_loss']:.4f} vs blocking {v['blocking_loss']:.4f}: "
                f"{100 * v['relative']:+.2f}% (target <= +2%): {'met' if v['met'] else 'NOT met'}"
            )
    (out / "overlap_quality.json").write_text(json.dumps(doc, indent=1))
    plot(doc, out / "overlap_quality.png")
    print(f"wrote {out / 'overlap_quality.json'} and .png")


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("image", "char_lm") if doc["summary"].get(p)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        summary = doc["summary"][part]
        names = list(summary)
        scale = 100 if part == "image" else 1
        for i, n in enumerate(names):
            vals = [v * scale for v in summary[n]["values"]]
            ax.scatter([i] * len(vals), vals, color="tab:orange" if "streaming" in n else "tab:blue", zorder=3)
            ax.hlines(summary[n]["mean"] * scale, i - 0.3, i + 0.3, color="black")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_ylabel("final validation accuracy (%)" if part == "image" else "final validation loss (nats/byte)")
        ax.set_title(f"{part}: blocking vs fragments=4 + overlap + int8 (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overlap_quality", description=__doc__.splitlines()[0])
    p.add_argument("--name", default="overlap_quality")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--parts", default="image,char_lm")
    p.add_argument("--char-steps", type=int, default=300)
    p.add_argument("--char-algorithms", default="periodic,diloco", help="char_lm: blocking vs streaming for these")
    p.add_argument(
        "--char-ablation",
        default="",
        help="char_lm: also run each of fragments,overlap,int8 alone "
        "for these algorithms (e.g. diloco), to find which part costs the quality",
    )
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = RESULTS / args.name
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"image": {}, "char_lm": {}}
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="overlap_quality_") as tmp:
        overlays = {n: streaming_overlay(n, Path(tmp), STREAMING["overlap_steps"]) for n in ("localsgd", "diloco")}
        for seed in seeds:  # interleaved: every variant sees the same machine load, seed by seed
            if "image" in args.parts:
                for n in ("localsgd", "diloco"):
                    runs["image"].setdefault(n, []).append(image_run(n, None, seed, out / "image"))
                    runs["image"].setdefault(f"{n}_streaming", []).append(
                        image_run(n, overlays[n], seed, out / "image")
                    )
            if "char_lm" in args.parts:
                for a in [a for a in args.char_algorithms.split(",") if a]:
                    for streaming in (False, True):
                        key = f"{a}_streaming" if streaming else a
                        runs["char_lm"].setdefault(key, []).append(char_run(a, streaming, seed, args.char_steps, out))
                for a in [a for a in args.char_ablation.split(",") if a]:
                    for part in CHAR_STREAMING:
                        runs["char_lm"].setdefault(f"{a}_{part}_only", []).append(
                            char_run(a, part, seed, args.char_steps, out)
                        )
    summary = {"image": summarize(runs["image"], "final_acc"), "char_lm": summarize(runs["char_lm"], "final_val_loss")}
    doc = {
        "config": {
            "seeds": seeds,
            "parts": args.parts,
            "char_steps": args.char_steps,
            "streaming": STREAMING,
            "char_streaming": {"fragments": 4, "overlap_steps": 2, "comm_dtype": "int8"},
        },
        "runs": runs,
        "summary": summary,
        "verdicts": verdicts(summary),
        "seconds": time.time() - start,
        "environment": environment(),
    }
    report(doc, out)
    return doc


if __name__ == "__main__":
    main()
