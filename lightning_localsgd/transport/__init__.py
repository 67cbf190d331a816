"""The wire: the only package that calls ``torch.distributed`` (no Lightning imports).

============================  ==========================================================================
module                        what it holds
============================  ==========================================================================
``collectives``               :class:`Collectives`: flat bucketed allreduce (SUM, then divide), broadcasts,
                              gathers, all-to-all, NaN/Inf flags, bf16/int8/int4 transport with error
                              feedback, background syncs on a thread, :class:`CommCounters`
``quantize``                  per-block integer packets (int8/int4) with one fp32 scale per block
``tensors``                   flatten / unflatten / snapshot / lerp / views on lists of tensors; which tensors
                              a sync moves (buffer policy); fragments (equal ranges of the flat layout)
``process_group``             the default process group, created so that torchrun restarts come up
``replicas``                  node groups and the module broadcast that makes replicas equal
============================  ==========================================================================
"""

from lightning_localsgd.transport.collectives import (
    CollectiveError,
    Collectives,
    CommCounters,
    Group,
    NonFiniteReplicaError,
    PendingMean,
    new_group,
)

__all__ = [
    "CollectiveError",
    "Collectives",
    "CommCounters",
    "Group",
    "NonFiniteReplicaError",
    "PendingMean",
    "new_group",
]
