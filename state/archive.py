"""Export files: every memory of one namespace and model version, as Redis stores it, in one
file that another Redis (one server or a cluster) can import.

``export_memories`` streams a store's memories to a file. ``check_export`` reads a file through
and refuses it unless all of it is sound, so that an import writes nothing from a file that is
not an export, is truncated or corrupt, or holds a value that does not decode;
``import_memories`` then writes what it checked into a store.

The format (version 1) is written and read front to back, so it goes through a pipe::

    stream-lstm memories\\n          the magic line
    {"format": 1, ...}\\n            the header: one line of JSON (UTF-8), below
    record ...                       one per memory:
        u32  n                       the entity id's length in bytes (n > 0)
        n    entity id               UTF-8
        u32  m                       the value's length in bytes
        m    value                   the stored value as Redis holds it (codec.py): states,
                                     step, fences and updated_at, so the round trip is bit-exact
    end:
        u32  0                       no id is empty: this ends the records
        u64  count                   the number of records
        u32  crc                     CRC-32 of the header line and every record's bytes
                                     (lengths included), in order

Integers are little-endian; nothing follows the end. The header holds ``format`` (1),
``namespace`` and ``model_version`` (whose memories these are), ``shape`` (the model's
``[states, layers, hidden]``), ``topic`` (the input topic whose offsets the fences count, as
the workers recorded it, or null) and ``created_at`` (ISO 8601, UTC). Values keep their own
dtype (float32 or float16) in their header.
"""

from __future__ import annotations

import dataclasses
import datetime
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import orjson

from state import codec
from state.store import MemoryStore
from stream_lstm.exceptions import ArchiveError, StoreError, TopicChangedError
from stream_lstm.memories import Shape

__all__ = [
    "CheckedExport",
    "ExportHeader",
    "Imported",
    "check_export",
    "export_memories",
    "import_memories",
]

MAGIC = b"stream-lstm memories\n"
FORMAT = 1
LENGTH = struct.Struct("<I")
END = struct.Struct("<QI")
"""After the zero length that ends the records: their count and CRC-32."""
CHUNK = 1000
"""Memories read, written or checked at a time: bounded memory, few round trips."""
_HEADER_MAX = 1 << 20
"""A header line longer than this is no header of ours (a file that is not an export)."""
_PIECE = 1 << 20
"""Reads are at most this long, so a garbage length costs what the file holds, not 4 GiB."""


@dataclass(frozen=True, slots=True)
class ExportHeader:
    """What an export holds: whose memories, of which model, made from which input topic."""

    namespace: str
    model_version: str
    shape: Shape
    topic: str | None
    created_at: str
    format: int = FORMAT

    def line(self) -> bytes:
        """The header as the file holds it: one line of JSON."""
        fields = dataclasses.asdict(self)
        fields["shape"] = list(self.shape)
        return orjson.dumps(fields) + b"\n"


@dataclass(frozen=True, slots=True)
class Imported:
    """What an import did: memories written, and memories kept because the entity already had
    one (without ``replace``)."""

    written: int
    kept: int


