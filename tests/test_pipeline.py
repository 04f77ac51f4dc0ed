"""The pipeline's order, overlap and failure, in one process: the worker's own processor and a
real store (fakeredis), with an emitter and an offset commit the test controls.

Each finishing step of a batch (emit, commit memories, commit offsets) waits for the same step
of the batch before; a failure anywhere commits nothing after it and is handed to the caller,
never turned into an exit here.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import orjson
import pytest
import torch
from aiokafka import TopicPartition
from fakeredis import FakeAsyncRedis, FakeServer
from torch import nn

from state import MemoryStore
from stream_lstm.exceptions import StoreError, TopicChangedError
from stream_lstm.model import StreamModel
from tests.test_interleavings import INPUT, TOPIC, Consumer, Log, nothing
from workers.batch import BatchProcessor, Record
from workers.connection import KafkaConnection
from workers.consumer import BatchConsumer, KafkaEmitter, _WaitForBatch
from workers.metrics import Metrics
from workers.pipeline import MAX_FINISHING, Batch, Pipeline
from workers.settings import Settings


@dataclass
class Gated:
    """An emitter whose sends the test releases one at a time, or fails."""

    sent: list[int] = field(default_factory=list)  # the first offset of each batch sent
    gates: dict[int, asyncio.Event] = field(default_factory=dict)
    fail_at: int | None = None

    def gate(self, offset: int) -> asyncio.Event:
        return self.gates.setdefault(offset, asyncio.Event())

    async def emit(self, topic: str, messages: Sequence[tuple[bytes | None, bytes]]) -> None:
        if topic != "out":
            return
        first = int(orjson.loads(messages[0][1])["source"]["offset"])
        await self.gate(first).wait()
        if first == self.fail_at:
            raise StoreError("a bad value: not retried")  # stands in for any final error
        self.sent.append(first)


@dataclass
class Offsets:
    """The consumer's offset commit: what it was asked, in order."""

    commits: list[dict[object, int]] = field(default_factory=list)
    committed: asyncio.Event = field(default_factory=asyncio.Event)

    async def commit(self, offsets: dict[object, int]) -> None:
        self.commits.append(dict(offsets))
        self.committed.set()


@pytest.fixture
def model() -> StreamModel:
    torch.manual_seed(6)
    return StreamModel.from_torch(nn.LSTM(INPUT, 4), nn.Linear(4, 2))


@pytest.fixture
async def store(model: StreamModel) -> AsyncIterator[MemoryStore]:
    client = FakeAsyncRedis(server=FakeServer())
    async with MemoryStore("redis://fakeredis", "ns", model.version, client=client) as store:
        yield store


def one_event_batches(log: Log, count: int) -> list[Batch]:
    """``count`` batches of one event each, of entity "a", on partition 0."""
    batches = []
    for _ in range(count):
        event = log.add("a", 0)
        record: Record = event.record
        batches.append(Batch([record], {0: event.offset + 1}, fetched_at=0.0))
    return batches


def processor(model: StreamModel, store: MemoryStore, emitter: Gated) -> BatchProcessor:
    return BatchProcessor(
        model, store, emitter, output_topic="out", dead_letter_topic="dead", max_event_bytes=4096
    )


async def test_batches_finish_in_order_while_the_next_one_is_prepared(
    model: StreamModel,
    store: MemoryStore,
) -> None:
    """Up to MAX_FINISHING batches finish while the next is prepared from their memories; the
    later batch's send, released first, still waits for the earlier one's, and offsets are
    committed in batch order."""
    emitter, offsets = Gated(), Offsets()
    pipeline = Pipeline(processor(model, store, emitter), offsets.commit)
    batches = one_event_batches(Log(random.Random(1)), MAX_FINISHING + 1)
    for batch in batches[:MAX_FINISHING]:
        await pipeline.run(batch)  # prepared, now finishing (waiting on their sends)
    emitter.gate(1).set()  # the second batch's send may go first ...
    await asyncio.sleep(0.01)
    assert emitter.sent == [], "a batch emitted before the one before it"
    third = asyncio.ensure_future(pipeline.run(batches[-1]))
    await asyncio.sleep(0.01)
    assert not third.done(), "more than MAX_FINISHING batches finishing at once"
    emitter.gate(0).set()
    emitter.gate(2).set()
    await third
    await pipeline.drain()
    assert emitter.sent == [0, 1, 2]
    assert offsets.commits == [{0: 1}, {0: 2}, {0: 3}]
    stored = await store.get("a")
    assert stored is not None
    assert int(stored.memories.step[0]) == 3, "each batch started from the memory of the one before"


async def test_a_failed_batch_commits_nothing_after_it_and_is_handed_to_the_caller(
    model: StreamModel,
    store: MemoryStore,
) -> None:
    """The second of three batches fails to emit for good, the third finishing after it: the
    first committed before the failure stays committed; neither the second nor the third
    commits memories or offsets, the third is not emitted; the error goes to ``failed`` once
    and later batches are refused."""
    emitter, offsets, failures = Gated(fail_at=1), Offsets(), []
    pipeline = Pipeline(processor(model, store, emitter), offsets.commit, failed=failures.append)
    batches = one_event_batches(Log(random.Random(2)), 4)
    await pipeline.run(batches[0])
    await pipeline.run(batches[1])
    emitter.gate(0).set()
    await asyncio.wait_for(offsets.committed.wait(), 1.0)
    assert offsets.commits == [{0: 1}]
    await pipeline.run(batches[2])
    emitter.gate(1).set()
    emitter.gate(2).set()
    await asyncio.wait_for(pipeline.drain(), 1.0)
    assert [type(f) for f in failures] == [StoreError]
    assert pipeline.failure is failures[0]
    assert offsets.commits == [{0: 1}]
    assert emitter.sent == [0]
    stored = await store.get("a")
    assert stored is not None
    assert int(stored.memories.step[0]) == 1, "a batch after the failed one committed its memory"
    await pipeline.run(batches[3])
    emitter.gate(3).set()
    await pipeline.drain()
    assert offsets.commits == [{0: 1}]
    assert len(failures) == 1


