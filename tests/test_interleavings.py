"""Issue 15, findings 1, 3 and 4: batches, resets, a second worker and a rebalance interleaved in
one process, in an order the test chooses, against a real store (fakeredis, a real server, a
cluster) and the worker's own processor and consumer; only the broker is a controllable fake.

Whatever the interleaving, each entity's stored memory must hold each of its events exactly
once, and equal ``nn.LSTM`` over them in the order its predictions say they were applied.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import pytest
import torch
from aiokafka import ConsumerRecord, TopicPartition
from torch import nn

from state import Loaded, MemoryStore
from state.keys import KeyLayout
from stream_lstm.model import StreamModel
from tests.conftest import StoreBackend
from tests.offline import offline
from tests.test_store import make_updates
from workers.batch import BatchProcessor, Record
from workers.connection import KafkaConnection
from workers.consumer import BatchConsumer, KafkaEmitter, _WaitForBatch
from workers.dev.redis_server import RedisServer
from workers.metrics import Metrics
from workers.settings import Settings

TOPIC = "events"
INPUT = 3


@pytest.fixture
def model() -> StreamModel:
    torch.manual_seed(5)
    return StreamModel.from_torch(nn.LSTM(INPUT, 4, num_layers=2), nn.Linear(4, 2))


@dataclass
class Emitted:
    """An emitter that keeps what it was given, in order."""

    messages: dict[str, list[bytes]] = field(default_factory=dict)

    async def emit(self, topic: str, messages: Sequence[tuple[bytes | None, bytes]]) -> None:
        self.messages.setdefault(topic, []).extend(value for _, value in messages)

    def predictions(self) -> list[dict[str, object]]:
        return [orjson.loads(m) for m in self.messages.get("out", [])]


def worker(model: StreamModel, store: MemoryStore, emitted: Emitted) -> BatchProcessor:
    return BatchProcessor(
        model, store, emitted, output_topic="out", dead_letter_topic="dead", max_event_bytes=4096
    )


@dataclass(frozen=True)
class Event:
    entity_id: str
    features: list[float]
    partition: int
    offset: int

    @property
    def record(self) -> Record:
        value = orjson.dumps({"entity_id": self.entity_id, "features": self.features})
        return Record(TOPIC, self.partition, self.offset, self.entity_id.encode(), value)


class Log:
    """Events appended to partitions, with their offsets."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.partitions: dict[int, list[Event]] = {}

    def add(self, entity_id: str, partition: int) -> Event:
        events = self.partitions.setdefault(partition, [])
        features = [self.rng.uniform(-2, 2) for _ in range(INPUT)]
        events.append(Event(entity_id, features, partition, len(events)))
        return events[-1]

    def records(self, events: Sequence[Event]) -> list[Record]:
        return [e.record for e in events]

    def fetched(self, events: Sequence[Event]) -> list[ConsumerRecord[bytes, bytes]]:
        """As aiokafka's ``getmany`` hands them to the worker."""
        return [
            ConsumerRecord(TOPIC, e.partition, e.offset, 0, 0, r.key, r.value, None, 0, 0, ())
            for e, r in zip(events, self.records(events), strict=True)
        ]


def by_source(log: Log) -> dict[tuple[int, int], Event]:
    return {(e.partition, e.offset): e for events in log.partitions.values() for e in events}


async def assert_each_event_once(
    store: MemoryStore, model: StreamModel, log: Log, emitted: Emitted
) -> None:
    """Each entity's memory holds each of its events once, in the order of the last prediction
    emitted for each step (a replay may take another order across partitions), and equals
    nn.LSTM over them in that order; so do those predictions."""
    events = by_source(log)
    chain: dict[tuple[str, int], dict[str, object]] = {}
    for prediction in emitted.predictions():  # the last one of each step wins
        chain[(str(prediction["entity_id"]), int(prediction["step"]))] = prediction  # type: ignore[call-overload]
    entities = {e.entity_id for e in events.values()}
    for entity_id in sorted(entities):
        own = [e for e in events.values() if e.entity_id == entity_id]
        steps = [chain[(entity_id, k)] for k in range(1, len(own) + 1)]
        order = [events[(p["source"]["partition"], p["source"]["offset"])] for p in steps]  # type: ignore[index]
        assert sorted(order, key=lambda e: (e.partition, e.offset)) == sorted(
            own, key=lambda e: (e.partition, e.offset)
        ), f"{entity_id}: the predictions' steps do not cover each event once"
        for partition in {e.partition for e in own}:
            offsets = [e.offset for e in order if e.partition == partition]
            assert offsets == sorted(offsets), f"{entity_id}: partition {partition} out of order"
        outputs = await assert_memory(store, model, entity_id, order)
        torch.testing.assert_close(
            torch.tensor([p["output"] for p in steps]), outputs, atol=1e-5, rtol=0
        )


