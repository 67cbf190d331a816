r"""Integer packets that a plain SUM allreduce adds up: the int8/int4 wire of the fault-tolerant rounds.

torchft's managed process group offers one collective, an allreduce (SUM); the usual integer wire
(:mod:`~lightning_localsgd.transport.quantize`: per-rank scales, an all-to-all and an all-gather)
cannot ride on it. Here every process quantizes with the **same** per-block scale, so the integers
can simply be summed on the wire. Over the :math:`c` contributing processes of a round
(non-contributors send zeros), for each block :math:`b` of :data:`~.quantize.BLOCK` values:

.. math::
    v_j &= x_j - a + r_j \quad\text{(delta from the anchor plus the residual)}\\
    A_b &= \textstyle\sum_j \max_{i \in b} |v_{j,i}| \quad\text{(a float64 SUM allreduce)}\\
    L_c &= L - \lfloor c/2 \rfloor,\qquad s_b = A_b / L_c,\qquad q_{j,i} = \operatorname{round}(v_{j,i} / s_b)\\
    r_j' &= v_j - s_b\, q_j,\qquad \bar x = a + \tfrac{1}{c}\, s_b \textstyle\sum_j q_j

with :math:`L = 127` (int8) or :math:`7` (int4). Since :math:`|v_{j,i}| \le \max_b|v_j| \le A_b`,
each :math:`q_{j,i} \in [-L_c, L_c]`, and :math:`|\sum_j q_{j,i}| \le \sum_j |v_{j,i}|/s_b + c/2
\le L_c + \lfloor c/2\rfloor = L`: the sum has :math:`2L + 1 \le 2^{bits}` possible values.

**Encoding.** Each contributor sends :math:`u_{j,i} = q_{j,i} + L_c \in [0, 2L_c]` as an unsigned
integer: one byte per value (int8) or two 4-bit fields per byte (int4, value :math:`2k` in the low
nibble, :math:`2k+1` in the high one). The allreduce adds the bytes modulo 256 (gloo and NCCL wrap
unsigned integers). :math:`U = \sum_j u_j = \sum_j q_j + cL_c` lies in the known window
:math:`[cL_c - L,\ cL_c + L]` of :math:`2L+1 \le 2^{bits}` integers, so it is recovered exactly from
its residue: for int8 from the byte; for int4 the low field's sum from the byte modulo 16, then the
high field's from :math:`(\text{byte} - U_{low}) / 16` modulo 16 (the low field's carries are
known once :math:`U_{low}` is). Nothing overflows, whatever order the ring adds in.

**Costs.** Bytes per value: the integers (1 or 1/2) plus one float64 scale sum per 128 values
(0.0625): 1.0625 (int8) and 0.5625 (int4), against 1.03 and 0.53 for the per-rank wire. Float64,
not float32: a sum of float32 maxima in float64 is exact, so :math:`A_b` is the same number in
whatever order the allreduce adds (and a replay can check the wire bit for bit). Resolution: a
contributor's step is :math:`s_b = A_b/L_c \approx c \cdot \max_b|v|/L_c`, about :math:`c` times
the per-rank wire's (log₂ c bits fewer); error feedback carries what rounding drops
(:math:`|r_j'| \le s_b/2`) to the next round. int4 leaves :math:`L_c \ge 1` only up to
:math:`c = 13` contributing processes (:func:`shared_levels` refuses more).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_localsgd.transport.quantize import BLOCK, LEVELS, TINY, IntFormat

__all__ = ["block_absmax", "decode_sum_", "encode", "shared_levels", "summable_bytes"]

BITS: dict[str, int] = {"int8": 8, "int4": 4}


def shared_levels(fmt: IntFormat, contributors: int) -> int:
    """:math:`L_c = L - \\lfloor c/2 \\rfloor`: each contributor's largest integer (c of them sum within ``fmt``)."""
    levels = LEVELS[fmt] - contributors // 2
    if contributors < 1 or levels < 1:
        raise ValueError(
            f"comm_dtype={fmt!r} under fault tolerance sums {contributors} contributing processes' integers in "
            f"{BITS[fmt]} bits: at most {2 * LEVELS[fmt] - 1} fit. Use comm_dtype='int8' (up to 253), or fewer "
            "processes."
        )
    return levels


