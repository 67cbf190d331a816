"""Per-block absmax int8/int4 quantization: round-trip bounds, packing, sizes (pure tensor math)."""

import pytest
import torch

import lightning_localsgd.transport.quantize as quant
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


def _reference_packet(values: torch.Tensor, fmt: str) -> torch.Tensor:
    """The packet in a few lines of plain torch (the module docstring's formula, one expression per step)."""
    levels = LEVELS[fmt]
    blocks = values.float().view(-1, BLOCK)
    scales = blocks.abs().amax(dim=1) / levels
    scales[scales < torch.finfo(torch.float32).tiny] = 0.0  # a subnormal scale: the block travels as zeros
    inverse = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    q = (blocks * inverse.unsqueeze(1)).round().clamp(-levels, levels).to(torch.int8).view(-1)
    if fmt == "int4":
        nibbles = (q + 8).to(torch.uint8).view(-1, 2)
        ints = nibbles[:, 0] | (nibbles[:, 1] << 4)
    else:
        ints = q.view(torch.uint8)
    return torch.cat([ints, scales.view(torch.uint8)])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_packets_are_the_reference_bytes_across_chunk_boundaries(fmt, dtype, monkeypatch):
    """quantize/dequantize work in chunks of CHUNK values into preallocated buffers: the bytes and the values
    equal the plain-torch formula, with chunks that end inside the vector and a last partial chunk."""
    import lightning_localsgd.transport.quantize as quantize_module

    monkeypatch.setattr(quantize_module, "CHUNK", 3 * BLOCK)  # 10 blocks: chunks of 3, 3, 3, 1
    g = torch.Generator().manual_seed(1)
    v = (torch.randn(10 * BLOCK, generator=g, dtype=torch.float64) * 3).to(dtype)
    v[2 * BLOCK : 3 * BLOCK] = 0  # a block of zeros: scale 0
    packet = quantize(v, fmt)
    expected = _reference_packet(v, fmt)
    assert torch.equal(packet, expected)
    out = torch.full((packet_bytes(v.numel(), fmt),), 255, dtype=torch.uint8)
    assert quantize(v, fmt, out=out) is out and torch.equal(out, expected)
    n_ints = v.numel() if fmt == "int8" else v.numel() // 2
    scales = expected[n_ints:].view(torch.float32).double()
    if fmt == "int8":
        q = expected[:n_ints].view(torch.int8).double()
    else:
        q = torch.stack([(expected[:n_ints] & 15).double() - 8, (expected[:n_ints] >> 4).double() - 8], 1).view(-1)
    values = (q.view(-1, BLOCK) * scales.unsqueeze(1)).view(-1)
    assert torch.equal(dequantize(packet, v.numel(), fmt, torch.float64), values)
    back = torch.empty(v.numel())
    assert dequantize(packet, v.numel(), fmt, out=back) is back and torch.equal(back, values.float())


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_rounding_error_and_accumulation_equal_the_two_pass_formulas(fmt, dtype, monkeypatch):
    # what the integer transport uses instead of a second dequantization: error= is v - dequantize(packet)
    # bit for bit, also when it overwrites the values themselves; accumulate=True adds packet after packet
    monkeypatch.setattr(quant, "CHUNK", 4 * BLOCK)  # several chunks, the last one partial
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(11 * BLOCK, generator=gen, dtype=dtype) * torch.logspace(-3, 2, 11 * BLOCK, dtype=dtype)
    error = torch.empty_like(values)
    packet = quantize(values, fmt, error=error)
    assert torch.equal(packet, _reference_packet(values, fmt))
    assert torch.equal(error, values - dequantize(packet, values.numel(), fmt, dtype))
    in_place = values.clone()
    assert torch.equal(quantize(in_place, fmt, error=in_place), packet)
    assert torch.equal(in_place, error)
    other = quantize(values.flip(0), fmt)
    total = dequantize(packet, values.numel(), fmt, dtype)
    dequantize(other, values.numel(), fmt, dtype, out=total, accumulate=True)
    expected = dequantize(packet, values.numel(), fmt, dtype) + dequantize(other, values.numel(), fmt, dtype)
    assert torch.equal(total, expected)
    with pytest.raises(ValueError, match=r"accumulate=True\) adds into out="):
        dequantize(packet, values.numel(), fmt, dtype, accumulate=True)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_block_too_small_for_a_normal_scale_travels_as_zeros_and_is_owed(fmt):
    # a block whose largest |v| is ~3e-39 would have a subnormal scale (below 1.2e-38) whose reciprocal is
    # inf: 0 * inf made NaN errors in training (the residual went NaN after ~200 int8 syncs of resnet18)
    v = torch.randn(3 * BLOCK, generator=torch.Generator().manual_seed(0))
    v[BLOCK : 2 * BLOCK] *= 1e-39
    v[BLOCK] = 0.0
    error = torch.empty_like(v)
    packet = quantize(v, fmt, error=error)
    assert torch.equal(packet, _reference_packet(v, fmt))
    n_ints = v.numel() if fmt == "int8" else v.numel() // 2
    assert packet[n_ints:].view(torch.float32)[1] == 0.0
    back = dequantize(packet, v.numel(), fmt)
    assert torch.isfinite(error).all() and torch.isfinite(back).all()
    assert torch.equal(back[BLOCK : 2 * BLOCK], torch.zeros(BLOCK))
    assert torch.equal(error[BLOCK : 2 * BLOCK], v[BLOCK : 2 * BLOCK])  # owed whole: error feedback sends it later
    assert torch.equal(error, v - back)
