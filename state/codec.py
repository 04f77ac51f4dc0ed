"""The binary form of one entity's memory, and the stacked batches the workers use.

One stored value is a fixed 40-byte little-endian header followed by the LTM and the STM, each
``layers x hidden`` raw values of the header's dtype (C order)::

    offset  size  field
         0     4  magic b"SLTM"
         4     1  format version (1)
         5     1  dtype code (1: float32; float16 may come later under a new code)
         6     2  layers L (u16)
         8     4  hidden H (u32)
        12     4  fence partition (i32)   the (partition, offset) of the last event applied
        16     8  fence offset (i64)
        24     8  step (u64)              events applied since the entity's last reset
        32     8  updated_at (f64)        unix seconds of the write
        40        LTM (L, H), then STM (L, H)
  40 + 2LH*d  12k  format 2 only: k more fences, (partition i32, offset i64) each, by partition

An entity has a fence for every input partition its events came from: the header holds the one
of its last event, and only an entity whose events came from more than one partition (producers
with different partitioners, a topic that grew) carries the others after its memories, in
format 2. Partition ``RESETS`` (-2) there counts the entity's resets out of the stream: a
reset changes the fences, so a commit made from the memory before it cannot overwrite it
(lua/commit.lua). An entity with one fence is stored in format 1, which every earlier build reads.

The fence sits at a fixed offset so the store's Lua scripts can read it without decoding the
rest. Raw floats make the round trip bit-exact (NaN payloads and -0.0 included) and keep the
value small: 40 + 2 * L * H * 4 bytes (1064 at L=1, H=128).

Batches are stacked arrays, so encoding and decoding run in numpy, never per float in Python.
A value that is not ours, truncated or of another shape raises StoreError naming the entity.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from stream_lstm.exceptions import StoreError

__all__ = ["MemoryBatch", "MemoryUpdates", "StoredMemory"]

MAGIC = b"SLTM"
FORMAT_VERSION = 1
"""One fence: the format of almost every value."""
FORMAT_FENCES = 2
"""Format 1 followed by more fences."""
FORMATS = (FORMAT_VERSION, FORMAT_FENCES)
FLOAT32 = 1
FLOAT16 = 2
DTYPES: dict[int, np.dtype[np.floating]] = {FLOAT32: np.dtype("<f4"), FLOAT16: np.dtype("<f2")}
"""Dtype codes a value may carry. float16 halves the memories (opt-in: it rounds them)."""
CODES = {"float32": FLOAT32, "float16": FLOAT16}
FLOAT16_MAX = float(np.finfo(np.float16).max)

HEADER = struct.Struct("<4sBBHIiqQd")
HEADER_SIZE = HEADER.size  # 40
FENCE_PARTITION_AT = 12
FENCE_OFFSET_AT = 16
STEP_AT = 24
UPDATED_AT = struct.Struct("<d")
"""updated_at, which follows the step: a reset writes it alone."""

NO_FENCE = -1
"""Fence partition and offset of an entity that has no stored memory."""
RESETS = -2
"""The partition under which an entity's more fences count its resets."""
FENCE = struct.Struct("<iq")
"""One of the more fences of format 2: partition, offset."""

Fences: TypeAlias = Mapping[int, int]
"""An entity's more fences: partition -> offset of the last event applied from it."""

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True, eq=False)
class StoredMemory:
    """One entity's stored memory, decoded."""

    ltm: F32  # (L, H)
    stm: F32  # (L, H)
    step: int
    fence_partition: int
    fence_offset: int
    updated_at: float
    other_fences: Fences = field(default_factory=dict)
    """The fences besides the header's (format 2), and the resets count under ``RESETS``."""


@dataclass(frozen=True, slots=True, eq=False)
class MemoryBatch:
    """The memories of E entities, stacked; an entity with nothing stored has zeros."""

    entity_ids: Sequence[str]
    ltm: F32  # (E, L, H)
    stm: F32  # (E, L, H)
    step: I64  # (E,)  0 where not found
    fence_partition: I64  # (E,)  NO_FENCE where not found
    fence_offset: I64  # (E,)  NO_FENCE where not found
    found: npt.NDArray[np.bool_]  # (E,)
    other_fences: dict[int, Fences] = field(default_factory=dict)
    """Row -> the entity's fences besides the header's; only rows that have some."""
    partition_fences: Mapping[int, int | None] = field(default_factory=dict)
    """The fences of the partitions the load was asked for (None: no commit yet)."""
    outside_writes: bytes | None = None
    """The namespace's count of writes no partition owner sees coming, as the load read it."""
    cached: int = 0
    """How many of the memories came from the worker's memory cache, not from Redis."""


