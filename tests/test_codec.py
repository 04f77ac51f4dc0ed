"""The binary memory format: bit-exact round trips, a fixed header, clear errors on bad values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from state import MemoryUpdates, codec
from stream_lstm.exceptions import StoreError

shapes = st.tuples(
    st.integers(1, 6), st.integers(1, 3), st.integers(1, 40)
)  # (entities, layers, hidden)


def any_bits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 arrays from random bit patterns: NaN payloads, infinities, -0.0, subnormals."""
    return rng.integers(0, 2**32, size=shape, dtype=np.uint32).view(np.float32)


def updates(e: int, layers: int, hidden: int, seed: int = 0) -> MemoryUpdates:
    rng = np.random.default_rng(seed)
    return MemoryUpdates(
        entity_ids=[f"e{i}" for i in range(e)],
        ltm=any_bits(rng, (e, layers, hidden)),
        stm=any_bits(rng, (e, layers, hidden)),
        step=rng.integers(0, 2**62, size=e),
        fence_partition=rng.integers(0, 2**31, size=e),
        fence_offset=rng.integers(-1, 2**63 - 1, size=e),
    )


def bits(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint32)


@given(shape=shapes, seed=st.integers(0, 2**32 - 1))
def test_round_trip_is_bit_exact(shape: tuple[int, int, int], seed: int) -> None:
    e, layers, hidden = shape
    sent = updates(e, layers, hidden, seed)
    values = codec.encode_many(sent, updated_at=1234.5)
    assert all(type(value) is bytes for value in values)

    batch = codec.decode_many(sent.entity_ids, values, layers, hidden)
    np.testing.assert_array_equal(bits(batch.ltm), bits(sent.ltm))
    np.testing.assert_array_equal(bits(batch.stm), bits(sent.stm))
    np.testing.assert_array_equal(batch.step, sent.step)
    np.testing.assert_array_equal(batch.fence_partition, sent.fence_partition)
    np.testing.assert_array_equal(batch.fence_offset, sent.fence_offset)
    assert batch.found.all()

    one = codec.decode(values[-1])
    np.testing.assert_array_equal(bits(one.ltm), bits(sent.ltm[-1]))
    np.testing.assert_array_equal(bits(one.stm), bits(sent.stm[-1]))
    assert (one.step, one.fence_partition, one.fence_offset) == (
        sent.step[-1],
        sent.fence_partition[-1],
        sent.fence_offset[-1],
    )
    assert one.updated_at == 1234.5


def test_value_is_header_plus_raw_float32() -> None:
    (value,) = codec.encode_many(updates(1, 1, 128), updated_at=0.0)
    assert len(value) == codec.HEADER_SIZE + 2 * 128 * 4 == 1064
    assert value[:5] == b"SLTM\x01"


def test_record_dtype_matches_the_header_the_lua_scripts_read() -> None:
    fields = codec.record_dtype(2, 3).fields
    assert fields is not None
    assert codec.HEADER_SIZE == 40
    assert fields["fence_partition"][1] == codec.FENCE_PARTITION_AT
    assert fields["fence_offset"][1] == codec.FENCE_OFFSET_AT
    assert fields["step"][1] == codec.STEP_AT
    assert fields["updated_at"][1] == codec.STEP_AT + 8
    assert fields["ltm"][1] == codec.HEADER_SIZE
    assert codec.record_dtype(2, 3).itemsize == codec.HEADER_SIZE + 2 * 2 * 3 * 4


def test_missing_entities_decode_to_zeros_without_fence() -> None:
    sent = updates(2, 1, 4)
    a, b = codec.encode_many(sent, updated_at=0.0)
    batch = codec.decode_many(["a", "x", "b", "y"], [a, None, b, None], 1, 4)
    assert batch.found.tolist() == [True, False, True, False]
    assert not batch.ltm[[1, 3]].any()
    assert not batch.stm[[1, 3]].any()
    assert batch.step[[1, 3]].tolist() == [0, 0]
    assert batch.fence_offset[[1, 3]].tolist() == [codec.NO_FENCE] * 2
    assert batch.fence_partition[[1, 3]].tolist() == [codec.NO_FENCE] * 2
    np.testing.assert_array_equal(bits(batch.ltm[[0, 2]]), bits(sent.ltm))


def test_decoded_arrays_are_writable_and_contiguous() -> None:
    values = codec.encode_many(updates(3, 2, 5), updated_at=0.0)
    batch = codec.decode_many(["a", "b", "c"], values, 2, 5)
    for array in (batch.ltm, batch.stm, codec.decode(values[0]).ltm):
        assert array.flags.writeable
        assert array.flags.c_contiguous


