"""The import rules of the project, checked on the source (every import: module level, in functions, under
``TYPE_CHECKING``). ``python -m tests.layering`` prints each violation and exits 1; CI runs it before the tests.

Inside the library a module may import its own component and the layers below it, never a layer above
it, and never a sibling in its own layer (siblings are independent)::

    lightning_localsgd (the public API, _graveyard)
    asynchronous | fault_tolerance           the two wings
    trainer | fabric                         the two front ends
    engine
    resume
    algorithms
    contract
    transport                                the wire: the only torch.distributed user (and the torchft wing's own)
    _checks | checkpoint_io                  leaves

Outside it: benchmarks -> recipes -> lightning_localsgd; tests may import all three; nothing imports tests.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lightning_localsgd"

LAYERS: list[tuple[str, ...]] = [
    ("_checks", "checkpoint_io"),
    ("transport",),
    ("contract",),
    ("algorithms",),
    ("resume",),
    ("tuning",),
    ("engine",),
    ("trainer", "fabric"),
    ("asynchronous", "fault_tolerance"),
    ("",),  # the package's __init__ and its _graveyard
]
"""The library's components, lowest layer first (names relative to ``lightning_localsgd``)."""

TORCH_DISTRIBUTED_USERS = ("transport", "fault_tolerance")
"""Components allowed to import ``torch.distributed``."""

NO_LIGHTNING = ("_checks", "transport")
"""Components that must not import Lightning (the wire knows tensors and groups only)."""

TOP_LEVEL = {"benchmarks": 2, "recipes": 1, PACKAGE: 0}
"""Folders outside the library: each may import those with a lower number (and itself); ``tests`` imports all."""


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    importer: str
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.importer} imports {self.imported}: {self.why}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, wherever it is."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:  # `from pkg import module` imports pkg.module when it is one
                yield node.lineno, f"{base}.{alias.name}"


def component(name: str) -> str | None:
    """The library component of a module name (``None`` outside the library)."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    rest = name[len(PACKAGE) + 1 :].split(".")[0] if name != PACKAGE else ""
    return "" if rest == "_graveyard" else rest  # the old-path aliases belong to the package root


def layer_of(comp: str) -> int | None:
    for index, members in enumerate(LAYERS):
        if comp in members:
            return index
    return None


def check_library_import(path: Path, line: int, importer: str, imported: str) -> Violation | None:
    mine, theirs = component(importer), component(imported)
    assert mine is not None
    if theirs is None:
        top = imported.split(".")[0]
        if top in TOP_LEVEL or top == "tests":
            return Violation(path, line, importer, imported, "the library never imports recipes or benchmarks or tests")
        if imported.startswith("torch.distributed") and mine not in TORCH_DISTRIBUTED_USERS:
            return Violation(
                path, line, importer, imported, "only transport/ (and the torchft wing) talk to torch.distributed"
            )
        if top == "lightning" and mine in NO_LIGHTNING:
            return Violation(path, line, importer, imported, f"{mine} must not depend on Lightning")
        return None
    if layer_of(mine) is None:
        return Violation(path, line, importer, imported, f"component {mine!r} is in no layer: add it to LAYERS")
    if theirs == mine:
        return None
    if layer_of(theirs) is None:  # a name imported from the package root (`from pkg import Name`) is checked as ""
        return None
    a, b = layer_of(mine), layer_of(theirs)
    assert a is not None and b is not None
    if b > a:
        return Violation(
            path, line, importer, imported, f"{mine!r} (layer {a}) imports upward into {theirs!r} (layer {b})"
        )
    if b == a:
        return Violation(path, line, importer, imported, f"{mine!r} and {theirs!r} are independent siblings")
    return None


def check_outside_import(path: Path, line: int, importer: str, imported: str) -> Violation | None:
    mine, theirs = importer.split(".")[0], imported.split(".")[0]
    if theirs == "tests" and mine != "tests":
        return Violation(path, line, importer, imported, "nothing imports tests")
    if mine in TOP_LEVEL and theirs in TOP_LEVEL and TOP_LEVEL[theirs] > TOP_LEVEL[mine]:
        return Violation(path, line, importer, imported, "imports go benchmarks -> recipes -> lightning_localsgd")
    return None


def violations(root: Path = ROOT) -> list[Violation]:
    found: list[Violation] = []
    folders = [PACKAGE, "recipes", "benchmarks", "tests"]
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            importer = module_name(path)
            for line, imported in imports(path):
                if folder == PACKAGE:
                    problem = check_library_import(path, line, importer, imported)
                else:
                    problem = check_outside_import(path, line, importer, imported)
                if problem is not None and all((v.path, v.line) != (path, line) for v in found):
                    found.append(problem)  # one report per import statement
    return found


def main() -> int:
    found = violations()
    for problem in found:
        print(problem)
    print(f"layering: {len(found)} violation(s)" if found else "layering: every import goes one way")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
