"""The Lightning Trainer front end: the strategy, its replica base, the SIGTERM glue and the monitors.

``strategy.LocalSGDStrategy`` (registered as ``"localsgd"``) drives a
:class:`~lightning_localsgd.engine.SyncEngine`; ``replica.ReplicaStrategy`` is what it shares with
the asynchronous strategy (groups, no DDP wrapper, checkpoints read once); ``sigterm`` holds the
library's one use of a private Lightning attribute; ``monitors`` has ``CommStats`` and
``ReplicaDrift``.
"""

from lightning_localsgd.trainer.monitors import CommStats, ReplicaDrift
from lightning_localsgd.trainer.replica import ReplicaStrategy
from lightning_localsgd.trainer.strategy import LocalSGDStrategy

__all__ = ["CommStats", "LocalSGDStrategy", "ReplicaDrift", "ReplicaStrategy"]
