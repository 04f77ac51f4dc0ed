"""The worker's batched, fenced step inside your own stream app: an aiokafka or confluent-kafka
loop, a Faust agent, any consumer that hands over batches of records (``examples/``).

    processed = await processor.process(records)  # check, load memories, drop replays, step
    # ... send processed.predictions and processed.dead_letters; wait for the broker's acks
    processed.delivered()
    late = await processor.commit(processed)  # the memories, fenced (late: see ``commit``)
    # ... commit processed.offsets in the consumer group

In that order, the worker's own, a crash anywhere loses nothing and applies nothing twice: the
memories hold each event exactly once, and a replayed event gets the same prediction again.
``assign`` and ``revoke``, called from the consumer's rebalance listener, keep the memory cache
right and the batches to the partitions the consumer owns. A call out of that order raises
UsageError and does nothing: committing before delivering (a crash in between would lose the
predictions), committing twice, processing the next batch before committing this one, records
of a partition the consumer does not own, revoking a partition a batch still holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from state import MemoryStore
from stream_lstm.exceptions import UsageError
from stream_lstm.model import StreamModel
from workers.batch import BatchProcessor, Consumed, Prepared, Record

__all__ = ["Consumed", "Message", "Partition", "Processed", "Processor", "Record"]

Message = tuple[bytes | None, bytes]
"""A message to send: (key, value)."""
Partition = tuple[str, int]
"""A partition of a topic: (topic, partition)."""

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
    """Per-entity memories for one consumer's batches, processed and committed one at a time.

    ``store``: the memories, namespaced by ``model.version`` (``MemoryStore(...,
    model_version=model.version, cache_entities=...)``: a cache is right here, since ``assign``
    and ``revoke`` tell the store when another process may write). Redis outages are retried
    until they end, as the worker does; cancel the call to give up.
    """

    def __init__(
        self, model: StreamModel, store: MemoryStore, *, max_event_bytes: int = MAX_EVENT_BYTES
    ) -> None:
        if model.version != store.model_version:
            raise UsageError(
                f"the store holds memories of model {store.model_version}, the model is "
                f"{model.version}: open the store with model_version=model.version"
            )
        self._letters = _Collected()
        self._batches = BatchProcessor(
            model,
            store,
            self._letters,
            output_topic="predictions",
            dead_letter_topic="dead letters",
            max_event_bytes=max_event_bytes,
        )
        self._store = store
        self._owned: set[Partition] = set()
        self._pending: Processed | None = None

    def assign(self, partitions: Iterable[Partition]) -> None:
        """Partitions the consumer now owns, besides those it kept (call it from the
        consumer's rebalance listener). Their memories are read from Redis again: another
        process may have written them meanwhile."""
        self._store.forget_cached()
        self._owned |= set(partitions)

    def revoke(self, partitions: Iterable[Partition]) -> None:
        """Partitions the consumer gives up (from its rebalance listener, before the
        revocation completes). A batch still holding one of them must be committed first: its
        next owner starts from the committed offsets."""
        gone = set(partitions)
        held = self._pending.offsets.keys() & gone if self._pending is not None else set()
        if held:
            raise UsageError(
                f"revoking {_named(held)} while a processed batch holds their records: deliver "
                "and commit it first (in the rebalance listener), or drop() it and let the "
                "consumer read its records again"
            )
        self._owned -= gone
        self._store.forget_cached()

    async def process(self, records: Sequence[Consumed]) -> Processed:
        """Check each record, load the memories of the batch's entities, drop the events they
        hold already (replays) and step the rest in one call."""
        if self._pending is not None:
            raise UsageError(
                "the batch processed before is not committed: deliver its predictions, call "
                "delivered(), commit it, then process the next (or drop() it)"
            )
        offsets: dict[Partition, int] = {}
        for record in records:
            at = (record.topic, record.partition)
            offsets[at] = max(offsets.get(at, 0), record.offset + 1)
        foreign = offsets.keys() - self._owned
        if foreign:
            raise UsageError(
                f"records of {_named(foreign)}, which this consumer was not assigned: call "
                "assign() from the consumer's rebalance listener"
            )
        prepared = await self._batches.prepare(records)
        dead = [*prepared.checked.dead, *prepared.applied.dead]
        self._pending = Processed(
            predictions=prepared.applied.predictions,
            dead_letters=[(letter.key, letter.encode()) for letter in dead],
            offsets=offsets,
            prepared=prepared,
        )
        return self._pending

    async def commit(self, processed: Processed) -> list[Message]:
        """Commit the memories of a delivered batch, fenced: then commit its offsets.

        Returns dead letters found while committing, to deliver before the offsets (almost
        always none): an entity whose memory moved on meanwhile (a reset, events of it on
        another partition) has the batch's events applied again on what is stored, and an
        event may overflow there.
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
        await self._batches.commit(processed.prepared)
        processed.is_committed = True
        self._pending = None
        return self._letters.take()

    def drop(self, processed: Processed) -> None:
        """Forget a batch that could not be delivered: nothing of it was committed. Read its
        records again (seek the consumer back to its committed offsets) to process them."""
        if processed is self._pending:
            self._pending = None


@dataclass
class _Collected:
    """The emitter ``BatchProcessor`` sends the dead letters of a commit to: kept for the
    caller to deliver."""

    messages: list[Message] = field(default_factory=list)

    async def emit(self, topic: str, messages: Sequence[Message]) -> None:
        self.messages.extend(messages)

    def take(self) -> list[Message]:
        taken, self.messages = self.messages, []
        return taken


def _named(partitions: Iterable[Partition]) -> str:
    shown = sorted(partitions)
    listed = ", ".join(f"{topic}[{partition}]" for topic, partition in shown[:5])
    return listed + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
