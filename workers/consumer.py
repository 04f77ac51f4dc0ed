"""The hot path: whole fetched batches from Kafka, one processor call each, one commit each.

Faust's per-event stream machinery (an agent iterating a stream, acking each event) costs more
per event than the whole budget of a fast worker. So the worker's Faust app hosts this service
instead of an agent: an aiokafka consumer in the worker's consumer group hands ``getmany``
batches straight to the ``BatchProcessor``, and the batch's offsets are committed right after its
memories are.

- Pipelining: a batch is checked, loaded and stepped while up to two earlier ones emit and
  commit, each step in batch order (``_run``); it starts from their memories even before they
  reach Redis.
- Rebalance: a partition is handed over only between batches (the revoke callback waits for
  the batch in hand and the ones finishing), and its offsets are committed by then. Records
  fetched before a revoke and run after it are dropped: their partition has another owner,
  who reads them again (so does this worker, if it gets the partition back). Every assignment
  clears the memory cache: what it holds may have been moved on by another owner meanwhile.
- Shutdown: the batch in hand finishes (within a grace period), is committed, and the consumer
  leaves the group so its partitions move at once.
- An error the processor could not retry stops the process without committing the batch: it is
  replayed on restart, and nothing after it was committed.
- The input topic is checked (``check_input_topic``) when partitions are assigned, before they
  are fetched, whenever a partition's offsets go back (its log was replaced under the consumer),
  and every ``TOPIC_CHECK_S``: memories made from another topic stop the worker (exit 2), saying
  what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import time
import uuid
from collections.abc import Sequence
from typing import Any, NoReturn

import mode
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    TopicPartition,
)
from aiokafka.errors import CommitFailedError, KafkaConnectionError, KafkaError
from aiokafka.protocol.admin import ApiVersionRequest
from murmurhash2 import murmurhash2

from stream_lstm.exceptions import TopicChangedError
from workers.batch import BatchProcessor, Consumed, Prepared
from workers.connection import KafkaConnection
from workers.metrics import Metrics
from workers.settings import Settings
from workers.topics import check_input_topic, topic_id

logger = logging.getLogger(__name__)

MAX_FINISHING = 2
"""Batches emitting and committing at once while the next one is prepared."""
GC_YOUNG_OBJECTS = 20_000
"""Objects allocated (net of those freed) between two of Python's young collections. Batches in
flight hold thousands of objects alive, so at Python's default of 700 a young collection runs
every few batches for nothing: reference counting frees what a batch allocated."""
SHUTDOWN_GRACE_S = 6.0
"""How long SIGTERM waits for the batch in hand; the whole stop must stay under 10 s."""
TOPIC_CHECK_S = 2.0
"""How often the input topic is checked besides (one metadata request and one Redis command)."""
EXIT_SOFTWARE = 70
EXIT_REFUSED = 2
"""A worker refused to run as configured: the status of a setting refused at start, too."""
BATCH_BYTES = 512 * 1024
"""Producer batch size: a whole micro-batch's predictions go out in a few requests."""
KAFKA_MURMUR2_SEED = 0x9747B28C
"""The seed of Kafka's default partitioner (Java's, aiokafka's): murmur2 of the key's bytes."""


class KafkaEmitter:
    """Sends with one aiokafka producer and returns once the broker acknowledged every message.

    The producer is made in ``start``: aiokafka binds it to the running event loop.
    """

    def __init__(self, connection: KafkaConnection) -> None:
        self.connection = connection
        self._producer: AIOKafkaProducer | None = None

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("the emitter is not started")
        return self._producer

    async def start(self) -> None:
        self._producer = self.connection.producer(acks="all", max_batch_size=BATCH_BYTES)
        await self._producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    async def ping(self) -> None:
        """Return once a broker answered one small request (ApiVersions).

        For health checks, which may come often: fetching the cluster's metadata instead costs
        the broker a listing of every topic and partition per call.
        """
        client = self.producer.client
        node = client.get_random_node()
        if node is None:
            raise KafkaConnectionError("no broker known")
        await client.send(node, ApiVersionRequest())

    async def emit(self, topic: str, messages: Sequence[tuple[bytes | None, bytes]]) -> None:
        """Send the messages and return once the broker acknowledged every one."""
        await asyncio.gather(*await self.send(topic, messages))

    async def send(
        self, topic: str, messages: Sequence[tuple[bytes | None, bytes]]
    ) -> list[asyncio.Future[object]]:
        """Queue the messages as whole batches, one per partition; the futures resolve once
        the broker acknowledged them.

        Grouped by partition with the producer's own key hash, keeping their order within a
        partition: ``send`` per message costs a future and a lookup each (bench/kafka.py measures
        both: bench/RESULTS.md, "Kafka stage").
        """
        if not messages:
            return []
        producer = self.producer
        partitions = sorted(await producer.partitions_for(topic))
        by_partition: dict[int, list[tuple[bytes | None, bytes]]] = {}
        for message in messages:
            key = message[0]
            partition = (
                random.choice(partitions) if key is None else partition_for_key(key, partitions)
            )
            by_partition.setdefault(partition, []).append(message)
        pending: list[asyncio.Future[object]] = []
        for partition, items in by_partition.items():
            batch = producer.create_batch()
            for key, value in items:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    pending.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            pending.append(await producer.send_batch(batch, topic, partition=partition))
        return pending


