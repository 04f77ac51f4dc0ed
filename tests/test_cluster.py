"""The worker end to end with its memories on a 3-primary Redis Cluster: a real worker process
whose ``STREAM_LSTM_REDIS_URL`` names the cluster, checked against nn.LSTM offline."""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import torch

from state.keys import KeyLayout
from tests.stack import (
    INPUT,
    StreamSlice,
    check_against_offline,
    event,
    save_model,
    settled_memory,
)
from workers.dev.redis_server import RedisClusterServer
from workers.dev.services import Broker


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("model") / "model.pt", seed=12)


@pytest.fixture
def stack(
    kafka_broker: Broker,
    redis_cluster: RedisClusterServer,
    model_path: Path,
    tmp_path: Path,
) -> Iterator[StreamSlice]:
    stack = StreamSlice(kafka_broker, redis_cluster, model_path, tmp_path)
    yield stack
    stack.stop_all()


def longest_run_short_of_all_nodes(nodes: list[int], every: set[int]) -> int:
    """The most consecutive events whose entities miss at least one node."""
    longest, start = 0, 0
    for end in range(len(nodes) + 1):
        while set(nodes[start:end]) >= every:
            start += 1
        longest = max(longest, end - start)
    return longest


# Tansu only (CI time): what it tests is the Redis Cluster; the broker only carries events.
@pytest.mark.parametrize("kafka_broker", ["tansu_broker"], ids=["tansu"], indirect=True)
async def test_golden_end_to_end_on_a_cluster(
    stack: StreamSlice, redis_cluster: RedisClusterServer
) -> None:
    # One partition, so each batch is a run of consecutive offsets (publish order).
    worker = stack.start_worker(partitions="1")
    await stack.publish([event("warm-up", [0.0] * INPUT)])
    await stack.predictions(1, entities={"warm-up"})  # consuming: group joined, slot map read

    rng = random.Random(5)
    entity_ids = [f"cluster-{k}" for k in range(46)] + ["{braces}", "ключ", "🦊 fox", "tv/1"]
    history: dict[str, list[tuple[list[float], bool]]] = {e: [] for e in entity_ids}
    messages, order = [], []
    for n in range(1000):
        entity_id = rng.choice(entity_ids) if n >= len(entity_ids) else entity_ids[n]
        features = [rng.uniform(-2, 2) for _ in range(INPUT)]
        reset = bool(history[entity_id]) and rng.random() < 0.05
        history[entity_id].append((features, reset))
        messages.append(event(entity_id, features, reset=reset))
        order.append(entity_id)
    rng.shuffle(entity_ids)  # a first-seen order that is not the publish order
    layout = KeyLayout(stack.name, stack.model.version)
    node_of = dict(
        zip(entity_ids, redis_cluster.ports_of(layout.memories(entity_ids)), strict=True)
    )
    assert set(node_of.values()) == set(redis_cluster.ports), "the entities live on all 3 nodes"

    # Paused while the whole stream is published, the worker then takes it in big batches.
    batches_before = worker.metric("stream_lstm_batches_total")
    assert worker.process is not None
    worker.process.send_signal(signal.SIGSTOP)
    try:
        await stack.publish(messages)
    finally:
        worker.process.send_signal(signal.SIGCONT)
    predictions = await stack.predictions(len(messages), entities=history)

    assert len(predictions) == len(messages), "each event predicted once"
    finals = check_against_offline(stack.model, history, predictions)
    # B batches cut the 1000 events into B runs, the longest at least 1000 / B long: longer
    # than any run that misses a node, so at least one batch spanned all three nodes.
    batches = worker.metric("stream_lstm_batches_total") - batches_before
    short_of_all = longest_run_short_of_all_nodes(
        [node_of[e] for e in order], set(redis_cluster.ports)
    )
    assert len(messages) / batches > short_of_all, (batches, short_of_all)

    for entity_id in ["cluster-0", "{braces}", "🦊 fox"]:  # the memory API reads the cluster
        snapshot = settled_memory(worker, entity_id, predictions_step(predictions, entity_id))
        h_n, c_n = finals[entity_id]
        torch.testing.assert_close(torch.tensor(snapshot["ltm"]), c_n, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(snapshot["stm"]), h_n, atol=1e-4, rtol=0)
    status, health = worker.http("GET", "/health")
    assert status == 200
    assert health["ready"] is True
    assert all(health["checks"].values()), health

    stored = {}
    for port in redis_cluster.ports:  # the memories really are spread over the nodes
        with redis.Redis(host="127.0.0.1", port=port) as node:
            stored[port] = sum(1 for _ in node.scan_iter(match=layout.memory_pattern, count=1000))
    assert all(stored.values()), stored
    assert sum(stored.values()) == len(entity_ids) + 1  # and the warm-up entity

    # The CLI reads and resets memories on the cluster as it does on one server.
    settled_memory(worker, "ключ", predictions_step(predictions, "ключ"))
    got = stack.cli("memory", "get", "ключ")
    assert got.returncode == 0, got.stderr
    assert orjson.loads(got.stdout) == worker.memory("ключ")[1]
    assert stack.cli("memory", "reset", "ключ").returncode == 0
    assert worker.memory("ключ")[1]["step"] == 0


def predictions_step(predictions: list[dict[str, Any]], entity_id: str) -> int:
    """The step of an entity's last prediction."""
    mine = [p for p in predictions if p["entity_id"] == entity_id]
    step: int = max(mine, key=lambda p: p["source"]["offset"])["step"]
    return step
