"""Step time and bytes per step of data-parallel strategies on the same run and the same machine.

Every variant trains timm's resnet18 (random init, 10 classes) on synthetic 32×32 inputs with a
per-rank batch of 32 and SGD (momentum 0.9) on ``--world`` CPU processes (gloo, 127.0.0.1), for
``--warmup`` unmeasured optimizer steps followed by ``--steps`` measured ones:

==================  ============================================================================
floor               ``LocalSGDStrategy(sync_every=<longer than the run>)``: two processes, same
                    code path, never communicate inside the measured window
ddp                 Lightning's ``DDPStrategy`` (gradient allreduce every step)
postlocal_sgd       Lightning's post-local SGD: ``DDPStrategy(ddp_comm_state=PostLocalSGDState(...),
                    ddp_comm_hook=post_localSGD_hook, model_averaging_period=8)``; on CPU the hook is
                    not registered, so DDP's per-step allreduce stays and averaging comes on top
localsgd_H{h}       ``LocalSGDStrategy(sync_every=h)`` for every ``h`` in ``--hs``
localsgd_H{h}_bf16  ``LocalSGDStrategy(sync_every=h, comm_dtype="bfloat16")`` for ``h`` = ``--bf16-h``
==================  ============================================================================

Any other LocalSGD variant can be named in ``--variants``; the name is the spec::

    {localsgd|diloco}_H{h}[_P{fragments}][_tau{overlap_steps}][_{bfloat16|bf16|int8|int4}]
    [groups_]{localsgd|diloco}_auto  (comm_dtype, H, τ and fragments chosen by the auto-tuner)

e.g. ``localsgd_H8_tau7`` (PeriodicAveraging(8, overlap_steps=7)), ``localsgd_H32_tau31_int8``,
``localsgd_H8_P4`` (4 staggered fragments), ``diloco_H32_P4_tau3_int8`` (Streaming DiLoCo).

Measured per variant:

* step time: a callback times ``on_train_batch_start → on_train_batch_end`` with
  ``time.perf_counter`` on every rank (forward, backward, optimizer step, and any sync inside it);
  mean and median over the measured steps of all ranks (and repeats);
* bytes per step from the library's counter (``strategy.comm.counters.bytes_sent``, estimated
  bytes this rank sent), LocalSGDStrategy variants only;
* bytes per step from the loopback interface (``lo`` tx bytes in ``/proc/net/dev``) read by rank 0
  at the start of the first and the end of the last measured step. Every rank's traffic crosses
  ``lo`` once, so the per-rank figure is ``Δtx / steps / world``.

**A slow link.** ``--link 1gbit`` (or ``100mbit``...) runs every variant's ranks inside a private
network namespace whose loopback is shaped by ``tc ... tbf rate 1gbit burst 256kb latency 200ms``
(:func:`recipes.launch.shaped_link`); the loopback counter is then the namespace's own, so other
processes' traffic does not show. Without root or iproute2 the benchmark says so and stops.

**Per step.** Every rank also records the counter's bytes after every step and rank 0 the
loopback bytes, so the largest single step's bytes (``peak_*``) show what fragments buy.

Run (the variants run one after another, ``--world`` processes each)::

    python -m benchmarks.step_time                     # all variants, results/step_time/
    python -m benchmarks.step_time --steps 6 --warmup 2 --name smoke   # a quick check
    python -m benchmarks.step_time --link 1gbit --name link_1gbit \
        --variants floor,ddp,localsgd_H8,localsgd_H8_tau7            # the overlap issue's first target

Writes ``benchmarks/results/<name>/step_time.json`` (raw numbers and ratios) and
``step_time.png``, and prints a table. Nothing is asserted: the targets are reported.

**Two nodes.** ``--nodes 2`` runs ``--world`` (default 4) ranks as 2 simulated nodes × ``world/2``
ranks (:func:`recipes.launch.two_nodes`): each node a private network namespace with an unshaped
loopback, the two joined by a veth pair shaped at ``--link`` on both ends (no ``--link``: an
unshaped veth). Same-node pairs talk over the node's loopback, cross-node pairs over the veth. Root
and iproute2 are needed; without them the benchmark says so and stops. Every variant trains with
``Trainer(devices=world/2, num_nodes=2)``; the variants (default: all of these)::

==========================  ======================================================================
floor                       as above: no communication inside the measured window
node_ddp                    node-local DDP: each node its own independent ``world/2``-rank DDP job
                            (its own ``MASTER_ADDR``/port), both started at once, nothing crosses
                            nodes: the floor that replica groups are measured against
ddp                         Lightning's DDP over all ranks (gradient allreduce across the link)
localsgd_H8                 per-process local SGD: every rank a replica (``LocalSGDStrategy``)
groups_localsgd_H8          replica groups: ``LocalSGDStrategy(within_node="ddp")`` +
                            ``PeriodicAveraging(8)``: DDP inside each node, the replicas (one per
                            node) averaged across the link every 8 steps
groups_localsgd_H8_tau7     the same with ``overlap_steps=7``
groups_diloco_H8_tau7       ``DiLoCo(8, overlap_steps=7)`` across nodes, DDP inside them
==========================  ======================================================================

Any name of the grammar above, prefixed with ``groups_``, is a replica-groups variant
(``groups_{localsgd|diloco}_H{h}[_P{p}][_tau{t}][_{dtype}]``); ``node_ddp`` and ``groups_*`` need
``--nodes 2``. Measured per variant, besides the step times and the library's counter: the first
rank of each node reads its namespace's ``/proc/net/dev`` at the start of the first and the end of
the last measured step, giving **cross-node bytes per step per node** (veth tx) and **intra-node
bytes per step per node** (loopback tx); the harness also records each launch's whole-run totals
(``runs[...]["traffic"]``). Step-time ratios are the slowest rank's mean step against the floor's
and against ``node_ddp``'s. For ``ddp`` the ring estimate 2·(m−1)/m·B (B = fp32 gradient bytes, m =
ranks) is printed beside the measured veth and loopback bytes: gloo's ring crosses each path once
per node. Run::

    python -m benchmarks.step_time --nodes 2 --link 1gbit --name two_nodes_1gbit     # all of the above
    python -m benchmarks.step_time --nodes 2 --link 1gbit --world 4 --steps 16 --warmup 4 \
        --variants floor,node_ddp,ddp,localsgd_H8 --name smoke_2node                  # a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.common import QUIET_TRAINER, RESULTS, environment, fmt, held_bytes, launch_ranks, loadavg
from recipes.launch import (
    LinkUnavailable,
    check_link_support,
    describe_link,
    describe_node_link,
    read_interface_bytes,
    read_loopback_bytes,
    run_rank_from_file,
)

TWO_NODE_VARIANTS = "floor,node_ddp,ddp,localsgd_H8,groups_localsgd_H8,groups_localsgd_H8_tau7,groups_diloco_H8_tau7"
"""The default ``--variants`` with ``--nodes 2``."""


# ====================================================================== shared helpers
def variant_specs(hs: list[int], bf16_h: list[int], postlocal_period: int) -> dict[str, dict[str, Any]]:
    specs: dict[str, dict[str, Any]] = {
        "floor": {"kind": "floor"},
        "ddp": {"kind": "ddp"},
        "postlocal_sgd": {"kind": "postlocal", "period": postlocal_period},
    }
    for h in hs:
        specs[f"localsgd_H{h}"] = {"kind": "localsgd", "H": h, "comm_dtype": None}
    for h in bf16_h:
        specs[f"localsgd_H{h}_bf16"] = {"kind": "localsgd", "H": h, "comm_dtype": "bfloat16"}
    return specs


_VARIANT = re.compile(
    r"^(groups_|fsdp_)?(localsgd|diloco)_H(\d+)(?:_P(\d+))?(?:_tau(\d+))?(?:_(bfloat16|bf16|int8|int4))?$"
)


def parse_variant(name: str) -> dict[str, Any] | None:
    """The spec a variant name spells (see the module docstring), or ``None``."""
    auto = re.match(r"^(groups_)?(localsgd|diloco)_auto$", name)
    if auto is not None:  # everything left to the auto-tuner (docs/autotune.md)
        tuned: dict[str, Any] = {
            "kind": "localsgd",
            "algorithm": "periodic" if auto.group(2) == "localsgd" else "diloco",
            "H": "auto",
            "fragments": "auto",
            "overlap_steps": "auto",
            "comm_dtype": "auto",
        }
        if auto.group(1):
            tuned["within_node"] = "ddp"
        return tuned
    m = _VARIANT.match(name)
    if m is None:
        return None
    groups, algorithm, h, p, tau, dtype = m.groups()
    dtype = "bfloat16" if dtype == "bf16" else dtype
    spec: dict[str, Any] = {
        "kind": "localsgd",
        "algorithm": "periodic" if algorithm == "localsgd" else "diloco",
        "H": int(h),
        "fragments": int(p or 1),
        "overlap_steps": int(tau or 0),
        "comm_dtype": dtype,
    }
    if groups:
        spec["within_node"] = "ddp" if groups == "groups_" else "fsdp"
    return spec


# ====================================================================== one rank (worker process)
def run_rank(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one variant on this rank and return its measurements (called in a launched process)."""
    import warnings
    from datetime import timedelta

    warnings.filterwarnings("ignore")
    import timm
    import torch
    import torch.nn.functional as F
    from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_localsgd import LocalSGDStrategy

    torch.set_num_threads(1)
    if os.environ.get("LOCALSGD_LOG"):  # e.g. LOCALSGD_LOG=INFO: the library's log (the tuner's choices) on stderr
        import logging

        logging.basicConfig(level=os.environ["LOCALSGD_LOG"].upper())
    world = int(os.environ["WORLD_SIZE"])  # this job's: ranks per node for node_ddp (one job per node)
    per_node = cfg.get("per_node") or world // cfg["nodes"]
    node = int(os.environ.get("LOCALSGD_NODE", os.environ["NODE_RANK"]))  # the simulated node, whatever the job
    rank = node * per_node + int(os.environ["LOCAL_RANK"])  # index among all ranks of the launch
    two_nodes = cfg["nodes"] > 1 and "GLOO_SOCKET_IFNAME" in os.environ  # in recipes.launch.two_nodes
    reads_lo = rank == 0 and not two_nodes  # the machine's (or shaped namespace's) loopback: all ranks' bytes
    reads_node = two_nodes and int(os.environ["LOCAL_RANK"]) == 0  # this node's veth and loopback
    veth = os.environ.get("GLOO_SOCKET_IFNAME", "")
    spec = cfg["variant"]
    warmup, steps = cfg["warmup"], cfg["steps"]
    total = warmup + steps
    timeout = timedelta(seconds=cfg["collective_timeout"])

    class Batches(torch.utils.data.IterableDataset):
        """``total`` batches cycled from a small pool of random tensors (different on every rank)."""

        def __init__(self) -> None:
            g = torch.Generator().manual_seed(1000 * cfg["seed"] + rank)
            size, b = cfg["image_size"], cfg["batch_size"]
            self.pool = [
                (torch.randn(b, 3, size, size, generator=g), torch.randint(0, cfg["num_classes"], (b,), generator=g))
                for _ in range(min(8, total))
            ]

        def __iter__(self):
            for i in range(total):
                yield self.pool[i % len(self.pool)]

        def __len__(self) -> int:
            return total

    class Net(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = timm.create_model(
                cfg["model"], pretrained=False, num_classes=cfg["num_classes"], **cfg.get("model_kwargs", {})
            )

        def configure_model(self) -> None:
            if spec["kind"] == "fsdp_all":  # Lightning's FSDP2 over every rank: the strategy's shard policy
                from lightning_localsgd.transport.sharding import apply_shard_policy

                apply_shard_policy(self, self.device_mesh["data_parallel"], None, {})

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=cfg["lr"], momentum=0.9)

    class StepTimer(Callback):
        """Times every training batch; snapshots the counters around the measured window."""

        def __init__(self) -> None:
            self.times: list[float] = []  # every step, warm-up included
            self.step_bytes: list[float] = []  # counter bytes booked during each step (this rank)
            self.step_lo: list[int] = []  # rank 0: loopback tx bytes during each step (every rank's)
            self.start: dict[str, Any] = {}
            self.end: dict[str, Any] = {}
            self._t0 = 0.0
            self._bytes0 = 0.0
            self._lo0 = 0
            self.held: dict[str, int] = {}

        @staticmethod
        def snapshot(trainer: Trainer) -> dict[str, Any]:
            comm = getattr(trainer.strategy, "comm", None)
            c = comm.counters if comm is not None else None
            return {
                "lo": read_loopback_bytes() if reads_lo else None,
                "node": {"veth": read_interface_bytes(veth), "lo": read_loopback_bytes()} if reads_node else None,
                "counter_bytes": dict(c.bytes_by_purpose) if c else None,
                "counter_seconds": dict(c.seconds_by_purpose) if c else None,
                "counter_calls": dict(c.calls_by_purpose) if c else None,
                "perf_counter": time.perf_counter(),
            }

        @staticmethod
        def bytes_now(trainer: Trainer) -> float:
            comm = getattr(trainer.strategy, "comm", None)
            return comm.counters.bytes_sent if comm is not None else 0.0

        def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
            if trainer.global_step == warmup:  # first measured step: counters before the clock starts
                self.start = self.snapshot(trainer)
            self._bytes0 = self.bytes_now(trainer)
            lo = read_loopback_bytes() if reads_lo else None
            self._lo0 = lo[1] if lo else 0
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            self.times.append(time.perf_counter() - self._t0)
            self.step_bytes.append(self.bytes_now(trainer) - self._bytes0)
            lo = read_loopback_bytes() if reads_lo else None
            self.step_lo.append(lo[1] - self._lo0 if lo else 0)
            if trainer.global_step == total:  # last measured step done
                self.end = self.snapshot(trainer)
            if trainer.global_step > warmup:  # the tensors this rank holds: the largest count of the window
                now = held_bytes(trainer)
                self.held = {k: max(v, self.held.get(k, 0)) for k, v in now.items()}

    seed_everything(cfg["seed"], verbose=False)  # same initial model on every rank
    model = Net()
    kind = spec["kind"]
    callbacks: list[Any] = []
    if kind == "floor":
        strategy: Any = LocalSGDStrategy(sync_every=total + 1, timeout=timeout)
    elif kind == "fsdp_floor":  # FSDP2 inside each node, nothing across nodes in the window
        strategy = LocalSGDStrategy(sync_every=total + 1, within_node="fsdp", timeout=timeout)
    elif kind == "fsdp_all":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, timeout=timeout)
    elif kind == "localsgd" and "algorithm" in spec:
        from lightning_localsgd import DiLoCo, PeriodicAveraging

        algorithm_cls = PeriodicAveraging if spec["algorithm"] == "periodic" else DiLoCo
        callbacks.append(algorithm_cls(spec["H"], fragments=spec["fragments"], overlap_steps=spec["overlap_steps"]))
        if spec.get("within_node"):  # replica groups: one replica per node
            strategy = LocalSGDStrategy(within_node=spec["within_node"], comm_dtype=spec["comm_dtype"], timeout=timeout)
        else:
            strategy = LocalSGDStrategy(comm_dtype=spec["comm_dtype"], timeout=timeout)
    elif kind == "localsgd":
        strategy = LocalSGDStrategy(sync_every=spec["H"], comm_dtype=spec["comm_dtype"], timeout=timeout)
    elif kind in ("ddp", "node_ddp"):  # node_ddp: the same, in a job of this node's ranks only
        strategy = DDPStrategy(timeout=timeout)
    elif kind == "postlocal":
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
            PostLocalSGDState,
            post_localSGD_hook,
        )

        strategy = DDPStrategy(
            ddp_comm_state=PostLocalSGDState(
                process_group=None, subgroup=None, start_localSGD_iter=cfg["postlocal_start"]
            ),
            ddp_comm_hook=post_localSGD_hook,
            model_averaging_period=spec["period"],
            timeout=timeout,
        )
    else:
        raise ValueError(kind)

    timer = StepTimer()
    trainer = Trainer(
        devices=per_node,  # one node: every rank (world)
        num_nodes=world // per_node,
        strategy=strategy,
        max_steps=total,
        callbacks=[timer, *callbacks],
        **QUIET_TRAINER,
    )
    seed_everything(cfg["seed"] + rank, verbose=False)
    trainer.fit(model, torch.utils.data.DataLoader(Batches(), batch_size=None))
    if not timer.end:
        raise RuntimeError(f"the run stopped at step {trainer.global_step} before the measured window ended")

    def delta(key: str) -> dict[str, float] | None:
        a, b = timer.start[key], timer.end[key]
        if a is None or b is None:
            return None
        return {k: b[k] - a.get(k, 0) for k in b if b[k] - a.get(k, 0) != 0}

    lo = None
    if timer.start["lo"] is not None and timer.end["lo"] is not None:
        lo = {"rx": timer.end["lo"][0] - timer.start["lo"][0], "tx": timer.end["lo"][1] - timer.start["lo"][1]}
    params = [p for p in model.parameters() if p.requires_grad]
    extra: dict[str, Any] = {}
    if two_nodes:
        extra["node"] = node
        if reads_node:
            a, b = timer.start["node"], timer.end["node"]
            extra["node_bytes"] = {
                path: {"rx": b[path][0] - a[path][0], "tx": b[path][1] - a[path][1]}
                for path in ("veth", "lo")
                if a[path] is not None and b[path] is not None
            }
    return {
        **extra,
        "rank": rank,
        "step_times_all": timer.times,
        "step_times": timer.times[warmup:],
        "step_bytes": timer.step_bytes[warmup:],
        "step_lo_bytes": timer.step_lo[warmup:] if reads_lo else None,
        "wait_seconds": trainer.strategy.comm.counters.wait_seconds if hasattr(trainer.strategy, "comm") else None,
        "window_seconds": timer.end["perf_counter"] - timer.start["perf_counter"],
        "lo_bytes": lo,
        "counter_bytes": delta("counter_bytes"),
        "counter_seconds": delta("counter_seconds"),
        "counter_calls": delta("counter_calls"),
        "held_bytes": timer.held,
        "num_params": sum(p.numel() for p in params),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "num_float_buffers": sum(b.numel() for b in model.buffers() if b.is_floating_point()),
        "tuning": getattr(getattr(trainer.strategy, "algorithm", None), "tuning_record", None),
    }


