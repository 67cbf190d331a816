"""Per-block absmax int8/int4 quantization: round-trip bounds, packing, sizes (pure tensor math)."""

import pytest
import torch

from lightning_localsgd.transport.quantize import BLOCK, LEVELS, dequantize, packet_bytes, quantize


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_round_trip_error_is_at_most_half_a_step_of_each_block(fmt):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4 * BLOCK, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, 4 * BLOCK, dtype=torch.float64)
    packet = quantize(v, fmt)
    assert packet.dtype == torch.uint8 and packet.numel() == packet_bytes(v.numel(), fmt)
    back = dequantize(packet, v.numel(), fmt, torch.float64)
    step = v.view(-1, BLOCK).abs().amax(1).float().double() / LEVELS[fmt]  # the fp32 scale of each block
    bound = (step / 2).repeat_interleave(BLOCK) * (1 + 1e-6)
    assert ((v - back).abs() <= bound).all()
    assert (v - back).abs().max() > 0.1 * bound.max()  # it really rounds


def test_exact_values_survive_and_the_int4_nibbles_hold_negative_levels():
    v = torch.zeros(2 * BLOCK)
    v[:8] = torch.tensor([-7.0, -3.0, 0.0, 1.0, 2.0, 5.0, 6.0, 7.0])  # block 0: scale 1, every value a level
    assert torch.equal(dequantize(quantize(v, "int4"), v.numel(), "int4"), v)  # block 1 is zeros: scale 0
    w = torch.arange(-127.0, 129.0)  # 256 values, two blocks with absmax 127 and 128
    back = dequantize(quantize(w, "int8"), w.numel(), "int8")
    assert torch.equal(back[:BLOCK], w[:BLOCK])


def test_sizes_and_bad_lengths():
    assert packet_bytes(1024, "int8") == 1024 + 4 * 8  # 1.03 bytes per value: 0.258 of fp32
    assert packet_bytes(1024, "int4") == 512 + 4 * 8  # 0.53 bytes per value: 0.133 of fp32
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize(torch.zeros(100), "int8")
