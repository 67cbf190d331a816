"""Side streams for the syncs that run in the background, on any accelerator with streams (CUDA, XPU, ...).

On an accelerator, kernels run in the order of their *stream*, not of the Python threads that
issue them. A background sync issued on the default stream would queue its collective between the
training step's kernels, and a blocking NCCL collective there stalls every kernel queued after it:
no overlap. So the comm thread issues its work on a stream of its own, ordered against training by
events:

1. the training thread snapshots the values to send (a copy on its stream) and records an event;
2. the comm thread makes its side stream wait for that event, then runs the sync there;
3. it records a second event when the mean is ready; the training thread's stream waits for it
   (:meth:`~lightning_localsgd.transport.collectives.PendingMean.wait`) before the merge reads it.

The tensors the side stream reads (the snapshot, the anchor, the residual) stay referenced until
that wait, so the caching allocator never hands their memory to the training stream early. On
the CPU (and on devices without streams) nothing of this applies: the comm thread's work runs
when the thread runs it.

Written against ``torch.get_device_module(device)`` (``.Stream``, ``.current_stream``, ``.stream``),
the device-neutral face of ``torch.cuda`` / ``torch.xpu``. Not yet run on a GPU in this project's
tests: ``make gpu-check`` (benchmarks/gpu_check.py) exercises it where a GPU exists.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["StreamOrder", "side_stream"]


def side_stream(device: torch.device) -> Any | None:
    """A new stream on ``device`` (``None`` on the CPU or a device without streams)."""
    if device.type == "cpu":
        return None
    module = torch.get_device_module(device)
    if not hasattr(module, "Stream") or not hasattr(module, "current_stream"):
        return None
    return module.Stream(device=device)


class StreamOrder:
    """The two events that order one background sync against the training stream (no-ops on the CPU).

    ``StreamOrder(device, side)`` is made on the training thread right after the snapshot was
    copied: it records that copy. The comm thread runs the sync inside :meth:`on_side`; the
    training thread calls :meth:`join` before it reads the result.
    """

    def __init__(self, device: torch.device, side: Any | None) -> None:
        self.side = side
        self.module = None if side is None else torch.get_device_module(device)
        self.device = device
        self.ready = None if side is None else self.module.current_stream(device).record_event()
        self.done: Any | None = None

    @contextmanager
    def on_side(self) -> Iterator[None]:
        """Run the block on the side stream, after the snapshot; record ``done`` at its end."""
        if self.side is None:
            yield
            return
        self.side.wait_event(self.ready)
        with self.module.stream(self.side):
            yield
            self.done = self.side.record_event()

    def join(self) -> None:
        """Make the training thread's current stream wait for the sync's last kernel."""
        if self.done is not None:
            self.module.current_stream(self.device).wait_event(self.done)