@dataclass(frozen=True, slots=True, eq=False)
class MemoryUpdates:
    """New memories for E entities, stacked, each with the fence of the last event applied.

    Raises ValueError when the arrays disagree on E, or the memories are not float32 (a silent
    cast would break the bit-exact round trip).
    """

    entity_ids: Sequence[str]
    ltm: F32  # (E, L, H)
    stm: F32  # (E, L, H)
    step: I64  # (E,)
    fence_partition: I64  # (E,)
    fence_offset: I64  # (E,)
    other_fences: Mapping[int, Fences] = field(default_factory=dict)
    """Row -> the entity's fences besides the header's; only rows that have some."""

    def __post_init__(self) -> None:
        e = len(self.entity_ids)
        if self.ltm.ndim != 3 or self.ltm.shape[0] != e or self.stm.shape != self.ltm.shape:
            raise ValueError(
                f"ltm {self.ltm.shape} and stm {self.stm.shape} must both be ({e}, L, H)"
            )
        if self.ltm.dtype != np.float32 or self.stm.dtype != np.float32:
            raise ValueError(f"memories must be float32, got {self.ltm.dtype}, {self.stm.dtype}")
        for name in ("step", "fence_partition", "fence_offset"):
            shape = getattr(self, name).shape
            if shape != (e,):
                raise ValueError(f"{name} has shape {shape}, expected ({e},)")
        if any(not 0 <= row < e for row in self.other_fences):
            raise ValueError(f"other_fences has rows outside 0..{e - 1}")

    def spans_partitions(self) -> bool:
        """Whether some entity has fences on more than one input partition (the resets count
        aside): such a write may change what another partition's owner started from."""
        return any(any(p != RESETS for p in fences) for fences in self.other_fences.values())


@lru_cache(maxsize=64)
def record_dtype(layers: int, hidden: int, code: int = FLOAT32) -> np.dtype[np.void]:
    """The numpy structured dtype of one stored value (packed, same layout as HEADER)."""
    memory = DTYPES[code].str
    return np.dtype(
        [
            ("magic", "S4"),
            ("version", "u1"),
            ("dtype", "u1"),
            ("layers", "<u2"),
            ("hidden", "<u4"),
            ("fence_partition", "<i4"),
            ("fence_offset", "<i8"),
            ("step", "<u8"),
            ("updated_at", "<f8"),
            ("ltm", memory, (layers, hidden)),
            ("stm", memory, (layers, hidden)),
        ]
    )


def encode_many(updates: MemoryUpdates, updated_at: float, code: int = FLOAT32) -> list[bytes]:
    """One encoded value per entity, in order; float16 rounds the memories to nearest."""
    e, layers, hidden = updates.ltm.shape
    records = np.empty(e, dtype=record_dtype(layers, hidden, code))
    records["magic"] = MAGIC
    records["version"] = FORMAT_VERSION
    records["dtype"] = code
    records["layers"] = layers
    records["hidden"] = hidden
    records["fence_partition"] = updates.fence_partition
    records["fence_offset"] = updates.fence_offset
    records["step"] = updates.step
    records["updated_at"] = updated_at
    if code == FLOAT16:  # beyond float16's range a memory would be stored as inf: saturate
        records["ltm"] = np.clip(updates.ltm, -FLOAT16_MAX, FLOAT16_MAX)
        records["stm"] = np.clip(updates.stm, -FLOAT16_MAX, FLOAT16_MAX)
    else:
        records["ltm"] = updates.ltm
        records["stm"] = updates.stm
    # Viewed as opaque fixed-size blobs, tolist() cuts one bytes object per record in C.
    values: list[bytes] = records.view(f"V{records.dtype.itemsize}").tolist()
    for row, fences in updates.other_fences.items():
        if fences:
            values[row] = with_fences(values[row], fences)
    return values


def with_fences(value: bytes, fences: Fences) -> bytes:
    """A format 1 value turned into format 2 with these more fences (by partition)."""
    head = value[:4] + bytes([FORMAT_FENCES]) + value[5:]
    return head + b"".join(FENCE.pack(p, fences[p]) for p in sorted(fences))


def fences_of(tail: bytes) -> dict[int, int]:
    """The more fences of a format 2 value, from what follows its memories."""
    return {p: offset for p, offset in FENCE.iter_unpack(tail)}


