"""One micro-batch, in the order that makes a crash anywhere lose nothing and apply nothing twice:

    check -> load memories -> drop replays -> ONE engine step -> emit and await delivery
          -> commit memories with their fences -> (the caller acknowledges the events)

- A crash before the commit leaves the memories as they were: the events come again and give
  the same predictions (same memory, same step), so a re-emitted prediction is identical.
- A crash after the commit but before the acknowledgement replays events whose fence is
  already stored: they are dropped, so no memory is applied twice. An entity has a fence per
  partition its events came from, so this holds whatever partition each event came on.
- A stale worker (one that lost its partition) is stopped by the fence at commit time.
- A commit that finds the entity's memory moved on without it (a reset since the batch read
  it, or another partition's owner advanced it) writes nothing; the batch applies its events
  again on what is stored (``BatchProcessor.commit``), so a reset holds and no event is lost.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt
import orjson
import torch
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
)
from pydantic import ValidationError

from state import CommitResult, Loaded, MemoryStore
from stream_lstm.engine import Events, StepResult, entity_rows, step, views
from stream_lstm.exceptions import (
    BrokerRefusedError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
)
from stream_lstm.memories import Fences, Memories
from stream_lstm.model import StreamModel
from stream_lstm.schema import PACKED, Event, Format, Prediction, Source, fast_struct

logger = logging.getLogger(__name__)

DEAD_PAYLOAD_MAX = 256 * 1024
"""Bytes of a payload kept in its dead letter, at most (before encoding)."""
DEAD_LETTER_MAX_BYTES = 500_000
"""A dead letter's encoded size, at most, whatever escaping makes of its payload: inside one
of the emitter's batches, the producer's max_request_size (1 MiB) and Apache Kafka's default
message.max.bytes (1 MB). A letter over the broker's limit would be refused on every retry."""
DEAD_KEY_MAX = 1024
"""Bytes of a record's key kept in its dead letter."""
DEAD_ERROR_MAX = 1000
"""Characters of the error kept in a dead letter."""

RETRY_PAUSE_S = (0.1, 0.5, 1.0, 2.0, 5.0)
FINAL_SEND_ERRORS = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    InvalidTopicError,
)
"""What the broker answers a send with that no retry can change: retried, the batch would be
re-sent forever while the stream stalls behind it."""

T = TypeVar("T")


