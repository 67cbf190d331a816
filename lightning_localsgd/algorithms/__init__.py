"""Consensus algorithms: one file per algorithm, the math in each docstring."""

from lightning_localsgd.algorithms.base import ConsensusAlgorithm
from lightning_localsgd.algorithms.periodic import PeriodicAveraging

__all__ = ["ConsensusAlgorithm", "PeriodicAveraging"]
