"""Do restarted groups come up? N runs of ``torchrun --max-restarts=1`` in which a worker dies, per variant.

    python -m benchmarks.restarts --runs 20                 # the measurement (about 30-60 min on 2 busy cores)
    python -m benchmarks.restarts --runs 2 --name smoke     # a quick check
    python -m benchmarks.restarts --report-only             # table, plot and page again from the JSON

Variants (each run is one ``torchrun --nproc-per-node=2 --max-restarts=1`` job, see
``benchmarks/restart_worker.py``):

| variant | what runs |
|---|---|
| ``torch`` | plain torch: ``init_process_group("gloo")`` (env://), allreduce, rank 1 exits, restart, allreduce |
| ``torch+fix`` | the same with ``lightning_localsgd.transport.process_group.init_process_group`` |
| ``lightning`` | ``LocalSGDStrategy`` (timeout 60 s), PeriodicAveraging / DiLoCo on alternate runs, 24 steps of
  5 batches per epoch, checkpoints every 6 steps, rank 1 SIGKILLed after step 13, resume from ``last.ckpt`` |
| ``lightning+fix`` | the same through ``RestartSafeStrategy`` (the proposed ``setup_distributed`` wiring) |

A run *trains to the end* when the restarted attempt finishes on both ranks; for the Lightning
variants the final model must also be bit-equal (float64) to an uninterrupted run of the same
algorithm. Failures are classified from the job's output. The variants of a run go in rotating
order; ``os.getloadavg()`` is recorded before every run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from recipes.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("torch", "torch+fix", "lightning", "lightning+fix")
LIGHTNING: dict[str, Any] = {
    "kind": "lightning",
    "loader": "stateful",
    "steps": 24,
    "samples": 20,
    "batch_size": 4,
    "sync_every": 4,
    "save_every": 6,
    "kill_step": 13,
    "victim": 1,
    "seed": 0,
    "timeout": 60,
    "init_timeout": 60,
}
TORCH: dict[str, Any] = {
    "kind": "torch",
    "steps": 1,
    "kill_step": 0,
    "victim": 1,
    "seed": 0,
    "timeout": 60,
    "init_timeout": 60,
}
CAUSES = (  # (substring of the job's output, cause), first match wins
    ("ProcessGroupInitError", "ProcessGroupInitError (bounded wait)"),
    ("Connection refused", "gloo connectFullMesh: connection refused"),
    ("connectFullMesh failed", "gloo connectFullMesh: other"),
    ("Timed out", "timeout in a collective"),
)


def run_job(
    cfg: dict[str, Any],
    workdir: Path,
    timeout: float,
    max_restarts: int = 1,
    prefix: Sequence[str] = (),
    during: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """One torchrun job in ``workdir``; returns its outcome, the ranks' results and the events.

    ``prefix`` runs torchrun under a command prefix (e.g. ``recipes.launch.shaped_link``'s network
    namespace); ``during(workdir)`` runs on a thread while the job runs (e.g. a network partition).
    """
    (workdir / "out").mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, "out_dir": str(workdir / "out"), "ckpt_dir": str(workdir / "ckpt")}
    (workdir / "cfg.json").write_text(json.dumps(cfg))
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--max-restarts={max_restarts}",
        f"--master-port={free_port()}",
        "-m",
        "benchmarks.restart_worker",
        str(workdir / "cfg.json"),
    ]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    start = time.monotonic()
    stuck: list[dict[str, Any]] = []
    with open(workdir / "torchrun.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if during is not None:
            threading.Thread(target=during, args=(workdir,), daemon=True).start()
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stuck = where_stuck(proc.pid)
            kill_job(proc.pid, [w["pid"] for w in stuck])
            proc.wait()
            rc = None
    job = collect_job(workdir, "torchrun.log")
    job.update(rc=rc, seconds=time.monotonic() - start, timeout=timeout, stuck=stuck if rc is None else None)
    return job


def collect_job(workdir: Path, log_name: str) -> dict[str, Any]:
    """What a job left in ``workdir/out``: each rank's result, the events, the tail of the log."""
    results = {}
    for path in sorted((workdir / "out").glob("rank*.json")):
        result = json.loads(path.read_text())
        results[result["rank"]] = result
    events_path = workdir / "out" / "events.jsonl"
    events = [json.loads(line) for line in events_path.read_text().splitlines()] if events_path.exists() else []
    return {"results": results, "events": events, "log_tail": (workdir / log_name).read_text()[-4000:]}


