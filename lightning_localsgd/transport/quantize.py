r"""Integer transport: per-block absmax quantization to int8 or int4 (pure tensor math, no communication).

A flat vector is cut into blocks of :data:`BLOCK` values; each block travels as integers plus one
fp32 scale:

.. math::
    s_b = \max_{j \in b} |v_j| / L,\qquad q_j = \operatorname{round}(v_j / s_b) \in [-L, L],\qquad
    \hat v_j = s_b\, q_j

with :math:`L = 127` (int8) or :math:`L = 7` (int4, two values packed per byte). Round to nearest
gives :math:`|v_j - \hat v_j| \le s_b / 2 = \max_b |v| / (2L)`. A block of zeros has scale 0, and so
has a block whose scale would be below the smallest normal fp32 (:data:`TINY`, 1.2e-38: its largest
|v| is under 1.5e-36): its reciprocal would overflow to inf. Such a block travels as zeros and
error feedback keeps its values (they are owed, not lost).

Bytes per value on the wire: int8 :math:`1 + 4/128 \approx 1.03` (0.258 of fp32), int4
:math:`0.5 + 4/128 \approx 0.53` (0.133 of fp32).

A *packet* is the bytes of one chunk: the integers (int8, or int4 packed two per byte) followed by
the chunk's fp32 scales, so one ``uint8`` collective carries both.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["BLOCK", "CHUNK", "LEVELS", "TINY", "IntFormat", "dequantize", "packet_bytes", "quantize"]

IntFormat = Literal["int8", "int4"]
BLOCK = 128
LEVELS: dict[str, int] = {"int8": 127, "int4": 7}
TINY = torch.finfo(torch.float32).tiny
"""The smallest scale a block travels with (the smallest normal fp32); below it, the block is sent as zeros."""


def packet_bytes(numel: int, fmt: IntFormat) -> int:
    """Bytes of the packet of ``numel`` values (``numel`` a multiple of :data:`BLOCK`)."""
    ints = numel if fmt == "int8" else numel // 2
    return ints + 4 * (numel // BLOCK)


CHUNK = 1 << 20
"""Values per pass of :func:`quantize` / :func:`dequantize` (4 MiB of fp32): each pass runs on cache-resident
data, and a whole vector takes a few dozen kernel calls, not one per block."""


def _absmax_rows_(rows: Tensor) -> Tensor:
    """The largest value of each row of a ``(r, BLOCK)`` tensor of absolute values, reduced in place by halving
    (elementwise maxima over contiguous halves: exact, and several times faster than a row reduction on CPU)."""
    width = rows.shape[1]
    while width > 1:
        half = width // 2
        torch.maximum(rows[:, :half], rows[:, half:width], out=rows[:, :half])
        width = half
    return rows[:, 0]


def quantize(values: Tensor, fmt: IntFormat, out: Tensor | None = None, error: Tensor | None = None) -> Tensor:
    r"""The ``uint8`` packet of a 1-D float tensor whose length is a multiple of :data:`BLOCK` (into ``out``
    when given: :func:`packet_bytes` bytes).

    One sweep over chunks of :data:`CHUNK` values: |v| into a scratch chunk, its per-block maxima (the
    scales), then v·(1/s) rounded, written as int8 straight into the packet. The bytes are those of the
    formula in the module docstring (tested against a plain-torch reference).

    ``error`` (a tensor of ``values``' size and dtype, may be ``values`` itself): receives
    :math:`v - \hat v`, what rounding dropped, computed from the chunk while it is in cache. It equals
    ``values - dequantize(packet)`` bit for bit (the same integers times the same scales in
    ``values``' dtype), without a second pass over the packet.
    """
    n = values.numel()
    if n % BLOCK:
        raise ValueError(f"quantize needs a multiple of {BLOCK} values, got {n}")
    levels = LEVELS[fmt]
    n_ints = n if fmt == "int8" else n // 2
    if out is None:
        out = torch.empty(packet_bytes(n, fmt), dtype=torch.uint8, device=values.device)
    scales = out[n_ints:].view(torch.float32)
    q = out[:n_ints].view(torch.int8) if fmt == "int8" else torch.empty(n, dtype=torch.int8, device=values.device)
    flat = values.detach().reshape(-1)
    scratch = torch.empty(min(CHUNK, n), dtype=torch.float32, device=values.device)
    rows_per_chunk = CHUNK // BLOCK
    for lo in range(0, n // BLOCK, rows_per_chunk):
        hi = min(lo + rows_per_chunk, n // BLOCK)
        chunk = flat[lo * BLOCK : hi * BLOCK].view(-1, BLOCK).float()  # fp32 arithmetic whatever comes in
        work = scratch[: (hi - lo) * BLOCK].view(-1, BLOCK)
        torch.abs(chunk, out=work)
        s = scales[lo:hi]
        torch.div(_absmax_rows_(work), levels, out=s)
        s.masked_fill_(s < TINY, 0.0)  # a subnormal scale's reciprocal is inf: such a block travels as zeros
        inverse = torch.where(s > 0, s.reciprocal(), 0.0)
        torch.mul(chunk, inverse.unsqueeze(1), out=work)  # |v/s| <= L: rounding cannot leave [-L, L]
        q[lo * BLOCK : hi * BLOCK].copy_(work.round_().view(-1))
        if error is not None:  # v - q·s in v's dtype: what dequantize gives back, subtracted here
            dropped = error.reshape(-1)[lo * BLOCK : hi * BLOCK].view(-1, BLOCK)
            kept = work.to(values.dtype).mul_(s.to(values.dtype).unsqueeze(1))
            torch.sub(flat[lo * BLOCK : hi * BLOCK].view(-1, BLOCK), kept, out=dropped)
    if fmt == "int4":
        nibbles = (q + 8).to(torch.uint8).view(-1, 2)  # 1..15 in 4 bits
        torch.bitwise_or(nibbles[:, 0], nibbles[:, 1] << 4, out=out[:n_ints])
    return out


def dequantize(
    packet: Tensor,
    numel: int,
    fmt: IntFormat,
    dtype: torch.dtype = torch.float32,
    out: Tensor | None = None,
    accumulate: bool = False,
) -> Tensor:
    """The ``numel`` values a packet of :func:`quantize` stands for, in ``dtype`` (into ``out`` when given).

    ``accumulate=True`` adds them to ``out`` instead (a sum of received packets in one pass each, no
    intermediate tensor of the whole sum's size).
    """
    n_ints = numel if fmt == "int8" else numel // 2
    ints, scales = packet[:n_ints], packet[n_ints:].contiguous().view(torch.float32).to(dtype)
    if fmt == "int8":
        q = ints.view(torch.int8)
    else:
        low = (ints & 0x0F).to(torch.int8) - 8
        high = (ints >> 4).to(torch.int8) - 8
        q = torch.stack([low, high], dim=1).view(-1)
    if out is None:
        if accumulate:
            raise ValueError("dequantize(accumulate=True) adds into out=: pass the tensor to add to")
        out = torch.empty(numel, dtype=dtype, device=packet.device)
    rows_per_chunk = CHUNK // BLOCK
    scratch = torch.empty(min(CHUNK, numel), dtype=dtype, device=packet.device) if accumulate else None
    for lo in range(0, numel // BLOCK, rows_per_chunk):
        hi = min(lo + rows_per_chunk, numel // BLOCK)
        part = out[lo * BLOCK : hi * BLOCK].view(-1, BLOCK)
        values = part if scratch is None else scratch[: (hi - lo) * BLOCK].view(-1, BLOCK)
        values.copy_(q[lo * BLOCK : hi * BLOCK].view(-1, BLOCK))
        values.mul_(scales[lo:hi].unsqueeze(1))  # the same bytes give the same values on every rank
        if scratch is not None:
            part.add_(values)
    return out
