"""The wheel: what it installs and the console script it declares (pyproject.toml and setup.py).

The wheel is built offline from a copy of the packaging files (the source tree gets no build/ or
egg-info), with the setuptools of the running environment, and unpacked to check that the recipes
run under their installed name.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("setuptools", minversion="77")  # `license` as an SPDX string (pyproject.toml's build-system)

pytestmark = pytest.mark.launches  # starts a build and a Python process (a few seconds each)

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "setup.py", "README.md", "lightning_localsgd", "recipes"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """(path of the wheel, everything the build printed)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "dist"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, src / name)
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(out)], cwd=src, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = out.glob("*.whl")
    return path, done.stdout + done.stderr


def test_wheel_installs_the_library_and_the_namespaced_recipes_only(wheel):
    path, log = wheel
    names = zipfile.ZipFile(path).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"lightning_localsgd", "lightning_localsgd_recipes"}
    assert not [n for n in names if n.startswith("recipes/")], "a top-level recipes package would shadow others"
    # every module of the folder recipes/ ships under the new name, every library package is found
    shipped = {n.split("/", 1)[1] for n in names if n.startswith("lightning_localsgd_recipes/")}
    assert shipped == {p.name for p in (ROOT / "recipes").glob("*.py")}
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "lightning_localsgd").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= set(names)
    assert "deprecat" not in log.lower(), log  # e.g. `project.license` as a TOML table


def test_wheel_metadata_license_and_console_script(wheel):
    path, _ = wheel
    archive = zipfile.ZipFile(path)
    (info,) = {n.split("/")[0] for n in archive.namelist() if n.split("/")[0].endswith(".dist-info")}
    metadata = archive.read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    entry_points = configparser.ConfigParser()
    entry_points.read_string(archive.read(f"{info}/entry_points.txt").decode())
    assert dict(entry_points["console_scripts"]) == {"lightning-localsgd": "lightning_localsgd_recipes.cli:main"}


def test_installed_recipes_parse_the_configs_under_their_own_name(wheel, tmp_path):
    """The console script's module, unpacked from the wheel, parses configs/ (``class_path: DigitsDataModule``)
    without importing the checkout's ``recipes``: one copy of the recipes per process."""
    path, _ = wheel
    site = tmp_path / "site"
    zipfile.ZipFile(path).extractall(site)
    configs = ROOT / "configs" / "image_classification"
    check = f"""
import sys
from lightning_localsgd_recipes.cli import cli, main
parsed = cli(["--config", {str(configs / "base.yaml")!r}, "--config", {str(configs / "localsgd.yaml")!r},
           "--trainer.accelerator=cpu", "--trainer.default_root_dir={tmp_path}"], run=False)
assert type(parsed.datamodule).__module__ == "lightning_localsgd_recipes.data", type(parsed.datamodule)
assert type(parsed.model).__module__ == "lightning_localsgd_recipes.image_classification", type(parsed.model)
assert not [m for m in sys.modules if m == "recipes" or m.startswith("recipes.")], "the recipes loaded twice"
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")  # not the checkout: cwd is tmp_path
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
