"""lightning-localsgd: communication-efficient data-parallel training for PyTorch Lightning.

Importing the package registers the strategy names ``"localsgd"``, ``"localsgd_spawn"``,
``"localsgd_bf16"``, ``"async_localsgd"`` and ``"async_localsgd_spawn"`` with the Trainer and
``"localsgd"``, ``"localsgd_spawn"`` with Fabric, so ``Trainer(strategy="localsgd")`` and
``Fabric(strategy="localsgd")`` work. The Fabric strategy is ``lightning_localsgd.fabric.LocalSGDStrategy``.

The layout (docs/design.md): ``transport/`` (the wire) < ``contract`` < ``algorithms/`` <
``engine``/``resume`` < ``trainer/``, ``fabric`` (the two front ends); the ``asynchronous/`` and
``fault_tolerance/`` wings depend on that core and the core never on them. Module paths of before
0.2 still import (``_graveyard``).
"""

from lightning_localsgd import fabric  # noqa: F401  (registers Fabric's "localsgd")
from lightning_localsgd.algorithms import (
    ConsensusAlgorithm,
    DiLoCo,
    ElasticAveraging,
    GradAlign,
    LeaderSGD,
    ModifiedLocalGD,
    PeriodicAveraging,
)
from lightning_localsgd.asynchronous import (
    AsyncLocalSGDStrategy,
    AsyncTrainingError,
    DelayedNesterov,
    OuterSGD,
    ServerOptimizer,
)
from lightning_localsgd.checkpoint_io import AtomicCheckpointIO
from lightning_localsgd.contract import (
    GradientModifier,
    RoundPosition,
    StepReport,
    SyncContext,
    SyncEvent,
    SyncObserver,
)
from lightning_localsgd.engine import SyncEngine
from lightning_localsgd.fault_tolerance import FaultToleranceError, TorchFT, start_lighthouse
from lightning_localsgd.trainer import CommStats, LocalSGDStrategy, ReplicaDrift
from lightning_localsgd.transport import CollectiveError, CommCounters, NonFiniteReplicaError
from lightning_localsgd.tuning import AutoTune

__version__ = "0.1.0"

__all__ = [
    "AsyncLocalSGDStrategy",
    "AsyncTrainingError",
    "AtomicCheckpointIO",
    "AutoTune",
    "CollectiveError",
    "CommCounters",
    "CommStats",
    "ConsensusAlgorithm",
    "DelayedNesterov",
    "DiLoCo",
    "ElasticAveraging",
    "FaultToleranceError",
    "GradAlign",
    "GradientModifier",
    "LeaderSGD",
    "LocalSGDStrategy",
    "ModifiedLocalGD",
    "NonFiniteReplicaError",
    "OuterSGD",
    "PeriodicAveraging",
    "ReplicaDrift",
    "RoundPosition",
    "ServerOptimizer",
    "StepReport",
    "SyncContext",
    "SyncEngine",
    "SyncEvent",
    "SyncObserver",
    "TorchFT",
    "start_lighthouse",
]

from lightning_localsgd import _graveyard  # noqa: F401  (old module paths, last: everything is loaded)
