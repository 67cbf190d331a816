"""Test selection: ``make test`` runs everything; ``make test-fast`` (``pytest -m "not launches"``) skips
the tests that start processes (real gloo ranks, torchrun, benchmark or demo runs) or train for long.

A test is marked ``launches`` when it carries ``@pytest.mark.launches`` itself, or when a launcher
(``run_ranks``, ``RankPool``, ``run_local_ranks``, ``launch_ranks`` of benchmarks/common.py, ``subprocess``, ...)
is named in its code, in the code of a function of its own module that it calls (transitively), or
in the code of one of its fixtures (and what they call). The rank processes that ``run_ranks``
shares between tests (tests/launch.py) are stopped at the end of the session.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest

LAUNCHERS = {
    "run_ranks",
    "run_local_ranks",
    "launch_ranks",
    "subprocess",
    "run_torchrun",
    "run_attempt",
    "run_job",
    "RankPool",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "launches: starts processes or trains for long (skipped by make test-fast)")


def _names(code: types.CodeType) -> set[str]:
    """Every global or attribute name used in ``code`` and the functions, lambdas and comprehensions in it."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def launches(function: Callable[..., Any], seen: set[Any] | None = None) -> bool:
    """Whether ``function`` names a launcher, directly or through functions of its own module it calls."""
    seen = set() if seen is None else seen
    function = getattr(function, "__wrapped__", function)
    code = getattr(function, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    names = _names(code)
    if names & LAUNCHERS:
        return True
    module_globals = getattr(function, "__globals__", {})
    helpers = [module_globals.get(name) for name in names]
    return any(
        isinstance(helper, types.FunctionType) and helper.__module__ == function.__module__ and launches(helper, seen)
        for helper in helpers
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        functions = [getattr(item, "function", None)]
        info = getattr(item, "_fixtureinfo", None)
        for name in getattr(item, "fixturenames", ()):
            for fixturedef in info.name2fixturedefs.get(name, ()) if info is not None else ():
                functions.append(fixturedef.func)
        if any(f is not None and launches(f) for f in functions):
            item.add_marker(pytest.mark.launches)


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.launch import shutdown_pools

    shutdown_pools()
