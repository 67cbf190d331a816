"""Scenarios of tests/test_rank_pool.py: what a shared rank process must undo, fail on, or refuse."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def _rank(devices: int) -> int:
    return int(os.environ["NODE_RANK"]) * devices + int(os.environ["LOCAL_RANK"])


def litter(out_dir: str, devices: int, num_nodes: int) -> dict[str, Any]:
    """Leave behind what a scenario may leave: a process group (and a subgroup), an environment variable,
    torch settings, a signal handler, a warnings filter, a logger level, another working directory."""
    rank = _rank(devices)
    dist.init_process_group("gloo", rank=rank, world_size=devices * num_nodes, timeout=timedelta(seconds=60))
    dist.new_group([0, 1])
    os.environ["LITTER"] = "1"
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    signal.signal(signal.SIGUSR1, lambda *args: None)
    warnings.simplefilter("error")
    logging.getLogger("lightning.pytorch").setLevel(logging.CRITICAL)
    os.chdir("/")
    return inspect(out_dir, devices, num_nodes)


def inspect(out_dir: str, devices: int, num_nodes: int) -> dict[str, Any]:
    """What this rank looks like at the start of a scenario."""
    return {
        "pid": os.getpid(),
        "group": dist.is_initialized(),
        "port": os.environ["MASTER_PORT"],
        "litter": os.environ.get("LITTER"),
        "dtype": torch.get_default_dtype(),
        "threads": torch.get_num_threads(),
        "grad": torch.is_grad_enabled(),
        "sigusr1": str(signal.getsignal(signal.SIGUSR1)),
        "warnings_error": any(f[0] == "error" for f in warnings.filters),
        "lightning_level": logging.getLogger("lightning.pytorch").level,
        "cwd": os.getcwd(),
        "out_dir": out_dir,
    }


def raise_on(out_dir: str, devices: int, num_nodes: int, rank: int) -> None:
    """Rank ``rank`` says a last word and raises; the others wait for it in a barrier (a hang, but for the kill)."""
    dist.init_process_group("gloo", rank=_rank(devices), world_size=devices * num_nodes, timeout=timedelta(seconds=120))
    if _rank(devices) == rank:
        print(f"rank {rank}: about to give up", flush=True)
        raise ValueError(f"rank {rank} gives up")
    dist.barrier()


def exit_on(out_dir: str, devices: int, num_nodes: int, rank: int) -> None:
    if _rank(devices) == rank:
        os._exit(3)
    time.sleep(120)


def sleep(out_dir: str, devices: int, num_nodes: int, seconds: float) -> None:
    time.sleep(seconds)


def leave_a_thread_and_a_patch(out_dir: str, devices: int, num_nodes: int) -> str:
    import recipes.launch

    threading.Thread(target=time.sleep, args=(60,), name="left-behind", daemon=True).start()
    recipes.launch.free_port = lambda: 1
    return "done"