def decode(value: bytes) -> StoredMemory:
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
            f"value has format version {version}; this build reads "
            f"{' and '.join(map(str, FORMATS))}"
        )
    if code not in DTYPES:
        raise StoreError(f"value has unknown dtype code {code}")
    dtype = DTYPES[code]
    expected = HEADER_SIZE + 2 * layers * hidden * dtype.itemsize
    tail = len(value) - expected
    if tail < 0 or (version == FORMAT_VERSION) != (tail == 0) or tail % FENCE.size:
        raise StoreError(
            f"value of {len(value)} bytes does not match its header (format {version}, "
            f"layers={layers}, hidden={hidden}: {expected} bytes before fences); truncated?"
        )
    memories = np.frombuffer(value, dtype=dtype, offset=HEADER_SIZE, count=2 * layers * hidden)
    memories = memories.reshape(2, layers, hidden)
    return StoredMemory(
        ltm=memories[0].astype(np.float32),  # a writable copy, float32 whatever the storage
        stm=memories[1].astype(np.float32),
        step=step,
        fence_partition=partition,
        fence_offset=offset,
        updated_at=updated_at,
        other_fences=fences_of(value[expected:]),
    )


def decode_many(
    entity_ids: Sequence[str],
    values: Sequence[bytes | None],
    layers: int,
    hidden: int,
    code: int = FLOAT32,
) -> MemoryBatch:
    """Decode the values of an MGET (None: nothing stored) into one stacked batch.

    All values are joined and read by one ``np.frombuffer`` with the record dtype of ``code``
    (the store's storage dtype); headers are checked column-wise, and the more fences of a
    format 2 value are read from what follows its record. When a check fails (a value stored in
    the other dtype, or a bad value), each value is decoded on its own: values of either dtype
    load, and a bad one raises StoreError naming its entity.
    """
    e = len(entity_ids)
    dtype = record_dtype(layers, hidden, code)
    size = dtype.itemsize
    present = [value for value in values if value is not None]
    found = np.fromiter((value is not None for value in values), dtype=np.bool_, count=e)
    lengths = np.fromiter(map(len, present), dtype=np.int64, count=len(present))
    longer = np.flatnonzero(lengths > size).tolist()  # format 2, or bad
    records = None
    if (lengths >= size).all():
        fixed = present
        if longer:
            fixed = present.copy()
            for i in longer:
                fixed[i] = present[i][:size]
        records = np.frombuffer(b"".join(fixed), dtype=dtype)
        version = np.full(len(present), FORMAT_VERSION, dtype=np.uint8)
        version[longer] = FORMAT_FENCES
        ok = (
            (records["magic"] == MAGIC)
            & (records["version"] == version)
            & (records["dtype"] == code)
            & (records["layers"] == layers)
            & (records["hidden"] == hidden)
        )
        ok[longer] &= (lengths[longer] - size) % FENCE.size == 0
    if records is None or not ok.all():
        return _decode_each(entity_ids, values, layers, hidden)

    ltm = np.zeros((e, layers, hidden), dtype=np.float32)
    stm = np.zeros((e, layers, hidden), dtype=np.float32)
    step = np.zeros(e, dtype=np.int64)
    fence_partition = np.full(e, NO_FENCE, dtype=np.int64)
    fence_offset = np.full(e, NO_FENCE, dtype=np.int64)
    ltm[found] = records["ltm"]
    stm[found] = records["stm"]
    step[found] = records["step"]
    fence_partition[found] = records["fence_partition"]
    fence_offset[found] = records["fence_offset"]
    rows = np.flatnonzero(found)
    other: dict[int, Fences] = {int(rows[i]): fences_of(present[i][size:]) for i in longer}
    return MemoryBatch(entity_ids, ltm, stm, step, fence_partition, fence_offset, found, other)


def _decode_each(
    entity_ids: Sequence[str], values: Sequence[bytes | None], layers: int, hidden: int
) -> MemoryBatch:
    """The slow path of ``decode_many``: one value at a time, whatever its dtype."""
    e = len(entity_ids)
    ltm = np.zeros((e, layers, hidden), dtype=np.float32)
    stm = np.zeros((e, layers, hidden), dtype=np.float32)
    step = np.zeros(e, dtype=np.int64)
    fence_partition = np.full(e, NO_FENCE, dtype=np.int64)
    fence_offset = np.full(e, NO_FENCE, dtype=np.int64)
    found = np.zeros(e, dtype=np.bool_)
    other: dict[int, Fences] = {}
    for row, (entity_id, value) in enumerate(zip(entity_ids, values, strict=True)):
        if value is None:
            continue
        try:
            stored = decode(value)
        except StoreError as error:
            raise StoreError(f"entity {entity_id!r}: {error}") from None
        if stored.ltm.shape != (layers, hidden):
            raise StoreError(
                f"entity {entity_id!r}: stored memory has shape {stored.ltm.shape}, "
                f"the model expects ({layers}, {hidden})"
            )
        ltm[row], stm[row], step[row] = stored.ltm, stored.stm, stored.step
        fence_partition[row], fence_offset[row] = stored.fence_partition, stored.fence_offset
        found[row] = True
        if stored.other_fences:
            other[row] = stored.other_fences
    return MemoryBatch(entity_ids, ltm, stm, step, fence_partition, fence_offset, found, other)