def summable_bytes(numel: int, fmt: IntFormat) -> int:
    """Bytes of the integers of ``numel`` values (a multiple of :data:`BLOCK`); the scale sums travel apart."""
    return numel if fmt == "int8" else numel // 2


def block_absmax(values: Tensor) -> Tensor:
    """:math:`\\max_{i \\in b} |v_i|` of each block, rounded up to a float32 value, in float64 (what the scale
    allreduce sums: float32 values within 2^29 of each other add up exactly in float64, in any order)."""
    exact = values.detach().reshape(-1, BLOCK).abs().amax(dim=1)
    single = exact.to(torch.float32)  # rounded up to float32, so that every |v| <= the maximum sent
    above = torch.nextafter(single, torch.full_like(single, float("inf")))
    single = torch.where(single.to(exact.dtype) < exact, above, single)
    return single.to(torch.float64)


def _steps(absmax_sums: Tensor, levels: int, dtype: torch.dtype) -> Tensor:
    """:math:`s_b = A_b / L_c` in ``dtype``; 0 for a block whose step would be below float32's smallest normal."""
    steps = (absmax_sums / levels).to(dtype)
    return steps.masked_fill_(steps < TINY, 0.0)


@torch.no_grad()
def encode(values: Tensor, absmax_sums: Tensor, fmt: IntFormat, levels: int, error: Tensor | None = None) -> Tensor:
    """The ``uint8`` integers :math:`u = \\operatorname{round}(v/s_b) + L_c` of a contributor's ``values``.

    ``values``: 1-D, a multiple of :data:`BLOCK`; ``absmax_sums``: :math:`A_b` per block (after the
    allreduce); ``levels``: :math:`L_c` (:func:`shared_levels`). ``error`` receives
    :math:`v - s_b q` (the new residual), in ``values``' dtype. A block whose step is 0 sends
    :math:`q = 0` and keeps all of :math:`v` in ``error``.
    """
    rows = values.detach().reshape(-1, BLOCK)
    steps = _steps(absmax_sums, levels, values.dtype).unsqueeze(1)
    q = torch.where(steps > 0, rows / torch.where(steps > 0, steps, 1.0), 0.0).round_()
    if error is not None:
        torch.sub(rows, q * steps, out=error.view(-1, BLOCK))
    u = (q + levels).to(torch.uint8).reshape(-1)  # in [0, 2 L_c]: exact
    if fmt == "int8":
        return u
    pairs = u.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unwrap(residue: Tensor, low: int, modulus: int) -> Tensor:
    """The integer in ``[low, low + modulus)`` congruent to ``residue`` (int64)."""
    return low + torch.remainder(residue - low, modulus)


@torch.no_grad()
def decode_sum_(
    summed: Tensor, absmax_sums: Tensor, fmt: IntFormat, levels: int, contributors: int, out: Tensor
) -> Tensor:
    """Write :math:`s_b \\sum_j q_j` into ``out`` (1-D, ``numel`` values) from the SUM of the contributors' packets.

    ``levels`` and ``contributors``: the round's :math:`L_c` and :math:`c`. See the module docstring
    for why the modular sums are exact.
    """
    total = LEVELS[fmt]
    low = contributors * levels - total  # U lies in [low, low + 2L]
    byte = summed.to(torch.int64)
    if fmt == "int8":
        sums = _unwrap(byte, low, 256)
    else:
        first = _unwrap(byte & 0x0F, low, 16)
        second = _unwrap(((byte - first) & 0xFF) >> 4, low, 16)
        sums = torch.stack([first, second], dim=1).reshape(-1)
    q = (sums - contributors * levels).to(out.dtype).view(-1, BLOCK)
    torch.mul(q, _steps(absmax_sums, levels, out.dtype).unsqueeze(1), out=out.view(-1, BLOCK))
    return out