async def test_after_any_failure_nothing_more_commits_and_nothing_waits_forever(
    model: StreamModel,
    store: MemoryStore,
) -> None:
    """A failure outside the batches (another input topic, a fetch refused) while two are
    finishing: neither commits (their events may be another topic's), and when the first then
    fails too the second does not wait for it forever: the pipeline drains at once."""
    emitter, offsets, failures = Gated(fail_at=0), Offsets(), []
    pipeline = Pipeline(processor(model, store, emitter), offsets.commit, failed=failures.append)
    batches = one_event_batches(Log(random.Random(5)), 2)
    await pipeline.run(batches[0])
    await pipeline.run(batches[1])
    pipeline.fail(TopicChangedError("the input topic 'events' was deleted and recreated"))
    emitter.gate(0).set()
    emitter.gate(1).set()
    await asyncio.wait_for(pipeline.drain(), 1.0)
    assert [type(f) for f in failures] == [TopicChangedError]
    assert offsets.commits == []
    assert emitter.sent == []
    assert await store.get("a") is None


async def test_a_batch_that_cannot_be_prepared_stops_the_pipeline(
    model: StreamModel,
    store: MemoryStore,
) -> None:
    """A load that fails for good (a value that is not ours) stops the pipeline before
    anything of the batch is sent or committed."""
    emitter, offsets, failures = Gated(), Offsets(), []
    pipeline = Pipeline(processor(model, store, emitter), offsets.commit, failed=failures.append)
    await store._backend.redis.set(store._backend.keys.memory("a"), b"not a memory")
    batch = one_event_batches(Log(random.Random(3)), 1)[0]
    await pipeline.run(batch)
    await pipeline.drain()
    assert [type(f) for f in failures] == [StoreError]
    assert offsets.commits == []
    assert emitter.sent == []


async def test_another_input_topic_on_assignment_stops_the_worker_before_any_batch(
    model: StreamModel,
    store: MemoryStore,
) -> None:
    """The partitions assigned belong to another topic than the memories': the failure goes to
    the worker, and a batch fetched afterwards is neither emitted nor committed."""
    failures: list[BaseException] = []
    emitter = Gated()
    settings = Settings.load(redis_url="redis://127.0.0.1:1/0")
    kafka = KafkaEmitter(KafkaConnection("localhost:1"))  # never started
    consumer = BatchConsumer(
        settings,
        processor(model, store, emitter),
        kafka,
        Metrics(),
        failed=failures.append,
    )
    fake = Consumer({TopicPartition(TOPIC, 0)})
    consumer._consumer = fake  # type: ignore[assignment]

    async def another_topic() -> None:
        raise TopicChangedError("the input topic 'events' was deleted and recreated")

    consumer.check_topic = another_topic  # type: ignore[method-assign]
    await _WaitForBatch(consumer).on_partitions_assigned([TopicPartition(TOPIC, 0)])
    assert [type(f) for f in failures] == [TopicChangedError]
    assert fake.paused == {TopicPartition(TOPIC, 0)}  # never fetched
    log = Log(random.Random(4))
    fetched = {TopicPartition(TOPIC, 0): log.fetched([log.add("a", 0)])}
    emitter.gate(0).set()
    await consumer._run(fetched, 0.0, consumer.revocations)
    await consumer.finished()
    assert emitter.sent == []
    assert fake.commits == []
    assert await store.get("a") is None


class Stoppable(Consumer):
    """The broker's side of a consumer that can also be stopped (left)."""

    stopped = False

    async def stop(self) -> None:
        self.stopped = True


@dataclass
class Producer:
    stopped: bool = False

    async def stop(self) -> None:
        self.stopped = True


async def test_a_stop_waits_for_the_batches_in_hand_within_its_grace_period(
    model: StreamModel, store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM: a batch whose send the broker holds keeps the stop no longer than the grace
    period; then it is given up (not committed, replayed on restart) and the group is left.
    A batch that finishes in time commits before the group is left."""
    monkeypatch.setattr("workers.consumer.SHUTDOWN_GRACE_S", 0.3)
    for released in (True, False):
        emitter, failures = Gated(), []
        settings = Settings.load(redis_url="redis://127.0.0.1:1/0")
        kafka = Producer()
        consumer = BatchConsumer(
            settings, processor(model, store, emitter), kafka, Metrics(), failed=failures.append
        )
        fake = Stoppable({TopicPartition(TOPIC, 0)})
        consumer._consumer = fake  # type: ignore[assignment]
        consumer.check_topic = nothing  # type: ignore[method-assign]
        log = Log(random.Random(7))
        event = log.add("a", 0)
        fetched = {TopicPartition(TOPIC, 0): log.fetched([event])}
        consumer._next[TopicPartition(TOPIC, 0)] = 0
        await consumer._run(fetched, 0.0, consumer.revocations)
        if released:
            emitter.gate(event.offset).set()
        await asyncio.wait_for(consumer.on_stop(), 2.0)
        assert fake.stopped, "the group was not left"
        assert kafka.stopped
        assert fake.commits == ([{TopicPartition(TOPIC, 0): 1}] if released else [])
        assert (await store.get("a") is not None) is released
        assert failures == []
        await store._backend.redis.flushall()
