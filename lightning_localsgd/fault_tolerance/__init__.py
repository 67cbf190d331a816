"""The fault-tolerance wing: live replica groups on torchft (``LocalSGDStrategy(fault_tolerance=TorchFT(...))``).

==================  ==========================================================================
module              what it holds
==================  ==========================================================================
``config``          :class:`TorchFT` (the settings; the strategy's fault-tolerance plugin),
                    :func:`start_lighthouse`, :class:`FaultToleranceError`
``session``         :class:`~lightning_localsgd.fault_tolerance.session.ReplicaGroupSession`: the
                    rounds (quorum, agree, average, commit) of one replica group
``collectives``     the transport over the quorum (``Manager.allreduce``)
``state``           what a healing group receives from a live peer, and how it is put in place
==================  ==========================================================================

The wing depends on the core; the core never imports it: both front ends (Trainer and Fabric)
only know the plugin interface :class:`~lightning_localsgd.engine.FaultTolerancePlugin`, which
``TorchFT`` implements. Before 0.2 this package was one module,
``lightning_localsgd.fault_tolerance``; its names are all here.
"""

from lightning_localsgd.fault_tolerance.config import (
    INSTALL_HINT,
    LIGHTHOUSE_ENV,
    REPLICA_ID_ENV,
    FaultToleranceError,
    TorchFT,
    require_torchft,
    start_lighthouse,
)

__all__ = [
    "INSTALL_HINT",
    "LIGHTHOUSE_ENV",
    "REPLICA_ID_ENV",
    "FaultToleranceError",
    "TorchFT",
    "require_torchft",
    "start_lighthouse",
]
