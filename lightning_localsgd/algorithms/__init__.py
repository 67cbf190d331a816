"""Consensus algorithms (one per run) and gradient modifiers: one file each, the math in each docstring."""

from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.algorithms.delayed_nesterov import DelayedNesterov, OuterSGD, ServerOptimizer
from lightning_localsgd.algorithms.diloco import DiLoCo
from lightning_localsgd.algorithms.elastic import ElasticAveraging
from lightning_localsgd.algorithms.gradalign import GradAlign
from lightning_localsgd.algorithms.leader import LeaderSGD
from lightning_localsgd.algorithms.modified_localgd import ModifiedLocalGD
from lightning_localsgd.algorithms.periodic import PeriodicAveraging

__all__ = [
    "ConsensusAlgorithm",
    "DelayedNesterov",
    "DiLoCo",
    "ElasticAveraging",
    "GradAlign",
    "LeaderSGD",
    "ModifiedLocalGD",
    "OuterSGD",
    "PeriodicAveraging",
    "ServerOptimizer",
]
