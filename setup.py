"""The package list of the wheel (everything else is in pyproject.toml, which explains the layout).

The library's packages are found on disk; the folder recipes/ is installed as ``lightning_localsgd_recipes``,
never as a top-level ``recipes``.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["lightning_localsgd", "lightning_localsgd.*"]), "lightning_localsgd_recipes"],
    package_dir={"lightning_localsgd_recipes": "recipes"},
)
