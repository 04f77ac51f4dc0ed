"""The input topic's identity (workers.topics): memories made from one topic refuse another, and
when the consumer checks it.

The broker is a stand-in that names a topic id; the store is fakeredis. The real thing (a topic
deleted and recreated under a running worker, on Tansu and Apache Kafka) is in
test_reliability.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from fakeredis import FakeAsyncRedis, FakeServer

from state import MemoryStore
from stream_lstm.exceptions import TopicChangedError
from tests.test_interleavings import Consumer
from workers import topics
from workers.batch import Record
from workers.consumer import BatchConsumer, _WaitForBatch
from workers.metrics import Metrics
from workers.settings import Settings
from workers.topics import check_input_topic


class Broker:
    """Answers a metadata request with the id its topic has now."""

    def __init__(self) -> None:
        self.ids: dict[str, uuid.UUID] = {}

    def create(self, topic: str) -> None:
        self.ids[topic] = uuid.uuid4()

    def get_random_node(self) -> int:
        return 1

    async def send(self, node: int, request: Any) -> SimpleNamespace:
        topic = request.topic
        return SimpleNamespace(topics=[(0, topic, self.ids[topic], False, [], 0, {})])


@pytest.fixture
async def memories() -> AsyncIterator[MemoryStore]:
    client = FakeAsyncRedis(server=FakeServer())
    async with MemoryStore("redis://fakeredis", "app", "v1", client=client) as store:
        yield store


async def test_the_same_topic_passes_every_time(memories: MemoryStore) -> None:
    broker, settings = Broker(), Settings(app_id="app", input_topic="events")
    broker.create("events")
    for _ in range(3):
        await check_input_topic(broker, memories, settings)


async def test_a_topic_recreated_under_the_same_name_is_refused(memories: MemoryStore) -> None:
    broker, settings = Broker(), Settings(app_id="app", input_topic="events")
    broker.create("events")
    await check_input_topic(broker, memories, settings)
    broker.create("events")  # deleted and created again: a new topic id
    for _ in range(2):  # and again on restart: nothing was recorded over the old one
        with pytest.raises(TopicChangedError) as refused:
            await check_input_topic(broker, memories, settings)
        message = str(refused.value)
        assert "input topic 'events' was deleted and recreated" in message
        assert "STREAM_LSTM_APP_ID" in message
        assert "app:*" in message


async def test_another_topic_under_the_same_app_id_is_refused(memories: MemoryStore) -> None:
    broker = Broker()
    broker.create("events")
    broker.create("renamed")
    await check_input_topic(broker, memories, Settings(app_id="app", input_topic="events"))
    with pytest.raises(TopicChangedError, match="is not the topic 'events' they were made from"):
        await check_input_topic(broker, memories, Settings(app_id="app", input_topic="renamed"))


class Processor:
    """Counts the checks a consumer asks for (``retry`` runs them in the worker)."""

    def __init__(self) -> None:
        self.checks = 0
        self.store = SimpleNamespace(forget_cached=lambda: None)  # an assignment drops the cache

    async def retry(self, what: str, attempt: Any) -> None:
        self.checks += what == "check the input topic"


async def test_an_assignment_is_checked_and_a_batch_when_its_offsets_go_back() -> None:
    processor = Processor()
    failures: list[BaseException] = []
    consumer = BatchConsumer(Settings(), processor, None, Metrics(), failed=failures.append)
    tp = TopicPartition("events", 0)
    consumer._consumer = Consumer({tp})  # type: ignore[assignment]

    def batch(*offsets: int) -> dict[TopicPartition, list[Any]]:
        return {tp: [Record("events", 0, offset, b"k", b"{}") for offset in offsets]}

    await _WaitForBatch(consumer).on_partitions_assigned([tp])  # before its first fetch
    assert processor.checks == 1
    await consumer._check_topic(batch(5, 6))  # the first batch: checked at the assignment
    await consumer._check_topic(batch(7, 8))
    assert processor.checks == 1
    await consumer._check_topic(batch(0, 1))  # the log was replaced under the consumer
    assert processor.checks == 2
    await _WaitForBatch(consumer).on_partitions_assigned([])  # nothing assigned: no check
    assert processor.checks == 2
    assert failures == []


class OldBroker(Broker):
    """A broker before Kafka 2.8: aiokafka cannot build Metadata v10 for it."""

    async def send(self, node: int, request: Any) -> SimpleNamespace:
        request.prepare({3: (0, 9)})  # raises NotImplementedError, as aiokafka's send would
        raise AssertionError("unreachable")


@pytest.mark.parametrize("broker", [OldBroker(), Broker()], ids=["before 2.8", "no topic ids"])
async def test_a_broker_that_gives_no_topic_id_leaves_the_check_undone_with_a_warning(
    memories: MemoryStore,
    broker: Broker,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing recorded, nothing refused, one warning: an all-zero id recorded would let every
    recreated topic pass, and stop a healthy worker once the cluster assigns real ids."""
    monkeypatch.setattr(topics, "_unchecked", [])
    settings = Settings(app_id="app", input_topic="events")
    broker.ids["events"] = uuid.UUID(int=0)
    for _ in range(3):
        await check_input_topic(broker, memories, settings)
    assert [r.message for r in caplog.records].count(
        f"the broker gives no topic id for {settings.input_topic!r} (Kafka before 2.8, or a "
        "cluster without topic ids): a topic deleted and recreated under this app id cannot be "
        "told from the one the memories were made from"
    ) == 1
    if isinstance(broker, OldBroker):
        return
    broker.create("events")  # the cluster has topic ids now: the check starts with them
    await check_input_topic(broker, memories, settings)
    broker.create("events")
    with pytest.raises(TopicChangedError, match="deleted and recreated"):
        await check_input_topic(broker, memories, settings)