async def export_memories(
    store: MemoryStore,
    file: IO[bytes],
    shape: Shape,
    *,
    chunk: int = CHUNK,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write every memory of the store's namespace and model version to ``file`` (``shape``:
    the model's); returns how many. ``progress`` gets the count after each chunk.

    A chunk at a time (``MemoryStore.export_chunks``): memory stays bounded. A file cut short
    (an export interrupted, a disk full) lacks the end and is refused on import.
    """
    header = ExportHeader(
        namespace=store.namespace,
        model_version=store.model_version,
        shape=Shape(*shape),
        topic=await store.recorded_topic(),
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    line = header.line()
    file.write(MAGIC + line)
    count, crc = 0, zlib.crc32(line)
    async for entity_ids, values in store.export_chunks(shape, chunk):
        records = b"".join(_record(e, v) for e, v in zip(entity_ids, values, strict=True))
        file.write(records)
        count += len(entity_ids)
        crc = zlib.crc32(records, crc)
        if progress is not None:
            progress(count)
    file.write(LENGTH.pack(0) + END.pack(count, crc))
    file.flush()
    return count


def _record(entity_id: str, value: bytes) -> bytes:
    name = entity_id.encode()
    return LENGTH.pack(len(name)) + name + LENGTH.pack(len(value)) + value


@dataclass(eq=False)
class CheckedExport:
    """An export file read through and found sound (``check_export``), ready to import."""

    name: str
    header: ExportHeader
    count: int
    shape: Shape
    source: IO[bytes]
    start: int  # where the records begin in ``source``
    crc: int
    copied: bool  # ``source`` is a temporary copy of a pipe's, this object's to close
    header_crc: int  # the CRC-32 of the header line, where the records' CRC starts

    def chunks(self, chunk: int = CHUNK) -> Iterator[tuple[list[str], list[bytes]]]:
        """The records again, ``chunk`` at a time; ArchiveError when the file changed since it
        was checked."""
        self.source.seek(self.start)
        reader = _Reader(self.source, self.name, self.shape, crc=self.header_crc)
        yield from reader.chunks(chunk)
        if (reader.count, reader.crc) != (self.count, self.crc):
            raise ArchiveError(f"{self.name} changed while it was imported")

    def close(self) -> None:
        """Close the temporary copy of a file read from a pipe (never the caller's file)."""
        if self.copied:
            self.source.close()


def check_export(
    file: IO[bytes],
    name: str,
    *,
    model_version: str,
    shape: Shape,
    any_version: bool = False,
) -> CheckedExport:
    """Read an export through and check all of it against the model (``model_version``,
    ``shape``); ArchiveError naming ``name`` (what the user called the file) and saying why.

    A file of another model version is refused, unless ``any_version``: then its memories
    must still have the model's shape, each value is checked against it, and an import writes
    them under ``model_version``. A file that cannot be read again (a pipe) is copied to a
    temporary file as it is checked (its size on disk), so that an import writes nothing
    unless all of it is sound; close it with ``CheckedExport.close``.
    """
    header, header_crc = _read_header(file, name)
    if header.model_version != model_version and not any_version:
        raise ArchiveError(
            f"{name} holds memories of model version {header.model_version!r}, not of the "
            f"configured model's {model_version} (--any-version imports them under "
            f"{model_version} when they have its shape)"
        )
    if header.shape != shape:
        raise ArchiveError(
            f"{name} holds memories of {_shape(header.shape)}; the configured model's are "
            f"{_shape(shape)}"
        )
    seekable = file.seekable()
    copy = None if seekable else tempfile.TemporaryFile()  # noqa: SIM115 (CheckedExport.close)
    try:
        start = file.tell() if seekable else 0
        reader = _Reader(file, name, shape, copy, crc=header_crc)
        for _ in reader.chunks(CHUNK):
            pass
        if file.read(1):
            raise ArchiveError(f"{name} goes on after the end of its records: not one export")
    except BaseException:
        if copy is not None:
            copy.close()
        raise
    source = file if copy is None else copy
    return CheckedExport(
        name,
        header,
        reader.count,
        Shape(*shape),
        source,
        start,
        reader.crc,
        copy is not None,
        header_crc,
    )


def _shape(shape: Sequence[int]) -> str:
    states, layers, hidden = shape
    return f"{states} states of (layers {layers}, hidden {hidden})"


def _read_header(file: IO[bytes], name: str) -> tuple[ExportHeader, int]:
    """The header, and the CRC-32 of its line (the end's checksum covers it too)."""
    magic = file.read(len(MAGIC))
    if magic != MAGIC:
        raise ArchiveError(f"{name} is not a stream-lstm memory export (it does not start so)")
    line = file.readline(_HEADER_MAX)
    try:
        fields: Any = orjson.loads(line)
        if not line.endswith(b"\n") or not isinstance(fields, dict):
            raise ValueError("not one line holding a JSON object")
        if type(fields.get("format")) is not int or fields["format"] != FORMAT:
            raise ArchiveError(
                f"{name} is an export of format {fields.get('format')!r}; this build reads "
                f"format {FORMAT}"
            )
        topic = fields["topic"]
        if topic is not None and not _is_topic(topic):
            raise ValueError("topic is neither null nor an input topic's identity")
        shape = fields["shape"]
        if not (isinstance(shape, list) and len(shape) == 3):
            raise ValueError("shape is not [states, layers, hidden]")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
            raise ValueError("shape is not three positive integers")
        header = ExportHeader(
            namespace=str(fields["namespace"]),
            model_version=str(fields["model_version"]),
            shape=Shape(*shape),
            topic=topic,
            created_at=str(fields["created_at"]),
        )
        return header, zlib.crc32(line)
    except (orjson.JSONDecodeError, KeyError, ValueError) as error:
        raise ArchiveError(f"{name}: its header is not an export's ({error})") from None


def _is_topic(topic: object) -> bool:
    """Whether a header's topic is what the workers record: JSON of the topic's name and id."""
    if not isinstance(topic, str):
        return False
    try:
        identity = orjson.loads(topic)
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(identity, dict)
        and set(identity) == {"topic", "topic_id"}
        and all(isinstance(v, str) for v in identity.values())
    )


class _Reader:
    """The records of an export, front to back, each checked; their count and CRC-32."""

    def __init__(
        self,
        file: IO[bytes],
        name: str,
        shape: Shape,
        copy: IO[bytes] | None = None,
        *,
        crc: int = 0,
    ) -> None:
        self.file = file
        self.name = name
        self.shape = shape
        self.copy = copy  # what is read goes here too (a pipe's temporary copy)
        self.count = 0
        self.crc = crc

    def chunks(self, chunk: int) -> Iterator[tuple[list[str], list[bytes]]]:
        """The records, ``chunk`` at a time, each value checked to decode to the shape; the
        end checked last."""
        entity_ids: list[str] = []
        values: list[bytes] = []
        while True:
            length = self._read(LENGTH.size, "a record")
            (size,) = LENGTH.unpack(length)
            if size == 0:
                break
            raw_id = self._read(size, "an entity id")
            value_length = self._read(LENGTH.size, "a record")
            value = self._read(LENGTH.unpack(value_length)[0], "a value")
            self.crc = zlib.crc32(b"".join((length, raw_id, value_length, value)), self.crc)
            try:
                entity_ids.append(raw_id.decode())
            except UnicodeDecodeError:
                raise ArchiveError(
                    f"{self.name}: record {self.count + 1}: the entity id is not UTF-8; the "
                    "file is corrupt"
                ) from None
            values.append(value)
            self.count += 1
            if len(entity_ids) >= chunk:
                yield self._checked(entity_ids, values)
                entity_ids, values = [], []
        if entity_ids:
            yield self._checked(entity_ids, values)
        count, crc = END.unpack(self._read(END.size, "the end"))
        if count != self.count:
            raise ArchiveError(
                f"{self.name} ends after {self.count} memories but says it holds {count}: "
                "the file is corrupt"
            )
        if crc != self.crc:
            raise ArchiveError(f"{self.name}: its checksum does not match: the file is corrupt")

    def _checked(self, entity_ids: list[str], values: list[bytes]) -> tuple[list[str], list[bytes]]:
        try:
            codec.decode_many(entity_ids, values, self.shape)
        except StoreError as error:
            raise ArchiveError(f"{self.name}: {error}") from None
        return entity_ids, values

    def _read(self, size: int, what: str) -> bytes:
        """Exactly ``size`` bytes, else ArchiveError: the file is cut short."""
        pieces, left = [], size
        while left:
            piece = self.file.read(min(left, _PIECE))
            if not piece:
                raise ArchiveError(
                    f"{self.name} is truncated: it ends in {what} after {self.count} memories "
                    "(an export interrupted, or a copy cut short)"
                )
            pieces.append(piece)
            left -= len(piece)
        data = b"".join(pieces)
        if self.copy is not None:
            self.copy.write(data)
        return data


async def import_memories(
    store: MemoryStore,
    checked: CheckedExport,
    *,
    replace: bool = False,
    chunk: int = CHUNK,
    progress: Callable[[Imported], None] | None = None,
) -> Imported:
    """Write a checked export's memories into the store, under its namespace and model
    version, ``chunk`` at a time; ``progress`` gets the counts after each chunk.

    An entity that already has a memory keeps it, unless ``replace`` (``Imported`` counts
    both). The fences count offsets of the input topic the file records: a store that records
    another topic refuses the import (TopicChangedError) before anything is written, and one
    that records none records the file's.
    """
    topic = checked.header.topic
    if topic is None:
        recorded = await store.recorded_topic()
        if recorded is not None:
            raise TopicChangedError(
                f"{checked.name} records no input topic, but Redis records {recorded} for app "
                f"id {store.namespace} and model {store.model_version}: the file's fences may "
                "count another topic's offsets. Import into another app id"
            )
    else:
        recorded = await store.claim_topic(topic)
        if recorded is not None and not _same_topic(recorded, topic):
            raise TopicChangedError(
                f"{checked.name} holds memories made from the input topic {topic}, but Redis "
                f"records {recorded} for app id {store.namespace} and model "
                f"{store.model_version}: their fences count another topic's offsets. Import "
                "into another app id"
            )
    written = kept = 0
    try:
        for entity_ids, values in checked.chunks(chunk):
            done = await store.import_chunk(entity_ids, values, checked.shape, replace=replace)
            written += int(done.sum())
            kept += len(done) - int(done.sum())
            if progress is not None:
                progress(Imported(written, kept))
    except ArchiveError as error:  # the file changed since it was checked: say what was done
        raise ArchiveError(f"{error}; {written} memories were written before") from None
    return Imported(written, kept)


def _same_topic(recorded: str, topic: str) -> bool:
    """Whether two recorded topics are the same (JSON objects, compared as such)."""
    try:
        same: bool = orjson.loads(recorded) == orjson.loads(topic)
    except orjson.JSONDecodeError:
        return recorded == topic
    return same
