"""The fault matrix (issue 11, item 7): what happens to a run when a worker dies, a checkpoint write is
cut, a replica turns NaN or the network goes away; how long until it is noticed, how many steps are
lost, and whether the final model equals the uninterrupted run's.

    python -m benchmarks.faults --docs                 # the measurement (about an hour on 2 busy cores)
    python -m benchmarks.faults --quick --name smoke   # one run per fault
    python -m benchmarks.faults --report-only --docs   # table, plot and pages again from the JSON
    python -m benchmarks.faults --resume --docs        # continue an interrupted measurement

Every run is one job of ``benchmarks/restart_worker.py`` (the run of ``benchmarks/restarts.py``: 2
ranks, float64, 24 optimizer steps of 5 batches per epoch, sync every 4 steps, ``last.ckpt`` every
6, timeouts 60 s) with one fault from ``benchmarks/fault_injection.py``, under
``torchrun --max-restarts=1`` unless the fault says "no agent" (then ``recipes.launch.run_local_ranks``
starts the ranks and nothing restarts them). Kill steps and victims are drawn from ``--seed``.
After each job every checkpoint file is loaded again ("nothing written is lost").
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.restarts import LIGHTNING, ROOT, collect_job, run_job

BASE: dict[str, Any] = {
    **LIGHTNING,
    "fixed": True,
    "log_steps": True,
    "log_saves": True,
    "kill_attempts": [0],
    "kill_step": None,
    "victim": None,
}
SYNC_STEPS = [s for s in range(2, LIGHTNING["steps"] - 1) if s % LIGHTNING["sync_every"]]
AT_SYNC = list(range(LIGHTNING["sync_every"], LIGHTNING["steps"] - 1, LIGHTNING["sync_every"]))
PARTITION_LINK = "10gbit"  # the namespace's loopback; the partition takes it down
FAULTS: dict[str, str] = {  # id → what the row means (table order)
    "kill_mid": "kill -9 of a random worker after a random mid-period step (PeriodicAveraging / DiLoCo)",
    "kill_sync": "kill -9 of a random worker inside a sync step, before its update (the peer is left in the sync)",
    "kill_async": "kill -9 of async worker rank 1 after a random step",
    "kill_server": "kill -9 of the async server's rank 0 after a random step",
    "kill_writer": "kill -9 of rank 0 halfway through writing last.ckpt of step 12 (write takes 2 s)",
    "kill_peer_writing": "kill -9 of rank 1 while rank 0 writes the step-12 checkpoint (write takes 4 s)",
    "nan_raise": "NaN gradients on rank 1 at step 10, nonfinite='raise' (PeriodicAveraging)",
    "nan_skip": "NaN gradients on rank 1 at step 10, nonfinite='skip' (PeriodicAveraging)",
    "partition_short": "network partition: the ranks' loopback down for 5 s (collective timeout 60 s)",
    "partition_long": "network partition: loopback down for 35 s, longer than the collective timeout (20 s)",
    "noagent_sync": "no agent: kill -9 of rank 1 after a random mid-period step (PeriodicAveraging)",
    "noagent_async": "no agent: kill -9 of async worker rank 1 after a random step",
    "noagent_server": "no agent: kill -9 of the async server's rank 0 after a random step",
}
ROUND_ORDER = (
    "kill_mid",
    "kill_async",
    "kill_server",
    "kill_writer",
    "nan_skip",
    "partition_long",
    "noagent_sync",
    "noagent_server",
    "kill_sync",
    "nan_raise",
    "partition_short",
    "kill_peer_writing",
    "noagent_async",
)
EXPECT = {
    "kill_mid": "exact",
    "kill_sync": "exact",
    "kill_async": "finish",
    "kill_server": "finish",
    "kill_writer": "exact",
    "kill_peer_writing": "exact",
    "nan_raise": "exact",
    "nan_skip": "finish",
    "partition_short": "exact",
    "partition_long": "exact",
    "noagent_sync": "fail_fast",
    "noagent_async": "fail_fast",
    "noagent_server": "fail_fast",
}


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every run: fault id, config, launcher; kill steps and victims drawn from ``--seed``."""
    rng = random.Random(args.seed)
    few = 1 if args.quick else 2
    runs: dict[str, list[dict[str, Any]]] = {f: [] for f in FAULTS}
    for i in range(2 if args.quick else args.kill_runs):  # ≥ 20 sync kills: 2 algorithms × 2 places
        fault = ("kill_mid", "kill_sync")[i % 2]
        algorithm = ("periodic", "diloco")[(i // 2) % 2]
        step, when = (
            (rng.choice(SYNC_STEPS), "after_step") if fault == "kill_mid" else (rng.choice(AT_SYNC), "before_step")
        )
        runs[fault].append({"algorithm": algorithm, "kill_step": step, "victim": rng.randrange(2), "kill_when": when})
    for fault, victim, n in (("kill_async", 1, args.async_runs), ("kill_server", 0, few)):
        for _ in range(1 if args.quick else n):
            runs[fault].append({"algorithm": "async", "kill_step": rng.randrange(3, 22), "victim": victim})
    for algorithm in ("periodic", "diloco")[:few]:
        runs["kill_writer"].append(
            {"algorithm": algorithm, "kill_step": 12, "victim": 0, "kill_when": "during_save", "slow_save": 2.0}
        )
        runs["kill_peer_writing"].append(
            {
                "algorithm": algorithm,
                "kill_step": 12,
                "victim": 1,
                "slow_save": 4.0,
                "kill_when": "while_peer_saves",
                "kill_delay": 1.0,
            }
        )
    for policy in ("raise", "skip"):
        runs[f"nan_{policy}"].append({"algorithm": "periodic", "nan_step": 10, "nan_rank": 1, "nonfinite": policy})
    for _ in range(few):
        runs["partition_short"].append({"algorithm": "periodic", "step_sleep": 0.4, "partition": [3.0, 5.0]})
    runs["partition_long"].append({"algorithm": "periodic", "step_sleep": 0.4, "partition": [3.0, 35.0], "timeout": 20})
    runs["noagent_sync"].append({"algorithm": "periodic", "kill_step": rng.choice(SYNC_STEPS), "victim": 1})
    runs["noagent_async"].append({"algorithm": "async", "kill_step": rng.randrange(3, 22), "victim": 1})
    runs["noagent_server"].append({"algorithm": "async", "kill_step": rng.randrange(3, 22), "victim": 0})
    if args.faults:  # a subset (development); unknown names are an error
        wanted = args.faults.split(",")
        unknown = sorted(set(wanted) - set(FAULTS))
        if unknown:
            raise SystemExit(f"unknown faults {unknown}: choose from {sorted(FAULTS)}")
        runs = {f: (v if f in wanted else []) for f, v in runs.items()}
    order = []  # round-robin over the faults (load changes spread over all of them; a cut-short run covers each)
    while any(runs.values()):
        for fault in ROUND_ORDER:
            if runs[fault]:
                order.append({"fault": fault, "cfg": {**BASE, **runs[fault].pop(0)}})
    return order


# ---------------------------------------------------------------------------- running one job
def partition(prefix: list[str], after: float, seconds: float) -> Any:
    """``during`` for run_job: loopback down ``after`` s after both ranks are up, for ``seconds``."""
    from recipes.launch import set_loopback

    def during(workdir: Path) -> None:
        events = workdir / "out" / "events.jsonl"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            lines = events.read_text().splitlines() if events.exists() else []
            if sum('"group_up"' in line for line in lines) >= 2:
                break
            time.sleep(0.1)
        time.sleep(after)
        down = time.time()
        set_loopback(prefix, up=False)
        time.sleep(seconds)
        set_loopback(prefix, up=True)
        (workdir / "partition.json").write_text(json.dumps({"down": down, "up": time.time()}))

    return during


def run_without_agent(cfg: dict[str, Any], workdir: Path, timeout: float) -> dict[str, Any]:
    """The two ranks started by ``run_local_ranks`` (no torchrun agent, nothing restarts them)."""
    from recipes.launch import run_local_ranks

    (workdir / "out").mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, "out_dir": str(workdir / "out"), "ckpt_dir": str(workdir / "ckpt")}
    (workdir / "cfg.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "benchmarks.restart_worker", str(workdir / "cfg.json")]
    start, rc = time.monotonic(), 0
    try:
        run_local_ranks(cmd, 2, log_dir=workdir, timeout=timeout, cwd=workdir, pythonpath=ROOT)
    except RuntimeError as err:
        rc = None if "(rank timeout)" in str(err) else 1
    job = collect_job(workdir, "rank0.log")
    job.update(rc=rc, seconds=time.monotonic() - start, timeout=timeout, stuck=None)
    return job


def run_one(spec: dict[str, Any], workdir: Path, timeout: float) -> dict[str, Any]:
    cfg = spec["cfg"]
    if spec["fault"].startswith("noagent"):
        return run_without_agent(cfg, workdir, timeout)
    if "partition" not in cfg:
        return run_job(cfg, workdir, timeout)
    from recipes.launch import shaped_link

    with shaped_link(PARTITION_LINK) as prefix:
        return run_job(cfg, workdir, timeout, prefix=prefix, during=partition(prefix, *cfg["partition"]))


# ---------------------------------------------------------------------------- what a job shows
AGENT_LINE = re.compile(r"^[IWE](\d\d)(\d\d) (\d\d):(\d\d):(\d\d(?:\.\d+)?) \d+ \S+\] (.*)$")


def agent_noticed(log: str, after: float) -> float | None:
    """Time of the first line of torchrun's agent, at or after ``after``, saying a worker failed."""
    year = time.localtime(after).tm_year
    for line in log.splitlines():
        m = AGENT_LINE.match(line)
        if m and ("closing signal" in m.group(6) or "failed (exitcode" in m.group(6)):
            mon, day, hh, mm = (int(m.group(i)) for i in range(1, 5))
            ss = float(m.group(5))
            t = time.mktime((year, mon, day, hh, mm, int(ss), 0, 0, -1)) + ss % 1
            if t >= after - 0.05:
                return t
    return None


def checkpoints_intact(ckpt_dir: Path, events: list[dict[str, Any]]) -> tuple[bool, str]:
    """Every checkpoint file loads; every write that completed left its file; no temp file remains."""
    import torch

    globs = ("*.ckpt", "*.ckpt.rank*", "*.ckpt.step*.rank*")
    files = sorted({p for g in globs for p in ckpt_dir.glob(g)}) if ckpt_dir.exists() else []
    problems = []
    for path in files:
        try:
            saved = torch.load(path, weights_only=False, map_location="cpu")
        except Exception as err:  # any failure to load is the finding
            problems.append(f"{path.name} does not load ({type(err).__name__})")
            continue
        if ".rank" in path.name:  # a rank's own part (sync: <file>.step<s>.rank<r>; async: <file>.rank<r>)
            continue
        step = saved["global_step"]
        m = re.match(r"step=(\d+)\.ckpt", path.name)
        if m and int(m.group(1)) != step:
            problems.append(f"{path.name} holds step {step}")
        parts = saved.get("localsgd") or {}
        for r in range(int(parts.get("world_size", 0))) if "step" in parts else ():  # the parts the file refers to
            if not (ckpt_dir / f"{path.name}.step{parts['step']}.rank{r}").exists():
                problems.append(f"{path.name}'s part of rank {r} (step {parts['step']}) is missing")
    for e in events:
        if e["event"] == "save_end":
            name = e["file"].split(".tmp-")[0].lstrip(".")
            if re.search(r"\.step\d+\.rank\d+$", name):
                continue  # a part is superseded by the next save's once that save's file exists (checked above)
            if not (ckpt_dir / name).exists():
                problems.append(f"{name} was written (step {e['step']}) and is gone")
    temps = [p.name for p in ckpt_dir.glob(".*.tmp-*")] if ckpt_dir.exists() else []
    note = f"{len(files)} files load" + (f"; temp files left: {', '.join(temps)}" if temps else "")
    return not problems, "; ".join(problems) or note


def analyse(spec: dict[str, Any], job: dict[str, Any], workdir: Path, refs: dict[str, Any]) -> dict[str, Any]:
    cfg, events, results = spec["cfg"], job["events"], job["results"]
    fault_t = next((e["t"] for e in events if e["event"] in ("kill", "nan")), None)
    if (workdir / "partition.json").exists():
        window = json.loads((workdir / "partition.json").read_text())
        fault_t = window["down"]
    else:
        window = None
    noticed = [e["t"] for e in events if e["event"] == "error" and fault_t is not None and e["t"] >= fault_t]
    agent = (
        agent_noticed((workdir / "torchrun.log").read_text(), fault_t)
        if fault_t and (workdir / "torchrun.log").exists()
        else None
    )
    first = min([t for t in [*noticed, agent] if t is not None], default=None)
    restarted = sorted(e["step"] for e in events if e["event"] == "group_up" and e["attempt"] >= 1)
    before = [e["step"] for e in events if e["event"] == "step" and e["attempt"] == 0]
    last_by_rank = {
        r: max(e["step"] for e in events if e["event"] == "step" and e["attempt"] == 0 and e["rank"] == r)
        for r in {e["rank"] for e in events if e["event"] == "step" and e["attempt"] == 0}
    }
    ups = [e["t"] for e in events if e["event"] == "group_up" and e["attempt"] >= 1]
    finished = len(results) == 2 and all(r["global_step"] == cfg["steps"] for r in results.values())
    ref = refs.get(cfg["algorithm"])
    diff = None
    if finished and ref is not None:
        diff = max(
            abs(float.fromhex(a) - float.fromhex(b))
            for r in results.values()
            for a, b in zip(r["params"], ref["params"])
        )
    intact, ckpt_note = checkpoints_intact(workdir / "ckpt", events)
    errors = sorted({e["error"].split(":")[0] for e in events if e["event"] == "error"})
    record = {
        "fault": spec["fault"],
        "algorithm": cfg["algorithm"],
        "kill_step": cfg.get("kill_step"),
        "victim": cfg.get("victim"),
        "rc": job["rc"],
        "hang": job["rc"] is None,
        "job_seconds": job["seconds"],
        "finished": finished,
        "restarted": bool(restarted),
        "resumed_from": restarted[0] if restarted else None,
        "last_step_before": max(before, default=None),
        "detect_s": None if first is None else first - fault_t,
        "detected_by": None if first is None else ("agent" if first == agent else "error in a rank"),
        "back_s": max(ups) - fault_t if ups and fault_t and len(ups) >= 2 else None,
        "equal": diff == 0.0 if diff is not None else None,
        "max_abs_diff": diff,
        "errors": errors,
        "final_loss": results[0]["final_loss"] if finished else None,
        "checkpoints_intact": intact,
        "checkpoints": ckpt_note,
        "partition": window,
        "nonfinite_steps": {r: res["nonfinite_steps"] for r, res in results.items()},
        "stall_s": max_gap([e for e in events if e["event"] == "step"]) if window else None,
    }
    resumed_by_rank = {e["rank"]: e["step"] for e in events if e["event"] == "group_up" and e["attempt"] >= 1}
    record["resumed_by_rank"] = resumed_by_rank
    if restarted and before:  # per rank (async workers resume at their own steps): done again; never done
        pairs = [(last_by_rank[r], step) for r, step in resumed_by_rank.items() if r in last_by_rank]
        record["steps_lost"] = max((last - step for last, step in pairs), default=max(before) - restarted[0])
        record["steps_skipped"] = max((max(0, step - last) for last, step in pairs), default=0)
    elif finished:
        record["steps_lost"] = 0
    record["ok"], record["outcome"] = judge(spec["fault"], record, cfg)
    if not record["ok"]:
        record["log_tail"] = job["log_tail"][-1500:]
    return record


def max_gap(steps: list[dict[str, Any]]) -> float | None:
    """Longest time between two consecutive step events of one rank in one attempt."""
    gaps = []
    for key in {(e["rank"], e["attempt"]) for e in steps}:
        ts = sorted(e["t"] for e in steps if (e["rank"], e["attempt"]) == key)
        gaps += [b - a for a, b in itertools.pairwise(ts)]
    return max(gaps, default=None)


def judge(fault: str, r: dict[str, Any], cfg: dict[str, Any]) -> tuple[bool, str]:
    """Whether the run did what the library promises for this fault, and a short account of it."""
    expect = EXPECT[fault]
    if r["hang"]:
        return False, "hang: the job was still running at the limit"
    bound = cfg["timeout"] + 30.0  # the documented timeout, plus the time to tear down and report
    if expect == "fail_fast":
        ok = r["detect_s"] is not None and r["detect_s"] <= bound and not r["finished"]
        err = ", ".join(r["errors"]) or "no error logged"
        return ok, f"the surviving rank failed after {r['detect_s'] or float('nan'):.1f} s ({err}); nothing restarts it"
    by_rank = r.get("resumed_by_rank") or {}
    if r["restarted"] and len(set(by_rank.values())) > 1:  # async workers resume at their own steps
        steps = ", ".join(f"rank {k} at {v}" for k, v in sorted(by_rank.items(), key=lambda kv: int(kv[0])))
        how = f"restarted, resumed {steps}"
    else:
        how = f"restarted, resumed at step {r['resumed_from']}" if r["restarted"] else "no restart"
    if not r["finished"]:
        return False, f"{how}; did not train to the end ({', '.join(r['errors']) or 'no error logged'})"
    same = "final model bit-equal" if r["equal"] else f"final model differs (max |Δ| {r['max_abs_diff']:.2g})"
    ok = r["checkpoints_intact"] and (r["equal"] or expect == "finish")
    if r["detect_s"] is not None and r["detect_s"] > bound:
        ok = False
    return ok, f"{how}; trained to the end; {same}"


# ---------------------------------------------------------------------------- the measurement
def measure(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The reference runs, then every planned fault run; progress in ``out`` (``references.json``,
    ``partial.jsonl``) so that ``--resume`` continues an interrupted measurement."""
    specs = plan(args)
    refs_path, partial, tmp = out / "references.json", out / "partial.jsonl", work_root(args)
    if not args.resume:
        refs_path.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    refs: dict[str, Any] = json.loads(refs_path.read_text()) if refs_path.exists() else {}
    runs = [json.loads(line) for line in partial.read_text().splitlines()] if partial.exists() else []
    redo = set(args.rerun.split(",")) - {""}
    runs = [r for r in runs if r["fault"] not in redo]
    partial.write_text("".join(json.dumps(r) + "\n" for r in runs))
    done = {r["run"] for r in runs}
    deferred = set(args.defer.split(",")) - {""}
    needed = {spec["cfg"]["algorithm"] for spec in specs if spec["fault"] not in deferred}
    for name, algorithm in (
        ("periodic", "periodic"),
        ("diloco", "diloco"),
        ("async", "async"),
        ("async_again", "async"),
    ):
        if algorithm not in needed or name in refs or (name == "async_again" and not args.async_spread):
            continue
        job = run_job({**BASE, "algorithm": algorithm, "kill_attempts": []}, Path(tmp, f"ref_{name}"), args.run_timeout)
        if len(job["results"]) != 2 or any(r["global_step"] != BASE["steps"] for r in job["results"].values()):
            raise SystemExit(f"the uninterrupted {name} run failed:\n{job['log_tail']}")
        refs[name] = job["results"][0]
        refs_path.write_text(json.dumps(refs))
        print(f"reference {name}: final loss {refs[name]['final_loss']:.6f} ({job['seconds']:.0f} s)", flush=True)
    for i, spec in enumerate(specs):
        if i in done or spec["fault"] in deferred:
            continue
        load = os.getloadavg()
        workdir = Path(tmp, f"{i:02d}_{spec['fault']}")
        shutil.rmtree(workdir, ignore_errors=True)  # left by an interrupted measurement
        job = run_one(spec, workdir, args.run_timeout)
        record = {
            "fault": spec["fault"],
            "rc": job["rc"],
            "job_seconds": job["seconds"],
            "run": i,
            "loadavg": load,
            "cfg": spec["cfg"],
            "workdir": str(workdir),
            "log_name": job_log(spec),
        }
        try:
            record.update(analyse(spec, job, workdir, refs))
        except Exception as err:  # keep measuring; --report-only --reanalyse after the fix
            record.update(ok=False, outcome=f"analysis failed: {type(err).__name__}: {err}", detect_s=None)
        runs.append(record)
        with partial.open("a") as f:
            f.write(json.dumps(record) + "\n")
        detect = "-" if record["detect_s"] is None else f"{record['detect_s']:.1f} s"
        print(
            f"{i:2d} {spec['fault']:18s} {'OK  ' if record['ok'] else 'FAIL'} detect {detect:>7s}  "
            f"{record['outcome']}  ({job['seconds']:.0f} s, load {load[0]:.1f})",
            flush=True,
        )
    return assemble(args, refs, sorted(runs, key=lambda r: r["run"]), planned=len(specs))


def work_root(args: argparse.Namespace) -> Path:
    """Where the jobs of measurement ``--name`` run (kept until the next fresh measurement)."""
    return Path(tempfile.gettempdir(), f"faults-{args.name}")


def job_log(spec: dict[str, Any]) -> str:
    return "rank0.log" if spec["fault"].startswith("noagent") else "torchrun.log"


def reanalyse(runs: list[dict[str, Any]], refs: dict[str, Any]) -> list[dict[str, Any]]:
    """Every record computed again from its job's directory (after a change to :func:`analyse`)."""
    out = []
    for r in runs:
        workdir = Path(r["workdir"])
        job = {**collect_job(workdir, r["log_name"]), "rc": r["rc"], "seconds": r["job_seconds"]}
        spec = {"fault": r["fault"], "cfg": r["cfg"]}
        out.append({**r, **analyse(spec, job, workdir, refs)})
    return out


def assemble(
    args: argparse.Namespace, refs: dict[str, Any], runs: list[dict[str, Any]], planned: int
) -> dict[str, Any]:
    """The results JSON: the setup, the references' losses, every run."""
    from importlib.metadata import version  # not importing torch: the report must be cheap on a busy machine

    spread = None
    if "async" in refs and "async_again" in refs:
        a, b = refs["async"]["params"], refs["async_again"]["params"]
        spread = max(abs(float.fromhex(x) - float.fromhex(y)) for x, y in zip(a, b))
    return {
        "command": " ".join(["python -m benchmarks.faults", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "torch": version("torch"),
        "lightning": version("lightning"),
        "config": BASE,
        "seed": args.seed,
        "run_timeout": args.run_timeout,
        "faults": FAULTS,
        "expect": EXPECT,
        "partition_link": PARTITION_LINK,
        "references": {k: {"final_loss": v["final_loss"]} for k, v in refs.items()},
        "async_run_to_run_max_abs_diff": spread,
        "planned_runs": planned,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-runs", type=int, default=20, help="sync kill runs (mid-period and at a sync step)")
    parser.add_argument("--async-runs", type=int, default=4, help="async worker kill runs")
    parser.add_argument("--quick", action="store_true", help="one run per fault")
    parser.add_argument("--faults", default="", help="comma-separated subset of the faults (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--async-spread", action="store_true", help="a second uninterrupted async run (run-to-run spread)"
    )
    parser.add_argument("--run-timeout", type=float, default=300.0, help="seconds before a job counts as a hang")
    parser.add_argument("--name", default="faults", help="results under benchmarks/results/<name>/")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="no runs; from faults.json, or from the progress files of an unfinished measurement",
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted measurement (same arguments)")
    parser.add_argument("--rerun", default="", help="with --resume: run these faults (comma-separated) again")
    parser.add_argument(
        "--defer",
        default="",
        help="skip these faults (comma-separated) now; a later --resume "
        "without --defer runs them (the plan and its run numbers stay the same)",
    )
    parser.add_argument(
        "--reanalyse",
        action="store_true",
        help="with --report-only: analyse the kept job directories again (in $TMPDIR/faults-<name>)",
    )
    parser.add_argument(
        "--docs", action="store_true", help="also write docs/results/faults.md and the table in docs/reliability.md"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.defer.split(",")) - {""} - set(FAULTS))
    if unknown:
        parser.error(f"--defer: unknown faults {unknown}: choose from {sorted(FAULTS)}")
    out = ROOT / "benchmarks" / "results" / args.name
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only and (out / "faults.json").exists() and not args.reanalyse:
        data = json.loads((out / "faults.json").read_text())
    elif args.report_only:  # an unfinished measurement: what ran so far
        refs = json.loads((out / "references.json").read_text())
        runs = [json.loads(line) for line in (out / "partial.jsonl").read_text().splitlines()]
        runs = reanalyse(runs, refs) if args.reanalyse else runs
        data = assemble(args, refs, sorted(runs, key=lambda r: r["run"]), planned=len(plan(args)))
        (out / "faults.json").write_text(json.dumps(data, indent=1))
    else:
        data = measure(args, out)
        (out / "faults.json").write_text(json.dumps(data, indent=1))
    from benchmarks.faults_report import report

    report(data, out, ROOT / "docs" if args.docs else None)


if __name__ == "__main__":
    main()
