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

**Two simulated nodes.** :func:`two_nodes` (and ``run_local_ranks(..., nodes=2, link="1gbit",
node_namespaces=True)``) puts each node in its own network namespace, the two joined by a veth pair
whose two ends are both shaped by the same token bucket; each namespace's loopback stays unshaped::

    ip netns add NS0; ip netns add NS1
    ip -n NS0 link add lsgd-veth0 type veth peer name lsgd-veth1 netns NS1
    ip -n NS0 addr add 10.231.0.1/24 dev lsgd-veth0; ip -n NS1 addr add 10.231.0.2/24 dev lsgd-veth1
    ip -n NSi link set lo up; ip -n NSi link set lsgd-vethi up                           (i = 0, 1)
    ip netns exec NSi tc qdisc add dev lsgd-vethi root tbf rate 1gbit burst 256kb latency 200ms
    ip netns exec NSi <node i's ranks>; ip netns del NS0; ip netns del NS1

The ranks of node i run inside NSi with ``MASTER_ADDR=10.231.0.1`` (node 0's veth address),
``GLOO_SOCKET_IFNAME=lsgd-vethi``, ``NODE_RANK=i``, ``LOCAL_RANK``, ``WORLD_SIZE`` and
``LOCALSGD_NODE=i``. The addresses exist only inside the namespaces, which are removed (their
processes killed first) when the block ends, also on errors, Ctrl-C and SIGTERM. ``rate=None`` is
an unshaped veth (still two namespaces: the bytes are counted per path).

*Where gloo's bytes go* (measured with interface counters read inside each namespace): gloo binds
every rank to its node's veth address, so a pair of ranks on the same node connects to that node's
*own* veth address, which Linux routes through the local table, i.e. over the namespace's
loopback: it never touches the veth or its qdisc. Only pairs on different nodes cross the veth.
gloo's ring allreduce over ranks 0→1→2→3→0 (2 nodes × 2) has one link inside each node and one
leaving each node, so each node's veth and each node's loopback carry one rank's ring traffic,
2·(m−1)/m·B for B bytes (m = 4). Lightning DDP, resnet18 (B = 44.7 MB of fp32 gradients), per
step and node: veth 67.30 MB, loopback 67.20 MB, ring formula 67.09 MB (ratios 1.003 and 1.002;
the rest is TCP/IP headers and gloo's control messages). Two plain 40 MB allreduces: 120.3 MB on
each veth, 120.1-120.2 MB on each loopback, formula 120.0 MB. Node-local DDP (each node its own
2-rank job, ``independent_nodes=True``): 89.6 MB per step on each loopback (2 ranks × B), 726 bytes
on the veths over the whole run (none of it gloo's; presumably the kernel's own IPv6 link-local
messages). The tbf qdisc holds: the same 4-rank allreduces took 22 s behind 100mbit against 8 s on
an unshaped veth.

Cross-node and intra-node bytes are read from ``/proc/net/dev`` inside each namespace:
:meth:`TwoNodes.read_bytes` (from the parent, through ``ip netns exec``) and
:func:`read_interface_bytes` (from a rank inside a namespace); ``run_local_ranks`` returns the
run's totals (:func:`traffic_between`).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# tbf parameters of every shaped link: a 256 KiB bucket (about 2 ms of line rate at 1 Gbit/s) and
# packets dropped after 200 ms in the queue.
LINK_BURST = "256kb"
LINK_LATENCY = "200ms"
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$", re.IGNORECASE)
_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


# the two simulated nodes: interface names (at most 15 characters) and addresses inside their namespaces
NODE_INTERFACES = ("lsgd-veth0", "lsgd-veth1")
NODE_ADDRESSES = ("10.231.0.1", "10.231.0.2")
NODE_PREFIX_LENGTH = 24


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


def describe_node_link(rate: str | None) -> str:
    """The link between two simulated nodes (:func:`two_nodes`) as printed in tables and plot titles."""
    between = (
        "an unshaped veth"
        if rate is None
        else f"a {rate} veth (tc tbf on both ends, burst {LINK_BURST}, latency {LINK_LATENCY})"
    )
    return f"{between} between 2 network namespaces; loopback inside each node unshaped"


def check_link_support(what: str = "a shaped link", instead: str = "drop --link") -> None:
    """Raise :class:`LinkUnavailable` with the reason when a shaped link (``what``) cannot be built here;
    ``instead`` is what the message tells the user to do then."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise LinkUnavailable(f"{what} needs root (network namespaces and tc): run as root, or {instead}")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise LinkUnavailable(f"{what} needs iproute2 ({', '.join(missing)} not found): install it, or {instead}")


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
    name = _namespace_name()
    with _sigterm_unwinds():
        try:
            _run(["ip", "netns", "add", name])
            _run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
            _shape(name, "lo", rate)
            yield ["ip", "netns", "exec", name]
        finally:
            _remove_namespace(name)


def _namespace_name() -> str:
    return f"localsgd-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _shape(namespace: str, device: str, rate: str) -> None:
    """``tc qdisc add dev DEVICE root tbf rate RATE burst LINK_BURST latency LINK_LATENCY`` inside ``namespace``."""
    _run(
        [
            "ip",
            "netns",
            "exec",
            namespace,
            "tc",
            "qdisc",
            "add",
            "dev",
            device,
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


def _remove_namespace(name: str) -> None:
    """Kill every process inside namespace ``name``, then delete it (its veth ends go with it); never raises."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Inside the block SIGTERM raises ``SystemExit`` (so ``finally`` clauses run); the handler before it
    is put back afterwards. Off the main thread nothing changes (the caller handles signals)."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through the caller's finally

    in_main_thread = True
    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: the caller handles signals
        in_main_thread = False
    try:
        yield
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class TwoNodes:
    """Two simulated nodes (what :func:`two_nodes` yields): node ``i`` is namespace ``namespaces[i]`` whose
    veth end ``interfaces[i]`` has address ``addresses[i]``."""

    rate: str | None
    namespaces: tuple[str, str]
    interfaces: tuple[str, str] = NODE_INTERFACES
    addresses: tuple[str, str] = NODE_ADDRESSES

    def prefix(self, node: int) -> list[str]:
        """The command prefix that runs a command on node ``node`` (inside its namespace)."""
        return ["ip", "netns", "exec", self.namespaces[node]]

    def env(self, node: int, own_master: bool = False) -> dict[str, str]:
        """What a rank on node ``node`` needs so that gloo talks over the nodes' link: the master is node 0's
        veth address (``own_master``: this node's, for a job of this node alone), gloo binds this node's
        veth (same-node pairs then go over loopback), and ``LOCALSGD_NODE`` says which node it is."""
        return {
            "MASTER_ADDR": self.addresses[node if own_master else 0],
            "GLOO_SOCKET_IFNAME": self.interfaces[node],
            "LOCALSGD_NODE": str(node),
        }

    def read_bytes(self) -> dict[str, list[int]]:
        """Interface counters now, per node: ``veth_tx``/``veth_rx`` (the link to the other node) and
        ``lo_tx`` (the node's loopback: its intra-node traffic), from ``/proc/net/dev`` inside each namespace."""
        out: dict[str, list[int]] = {"veth_tx": [], "veth_rx": [], "lo_tx": []}
        for node, ns in enumerate(self.namespaces):
            done = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/dev"], capture_output=True, text=True)
            table = parse_net_dev(done.stdout)
            veth = table.get(self.interfaces[node], (0, 0))
            out["veth_rx"].append(veth[0])
            out["veth_tx"].append(veth[1])
            out["lo_tx"].append(table.get("lo", (0, 0))[1])
        return out


def traffic_between(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, list[int]]:
    """What crossed each path between two :meth:`TwoNodes.read_bytes`: ``cross_node_tx_bytes[i]`` (node i's
    veth, sent to the other node) and ``intra_node_tx_bytes[i]`` (node i's loopback)."""
    return {
        "cross_node_tx_bytes": [a - b for a, b in zip(after["veth_tx"], before["veth_tx"])],
        "intra_node_tx_bytes": [a - b for a, b in zip(after["lo_tx"], before["lo_tx"])],
    }


@contextmanager
def two_nodes(rate: str | None) -> Iterator[TwoNodes]:
    """Two simulated nodes joined by a link of ``rate`` (module docstring; ``None``: an unshaped veth).

    Each node is a private network namespace with an unshaped loopback; one veth pair joins them, both
    ends shaped by ``tbf rate RATE burst LINK_BURST latency LINK_LATENCY``. On the way out, whatever
    happened inside (errors, Ctrl-C, SIGTERM), the processes still in either namespace are killed and
    both namespaces deleted. Raises :class:`LinkUnavailable` without root or iproute2.
    """
    if rate is not None:
        link_bits_per_second(rate)  # validate before touching the system
    check_link_support("two simulated nodes", "drop --nodes")
    stem = _namespace_name()
    nodes = TwoNodes(rate, (f"{stem}-n0", f"{stem}-n1"))
    (ns0, ns1), (if0, if1) = nodes.namespaces, nodes.interfaces
    with _sigterm_unwinds():
        try:
            for ns in nodes.namespaces:
                _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns0, "link", "add", if0, "type", "veth", "peer", "name", if1, "netns", ns1])
            for node, ns in enumerate(nodes.namespaces):
                iface = nodes.interfaces[node]
                _run(["ip", "-n", ns, "addr", "add", f"{nodes.addresses[node]}/{NODE_PREFIX_LENGTH}", "dev", iface])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                _run(["ip", "-n", ns, "link", "set", iface, "up"])
                if rate is not None:
                    _shape(ns, iface, rate)
            yield nodes
        finally:
            for ns in nodes.namespaces:
                _remove_namespace(ns)


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


