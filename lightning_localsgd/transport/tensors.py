"""Pure tensor math on lists of parameters: no communication happens here.

Everything an algorithm synchronizes is a list of tensors taken from the module by
:func:`sync_tensors`; the helpers below flatten, snapshot and combine such lists so that the
collectives in :mod:`lightning_localsgd.transport.collectives` can move one flat buffer per sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "BUFFER_POLICIES",
    "BufferPolicy",
    "FlatLayout",
    "Fragment",
    "all_finite",
    "any_nonfinite",
    "copy_",
    "flat_layout",
    "flatten",
    "flatten_into",
    "float_buffers",
    "host_copy",
    "lerp_",
    "local",
    "local_parameters",
    "partition",
    "pseudo_gradient",
    "snapshot",
    "sq_distance",
    "sync_tensors",
    "unflatten_",
    "views",
]

BufferPolicy = Literal["average", "broadcast", "local"]
BUFFER_POLICIES: tuple[str, ...] = ("average", "broadcast", "local")


def local(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds: a DTensor's local shard (FSDP2), any other tensor itself.

    The shard is the DTensor's own local tensor (the same object at every call, sharing storage with
    the parameter): writing into it in place writes the parameter, so an algorithm that averages,
    snapshots and overwrites the tensors of :func:`sync_tensors` works on shards unchanged, and a
    sharded replica's algorithm state is 1/k of the model per rank.
    """
    inner = getattr(tensor, "_local_tensor", None)  # torch.distributed.tensor.DTensor
    return tensor if inner is None else inner


def local_parameters(module: nn.Module, trainable_only: bool = False) -> list[Tensor]:
    """The module's parameters as this rank holds them (:func:`local`), optionally only those that require grad."""
    return [local(p) for p in module.parameters() if p.requires_grad or not trainable_only]


def float_buffers(module: nn.Module) -> list[Tensor]:
    """Floating-point buffers (e.g. BatchNorm running mean/var), in ``module.buffers()`` order.

    Integer buffers such as ``num_batches_tracked`` are excluded: averaging a counter
    arithmetically is meaningless, so they always stay local.
    """
    return [b for b in module.buffers() if torch.is_floating_point(b)]


def sync_tensors(module: nn.Module, buffers: BufferPolicy) -> tuple[list[Tensor], list[Tensor]]:
    """Split the module's state into ``(averaged, broadcast)`` tensor lists for a sync.

    Parameters are always averaged (as this rank holds them: a sharded parameter's local shard);
    floating buffers follow ``buffers``: ``"average"`` puts them
    with the parameters, ``"broadcast"`` takes rank 0's copy, ``"local"`` leaves them out.
    """
    params = local_parameters(module)
    bufs = float_buffers(module)
    if buffers == "average":
        return params + bufs, []
    if buffers == "broadcast":
        return params, bufs
    return params, []