def where_stuck(agent: int) -> list[dict[str, Any]]:
    """For a hung job: each worker's innermost gloo/c10d frames (gdb) and its TCP sockets (ss).

    torchrun starts every worker in a session of its own: they are found as the agent's children.
    """
    pids = subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True, check=False).stdout.split()
    found = []
    for pid in pids:
        try:
            bt = subprocess.run(
                ["gdb", "-p", pid, "-batch", "-ex", "thread apply all bt 10"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired) as err:
            bt = f"gdb failed: {err}"
        frames = [line.split(" in ", 1)[-1].split(" (")[0] for line in bt.splitlines() if line.startswith("#")]
        frames = [f for f in frames if "gloo::" in f or "c10d::" in f][:6]
        socks = subprocess.run(["ss", "-tanp"], capture_output=True, text=True, check=False).stdout.splitlines()
        found.append({"pid": int(pid), "frames": frames, "sockets": [s for s in socks if f"pid={pid}," in s]})
    return found


def kill_job(agent: int, workers: list[int]) -> None:
    """SIGKILL the agent's session and each of its workers (each in a session of its own)."""
    os.killpg(agent, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def classify(job: dict[str, Any], reference: list[str] | None, steps: int) -> tuple[bool, str]:
    results = job["results"]
    finished = len(results) == 2 and all(r["attempt"] >= 1 and r["global_step"] == steps for r in results.values())
    if finished and reference is not None and any(r["params"] != reference for r in results.values()):
        return False, "trained to the end, final model differs from the uninterrupted run"
    if finished and reference is None and any(r["sum"] != 3.0 for r in results.values()):
        return False, "wrong allreduce result"
    if finished:
        return True, "trained to the end"
    if job["rc"] is None:
        return False, f"hang (job killed after {job['timeout']:.0f} s)"
    for needle, cause in CAUSES:
        if needle in job["log_tail"]:
            return False, cause
    return False, "other failure"


def restart_seconds(events: list[dict[str, Any]]) -> float | None:
    """Seconds from the kill to the restarted group being up on every rank."""
    kills = [e["t"] for e in events if e["event"] == "kill"]
    ups = [e["t"] for e in events if e["event"] == "group_up" and e["attempt"] >= 1]
    return max(ups) - min(kills) if kills and len(ups) == 2 else None


def measure(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}: choose from {VARIANTS}")
    references: dict[str, list[str]] = {}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="restarts-") as tmp:
        for algorithm in ("periodic", "diloco"):  # the uninterrupted runs the Lightning variants must equal
            job = run_job(
                {**LIGHTNING, "algorithm": algorithm, "fixed": True, "kill_attempts": []},
                Path(tmp, f"reference_{algorithm}"),
                args.run_timeout,
            )
            if job["rc"] != 0 or len(job["results"]) != 2:
                raise SystemExit(f"the uninterrupted {algorithm} run failed:\n{job['log_tail']}")
            references[algorithm] = job["results"][0]["params"]
        for i in range(args.runs):
            order = variants[i % len(variants) :] + variants[: i % len(variants)]
            for variant in order:
                if not variant.endswith("+fix") and i >= args.stock_runs:
                    continue
                kind, fixed = variant.split("+")[0], variant.endswith("+fix")
                algorithm = ("periodic", "diloco")[i % 2]
                base = LIGHTNING if kind == "lightning" else TORCH
                cfg = {**base, "algorithm": algorithm, "fixed": fixed, "kill_attempts": [0]}
                load = os.getloadavg()
                job = run_job(cfg, Path(tmp, f"{variant}_{i}"), args.run_timeout)
                ref = references[algorithm] if kind == "lightning" else None
                ok, cause = classify(job, ref, base["steps"])
                record = {
                    "variant": variant,
                    "run": i,
                    "algorithm": algorithm if kind == "lightning" else None,
                    "ok": ok,
                    "cause": cause,
                    "seconds": job["seconds"],
                    "loadavg": load,
                    "restart_seconds": restart_seconds(job["events"]),
                    "rc": job["rc"],
                }
                if not ok:
                    record["log_tail"] = job["log_tail"][-1500:]
                    record["stuck"] = job["stuck"]
                runs.append(record)
                (out / "partial.jsonl").open("a").write(json.dumps(record) + "\n")  # progress, for a long run
                print(
                    f"run {i:2d} {variant:14s} {'OK  ' if ok else 'FAIL'} {cause}  ({job['seconds']:.0f} s, "
                    f"load {load[0]:.1f})",
                    flush=True,
                )
    import lightning
    import torch

    return {
        "command": " ".join(["python -m benchmarks.restarts", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "runs_per_variant": args.runs,
        "stock_runs": args.stock_runs,
        "run_timeout": args.run_timeout,
        "variants": variants,
        "lightning_config": LIGHTNING,
        "runs": runs,
    }


def summarize(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for variant in data["variants"]:
        runs = [r for r in data["runs"] if r["variant"] == variant]
        causes: dict[str, int] = {}
        for r in runs:
            if not r["ok"]:
                causes[r["cause"]] = causes.get(r["cause"], 0) + 1
        lat = sorted(r["restart_seconds"] for r in runs if r["ok"] and r["restart_seconds"] is not None)
        rows.append(
            {
                "variant": variant,
                "ok": sum(r["ok"] for r in runs),
                "runs": len(runs),
                "causes": causes,
                "median_restart_s": lat[len(lat) // 2] if lat else None,
            }
        )
    return rows


def report(data: dict[str, Any], out: Path, docs: Path | None) -> None:
    from benchmarks.restarts_report import write_page, write_plot

    rows = summarize(data)
    for row in rows:
        causes = "; ".join(f"{n}× {c}" for c, n in row["causes"].items()) or "-"
        lat = f"{row['median_restart_s']:.1f} s" if row["median_restart_s"] is not None else "-"
        print(f"{row['variant']:14s} {row['ok']:3d} / {row['runs']:<3d} median kill→group up {lat:>8s}  {causes}")
    write_plot(rows, out / "restarts.png")
    if docs is not None:
        write_page(data, rows, docs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per variant")
    parser.add_argument("--stock-runs", type=int, default=10, help="runs of the stock (unfixed) variants")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--run-timeout", type=float, default=180.0, help="seconds before a job counts as a hang")
    parser.add_argument("--name", default="restarts", help="results under benchmarks/results/<name>/")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--docs", action="store_true", help="also write docs/results/restarts.md")
    args = parser.parse_args(argv)
    out = ROOT / "benchmarks" / "results" / args.name
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        data = json.loads((out / "restarts.json").read_text())
    else:
        data = measure(args, out)
        (out / "restarts.json").write_text(json.dumps(data, indent=1))
    report(data, out, ROOT / "docs" / "results" if args.docs else None)


if __name__ == "__main__":
    main()
