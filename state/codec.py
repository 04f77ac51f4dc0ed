"""The binary form of one entity's memory, and of a batch of them.

One stored value is a fixed little-endian header followed by the model's states, each
``layers x hidden`` raw values of the header's dtype (C order)::

    offset  size  field
         0     4  magic b"SLTM"
         4     1  format version: 1 or 2 (two states, an LSTM's), 3 or 4 (their number at 40)
         5     1  dtype code (1: float32, 2: float16)
         6     2  layers L (u16)
         8     4  hidden H (u32)
        12     4  fence partition (i32)   the (partition, offset) of the last event applied
        16     8  fence offset (i64)
        24     8  step (u64)              events applied since the entity's last reset
        32     8  updated_at (f64)        unix seconds of the write
        40        formats 1, 2: the LTM (L, H), then the STM (L, H)
        40     1  formats 3, 4: the number of states S (u8), then 7 bytes reserved (zero)
        48        formats 3, 4: S states (L, H) each, in the model's order
      then   12k  formats 2 and 4 only: k more fences, (partition i32, offset i64) each

An entity has a fence for every input partition its events came from: the header holds the one
of its last event, and only an entity whose events came from more than one partition (producers
with different partitioners, a topic that grew) carries the others after its states, in format
2 (or 4). Partition ``RESETS`` (-2) there counts the entity's resets out of the stream: a
reset changes the fences, so a commit made from the memory before it cannot overwrite it
(lua/commit.lua). An entity with one fence is stored in format 1 (or 3).

An LSTM's memories keep formats 1 and 2, which every earlier build reads; a model with another
number of states (``StreamModel.states``) is stored in formats 3 and 4, whose header says how
many, so the store's Lua scripts find the fences after the states without knowing the model.

The fence sits at a fixed offset so those scripts can read it without decoding the rest. Raw
floats make the round trip bit-exact (NaN payloads and -0.0 included) and keep the value small:
40 + 2 * L * H * 4 bytes for an LSTM (1064 at L=1, H=128).

Batches are ``Memories``, stacked arrays, so encoding and decoding run in numpy, never per float
in Python. A value that is not ours, truncated or of another shape raises StoreError naming the
entity.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from stream_lstm.exceptions import StoreError
from stream_lstm.memories import Fences, Memories, Shape

__all__ = ["StoredMemory", "decode", "decode_many", "encode_many"]

MAGIC = b"SLTM"
FORMAT_VERSION = 1
"""Two states, one fence: the format of almost every value."""
FORMAT_FENCES = 2
"""Format 1 followed by more fences."""
FORMAT_STATES = 3
"""Another number of states than two, recorded after the header, one fence."""
FORMAT_STATES_FENCES = 4
"""Format 3 followed by more fences."""
MORE_FENCES = {FORMAT_VERSION: FORMAT_FENCES, FORMAT_STATES: FORMAT_STATES_FENCES}
"""Each format with one fence, and its form with more."""
FORMATS = (FORMAT_VERSION, FORMAT_FENCES, FORMAT_STATES, FORMAT_STATES_FENCES)
TWO_STATES = 2
"""The number of states formats 1 and 2 hold (an LSTM's LTM and STM)."""
FLOAT32 = 1
FLOAT16 = 2
DTYPES: dict[int, np.dtype[np.floating]] = {FLOAT32: np.dtype("<f4"), FLOAT16: np.dtype("<f2")}
"""Dtype codes a value may carry. float16 halves the memories (opt-in: it rounds them)."""
CODES = {"float32": FLOAT32, "float16": FLOAT16}
FLOAT16_MAX = float(np.finfo(np.float16).max)

HEADER = struct.Struct("<4sBBHIiqQd")
HEADER_SIZE = HEADER.size  # 40
STATES_HEADER_SIZE = 48
"""Formats 3 and 4: the header, the number of states (u8) and 7 reserved bytes."""
FENCE_PARTITION_AT = 12
FENCE_OFFSET_AT = 16
STEP_AT = 24
UPDATED_AT = struct.Struct("<d")
"""updated_at, which follows the step: a reset writes it alone."""

FENCE = struct.Struct("<iq")
"""One of the more fences of formats 2 and 4: partition, offset."""


@dataclass(frozen=True, slots=True, eq=False)
class StoredMemory:
    """One entity's stored memory, decoded, and when it was written."""

    memories: Memories  # one row
    updated_at: float


@lru_cache(maxsize=64)
def record_dtype(shape: Shape, code: int = FLOAT32) -> np.dtype[np.void]:
    """The numpy structured dtype of one stored value with one fence (packed, same layout as
    HEADER): format 1 for two states, else format 3."""
    fields = [
        ("magic", "S4"),
        ("version", "u1"),
        ("dtype", "u1"),
        ("layers", "<u2"),
        ("hidden", "<u4"),
        ("fence_partition", "<i4"),
        ("fence_offset", "<i8"),
        ("step", "<u8"),
        ("updated_at", "<f8"),
    ]
    if shape.states != TWO_STATES:
        fields += [("states", "u1"), ("reserved", "V7")]
    memory = DTYPES[code].str
    return np.dtype([*fields, ("memories", memory, (shape.states, shape.layers, shape.hidden))])


def encode_many(memories: Memories, updated_at: float, code: int = FLOAT32) -> list[bytes]:
    """One encoded value per entity, in order; float16 rounds the memories to nearest."""
    shape = memories.shape
    records = np.empty(len(memories), dtype=record_dtype(shape, code))
    records["magic"] = MAGIC
    records["version"] = FORMAT_VERSION if shape.states == TWO_STATES else FORMAT_STATES
    if shape.states != TWO_STATES:
        records["states"] = shape.states
        records["reserved"] = bytes(7)
    records["dtype"] = code
    records["layers"] = shape.layers
    records["hidden"] = shape.hidden
    records["fence_partition"] = memories.fence_partition
    records["fence_offset"] = memories.fence_offset
    records["step"] = memories.step
    records["updated_at"] = updated_at
    for k, state in enumerate(memories.states):
        if code == FLOAT16:  # beyond float16's range a memory would be stored as inf: saturate
            state = np.clip(state, -FLOAT16_MAX, FLOAT16_MAX)
        records["memories"][:, k] = state
    # Viewed as opaque fixed-size blobs, tolist() cuts one bytes object per record in C.
    values: list[bytes] = records.view(f"V{records.dtype.itemsize}").tolist()
    for row, fences in memories.other_fences.items():
        if fences:
            values[row] = with_fences(values[row], fences)
    return values


def with_fences(value: bytes, fences: Fences) -> bytes:
    """A value of one fence turned into its format with these more fences (by partition)."""
    head = value[:4] + bytes([MORE_FENCES[value[4]]]) + value[5:]
    return head + b"".join(FENCE.pack(p, fences[p]) for p in sorted(fences))


def fences_of(tail: bytes) -> dict[int, int]:
    """The more fences of a format 2 or 4 value, from what follows its states."""
    return {p: offset for p, offset in FENCE.iter_unpack(tail)}


def decode(value: bytes, entity_id: str = "") -> StoredMemory:
    """Decode one stored value; raises StoreError when it is foreign, truncated or too new."""
    if len(value) < HEADER_SIZE:
        raise StoreError(
            f"value of {len(value)} bytes is shorter than the {HEADER_SIZE}-byte header"
        )
    magic, version, code, layers, hidden, partition, offset, step, updated_at = HEADER.unpack_from(
        value
    )
    if magic != MAGIC:
        raise StoreError(f"value is not a stream-lstm memory (magic {magic!r}, expected {MAGIC!r})")
    if version not in FORMATS:
        raise StoreError(
            f"value has format version {version}; this build reads {', '.join(map(str, FORMATS))}"
        )
    if code not in DTYPES:
        raise StoreError(f"value has unknown dtype code {code}")
    start, states = HEADER_SIZE, TWO_STATES
    if version not in (FORMAT_VERSION, FORMAT_FENCES):
        start = STATES_HEADER_SIZE
        states = value[HEADER_SIZE] if len(value) >= start else 0
    dtype = DTYPES[code]
    expected = start + states * layers * hidden * dtype.itemsize
    tail = len(value) - expected
    one_fence = version in MORE_FENCES
    if not states or tail < 0 or one_fence != (tail == 0) or tail % FENCE.size:
        raise StoreError(
            f"value of {len(value)} bytes does not match its header (format {version}, "
            f"states={states}, layers={layers}, hidden={hidden}: {expected} bytes before "
            "fences); truncated?"
        )
    count = states * layers * hidden
    stored = np.frombuffer(value, dtype=dtype, offset=start, count=count)
    stored = stored.reshape(states, 1, layers, hidden).astype(np.float32)  # writable float32
    memories = Memories(
        [entity_id],
        tuple(stored),
        np.array([step], np.int64),
        np.array([partition], np.int64),
        np.array([offset], np.int64),
        {0: fences_of(value[expected:])} if tail else {},
    )
    return StoredMemory(memories, updated_at)


def decode_many(
    entity_ids: Sequence[str],
    values: Sequence[bytes | None],
    shape: Shape,
    code: int = FLOAT32,
) -> Memories:
    """Decode the values of an MGET (None: nothing stored) into one batch; an entity with
    nothing stored has zero states and no fence.

    All values are joined and read by one ``np.frombuffer`` with the record dtype of ``code``
    (the store's storage dtype); headers are checked column-wise, and the more fences of a
    format 2 or 4 value are read from what follows its record. When a check fails (a value
    stored in the other dtype, or a bad value), each value is decoded on its own: values of
    either dtype load, and a bad one raises StoreError naming its entity.
    """
    dtype = record_dtype(shape, code)
    size = dtype.itemsize
    one_fence = FORMAT_VERSION if shape.states == TWO_STATES else FORMAT_STATES
    present = [value for value in values if value is not None]
    found = np.fromiter((value is not None for value in values), np.bool_, len(entity_ids))
    lengths = np.fromiter(map(len, present), dtype=np.int64, count=len(present))
    longer = np.flatnonzero(lengths > size).tolist()  # more fences, or bad
    records = None
    if (lengths >= size).all():
        fixed = present
        if longer:
            fixed = present.copy()
            for i in longer:
                fixed[i] = present[i][:size]
        records = np.frombuffer(b"".join(fixed), dtype=dtype)
        version = np.full(len(present), one_fence, dtype=np.uint8)
        version[longer] = MORE_FENCES[one_fence]
        ok = (
            (records["magic"] == MAGIC)
            & (records["version"] == version)
            & (records["dtype"] == code)
            & (records["layers"] == shape.layers)
            & (records["hidden"] == shape.hidden)
        )
        if shape.states != TWO_STATES:
            ok &= records["states"] == shape.states
        ok[longer] &= (lengths[longer] - size) % FENCE.size == 0
    if records is None or not ok.all():
        return _decode_each(entity_ids, values, shape)

    memories = Memories.zeros(entity_ids, shape)
    for k, state in enumerate(memories.states):
        state[found] = records["memories"][:, k]
    memories.step[found] = records["step"]
    memories.fence_partition[found] = records["fence_partition"]
    memories.fence_offset[found] = records["fence_offset"]
    rows = np.flatnonzero(found)
    for i in longer:
        memories.other_fences[int(rows[i])] = fences_of(present[i][size:])
    return memories


def _decode_each(
    entity_ids: Sequence[str], values: Sequence[bytes | None], shape: Shape
) -> Memories:
    """The slow path of ``decode_many``: one value at a time, whatever its dtype."""
    memories = Memories.zeros(entity_ids, shape)
    for row, (entity_id, value) in enumerate(zip(entity_ids, values, strict=True)):
        if value is None:
            continue
        try:
            stored = decode(value, entity_id).memories
        except StoreError as error:
            raise StoreError(f"entity {entity_id!r}: {error}") from None
        if stored.shape != shape:
            raise StoreError(
                f"entity {entity_id!r}: stored memory has {stored.shape.states} states of "
                f"({stored.shape.layers}, {stored.shape.hidden}), the model expects "
                f"{shape.states} of ({shape.layers}, {shape.hidden})"
            )
        memories.put([row], stored)
    return memories
