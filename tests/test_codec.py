"""The binary memory format: bit-exact round trips, a fixed header, clear errors on bad values."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from state import codec
from stream_lstm.exceptions import StoreError
from stream_lstm.memories import NO_FENCE, RESETS, Memories, Shape

shapes = st.tuples(
    st.integers(1, 6), st.integers(1, 3), st.integers(1, 40)
)  # (entities, layers, hidden)


def any_bits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 arrays from random bit patterns: NaN payloads, infinities, -0.0, subnormals."""
    return rng.integers(0, 2**32, size=shape, dtype=np.uint32).view(np.float32)


def updates(e: int, layers: int, hidden: int, seed: int = 0, states: int = 2) -> Memories:
    rng = np.random.default_rng(seed)
    return Memories(
        entity_ids=[f"e{i}" for i in range(e)],
        states=tuple(any_bits(rng, (e, layers, hidden)) for _ in range(states)),
        step=rng.integers(0, 2**62, size=e),
        fence_partition=rng.integers(0, 2**31, size=e),
        fence_offset=rng.integers(-1, 2**63 - 1, size=e),
    )


def bits(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint32)


def with_states(sent: Memories, *states: np.ndarray) -> Memories:
    """``sent`` with other states (its entity ids, steps and fences)."""
    return Memories(
        sent.entity_ids, states, sent.step, sent.fence_partition, sent.fence_offset,
        sent.other_fences,
    )  # fmt: skip


