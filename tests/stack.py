"""A test's slice of the real stack: its own topics, consumer group and namespace on the session's
broker and Redis, a model file, and worker processes started as a user would start them."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import torch
from pydantic import SecretStr
from torch import nn

from stream_lstm.model import StreamModel
from tests.offline import offline
from workers.connection import SECURITY_FIELDS, KafkaConnection
from workers.dev.redis_server import RedisClusterServer, RedisServer
from workers.dev.services import Broker
from workers.dev.stack import WorkerProcess

INPUT = 4
"""Features per event of the e2e tests' models."""
SESSION_TIMEOUT_S = 2.0  # short, so a group rebalances quickly after a worker is killed
WORKER_DEVICE = os.environ.get("STREAM_LSTM_TEST_DEVICE", "cpu")
"""Where the tests' workers step: cpu, or cuda to run the end-to-end tests on a GPU machine."""


@dataclass
class StreamSlice:
    """Topics, group, namespace and model of one test, on the session's broker and Redis."""

    broker: Broker
    redis: RedisServer | RedisClusterServer
    model_path: Path
    tmp: Path
    kafka: KafkaConnection | None = None
    """How to reach the broker (a secured listener); None: the broker's PLAINTEXT listener."""
    name: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def connection(self) -> KafkaConnection:
        """How this slice's workers, producers and readers reach the broker."""
        return self.kafka or self.broker.connection

    @property
    def model(self) -> StreamModel:
        return StreamModel.load(self.model_path, device="cpu")

    @property
    def env(self) -> dict[str, str]:
        return {
            **connection_env(self.connection),
            "STREAM_LSTM_REDIS_URL": self.redis.url,
            "STREAM_LSTM_MODEL": str(self.model_path),
            "STREAM_LSTM_APP_ID": self.name,
            "STREAM_LSTM_INPUT_TOPIC": f"{self.name}-events",
            "STREAM_LSTM_OUTPUT_TOPIC": f"{self.name}-predictions",
            "STREAM_LSTM_DEAD_LETTER_TOPIC": f"{self.name}-dead",
            "STREAM_LSTM_PARTITIONS": "4",
            "STREAM_LSTM_SESSION_TIMEOUT_S": str(SESSION_TIMEOUT_S),
            "STREAM_LSTM_DEVICE": WORKER_DEVICE,
        }

    def start_worker(self, **settings: str) -> WorkerProcess:
        """Start a worker and wait until its health endpoint says ready."""
        env = {**self.env, **{f"STREAM_LSTM_{k.upper()}": v for k, v in settings.items()}}
        worker = WorkerProcess(env, self.tmp / f"worker-{len(self.workers)}.log").start()
        self.workers.append(worker)
        worker.wait_ready()
        return worker

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The stream-lstm command, configured by this slice's environment, as a user runs it."""
        return subprocess.run(
            [sys.executable, "-m", "workers.cli", *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop(signal.SIGKILL)

    async def publish(self, messages: Sequence[tuple[bytes | None, bytes]]) -> None:
        """Send (key, value) pairs to the input topic and wait until all are acknowledged."""
        producer = self.connection.producer(acks="all")
        await producer.start()
        try:
            topic = self.env["STREAM_LSTM_INPUT_TOPIC"]
            pending = [await producer.send(topic, value, key=key) for key, value in messages]
            await asyncio.gather(*pending)
        finally:
            await producer.stop()

    async def read(
        self,
        topic: str,
        count: int,
        entities: Collection[str] | None = None,
        timeout_s: float = 60.0,
    ) -> list[dict[str, Any]]:
        """At least ``count`` messages of a topic from its start (only those about ``entities``
        when given), parsed; fails on timeout."""
        consumer = self.connection.consumer(
            topic,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        try:
            while len(found) < count and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    messages = (orjson.loads(r.value) for r in records)
                    found.extend(
                        m for m in messages if entities is None or m.get("entity_id") in entities
                    )
        finally:
            await consumer.stop()
        assert len(found) >= count, f"{len(found)} of {count} messages on {topic} in {timeout_s}s"
        return found

    async def predictions(
        self, count: int, entities: Collection[str] | None = None
    ) -> list[dict[str, Any]]:
        return await self.read(self.env["STREAM_LSTM_OUTPUT_TOPIC"], count, entities)

    async def dead_letters(self, count: int) -> list[dict[str, Any]]:
        return await self.read(self.env["STREAM_LSTM_DEAD_LETTER_TOPIC"], count)


async def partitions(connection: KafkaConnection, topic: str) -> list[dict[str, Any]]:
    """The topic's partitions as the cluster describes them: leader, replicas, in-sync ones."""
    admin = connection.admin()
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    assert described["error_code"] == 0, described
    found: list[dict[str, Any]] = described["partitions"]
    return found


def connection_env(connection: KafkaConnection) -> dict[str, str]:
    """The worker settings (environment variables) that make this connection."""
    env = {"STREAM_LSTM_BROKER": "kafka://" + connection.bootstrap_servers.replace(",", ";")}
    for name in SECURITY_FIELDS:
        value = getattr(connection, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = str(value).lower()
        if value is not None:
            env[f"STREAM_LSTM_KAFKA_{name.upper()}"] = str(value)
    return env


def settled_memory(
    worker: WorkerProcess, entity_id: str, step: int, timeout_s: float = 10.0
) -> dict[str, Any]:
    """The entity's memory through the worker's API once it holds ``step`` events.

    A batch's predictions are acknowledged before its memories are committed (so memories never
    run ahead of predictions), so a reader that has seen a prediction may still read the
    memory from before it for a moment.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        status, snapshot = worker.memory(entity_id)
        if status == 200 and snapshot["step"] == step:
            return snapshot
        assert time.monotonic() < deadline, f"{entity_id!r} never reached step {step}: {snapshot}"
        time.sleep(0.05)


def event(entity_id: str, features: list[float], **extra: Any) -> tuple[bytes, bytes]:
    """A well-formed event, keyed by its entity id."""
    value = orjson.dumps({"entity_id": entity_id, "features": features, **extra})
    return entity_id.encode(), value


def check_against_offline(
    model: StreamModel,
    history: dict[str, list[tuple[list[float], bool]]],
    predictions: list[dict[str, Any]],
    tolerance: float = 1e-4,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every entity's predictions, in order, equal nn.LSTM on its history; returns final (h, c).

    A prediction seen twice (a replay) must be the first one again: every field equal, the
    outputs to float32 rounding (a replay may run in a batch of another shape, and the BLAS
    kernels round a row differently with the shape: 1 ulp was seen).
    """
    by_source: dict[tuple[int, int], dict[str, Any]] = {}
    for prediction in predictions:
        source = (prediction["source"]["partition"], prediction["source"]["offset"])
        first = by_source.setdefault(source, prediction)
        same = {**first, "output": None} == {**prediction, "output": None}
        assert same, f"a replayed prediction differs: {first} vs {prediction}"
        torch.testing.assert_close(
            torch.tensor(prediction["output"]), torch.tensor(first["output"]), atol=1e-6, rtol=0
        )
    per_entity: dict[str, list[dict[str, Any]]] = {}
    for prediction in sorted(by_source.values(), key=lambda p: p["source"]["offset"]):
        per_entity.setdefault(prediction["entity_id"], []).append(prediction)
    assert sorted(per_entity) == sorted(history), "every entity, and only those, predicted"
    finals = {}
    for entity_id, events in history.items():
        got = per_entity[entity_id]
        assert len(got) == len(events), (
            f"{entity_id!r}: {len(got)} predictions, {len(events)} events"
        )
        tensors = [(torch.tensor(x, dtype=torch.float32), reset) for x, reset in events]
        want, h_n, c_n = offline(model, tensors)
        torch.testing.assert_close(
            torch.tensor([p["output"] for p in got]), want, atol=tolerance, rtol=0
        )
        since_reset, steps = 0, []
        for _, reset in events:
            since_reset = 1 if reset else since_reset + 1
            steps.append(since_reset)
        assert [p["step"] for p in got] == steps, entity_id
        assert all(p["model_version"] == model.version for p in got)
        finals[entity_id] = (h_n, c_n)
    return finals


History = dict[str, list[tuple[list[float], bool]]]
"""Each entity's events in order: (features, reset)."""


def save_model(path: Path, seed: int, hidden: int = 8, layers: int = 2) -> Path:
    """A small random model with a 3-label head, saved where a worker can load it."""
    torch.manual_seed(seed)
    model = StreamModel.from_torch(
        nn.LSTM(INPUT, hidden, layers), nn.Linear(hidden, 3), labels=["cat", "dog", "wolf"]
    )
    model.save(path)
    return path


def random_stream(
    rng: random.Random, entity_ids: Sequence[str], per_entity: int
) -> tuple[list[tuple[bytes, bytes]], History]:
    """Interleaved events of the entities, each entity's in its own order, a few with reset."""
    history: History = {e: [] for e in entity_ids}
    for entity_id in entity_ids:
        for k in range(rng.randint(per_entity // 2, 3 * per_entity // 2)):
            features = [rng.uniform(-2, 2) for _ in range(INPUT)]
            history[entity_id].append((features, k > 0 and rng.random() < 0.05))
    queues = {e: list(h) for e, h in history.items()}
    messages = []
    while queues:
        entity_id = rng.choice(sorted(queues))
        features, reset = queues[entity_id].pop(0)
        messages.append(event(entity_id, features, reset=reset))
        if not queues[entity_id]:
            del queues[entity_id]
    return messages, history
