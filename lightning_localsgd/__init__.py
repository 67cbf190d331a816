"""lightning-localsgd: communication-efficient data-parallel training for PyTorch Lightning.

Importing the package registers the strategy names ``"localsgd"``, ``"localsgd_spawn"``,
``"localsgd_bf16"``, ``"async_localsgd"`` and ``"async_localsgd_spawn"`` with Lightning, so
``Trainer(strategy="localsgd")`` works.
"""

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
from lightning_localsgd.comm import CommCounters, NonFiniteReplicaError
from lightning_localsgd.monitors import CommStats, ReplicaDrift
from lightning_localsgd.strategy import LocalSGDStrategy

__version__ = "0.1.0"

__all__ = [
    "AsyncLocalSGDStrategy",
    "AsyncTrainingError",
    "CommCounters",
    "CommStats",
    "ConsensusAlgorithm",
    "DelayedNesterov",
    "DiLoCo",
    "ElasticAveraging",
    "GradAlign",
    "LeaderSGD",
    "LocalSGDStrategy",
    "ModifiedLocalGD",
    "NonFiniteReplicaError",
    "OuterSGD",
    "PeriodicAveraging",
    "ReplicaDrift",
    "ServerOptimizer",
]
