"""The hot path: whole fetched batches from Kafka, one processor call each, one commit each.

Faust's per-event stream machinery (an agent iterating a stream, acking each event) costs more
per event than the whole budget of a fast worker. So the worker's Faust app hosts this service
instead of an agent: an aiokafka consumer in the worker's consumer group hands ``getmany``
batches to the ``Pipeline`` (pipeline.py), which runs them through the ``BatchProcessor`` in
order and commits each batch's offsets right after its memories.
- Rebalance: a partition is handed over only between batches (the revoke callback waits for
  the batch in hand and the ones finishing), and its offsets are committed by then. Records
  fetched before a revoke and run after it are dropped: their partition has another owner,
  who reads them again (so does this worker, if it gets the partition back). Every assignment
  clears the memory cache: what it holds may have been moved on by another owner meanwhile.
- Shutdown: the batch in hand finishes (within a grace period), is committed, and the consumer
  leaves the group so its partitions move at once.
- An error the processor could not retry stops the pipeline without committing the batch (it
  is replayed on restart, and nothing after it was committed) and tells ``failed``: the worker
  stops and the command line exits 70.
- The input topic is checked (``check_input_topic``) when partitions are assigned, before they
  are fetched, whenever a partition's offsets go back (its log was replaced under the consumer),
  and every ``TOPIC_CHECK_S``: memories made from another topic stop the pipeline the same way
  (the command line exits 2, saying what to do).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

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

from stream_lstm.exceptions import TakenOverError, TopicChangedError
from workers.batch import BatchProcessor, Consumed
from workers.connection import KafkaConnection
from workers.metrics import Metrics
from workers.pipeline import Batch, Finished, Pipeline
from workers.settings import Settings
from workers.takeover import TakeOver, check_not_taken_over
from workers.topics import check_input_topic, topic_id

logger = logging.getLogger(__name__)

GC_YOUNG_OBJECTS = 20_000
"""Objects allocated (net of those freed) between two of Python's young collections. Batches in
flight hold thousands of objects alive, so at Python's default of 700 a young collection runs
every few batches for nothing: reference counting frees what a batch allocated."""
SHUTDOWN_GRACE_S = 6.0
"""How long a stop waits for the batches in hand; the whole stop must stay under 10 s."""
TOPIC_CHECK_S = 2.0
"""How often the input topic is checked besides (one metadata request and one Redis command)."""
TAKE_OVER_POLL_S = 0.5
"""How often a take-over deployment reads the live group's state and offsets (two requests)."""
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
        *,
        failed: Callable[[BaseException], None],
        **kwargs: Any,
    ) -> None:
        self.settings = settings
        self.processor = processor
        self.emitter = emitter  # the processor sends with it; started and stopped here
        self.metrics = metrics
        self._failed = failed
        self._work: asyncio.Future[None] | None = None  # the fetched batch in hand
        self.pipeline = Pipeline(
            processor, self._commit, finished=self._observe, failed=self._stop_after
        )
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
        self.take_over = TakeOver(settings, processor, metrics) if settings.takes_over else None
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
        if self.take_over is not None:
            consumer = self.consumer
            await self.take_over.start(lambda: {tp.partition for tp in consumer.assignment()})
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
        """The batch in hand and those finishing commit first, within ``SHUTDOWN_GRACE_S``
        (else they are given up, and replayed on restart); then the group is left."""
        try:
            async with asyncio.timeout(SHUTDOWN_GRACE_S), self.in_hand:  # none starts after
                await self.finished()
        except TimeoutError:
            logger.warning(
                "the batches in hand did not finish within %.0fs; they will be replayed on restart",
                SHUTDOWN_GRACE_S,
            )
            self.pipeline.abandon()
            if self._work is not None:
                self._work.cancel()
        # Not under the lock: leaving the group waits for a rebalance callback in progress,
        # which waits for the lock.
        await self.consumer.stop()  # leaves the group: its partitions move at once
        await self.emitter.stop()
        if self.take_over is not None:
            await self.take_over.stop()

    def _stop_after(self, failure: BaseException) -> None:
        """The pipeline failed: drop the batch in hand (it may be retrying a load for as long
        as Redis is away) and tell the worker, which stops."""
        work = self._work
        if work is not None and not work.done() and work is not asyncio.current_task():
            work.cancel()
        self._failed(failure)

    @mode.Service.task
    async def _consume(self) -> None:
        timeout_ms = max(1, int(self.settings.max_delay_ms))
        while not self.should_stop and self.pipeline.failure is None:
            try:
                fetched = await self.consumer.getmany(
                    timeout_ms=timeout_ms, max_records=self.settings.max_batch
                )
            except Exception as error:  # not retriable by the client: authorization, say
                self.pipeline.fail(error)
                return
            if self.take_over is not None:  # only what the live deployment has emitted for
                fetched = self.take_over.hold(fetched, self.consumer)
            if fetched:
                work = asyncio.ensure_future(self._run(fetched, time.time(), self.revocations))
                self._work = work
                try:
                    await asyncio.shield(work)  # a stop lets it finish: see on_stop
                except asyncio.CancelledError:
                    if self.pipeline.failure is not None:
                        return  # the batch in hand was dropped: nothing of it commits
                    raise

    async def _run(
        self, fetched: dict[TopicPartition, list[Any]], fetched_at: float, revocations: int
    ) -> None:
        """Hand a fetched batch to the pipeline, holding the lock a rebalance waits for."""
        async with self.in_hand:
            # A revoke may have come between the fetch (``revocations`` counts those before it)
            # and now: its records are another owner's, who reads them again, as this worker
            # will, from the committed offsets, if the partition comes back to it.
            fetched = {
                tp: messages
                for tp, messages in fetched.items()
                if self._revoked_at.get(tp, 0) <= revocations
            }
            if not fetched or self.pipeline.closed or self.should_stop:
                return  # stopping: whoever owns the partitions next reads these again
            messages = [m for part in fetched.values() for m in part]  # aiokafka's records
            records: list[Consumed] = messages
            try:
                await self._check_topic(fetched)
            except (TopicChangedError, TakenOverError) as error:
                self.pipeline.fail(error)
                return
            except Exception as error:
                self.pipeline.fail(error, records)
                return
            offsets = {tp: part[-1].offset + 1 for tp, part in fetched.items()}
            oldest = max(0, min(m.timestamp for m in messages)) / 1000  # none says -1
            await self.pipeline.run(Batch(records, offsets, fetched_at, oldest))

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
        the memories were made from another topic, TakenOverError when another deployment took
        this app id's stream over."""
        store = self.processor.store
        self._topic_id = await self.processor.retry(
            "check the input topic",
            lambda: check_input_topic(self.emitter.producer.client, store, self.settings),
        )
        await self.processor.retry(
            "check the take-over record", lambda: check_not_taken_over(store, self.settings)
        )

    def _observe(self, finished: Finished) -> None:
        """A batch is done: its metrics, its partitions' progress."""
        batch = finished.batch
        self.metrics.observe(finished.report)
        if batch.oldest > 0:
            self.metrics.observe_age(
                batch.fetched_at - batch.oldest, finished.emitted_at - batch.oldest
            )
        self._done |= batch.offsets
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
        lag, dones = 0, {}
        try:
            for tp in self.consumer.assignment():
                highwater = self.consumer.highwater(tp)
                done = self._done.get(tp)
                if done is None:
                    done = await self.consumer.position(tp)
                dones[tp] = done
                if highwater is not None:
                    behind = max(0, highwater - done)
                    self.metrics.lag.labels(str(tp.partition)).set(behind)
                    lag += behind
        except Exception as e:  # a partition revoked while we asked: next second, again
            logger.debug("lag not measured this time: %r", e)
            return
        self.lag = lag
        if self.take_over is not None:
            self.take_over.observe(dones)
        if lag == 0:
            self._progress_at = time.monotonic()

    @mode.Service.timer(TAKE_OVER_POLL_S)
    async def _watch_old_group(self) -> None:
        """A take-over deployment: read the live group's offsets, take over once it is empty,
        and resume the partitions they have passed. Only a take-over recorded by another
        deployment fails the worker: the broker or Redis away is asked again next time."""
        take_over = self.take_over
        if take_over is None or take_over.handed_over is not None:
            return
        try:
            await take_over.poll()
        except TakenOverError as error:
            self.pipeline.fail(error)
            return
        except Exception as e:
            logger.debug("the live deployment's group not read this time: %r", e)
        take_over.release(self.consumer)

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
            self.pipeline.fail(error)
        except Exception as e:
            logger.debug("input topic not checked this time: %r", e)

    def forget(self, revoked: list[TopicPartition]) -> None:
        """Partitions another worker owns now: their offsets and lag are no longer ours, nor
        records of theirs fetched before (aiokafka's ``assignment()`` still lists them until the
        group has assigned partitions again)."""
        self.revocations += 1
        self._revoked_at |= dict.fromkeys(revoked, self.revocations)
        if self.take_over is not None:
            self.take_over.forget(revoked)
        for tp in revoked:
            self._done.pop(tp, None)
            self._next.pop(tp, None)
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(str(tp.partition))

    async def finished(self) -> None:
        """Wait until every batch has emitted and committed its memories and offsets (or,
        after a failure, was cancelled). A rebalance and a shutdown wait for them, so
        partitions move with everything committed."""
        await self.pipeline.drain()

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as e:
            # The memories are committed with their fences, so whoever replays these events
            # drops them as already applied: a lost offset commit costs a replay, not a loss.
            logger.warning("offset commit failed, the batch will be replayed (fenced): %r", e)


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
        # aiokafka may fetch the partitions from their assignment on, before this callback ends:
        # paused (before any await), none is read until they are checked.
        consumer = self.service.consumer
        consumer.pause(*assigned)
        # Even with nothing revoked: between this worker's last batch of a partition and now,
        # another owner may have had it.
        self.service.processor.store.forget_cached()
        logger.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))
        if not assigned or self.service.pipeline.failure is not None:
            return
        try:
            await self.service.check_topic()
        except Exception as error:  # a refusal, a value not ours: unchecked, they are not read
            self.service.pipeline.fail(error)
            return
        consumer.resume(*(tp for tp in assigned if tp in consumer.assignment()))