def partition_for_key(key: bytes, partitions: Sequence[int]) -> int:
    """The partition Kafka's default partitioner puts a keyed message in, as ``send`` would.

    aiokafka's murmur2 is pure Python, ~3.7 us a key: with millions of entities no key cache
    stays warm. The same hash in C (murmurhash2) takes ~0.2 us; a test holds the two equal.
    """
    return partitions[(murmurhash2(key, KAFKA_MURMUR2_SEED) & 0x7FFFFFFF) % len(partitions)]


class BatchConsumer(mode.Service):
    """Consumes the input topic in batches for the worker's consumer group."""

    def __init__(
        self,
        settings: Settings,
        processor: BatchProcessor,
        emitter: KafkaEmitter,
        metrics: Metrics,
        **kwargs: Any,
    ) -> None:
        self.settings = settings
        self.processor = processor
        self.emitter = emitter  # the processor sends with it; started and stopped here
        self.metrics = metrics
        self.in_hand = asyncio.Lock()
        self.joined = False  # does the group give this worker its partitions (maybe none) now?
        self.lag = 0  # events of its partitions not yet through a finished batch
        self._done: dict[TopicPartition, int] = {}  # next offset after the last finished batch
        self.revocations = 0  # revokes so far
        self._revoked_at: dict[TopicPartition, int] = {}  # the revoke that last took each
        self._next: dict[TopicPartition, int] = {}  # next offset fetched, since the topic check
        self._topic_id: uuid.UUID | None = None  # the input topic's id, as last checked
        self._progress_at = time.monotonic()  # a batch finished, or nothing waited
        self._consumer: AIOKafkaConsumer | None = None
        self._finishing: list[_Finishing] = []  # batches emitting and committing, oldest first
        super().__init__(**kwargs)

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("the batch consumer is not started")
        return self._consumer

    async def on_start(self) -> None:
        await self.emitter.start()
        settings = self.settings
        self._consumer = settings.kafka.consumer(
            group_id=settings.app_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(settings.session_timeout_s * 1000),
            heartbeat_interval_ms=int(settings.session_timeout_s * 250),
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_wait_ms=max(1, int(settings.max_delay_ms)),  # aiokafka's 500 ms: latency
        )
        self.consumer.subscribe([self.settings.input_topic], listener=_WaitForBatch(self))
        await self.consumer.start()
        # torch, the model and the clients are ~200k long-lived objects: a full collection
        # walking them stalled the loop for 95-200 ms, straight into the latency tail.
        gc.freeze()
        gc.set_threshold(GC_YOUNG_OBJECTS)
        model = self.processor.model
        logger.info(
            "consuming %s as group %s, batches of up to %d events; model %s stepping on %s",
            self.settings.input_topic,
            self.settings.app_id,
            self.settings.max_batch,
            model.version,
            model.device,
        )

    async def on_stop(self) -> None:
        async with self.in_hand:  # the batch in hand commits first (bounded by its grace period)
            await self.finished()
            await self.consumer.stop()  # leaves the group: its partitions move at once
        await self.emitter.stop()

    @mode.Service.task
    async def _consume(self) -> None:
        timeout_ms = max(1, int(self.settings.max_delay_ms))
        while not self.should_stop:
            fetched = await self.consumer.getmany(
                timeout_ms=timeout_ms, max_records=self.settings.max_batch
            )
            if fetched:
                work = asyncio.ensure_future(self._run(fetched, time.time(), self.revocations))
                try:
                    await asyncio.shield(work)
                except asyncio.CancelledError:
                    await _finish_in_hand(work)
                    raise

    async def _run(
        self, fetched: dict[TopicPartition, list[Any]], fetched_at: float, revocations: int
    ) -> None:
        """Prepare the batch while earlier ones finish, then let it finish in turn.

        Checking, loading and stepping a batch (CPU) overlaps the waits of up to
        ``MAX_FINISHING`` earlier batches on the broker and Redis. What others see keeps its
        order: each step of finishing (emit, commit memories, commit offsets) waits for the
        same step of the batch before. A batch starts from the memories of the batches still
        finishing even before they reach Redis (``overlay``). Holds the lock a rebalance
        waits for.
        """
        async with self.in_hand:
            # A revoke may have come between the fetch (``revocations`` counts those before it)
            # and now: its records are another owner's, who reads them again, as this worker
            # will, from the committed offsets, if the partition comes back to it.
            fetched = {
                tp: messages
                for tp, messages in fetched.items()
                if self._revoked_at.get(tp, 0) <= revocations
            }
            if not fetched:
                return
            records: list[Consumed] = [m for messages in fetched.values() for m in messages]
            # Once a batch's memories are committed, Redis holds them: always so after a
            # rebalance (the revoke waits for every batch), when another owner may have moved
            # them on.
            self._finishing = [f for f in self._finishing if not f.task.done()]
            in_flight = [
                f.prepared.applied.updates for f in self._finishing if not f.committed.is_set()
            ]
            try:
                await self._check_topic(fetched)
                prepared = await self.processor.prepare(records, in_flight)
            except TopicChangedError as error:
                refuse(error)
            except Exception as error:
                fail_stop(records, error)
            await self._drain(keep=MAX_FINISHING - 1)
            finishing = _Finishing(
                prepared, fetched_at, self._finishing[-1] if self._finishing else None
            )
            finishing.task = asyncio.ensure_future(self._finish(fetched, records, finishing))
            self._finishing.append(finishing)

    async def _check_topic(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        """Check the input topic when a partition's offsets go back: a topic recreated under
        the consumer, with as many partitions, may bring no rebalance, only its reset to the
        new log's start. (Each assignment is checked before its first fetch: ``check_topic``.)"""
        if any(
            tp in self._next and messages[0].offset < self._next[tp]
            for tp, messages in fetched.items()
        ):
            await self.check_topic()
        self._next |= {tp: messages[-1].offset + 1 for tp, messages in fetched.items()}

    async def check_topic(self) -> None:
        """``check_input_topic`` until the broker and Redis answer it; TopicChangedError when
        the memories were made from another topic."""
        self._topic_id = await self.processor.retry(
            "check the input topic",
            lambda: check_input_topic(
                self.emitter.producer.client, self.processor.store, self.settings
            ),
        )

    async def _finish(
        self, fetched: dict[TopicPartition, list[Any]], records: list[Consumed], this: _Finishing
    ) -> None:
        """Emit, commit the memories, then the offsets, each after the batch before did."""
        before = this.before
        try:
            if before is not None:
                await before.emitted.wait()
            await self.processor.emit(this.prepared)
            emitted_at = time.time()
            this.emitted.set()
            if before is not None:
                await before.committed.wait()
            report = await self.processor.commit(this.prepared)
            this.committed.set()
        except Exception as error:
            fail_stop(records, error)
        if before is not None:
            await before.task  # its offsets are committed
            this.before = None  # nothing keeps the batches before alive
        started = time.perf_counter()
        await self._commit({tp: messages[-1].offset + 1 for tp, messages in fetched.items()})
        report.seconds["offsets"] = time.perf_counter() - started
        self.metrics.observe(report)
        oldest = min(m.timestamp for messages in fetched.values() for m in messages) / 1000
        if oldest > 0:  # a record without a timestamp says -1
            self.metrics.observe_age(this.fetched_at - oldest, emitted_at - oldest)
        self._done |= {tp: messages[-1].offset + 1 for tp, messages in fetched.items()}
        self._progress_at = time.monotonic()

    @property
    def stalled(self) -> bool:
        """Events wait and no batch has finished for STALL_S: something holds the stream."""
        return self.lag > 0 and time.monotonic() - self._progress_at > self.settings.stall_s

    @mode.Service.timer(1.0)
    async def _watch_lag(self) -> None:
        """The lag of each assigned partition, every second, as of the broker's last answer
        to a fetch (the high watermark it reported): it counts what waits even when no batch
        finishes. Never fails the worker: a rebalance can move a partition mid-way."""
        lag = 0
        try:
            for tp in self.consumer.assignment():
                highwater = self.consumer.highwater(tp)
                done = self._done.get(tp)
                if done is None:
                    done = await self.consumer.position(tp)
                if highwater is not None:
                    behind = max(0, highwater - done)
                    self.metrics.lag.labels(str(tp.partition)).set(behind)
                    lag += behind
        except Exception as e:  # a partition revoked while we asked: next second, again
            logger.debug("lag not measured this time: %r", e)
            return
        self.lag = lag
        if lag == 0:
            self._progress_at = time.monotonic()

    @mode.Service.timer(TOPIC_CHECK_S)
    async def _watch_topic(self) -> None:
        """Check the input topic every few seconds as well: a topic recreated under the consumer
        with as many partitions brings no rebalance, and a broker may answer a fetch past the new
        log's end with nothing rather than an error (Tansu), so no offset goes back. Only the
        broker is asked: an id other than the one last checked is checked against Redis. Only a
        changed topic fails the worker: the broker or Redis away is checked again next time."""
        try:
            found = await topic_id(self.emitter.producer.client, self.settings.input_topic)
            if found is not None and found != self._topic_id:
                self._topic_id = await check_input_topic(
                    self.emitter.producer.client, self.processor.store, self.settings
                )
        except TopicChangedError as error:
            refuse(error)
        except Exception as e:
            logger.debug("input topic not checked this time: %r", e)

    def forget(self, revoked: list[TopicPartition]) -> None:
        """Partitions another worker owns now: their offsets and lag are no longer ours, nor
        records of theirs fetched before (aiokafka's ``assignment()`` still lists them until the
        group has assigned partitions again)."""
        self.revocations += 1
        self._revoked_at |= dict.fromkeys(revoked, self.revocations)
        for tp in revoked:
            self._done.pop(tp, None)
            self._next.pop(tp, None)
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(str(tp.partition))

    async def finished(self) -> None:
        """Wait until every batch has emitted and committed its memories and offsets.

        A rebalance and a shutdown wait for them, so partitions move with everything committed.
        """
        await self._drain(keep=0)

    async def _drain(self, keep: int) -> None:
        """Wait for the oldest batches to finish until at most ``keep`` are finishing."""
        while len(self._finishing) > keep:
            await self._finishing[0].task
            self._finishing.pop(0)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as e:
            # The memories are committed with their fences, so whoever replays these events
            # drops them as already applied: a lost offset commit costs a replay, not a loss.
            logger.warning("offset commit failed, the batch will be replayed (fenced): %r", e)


class _Finishing:
    """A prepared batch on its way out, and how far it got."""

    def __init__(self, prepared: Prepared, fetched_at: float, before: _Finishing | None) -> None:
        self.prepared = prepared
        self.fetched_at = fetched_at  # unix seconds, comparable with record timestamps
        self.before = before  # the batch prepared just before this one, while it finishes
        self.emitted = asyncio.Event()
        self.committed = asyncio.Event()  # its memories are in Redis
        self.task: asyncio.Future[None]


class _WaitForBatch(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands partitions over only between batches."""

    def __init__(self, service: BatchConsumer) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.service.joined = False  # until the group assigns partitions again
        if revoked:
            async with self.service.in_hand:
                await self.service.finished()
                self.service.processor.store.forget_cached()  # a new owner may write them now
                self.service.forget(revoked)
                logger.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.service.joined = True
        # Even with nothing revoked: between this worker's last batch of a partition and now,
        # another owner may have had it.
        self.service.processor.store.forget_cached()
        logger.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))
        if assigned:  # before anything of them is fetched (the batch path needs no broker call)
            try:
                await self.service.check_topic()
            except TopicChangedError as error:
                refuse(error)


async def _finish_in_hand(work: asyncio.Future[None]) -> None:
    """On shutdown, let the batch in hand commit its memories, within a grace period."""
    if work.done():
        return
    logger.info("stopping: finishing the batch in hand")
    try:
        await asyncio.wait_for(work, SHUTDOWN_GRACE_S)
    except TimeoutError:
        logger.warning(
            "the batch in hand did not finish within %.0fs; it will be replayed on restart",
            SHUTDOWN_GRACE_S,
        )


def refuse(error: TopicChangedError) -> NoReturn:
    """Stop at once with exit status 2, committing nothing, saying what to do: every event of
    the new topic's batch would be dropped as a replay of the old one's. A restart refuses it
    the same way until that is done."""
    logger.critical("stopping the worker: %s", error)
    logging.shutdown()
    os._exit(EXIT_REFUSED)


def fail_stop(records: list[Consumed], error: Exception) -> NoReturn:
    """Stop at once, committing nothing: the batch and all after it are replayed on restart.

    Skipping the batch and going on would let later events of the same entities commit fences
    past it, and its events would then be dropped as replays: lost. A crash loses nothing.
    """
    first, last = records[0], records[-1]
    logger.critical(
        "batch of %d events (%s[%d]@%d .. [%d]@%d) failed; stopping the worker so that nothing "
        "after it is committed",
        len(records),
        first.topic,
        first.partition,
        first.offset,
        last.partition,
        last.offset,
        exc_info=error,
    )
    logging.shutdown()
    os._exit(EXIT_SOFTWARE)
