"""Every rank's dataloader position in the checkpoint, so a mid-epoch restart resumes each rank exactly.

Lightning saves a stateful dataloader's state (``torchdata``'s ``StatefulDataLoader``: the sampler's
generator state and how many samples it yielded) under ``loops.fit_loop.state_dict.combined_loader``,
but the checkpoint file is written by rank 0, so every rank resumes with *rank 0's* position. That is
right only when all ranks shuffle with the same generator. Local SGD recipes shuffle each rank's shard
with its own seed (``seed + rank``), so the restarted ranks 1..n-1 would replay rank 0's order.

:class:`PerRankLoaderState` gathers every rank's loader state into the checkpoint when it is saved
(``Trainer.save_checkpoint`` runs the callbacks on every rank, so a collective is allowed there) and
hands each rank its own back before Lightning restores the loops. On another world size the saved
positions do not map onto the new ranks: every rank then keeps rank 0's, with a warning.

Example::

    trainer = Trainer(strategy="localsgd", callbacks=[PerRankLoaderState(), ModelCheckpoint(...)])
    trainer.fit(model, StatefulDataLoader(shard, batch_size=32, shuffle=True, generator=g), ckpt_path="last")
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

_KEY = "per_rank_loader_states"


def _loop_loader_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The fit loop's state dict in ``checkpoint`` (where Lightning keeps ``combined_loader``)."""
    return checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict")


class PerRankLoaderState(Callback):
    """Save every rank's training-dataloader state; on resume each rank continues from its own."""

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        loop = _loop_loader_state(checkpoint)
        mine = None if loop is None else loop.get("combined_loader")
        world = trainer.world_size
        if world > 1 and dist.is_available() and dist.is_initialized():
            states: list[Any] | None = [None] * world if trainer.global_rank == 0 else None
            dist.gather_object(mine, states, dst=0)
        else:
            states = [mine]
        if trainer.global_rank == 0:
            checkpoint[_KEY] = {"world_size": world, "ranks": states}

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(_KEY)
        loop = _loop_loader_state(checkpoint)
        if saved is None or loop is None:
            return
        if saved["world_size"] != trainer.world_size:
            rank_zero_warn(
                f"The checkpoint holds the dataloader positions of {saved['world_size']} ranks but this run has "
                f"{trainer.world_size}: every rank resumes from rank 0's position."
            )
            return
        mine = saved["ranks"][trainer.global_rank]
        if mine is None:
            loop.pop("combined_loader", None)
        else:
            loop["combined_loader"] = mine
