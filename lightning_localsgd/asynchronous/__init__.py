"""The asynchronous wing: Local-SGD with a parameter server, no lockstep (seed 001).

==============  ================================================================================
module          what it holds
==============  ================================================================================
``strategy``    :class:`AsyncLocalSGDStrategy` (``strategy="async_localsgd"``), a Trainer strategy
``server``      the parameter server on rank 0 and its in-process client (rank 0's own worker)
``worker``      one worker's rounds: H_i local steps, push, adopt the reply
``protocol``    the request/reply messages between workers and the server
``guards``      keeping Lightning's per-step collectives off an asynchronous run
``optimizers``  the server's outer optimizers: :class:`DelayedNesterov`, :class:`OuterSGD`
==============  ================================================================================

The wing depends on the core (transport, engine, the Trainer's ``ReplicaStrategy``); nothing in the
core imports it.
"""

from lightning_localsgd.asynchronous.optimizers import DelayedNesterov, OuterSGD, ServerOptimizer
from lightning_localsgd.asynchronous.protocol import AsyncTrainingError
from lightning_localsgd.asynchronous.strategy import AsyncLocalSGDStrategy

__all__ = ["AsyncLocalSGDStrategy", "AsyncTrainingError", "DelayedNesterov", "OuterSGD", "ServerOptimizer"]
