"""Module paths of before 0.2, kept importable as the very same module objects.

The package was flat until 0.2 (``lightning_localsgd.comm``, ``.strategy``, ``.async_server``, ...).
Each old path is registered in ``sys.modules`` as an alias of the module that now holds the code
(Lightning's ``_graveyard`` approach), so ``import lightning_localsgd.comm``, a YAML ``class_path``
through an old module, ``isinstance`` checks, pickles and ``monkeypatch.setattr`` on an old path all
reach the same objects. ``lightning_localsgd.fault_tolerance`` was a module and is now a package that
exports the same names. Runs once, at the end of ``lightning_localsgd/__init__.py``.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["MOVED"]

MOVED: dict[str, str] = {
    "lightning_localsgd.comm": "lightning_localsgd.transport.collectives",
    "lightning_localsgd.quantize": "lightning_localsgd.transport.quantize",
    "lightning_localsgd.params": "lightning_localsgd.transport.tensors",
    "lightning_localsgd.process_group": "lightning_localsgd.transport.process_group",
    "lightning_localsgd.replica_strategy": "lightning_localsgd.trainer.replica",
    "lightning_localsgd.strategy": "lightning_localsgd.trainer.strategy",
    "lightning_localsgd.sigterm": "lightning_localsgd.trainer.sigterm",
    "lightning_localsgd.monitors": "lightning_localsgd.trainer.monitors",
    "lightning_localsgd.async_strategy": "lightning_localsgd.asynchronous.strategy",
    "lightning_localsgd.async_server": "lightning_localsgd.asynchronous.server",
    "lightning_localsgd.async_worker": "lightning_localsgd.asynchronous.worker",
    "lightning_localsgd.async_protocol": "lightning_localsgd.asynchronous.protocol",
    "lightning_localsgd.async_guards": "lightning_localsgd.asynchronous.guards",
    "lightning_localsgd.algorithms.delayed_nesterov": "lightning_localsgd.asynchronous.optimizers",
    "lightning_localsgd.ft_session": "lightning_localsgd.fault_tolerance.session",
    "lightning_localsgd.ft_collectives": "lightning_localsgd.fault_tolerance.collectives",
    "lightning_localsgd.ft_state": "lightning_localsgd.fault_tolerance.state",
}
"""Old module path → the module that holds its code now."""

#: Names a module exported before 0.2 that now live elsewhere (where the import direction forbids a re-export).
_MOVED_NAMES = {
    "lightning_localsgd.algorithms": (
        "lightning_localsgd.asynchronous.optimizers",
        ("DelayedNesterov", "OuterSGD", "ServerOptimizer"),
    ),
    # rank 0's in-process client moved beside the server (the protocol module cannot import it back)
    "lightning_localsgd.asynchronous.protocol": ("lightning_localsgd.asynchronous.server", ("LocalClient",)),
}


def _bury() -> None:
    for old, new in MOVED.items():
        module = importlib.import_module(new)
        sys.modules[old] = module
        parent, _, name = old.rpartition(".")
        setattr(sys.modules[parent], name, module)
    for package, (source, names) in _MOVED_NAMES.items():
        module = importlib.import_module(source)
        for name in names:
            setattr(sys.modules[package], name, getattr(module, name))


_bury()
