"""Predictions go out in whole batches, yet land where a keyed send would put them, in order."""

from __future__ import annotations

import uuid

from aiokafka import AIOKafkaConsumer
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from workers.consumer import KafkaEmitter, partition_for_key
from workers.dev.services import Broker


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=5000))
def test_keys_land_where_kafkas_default_partitioner_puts_them(key: bytes, count: int) -> None:
    partitions = list(range(count))
    assert partition_for_key(key, partitions) == DefaultPartitioner()(key, partitions, partitions)


async def test_a_health_ping_is_one_small_request_not_the_cluster_metadata(
    kafka_broker: Broker,
) -> None:
    emitter = KafkaEmitter(kafka_broker.connection)
    await emitter.start()
    sent: list[str] = []
    client = emitter.producer.client
    send = client.send

    async def recording(node_id: int, request: object, **kwargs: object) -> object:
        sent.append(type(request).__name__)
        return await send(node_id, request, **kwargs)

    client.send = recording
    try:
        for _ in range(20):
            await emitter.ping()
    finally:
        client.send = send
        await emitter.stop()
    assert sent == ["ApiVersionRequest"] * 20


async def test_batches_keep_the_key_partitioning_and_per_key_order(
    kafka_broker: Broker,
) -> None:
    topic = f"emit-{uuid.uuid4().hex[:8]}"
    await kafka_broker.connection.create_topics([topic], 5)
    messages = [(f"entity-{k % 37}".encode(), f"{k:06d}".encode() * 100) for k in range(3000)]
    emitter = KafkaEmitter(kafka_broker.connection)
    await emitter.start()
    try:
        await emitter.emit(topic, messages)
        await emitter.emit(topic, [])
    finally:
        await emitter.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    received = []
    try:
        while len(received) < len(messages):
            for records in (await consumer.getmany(timeout_ms=5000)).values():
                received.extend(records)
    finally:
        await consumer.stop()

    assert len(received) == len(messages)
    partitioner = DefaultPartitioner()
    for record in received:
        assert record.partition == partitioner(record.key, [0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    by_key: dict[bytes, list[bytes]] = {}
    for record in sorted(received, key=lambda r: (r.partition, r.offset)):
        by_key.setdefault(record.key, []).append(record.value)
    for key, values in by_key.items():
        assert values == [value for k, value in messages if k == key]
