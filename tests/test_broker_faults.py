"""Faults of the broker itself: a three-broker Apache Kafka cluster (KRaft, each node broker and
controller), the worker's topics created with 3 replicas and ``min.insync.replicas=2``.

``kill -9`` of the broker that leads the input partitions while events stream in, and a restart
of it a while later: the worker keeps going on the other two, no event is lost, none is applied
twice, and every prediction and final memory equals ``nn.LSTM`` run offline.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_apache_kafka
from tests.stack import StreamSlice, check_against_offline, partitions, random_stream, save_model
from tests.test_reliability import ENTITIES, Feed, Tail, assert_memories, eventually, start_worker
from workers.dev.apache_kafka import ApacheKafka
from workers.dev.redis_server import RedisServer


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafka]:
    require_apache_kafka()
    with ApacheKafka(3, workdir=tmp_path_factory.mktemp("cluster")) as kafka:
        yield kafka


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("model") / "model.pt", seed=13)


async def all_in_sync(stack: StreamSlice, topic: str) -> bool:
    return all(len(p["isr"]) == 3 for p in await partitions(stack.connection, topic))


@pytest.mark.slow
@pytest.mark.timeout(300)  # three JVMs, a stream, a restart and the replicas catching up
async def test_kill_9_of_a_broker_mid_stream_loses_nothing_and_applies_nothing_twice(
    cluster: ApacheKafka, redis_server: RedisServer, model_path: Path, tmp_path: Path
) -> None:
    stack = StreamSlice(cluster, redis_server, model_path, tmp_path)
    try:
        await kill_a_broker_mid_stream(stack, cluster)
    finally:
        stack.stop_all()


async def kill_a_broker_mid_stream(stack: StreamSlice, cluster: ApacheKafka) -> None:
    messages, history = random_stream(
        random.Random(81), [f"broker-{k}" for k in range(ENTITIES)], 30
    )
    total = len(messages)
    worker = await start_worker(stack, max_batch="32")  # it creates the topics: 3 replicas
    topic = stack.env["STREAM_LSTM_INPUT_TOPIC"]
    for name in (topic, stack.env["STREAM_LSTM_OUTPUT_TOPIC"]):
        assert all(len(p["replicas"]) == 3 for p in await partitions(stack.connection, name)), name
    leaders = Counter(p["leader"] for p in await partitions(stack.connection, topic))
    victim = leaders.most_common(1)[0][0]

    async with Feed(stack) as feed, Tail(stack, stack.env["STREAM_LSTM_OUTPUT_TOPIC"]) as tail:
        publishing = asyncio.create_task(feed.paced(messages, chunk=total // 50, pause_s=0.2))
        await tail.wait_for(total // 4)
        await asyncio.to_thread(cluster.kill, victim)  # SIGKILL, mid-stream
        seen = len(tail.sources())
        assert seen < total, "the kill must land mid-stream"
        # Two of three brokers are in sync: acks=all sends and the worker go on without it.
        await tail.wait_for(seen + total // 4)
        await asyncio.to_thread(cluster.restart, victim)
        await publishing
        await tail.wait_for(total)
        predictions = list(tail.messages)
        await eventually(lambda: all_in_sync(stack, topic), "the restarted broker in sync", 60)

    assert worker.process is not None
    assert worker.process.poll() is None, f"the worker stopped:\n{worker.log_tail()}"
    finals = check_against_offline(stack.model, history, predictions)
    assert_memories(worker, history, finals)
