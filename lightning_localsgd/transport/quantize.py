r"""Integer transport: per-block absmax quantization to int8 or int4 (pure tensor math, no communication).

A flat vector is cut into blocks of :data:`BLOCK` values; each block travels as integers plus one
fp32 scale:

.. math::
    s_b = \max_{j \in b} |v_j| / L,\qquad q_j = \operatorname{round}(v_j / s_b) \in [-L, L],\qquad
    \hat v_j = s_b\, q_j

with :math:`L = 127` (int8) or :math:`L = 7` (int4, two values packed per byte). Round to nearest
gives :math:`|v_j - \hat v_j| \le s_b / 2 = \max_b |v| / (2L)`. A block of zeros has scale 0.

Bytes per value on the wire: int8 :math:`1 + 4/128 \approx 1.03` (0.258 of fp32), int4
:math:`0.5 + 4/128 \approx 0.53` (0.133 of fp32).

A *packet* is the bytes of one chunk: the integers (int8, or int4 packed two per byte) followed by
the chunk's fp32 scales, so one ``uint8`` collective carries both.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["BLOCK", "LEVELS", "IntFormat", "dequantize", "packet_bytes", "quantize"]

IntFormat = Literal["int8", "int4"]
BLOCK = 128
LEVELS: dict[str, int] = {"int8": 127, "int4": 7}


def packet_bytes(numel: int, fmt: IntFormat) -> int:
    """Bytes of the packet of ``numel`` values (``numel`` a multiple of :data:`BLOCK`)."""
    ints = numel if fmt == "int8" else numel // 2
    return ints + 4 * (numel // BLOCK)


def quantize(values: Tensor, fmt: IntFormat) -> Tensor:
    """The ``uint8`` packet of a 1-D float tensor whose length is a multiple of :data:`BLOCK`."""
    if values.numel() % BLOCK:
        raise ValueError(f"quantize needs a multiple of {BLOCK} values, got {values.numel()}")
    levels = LEVELS[fmt]
    blocks = values.detach().float().view(-1, BLOCK)
    scales = torch.linalg.vector_norm(blocks, ord=float("inf"), dim=1) / levels  # absmax without a copy
    inverse = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    q = torch.mul(blocks, inverse.unsqueeze(1)).round_().clamp_(-levels, levels).to(torch.int8).view(-1)
    if fmt == "int8":
        ints = q.view(torch.uint8)
    else:
        nibbles = (q + 8).to(torch.uint8).view(-1, 2)  # 1..15 in 4 bits
        ints = nibbles[:, 0] | (nibbles[:, 1] << 4)
    return torch.cat([ints, scales.contiguous().view(torch.uint8)])


def dequantize(packet: Tensor, numel: int, fmt: IntFormat, dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``numel`` values a packet of :func:`quantize` stands for, in ``dtype``."""
    n_ints = numel if fmt == "int8" else numel // 2
    ints, scales = packet[:n_ints], packet[n_ints:].contiguous().view(torch.float32)
    if fmt == "int8":
        q = ints.view(torch.int8).to(dtype)
    else:
        low = (ints & 0x0F).to(torch.int16) - 8
        high = (ints >> 4).to(torch.int16) - 8
        q = torch.stack([low, high], dim=1).view(-1).to(dtype)
    # the same bytes give the same values on every rank (exact in fp64; rounded once in fp32)
    return (q.view(-1, BLOCK) * scales.to(dtype).unsqueeze(1)).view(-1)