async def assert_memory(
    store: MemoryStore, model: StreamModel, entity_id: str, events: Sequence[Event]
) -> torch.Tensor:
    """The entity's stored memory is nn.LSTM's over exactly these events, in this order;
    returns nn.LSTM's outputs."""
    outputs, h_n, c_n = offline(
        model, [(torch.tensor(e.features, dtype=torch.float32), False) for e in events]
    )
    stored = await store.get(entity_id)
    assert stored is not None
    step = int(stored.memories.step[0])
    assert step == len(events), f"{entity_id}: {step} events applied of {len(events)}"
    ltm, stm = (state[0] for state in stored.memories.states)
    torch.testing.assert_close(torch.from_numpy(stm), h_n, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(ltm), c_n, atol=1e-5, rtol=0)
    return outputs


# --- Finding 1: one entity's events on several partitions -----------------------------------


@pytest.mark.parametrize("seed", range(4))
async def test_entities_on_two_partitions_apply_each_event_once_through_crashes(
    backend: StoreBackend, model: StreamModel, seed: int
) -> None:
    """A worker owning both partitions takes batches of random size from each and crashes at
    random after committing memories but before committing offsets: the next worker (a new
    processor, nothing cached) replays from the committed offsets. Entities are keyed on both
    partitions, as producers with different partitioners would key them."""
    rng = random.Random(seed)
    log = Log(rng)
    for _ in range(300):
        log.add(f"e{rng.randrange(12)}", rng.randrange(2))
    committed = {0: 0, 1: 0}  # Kafka's committed offset of each partition
    emitted = Emitted()
    async with backend.store() as store:
        current = worker(model, store, emitted)
        while any(committed[p] < len(log.partitions[p]) for p in committed):
            records = []
            for p, events in log.partitions.items():
                records += log.records(events[committed[p] : committed[p] + rng.randint(0, 20)])
            if not records:
                continue
            await current.process(records)
            if rng.random() < 0.3:  # a crash: memories committed, offsets not
                current = worker(model, store, emitted)
                continue
            for r in records:
                committed[r.partition] = max(committed[r.partition], r.offset + 1)
        await assert_each_event_once(store, model, log, emitted)


@pytest.mark.parametrize("first", ["owner of partition 0", "owner of partition 1"])
@pytest.mark.parametrize("stored_before", [True, False])
async def test_two_workers_stepping_one_entity_at_once_lose_nothing(
    backend: StoreBackend, model: StreamModel, first: str, stored_before: bool
) -> None:
    """Two workers own one partition each and both step entity ``a`` from the same stored
    memory (or from nothing) at once: whichever commits second finds the memory moved on and
    applies its event again on top, whether its commit would go by script or by the fast MSET
    (each partition has a fence below the batch, so the fast commit is tried)."""
    log = Log(random.Random(3))
    emitted = Emitted()
    async with backend.store() as store_0, backend.store() as store_1:
        zero, one = worker(model, store_0, emitted), worker(model, store_1, emitted)
        before = [log.add("a" if stored_before else "c", 0)]
        await zero.process(log.records(before))
        await one.process(log.records([log.add("d", 1)]))
        a_0, a_1 = log.add("a", 0), log.add("a", 1)
        batch_0 = await zero.prepare(log.records([a_0, log.add("b", 0)]))
        batch_1 = await one.prepare(log.records([a_1]))
        order = [(zero, batch_0, a_0), (one, batch_1, a_1)]
        if first.endswith("1"):
            order.reverse()
        reports = []
        for processor, batch, _ in order:
            await processor.emit(batch)
            reports.append(await processor.commit(batch))
        assert [r.moved for r in reports] == [0, 1]
        history = [e for e in before if e.entity_id == "a"] + [a for _, _, a in order]
        await assert_memory(store_0, model, "a", history)