def parse_net_dev(text: str) -> dict[str, tuple[int, int]]:
    """``{interface: (rx_bytes, tx_bytes)}`` from the text of ``/proc/net/dev``."""
    out = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and len(fields) >= 9 and fields[0].isdigit():
            out[name.strip()] = (int(fields[0]), int(fields[8]))
    return out


def read_interface_bytes(name: str) -> tuple[int, int] | None:
    """``(rx_bytes, tx_bytes)`` of interface ``name`` in this process's network namespace, or ``None``
    where /proc/net/dev or the interface is missing."""
    try:
        with open("/proc/net/dev") as f:
            return parse_net_dev(f.read()).get(name)
    except OSError:
        return None


def read_loopback_bytes() -> tuple[int, int] | None:
    """``(rx_bytes, tx_bytes)`` of the loopback interface, or ``None`` where /proc/net/dev is missing."""
    return read_interface_bytes("lo")


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
    node_namespaces: bool = False,
    independent_nodes: bool = False,
) -> dict[str, Any] | None:
    """Run ``cmd`` as ``world`` ranks (``nodes`` × ``world // nodes``), one thread each, and wait.

    Every rank writes its output to ``log_dir/rank<r>.log``. If a rank fails or the whole run
    exceeds ``timeout`` seconds, every rank is killed and ``RuntimeError`` carries the tail of each
    rank's log: a hang fails, it never blocks the caller. ``link`` (e.g. ``"1gbit"``) runs the
    ranks behind a shaped loopback (:func:`shaped_link`): every pair of ranks, same node or not,
    talks over that one link.

    ``node_namespaces=True`` (``nodes`` must be 2) runs the ranks on two simulated nodes instead
    (:func:`two_nodes`): only the link between the nodes is shaped at ``link`` (``None``: unshaped),
    each node's own pairs talk over its unshaped loopback. It is an explicit switch, not implied by
    ``nodes=2, link=...``, so the runs that put all ranks behind one shaped loopback keep doing so.
    It returns the run's bytes per path, start to end (:func:`traffic_between`):
    ``{"cross_node_tx_bytes": [node 0, node 1], "intra_node_tx_bytes": [...], "link": link}``;
    without it the function returns ``None``.

    ``independent_nodes=True`` makes every node its own job of ``world // nodes`` ranks
    (``WORLD_SIZE`` = ranks per node, ``NODE_RANK=0``, its own ``MASTER_ADDR``/``MASTER_PORT``), all
    started at the same time; nothing crosses nodes except what the command sends on its own. Each
    rank still gets ``LOCALSGD_NODE`` (its node) and logs as its global rank.
    """
    per_node = world // nodes
    if per_node * nodes != world:
        raise ValueError(f"world={world} must be a multiple of nodes={nodes}")
    if node_namespaces:
        if nodes != 2:
            raise ValueError(f"node_namespaces=True simulates exactly 2 nodes, got nodes={nodes}")
        with two_nodes(link) as harness:
            before = harness.read_bytes()
            _run_ranks(
                cmd,
                world,
                per_node,
                log_dir,
                timeout,
                cwd,
                pythonpath,
                log_tail,
                prefixes=[harness.prefix(n) for n in range(nodes)],
                node_envs=[harness.env(n, own_master=independent_nodes) for n in range(nodes)],
                independent=independent_nodes,
            )
            traffic: dict[str, Any] = traffic_between(before, harness.read_bytes())
            traffic["link"] = link
            return traffic
    with shaped_link(link) as prefix:
        _run_ranks(
            [*prefix, *cmd],
            world,
            per_node,
            log_dir,
            timeout,
            cwd,
            pythonpath,
            log_tail,
            node_envs=[{"LOCALSGD_NODE": str(n)} for n in range(nodes)] if independent_nodes else None,
            independent=independent_nodes,
        )
    return None


