"""Start N ranks of a Python command on this machine, as a cluster launcher would (127.0.0.1).

Each process gets the environment Lightning's ``LightningEnvironment`` reads for externally created
processes (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``NODE_RANK``, ``LOCAL_RANK``), so
``Trainer(devices=per_node, num_nodes=nodes, strategy="localsgd")`` in the command joins one
process group; ``nodes > 1`` emulates several nodes on one machine. Used by the multi-process
tests, the benchmarks and the demo; handy for trying the library on a laptop.

**A slow link.** ``run_local_ranks(..., link="1gbit")`` (and :func:`shaped_link` for any command)
runs the ranks inside a private network namespace whose loopback is shaped by the kernel's token
bucket filter, so every byte between ranks crosses a link of that rate::

    ip netns add NS; ip netns exec NS ip link set lo up
    ip netns exec NS tc qdisc add dev lo root tbf rate 1gbit burst 256kb latency 200ms
    ip netns exec NS <the ranks>; ip netns del NS

This needs root and iproute2 (``ip``, ``tc``); without them :class:`LinkUnavailable` says so and
callers skip the shaped runs (nothing is faked). The namespace is removed when the block ends,
also on errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

# tbf parameters of every shaped link: a 256 KiB bucket (about 2 ms of line rate at 1 Gbit/s) and
# packets dropped after 200 ms in the queue.
LINK_BURST = "256kb"
LINK_LATENCY = "200ms"
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$", re.IGNORECASE)
_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


class LinkUnavailable(RuntimeError):
    """The shaped link cannot be built on this machine (not root, or no iproute2)."""


def link_bits_per_second(rate: str) -> float:
    """``"1gbit"`` → 1e9: the rate of a tc-style rate string (bit, kbit, mbit, gbit, tbit)."""
    match = _RATE.match(rate.strip())
    if match is None:
        raise ValueError(f"a link rate looks like '1gbit', '100mbit' or '500kbit' (tc units), got {rate!r}")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def describe_link(rate: str | None) -> str:
    """The link as printed in tables and plot titles."""
    if rate is None:
        return "loopback (unshaped)"
    return f"{rate} loopback (tc tbf, burst {LINK_BURST}, latency {LINK_LATENCY})"


def check_link_support() -> None:
    """Raise :class:`LinkUnavailable` with the reason when a shaped link cannot be built here."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise LinkUnavailable("a shaped link needs root (network namespaces and tc): run as root, or drop --link")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise LinkUnavailable(
            f"a shaped link needs iproute2 ({', '.join(missing)} not found): install it, or drop --link"
        )


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise LinkUnavailable(f"{' '.join(cmd)} failed: {done.stderr.strip() or done.stdout.strip()}")


@contextmanager
def shaped_link(rate: str | None) -> Iterator[list[str]]:
    """Yield the command prefix that runs a command behind a link of ``rate`` (``[]`` for ``None``).

    The namespace exists for the duration of the block; processes still inside it are killed and
    the namespace deleted on the way out, whatever happened inside.
    """
    if rate is None:
        yield []
        return
    link_bits_per_second(rate)  # validate before touching the system
    check_link_support()
    name = f"localsgd-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally below

    in_main_thread = True
    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: the caller handles signals
        in_main_thread = False
    try:
        _run(["ip", "netns", "add", name])
        _run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
        _run(
            [
                "ip",
                "netns",
                "exec",
                name,
                "tc",
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                LINK_BURST,
                "latency",
                LINK_LATENCY,
            ]
        )
        yield ["ip", "netns", "exec", name]
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def set_loopback(prefix: Sequence[str], up: bool) -> None:
    """Bring the loopback of the namespace behind ``prefix`` (what :func:`shaped_link` yielded) up or down.

    Down, every connection between the ranks inside stalls: a network partition. TCP retransmits
    until the link is up again (then the ranks go on) or a timeout gives up first.
    """
    if len(prefix) < 4 or list(prefix[:3]) != ["ip", "netns", "exec"]:
        raise ValueError(f"set_loopback needs the prefix shaped_link(rate) yields for a rate, got {list(prefix)!r}")
    _run(["ip", "netns", "exec", prefix[3], "ip", "link", "set", "lo", "up" if up else "down"])