class Consumed(Protocol):
    """A consumed message, where it was read and its raw bytes: aiokafka's ``ConsumerRecord``
    as fetched (no copy per event on the hot path), or a ``Record``."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class Record:
    """A consumed message made by hand (tests, tools)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that cannot become an event, and why."""

    record: Consumed
    reason: str  # oversized | not_json | not_msgpack | not_object | invalid_event | key_mismatch
    # | non_finite
    error: str

    @property
    def key(self) -> bytes | None:
        """The letter's own Kafka key: the record's, cut to ``DEAD_KEY_MAX`` like the key the
        letter holds (a key is bytes of any size the producer allowed, and counts toward the
        broker's message limit)."""
        key = self.record.key
        return None if key is None else key[:DEAD_KEY_MAX]

    def encode(self) -> bytes:
        """The dead-letter topic's JSON: enough to find, understand and replay the record.

        At most ``DEAD_LETTER_MAX_BYTES``: the payload is cut (at a character) until the
        encoded letter fits, since escaping grows it up to six-fold; the key and the error
        are bounded too. What is kept is always a prefix of the original.
        """
        value = self.record.value or b""
        kept = min(len(value), DEAD_PAYLOAD_MAX)
        while True:
            letter = self._encode(value, kept)
            if len(letter) <= DEAD_LETTER_MAX_BYTES or kept == 0:
                return letter
            kept = min(kept - 1, kept * DEAD_LETTER_MAX_BYTES // len(letter))

    def _encode(self, value: bytes, kept: int) -> bytes:
        key = self.record.key
        key_text, key_encoding = (None, None) if key is None else _prefix_as_text(key, DEAD_KEY_MAX)
        payload, payload_encoding = _prefix_as_text(value, kept)
        return orjson.dumps(
            {
                "reason": self.reason,
                "error": self.error[:DEAD_ERROR_MAX],
                "key": key_text,
                "key_encoding": key_encoding,
                "key_truncated": key is not None and len(key) > DEAD_KEY_MAX,
                "payload": payload,
                "payload_encoding": payload_encoding,
                "payload_bytes": len(value),
                "payload_truncated": kept < len(value),
                "source": {
                    "topic": self.record.topic,
                    "partition": self.record.partition,
                    "offset": self.record.offset,
                },
            }
        )


@dataclass(frozen=True, slots=True)
class Checked:
    """A batch split into valid events (with their records, aligned) and dead letters."""

    entity_ids: list[str]
    ids: list[str]  # distinct entity ids, first seen first
    rows: npt.NDArray[np.int64]  # (N,) each event's entity among ids
    features: npt.NDArray[np.float32]  # (N, I)
    reset: npt.NDArray[np.bool_]  # (N,)
    event_ids: list[str | None]
    records: list[Consumed]
    dead: list[DeadLetter]


@dataclass(frozen=True, slots=True)
class Applied:
    """What one step produced: predictions to emit and memories to commit."""

    predictions: list[tuple[bytes | None, bytes]]  # (key, Prediction JSON)
    updates: Memories  # of the entities stepped, each with the fences of its last event
    replayed: int  # events whose fence was already stored: dropped
    dead: list[DeadLetter]  # events whose step was not finite (overflow): not applied
    shadowed: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    """Predictions ``EmitFrom`` holds back, for a shadow topic (``Shadow``)."""


@dataclass(frozen=True, slots=True)
class EmitFrom:
    """Whose predictions and dead letters a processor sends, by where their event was read: a
    take-over deployment (takeover.py) sends none while it warms on the stream's history, then
    those of events from where the old deployment's consumer group stopped, which sent the
    others. A processor without one sends all."""

    offsets: Mapping[int, int] = field(default_factory=dict)
    """Per input partition, the first offset sent."""
    others: bool = False
    """Whether partitions ``offsets`` does not name are sent: not while warming; after the
    hand-over they are all the new deployment's (the old one committed nothing there)."""

    def sends(self, record: Consumed) -> bool:
        first = self.offsets.get(record.partition)
        return self.others if first is None else record.offset >= first


class Shadow(Protocol):
    """Where a warming take-over deployment sends the predictions it holds back, to compare
    them with the live deployment's (takeover.py)."""

    topic: str

    def sent(self, predictions: Sequence[tuple[bytes | None, bytes]]) -> None:
        """The predictions the broker has acknowledged on ``topic``."""


class Emitter(Protocol):
    """Sends messages and returns once the broker has acknowledged every one of them."""

    async def emit(self, topic: str, messages: Sequence[tuple[bytes | None, bytes]]) -> None: ...


def check(
    records: Sequence[Consumed],
    input_size: int,
    max_event_bytes: int,
    event_format: Format = "json",
) -> Checked:
    """Parse and validate each record; the bad ones become dead letters with the reason.

    Well-formed events take a fast path (a msgspec decoder at least as strict as the schema);
    anything else goes through the ``Event`` schema itself, which accepts it or says exactly
    what is wrong. Binary (msgpack) events: ``_check_packed``.
    """
    if event_format == "msgpack":
        return _check_packed(records, input_size, max_event_bytes)
    if event_format != "json":
        raise ValueError(f"event format {event_format!r}: json or msgpack")
    fast = _fast_decoder(input_size)
    entity_ids: list[str] = []
    features: list[list[float]] = []
    reset: list[bool] = []
    event_ids: list[str | None] = []
    good: list[Consumed] = []
    dead: list[DeadLetter] = []
    for record in records:
        value = record.value or b""
        if len(value) > max_event_bytes:
            dead.append(
                DeadLetter(record, "oversized", f"{len(value)} bytes; at most {max_event_bytes}")
            )
            continue
        try:
            event: _EventFields = fast(value)
        except msgspec.MsgspecError:
            try:
                event = Event.model_validate_json(value, context={"input_size": input_size})
            except ValidationError as e:
                dead.append(DeadLetter(record, *_reason(e)))
                continue
        key_error = _key_error(record.key, event.entity_id)
        if key_error:
            dead.append(DeadLetter(record, "key_mismatch", key_error))
            continue
        entity_ids.append(event.entity_id)
        features.append(event.features)
        reset.append(event.reset)
        event_ids.append(event.event_id)
        good.append(record)
    ids, rows = entity_rows(entity_ids)
    flat = np.fromiter(itertools.chain.from_iterable(features), np.float32, len(good) * input_size)
    return Checked(
        entity_ids,
        ids,
        rows.numpy(),
        flat.reshape(len(good), input_size),
        np.array(reset, dtype=np.bool_),
        event_ids,
        good,
        dead,
    )


def _check_packed(records: Sequence[Consumed], input_size: int, max_event_bytes: int) -> Checked:
    """``check`` for msgpack events (schema.py: the features packed as float32): decoded and
    checked in C by a struct derived from the ``Event`` schema, then the features' finiteness
    on the whole batch's array."""
    decode = _packed_decoder(input_size)
    entity_ids: list[str] = []
    packed: list[bytes] = []
    reset: list[bool] = []
    event_ids: list[str | None] = []
    good: list[Consumed] = []
    dead: list[DeadLetter] = []
    for record in records:
        value = record.value or b""
        if len(value) > max_event_bytes:
            dead.append(
                DeadLetter(record, "oversized", f"{len(value)} bytes; at most {max_event_bytes}")
            )
            continue
        try:
            event = decode(value)
        except msgspec.DecodeError as e:  # ValidationError too: the value decoded, or not
            dead.append(DeadLetter(record, *_packed_reason(value, e)))
            continue
        key_error = _key_error(record.key, event.entity_id)
        if key_error:
            dead.append(DeadLetter(record, "key_mismatch", key_error))
            continue
        entity_ids.append(event.entity_id)
        packed.append(event.features)
        reset.append(event.reset)
        event_ids.append(event.event_id)
        good.append(record)
    features = np.frombuffer(b"".join(packed), PACKED).astype(np.float32)  # a writable copy
    features = features.reshape(len(good), input_size)
    finite = np.isfinite(features).all(axis=1)  # (N,)
    if not finite.all():
        for n in np.flatnonzero(~finite).tolist():
            k = int(np.flatnonzero(~np.isfinite(features[n]))[0])
            error = f"features.{k}: not a finite number ({features[n, k]})"
            dead.append(DeadLetter(good[n], "invalid_event", error))
        keep = np.flatnonzero(finite).tolist()
        entity_ids = [entity_ids[n] for n in keep]
        reset = [reset[n] for n in keep]
        event_ids = [event_ids[n] for n in keep]
        good = [good[n] for n in keep]
        features = features[keep]
    ids, rows = entity_rows(entity_ids)
    return Checked(
        entity_ids,
        ids,
        rows.numpy(),
        features,
        np.array(reset, dtype=np.bool_),
        event_ids,
        good,
        dead,
    )


def _packed_reason(value: bytes, error: msgspec.DecodeError) -> tuple[str, str]:
    """Name what is wrong with a value the msgpack decoder refused."""
    if value[:1] in (b"{", b"["):  # a JSON object or array: msgpack's integers 123 and 91
        return "not_msgpack", (
            "looks like JSON, not msgpack: this topic's events are in the binary format "
            "(STREAM_LSTM_EVENT_FORMAT)"
        )
    if not isinstance(error, msgspec.ValidationError):
        return "not_msgpack", f"not valid msgpack: {error}"
    if str(error).startswith("Expected `object`") and " - at `" not in str(error):
        return "not_object", "the value must be a msgpack map"
    return "invalid_event", str(error)


class _PackedEvent(Protocol):
    """What ``_check_packed`` reads of a msgpack event."""

    @property
    def entity_id(self) -> str: ...
    @property
    def features(self) -> bytes: ...
    @property
    def event_id(self) -> str | None: ...
    @property
    def reset(self) -> bool: ...


@functools.cache
def _packed_decoder(input_size: int) -> Callable[[bytes], _PackedEvent]:
    """A msgpack decoder for events of ``input_size`` packed features (``fast_struct``)."""
    decoder: msgspec.msgpack.Decoder[_PackedEvent] = msgspec.msgpack.Decoder(
        fast_struct(Event, {"features": input_size}, packed={"features"})
    )
    return decoder.decode


class _EventFields(Protocol):
    """What ``check`` reads of an event, from the fast decoder or from the schema."""

    @property
    def entity_id(self) -> str: ...
    @property
    def features(self) -> list[float]: ...
    @property
    def event_id(self) -> str | None: ...
    @property
    def reset(self) -> bool: ...


@functools.cache
def _fast_decoder(input_size: int) -> Callable[[bytes], _EventFields]:
    """A decoder for events of ``input_size`` features that refuses whatever the schema does.

    Decoding and checking in C is several times cheaper than orjson plus checks in Python.
    Derived from the ``Event`` schema (``fast_struct``), it may
    refuse more than the schema (a refusal only sends the value to the schema), never less: a
    test holds it to that.
    """
    decoder: msgspec.json.Decoder[_EventFields] = msgspec.json.Decoder(
        fast_struct(Event, {"features": input_size})
    )
    return decoder.decode


def apply(
    model: StreamModel,
    checked: Checked,
    memories: Memories,
    prediction_format: Format = "json",
    emit_from: EmitFrom | None = None,
    shadow: bool = False,
) -> Applied:
    """Drop events already applied, step the rest in one call, and build what to send and store.

    ``memories`` holds the stored memories of exactly ``checked.ids``, in that order;
    ``emit_from``: the events whose predictions are sent (None: all); ``shadow``: make the
    others too, in ``Applied.shadowed``.
    """
    ids, rows = checked.ids, checked.rows  # (N,)
    partitions = np.fromiter((r.partition for r in checked.records), np.int64, len(rows))  # (N,)
    offsets = np.fromiter((r.offset for r in checked.records), np.int64, len(rows))  # (N,)
    applied_before = _applied_before(memories, rows, partitions, offsets)  # (N,)
    fresh = np.flatnonzero(~applied_before)  # (N',) events to apply
    all_fresh = len(fresh) == len(rows)
    entity_ids = checked.entity_ids if all_fresh else [checked.entity_ids[i] for i in fresh]
    event_ids = checked.event_ids if all_fresh else [checked.event_ids[i] for i in fresh]
    records = checked.records if all_fresh else [checked.records[i] for i in fresh]
    rows, partitions, offsets = rows[fresh], partitions[fresh], offsets[fresh]

    events = Events(
        torch.from_numpy(rows),
        torch.from_numpy(checked.features if all_fresh else checked.features[fresh]),  # (N', I)
        torch.from_numpy(checked.reset if all_fresh else checked.reset[fresh]),  # (N',)
    )
    states, steps = views(memories)  # each (E, L, H), and (E,)
    result = step(model, events, states, steps)
    output, event_steps, predicted, dead = result.output, result.step, records, []
    if not _finite(result):  # rare: an overflow; find the events that caused it
        result, kept = _step_finite_events(model, events, states, steps, result)
        dead = [
            DeadLetter(records[i], "non_finite", NON_FINITE_ERROR) for i in np.flatnonzero(~kept)
        ]
        at = np.flatnonzero(kept)
        entity_ids, event_ids = [entity_ids[i] for i in at], [event_ids[i] for i in at]
        predicted = [records[i] for i in at]
        output, event_steps = result.output[at], result.step[at]
    shadowed: list[tuple[bytes | None, bytes]] = []
    if emit_from is not None:  # a take-over deployment: not those the old deployment sent
        sends = np.fromiter((emit_from.sends(r) for r in predicted), np.bool_, len(predicted))
        if shadow:
            at = np.flatnonzero(~sends)
            shadowed = _predictions(
                model,
                [entity_ids[i] for i in at],
                [event_ids[i] for i in at],
                [predicted[i] for i in at],
                output[at],
                event_steps[at],
                prediction_format,
            )
        at = np.flatnonzero(sends)
        entity_ids, event_ids = [entity_ids[i] for i in at], [event_ids[i] for i in at]
        predicted = [predicted[i] for i in at]
        output, event_steps = output[at], event_steps[at]
    predictions = _predictions(
        model, entity_ids, event_ids, predicted, output, event_steps, prediction_format
    )

    last = np.full(len(ids), -1, dtype=np.int64)  # (E,) last fresh event of each entity
    np.maximum.at(last, rows, np.arange(len(rows)))
    stepped = np.flatnonzero(last >= 0)  # entities with at least one fresh event
    fence_partition = partitions[last[stepped]]
    updates = Memories(
        entity_ids=[ids[i] for i in stepped],
        states=tuple(state.numpy()[stepped] for state in result.states),
        step=result.steps.numpy()[stepped],
        fence_partition=fence_partition,
        fence_offset=offsets[last[stepped]],
        other_fences=_other_fences(memories, rows, partitions, offsets, stepped, fence_partition),
    )
    return Applied(
        predictions, updates, len(checked.records) - len(records), dead, shadowed=shadowed
    )


def _applied_before(
    memory: Memories,
    rows: npt.NDArray[np.int64],
    partitions: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
) -> npt.NDArray[np.bool_]:
    """(N,) Whether each event is already in its entity's memory: at or before the entity's
    fence on the event's partition."""
    before: npt.NDArray[np.bool_] = (memory.fence_partition[rows] == partitions) & (
        offsets <= memory.fence_offset[rows]
    )
    if memory.other_fences:  # entities keyed on several partitions: rare
        more = memory.other_fences
        for i in np.flatnonzero(np.isin(rows, list(more))).tolist():
            fence = more[int(rows[i])].get(int(partitions[i]))
            before[i] |= fence is not None and offsets[i] <= fence
    return before


def _other_fences(
    memory: Memories,
    rows: npt.NDArray[np.int64],
    partitions: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    stepped: npt.NDArray[np.int64],
    fence_partition: npt.NDArray[np.int64],
) -> dict[int, Fences]:
    """Update row -> the entity's fences besides its last event's partition, for the entities
    that have more than one: their memory had some, its fence was on another partition, or
    their fresh events (``rows``, ``partitions``, ``offsets``; in partition order) came on
    several partitions. Empty when every entity stays on one partition, as usual."""
    e = len(memory.entity_ids)
    several = np.zeros(e, dtype=np.bool_)  # (E,)
    if len(partitions) and partitions.min() != partitions.max():
        lowest = np.full(e, np.iinfo(np.int64).max, dtype=np.int64)
        highest = np.full(e, -1, dtype=np.int64)
        np.minimum.at(lowest, rows, partitions)
        np.maximum.at(highest, rows, partitions)
        several = (highest >= 0) & (lowest != highest)
    elsewhere = np.zeros(e, dtype=np.bool_)
    found = memory.found  # (E,)
    elsewhere[stepped] = found[stepped] & (memory.fence_partition[stepped] != fence_partition)
    had = np.zeros(e, dtype=np.bool_)
    had[list(memory.other_fences)] = True
    if not (several | elsewhere | had).any():
        return {}
    fences = {
        int(row): dict(memory.other_fences.get(int(row), {}))
        for row in np.flatnonzero(several | elsewhere | had)
    }
    for row, entity in fences.items():
        if found[row]:
            entity[int(memory.fence_partition[row])] = int(memory.fence_offset[row])
    for row, partition, offset in zip(
        rows.tolist(), partitions.tolist(), offsets.tolist(), strict=True
    ):
        if row in fences:
            fences[row][partition] = offset  # in partition order: the last is the highest
    update_of = {int(row): at for at, row in enumerate(stepped.tolist())}
    other: dict[int, Fences] = {}
    for row, entity in fences.items():
        at = update_of.get(row)
        if at is not None:  # not stepped: not updated
            entity.pop(int(fence_partition[at]))
            other[at] = entity
    return other


def subset(
    checked: Checked, entity_ids: Collection[str], without: Collection[tuple[int, int]] = ()
) -> Checked:
    """The events of ``checked`` of these entities only, except those at ``without``
    (partition, offset), and no dead letters: what a batch applies again to memories that moved
    on while it was committing."""
    wanted = set(entity_ids)
    events = enumerate(zip(checked.entity_ids, checked.records, strict=True))
    at = [
        i
        for i, (entity_id, record) in events
        if entity_id in wanted and (record.partition, record.offset) not in without
    ]
    kept = [checked.entity_ids[i] for i in at]
    ids, rows = entity_rows(kept)
    return Checked(
        kept,
        ids,
        rows.numpy(),
        checked.features[at],
        checked.reset[at],
        [checked.event_ids[i] for i in at],
        [checked.records[i] for i in at],
        [],
    )


def _log(letters: Sequence[DeadLetter]) -> None:
    for dead in letters:
        logger.warning(
            "dead letter %s at %s[%d]@%d: %s",
            dead.reason,
            dead.record.topic,
            dead.record.partition,
            dead.record.offset,
            dead.error,
        )


NON_FINITE_ERROR = (
    "the model's step overflowed on this event (its output or memory is not finite); the event "
    "is not applied and its entity keeps the memory it had before it"
)


def _finite(result: StepResult) -> bool:
    """Whether every output and memory value is finite. A sum is finite only when every value
    is (a NaN or an infinity makes it NaN or infinite), and takes one pass with no temporary:
    ~25x cheaper than ``isfinite().all()`` on a batch's memories. A sum that overflows from
    huge finite values falls through to the exact check."""
    tensors = (result.output, *result.states)
    if all(math.isfinite(float(tensor.sum())) for tensor in tensors):
        return True
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


def _step_finite_events(
    model: StreamModel,
    events: Events,
    states: tuple[torch.Tensor, ...],
    steps: torch.Tensor,
    fast: StepResult,
) -> tuple[StepResult, npt.NDArray[np.bool_]]:
    """``fast`` again for the entities it gave a non-finite output or memory, their events one
    at a time, skipping each event whose step is not finite: its entity goes on from the memory
    it had before it. The other entities keep ``fast``'s results (entities are independent).

    Returns the result (the output and step rows of skipped events are zeros) and which events
    were kept (N,).
    """
    new_states = tuple(state.clone() for state in fast.states)  # each (E, L, H)
    new_steps = fast.steps.clone()  # (E,)
    output, event_steps = fast.output.clone(), fast.step.clone()
    bad_output = ~torch.isfinite(output).flatten(1).all(dim=1)  # (N,)
    poisoned = torch.zeros(len(new_steps), dtype=torch.bool)  # (E,)
    for state in new_states:
        poisoned |= ~torch.isfinite(state).flatten(1).all(dim=1)
    poisoned[events.entity[bad_output]] = True
    rows = torch.nonzero(poisoned).flatten()  # from where the batch started them
    for new, start in zip(new_states, states, strict=True):
        new[rows] = start[rows]
    new_steps[rows] = steps[rows]
    kept = np.ones(len(events.entity), dtype=np.bool_)
    first = torch.zeros(1, dtype=torch.int64)
    for i in torch.nonzero(poisoned[events.entity]).flatten().tolist():
        row = int(events.entity[i])
        at, of = slice(i, i + 1), slice(row, row + 1)
        one = step(
            model,
            Events(first, events.features[at], events.reset[at]),
            tuple(state[of] for state in new_states),
            new_steps[of],
        )
        if not _finite(one):
            kept[i] = False
            output[i], event_steps[i] = 0.0, 0
            continue
        output[i], event_steps[i] = one.output[0], one.step[0]
        for new, end in zip(new_states, one.states, strict=True):
            new[row] = end[0]
        new_steps[row] = one.steps[0]
    return StepResult(output, event_steps, new_states, new_steps), kept


@dataclass(frozen=True, slots=True)
class Prepared:
    """A batch checked, loaded and stepped: ready to emit and commit."""

    checked: Checked
    loaded: Loaded
    applied: Applied
    clock: _Stages
    number: int  # batches prepared by this processor so far, this one included


@dataclass(frozen=True, slots=True)
class BatchReport:
    """What one batch did, for logs and metrics."""

    events: int
    dead: int
    replayed: int
    stale: int
    moved: int  # entities whose memory moved on while the batch committed: applied again
    loaded: int  # entities whose memories the batch started from
    cached: int  # of those, the ones taken from the memory cache
    seconds: dict[str, float]  # wall time of each stage: check, load, step, emit, commit


class BatchProcessor:
    """Runs a batch's stages: ``prepare`` (check, load, step), ``emit``, ``commit``; retries
    I/O until it succeeds, and raises only what retrying cannot fix.

    When each stage runs relative to other batches is the ``Pipeline``'s (pipeline.py): the
    worker overlaps them. ``process`` runs one batch through all of them alone; either way a
    batch's events may be acknowledged only once ``commit`` has returned.
    """

    def __init__(
        self,
        model: StreamModel,
        store: MemoryStore,
        emitter: Emitter,
        *,
        output_topic: str,
        dead_letter_topic: str,
        max_event_bytes: int,
        event_format: Format = "json",
        prediction_format: Format = "json",
    ) -> None:
        self.model = model
        self.event_format = event_format
        self.prediction_format = prediction_format
        self.store = store
        self.emitter = emitter
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.max_event_bytes = max_event_bytes
        self.redis_full = False  # the last commit was refused: maxmemory, until one succeeds
        self.emit_from: EmitFrom | None = None  # a take-over deployment's (takeover.py)
        self.shadow: Shadow | None = None  # where a warming one sends what it holds back
        self._prepared = 0  # batches prepared so far
        self._started_unwritten = 0  # batches prepared up to here may have started from updates
        # that were not written as they were (stale, moved): they must commit by script

    async def process(self, records: Sequence[Consumed]) -> BatchReport:
        """One batch through every stage."""
        return await self.finish(await self.prepare(records))

    async def prepare(
        self, records: Sequence[Consumed], in_flight: Sequence[Memories] = ()
    ) -> Prepared:
        """Check, load and step a batch. ``in_flight``: the updates of batches still finishing,
        oldest first, which this one starts from whether or not they have reached Redis yet."""
        clock = _Stages()
        checked = check(records, self.model.input_size, self.max_event_bytes, self.event_format)
        _log(checked.dead)
        clock.done("check")
        loaded = await self.retry(
            "load memories",
            lambda: self.store.load_many(
                checked.ids,
                self.model.shape,
                partitions={record.partition for record in checked.records},
            ),
        )
        # The updates of batches still being committed are the newest this worker has for
        # their entities: each is every event of its entity up to its fence, applied in order
        # (a partition is consumed in order), so a write made from them is right even if the
        # in-flight commit turns out stale: the fences decide as for any write.
        for updates in in_flight:
            loaded.memories.overlay(updates)
        clock.done("load")
        applied = apply(
            self.model,
            checked,
            loaded.memories,
            self.prediction_format,
            self.emit_from,
            shadow=self.shadow is not None,
        )
        _log(applied.dead)
        clock.done("step")
        self._prepared += 1
        return Prepared(checked, loaded, applied, clock, self._prepared)

    async def finish(self, prepared: Prepared) -> BatchReport:
        """Emit a prepared batch and wait for the broker, then commit its memories."""
        await self.emit(prepared)
        return await self.commit(prepared)

    async def emit(self, prepared: Prepared) -> None:
        """Send a prepared batch's predictions and dead letters; return once all are stored."""
        clock = prepared.clock
        clock.restart()
        dead = [*prepared.checked.dead, *prepared.applied.dead]
        await self.retry("emit", lambda: self._emit(prepared.applied, dead))
        clock.done("emit")

    async def commit(self, prepared: Prepared) -> BatchReport:
        """Commit an emitted batch's memories with their fences: the batch is done.

        Entities whose stored memory moved on without the batch (``CommitResult``) get the
        batch's events applied again on what is now stored, until nothing moves: their memory
        then holds every event once (predictions are not sent again: they were computed from
        the memory as it was when the batch read it).
        """
        clock, applied = prepared.clock, prepared.applied
        clock.restart()
        # The load's proof for the fast commit holds only if the batches this one started from
        # (still in flight when it was prepared) were written as they were.
        loaded = None if prepared.number <= self._started_unwritten else prepared.loaded
        committed = await self.retry(
            "commit memories",
            lambda: self.store.commit_many(applied.updates, loaded=loaded),
            commit=True,
        )
        stale, moved = committed.stale_ids, 0
        if not committed.applied.all():
            dead = {(d.record.partition, d.record.offset) for d in applied.dead}
            while committed.moved_ids:
                committed = await self._apply_again(prepared.checked, committed.moved_ids, dead)
                moved += len(committed.entity_ids)
                stale += committed.stale_ids
            self._started_unwritten = self._prepared  # those prepared meanwhile, too
        clock.done("commit")
        if stale:
            logger.warning(
                "%d memories not written: every event of theirs is stored already (a replay, "
                "or another worker advanced them); first: %r",
                len(stale),
                stale[:3],
            )
        checked = prepared.checked
        return BatchReport(
            len(checked.records) + len(checked.dead),  # every record is one or the other
            len(checked.dead) + len(applied.dead),
            applied.replayed,
            len(stale),
            moved,
            len(prepared.loaded.memories),
            prepared.loaded.cached,
            clock.seconds,
        )

    async def _apply_again(
        self, checked: Checked, entity_ids: list[str], dead: Collection[tuple[int, int]]
    ) -> CommitResult:
        """Apply a batch's events of these entities again on their stored memories, and
        commit them: their memories moved on (a reset, another partition's events) while the
        batch was committing. Events the batch sent as dead letters (``dead``: partition,
        offset) stay out."""
        logger.info(
            "%d memories moved on while their batch committed (a reset, or events of the same "
            "entity on another partition): applying the batch's events again on them; first: %r",
            len(entity_ids),
            entity_ids[:3],
        )
        again = subset(checked, entity_ids, dead)
        loaded = await self.retry(
            "load memories", lambda: self.store.load_many(again.ids, self.model.shape)
        )
        applied = apply(self.model, again, loaded.memories, self.prediction_format, self.emit_from)
        _log(applied.dead)
        letters = [(d.key, d.encode()) for d in self._sent(applied.dead)]
        await self.retry("emit", lambda: self.emitter.emit(self.dead_letter_topic, letters))
        return await self.retry(
            "commit memories", lambda: self.store.commit_many(applied.updates), commit=True
        )

    async def _emit(self, applied: Applied, dead: list[DeadLetter]) -> None:
        letters = [(d.key, d.encode()) for d in self._sent(dead)]
        shadow = self.shadow
        await asyncio.gather(
            self.emitter.emit(self.output_topic, applied.predictions),
            self.emitter.emit(self.dead_letter_topic, letters),
            self._shadow(shadow, applied.shadowed) if shadow is not None else asyncio.sleep(0),
        )

    async def _shadow(self, shadow: Shadow, predictions: list[tuple[bytes | None, bytes]]) -> None:
        """Send to the shadow topic; a failure there leaves the batch alone (it is a comparison,
        not the stream's output), with a warning."""
        try:
            await self.emitter.emit(shadow.topic, predictions)
        except Exception as e:
            logger.warning("%d predictions not sent to the shadow topic: %r", len(predictions), e)
            return
        shadow.sent(predictions)

    def _sent(self, letters: list[DeadLetter]) -> list[DeadLetter]:
        """The dead letters this processor sends: a take-over deployment's old one sent the
        others (``emit_from``)."""
        emit_from = self.emit_from
        return letters if emit_from is None else [d for d in letters if emit_from.sends(d.record)]

    async def retry(
        self, what: str, attempt: Callable[[], Awaitable[T]], *, commit: bool = False
    ) -> T:
        """Retry transient failures with growing pauses; a bad stored value, a refusal by Redis
        and a send the broker refuses for good are not transient."""
        for tries in itertools.count(1):
            try:
                result = await attempt()
            except StoreError as e:
                if not isinstance(e, StoreUnavailableError):  # a refusal, a value that does not
                    raise  # decode: retrying cannot help
                if commit:  # only a commit says whether Redis takes writes
                    self.redis_full = isinstance(e, StoreFullError)
                error: Exception = e
            except FINAL_SEND_ERRORS as e:
                raise BrokerRefusedError(
                    f"{what}: the broker refuses it for good, and would on every retry: {e} "
                    "(a message over the topic's max.message.bytes, or no permission to write)",
                    "output_topic",
                ) from e
            except (OSError, TimeoutError, KafkaError) as e:
                error = e
            else:
                if commit:
                    self.redis_full = False
                return result
            pause = RETRY_PAUSE_S[min(tries, len(RETRY_PAUSE_S)) - 1]
            logger.warning("%s failed (try %d), retrying in %.1fs: %s", what, tries, pause, error)
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")


class _Stages:
    """Wall time of each stage of a batch, for the stage histogram in /metrics."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def restart(self) -> None:
        """The next stage starts now (not when the last one ended): a prepared batch may wait."""
        self._last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self._last = now


_Source = fast_struct(Source)
_Prediction = fast_struct(Prediction)
"""``Prediction`` as the hot path encodes it: msgspec writes a Struct faster than orjson a dict."""
_PackedPrediction = fast_struct(Prediction, packed={"output"})
"""``Prediction`` in the binary format: msgpack, the output packed."""

_encode = msgspec.json.Encoder().encode
_encode_packed = msgspec.msgpack.Encoder().encode


def _predictions(
    model: StreamModel,
    entity_ids: list[str],
    event_ids: list[str | None],
    records: list[Consumed],
    output: torch.Tensor,
    steps: torch.Tensor,
    prediction_format: Format = "json",
) -> list[tuple[bytes | None, bytes]]:
    """Each event's prediction, keyed as its event was (a key equal to the entity id)."""
    outputs: list[Any]
    if prediction_format not in ("json", "msgpack"):
        raise ValueError(f"prediction format {prediction_format!r}: json or msgpack")
    if prediction_format == "msgpack":
        rows = output.numpy().astype(PACKED, copy=False)  # (N, O)
        outputs, make, encode = [row.tobytes() for row in rows], _PackedPrediction, _encode_packed
    else:
        outputs, make, encode = output.tolist(), _Prediction, _encode  # float32 prints exactly
    labels = model.labels
    names = [labels[k] for k in output.argmax(dim=1).tolist()] if labels else [None] * len(records)
    version = model.version
    return [
        (
            record.key,
            encode(
                make(
                    entity_id=entity_id,
                    event_id=event_id,
                    step=n_step,
                    output=out,
                    label=label,
                    model_version=version,
                    source=_Source(
                        topic=record.topic, partition=record.partition, offset=record.offset
                    ),
                )
            ),
        )
        for entity_id, event_id, record, out, n_step, label in zip(
            entity_ids, event_ids, records, outputs, steps.tolist(), names, strict=True
        )
    ]


def _reason(error: ValidationError) -> tuple[str, str]:
    """Name what is wrong with a value that failed validation."""
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return "not_json", f"not valid JSON: {first['msg']}"
    if first["type"] in {"model_type", "model_attributes_type"} and not first["loc"]:
        return "not_object", "the value must be a JSON object"
    details = "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}" for e in error.errors()
    )
    return "invalid_event", details


def _key_error(key: bytes | None, entity_id: str) -> str | None:
    """Per-entity order holds only when the key is the entity id: say what is off, if anything."""
    if key is None:
        return "the message has no key; key events by their entity_id"
    try:
        text = key.decode()
    except UnicodeDecodeError:
        return "the key is not UTF-8; key events by their entity_id"
    if text != entity_id:
        return f"key {text!r} differs from entity_id {entity_id!r}"
    return None


def _prefix_as_text(data: bytes, size: int) -> tuple[str, str]:
    """Up to ``size`` bytes of ``data`` as text: UTF-8 when all of it is (cut at a character,
    so what is kept stays UTF-8), else base64."""
    try:
        data.decode()
    except UnicodeDecodeError:
        return base64.b64encode(data[:size]).decode(), "base64"
    return data[:size].decode(errors="ignore"), "utf-8"