def _run_ranks(
    cmd: Sequence[str],
    world: int,
    per_node: int,
    log_dir: str | Path,
    timeout: float,
    cwd: str | Path | None,
    pythonpath: str | Path | None,
    log_tail: int,
    prefixes: Sequence[Sequence[str]] | None = None,
    node_envs: Sequence[dict[str, str]] | None = None,
    independent: bool = False,
) -> None:
    """Start the ranks and wait. Per node ``n``: ``prefixes[n]`` before ``cmd`` and ``node_envs[n]`` over the
    environment (both optional); ``independent``: each node its own job (:func:`run_local_ranks`)."""
    nodes = world // per_node
    # free on the host; inside a fresh namespace every port is free. Independent jobs on one host need one each.
    ports = [free_port() for _ in range(nodes)] if independent else [free_port()] * nodes
    procs = []
    for rank in range(world):
        node = rank // per_node
        env = dict(os.environ)
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(ports[node]),
            WORLD_SIZE=str(per_node if independent else world),
            NODE_RANK=str(0 if independent else node),
            LOCAL_RANK=str(rank % per_node),
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
        )
        if node_envs is not None:
            env.update(node_envs[node])
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
        for key in ("GROUP_RANK", "LOCAL_WORLD_SIZE", "RANK"):  # torchrun's, which would override ours
            env.pop(key, None)
        log = open(Path(log_dir) / f"rank{rank}.log", "w")  # noqa: SIM115 - open while the rank runs, closed below
        argv = [*(prefixes[node] if prefixes is not None else []), *cmd]
        procs.append((subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT), log))
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