CHECKOUT = Path(__file__).resolve().parents[1]
"""The folder that holds ``recipes/`` (with ``configs/`` and ``benchmarks/`` in a checkout)."""


def recipe_env() -> dict[str, str]:
    """The environment of one ``python -m recipes...`` process that starts its own ranks with
    Lightning's launcher: one compute thread, this checkout first on the path, and none of an outer
    launcher's rank variables (they would make Lightning think it was started by one)."""
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(CHECKOUT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "GROUP_RANK"):
        env.pop(key, None)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_loopback_bytes() -> tuple[int, int] | None:
    """``(rx_bytes, tx_bytes)`` of the loopback interface, or ``None`` where /proc/net/dev is missing."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, sep, rest = line.partition(":")
                if sep and name.strip() == "lo":
                    fields = rest.split()
                    return int(fields[0]), int(fields[8])
    except OSError:
        pass
    return None


def run_local_ranks(
    cmd: Sequence[str],
    world: int,
    nodes: int = 1,
    *,
    log_dir: str | Path,
    timeout: float,
    cwd: str | Path | None = None,
    pythonpath: str | Path | None = None,
    log_tail: int = 6000,
    link: str | None = None,
) -> None:
    """Run ``cmd`` as ``world`` ranks (``nodes`` × ``world // nodes``), one thread each, and wait.

    Every rank writes its output to ``log_dir/rank<r>.log``. If a rank fails or the whole run
    exceeds ``timeout`` seconds, every rank is killed and ``RuntimeError`` carries the tail of each
    rank's log: a hang fails, it never blocks the caller. ``link`` (e.g. ``"1gbit"``) runs the
    ranks behind a shaped loopback (:func:`shaped_link`).
    """
    per_node = world // nodes
    if per_node * nodes != world:
        raise ValueError(f"world={world} must be a multiple of nodes={nodes}")
    with shaped_link(link) as prefix:
        _run_ranks([*prefix, *cmd], world, per_node, log_dir, timeout, cwd, pythonpath, log_tail)


def _run_ranks(
    cmd: Sequence[str],
    world: int,
    per_node: int,
    log_dir: str | Path,
    timeout: float,
    cwd: str | Path | None,
    pythonpath: str | Path | None,
    log_tail: int,
) -> None:
    port = free_port()  # free on the host; inside a fresh namespace every port is free
    procs = []
    for rank in range(world):
        env = dict(os.environ)
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(world),
            NODE_RANK=str(rank // per_node),
            LOCAL_RANK=str(rank % per_node),
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
        )
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
        for key in ("GROUP_RANK", "LOCAL_WORLD_SIZE", "RANK"):  # torchrun's, which would override ours
            env.pop(key, None)
        log = open(Path(log_dir) / f"rank{rank}.log", "w")  # noqa: SIM115 - open while the rank runs, closed below
        procs.append((subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT), log))
    failed: int | str | None = None
    deadline = time.monotonic() + timeout
    try:
        for rank, (p, _) in enumerate(procs):
            if p.wait(timeout=max(1.0, deadline - time.monotonic())) != 0 and failed is None:
                failed = rank
    except subprocess.TimeoutExpired:
        failed = "timeout"
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    if failed is not None:
        logs = "\n".join(
            f"----- rank {r} -----\n" + (Path(log_dir) / f"rank{r}.log").read_text()[-log_tail:] for r in range(world)
        )
        raise RuntimeError(f"distributed run failed (rank {failed}):\n{logs}")


def run_rank_from_file(cfg_path: str | Path, run_rank: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The worker side of :func:`run_local_ranks` for the benchmarks: read the JSON config at
    ``cfg_path``, call ``run_rank(cfg)`` (its result carries ``"rank"``), write the result to
    ``cfg["out_dir"]/rank<r>.json`` and destroy the process group if one was created."""
    import torch.distributed as dist

    cfg = json.loads(Path(cfg_path).read_text())
    result = run_rank(cfg)
    Path(cfg["out_dir"], f"rank{result['rank']}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()
