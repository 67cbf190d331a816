"""Create the default process group so that torchrun restarts come up, and never wait without bound.

**Why restarts failed.** Under ``torchrun`` the elastic agent hosts the TCPStore that the workers
use to find each other (``TORCHELASTIC_USE_AGENT_STORE=True``). That server lives as long as the
agent, through every restart attempt, at the same ``MASTER_ADDR:MASTER_PORT`` (torch's
``DynamicRendezvousHandler.next_rendezvous`` creates it only on the first round and
``StaticTCPRendezvous`` keeps it too), and torch's ``env://`` rendezvous hands the workers that
store without a per-attempt prefix (``torch/distributed/rendezvous.py``, ``_create_c10d_store``:
"We create a new TCPStore for every retry so no need to add prefix for each attempt").
Gloo's ``connectFullMesh`` publishes each rank's listening address under the key
``default_pg/0//cpu//0/<rank>`` and reads its peers' keys *without waiting when they exist*. After
a restart the keys of the dead attempt are still there, so a restarted rank that reads a peer's
key before that peer has rewritten it gets the old process's address, and then (gloo's
``Device::isInitiator`` picks the side that connects by comparing the two addresses):

* it connects to the dead port: ``Gloo connectFullMesh failed ... Connection refused``; or
* both sides decide to wait for the other to connect (each compared its own new address with
  the other's *stale* one): both block in ``Pair::waitUntilConnected`` until the process
  group's timeout (Lightning's default: 30 minutes).

**The fix.** :func:`init_process_group` gives every restart attempt its own key namespace in the
agent's store, ``localsgd/restart_<TORCHELASTIC_RESTART_COUNT>``, so a restarted group never sees
the previous attempt's keys; outside torchrun it is the ordinary ``env://`` rendezvous. Creation
is bounded by ``init_timeout`` (default :data:`DEFAULT_INIT_TIMEOUT`), after which
:class:`ProcessGroupInitError` names the rank, the store and what it waited for; collectives then
use ``timeout``.

**Limit.** ``TORCHELASTIC_RESTART_COUNT`` is counted by each agent. On one node (one agent) all
ranks agree. With several nodes the agents' counts can differ (pytorch/pytorch#108158, #135712);
then the ranks wait in different namespaces and creation fails after ``init_timeout`` with an
error that says so. Use ``--rdzv-backend=c10d`` with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` there:
every rendezvous round then gets a new store on a new port, and this function uses ``env://``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_INIT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "ProcessGroupInitError",
    "attempt_prefix",
    "init_process_group",
    "init_strategy_process_group",
    "serialize_threads",
]

#: Longest wait for all ranks to join the process group; under torchrun the agents' rendezvous has
#: already gathered the nodes, so the workers arrive within seconds of each other.
DEFAULT_INIT_TIMEOUT = timedelta(minutes=5)

#: How long any collective (and the async server) waits for a peer before failing with an error that
#: names the rank and the operation: 10 minutes (Lightning's and torch's default is 30). Raise it for
#: validations or checkpoint writes longer than this on one rank while the others wait.
DEFAULT_TIMEOUT = timedelta(minutes=10)
DEFAULT_COLLECTIVE_TIMEOUT = DEFAULT_TIMEOUT  # its name before 0.2 (lightning_localsgd.process_group)


def serialize_threads() -> bool:
    """Whether the world's backend needs one communicating thread at a time (NCCL, and anything not gloo).

    NCCL runs each communicator's collectives in issue order; two threads issuing on two
    communicators in different orders on different ranks can deadlock. gloo has no such constraint.
    """
    return dist.is_initialized() and dist.get_backend() != "gloo"


class ProcessGroupInitError(RuntimeError):
    """The default process group could not be created within ``init_timeout``."""


def attempt_prefix(main_address: str, main_port: int, environ: Mapping[str, str] | None = None) -> str | None:
    """The store namespace of this torchrun restart attempt, or ``None`` when not using the agent's store.

    The agent's store is in use when torchrun says so (``TORCHELASTIC_USE_AGENT_STORE=True``) and
    the address is the agent's own ``MASTER_ADDR:MASTER_PORT`` (torch makes the same check).
    """
    env = os.environ if environ is None else environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if env.get("MASTER_ADDR") != main_address or env.get("MASTER_PORT") != str(main_port):
        return None
    count = env.get("TORCHELASTIC_RESTART_COUNT")
    if count is None or not count.isdigit():
        raise ProcessGroupInitError(
            f"torchrun's agent store is in use but TORCHELASTIC_RESTART_COUNT is {count!r}: launch with torchrun "
            "(which sets it), or unset TORCHELASTIC_USE_AGENT_STORE"
        )
    return f"localsgd/restart_{int(count)}"


def init_process_group(
    backend: str,
    rank: int,
    world_size: int,
    main_address: str,
    main_port: int,
    *,
    timeout: timedelta | None = DEFAULT_TIMEOUT,
    init_timeout: timedelta = DEFAULT_INIT_TIMEOUT,
    device_id: torch.device | None = None,
) -> None:
    """Create the default process group (no-op if one exists); see the module docstring.

    Args:
        backend: ``"gloo"`` or ``"nccl"``.
        rank, world_size: this process's global rank and the number of processes.
        main_address, main_port: where the store is (``MASTER_ADDR``/``MASTER_PORT``).
        timeout: timeout of every collective after creation (``None``: torch's default).
        init_timeout: longest wait for creation (store keys and connections); then
            :class:`ProcessGroupInitError`.
        device_id: as in :func:`torch.distributed.init_process_group`.
    """
    if dist.is_initialized():
        return
    if init_timeout.total_seconds() <= 0:  # not _checks: this module loads alone (tests/test_process_group.py)
        raise ValueError(f"init_timeout must be positive, got {init_timeout}")
    prefix = attempt_prefix(main_address, main_port)  # before MASTER_* is overwritten below
    os.environ["MASTER_ADDR"] = main_address
    os.environ["MASTER_PORT"] = str(main_port)
    where = f"the store at {main_address}:{main_port}"
    try:
        if prefix is None:
            dist.init_process_group(
                backend,
                init_method="env://",
                rank=rank,
                world_size=world_size,
                timeout=init_timeout,
                device_id=device_id,
            )
        else:
            where = f"torchrun's agent store at {main_address}:{main_port} under the key prefix {prefix!r}"
            agent = dist.TCPStore(main_address, main_port, world_size, is_master=False, timeout=init_timeout)
            dist.init_process_group(
                backend,
                store=dist.PrefixStore(prefix, agent),
                rank=rank,
                world_size=world_size,
                timeout=init_timeout,
                device_id=device_id,
            )
    except Exception as err:  # torch raises RuntimeError, DistError and subclasses here
        raise ProcessGroupInitError(_explain(rank, world_size, backend, init_timeout, where, prefix, err)) from err
    if timeout is not None:
        dist.set_timeout(timeout)


def init_strategy_process_group(strategy: Any) -> None:
    """:func:`init_process_group` with the settings of a Lightning DDP-style strategy (Trainer or Fabric).

    Reads the strategy's backend, ranks, cluster environment (address and port), collective
    ``_timeout``, ``init_timeout`` and device; both front ends call this before Lightning's own
    ``setup_distributed``, which then finds the group already made.
    """
    env = strategy.cluster_environment
    assert env is not None
    device = strategy.root_device if strategy.root_device.type != "cpu" else None
    init_process_group(
        strategy._get_process_group_backend(),
        strategy.global_rank,
        strategy.world_size,
        env.main_address,
        env.main_port,
        timeout=strategy._timeout,
        init_timeout=strategy.init_timeout,
        device_id=device,
    )


def _explain(
    rank: int, world_size: int, backend: str, init_timeout: timedelta, where: str, prefix: str | None, err: Exception
) -> str:
    msg = (
        f"rank {rank} of {world_size} could not create the {backend!r} process group within {init_timeout}: "
        f"it waited for the other {world_size - 1} rank(s) to publish their addresses in {where} and to "
        f"connect to it. Cause: {type(err).__name__}: {str(err).strip()[:600]}. Check that all {world_size} "
        f"ranks were started and can reach that address; raise init_timeout if they start further apart."
    )
    if prefix is not None and int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        msg += (
            " With several torchrun agents the restart counts can differ between nodes, so ranks may wait "
            "under different prefixes: use --rdzv-backend=c10d with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1."
        )
    return msg
