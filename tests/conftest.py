"""Test selection: ``make test`` runs everything; ``make test-fast`` (``pytest -m "not launches"``) skips
the tests that start processes (real gloo ranks, torchrun, benchmark or demo runs) or train for long.

A test is marked ``launches`` when its code calls a launcher (``run_ranks``, ``run_local_ranks``,
``launch_ranks`` of benchmarks/common.py, ``subprocess``) or it carries ``@pytest.mark.launches`` itself.
"""

from __future__ import annotations

import pytest

LAUNCHERS = {"run_ranks", "run_local_ranks", "launch_ranks", "subprocess", "run_torchrun", "run_attempt", "run_job"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "launches: starts processes or trains for long (skipped by make test-fast)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        function = getattr(item, "function", None)
        names = set(getattr(getattr(function, "__code__", None), "co_names", ()))
        if names & LAUNCHERS:
            item.add_marker(pytest.mark.launches)