def good_value() -> bytes:
    return codec.encode_many(updates(1, 1, 4), updated_at=0.0)[0]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "shorter than the 40-byte header"),
        (b"hello", "shorter than the 40-byte header"),
        (b"x" * 100, "not a stream-lstm memory"),
        (good_value()[:-1], "truncated"),
        (good_value() + b"\0", "does not match its header"),
        (good_value()[:4] + b"\x03" + good_value()[5:], "format version 3"),
        (good_value()[:4] + b"\x02" + good_value()[5:], "format 2.*before fences"),
        (good_value() + b"\0" * 12, "format 1.*before fences"),
        (good_value()[:4] + b"\x02" + good_value()[5:] + b"\0" * 11, "format 2.*truncated"),
        (good_value()[:5] + b"\x09" + good_value()[6:], "unknown dtype code 9"),
    ],
)
def test_bad_values_raise_store_error(value: bytes, reason: str) -> None:
    with pytest.raises(StoreError, match=reason):
        codec.decode(value)
    with pytest.raises(StoreError, match=f"entity 'bad': .*{reason}"):
        codec.decode_many(["ok", "bad"], [good_value(), value], 1, 4)


def test_other_shape_names_the_entity() -> None:
    with pytest.raises(StoreError, match=r"entity 'e': stored memory has shape \(1, 4\).*\(2, 2\)"):
        # same byte length as (2, 2), so only the header tells them apart
        codec.decode_many(["e"], [good_value()], 2, 2)


def test_updates_must_be_stacked_float32() -> None:
    ok = updates(2, 1, 3)
    with pytest.raises(ValueError, match="float32"):
        MemoryUpdates(
            ok.entity_ids, ok.ltm.astype(np.float64), ok.stm, ok.step, ok.fence_partition,
            ok.fence_offset,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"must both be \(3, L, H\)"):
        MemoryUpdates(
            [*ok.entity_ids, "extra"], ok.ltm, ok.stm, ok.step, ok.fence_partition,
            ok.fence_offset,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"fence_offset has shape \(1,\)"):
        MemoryUpdates(
            ok.entity_ids, ok.ltm, ok.stm, ok.step, ok.fence_partition, ok.fence_offset[:1]
        )


@given(shape=shapes, seed=st.integers(0, 2**32 - 1))
def test_float16_storage_rounds_to_nearest_and_halves_the_value(
    shape: tuple[int, int, int], seed: int
) -> None:
    e, layers, hidden = shape
    rng = np.random.default_rng(seed)
    sent = updates(e, layers, hidden, seed)
    sent = MemoryUpdates(
        sent.entity_ids,
        rng.normal(0, 3, (e, layers, hidden)).astype(np.float32),
        rng.normal(0, 3, (e, layers, hidden)).astype(np.float32),
        sent.step,
        sent.fence_partition,
        sent.fence_offset,
    )
    values = codec.encode_many(sent, 1.0, codec.FLOAT16)
    assert len(values[0]) == codec.HEADER_SIZE + 2 * layers * hidden * 2

    batch = codec.decode_many(sent.entity_ids, values, layers, hidden, codec.FLOAT16)
    assert batch.ltm.dtype == np.float32
    np.testing.assert_array_equal(batch.ltm, sent.ltm.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(batch.stm, sent.stm.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(batch.fence_offset, sent.fence_offset)


def test_a_batch_of_mixed_storage_dtypes_loads_whatever_the_store_writes() -> None:
    sent = updates(2, 1, 3)
    sent = MemoryUpdates(
        sent.entity_ids,
        np.ones((2, 1, 3), np.float32),
        -np.ones((2, 1, 3), np.float32),
        sent.step,
        sent.fence_partition,
        sent.fence_offset,
    )
    mixed = [
        codec.encode_many(sent, 1.0, codec.FLOAT32)[0],
        codec.encode_many(sent, 1.0, codec.FLOAT16)[1],
    ]
    for code in (codec.FLOAT32, codec.FLOAT16):
        batch = codec.decode_many(["e0", "e1", "e2"], [*mixed, None], 1, 3, code)
        np.testing.assert_array_equal(batch.ltm[:2], np.ones((2, 1, 3)))
        np.testing.assert_array_equal(batch.stm[:2], -np.ones((2, 1, 3)))
        assert batch.found.tolist() == [True, True, False]


def test_float16_storage_saturates_what_is_beyond_its_range_instead_of_storing_inf() -> None:
    """An LTM can grow past 65,504 (float16's largest) with large inputs over many events;
    stored as inf it would make every later event of its entity non-finite."""
    sent = updates(1, 1, 4)
    sent = MemoryUpdates(
        sent.entity_ids,
        np.array([[[1e6, -1e6, 65504.0, 1.5]]], dtype=np.float32),
        np.array([[[0.5, -0.5, 0.25, 1e9]]], dtype=np.float32),
        sent.step,
        sent.fence_partition,
        sent.fence_offset,
    )
    values = codec.encode_many(sent, 1.0, codec.FLOAT16)
    batch = codec.decode_many(sent.entity_ids, values, 1, 4, codec.FLOAT16)
    assert batch.ltm.tolist() == [[[65504.0, -65504.0, 65504.0, 1.5]]]
    assert batch.stm.tolist() == [[[0.5, -0.5, 0.25, 65504.0]]]
