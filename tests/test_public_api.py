"""The public API: every library module says what it exports; the top-level names are the documented ones."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import lightning_localsgd

PACKAGE = Path(lightning_localsgd.__file__).parent
MODULES = sorted(
    ".".join(("lightning_localsgd", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
)


@pytest.mark.parametrize("name", MODULES)
def test_every_module_defines_all_and_every_name_in_it_exists(name):
    module = importlib.import_module(name)
    assert isinstance(module.__all__, list | tuple), f"{name} has no __all__"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert missing == [], f"{name}.__all__ names what it does not define: {missing}"


def test_the_top_level_names_are_the_documented_api():
    documented = {  # ../shared/DESIGN.md's public API, the contract types and the names earlier releases added
        "LocalSGDStrategy", "AsyncLocalSGDStrategy", "PeriodicAveraging", "DiLoCo", "ModifiedLocalGD", "LeaderSGD",
        "ElasticAveraging", "GradAlign", "DelayedNesterov", "OuterSGD", "ServerOptimizer", "CommStats", "ReplicaDrift",
        "ConsensusAlgorithm", "GradientModifier", "RoundPosition", "StepReport", "SyncContext", "SyncEvent",
        "SyncObserver", "SyncEngine", "CollectiveError", "CommCounters", "NonFiniteReplicaError", "AsyncTrainingError",
        "FaultToleranceError", "TorchFT", "start_lighthouse", "AtomicCheckpointIO", "AutoTune",
    }  # fmt: skip
    assert set(lightning_localsgd.__all__) == documented
    assert all(hasattr(lightning_localsgd, name) for name in documented)
