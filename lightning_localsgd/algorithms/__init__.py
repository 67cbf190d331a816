"""Consensus algorithms (one per run) and gradient modifiers: one file each, the math in each docstring.

The async server's outer optimizers (``DelayedNesterov``, ``OuterSGD``) live in the asynchronous
wing, :mod:`lightning_localsgd.asynchronous.optimizers`; the old names here still resolve (``_graveyard``).
"""

from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.algorithms.diloco import DiLoCo
from lightning_localsgd.algorithms.elastic import ElasticAveraging
from lightning_localsgd.algorithms.gradalign import GradAlign
from lightning_localsgd.algorithms.leader import LeaderSGD
from lightning_localsgd.algorithms.modified_localgd import ModifiedLocalGD
from lightning_localsgd.algorithms.periodic import PeriodicAveraging

__all__ = [
    "ConsensusAlgorithm",
    "DiLoCo",
    "ElasticAveraging",
    "GradAlign",
    "LeaderSGD",
    "ModifiedLocalGD",
    "PeriodicAveraging",
]
