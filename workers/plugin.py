"""The worker's batched, fenced step inside your own stream app: an aiokafka or confluent-kafka
loop, a Faust agent (faust_agent.py), any consumer that hands over batches of records
(``examples/``).

    processor = Processor(model, store, input_topic="events")
    await processor.check_topic(kafka)  # at start: memories never meet another topic's offsets
    processed = await processor.process(records)  # check, load memories, drop replays, step
    # ... send processed.predictions and processed.dead_letters; wait for the broker's acks
    processed.delivered()
    await processor.commit(processed, send_dead_letters)  # the memories, fenced
    # ... commit processed.offsets in the consumer group

In that order, the worker's own, a crash anywhere loses nothing and applies nothing twice: the
memories hold each event exactly once, and a replayed event gets the same prediction again.
``assign`` and ``revoke``, called from the consumer's rebalance listener, keep the memory cache
right and the batches to the partitions the consumer owns. A call out of that order raises
UsageError and does nothing: committing before delivering (a crash in between would lose the
predictions), committing twice, processing a batch while another is processed or not committed,
records of another topic or of a partition the consumer does not own, a partition's records out
of order or repeated, revoking a partition a batch in hand holds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import get_args

from state import MemoryStore
from stream_lstm.exceptions import UsageError
from stream_lstm.model import StreamModel
from stream_lstm.schema import Format
from workers.batch import BatchProcessor, Consumed, Prepared, Record
from workers.connection import KafkaConnection
from workers.topics import claim_input_topic

__all__ = ["Consumed", "Message", "Partition", "Processed", "Processor", "Record", "Send"]

Message = tuple[bytes | None, bytes]
"""A message to send: (key, value)."""
Partition = tuple[str, int]
"""A partition of a topic: (topic, partition)."""
Send = Callable[[list[Message]], Awaitable[None]]
"""Sends messages and returns once the broker acknowledged every one."""

MAX_EVENT_BYTES = 65_536
"""Larger events become dead letters (``oversized``): the worker's default."""


@dataclass(eq=False)
class Processed:
    """A batch processed: what to deliver, then what to commit."""

    predictions: list[Message]
    """One prediction an event applied, keyed by its entity id: for your output topic."""
    dead_letters: list[Message]
    """Records that are not events, or whose step overflowed, with the reason: for your
    dead-letter topic."""
    offsets: dict[Partition, int]
    """The offset to commit in each partition of the batch (its last record's, plus one), once
    ``Processor.commit`` has returned."""
    prepared: Prepared = field(repr=False)
    is_delivered: bool = False
    is_committed: bool = False

    def delivered(self) -> None:
        """Say that the broker acknowledged every prediction and dead letter of the batch."""
        self.is_delivered = True


