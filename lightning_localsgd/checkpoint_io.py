"""Checkpoint files that are either the old one or the new one, never a torn mix, when the writer is killed.

Lightning's ``TorchCheckpointIO`` (``_atomic_save``) serializes into memory and writes through an
fsspec transaction. For local paths that means ``tempfile.mkstemp()`` in ``$TMPDIR`` and, at commit,
``shutil.move`` to the target. When ``$TMPDIR`` and the checkpoint directory are on one file system
the move is a ``rename``, which is atomic. When they are not (a tmpfs ``/tmp``, checkpoints on a
volume or NFS: common on clusters) ``shutil.move`` falls back to *copying into the target path*: the
existing ``last.ckpt`` is truncated first, and a process killed during the copy leaves a file that
``torch.load`` rejects — the previous good checkpoint is gone too. A killed writer also leaves its
temporary file behind in ``$TMPDIR``.

:class:`AtomicCheckpointIO` writes to a temporary file *in the checkpoint's own directory*, flushes
and ``fsync``s it, and ``os.replace``s it onto the target (then ``fsync``s the directory), so the
target is always a complete checkpoint: the previous one until the rename, the new one after. A
temporary file left by a killed writer is removed by the next save to the same path. Remote (fsspec)
paths keep Lightning's behaviour.

Example::

    trainer = Trainer(strategy=LocalSGDStrategy(checkpoint_io=AtomicCheckpointIO()), ...)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]

_TMP_MARK = ".tmp-"


def _is_local(path: _PATH) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(path), LocalFileSystem)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` such that ``path`` is never a partially written file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}{_TMP_MARK}*"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    tmp = target.parent / f".{target.name}{_TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash of the machine
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (see the module docstring)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, os.fspath(path))
