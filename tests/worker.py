"""Entry point of one rank started by :mod:`tests.launch`.

``python -m tests.worker TARGET KWARGS_PT OUT_DIR DEVICES NODES`` runs one scenario and exits (a fresh
rank). ``python -m tests.worker --serve FD DEVICES NODES [MODULE ...]`` is a rank of a :class:`tests.launch.RankPool`:
it runs the scenarios sent over the socket ``FD`` one after another, each from the state of a fresh
rank (:class:`FreshState`, captured after importing the MODULEs), until the socket closes.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
import warnings
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def call(target: str, out_dir: str, devices: int, nodes: int, kwargs: dict[str, Any]) -> None:
    """Run the scenario ``module:function`` and save what it returns as ``out_dir/result<rank>.pt``."""
    module_name, fn_name = target.split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    result = fn(out_dir=out_dir, devices=devices, num_nodes=nodes, **kwargs)
    rank = int(os.environ["NODE_RANK"]) * devices + int(os.environ["LOCAL_RANK"])
    torch.save(result, Path(out_dir) / f"result{rank}.pt")


def main() -> None:
    target, args_path, out_dir, devices, nodes = sys.argv[1:6]
    torch.set_num_threads(1)
    call(target, out_dir, int(devices), int(nodes), torch.load(args_path, weights_only=False))
    if dist.is_initialized():
        # gloo can abort at interpreter exit when a group is still alive (pytorch/pytorch#190489)
        dist.destroy_process_group()


LIBRARY = {"lightning_localsgd", "recipes", "benchmarks"}  # modules a scenario must not leave patched


class FreshState:
    """What a freshly started rank looks like, captured before the first scenario: :meth:`restore` puts it
    back before each scenario; :meth:`leftovers` ends the scenario's process groups and names what could
    not be undone (then the process must not run another scenario)."""

    def __init__(self) -> None:
        self.environ = dict(os.environ)
        self.threads = {t.ident for t in threading.enumerate()}
        self.signals = {}
        for sig in signal.valid_signals():
            with contextlib.suppress(OSError, ValueError):
                self.signals[sig] = signal.getsignal(sig)
        self.log_levels = self.loggers()
        self.library = self.library_attributes()
        self.torch = (
            torch.get_default_dtype(),
            torch.get_num_threads(),
            torch.are_deterministic_algorithms_enabled(),
            torch.is_warn_always_enabled(),
            torch.is_anomaly_enabled(),
        )

    def restore(self, out_dir: str, port: int) -> None:
        os.environ.clear()
        os.environ.update(self.environ)
        os.environ["MASTER_PORT"] = str(port)  # a new rendezvous for every scenario
        for key, value in self.library_attributes().items():  # modules loaded since: as they are now
            self.library.setdefault(key, value)
        os.chdir(out_dir)
        for sig, handler in self.signals.items():
            if handler is not None and signal.getsignal(sig) != handler:
                signal.signal(sig, handler)
        for name, level in self.loggers().items():  # a scenario may quieten a logger (lsgd_vs_easgd does)
            if level != self.log_levels.get(name, logging.NOTSET):
                logging.getLogger(name or None).setLevel(self.log_levels.get(name, logging.NOTSET))
        dtype, threads, deterministic, warn_always, anomaly = self.torch
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_warn_always(warn_always)
        torch.autograd.set_detect_anomaly(anomaly)
        torch.set_grad_enabled(True)
        torch.seed()  # a fresh process starts from a random seed too
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()

    @staticmethod
    def loggers() -> dict[str, int]:
        """The level of the root logger (``""``) and of every named logger created so far."""
        named = logging.root.manager.loggerDict.items()
        return {"": logging.root.level} | {n: lg.level for n, lg in named if isinstance(lg, logging.Logger)}

    @staticmethod
    def library_attributes() -> dict[tuple[str, str], Any]:
        """Every module-level attribute of the library's loaded modules (a monkeypatch replaces one)."""
        return {
            (name, attr): value
            for name, module in list(sys.modules.items())
            if name.split(".")[0] in LIBRARY and module is not None
            for attr, value in vars(module).items()
        }

    def leftovers(self) -> list[str]:
        problems = []
        try:
            if dist.is_initialized():
                dist.destroy_process_group()  # every group: the default one and all made with new_group
        except Exception as err:  # reported, and the process retired
            problems.append(f"destroy_process_group failed: {err}")
        if dist.is_initialized() or dist.distributed_c10d._world.pg_map:
            problems.append("a process group is still alive")
        if meshes_alive():
            problems.append(EXPECTED_RETIREMENT)
        gc.collect()
        deadline = time.monotonic() + 2.0  # the library joins its threads at teardown: a grace for stragglers
        for thread in threading.enumerate():
            if thread.ident not in self.threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        left = [t.name for t in threading.enumerate() if t.ident not in self.threads and t.is_alive()]
        if left:
            problems.append(f"threads still running: {left}")
        now = self.library_attributes()
        patched = sorted(f"{m}.{a}" for (m, a), value in self.library.items() if now.get((m, a), value) is not value)
        if patched:
            problems.append(f"module attributes replaced: {patched}")
        for sig, handler in self.signals.items():
            if handler is None and signal.getsignal(sig) is not None:
                problems.append(f"a handler of {signal.Signals(sig).name} installed outside Python")
        return problems


EXPECTED_RETIREMENT = "device meshes of the scenario's world are kept alive by torch's DTensor caches"
"""Why a pool retires after every FSDP2 scenario (:func:`meshes_alive`); tests/launch.py does not warn about it."""


def meshes_alive() -> bool:
    """Whether a DeviceMesh outlived its scenario. Then the pool is retired: seen with torch 2.14, a parameter
    sharded over a mesh made in the next scenario's world reported this world's (dead) process groups, so a
    torch cache keys meshes by their layout (clearing DTensor's redistribution-plan and sharding-propagation
    caches did not help). A process that runs one job, as in real use, never meets it."""
    mesh_module = sys.modules.get("torch.distributed.device_mesh")
    mesh_class = getattr(mesh_module, "DeviceMesh", None)
    if not isinstance(mesh_class, type):
        return False
    gc.collect()
    return any(isinstance(obj, mesh_class) for obj in gc.get_objects())


def die_with_parent() -> None:
    """SIGKILL this process when the test session that started it goes away (Linux; elsewhere a no-op)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def serve(fd: int, devices: int, nodes: int, preload: list[str]) -> None:
    die_with_parent()
    torch.set_num_threads(1)
    for module in preload:  # what the scenarios import (Lightning, the library): loaded before the state is captured
        importlib.import_module(module)
    conn = Connection(fd)
    fresh = FreshState()
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        fresh.restore(job["out_dir"], job["port"])
        try:
            with warnings.catch_warnings():  # the filters as they were; "once" registries start over
                call(job["target"], job["out_dir"], devices, nodes, job["kwargs"])
        except BaseException:  # SystemExit too: the test reports it
            conn.send({"error": traceback.format_exc(), "dirty": ["the scenario raised"]})
            return  # the pool kills every rank: the others may wait in a collective for this one
        dirty = fresh.leftovers()
        conn.send({"error": None, "dirty": dirty})
        if dirty:
            return


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
    else:
        main()
