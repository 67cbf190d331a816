"""lightning-localsgd: communication-efficient data-parallel training for PyTorch Lightning.

Importing the package registers the strategy names ``"localsgd"``, ``"localsgd_spawn"`` and
``"localsgd_bf16"`` with Lightning, so ``Trainer(strategy="localsgd")`` works.
"""

from lightning_localsgd.algorithms import (
    ConsensusAlgorithm,
    DiLoCo,
    ElasticAveraging,
    GradAlign,
    LeaderSGD,
    ModifiedLocalGD,
    PeriodicAveraging,
)
from lightning_localsgd.comm import CommCounters, NonFiniteReplicaError
from lightning_localsgd.monitors import CommStats, ReplicaDrift
from lightning_localsgd.strategy import LocalSGDStrategy

__version__ = "0.1.0"

__all__ = [
    "CommCounters",
    "CommStats",
    "ConsensusAlgorithm",
    "DiLoCo",
    "ElasticAveraging",
    "GradAlign",
    "LeaderSGD",
    "LocalSGDStrategy",
    "ModifiedLocalGD",
    "NonFiniteReplicaError",
    "PeriodicAveraging",
    "ReplicaDrift",
]