async def test_a_stale_commit_in_flight_leaves_the_next_batch_to_the_script(
    backend: StoreBackend, model: StreamModel
) -> None:
    """A worker that lost partition 0 (still running) prepares B2 on top of its B1 in flight,
    while the new owner of partitions 0 and 1 applies B1's events and one of x on partition 1.
    B1's commit is stale: B2 started from an update that was never written, so it may not take
    the fast MSET (it would erase the partition 1 event, past which the owner has committed)."""
    log = Log(random.Random(9))
    emitted = Emitted()
    async with backend.store() as stale_store, backend.store() as owner_store:
        stale, owner = worker(model, stale_store, emitted), worker(model, owner_store, emitted)
        first = log.add("x", 0)
        await stale.process(log.records([first]))
        again = [log.add("x", 0) for _ in range(3)]
        b1 = await stale.prepare(log.records(again))
        other = log.add("x", 1)
        await owner.process(log.records([*again, other]))
        last = log.add("x", 0)
        b2 = await stale.prepare(log.records([last]), [b1.applied.updates])
        for batch in (b1, b2):
            await stale.emit(batch)
            await stale.commit(batch)
        await assert_memory(stale_store, model, "x", [first, *again, other, last])


async def test_writes_on_partitions_a_memory_has_already_are_not_outside_writes(
    backend: StoreBackend,
) -> None:
    """Only a write that gives a memory a fence on another partition counts as an outside write
    (each one empties every worker's cache and costs the next batches the fast commit): an
    entity that once came on two partitions keeps both fences, and its later writes are the
    owners' own."""
    if backend.name == "cluster":
        pytest.skip("a cluster has no outside-writes counter")
    counter = KeyLayout(backend.namespace, "v1").outside_writes
    async with backend.store() as store:
        client = store._backend.redis

        async def commits(fences: dict[int, int], partition: int, offset: int) -> bytes | None:
            updates = make_updates(["a"], offset, partition=partition, other_fences={0: fences})
            assert (await store.commit_many(updates)).applied_ids == ["a"]
            return cast("bytes | None", await client.get(counter))

        assert await commits({}, 0, 1) is None  # a new memory on one partition
        assert await commits({0: 1}, 1, 0) == b"1"  # partition 1 added
        assert await commits({1: 0}, 0, 2) == b"1"
        assert await commits({0: 2}, 1, 1) == b"1"
        assert await commits({0: 2, 1: 1}, 2, 0) == b"2"  # partition 2 added


# --- Finding 4: a reset against batches in flight -------------------------------------------


@pytest.mark.parametrize("when", ["while committing", "before the next batch reads"])
async def test_a_reset_holds_against_batches_in_flight(
    backend: StoreBackend, model: StreamModel, when: str
) -> None:
    """A reset (the memory API's DELETE) lands while a batch that read the old memory is
    committing, and the next batch was prepared from that batch's memories (pipelined): both
    apply their events again on the zeros. The reset holds: the memory is the events after it,
    and nothing before it."""
    log = Log(random.Random(4))
    emitted = Emitted()
    async with backend.store() as store:
        processor = worker(model, store, emitted)
        await processor.process(log.records([log.add("a", 0) for _ in range(3)]))
        after = [log.add("a", 0) for _ in range(2)]
        second = await processor.prepare(log.records(after[:1]))
        if when == "before the next batch reads":
            assert await store.reset("a")
        third = await processor.prepare(log.records(after[1:]), [second.applied.updates])
        if when == "while committing":
            assert await store.reset("a")
        for batch in (second, third):
            await processor.emit(batch)
            assert (await processor.commit(batch)).moved == 1
        stored = await store.get("a")
        assert stored is not None
        _, h_n, c_n = offline(model, [(torch.tensor(e.features), False) for e in after])
        assert int(stored.memories.step[0]) == len(after)
        ltm, stm = (state[0] for state in stored.memories.states)
        torch.testing.assert_close(torch.from_numpy(stm), h_n, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.from_numpy(ltm), c_n, atol=1e-5, rtol=0)


