"""Kafka stage alone: produce and consume cost per message at batch sizes 1 to 4096.

    python bench/kafka.py [--broker tansu|apache] [--seconds 0.5] [--partitions 8]

A default run takes about a minute; ``--broker apache`` about two (a slower round trip per
message makes the per-message baseline at B=4096 alone take half a minute).

Starts its own broker (``--broker``: the embedded Tansu, in memory, or Apache Kafka, one node)
and talks to it with aiokafka, as the worker does. For each batch size B:

- produce B predictions (~250 B, keyed by entity, acks=all), three ways:
  - per message (the baseline): ``send_and_wait`` for each, awaited before the next;
  - send + gather: B ``send()`` calls, then wait for all B deliveries;
  - send_batch: B messages appended to one ``create_batch()`` builder per partition, each
    builder sent with ``send_batch``, then wait for all, as the worker's emitter does:
    partitions picked by its ``partition_for_key()`` (the murmur2 of ``send()``, in C), so the
    keys land where a plain producer would put them, and again with the partitions known beforehand;
- consume events (~400 B) from a pre-filled topic: ``getone()`` per message (the baseline)
  against ``getmany(max_records=B)``; raw records, no decoding.

Figures are microseconds per message; "x" is against the per-message baseline of the same row
(same run). Results: bench/RESULTS.md, section "Kafka stage" (Tansu) or "Kafka stage (Apache
Kafka <version>)".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
import orjson
from aiokafka.partitioner import murmur2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.brokers import add_broker_argument, bench_broker, served
from bench.results import machine
from workers.connection import KafkaConnection
from workers.consumer import partition_for_key

SIZES = (1, 16, 256, 1024, 4096)
CONSUME_MESSAGES = 100_000
"""Events pre-filled for the consume figures; every measurement reads from the beginning."""
BATCH_BYTES = 1 << 20
"""Producer buffer per partition: a whole 4096-message batch fits in one builder."""
ENTITIES = 20_000


def event(n: int, rng: np.random.Generator) -> tuple[bytes, bytes]:
    """An input event as producers send it: (key, ~400 B JSON with 32 features)."""
    entity = f"entity-{n % ENTITIES:06d}"
    value = orjson.dumps(
        {
            "entity_id": entity,
            "features": np.round(rng.standard_normal(32), 4).tolist(),
            "event_id": f"e-{n}",
        }
    )
    return entity.encode(), value


def prediction(n: int, rng: np.random.Generator) -> tuple[bytes, bytes]:
    """A prediction as the worker sends it: (key, ~250 B JSON with 8 probabilities)."""
    entity = f"entity-{n % ENTITIES:06d}"
    output = rng.dirichlet(np.ones(8))
    value = orjson.dumps(
        {
            "entity_id": entity,
            "event_id": f"e-{n}",
            "step": n // ENTITIES + 1,
            "output": np.round(output, 6).tolist(),
            "label": f"label-{int(output.argmax())}",
            "model_version": "257c26e38953a09a",
            "source": {"topic": "stream-lstm-events", "partition": n % 8, "offset": n},
        }
    )
    return entity.encode(), value


async def per_message_us(
    messages: int, operation: Callable[[int], Awaitable[int]], min_s: float
) -> float:
    """Microseconds per message of ``operation(round)`` (it returns messages done), >= min_s."""
    await operation(0)  # warm up: connections, metadata
    done, rounds, start = 0, 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_s or rounds == 0:
        rounds += 1
        done += await operation(rounds)
    assert done >= messages, f"{done} messages done, expected at least {messages}"
    return elapsed / done * 1e6


async def produce(connection: KafkaConnection, topic: str, size: int, min_s: float) -> list[float]:
    """[per message, send + gather, send_batch, send_batch with partitions known], us/message."""
    rng = np.random.default_rng(size)
    messages = [prediction(n, rng) for n in range(size)]
    producer = connection.producer(acks="all", max_batch_size=BATCH_BYTES)
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))

        async def one_by_one(round_: int) -> int:
            for key, value in messages:
                await producer.send_and_wait(topic, value, key=key)
            return size

        async def send_gather(round_: int) -> int:
            pending = [await producer.send(topic, value, key=key) for key, value in messages]
            await asyncio.gather(*pending)
            return size

        async def send_batch(partition_of: Callable[[int, bytes], int]) -> int:
            builders = {}
            for n, (key, value) in enumerate(messages):
                partition = partition_of(n, key)
                if partition not in builders:
                    builders[partition] = producer.create_batch()
                metadata = builders[partition].append(key=key, value=value, timestamp=None)
                assert metadata is not None, "a batch builder overflowed; raise BATCH_BYTES"
            pending = [
                await producer.send_batch(builder, topic, partition=partition)
                for partition, builder in builders.items()
            ]
            await asyncio.gather(*pending)
            return size

        async def send_batch_hashed(round_: int) -> int:
            return await send_batch(lambda n, key: partition_for_key(key, partitions))

        known = [partition_for_key(key, partitions) for key, _ in messages]

        async def send_batch_known(round_: int) -> int:
            return await send_batch(lambda n, key: known[n])

        return [
            await per_message_us(size, one_by_one, min_s),
            await per_message_us(size, send_gather, min_s),
            await per_message_us(size, send_batch_hashed, min_s),
            await per_message_us(size, send_batch_known, min_s),
        ]
    finally:
        await producer.stop()


async def fill(connection: KafkaConnection, topic: str, messages: int) -> int:
    """Publish ``messages`` events; their mean size in bytes."""
    rng = np.random.default_rng(0)
    producer = connection.producer(linger_ms=5)
    await producer.start()
    total = 0
    try:
        pending = []
        for n in range(messages):
            key, value = event(n, rng)
            total += len(value)
            pending.append(await producer.send(topic, value, key=key))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return total // messages


async def consume(connection: KafkaConnection, topic: str, size: int, min_s: float) -> list[float]:
    """[getone per message, getmany(max_records=size)], microseconds per message."""
    figures = []
    for batched in (False, True):
        consumer = connection.consumer(topic, group_id=None, auto_offset_reset="earliest")
        await consumer.start()
        try:
            await consumer.getmany(timeout_ms=10_000, max_records=1)  # first fetch: not timed
            done, start = 1, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < min_s and done < CONSUME_MESSAGES:
                if batched:
                    records = await consumer.getmany(timeout_ms=10_000, max_records=size)
                    done += sum(len(r) for r in records.values())
                else:
                    await consumer.getone()
                    done += 1
            figures.append(elapsed / (done - 1) * 1e6)
        finally:
            await consumer.stop()
    return figures


async def prepare(connection: KafkaConnection, topics: list[str], partitions: int) -> None:
    """Create the topics; return once the broker serves every partition."""
    await connection.create_topics(topics, partitions)
    await served(connection, topics, partitions)


def partitioner_us() -> tuple[float, float]:
    """What partitioning costs per key: aiokafka's murmur2 (pure Python, inside ``send()``), and
    the worker's ``partition_for_key()`` (the same hash in C)."""
    keys = [f"entity-{n:06d}".encode() for n in range(10_000)]
    partitions = list(range(8))
    costs = []
    for hash_ in (murmur2, lambda key: partition_for_key(key, partitions)):
        start = time.perf_counter()
        for key in keys:
            hash_(key)
        costs.append((time.perf_counter() - start) / len(keys) * 1e6)
    return costs[0], costs[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_broker_argument(parser)
    parser.add_argument("--seconds", type=float, default=0.5, help="minimum time per figure")
    parser.add_argument("--partitions", type=int, default=8)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    kind = bench_broker(args.broker)

    rows = [
        "| B | produce per message us | send+gather us | x | send_batch us | x "
        "| send_batch, partitions known us | x | getone us | getmany(B) us | x "
        "| getmany + send_batch msgs/s |",
        "|---:" * 12 + "|",
    ]
    print(f"{'B':>5} {'send_and_wait':>13} {'send+gather':>12} {'x':>6} {'send_batch':>11} "
          f"{'x':>6} {'known part.':>11} {'x':>6} {'getone':>8} {'getmany':>8} {'x':>6} "
          f"{'both msgs/s':>12}  (us/msg)")  # fmt: skip
    with (
        tempfile.TemporaryDirectory(prefix="stream-lstm-kafka-bench-") as tmp,
        kind.running(Path(tmp)) as broker,
    ):
        connection = broker.connection
        events, predictions = "bench-events", "bench-predictions"
        asyncio.run(prepare(connection, [events, predictions], args.partitions))
        event_bytes = asyncio.run(fill(connection, events, CONSUME_MESSAGES))
        prediction_bytes = len(prediction(0, np.random.default_rng(0))[1])
        for size in SIZES:
            one, gather, batch, known = asyncio.run(
                produce(connection, predictions, size, args.seconds)
            )
            getone, getmany = asyncio.run(consume(connection, events, size, args.seconds))
            both = 1e6 / (getmany + batch)
            print(
                f"{size:>5} {one:>13.1f} {gather:>12.1f} {one / gather:>5.1f}x {batch:>11.1f} "
                f"{one / batch:>5.1f}x {known:>11.1f} {one / known:>5.1f}x {getone:>8.1f} "
                f"{getmany:>8.1f} {getone / getmany:>5.1f}x {both:>12,.0f}"
            )
            rows.append(
                f"| {size} | {one:.1f} | {gather:.1f} | {one / gather:.1f}x | {batch:.1f} "
                f"| {one / batch:.1f}x | {known:.1f} | {one / known:.1f}x | {getone:.1f} "
                f"| {getmany:.1f} | {getone / getmany:.1f}x | {both:,.0f} |"
            )
    python_us, c_us = partitioner_us()
    body = (
        f"{kind.command('kafka.py')} ({machine()}; aiokafka {version('aiokafka')}, "
        f"{kind.details}, on loopback; load average {load:.1f} at the start: other processes "
        "share the cores).\n"
        f"Topics of {args.partitions} partitions, keys over {ENTITIES:,} entities. Produce: "
        f"predictions of {prediction_bytes} B, acks=all; per message = `send_and_wait` each, "
        "awaited before the next (the baseline); send+gather = B `send()` calls then one wait "
        "for all (aiokafka partitions each key with murmur2 in pure Python: "
        f"{python_us:.1f} us a key, inside both figures); send_batch = one `create_batch()` "
        "builder per partition, `send_batch` each, one wait for all, as the worker's emitter "
        f"does (the same murmur2 in C, `partition_for_key()`: {c_us:.2f} us a key), and "
        "send_batch again with each message's partition known beforehand. Consume: events of "
        f"{event_bytes} B from a pre-filled topic, raw records (no decoding), `getone()` per "
        "message (the baseline) against `getmany(max_records=B)`. Figures are microseconds per "
        'message; "x" is against the baseline in the same row; the last column is what the '
        "Kafka side alone allows per second with getmany and send_batch.\n\n" + "\n".join(rows)
    )
    kind.write("Kafka stage", body)
    print(
        f"\npartitioner: {python_us:.1f} us a key in aiokafka, {c_us:.2f} in partition_for_key(); "
        f"written to bench/RESULTS.md, section {kind.title('Kafka stage')!r}"
    )


if __name__ == "__main__":
    main()
