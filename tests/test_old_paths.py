"""Every module path of before 0.2 still imports, as the very same module object (lightning_localsgd/_graveyard.py)."""

from __future__ import annotations

import importlib
import pickle
import subprocess
import sys

import pytest

import lightning_localsgd
from lightning_localsgd._graveyard import MOVED
from tests.launch import ROOT

OLD_NAMES = {  # the old module -> names users imported from it
    "lightning_localsgd.comm": ["Collectives", "CommCounters", "Group", "CollectiveError", "NonFiniteReplicaError"],
    "lightning_localsgd.params": ["flatten", "unflatten_", "Fragment", "partition"],
    "lightning_localsgd.strategy": ["LocalSGDStrategy"],
    "lightning_localsgd.replica_strategy": ["ReplicaStrategy", "DEFAULT_TIMEOUT", "loader_state"],
    "lightning_localsgd.async_strategy": ["AsyncLocalSGDStrategy"],
    "lightning_localsgd.async_protocol": ["AsyncTrainingError", "MessageType", "RemoteClient", "LocalClient"],
    "lightning_localsgd.algorithms.delayed_nesterov": ["DelayedNesterov", "OuterSGD", "ServerOptimizer"],
    "lightning_localsgd.monitors": ["CommStats", "ReplicaDrift"],
    "lightning_localsgd.ft_session": ["ReplicaGroupSession"],
}


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_each_old_module_path_is_the_new_module(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)
    parent, _, name = old.rpartition(".")
    assert getattr(importlib.import_module(parent), name) is importlib.import_module(new)  # attribute access too


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_names_users_imported_from_old_paths_are_the_public_objects(old):
    module = importlib.import_module(old)
    for name in OLD_NAMES[old]:
        obj = getattr(module, name)
        if hasattr(lightning_localsgd, name):
            assert obj is getattr(lightning_localsgd, name), name


def test_names_that_moved_between_packages_still_resolve():
    from lightning_localsgd.algorithms import DelayedNesterov, OuterSGD, ServerOptimizer
    from lightning_localsgd.algorithms.base import check_positive_int
    from lightning_localsgd.engine import CHECKPOINT_KEY, RankResume, ResumeState, average_optimizer_states
    from lightning_localsgd.fault_tolerance import INSTALL_HINT, FaultToleranceError, TorchFT, start_lighthouse
    from lightning_localsgd.process_group import DEFAULT_COLLECTIVE_TIMEOUT, DEFAULT_INIT_TIMEOUT
    from lightning_localsgd.resume import CHECKPOINT_KEY as key
    from lightning_localsgd.resume import RankResume as rank_resume
    from lightning_localsgd.resume import ResumeState as resume_state
    from lightning_localsgd.resume import average_optimizer_states as average
    from lightning_localsgd.transport.collectives import CommCounters

    assert (DelayedNesterov, OuterSGD, ServerOptimizer) == (
        lightning_localsgd.DelayedNesterov,
        lightning_localsgd.OuterSGD,
        lightning_localsgd.ServerOptimizer,
    )
    assert (CHECKPOINT_KEY, RankResume, ResumeState, average_optimizer_states) == (
        key,
        rank_resume,
        resume_state,
        average,
    )
    assert (FaultToleranceError, TorchFT, start_lighthouse) == (
        lightning_localsgd.FaultToleranceError,
        lightning_localsgd.TorchFT,
        lightning_localsgd.start_lighthouse,
    )
    assert "torchft" in INSTALL_HINT and DEFAULT_INIT_TIMEOUT.total_seconds() == 300
    assert DEFAULT_COLLECTIVE_TIMEOUT.total_seconds() == 600
    assert check_positive_int("x", 3) == 3
    counters = CommCounters()
    counters.add("sync", 10.0, 0.5)
    assert counters.bytes_by_kind is counters.bytes_by_purpose and counters.bytes_by_kind["sync"] == 10.0


def test_monkeypatching_an_old_path_reaches_the_code_that_runs(monkeypatch):
    import lightning_localsgd.comm
    from lightning_localsgd.transport import collectives

    monkeypatch.setattr(lightning_localsgd.comm, "INT_FORMATS", ("int8",))
    assert collectives.INT_FORMATS == ("int8",)


def test_pickles_and_yaml_class_paths_of_old_modules_load():
    from jsonargparse import ArgumentParser

    from lightning_localsgd.asynchronous.protocol import MessageType

    assert pickle.loads(pickle.dumps(MessageType.PUSH)) is MessageType.PUSH
    old = b"clightning_localsgd.async_protocol\nMessageType\n."  # a pickle written before 0.2 (GLOBAL, STOP)
    assert pickle.loads(old) is MessageType
    parser = ArgumentParser()
    parser.add_argument("--optimizer", type=lightning_localsgd.ServerOptimizer)
    cfg = parser.parse_args(
        ["--optimizer", '{"class_path": "lightning_localsgd.algorithms.delayed_nesterov.DelayedNesterov"}']
    )
    assert isinstance(parser.instantiate_classes(cfg).optimizer, lightning_localsgd.DelayedNesterov)


def test_an_old_path_imports_first_in_a_fresh_interpreter():
    code = "import lightning_localsgd.async_server as m, lightning_localsgd.asynchronous.server as n; print(m is n)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr
