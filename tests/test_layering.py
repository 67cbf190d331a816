"""The import rules of tests/layering.py hold, and the checker catches what it is meant to catch."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import layering


def test_every_import_goes_one_way():
    assert [str(v) for v in layering.violations()] == []


@pytest.mark.parametrize(
    ("module", "source", "why"),
    [
        (
            "transport/bad.py",
            "def f():\n    from lightning_localsgd.algorithms.base import ConsensusAlgorithm\n",
            "upward",
        ),
        ("algorithms/bad.py", "from lightning_localsgd.trainer.strategy import LocalSGDStrategy\n", "upward"),
        ("fabric_bad.py", "", None),  # a new root module outside LAYERS is reported (below)
        ("trainer/bad.py", "from lightning_localsgd import fabric\n", "upward"),
        ("trainer/bad2.py", "from lightning_localsgd.fabric import LocalSGDStrategy\n", "independent siblings"),
        ("asynchronous/bad.py", "from lightning_localsgd.fault_tolerance import TorchFT\n", "independent siblings"),
        ("engine_bad.py", "", None),
        (
            "algorithms/bad3.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lightning_localsgd.asynchronous\n",
            "upward",
        ),
        ("algorithms/bad4.py", "import torch.distributed as dist\n", "only transport/"),
        ("transport/bad5.py", "from lightning.pytorch import Trainer\n", "must not depend on Lightning"),
        ("transport/bad6.py", "from ..algorithms import base\n", "upward"),
        ("algorithms/bad7.py", "import recipes.data\n", "never imports recipes"),
    ],
)
def test_the_checker_reports_an_upward_or_sideways_import(tmp_path: Path, monkeypatch, module, source, why):
    """Each bad import, written into a copy of the package, is reported with its reason."""
    import shutil

    shutil.copytree(layering.ROOT / layering.PACKAGE, tmp_path / layering.PACKAGE)
    for folder in ("recipes", "benchmarks", "tests"):
        (tmp_path / folder).mkdir()
    target = tmp_path / layering.PACKAGE / module
    target.write_text(source or "import lightning_localsgd.transport\n")
    monkeypatch.setattr(layering, "ROOT", tmp_path)
    found = layering.violations(tmp_path)
    if why is None:
        assert [v.why for v in found] == [f"component {target.stem!r} is in no layer: add it to LAYERS"]
    else:
        assert len(found) == 1 and why in found[0].why, [str(v) for v in found]


def test_recipes_never_import_benchmarks_and_nothing_imports_tests(tmp_path: Path, monkeypatch):
    for folder in (layering.PACKAGE, "recipes", "benchmarks", "tests"):
        (tmp_path / folder).mkdir()
    (tmp_path / "recipes" / "a.py").write_text("from benchmarks.common import fmt\n")
    (tmp_path / "benchmarks" / "b.py").write_text("from tests.launch import run_ranks\nimport recipes.a\n")
    monkeypatch.setattr(layering, "ROOT", tmp_path)
    assert sorted(v.why for v in layering.violations(tmp_path)) == [
        "imports go benchmarks -> recipes -> lightning_localsgd",
        "nothing imports tests",
    ]
