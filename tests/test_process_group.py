"""lightning_localsgd.transport.process_group: restarted groups never read the previous attempt's store keys.

The test process plays torchrun's elastic agent: it hosts the TCPStore that outlives the restart
attempts and starts the two ranks of each attempt with the environment torchrun gives them
(``TORCHELASTIC_USE_AGENT_STORE=True``, ``TORCHELASTIC_RESTART_COUNT``, ``MASTER_ADDR/PORT``).
Between attempts it leaves the previous attempt's gloo address keys in the store, as the agent
does, with the port set to 1 so that the reading rank deterministically takes gloo's connecting
role (a dead port: what a stale entry points at). Rank 1 starts late, so rank 0 always reads rank
1's key before rank 1 has written it.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from lightning_localsgd.transport.process_group import ProcessGroupInitError, attempt_prefix, init_process_group
from recipes.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
GLOO_KEY = "0//cpu//0/{rank}"  # where ProcessGroupGloo's connectFullMesh publishes a rank's address
STOCK_PREFIX = "default_pg/"  # torch's env:// rendezvous puts the default group under this prefix


WORKER = """
import importlib.util, json, os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist

def main(mode, out, delay, init_timeout):
    rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    time.sleep(delay)
    result = {"rank": rank, "attempt": attempt}
    try:
        if mode == "fixed":  # the module files alone: importing the package would import Lightning (slow)
            for name, path in (("lightning_localsgd._checks", "CHECKS_PY"), ("process_group", "PROCESS_GROUP_PY")):
                spec = importlib.util.spec_from_file_location(name, os.environ[path])
                pg = sys.modules[name] = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(pg)
            pg.init_process_group("gloo", rank, 2, "127.0.0.1", int(os.environ["MASTER_PORT"]),
                                  timeout=timedelta(seconds=60), init_timeout=timedelta(seconds=init_timeout))
            if rank == 1 and attempt == 0:
                time.sleep(init_timeout + 2)  # a collective may wait longer than the creation timeout
        else:
            dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=init_timeout))
        x = torch.tensor([float((rank + 1) * (attempt + 1))])
        dist.all_reduce(x)
        result.update(ok=True, sum=x.item())
    except Exception as err:
        result.update(ok=False, error=f"{type(err).__name__}: {err}")
    with open(out, "w") as f:
        json.dump(result, f)
    os._exit(0)  # like a killed worker: no clean shutdown of the group

main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
"""


def run_attempt(
    tmp: Path,
    port: int,
    attempt: int,
    mode: str,
    ranks: tuple[int, ...] = (0, 1),
    delays: tuple[float, float] = (0.0, 2.0),
    init_timeout: float = 6.0,
) -> dict[int, dict]:
    procs = {}
    for rank in ranks:
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            TORCHELASTIC_USE_AGENT_STORE="True",
            TORCHELASTIC_RESTART_COUNT=str(attempt),
            GROUP_WORLD_SIZE="1",
            OMP_NUM_THREADS="1",
            PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        )
        out = tmp / f"{mode}_a{attempt}_r{rank}.json"
        env["PROCESS_GROUP_PY"] = str(ROOT / "lightning_localsgd" / "transport" / "process_group.py")
        env["CHECKS_PY"] = str(ROOT / "lightning_localsgd" / "_checks.py")  # its one import from the package
        args = [mode, str(out), str(delays[rank]), str(init_timeout)]
        procs[rank] = (subprocess.Popen([sys.executable, "-c", WORKER, *args], env=env, cwd=tmp), out)
    results = {}
    for rank, (p, out) in procs.items():
        try:
            p.wait(timeout=float(os.environ.get("PG_TEST_WAIT", "120")))
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        results[rank] = json.loads(out.read_text())
    return results


def point_at_dead_port(store: dist.TCPStore, key: str) -> None:
    """Rewrite a gloo address entry (hostname, sockaddr, pair ids) so that its port is 1."""
    value = bytearray(store.get(key))
    (host_len,) = struct.unpack_from("<Q", value, 0)
    sockaddr = 8 + host_len + 8
    assert struct.unpack_from("<H", value, sockaddr)[0] == 2, "expected an IPv4 sockaddr in the gloo entry"
    struct.pack_into(">H", value, sockaddr + 2, 1)
    store.set(key, bytes(value))


@pytest.fixture
def agent_store() -> tuple[dist.TCPStore, int]:
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, True, timedelta(seconds=30), wait_for_workers=False)
    return store, port


def test_stock_rendezvous_reads_the_previous_attempts_address(tmp_path: Path, agent_store) -> None:
    # The failure this module exists for: torch's env:// under torchrun's store, second attempt.
    store, port = agent_store
    first = run_attempt(tmp_path, port, 0, "stock", delays=(0.0, 0.0))
    assert [first[r]["sum"] for r in (0, 1)] == [3.0, 3.0]
    point_at_dead_port(store, STOCK_PREFIX + GLOO_KEY.format(rank=1))
    second = run_attempt(tmp_path, port, 1, "stock", ranks=(0,))
    assert not second[0]["ok"]
    # Rank 1 never started, yet rank 0 did not wait for it: it connected to the dead attempt's address.
    assert "connectFullMesh failed" in second[0]["error"] and "Connection refused" in second[0]["error"], second[0]


def test_every_attempt_comes_up_in_its_own_namespace(tmp_path: Path, agent_store) -> None:
    store, port = agent_store
    for attempt in range(3):  # attempt 0 also checks that collectives are not bound by init_timeout
        if attempt > 0:  # the dead attempt's entries stay in the agent's store
            for rank in (0, 1):
                point_at_dead_port(store, f"localsgd/restart_{attempt - 1}/" + GLOO_KEY.format(rank=rank))
        results = run_attempt(tmp_path, port, attempt, "fixed")
        expected = 3.0 * (attempt + 1)  # (1 + 2) · (attempt + 1)
        assert [results[r].get("sum") for r in (0, 1)] == [expected, expected], results


def test_creation_ends_with_an_error_naming_the_rank_and_the_wait(tmp_path: Path, agent_store) -> None:
    _, port = agent_store
    result = run_attempt(tmp_path, port, 4, "fixed", ranks=(0,), init_timeout=3.0)[0]
    assert not result["ok"]
    assert result["error"].startswith("ProcessGroupInitError: rank 0 of 2 could not create the 'gloo' process group")
    assert "within 0:00:03" in result["error"] and "'localsgd/restart_4'" in result["error"]


def test_attempt_prefix_reads_torchruns_environment() -> None:
    env = {
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RESTART_COUNT": "3",
    }
    assert attempt_prefix("10.0.0.1", 29500, env) == "localsgd/restart_3"
    assert attempt_prefix("10.0.0.2", 29500, env) is None  # not the agent's store
    assert attempt_prefix("10.0.0.1", 29500, {**env, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert attempt_prefix("10.0.0.1", 29500, {}) is None
    with pytest.raises(ProcessGroupInitError, match="TORCHELASTIC_RESTART_COUNT is None"):
        attempt_prefix("10.0.0.1", 29500, {k: v for k, v in env.items() if k != "TORCHELASTIC_RESTART_COUNT"})


def test_init_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="init_timeout must be positive"):
        init_process_group("gloo", 0, 1, "127.0.0.1", free_port(), init_timeout=timedelta(0))
