"""What one overlapped sync costs the training thread, outside the Trainer (issue 24's open question).

2 CPU ranks behind a shaped loopback, timm resnet18 (32×32 inputs, batch 32, plain SGD steps in a
loop, no Lightning). For each wire format, repeated ``--repeats`` times, rank 0 reports:

* ``start``: the training thread's time to start the sync (the snapshot ``flatten`` into new
  memory, then :meth:`Collectives.start_mean`: the background buffer and the hand-off);
* ``in flight``: from the start until the background mean is done;
* ``lost``: the local steps run meanwhile (at least ``--tau`` of them, as a schedule with
  ``overlap_steps=τ`` runs before its merge), their time beyond the median step measured just before.

``raw`` rows are a bare ``dist.all_reduce`` of the same bytes on the comm thread (the link and
gloo alone); ``mean`` rows are the transport's real overlapped mean (anchor deltas, casts,
quantization and error feedback on the comm thread). The auto-tuner's model predicts a
training-thread cost per sync of ``s·t_link + κ_f·n + κ_overlap·n``
(:mod:`lightning_localsgd.tuning.model`): this benchmark measures it outside the Trainer, so
that a gap between the two can be put on the Trainer's side or the transport's.

Run (root, iproute2)::

    python -m benchmarks.inflight_cost --link 1gbit

Prints a table; writes ``benchmarks/results/inflight_cost/inflight_cost.json``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CASES = [("raw", "bfloat16"), ("mean", "bfloat16"), ("raw", None), ("mean", None), ("mean", "int8"), ("mean", "int4")]


def worker(out: str, repeats: int, tau: int) -> None:
    import timm
    import torch
    import torch.distributed as dist

    from lightning_localsgd.transport.collectives import Collectives, Group
    from lightning_localsgd.transport.tensors import flatten

    torch.set_num_threads(1)
    torch.manual_seed(0)
    # recipes.launch gives Lightning's variables (one node: the global rank is LOCAL_RANK)
    dist.init_process_group("gloo", rank=int(os.environ["LOCAL_RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    rank = dist.get_rank()
    background = dist.new_group([0, 1])
    model = timm.create_model("resnet18", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def step() -> float:
        begin = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - begin

    for _ in range(10):
        step()
    params = list(model.parameters())
    anchor = flatten(params).clone()
    bare = ThreadPoolExecutor(max_workers=1)  # the raw rows' comm thread
    rows: list[dict[str, Any]] = []
    for kind, fmt in CASES:
        for repeat in range(repeats + 1):  # the first of each case warms its buffers up: not kept
            base = statistics.median(step() for _ in range(6))
            comm = Collectives(comm_dtype=fmt)
            in_flight: float | None = None
            dist.barrier()
            begin = time.perf_counter()
            if kind == "raw":
                buf = torch.zeros(anchor.numel(), dtype=torch.bfloat16 if fmt == "bfloat16" else torch.float32)
                future = bare.submit(dist.all_reduce, buf, group=background)
                done = future.done
            else:
                residual = torch.zeros_like(anchor) if fmt in ("int8", "int4") else None
                pending = comm.start_mean(
                    flatten(params), Group(background, [0, 1], rank), anchor=anchor if fmt else None, residual=residual
                )
                done = pending.done
            start = time.perf_counter() - begin
            steps = []
            while not done() or len(steps) < tau:  # τ steps at least, as a schedule with overlap_steps=τ runs
                if done() and in_flight is None:
                    in_flight = time.perf_counter() - begin
                steps.append(step())
            in_flight = in_flight or time.perf_counter() - begin
            comm.close()
            if repeat:
                rows.append(
                    dict(
                        kind=kind,
                        format=fmt or "fp32",
                        start_ms=1e3 * start,
                        in_flight_ms=1e3 * in_flight,
                        steps=len(steps),
                        lost_ms=1e3 * sum(s - base for s in steps),
                        step_ms=1e3 * base,
                    )
                )
    bare.shutdown()
    if rank == 0:
        Path(out).write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--link", default="1gbit", help="shaped loopback rate (tc units), e.g. 1gbit, 100mbit")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tau", type=int, default=0, help="local steps run beside each sync at least (0: until it is done)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.repeats, args.tau)
        return 0
    from recipes.launch import run_local_ranks

    out_dir = ROOT / "benchmarks" / "results" / "inflight_cost"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_path = out_dir / "rows.json"
    with tempfile.TemporaryDirectory() as logs:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.inflight_cost",
            "--worker",
            str(rows_path),
            "--repeats",
            str(args.repeats),
            "--tau",
            str(args.tau),
        ]
        run_local_ranks(cmd, 2, log_dir=logs, timeout=600, cwd=ROOT, pythonpath=ROOT, link=args.link)
    rows = json.loads(rows_path.read_text())
    summary = []
    print(f"link {args.link}; rank 0; median of {args.repeats} repeats; at least {args.tau} steps beside each sync")
    print(f"{'case':16s} {'start ms':>9s} {'in flight ms':>13s} {'steps':>6s} {'lost ms':>8s} {'start+lost ms':>14s}")
    for kind, fmt in CASES:
        mine = [r for r in rows if r["kind"] == kind and r["format"] == (fmt or "fp32")]
        med = {k: statistics.median(r[k] for r in mine) for k in ("start_ms", "in_flight_ms", "steps", "lost_ms")}
        total = statistics.median(r["start_ms"] + r["lost_ms"] for r in mine)
        summary.append(dict(kind=kind, format=fmt or "fp32", **med, start_plus_lost_ms=total))
        print(
            f"{kind + ' ' + (fmt or 'fp32'):16s} {med['start_ms']:9.0f} {med['in_flight_ms']:13.0f} "
            f"{med['steps']:6.0f} {med['lost_ms']:8.0f} {total:14.0f}"
        )
    result = dict(
        link=args.link, repeats=args.repeats, tau=args.tau, rows=rows, summary=summary, command=" ".join(sys.argv)
    )
    (out_dir / "inflight_cost.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out_dir / 'inflight_cost.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