def flatten(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Concatenate ``tensors`` into one new 1-D tensor (detached), optionally cast to ``dtype``."""
    if not tensors:
        return torch.empty(0, dtype=dtype or torch.float32)
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    return flat if dtype is None else flat.to(dtype)


@torch.no_grad()
def flatten_into(tensors: Sequence[Tensor], out: Tensor) -> Tensor:
    """Copy ``tensors`` into the preallocated 1-D ``out`` (casting), without allocating."""
    offset = 0
    for t in tensors:
        n = t.numel()
        out[offset : offset + n].copy_(t.detach().reshape(-1))
        offset += n
    if offset != out.numel():
        raise ValueError(f"out has {out.numel()} values but the tensors hold {offset}")
    return out


@torch.no_grad()
def unflatten_(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy the 1-D ``flat`` back into ``tensors`` in place (casting to each tensor's dtype)."""
    total = sum(t.numel() for t in tensors)
    if total != flat.numel():
        raise ValueError(f"flat buffer has {flat.numel()} values but the tensors hold {total}")
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def snapshot(tensors: Sequence[Tensor], device: torch.device | str | None = None) -> list[Tensor]:
    """Detached fp32-or-wider copies of ``tensors`` (the anchor an outer optimizer works on)."""
    out = []
    for t in tensors:
        dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
        out.append(t.detach().to(device=device or t.device, dtype=dtype, copy=True))
    return out


def host_copy(tensor: Tensor) -> Tensor:
    """A copy of ``tensor`` in host memory, pinned when an accelerator is present (fast, asynchronous copies)."""
    out = tensor.detach().to("cpu", copy=True)
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6; torch.cuda before
    present = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return out.pin_memory() if present else out


@torch.no_grad()
def copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``dst[k] ← src[k]`` for every k (casting and moving as needed)."""
    for d, s in zip(dst, src, strict=True):
        d.copy_(s)


@torch.no_grad()
def lerp_(x: Sequence[Tensor], target: Sequence[Tensor], weight: float) -> None:
    """``x ← (1 − weight)·x + weight·target`` in place."""
    for a, b in zip(x, target, strict=True):
        a.lerp_(b.to(a), weight)


def pseudo_gradient(anchor: Sequence[Tensor], local: Sequence[Tensor]) -> list[Tensor]:
    """``anchor − local`` per tensor: the "gradient" an outer optimizer steps on (DiLoCo)."""
    return [a - b.to(a) for a, b in zip(anchor, local, strict=True)]


def any_nonfinite(values: Tensor) -> Tensor:
    """A 0-d bool tensor on the values' device: whether any value is NaN or ±Inf (no host read).

    One pass, no temporary: ``torch.aminmax`` propagates NaN to both ends, and an infinity is the
    minimum (−Inf) or the maximum (+Inf), so the values are all finite iff both ends are. This is
    20–40× faster than ``~torch.isfinite(values).all()`` on a CPU (1.8 ms against 53 ms for 11.2 M
    float32 values, one thread), which builds a bool tensor of the values' size in several passes;
    a sync checks every replica's values, so this was most of a blocking sync's local work.
    """
    if not values.is_floating_point() and not values.is_complex():
        return torch.zeros((), dtype=torch.bool, device=values.device)  # integers are finite
    if values.numel() == 0 or values.is_complex():
        return ~torch.isfinite(values).all()
    low, high = torch.aminmax(values)
    return ~(torch.isfinite(low) & torch.isfinite(high))


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """True when no tensor holds NaN or ±Inf."""
    return not any(bool(any_nonfinite(t)) for t in tensors)


def sq_distance(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """``Σ_k ||a_k − b_k||²`` as a Python float (accumulated in float64)."""
    total = 0.0
    for x, y in zip(a, b, strict=True):
        total += float((x.detach().double() - y.detach().double()).pow(2).sum())
    return total


def views(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """``flat`` cut into views shaped like ``like`` (no copy)."""
    sizes = [t.numel() for t in like]
    if sum(sizes) != flat.numel():
        raise ValueError(f"flat tensor has {flat.numel()} values but the tensors hold {sum(sizes)}")
    return [c.view_as(t) for c, t in zip(flat.split(sizes), like, strict=True)]


@dataclass(frozen=True)
class Fragment:
    """Values ``offset : offset + numel`` of a sync list's flat layout.

    ``spans`` lists ``(tensor index, first, stop)`` for every tensor the range touches, in order;
    :meth:`tensors` gives the tensors it covers whole and 1-D views of those it covers in part.
    """

    index: int
    offset: int
    numel: int
    spans: tuple[tuple[int, int, int], ...]
    device: torch.device

    def tensors(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for i, first, stop in self.spans:
            t = tensors[i]
            if first == 0 and stop == t.numel():
                out.append(t)
            elif not t.is_contiguous():
                raise ValueError(
                    "fragments > 1 cut tensors into flat pieces and need contiguous parameters and buffers "
                    "(e.g. not channels_last): use fragments=1 or keep the model in contiguous memory format"
                )
            else:
                out.append(t.view(-1)[first:stop])
        return out


def partition(tensors: Sequence[Tensor], parts: int, layout: FlatLayout | None = None) -> list[Fragment]:
    """Cut the flat layout of ``tensors`` (module order) into ``parts`` contiguous ranges of equal size.

    Range k holds values ``⌊kN/P⌋ : ⌊(k+1)N/P⌋`` of the N values, so no range exceeds ⌈N/P⌉
    values; a range may end inside a tensor (tensor sizes are uneven: for resnet18 the best cut at
    tensor boundaries leaves 32% of the model in one of 4 groups).

    ``layout`` (:func:`flat_layout`): the tensors are this rank's shards of a sharded replica. The
    ranges are then cut in the *whole* model's flat layout, exactly as for the unsharded replica,
    and each rank's fragment k is the part of range k it holds: a contiguous run of its own flat
    layout (shards of dim-0 chunks keep the whole layout's order), possibly empty (a fragment with
    one zero-length span then, so that every rank of a node takes part in every fragment's sync).
    """
    sizes = [t.numel() for t in tensors]
    local_starts = [0]
    for n in sizes:
        local_starts.append(local_starts[-1] + n)
    starts, total = (local_starts[:-1], local_starts[-1]) if layout is None else layout
    if parts > max(total, 1):
        raise ValueError(f"fragments={parts} but the model synchronizes only {total} values: use fragments <= {total}")
    device = tensors[0].device if tensors else torch.device("cpu")
    out = []
    for k in range(parts):
        lo, hi = k * total // parts, (k + 1) * total // parts
        spans = tuple(
            (i, max(lo, starts[i]) - starts[i], min(hi, starts[i] + sizes[i]) - starts[i])
            for i in range(len(sizes))
            if starts[i] < hi and starts[i] + sizes[i] > lo
        )
        if spans:
            offset = local_starts[spans[0][0]] + spans[0][1]
        else:  # nothing of range k on this rank: an empty run where it would be
            i = next((i for i in range(len(sizes)) if starts[i] >= hi), max(len(sizes) - 1, 0))
            spans = ((i, 0, 0),) if sizes else ()
            offset = local_starts[i] if sizes else 0
        out.append(Fragment(k, offset, sum(stop - first for _, first, stop in spans), spans, device))
    return out


FlatLayout = tuple[list[int], int]
"""Where each tensor of a sync list starts in the whole model's flat layout, and that layout's size."""


def flat_layout(module: nn.Module, buffers: BufferPolicy) -> FlatLayout | None:
    """The whole-model positions of :func:`sync_tensors`' averaged list (``None``: nothing is sharded).

    A DTensor shard's values are a contiguous run of the whole parameter's (dim-0 chunks, FSDP2),
    starting at the shard's global offset; an unsharded tensor starts where it would in the whole layout.
    """
    tensors = list(module.parameters()) + (float_buffers(module) if buffers == "average" else [])
    if not any(hasattr(t, "_local_tensor") for t in tensors):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    starts, position = [], 0
    for t in tensors:
        start = position
        if hasattr(t, "_local_tensor") and t.dim() > 0:
            _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
            stride = torch.empty(t.shape, device="meta").stride()  # the whole tensor's, contiguous
            start += sum(o * s for o, s in zip(offset, stride, strict=True))
        starts.append(start)
        position += t.numel()
    return starts, position