# ====================================================================== the parent process
def background_lo_rate(seconds: float) -> float | None:
    """Loopback tx bytes per second while no variant runs (other processes' traffic on lo)."""
    if seconds <= 0:
        return None
    a = read_loopback_bytes()
    time.sleep(seconds)
    b = read_loopback_bytes()
    return None if a is None or b is None else (b[1] - a[1]) / seconds


def summarize(name: str, spec: dict[str, Any], runs: list[dict[str, Any]], steps: int, world: int) -> dict[str, Any]:
    """Pool the repeats of one variant."""
    ok = [r for r in runs if r["ranks"] is not None]
    out: dict[str, Any] = {"variant": name, "spec": spec, "repeats_ok": len(ok), "repeats": len(runs)}
    if not ok:
        return out
    pooled = [t for r in ok for rank in r["ranks"] for t in rank["step_times"]]
    per_rank_means = [statistics.fmean(rank["step_times"]) for r in ok for rank in r["ranks"]]
    out["step_time_mean_s"] = statistics.fmean(pooled)
    # the job's pace: the slowest rank's mean step of each repeat (ranks that sync share it; the floor's
    # ranks never wait for each other, so its pooled mean is faster than any job of those ranks can finish)
    out["slowest_rank_step_time_s"] = statistics.fmean(
        max(statistics.fmean(rank["step_times"]) for rank in r["ranks"]) for r in ok
    )
    out["step_time_median_s"] = statistics.median(pooled)
    out["step_time_stdev_s"] = statistics.stdev(pooled) if len(pooled) > 1 else 0.0
    out["step_time_rank_means_s"] = per_rank_means
    out["wall_per_step_s"] = statistics.fmean(r["ranks"][0]["window_seconds"] / steps for r in ok)
    measured = steps * len(ok)
    # library counter: mean over ranks of each rank's bytes sent
    if all(rank["counter_bytes"] is not None for r in ok for rank in r["ranks"]):
        per_rank = [sum(rank["counter_bytes"].values()) for r in ok for rank in r["ranks"]]
        out["counter_bytes_per_step"] = statistics.fmean(per_rank) / steps
        kinds: dict[str, float] = {}
        secs: dict[str, float] = {}
        calls: dict[str, float] = {}
        for r in ok:
            for rank in r["ranks"]:
                for k, v in rank["counter_bytes"].items():
                    kinds[k] = kinds.get(k, 0.0) + v / (world * measured)
                for k, v in (rank["counter_seconds"] or {}).items():
                    secs[k] = secs.get(k, 0.0) + v / (world * measured)
                for k, v in (rank["counter_calls"] or {}).items():
                    calls[k] = calls.get(k, 0.0) + v / (world * measured)
        out["counter_bytes_per_step_by_kind"] = kinds
        out["counter_seconds_per_step_by_kind"] = secs
        out["counter_calls_per_step_by_kind"] = calls
    else:
        out["counter_bytes_per_step"] = None
    # loopback: rank 0's reading of the machine-wide counter, divided by world (every rank's sends)
    los = [r["ranks"][0]["lo_bytes"] for r in ok]
    if all(lo is not None for lo in los):
        tx = sum(lo["tx"] for lo in los)
        out["lo_tx_bytes_total"] = tx
        out["lo_bytes_per_step_per_rank"] = tx / measured / world
        rates = [r["background_lo_bytes_per_s"] for r in ok if r["background_lo_bytes_per_s"] is not None]
        if rates:
            window = statistics.fmean(r["ranks"][0]["window_seconds"] for r in ok)
            out["lo_background_bytes_per_step_per_rank_estimate"] = statistics.fmean(rates) * window / steps / world
    else:
        out["lo_bytes_per_step_per_rank"] = None
    # the largest single step's bytes: what fragments are for
    out["peak_counter_bytes_per_step"] = max(
        (max(rank["step_bytes"]) for r in ok for rank in r["ranks"] if rank.get("step_bytes")), default=None
    )
    peaks_lo = [max(r["ranks"][0]["step_lo_bytes"]) / world for r in ok if r["ranks"][0].get("step_lo_bytes")]
    out["peak_lo_bytes_per_step_per_rank"] = max(peaks_lo) if peaks_lo else None
    waits = [rank["wait_seconds"] for r in ok for rank in r["ranks"] if rank.get("wait_seconds") is not None]
    out["wait_seconds_total_mean_over_ranks"] = statistics.fmean(waits) if waits else None
    if spec["kind"] == "localsgd" and isinstance(spec["H"], int):  # "auto": the schedule is the tuner's
        # steps that ended with a sync landing (global step s, 1-based, is step_times_all[s - 1]) vs the others
        h, warmup = spec["H"], len(ok[0]["ranks"][0]["step_times_all"]) - steps
        window = range(warmup + 1, warmup + steps + 1)
        p_, tau = spec.get("fragments", 1), spec.get("overlap_steps", 0)
        landing = {(k + 1) * h // p_ + tau for k in range(p_)}
        lands = lambda s: any(s >= o and (s - o) % h == 0 for o in landing)  # noqa: E731
        sync_t = [r_["step_times_all"][s - 1] for r in ok for r_ in r["ranks"] for s in window if lands(s)]
        local_t = [r_["step_times_all"][s - 1] for r in ok for r_ in r["ranks"] for s in window if not lands(s)]
        if sync_t:
            out["sync_step_time_mean_s"] = statistics.fmean(sync_t)
            out["local_step_time_mean_s"] = statistics.fmean(local_t) if local_t else None
            n_sync = len(sync_t) / world  # sync steps per rank, all repeats
            coll = out.get("counter_seconds_per_step_by_kind", {}).get("sync")
            out["collective_seconds_per_sync"] = coll * measured / n_sync if coll is not None else None
    # two nodes: each node's first rank read its veth (cross-node) and loopback (intra-node) over the window
    nodes = [rank["node_bytes"] for r in ok for rank in r["ranks"] if rank.get("node_bytes")]
    if nodes:
        per_node = world // len({rank.get("node", 0) for rank in ok[0]["ranks"]})
        for key, path in (("cross_node", "veth"), ("intra_node", "lo")):
            by_node = [n[path]["tx"] / steps for n in nodes if path in n]
            out[f"{key}_bytes_per_step_per_node"] = statistics.fmean(by_node) if by_node else None
            out[f"{key}_bytes_per_step_by_node"] = by_node
        if out.get("counter_bytes_per_step") is not None:
            out["counter_bytes_per_step_per_node"] = out["counter_bytes_per_step"] * per_node
    helds = [rank["held_bytes"] for r in ok for rank in r["ranks"] if rank.get("held_bytes")]
    if helds:  # the tensors one rank holds (benchmarks.common.held_bytes), the largest rank
        out["held_bytes_max_rank"] = {k: max(h[k] for h in helds) for k in helds[0]}
        out["held_state_bytes_max_rank"] = max(h["model"] + h["optimizer"] + h["algorithm"] for h in helds)
    first = ok[0]["ranks"][0]
    out["num_params"] = first["num_params"]
    out["param_bytes"] = first["param_bytes"]
    out["num_float_buffers"] = first["num_float_buffers"]
    if spec["kind"] == "localsgd" and not spec.get("within_node") and isinstance(spec["H"], int):
        per_value = {"bfloat16": 0.5, "int8": (1 + 4 / 128) / 4, "int4": (0.5 + 4 / 128) / 4}
        out["expected_bytes_ratio_vs_ddp"] = per_value.get(spec["comm_dtype"], 1.0) / spec["H"]
    elif spec["kind"] == "floor":
        out["expected_bytes_ratio_vs_ddp"] = 0.0
    return out


def add_ratios(summary: dict[str, dict[str, Any]], world: int) -> dict[str, Any]:
    """Step time / floor's and bytes per step / DDP's, in place; returns the targets' verdicts."""
    floor = summary.get("floor", {})
    ddp = summary.get("ddp", {})
    node_ddp = summary.get("node_ddp", {})
    fsdp_floor = summary.get("fsdp_floor", {})
    ddp_estimate = None
    any_ok = next((s for s in summary.values() if "param_bytes" in s), None)
    if any_ok is not None:
        # what the library's counter formula books for one fp32 gradient allreduce per step (ring)
        ddp_estimate = 2.0 * (world - 1) / world * any_ok["param_bytes"]
    for s in summary.values():
        if "step_time_mean_s" not in s:
            continue
        if "step_time_mean_s" in floor:
            s["step_time_ratio_mean_vs_floor"] = s["step_time_mean_s"] / floor["step_time_mean_s"]
            s["step_time_ratio_median_vs_floor"] = s["step_time_median_s"] / floor["step_time_median_s"]
        if s.get("slowest_rank_step_time_s") and floor.get("slowest_rank_step_time_s"):
            s["step_time_ratio_slowest_rank_vs_floor"] = (
                s["slowest_rank_step_time_s"] / floor["slowest_rank_step_time_s"]
            )
        if s.get("slowest_rank_step_time_s") and node_ddp.get("slowest_rank_step_time_s"):  # --nodes 2
            s["step_time_ratio_slowest_rank_vs_node_ddp"] = (
                s["slowest_rank_step_time_s"] / node_ddp["slowest_rank_step_time_s"]
            )
            s["step_time_ratio_mean_vs_node_ddp"] = s["step_time_mean_s"] / node_ddp["step_time_mean_s"]
        if s.get("slowest_rank_step_time_s") and fsdp_floor.get("slowest_rank_step_time_s"):  # sharded replicas
            s["step_time_ratio_slowest_rank_vs_fsdp_floor"] = (
                s["slowest_rank_step_time_s"] / fsdp_floor["slowest_rank_step_time_s"]
            )
            s["step_time_ratio_mean_vs_fsdp_floor"] = s["step_time_mean_s"] / fsdp_floor["step_time_mean_s"]
        lo, ddp_lo = s.get("lo_bytes_per_step_per_rank"), ddp.get("lo_bytes_per_step_per_rank")
        if lo is not None and ddp_lo:
            s["bytes_ratio_lo_vs_ddp"] = lo / ddp_lo
        if s.get("counter_bytes_per_step") is not None and ddp_estimate:
            s["bytes_ratio_counter_vs_ddp_estimate"] = s["counter_bytes_per_step"] / ddp_estimate
        if s.get("counter_bytes_per_step") and lo is not None:
            s["lo_over_counter"] = lo / s["counter_bytes_per_step"]
        if "sync_step_time_mean_s" in s:
            # what a sync adds to its step, against the same run's local steps (or the floor's for H=1),
            # split into time inside the collective and the rest (flatten, checks, copies, casts)
            base = s.get("local_step_time_mean_s") or floor.get("step_time_mean_s")
            if base is not None:
                s["sync_extra_seconds"] = s["sync_step_time_mean_s"] - base
                if s.get("collective_seconds_per_sync") is not None:
                    s["sync_extra_outside_collective_seconds"] = (
                        s["sync_extra_seconds"] - s["collective_seconds_per_sync"]
                    )
    targets: dict[str, Any] = {"ddp_bytes_per_step_estimate": ddp_estimate}
    if ddp.get("cross_node_bytes_per_step_per_node") is not None and ddp_estimate:
        # gloo's ring over ranks 0..m-1 laid out node by node: each node's veth carries one rank's ring
        # traffic (its last rank's sends to the next node), its loopback the sends between its own ranks
        targets["ddp_two_node_paths_vs_ring"] = {
            "ring_estimate_bytes": ddp_estimate,
            "cross_node_bytes_per_step_per_node": ddp["cross_node_bytes_per_step_per_node"],
            "intra_node_bytes_per_step_per_node": ddp.get("intra_node_bytes_per_step_per_node"),
            "cross_over_ring": ddp["cross_node_bytes_per_step_per_node"] / ddp_estimate,
            "intra_over_ring_times_links": (ddp.get("intra_node_bytes_per_step_per_node") or 0.0)
            / (ddp_estimate * max(1, world // 2 - 1)),
        }
    h8 = summary.get("localsgd_H8", {})
    if "step_time_ratio_mean_vs_floor" in h8:
        targets["localsgd_H8_step_time_vs_floor"] = {
            "target": "<= 1.10",
            "mean": h8["step_time_ratio_mean_vs_floor"],
            "median": h8["step_time_ratio_median_vs_floor"],
            "met_mean": h8["step_time_ratio_mean_vs_floor"] <= 1.10,
            "met_median": h8["step_time_ratio_median_vs_floor"] <= 1.10,
        }
    targets["bytes_1_over_H"] = {
        name: {
            "expected": s["expected_bytes_ratio_vs_ddp"],
            "lo": s.get("bytes_ratio_lo_vs_ddp"),
            "counter": s.get("bytes_ratio_counter_vs_ddp_estimate"),
        }
        for name, s in summary.items()
        if s.get("spec", {}).get("kind") == "localsgd" and "expected_bytes_ratio_vs_ddp" in s
    }
    for name, s in summary.items():
        spec = s.get("spec", {})
        if spec.get("overlap_steps") and "step_time_ratio_mean_vs_floor" in s:
            targets[f"{name}_step_time_vs_floor"] = {
                "mean": s["step_time_ratio_mean_vs_floor"],
                "median": s["step_time_ratio_median_vs_floor"],
                "slowest_rank": s.get("step_time_ratio_slowest_rank_vs_floor"),
            }
        if isinstance(spec.get("fragments", 1), int) and spec.get("fragments", 1) > 1:
            full = summary.get(f"localsgd_H{spec['H']}", {})
            whole = 2.0 * (world - 1) / world * s.get("param_bytes", 0) + 8.0 * (world - 1)  # one full fp32 sync
            targets[f"{name}_peak_bytes_vs_full_sync"] = {
                "target": 1 / spec["fragments"],
                "counter": s["peak_counter_bytes_per_step"] / whole if s.get("peak_counter_bytes_per_step") else None,
                "lo": (
                    s["peak_lo_bytes_per_step_per_rank"] / full["peak_lo_bytes_per_step_per_rank"]
                    if s.get("peak_lo_bytes_per_step_per_rank") and full.get("peak_lo_bytes_per_step_per_rank")
                    else None
                ),
            }
        if spec.get("comm_dtype") in ("bfloat16", "int8", "int4"):
            stem = name.rsplit("_", 1)[0] if name.endswith((spec["comm_dtype"], "bf16")) else name
            fp32 = summary.get(stem, {}) or summary.get(f"localsgd_H{spec['H']}", {})
            pair: dict[str, Any] = {
                "target": {"bfloat16": 0.5, "int8": 0.29, "int4": 0.15}[spec["comm_dtype"]],
                "against": stem if stem in summary else f"localsgd_H{spec['H']}",
            }
            if s.get("counter_bytes_per_step") and fp32.get("counter_bytes_per_step"):
                pair["counter"] = s["counter_bytes_per_step"] / fp32["counter_bytes_per_step"]
            if s.get("lo_bytes_per_step_per_rank") and fp32.get("lo_bytes_per_step_per_rank"):
                pair["lo"] = s["lo_bytes_per_step_per_rank"] / fp32["lo_bytes_per_step_per_rank"]
            targets[f"{name}_bytes_vs_fp32"] = pair
    return targets


# ====================================================================== output
def table(summary: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'variant':<20} {'mean ms':>8} {'median':>8} {'x floor':>8} {'(med)':>6} {'slowest':>8} {'x floor':>8} "
        f"{'counter MB/step':>15} {'lo MB/step/rank':>15} {'bytes x DDP lo':>14} {'counter':>8} {'expected':>8} "
        f"{'lo/ctr':>6}"
    )
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        if "step_time_mean_s" not in s:
            lines.append(f"{name:<20} FAILED")
            continue
        lines.append(
            f"{name:<20} {fmt(s['step_time_mean_s'], 1e3, 1):>8} {fmt(s['step_time_median_s'], 1e3, 1):>8} "
            f"{fmt(s.get('step_time_ratio_mean_vs_floor')):>8} "
            f"{fmt(s.get('step_time_ratio_median_vs_floor'), 1, 2):>6} "
            f"{fmt(s.get('slowest_rank_step_time_s'), 1e3, 1):>8} "
            f"{fmt(s.get('step_time_ratio_slowest_rank_vs_floor')):>8} "
            f"{fmt(s.get('counter_bytes_per_step'), 1e-6, 3):>15} "
            f"{fmt(s.get('lo_bytes_per_step_per_rank'), 1e-6, 3):>15} "
            f"{fmt(s.get('bytes_ratio_lo_vs_ddp'), 1, 4):>14} "
            f"{fmt(s.get('bytes_ratio_counter_vs_ddp_estimate'), 1, 4):>8} "
            f"{fmt(s.get('expected_bytes_ratio_vs_ddp'), 1, 4):>8} {fmt(s.get('lo_over_counter'), 1, 3):>6}"
        )
    return "\n".join(lines)


def table_two_nodes(summary: dict[str, dict[str, Any]]) -> str:
    """The ``--nodes 2`` table: step time against the floor and node-local DDP, bytes per path."""
    head = (
        f"{'variant':<24} {'slowest ms':>10} {'x floor':>8} {'x node_ddp':>10} {'x fsdp_floor':>12} {'mean ms':>8} "
        f"{'cross MB/step/node':>18} {'intra MB/step/node':>18} {'counter MB/step/rank':>20} {'(per node)':>10} "
        f"{'state MB/rank':>13}"
    )
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        if "step_time_mean_s" not in s:
            lines.append(f"{name:<24} FAILED")
            continue
        lines.append(
            f"{name:<24} {fmt(s.get('slowest_rank_step_time_s'), 1e3, 1):>10} "
            f"{fmt(s.get('step_time_ratio_slowest_rank_vs_floor')):>8} "
            f"{fmt(s.get('step_time_ratio_slowest_rank_vs_node_ddp')):>10} "
            f"{fmt(s.get('step_time_ratio_slowest_rank_vs_fsdp_floor')):>12} "
            f"{fmt(s['step_time_mean_s'], 1e3, 1):>8} "
            f"{fmt(s.get('cross_node_bytes_per_step_per_node'), 1e-6, 3):>18} "
            f"{fmt(s.get('intra_node_bytes_per_step_per_node'), 1e-6, 3):>18} "
            f"{fmt(s.get('counter_bytes_per_step'), 1e-6, 3):>20} "
            f"{fmt(s.get('counter_bytes_per_step_per_node'), 1e-6, 3):>10} "
            f"{fmt(s.get('held_state_bytes_max_rank'), 2**-20, 1):>13}"
        )
    return "\n".join(lines)


def plot_two_nodes(summary: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Step time against the floor and node-local DDP; bytes per step per node over each path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, s in summary.items() if "step_time_mean_s" in s]
    x = list(range(len(names)))
    w = 0.38
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for off, key, color, label in (
        (-w / 2, "step_time_ratio_slowest_rank_vs_floor", "tab:blue", "slowest rank ÷ floor"),
        (w / 2, "step_time_ratio_slowest_rank_vs_node_ddp", "tab:purple", "slowest rank ÷ node-local DDP"),
    ):
        values = [summary[n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        ax1.bar([i + off for i in x], [v or 0.0 for v in values], w, color=color, label=label)
        for i, v in zip(x, values):
            if v is not None:
                ax1.annotate(f"{v:.2f}", (i + off, v), ha="center", va="bottom", fontsize=7)
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set_xticks(x, names, rotation=30, ha="right")
    ax1.set_ylabel("step time ratio")
    ax1.set_title("Step time (lower is better)")
    ax1.legend(fontsize=8)
    low = 1e-3  # MB; smaller values are drawn at the bottom of the log axis
    for off, key, color, label in (
        (-w / 2, "cross_node_bytes_per_step_per_node", "tab:red", "cross-node (veth)"),
        (w / 2, "intra_node_bytes_per_step_per_node", "tab:green", "intra-node (loopback)"),
    ):
        values = [summary[n].get(key) for n in names]
        ax2.bar([i + off for i in x], [max((v or 0.0) / 1e6, low) for v in values], w, color=color, label=label)
    counter = [summary[n].get("counter_bytes_per_step_per_node") for n in names]
    ax2.plot(
        [i for i, c in zip(x, counter) if c],
        [c / 1e6 for c in counter if c],
        "kD",
        ms=4,
        label="library counter (all paths)",
    )
    ax2.set_yscale("log")
    ax2.set_ylim(low, None)
    ax2.set_xticks(x, names, rotation=30, ha="right")
    ax2.set_ylabel("MB per step per node (log)")
    ax2.set_title("Bytes per step per node, by path")
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_two_nodes(result: dict[str, Any], summary: dict[str, dict[str, Any]], json_path: Path, png: Path) -> None:
    """The ``--nodes 2`` part of :func:`report`: plot, table and the DDP check of the bytes per path."""
    cfg = result["config"]
    world, nodes = cfg["world"], cfg["nodes"]
    link = describe_node_link(cfg.get("link"))
    title = (
        f"{cfg['model']}, {cfg['image_size']}×{cfg['image_size']}, batch {cfg['batch_size']}/rank, {nodes} nodes × "
        f"{world // nodes} CPU ranks (gloo), {cfg['steps']} measured steps after {cfg['warmup']}, repeats "
        f"{cfg['repeats']}\nlink: {link}"
    )
    plot_two_nodes(summary, png, title)
    print(f"\nnodes: {nodes} × {world // nodes} ranks; link: {link}")
    print(table_two_nodes(summary))
    print(
        "\nslowest ms: the slowest rank's mean step; cross: veth tx of each node (sent to the other node); intra: "
        "each node's loopback tx; counter: the library's CommCounters (LocalSGDStrategy variants)"
    )
    check = result["targets"].get("ddp_two_node_paths_vs_ring")
    if check:
        print(
            f"ddp over {world} ranks: cross {fmt(check['cross_node_bytes_per_step_per_node'], 1e-6, 2)} MB/step/node, "
            f"intra {fmt(check['intra_node_bytes_per_step_per_node'], 1e-6, 2)} MB/step/node; ring estimate "
            f"2(m-1)/m*B = {fmt(check['ring_estimate_bytes'], 1e-6, 2)} MB per path (cross/ring "
            f"{check['cross_over_ring']:.3f}, intra/ring {check['intra_over_ring_times_links']:.3f})"
        )
    print(f"\nwrote {json_path}\nwrote {png}\ntotal {result['total_seconds']:.0f} s")


def plot(summary: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, s in summary.items() if "step_time_mean_s" in s]
    x = list(range(len(names)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))

    ratios = [summary[n].get("step_time_ratio_mean_vs_floor", float("nan")) for n in names]
    medians = [summary[n].get("step_time_ratio_median_vs_floor", float("nan")) for n in names]
    bars = ax1.bar(x, ratios, color="tab:blue", label="mean step time / floor")
    ax1.plot(x, medians, "kD", markersize=4, label="median / floor's median")
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.axhline(1.10, color="tab:red", ls="--", lw=1, label="target for H=8: 1.10")
    for b, r in zip(bars, ratios):
        if not math.isnan(r):
            ax1.annotate(
                f"{r:.2f}",
                (b.get_x() + b.get_width() / 2, r),
                xytext=(0, -4),
                textcoords="offset points",
                ha="center",
                va="top",
                fontsize=8,
                color="white",
            )
    finite = [r for r in ratios + medians if not math.isnan(r)]
    ax1.set_ylim(0, max([*finite, 1.1]) * 1.3)
    ax1.set_xticks(x, names, rotation=30, ha="right")
    ax1.set_ylabel("step time ÷ floor's")
    ax1.set_title("Step time (lower is better)")
    ax1.legend(fontsize=8, loc="upper right")

    w = 0.38
    lo = [summary[n].get("bytes_ratio_lo_vs_ddp") for n in names]
    ctr = [summary[n].get("bytes_ratio_counter_vs_ddp_estimate") for n in names]
    exp = [summary[n].get("expected_bytes_ratio_vs_ddp") for n in names]
    positive = [v for v in exp if v is not None and v > 0]
    floor_y = min([*positive, 0.1]) / 4  # bottom of the log axis; smaller values are drawn as "≈0"
    for i, (a, c, e) in enumerate(zip(lo, ctr, exp)):
        for off, v, color, label in (
            (-w / 2, a, "tab:green", "loopback (/proc/net/dev)"),
            (w / 2, c, "tab:orange", "library counter"),
        ):
            if v is None:
                continue
            shown = max(v, floor_y)
            ax2.bar(
                i + off,
                shown,
                w,
                color=color,
                label=label if i == 0 or label not in ax2.get_legend_handles_labels()[1] else None,
            )
            text = f"{v:.3g}" if v >= floor_y else "≈0"
            ax2.annotate(text, (i + off, shown), ha="center", va="bottom", fontsize=7, rotation=90)
        if e is not None and e > 0:
            ax2.plot(
                [i - w, i + w],
                [e, e],
                color="black",
                lw=1.5,
                label="expected (1/H, ×½ for bf16)"
                if "expected (1/H, ×½ for bf16)" not in ax2.get_legend_handles_labels()[1]
                else None,
            )
    ax2.set_yscale("log")
    ax2.set_ylim(floor_y, 40)
    ax2.set_xticks(x, names, rotation=30, ha="right")
    ax2.set_ylabel("bytes per step ÷ DDP's")
    ax2.set_title("Bytes per step per rank (log scale)")
    ax2.legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ====================================================================== CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.step_time",
        description="Step time and bytes per step: floor, DDP, Lightning post-local SGD, LocalSGDStrategy.",
    )
    p.add_argument("--name", default="step_time", help="results go to benchmarks/results/<name>/")
    p.add_argument("--steps", type=int, default=128, help="measured optimizer steps (a multiple of every H)")
    p.add_argument("--warmup", type=int, default=8, help="unmeasured optimizer steps first")
    p.add_argument("--repeats", type=int, default=1, help="run the whole list this many times (order rotated)")
    p.add_argument(
        "--world",
        type=int,
        default=None,
        help="processes per variant (default 2: one node, gloo, 127.0.0.1; with --nodes 2: 4, as 2 nodes x 2)",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=1,
        choices=(1, 2),
        help="2: two simulated nodes (network namespaces joined by a veth shaped at --link); see the docstring",
    )
    p.add_argument("--variants", default=None, help="comma-separated subset of the variant names (default: all)")
    p.add_argument("--hs", default="1,8,64", help="sync periods H of the LocalSGDStrategy variants")
    p.add_argument("--bf16-h", default="8", help="H of the comm_dtype='bfloat16' variants ('' for none)")
    p.add_argument("--postlocal-period", type=int, default=8, help="model_averaging_period of post-local SGD")
    p.add_argument("--postlocal-start", type=int, default=None, help="start_localSGD_iter K (default: --warmup)")
    p.add_argument("--model", default="resnet18", help="timm model name (random init)")
    p.add_argument(
        "--model-kwargs", default="{}", help="JSON arguments of timm.create_model, e.g. '{\"patch_size\": 8}'"
    )
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--idle-probe", type=float, default=1.0, help="seconds to sample background lo traffic before each variant"
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds per variant launch (default: 120 + 2 s/step)")
    p.add_argument("--collective-timeout", type=float, default=300.0, help="seconds, every collective")
    p.add_argument(
        "--link", default=None, help="run the ranks behind a shaped loopback of this rate, e.g. 1gbit, 100mbit"
    )
    p.add_argument(
        "--report-only", action="store_true", help="redo table, ratios and plot from results/<name>/step_time.json"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_rank_from_file(args.worker, run_rank)
        return 0
    out_dir = RESULTS / args.name
    if args.report_only:
        result = json.loads((out_dir / "step_time.json").read_text())
        report(result, out_dir)
        return 0
    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]  # noqa: E731
    hs, bf16_h = ints(args.hs), ints(args.bf16_h)
    two_nodes = args.nodes > 1
    if args.world is None:
        args.world = 4 if two_nodes else 2
    specs = variant_specs(hs, bf16_h, args.postlocal_period)
    if two_nodes:
        specs["node_ddp"] = {"kind": "node_ddp"}
        specs["fsdp_floor"] = {"kind": "fsdp_floor", "within_node": "fsdp"}
        specs["fsdp_all"] = {"kind": "fsdp_all"}
    default = TWO_NODE_VARIANTS if two_nodes and not args.variants else args.variants
    names = list(specs) if not default else [v.strip() for v in default.split(",") if v.strip()]
    for n in names:
        if n not in specs and parse_variant(n) is not None:
            specs[n] = parse_variant(n)
    unknown = [n for n in names if n not in specs]
    if unknown:
        print(
            f"unknown variant(s) {unknown}; choose from {list(specs)} or spell one as "
            "[groups_]{localsgd|diloco}_H<h>[_P<fragments>][_tau<overlap>][_<bf16|int8|int4>]",
            file=sys.stderr,
        )
        return 2
    node_only = [n for n in names if n in ("node_ddp", "fsdp_all") or specs[n].get("within_node")]
    if node_only and not two_nodes:
        print(f"{node_only} compare nodes: run them with --nodes 2", file=sys.stderr)
        return 2
    if args.link is not None or two_nodes:
        try:
            check_link_support(*(("two simulated nodes", "drop --nodes") if two_nodes else ()))
        except LinkUnavailable as err:
            print(f"skipped: {err}", file=sys.stderr)
            return 0
    if args.steps < 1 or args.warmup < 0 or args.world < 2 or args.repeats < 1:
        print("need --steps >= 1, --warmup >= 0, --world >= 2, --repeats >= 1", file=sys.stderr)
        return 2
    if args.world % args.nodes:
        print(f"--world {args.world} must be a multiple of --nodes {args.nodes}", file=sys.stderr)
        return 2
    periods = {
        n: specs[n].get("H") or specs[n].get("period") for n in names if specs[n]["kind"] in ("localsgd", "postlocal")
    }
    periods = {n: h for n, h in periods.items() if isinstance(h, int)}  # "auto": the tuner's
    uneven = {n: h for n, h in periods.items() if args.steps % h}
    if uneven:
        print(
            f"note: --steps {args.steps} is not a multiple of the period of {uneven}: their bytes per step "
            "are not exactly 1/H of DDP's (the window holds a whole number of syncs)"
        )
    postlocal_start = args.warmup if args.postlocal_start is None else args.postlocal_start
    timeout = args.timeout if args.timeout is not None else 120.0 + 2.0 * (args.steps + args.warmup)
    base_cfg = {
        "warmup": args.warmup,
        "steps": args.steps,
        "model": args.model,
        "model_kwargs": json.loads(args.model_kwargs),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "num_classes": args.num_classes,
        "lr": args.lr,
        "seed": args.seed,
        "postlocal_start": postlocal_start,
        "collective_timeout": args.collective_timeout,
        "nodes": args.nodes,
        "link": args.link,
    }
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.time()
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    failures: list[str] = []
    for rep in range(args.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            # two nodes: the namespaces are private, nothing else talks there
            bg = background_lo_rate(args.idle_probe) if not two_nodes else None
            load = loadavg()
            t = time.time()
            traffic: dict[str, Any] = {}
            ranks, logs = launch_ranks(
                "benchmarks.step_time",
                dict(base_cfg, variant=specs[name]),
                args.world,
                args.nodes,
                timeout=timeout,
                link=args.link,
                node_namespaces=two_nodes,
                independent_nodes=specs[name]["kind"] == "node_ddp",
                traffic=traffic,
            )
            elapsed = time.time() - t
            runs[name].append(
                {
                    "repeat": rep,
                    "launch_seconds": elapsed,
                    "loadavg_before": load,
                    "background_lo_bytes_per_s": bg,
                    "ranks": ranks,
                    "error": logs or None,
                    **({"traffic": traffic} if two_nodes else {}),  # the whole launch's bytes per path
                }
            )
            status = "ok" if ranks is not None else "FAILED"
            print(f"[repeat {rep + 1}/{args.repeats}] {name:<20} {status} in {elapsed:.1f} s", flush=True)
            if ranks is None:
                failures.append(name)
                print(logs, file=sys.stderr)

    result = {
        "benchmark": "step_time",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": time.time() - started,
        "config": dict(
            base_cfg,
            world=args.world,
            repeats=args.repeats,
            variants=names,
            specs={n: specs[n] for n in names},
            hs=hs,
            bf16_h=bf16_h,
            postlocal_period=args.postlocal_period,
            momentum=0.9,
            optimizer="SGD",
            data="synthetic randn, a pool of 8 batches per rank",
        ),
        "environment": dict(
            environment("timm", link=args.link), **({"link": describe_node_link(args.link)} if two_nodes else {})
        ),
        "notes": NOTES,
        "runs": runs,
    }
    report(result, out_dir)
    return 1 if failures else 0


NOTES = {
    "floor": "LocalSGDStrategy(sync_every=warmup+steps+1): same processes and code path, no collective "
    "inside the measured window (one setup broadcast before it, one final average after it)",
    "step_time": "perf_counter from on_train_batch_start to on_train_batch_end on every rank, warm-up "
    "steps excluded; mean/median pool every measured step of every rank and repeat",
    "slowest_rank_step_time_s": "per repeat the largest of the ranks' mean step times, averaged over repeats: the "
    "pace of the job. Ranks that synchronize share one pace; the floor's ranks never wait for each other, and "
    "when the cores run at different speeds its pooled mean is faster than the job itself",
    "counter_bytes_per_step": "strategy.comm.counters.bytes_sent delta over the window / steps, mean over "
    "ranks (estimated bytes one rank sends; ring formula 2(m-1)/m*B for an allreduce)",
    "lo_bytes_per_step_per_rank": "rank 0 reads the lo tx bytes of /proc/net/dev before the first and after "
    "the last measured step; every rank's sends cross lo once, so delta / steps / world. Includes TCP/IP "
    "headers, gloo control messages and any other process's loopback traffic in that window "
    "(see lo_background_bytes_per_step_per_rank_estimate)",
    "bytes_ratio_counter_vs_ddp_estimate": "counter bytes / (2(m-1)/m * fp32 parameter bytes): the library's "
    "formula applied to DDP's one gradient allreduce per step, since DDP has no library counter",
    "sync_extra_seconds": "LocalSGD variants: mean time of the steps that ended with a sync minus the mean of the "
    "other measured steps (the floor's mean for H=1); sync_extra_outside_collective_seconds subtracts the time "
    "the counter saw inside the allreduce (flatten, finiteness check, casts, copies)",
}


def report(result: dict[str, Any], out_dir: Path) -> None:
    """Summaries, ratios, JSON, PNG and the printed table from the raw ``result["runs"]``."""
    cfg = result["config"]
    steps, world = cfg["steps"], cfg["world"]
    runs = result["runs"]
    summary = {n: summarize(n, cfg["specs"][n], runs[n], steps, world) for n in cfg["variants"]}
    result["targets"] = add_ratios(summary, world)
    result["summary"] = summary
    json_path = out_dir / "step_time.json"
    json_path.write_text(json.dumps(result, indent=1))
    png_path = out_dir / "step_time.png"
    if cfg.get("nodes", 1) > 1:
        report_two_nodes(result, summary, json_path, png_path)
        return
    link = describe_link(cfg.get("link"))
    title = (
        f"{cfg['model']}, {cfg['image_size']}×{cfg['image_size']}, batch {cfg['batch_size']}/rank, {world} CPU "
        f"ranks (gloo), {steps} measured steps after {cfg['warmup']}, repeats {cfg['repeats']}\nlink: {link}"
    )
    plot(summary, png_path, title)
    targets = result["targets"]
    print(f"\nlink: {link}")
    print(table(summary))
    print()
    h8 = targets.get("localsgd_H8_step_time_vs_floor")
    if h8:
        print(f"target LocalSGD H=8 step time <= 1.10x floor: mean {h8['mean']:.3f}x, median {h8['median']:.3f}x")
    for name, v in targets.get("bytes_1_over_H", {}).items():
        print(
            f"target {name} bytes/step vs DDP: expected {v['expected']:.4f}, lo {fmt(v['lo'], 1, 4)}, "
            f"counter {fmt(v['counter'], 1, 4)}"
        )
    for key, v in targets.items():
        if key.endswith("_bytes_vs_fp32"):
            print(
                f"target {key} (vs {v['against']}): <= {v['target']}, counter {fmt(v.get('counter'), 1, 3)}, "
                f"lo {fmt(v.get('lo'), 1, 3)}"
            )
        elif key.endswith("_peak_bytes_vs_full_sync"):
            print(
                f"target {key}: <= {v['target']:.3f}, counter {fmt(v.get('counter'), 1, 3)}, "
                f"lo {fmt(v.get('lo'), 1, 3)}"
            )
        elif key.endswith("_step_time_vs_floor") and key != "localsgd_H8_step_time_vs_floor":
            print(
                f"{key}: mean {v['mean']:.3f}x, median {v['median']:.3f}x, "
                f"slowest rank {fmt(v.get('slowest_rank'), 1, 3)}x"
            )
    for name, s in summary.items():
        if "sync_extra_seconds" in s:
            print(
                f"sync cost {name}: a sync step takes {fmt(s['sync_extra_seconds'], 1e3, 1)} ms longer, "
                f"{fmt(s.get('collective_seconds_per_sync'), 1e3, 1)} ms of it inside the allreduce, "
                f"{fmt(s.get('sync_extra_outside_collective_seconds'), 1e3, 1)} ms outside"
            )
    print(f"\nwrote {json_path}\nwrote {png_path}\ntotal {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