class Processor:
    """Per-entity memories for one consumer's batches of one input topic, processed and
    committed one at a time.

    ``store``: the memories, namespaced by ``model.version`` (``MemoryStore(...,
    model_version=model.version, cache_entities=...)``: a cache is right here, since ``assign``
    and ``revoke`` tell the store when another process may write). Fences count one topic's
    offsets, so a processor takes one ``input_topic``. ``event_format`` and
    ``prediction_format``: JSON, or the binary format (``stream_lstm.schema``). Redis outages
    are retried until they end, as the worker does.
    """

    def __init__(
        self,
        model: StreamModel,
        store: MemoryStore,
        *,
        input_topic: str,
        max_event_bytes: int = MAX_EVENT_BYTES,
        event_format: Format = "json",
        prediction_format: Format = "json",
    ) -> None:
        if model.version != store.model_version:
            raise UsageError(
                f"the store holds memories of model {store.model_version}, the model is "
                f"{model.version}: open the store with model_version=model.version"
            )
        for name, value in (
            ("event_format", event_format),
            ("prediction_format", prediction_format),
        ):
            if value not in get_args(Format):
                raise UsageError(f"{name} {value!r}: one of {', '.join(get_args(Format))}")
        self.input_topic = input_topic
        self._letters = _Forwarded()
        self._batches = BatchProcessor(
            model,
            store,
            self._letters,
            output_topic="predictions",
            dead_letter_topic="dead letters",
            max_event_bytes=max_event_bytes,
            event_format=event_format,
            prediction_format=prediction_format,
        )
        self._store = store
        self._owned: set[Partition] = set()
        self._in_hand: set[Partition] = set()  # partitions of the batch being processed
        self._pending: Processed | None = None

    async def check_topic(self, kafka: KafkaConnection | str) -> None:
        """Record the input topic's Kafka topic id beside the memories, or raise
        TopicChangedError when they were made from another topic (one deleted and recreated,
        or renamed): its events would be dropped as replays. Call it at start; ``kafka``: a
        connection, or bootstrap servers."""
        connection = KafkaConnection(kafka) if isinstance(kafka, str) else kafka
        client = connection.client()
        await client.bootstrap()
        try:
            await claim_input_topic(
                client,
                self._store,
                self.input_topic,
                "Use another memory namespace (the store's) for this topic, or delete the "
                "old one's keys from Redis to start every entity from zero memory",
            )
        finally:
            await client.close()

    def assign(self, partitions: Iterable[Partition]) -> None:
        """Partitions the consumer now owns, besides those it kept (call it from the
        consumer's rebalance listener). Their memories are read from Redis again: another
        process may have written them meanwhile."""
        self._store.forget_cached()
        self._owned |= set(partitions)

    def owns(self, partition: Partition) -> bool:
        """Whether the consumer owns this partition (records of one it does not are refused)."""
        return partition in self._owned

    def revoke(self, partitions: Iterable[Partition]) -> None:
        """Partitions the consumer gives up (from its rebalance listener, before the
        revocation completes). A batch being processed or not yet committed that holds one of
        them must be committed (or dropped) first: the next owner starts from the committed
        offsets."""
        gone = set(partitions)
        held = self._in_hand & gone
        if self._pending is not None:
            held |= self._pending.offsets.keys() & gone
        if held:
            raise UsageError(
                f"revoking {_named(held)} while a batch in hand holds their records: finish it "
                "(deliver and commit it) first, in the rebalance listener, or drop() it and "
                "let the consumer read its records again"
            )
        self._owned -= gone
        self._store.forget_cached()

    async def process(self, records: Iterable[Consumed]) -> Processed:
        """Check each record, load the memories of the batch's entities, drop the events they
        hold already (replays) and step the rest in one call."""
        if self._in_hand or self._pending is not None:
            raise UsageError(
                "another batch is being processed, or is not committed: deliver its "
                "predictions, call delivered(), commit it, then process the next (or drop() it)"
            )
        batch = list(records)
        offsets = self._offsets(batch)
        self._in_hand = set(offsets)
        try:
            prepared = await self._batches.prepare(batch)
        finally:
            self._in_hand = set()
        dead = [*prepared.checked.dead, *prepared.applied.dead]
        self._pending = Processed(
            predictions=prepared.applied.predictions,
            dead_letters=[(letter.key, letter.encode()) for letter in dead],
            offsets=offsets,
            prepared=prepared,
        )
        return self._pending

    async def commit(self, processed: Processed, send_dead_letters: Send) -> None:
        """Commit the memories of a delivered batch, fenced: then commit its offsets.

        ``send_dead_letters``: how to deliver dead letters found while committing (almost
        always none): an entity whose memory moved on meanwhile (a reset, events of it on
        another partition) has the batch's events applied again on what is stored, and an
        event may overflow there. Awaited before those memories are written, as the worker
        does, so that a crash in between cannot lose the letters.
        """
        if processed.is_committed:
            raise UsageError("this batch is committed already: commit its offsets")
        if processed is not self._pending:
            raise UsageError("this batch was dropped, or is not this processor's")
        if not processed.is_delivered:
            raise UsageError(
                "commit the memories only once the predictions and dead letters are delivered "
                "(then call delivered()): a crash in between would lose those predictions, "
                "since the replay would drop their events as applied"
            )
        self._letters.send = send_dead_letters
        try:
            await self._batches.commit(processed.prepared)
        finally:
            self._letters.send = None
        processed.is_committed = True
        self._pending = None

    def drop(self, processed: Processed) -> None:
        """Forget a batch that could not be delivered: nothing of it was committed. Seek the
        consumer back to its committed offsets, so that its records are read again: offsets
        committed past them would lose them."""
        if processed is self._pending:
            self._pending = None

    def _offsets(self, batch: Sequence[Consumed]) -> dict[Partition, int]:
        """The offset to commit in each partition of a batch; UsageError for a batch this
        processor must not take."""
        offsets: dict[Partition, int] = {}
        for record in batch:
            at = (record.topic, record.partition)
            if record.topic != self.input_topic:
                raise UsageError(
                    f"a record of topic {record.topic!r}; this processor takes "
                    f"{self.input_topic!r} (fences count one topic's offsets: use a processor "
                    "and a store namespace per input topic)"
                )
            if record.offset < offsets.get(at, 0):
                raise UsageError(
                    f"records of {_named([at])} out of order or repeated (offset "
                    f"{record.offset} after {offsets[at] - 1}): pass them as consumed"
                )
            offsets[at] = record.offset + 1
        foreign = offsets.keys() - self._owned
        if foreign:
            raise UsageError(
                f"records of {_named(foreign)}, which this consumer was not assigned: call "
                "assign() from the consumer's rebalance listener, and leave out records of "
                "partitions revoked since they were fetched (owns())"
            )
        return offsets


@dataclass
class _Forwarded:
    """The emitter ``BatchProcessor`` sends a commit's late dead letters to: the caller's."""

    send: Send | None = None

    async def emit(self, topic: str, messages: Sequence[Message]) -> None:
        if messages:
            assert self.send is not None, "only a commit emits, and it sets send"
            await self.send(list(messages))


def _named(partitions: Iterable[Partition]) -> str:
    shown = sorted(partitions)
    listed = ", ".join(f"{topic}[{partition}]" for topic, partition in shown[:5])
    return listed + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