@given(shape=shapes, seed=st.integers(0, 2**32 - 1))
def test_round_trip_is_bit_exact(shape: tuple[int, int, int], seed: int) -> None:
    e, layers, hidden = shape
    sent = updates(e, layers, hidden, seed)
    values = codec.encode_many(sent, updated_at=1234.5)
    assert all(type(value) is bytes for value in values)

    batch = codec.decode_many(sent.entity_ids, values, Shape(2, layers, hidden))
    ltm, stm = batch.states
    np.testing.assert_array_equal(bits(ltm), bits(sent.states[0]))
    np.testing.assert_array_equal(bits(stm), bits(sent.states[1]))
    np.testing.assert_array_equal(batch.step, sent.step)
    np.testing.assert_array_equal(batch.fence_partition, sent.fence_partition)
    np.testing.assert_array_equal(batch.fence_offset, sent.fence_offset)
    assert batch.found.all()

    one = codec.decode(values[-1])
    np.testing.assert_array_equal(bits(one.memories.states[0][0]), bits(sent.states[0][-1]))
    np.testing.assert_array_equal(bits(one.memories.states[1][0]), bits(sent.states[1][-1]))
    assert (
        int(one.memories.step[0]),
        int(one.memories.fence_partition[0]),
        int(one.memories.fence_offset[0]),
    ) == (
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
    fields = codec.record_dtype(Shape(2, 2, 3)).fields
    assert fields is not None
    assert codec.HEADER_SIZE == 40
    assert fields["fence_partition"][1] == codec.FENCE_PARTITION_AT
    assert fields["fence_offset"][1] == codec.FENCE_OFFSET_AT
    assert fields["step"][1] == codec.STEP_AT
    assert fields["updated_at"][1] == codec.STEP_AT + 8
    assert fields["memories"][1] == codec.HEADER_SIZE
    assert codec.record_dtype(Shape(2, 2, 3)).itemsize == codec.HEADER_SIZE + 2 * 2 * 3 * 4


def test_missing_entities_decode_to_zeros_without_fence() -> None:
    sent = updates(2, 1, 4)
    a, b = codec.encode_many(sent, updated_at=0.0)
    batch = codec.decode_many(["a", "x", "b", "y"], [a, None, b, None], Shape(2, 1, 4))
    ltm, stm = batch.states
    assert batch.found.tolist() == [True, False, True, False]
    assert not ltm[[1, 3]].any()
    assert not stm[[1, 3]].any()
    assert batch.step[[1, 3]].tolist() == [0, 0]
    assert batch.fence_offset[[1, 3]].tolist() == [NO_FENCE] * 2
    assert batch.fence_partition[[1, 3]].tolist() == [NO_FENCE] * 2
    np.testing.assert_array_equal(bits(ltm[[0, 2]]), bits(sent.states[0]))


def test_decoded_arrays_are_writable_and_contiguous() -> None:
    values = codec.encode_many(updates(3, 2, 5), updated_at=0.0)
    batch = codec.decode_many(["a", "b", "c"], values, Shape(2, 2, 5))
    for array in (*batch.states, codec.decode(values[0]).memories.states[0][0]):
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
        (good_value()[:4] + b"\x05" + good_value()[5:], "format version 5"),
        (good_value()[:4] + b"\x03" + good_value()[5:], "does not match its header .format 3,"),
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
        codec.decode_many(["ok", "bad"], [good_value(), value], Shape(2, 1, 4))


def test_other_shape_names_the_entity() -> None:
    with pytest.raises(
        StoreError, match=r"entity 'e': stored memory has 2 states of \(1, 4\).*2 of \(2, 2\)"
    ):
        # same byte length as (2, 2), so only the header tells them apart
        codec.decode_many(["e"], [good_value()], Shape(2, 2, 2))


def test_updates_must_be_stacked_float32() -> None:
    ok = updates(2, 1, 3)
    ltm, stm = ok.states
    with pytest.raises(ValueError, match="float32"):
        Memories(
            ok.entity_ids, (ltm.astype(np.float64), stm), ok.step, ok.fence_partition,
            ok.fence_offset,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"must all be \(3, L, H\)"):
        Memories(
            [*ok.entity_ids, "extra"], (ltm, stm), ok.step, ok.fence_partition,
            ok.fence_offset,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"fence_offset is int64 of shape \(1,\)"):
        Memories(ok.entity_ids, (ltm, stm), ok.step, ok.fence_partition, ok.fence_offset[:1])


@given(shape=shapes, seed=st.integers(0, 2**32 - 1))
def test_float16_storage_rounds_to_nearest_and_halves_the_value(
    shape: tuple[int, int, int], seed: int
) -> None:
    e, layers, hidden = shape
    rng = np.random.default_rng(seed)
    sent = with_states(
        updates(e, layers, hidden, seed),
        rng.normal(0, 3, (e, layers, hidden)).astype(np.float32),
        rng.normal(0, 3, (e, layers, hidden)).astype(np.float32),
    )
    values = codec.encode_many(sent, 1.0, codec.FLOAT16)
    assert len(values[0]) == codec.HEADER_SIZE + 2 * layers * hidden * 2

    batch = codec.decode_many(sent.entity_ids, values, Shape(2, layers, hidden), codec.FLOAT16)
    ltm, stm = batch.states
    assert ltm.dtype == np.float32
    np.testing.assert_array_equal(ltm, sent.states[0].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(stm, sent.states[1].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(batch.fence_offset, sent.fence_offset)


def test_a_batch_of_mixed_storage_dtypes_loads_whatever_the_store_writes() -> None:
    sent = with_states(
        updates(2, 1, 3), np.ones((2, 1, 3), np.float32), -np.ones((2, 1, 3), np.float32)
    )
    mixed = [
        codec.encode_many(sent, 1.0, codec.FLOAT32)[0],
        codec.encode_many(sent, 1.0, codec.FLOAT16)[1],
    ]
    for code in (codec.FLOAT32, codec.FLOAT16):
        batch = codec.decode_many(["e0", "e1", "e2"], [*mixed, None], Shape(2, 1, 3), code)
        ltm, stm = batch.states
        np.testing.assert_array_equal(ltm[:2], np.ones((2, 1, 3)))
        np.testing.assert_array_equal(stm[:2], -np.ones((2, 1, 3)))
        assert batch.found.tolist() == [True, True, False]


def test_float16_storage_saturates_what_is_beyond_its_range_instead_of_storing_inf() -> None:
    """An LTM can grow past 65,504 (float16's largest) with large inputs over many events;
    stored as inf it would make every later event of its entity non-finite."""
    sent = with_states(
        updates(1, 1, 4),
        np.array([[[1e6, -1e6, 65504.0, 1.5]]], dtype=np.float32),
        np.array([[[0.5, -0.5, 0.25, 1e9]]], dtype=np.float32),
    )
    values = codec.encode_many(sent, 1.0, codec.FLOAT16)
    batch = codec.decode_many(sent.entity_ids, values, Shape(2, 1, 4), codec.FLOAT16)
    ltm, stm = batch.states
    assert ltm.tolist() == [[[65504.0, -65504.0, 65504.0, 1.5]]]
    assert stm.tolist() == [[[0.5, -0.5, 0.25, 65504.0]]]


# --- formats 3 and 4: a model with another number of states than two ------------------------

other_states = st.sampled_from([1, 3])


def fenced(sent: Memories, other_fences: dict[int, dict[int, int]]) -> Memories:
    """``sent`` with these more fences (row -> partition -> offset)."""
    return Memories(
        sent.entity_ids, sent.states, sent.step, sent.fence_partition, sent.fence_offset,
        other_fences,
    )  # fmt: skip


def assert_same(got: Memories, sent: Memories) -> None:
    """Bit for bit the same memories, steps and fences."""
    assert len(got.states) == len(sent.states)
    for mine, theirs in zip(got.states, sent.states, strict=True):
        assert mine.dtype == np.float32
        np.testing.assert_array_equal(bits(mine), bits(theirs))
    np.testing.assert_array_equal(got.step, sent.step)
    np.testing.assert_array_equal(got.fence_partition, sent.fence_partition)
    np.testing.assert_array_equal(got.fence_offset, sent.fence_offset)
    assert got.other_fences == sent.other_fences


@given(shape=shapes, states=other_states, seed=st.integers(0, 2**32 - 1))
def test_other_numbers_of_states_round_trip_bit_exact(
    shape: tuple[int, int, int], states: int, seed: int
) -> None:
    e, layers, hidden = shape
    sent = updates(e, layers, hidden, seed, states=states)
    values = codec.encode_many(sent, updated_at=1234.5)
    assert all(type(value) is bytes and value[4] == codec.FORMAT_STATES for value in values)

    batch = codec.decode_many(sent.entity_ids, values, Shape(states, layers, hidden))
    assert batch.shape == Shape(states, layers, hidden)
    assert_same(batch, sent)
    assert batch.found.all()

    for row, value in enumerate(values):
        one = codec.decode(value, f"e{row}")
        assert one.updated_at == 1234.5
        assert list(one.memories.entity_ids) == [f"e{row}"]
        assert_same(one.memories, sent.take([row]))


@given(shape=shapes, states=other_states, seed=st.integers(0, 2**32 - 1))
def test_other_numbers_of_states_in_float16_round_to_nearest(
    shape: tuple[int, int, int], states: int, seed: int
) -> None:
    e, layers, hidden = shape
    rng = np.random.default_rng(seed)
    sent = updates(e, layers, hidden, seed, states=states)
    sent = with_states(
        sent, *(rng.normal(0, 3, (e, layers, hidden)).astype(np.float32) for _ in range(states))
    )
    rounded = with_states(
        sent, *(state.astype(np.float16).astype(np.float32) for state in sent.states)
    )
    values = codec.encode_many(sent, 1.0, codec.FLOAT16)
    assert len(values[0]) == codec.STATES_HEADER_SIZE + states * layers * hidden * 2
    assert values[0][5] == codec.FLOAT16

    asked = Shape(states, layers, hidden)
    assert_same(codec.decode_many(sent.entity_ids, values, asked, codec.FLOAT16), rounded)
    # a store of the other dtype reads them too, one at a time
    assert_same(codec.decode_many(sent.entity_ids, values, asked, codec.FLOAT32), rounded)
    for row, value in enumerate(values):
        assert_same(codec.decode(value).memories, rounded.take([row]))


@pytest.mark.parametrize("states", [1, 3])
@pytest.mark.parametrize("code", [codec.FLOAT32, codec.FLOAT16])
def test_formats_3_and_4_record_the_number_of_states_at_byte_40(states: int, code: int) -> None:
    layers, hidden = 2, 3
    size = codec.DTYPES[code].itemsize
    sent = updates(2, layers, hidden, seed=7, states=states)
    if code == codec.FLOAT16:  # values float16 holds exactly
        sent = with_states(sent, *(np.full_like(s, k + 0.5) for k, s in enumerate(sent.states)))
    sent = fenced(sent, {1: {5: 50, RESETS: 2}})
    one, more = codec.encode_many(sent, updated_at=9.25, code=code)

    states_end = codec.STATES_HEADER_SIZE + states * layers * hidden * size
    for value, version in ((one, codec.FORMAT_STATES), (more, codec.FORMAT_STATES_FENCES)):
        assert value[:4] == b"SLTM"
        assert value[4] == version
        assert value[5] == code
        assert struct.unpack_from("<HI", value, 6) == (layers, hidden)
        assert value[40] == states
        assert value[41:48] == bytes(7)  # reserved
        row = 0 if value is one else 1
        header = codec.HEADER.unpack_from(value)
        assert header[5:] == (
            sent.fence_partition[row],
            sent.fence_offset[row],
            sent.step[row],
            9.25,
        )
        dtype = codec.DTYPES[code]
        expected = b"".join(state[row].astype(dtype).tobytes() for state in sent.states)
        assert value[codec.STATES_HEADER_SIZE : states_end] == expected  # in the model's order
    assert len(one) == states_end
    assert len(more) == states_end + 2 * codec.FENCE.size
    # the more fences follow the states, by partition
    assert more[states_end:] == codec.FENCE.pack(RESETS, 2) + codec.FENCE.pack(5, 50)

    batch = codec.decode_many(sent.entity_ids, [one, more], Shape(states, layers, hidden), code)
    assert batch.other_fences == {1: {5: 50, RESETS: 2}}
    assert codec.decode(more).memories.other_fences == {0: {5: 50, RESETS: 2}}
    assert codec.decode(one).memories.other_fences == {}


@pytest.mark.parametrize("states", [1, 3])
def test_record_dtype_of_formats_3_and_4(states: int) -> None:
    dtype = codec.record_dtype(Shape(states, 2, 3))
    fields = dtype.fields
    assert fields is not None
    assert codec.STATES_HEADER_SIZE == 48
    assert fields["fence_partition"][1] == codec.FENCE_PARTITION_AT
    assert fields["fence_offset"][1] == codec.FENCE_OFFSET_AT
    assert fields["step"][1] == codec.STEP_AT
    assert fields["states"][1] == codec.HEADER_SIZE
    assert fields["reserved"][1] == codec.HEADER_SIZE + 1
    assert fields["memories"][1] == codec.STATES_HEADER_SIZE
    assert fields["memories"][0].shape == (states, 2, 3)
    assert dtype.itemsize == codec.STATES_HEADER_SIZE + states * 2 * 3 * 4
    assert "states" not in (codec.record_dtype(Shape(2, 2, 3)).fields or {})


@given(shape=shapes, seed=st.integers(0, 2**32 - 1))
def test_two_states_are_stored_in_format_1_byte_for_byte(
    shape: tuple[int, int, int], seed: int
) -> None:
    """An LSTM's values stay what every earlier build wrote and reads: format 1 (2 with more
    fences), the 40-byte header, then the LTM and the STM."""
    e, layers, hidden = shape
    sent = fenced(updates(e, layers, hidden, seed), {e - 1: {3: 30, 1: 10}})
    values = codec.encode_many(sent, updated_at=42.0)
    for row, value in enumerate(values):
        more = row == e - 1
        header = codec.HEADER.pack(
            b"SLTM",
            2 if more else 1,
            codec.FLOAT32,
            layers,
            hidden,
            sent.fence_partition[row],
            sent.fence_offset[row],
            sent.step[row],
            42.0,
        )
        fences = codec.FENCE.pack(1, 10) + codec.FENCE.pack(3, 30) if more else b""
        ltm, stm = (state[row].astype("<f4").tobytes() for state in sent.states)
        assert value == header + ltm + stm + fences
        assert len(value) == 40 + 2 * layers * hidden * 4 + len(fences)
    assert_same(codec.decode_many(sent.entity_ids, values, Shape(2, layers, hidden)), sent)


@pytest.mark.parametrize(
    ("sent_states", "asked_states"), [(1, 2), (1, 3), (3, 1), (3, 2), (2, 1), (2, 3)]
)
@pytest.mark.parametrize("more_fences", [False, True])
def test_another_number_of_states_is_refused_naming_the_entity(
    sent_states: int, asked_states: int, more_fences: bool
) -> None:
    sent = updates(2, 1, 3, states=sent_states)
    if more_fences:
        sent = fenced(sent, {1: {4: 40}})
    values = codec.encode_many(sent, updated_at=0.0)
    with pytest.raises(
        StoreError,
        match=rf"entity 'e1': stored memory has {sent_states} states of \(1, 3\), "
        rf"the model expects {asked_states} of \(1, 3\)",
    ):
        codec.decode_many(["e0", "e1"], [None, values[1]], Shape(asked_states, 1, 3))


def test_more_states_with_fences_are_refused_though_they_fit_the_fast_path() -> None:
    """3 states of (1, 3) and one more fence are as long as 1 state of (1, 3) with three:
    only the number of states in the header tells them apart."""
    sent = fenced(updates(1, 1, 3, states=3), {0: {4: 40}})
    (value,) = codec.encode_many(sent, updated_at=0.0)
    assert value[4] == codec.FORMAT_STATES_FENCES
    assert (len(value) - codec.record_dtype(Shape(1, 1, 3)).itemsize) % codec.FENCE.size == 0
    with pytest.raises(StoreError, match=r"entity 'e0': stored memory has 3 states"):
        codec.decode_many(["e0"], [value], Shape(1, 1, 3))


def test_a_truncated_value_of_format_3_is_refused() -> None:
    (value,) = codec.encode_many(updates(1, 1, 4, states=3), updated_at=0.0)
    for bad, reason in (
        (value[:-1], "format 3.*truncated"),
        (value[:44], "format 3.*truncated"),
        (value + b"\0" * 12, "format 3.*before fences"),
        (value[:4] + b"\x04" + value[5:], "format 4.*before fences"),
        (value[:40] + b"\0" + value[41:], "states=0"),
    ):
        with pytest.raises(StoreError, match=reason):
            codec.decode(bad)
        with pytest.raises(StoreError, match=f"entity 'bad': .*{reason}"):
            codec.decode_many(["ok", "bad"], [value, bad], Shape(3, 1, 4))
