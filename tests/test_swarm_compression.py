"""Blockwise 8-/4-bit codecs and the checked decoder that reads peers' tensor parts."""
from __future__ import annotations

import pytest
import torch
from hivemind.proto import averaging_pb2, runtime_pb2

from training_core.swarm.compression import (Blockwise4Bit, Blockwise8Bit, CompressionError, compression_for,
                                             decompress, wire_bytes_per_value, wire_nbytes)
from training_core.swarm.manifest import COMPRESSIONS

BLOCKWISE = [Blockwise8Bit(), Blockwise4Bit()]


def _roundtrip(codec, x: torch.Tensor) -> torch.Tensor:
    return codec.extract(codec.compress(x, None))


@pytest.mark.parametrize("codec", BLOCKWISE, ids=lambda c: f"{c.bits}bit")
@pytest.mark.parametrize("n", [1, 63, 64, 65, 255, 257, 1001, 5000])
def test_blockwise_error_is_at_most_half_a_step_of_its_block(codec, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3
    x[n // 2] = 40.0                       # an outlier coarsens its own block only
    y = _roundtrip(codec, x)
    assert y.shape == x.shape and y.dtype == torch.float32
    for start in range(0, n, codec.block):
        block = slice(start, start + codec.block)
        step = x[block].abs().max() / codec.top
        assert (y[block] - x[block]).abs().max() <= step / 2 * (1 + 1e-5)
    # Blocks without the outlier keep their own resolution.
    far = slice(0, codec.block) if n // 2 >= codec.block else None
    if far is not None:
        assert (y[far] - x[far]).abs().max() <= x[far].abs().max() / codec.top / 2 * (1 + 1e-5)


def test_relative_error_per_bits():
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    err = {c.bits: ((_roundtrip(c, x) - x).norm() / x.norm()).item() for c in BLOCKWISE}
    assert err[8] < 0.01 and 0.05 < err[4] < 0.13, err
    f16 = compression_for("float16")
    assert ((f16.extract(f16.compress(x, None)) - x).norm() / x.norm()).item() < 1e-3


def test_zeros_signs_shapes_and_dtypes_survive():
    for codec in BLOCKWISE:
        z = torch.zeros(3, 100)
        assert torch.equal(_roundtrip(codec, z), z)
        m = torch.tensor([[-1.0, 0.0, 1.0], [0.5, -0.5, 0.25]])
        y = _roundtrip(codec, m)
        assert y.shape == m.shape and torch.equal(torch.sign(y), torch.sign(m))
        h = _roundtrip(codec, torch.ones(7, dtype=torch.float16))
        assert h.dtype == torch.float16 and torch.equal(h, torch.ones(7, dtype=torch.float16))
    with pytest.raises(ValueError):
        Blockwise4Bit().compress(torch.tensor([1.0, float("nan")]), None)


@pytest.mark.parametrize("name", COMPRESSIONS)
def test_every_manifest_name_has_a_codec_and_exact_wire_size(name):
    codec = compression_for(name)
    for n in (1, 33, 4097, 100_003):
        x = torch.randn(n, generator=torch.Generator().manual_seed(1))
        part = codec.compress(x, None)
        assert len(part.buffer) == wire_nbytes(name, n)
        y = decompress(runtime_pb2.Tensor.FromString(part.SerializeToString()), codec, n)
        assert y.shape == (n,) and torch.isfinite(y).all()
    assert len(codec.compress(torch.randn(100_000), None).buffer) / 100_000 == pytest.approx(
        wire_bytes_per_value(name), rel=0.02)


def test_wire_sizes_per_value():
    assert wire_bytes_per_value("none") == 4.0
    assert wire_bytes_per_value("blockwise8bit") == pytest.approx(1 + 4 / 256)
    # 4-bit: an eighth of float32 plus one float32 scale per 64 values.
    assert wire_bytes_per_value("blockwise4bit") == pytest.approx(4 / 8 + 4 / 64)
    assert wire_nbytes("blockwise4bit", 65) == 2 * 4 + 33


def test_out_of_enum_codec_value_survives_protobuf_and_stock_hivemind_refuses_it():
    from hivemind.compression import deserialize_torch_tensor
    part = Blockwise4Bit().compress(torch.randn(10), None)
    msg = averaging_pb2.AveragingData.FromString(averaging_pb2.AveragingData(tensor_part=part).SerializeToString())
    assert msg.tensor_part.compression == Blockwise4Bit.compression_type
    with pytest.raises(ValueError):
        deserialize_torch_tensor(msg.tensor_part)


def _hostile(part: runtime_pb2.Tensor, **changes) -> runtime_pb2.Tensor:
    bad = runtime_pb2.Tensor()
    bad.CopyFrom(part)
    for k, v in changes.items():
        if k == "size":
            del bad.size[:]
            bad.size.extend(v)
        else:
            setattr(bad, k, v)
    return bad


@pytest.mark.parametrize("name", ["blockwise8bit", "blockwise4bit", "float16", "uniform8bit", "none", "scaled_float16"])
def test_hostile_parts_raise_a_clean_error(name):
    codec = compression_for(name)
    n = 300
    part = codec.compress(torch.randn(n), None)
    other = compression_for("blockwise4bit" if name != "blockwise4bit" else "float16")
    cases = [
        _hostile(part, buffer=part.buffer[:-1]),                    # short
        _hostile(part, buffer=part.buffer + b"\0" * 8),             # long
        _hostile(part, buffer=b""),
        _hostile(part, size=[n + 1]),                               # size does not match what we expect
        _hostile(part, size=[2 ** 31, 2 ** 31, 2 ** 31]),           # a huge claimed size allocates nothing
        _hostile(part, size=[10, 30]),                              # right count, wrong shape
        _hostile(part, dtype="object"),
        _hostile(part, compression=int(other.compression_type)),
    ]
    for bad in cases:
        with pytest.raises(CompressionError):
            decompress(bad, codec, n)
    with pytest.raises(CompressionError):
        decompress(part, codec, n - 1)


def test_non_finite_scales_are_refused_after_decoding():
    part = Blockwise8Bit().compress(torch.randn(300), None)
    bad = _hostile(part, buffer=torch.tensor([float("inf")]).numpy().tobytes() + part.buffer[4:])
    with pytest.raises(CompressionError, match="non-finite"):
        decompress(bad, Blockwise8Bit(), 300)
    # A hostile huge size straight into extract (no expected count) is refused before any allocation.
    with pytest.raises(CompressionError):
        Blockwise4Bit().extract(_hostile(part, size=[2 ** 32 - 1] * 4, compression=1004))


def test_a_round_waits_for_a_home_uplink_to_send_its_next_part():
    """hivemind's own default (matchmaking_time) dropped a peer behind NAT on the bench's link."""
    from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES
    from training_core.swarm.manifest import SwarmManifest
    from training_core.swarm.network import sender_gap_s
    defaults = SwarmManifest.__dataclass_fields__
    gap = sender_gap_s(defaults["matchmaking_time"].default, defaults["averaging_timeout"].default)
    one_part_at_1_mbit_s = DEFAULT_PART_SIZE_BYTES * 8 / 1e6
    assert gap >= 2 * one_part_at_1_mbit_s, (gap, one_part_at_1_mbit_s)
    assert sender_gap_s(0.5, 30.0) == 10.0 and sender_gap_s(15.0, 30.0) == 15.0