async def test_a_batch_prepared_while_a_moved_one_applies_again_commits_by_script(
    backend: StoreBackend, model: StreamModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consumer prepares the next batch while the one before finishes: here while that one,
    moved by a reset, applies its events again. The next batch started from the moved batch's
    update as it was before the reset; its fast commit would undo the reset."""
    log = Log(random.Random(4))
    emitted = Emitted()
    async with backend.store() as store:
        processor = worker(model, store, emitted)
        await processor.process(log.records([log.add("a", 0) for _ in range(3)]))
        after = [log.add("a", 0) for _ in range(2)]
        first = await processor.prepare(log.records(after[:1]))
        await processor.emit(first)
        assert await store.reset("a")
        load, prepared = store.load_many, []

        async def load_then_prepare_the_next(*args: Any, **kwargs: Any) -> Loaded:
            loaded = await load(*args, **kwargs)  # the load of the batch applied again
            if not prepared:
                monkeypatch.setattr(store, "load_many", load)
                prepared.append(
                    await processor.prepare(log.records(after[1:]), [first.applied.updates])
                )
            return loaded

        monkeypatch.setattr(store, "load_many", load_then_prepare_the_next)
        assert (await processor.commit(first)).moved == 1
        await processor.emit(prepared[0])
        await processor.commit(prepared[0])
        await assert_memory(store, model, "a", after)


# --- Finding 3: a batch fetched before a revoke ---------------------------------------------


class Consumer:
    """The broker's side of a consumer: what it assigns, what it was asked to commit."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned
        self.commits: list[dict[TopicPartition, int]] = []
        self.paused: set[TopicPartition] = set()

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused |= set(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused -= set(partitions)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets)


async def nothing() -> None:
    """Stands in for a check this test is not about."""


@pytest.fixture
async def cached_consumer(
    redis_server: RedisServer, model: StreamModel
) -> AsyncIterator[tuple[BatchConsumer, Consumer, Emitted]]:
    settings = Settings.load(redis_url=redis_server.url, app_id=f"t{random.getrandbits(40):x}")
    async with settings.memory_store(model.version) as store:
        emitted = Emitted()
        emitter = KafkaEmitter(KafkaConnection("localhost:1"))  # never started
        failures: list[BaseException] = []
        processor = worker(model, store, emitted)
        consumer = BatchConsumer(settings, processor, emitter, Metrics(), failed=failures.append)
        fake = Consumer({TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)})
        consumer._consumer = fake
        yield consumer, fake, emitted
        assert failures == [], "the pipeline failed"


async def test_a_batch_fetched_before_a_revoke_that_runs_after_it_is_dropped(
    cached_consumer: tuple[BatchConsumer, Consumer, Emitted],
) -> None:
    """The revoke callback takes the lock before the fetched batch's task starts: the batch's
    partition has another owner when it runs, so it must neither emit, nor commit memories
    (which would stay cached), nor commit offsets; the partition still owned goes on. As in
    aiokafka, the consumer's assignment still lists the revoked partition meanwhile."""
    consumer, fake, emitted = cached_consumer
    log = Log(random.Random(6))
    lost, kept = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
    fetched = {lost: log.fetched([log.add("a", 0)]), kept: log.fetched([log.add("b", 1)])}
    consumer._next |= dict.fromkeys(fetched, 0)  # the input topic was checked at assignment
    revocations = consumer.revocations  # as the fetch returned
    revoking = asyncio.ensure_future(_WaitForBatch(consumer).on_partitions_revoked([lost]))
    await asyncio.sleep(0)  # the revoke holds the lock ...
    run = asyncio.ensure_future(consumer._run(fetched, 0.0, revocations))  # ... then the batch
    await revoking
    await run
    await consumer.finished()
    assert [p["entity_id"] for p in emitted.predictions()] == ["b"]
    assert fake.commits == [{kept: 1}]
    store = consumer.processor.store
    assert await store.get("a") is None
    assert (await store.get("b")) is not None


async def test_every_assignment_drops_the_cache_even_with_nothing_revoked(
    cached_consumer: tuple[BatchConsumer, Consumer, Emitted], model: StreamModel
) -> None:
    """Between this worker's last batch of a partition and a new assignment of it (with nothing
    revoked, as after a group's generation moved on without it), another owner may have moved
    its memories on: what the cache holds is not to be trusted."""
    consumer, fake, _ = cached_consumer
    consumer.check_topic = nothing  # type: ignore[method-assign]  # needs a broker: test_topics
    log = Log(random.Random(7))
    store = consumer.processor.store
    await consumer.processor.process(log.records([log.add("a", 0)]))
    assert (await store.load_many(["a"], model.shape)).cached == 1
    await _WaitForBatch(consumer).on_partitions_assigned([TopicPartition(TOPIC, 0)])
    assert (await store.load_many(["a"], model.shape)).cached == 0
    assert fake.paused == set()  # checked: fetched from now on
