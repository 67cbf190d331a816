"""lightning-localsgd: communication-efficient data-parallel training for PyTorch Lightning.

Importing the package registers the strategy names ``"localsgd"``, ``"localsgd_spawn"``,
``"localsgd_bf16"``, ``"async_localsgd"`` and ``"async_localsgd_spawn"`` with the Trainer and
``"localsgd"``, ``"localsgd_spawn"`` with Fabric, so ``Trainer(strategy="localsgd")`` and
``Fabric(strategy="localsgd")`` work. The Fabric strategy is ``lightning_localsgd.fabric.LocalSGDStrategy``.
"""

from lightning_localsgd import fabric  # noqa: E402, F401  (registers Fabric's "localsgd")
from lightning_localsgd.algorithms import (
    ConsensusAlgorithm,
    DelayedNesterov,
    DiLoCo,
    ElasticAveraging,
    GradAlign,
    LeaderSGD,
    ModifiedLocalGD,
    OuterSGD,
    PeriodicAveraging,
    ServerOptimizer,
)
from lightning_localsgd.async_protocol import AsyncTrainingError
from lightning_localsgd.async_strategy import AsyncLocalSGDStrategy
from lightning_localsgd.comm import CollectiveError, CommCounters, NonFiniteReplicaError
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
from lightning_localsgd.monitors import CommStats, ReplicaDrift
from lightning_localsgd.strategy import LocalSGDStrategy

__version__ = "0.1.0"

__all__ = [
    "AsyncLocalSGDStrategy",
    "AsyncTrainingError",
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
