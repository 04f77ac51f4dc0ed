"""The examples in examples/ run as a user runs them, against Apache Kafka and Redis: every
prediction equals nn.LSTM offline, every memory in Redis holds each event once, a malformed
event is a dead letter; instances joining and leaving (SIGTERM, exit 0) while events flow move
partitions between them, and each goes on from what the others committed.

On Apache Kafka only: what they add to the worker's tests is how each client library is used
against the real broker (the processing itself runs on both brokers in the worker's tests), and
on Tansu a consumer started again got its partitions back only after ~20 s (a test each)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError

from state import MemoryStore
from tests.stack import StreamSlice, check_against_offline, random_stream, save_model
from workers.dev.apache_kafka import ApacheKafka
from workers.dev.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {
    "aiokafka_loop": [],
    "confluent_loop": [],
    "faust_app": ["worker", "--without-web", "-l", "info"],
}
"""Each example and the arguments it runs with."""


class Example:
    """An example's process, configured by environment variables as its docstring says."""

    def __init__(self, name: str, stack: StreamSlice, instance: int = 0) -> None:
        self.name, self.stack, self.log_path = name, stack, stack.tmp / f"{name}-{instance}.log"
        self.process: subprocess.Popen[bytes] | None = None
        env = stack.env
        self.env = {
            **os.environ,
            "KAFKA": stack.connection.bootstrap_servers,
            "REDIS": stack.redis.url,
            "MODEL": str(stack.model_path),
            "GROUP": stack.name,
            "EVENTS": env["STREAM_LSTM_INPUT_TOPIC"],
            "PREDICTIONS": env["STREAM_LSTM_OUTPUT_TOPIC"],
            "DEAD_LETTERS": env["STREAM_LSTM_DEAD_LETTER_TOPIC"],
            "DATADIR": str(stack.tmp / f"faust-data-{instance}"),
        }

    def start(self) -> None:
        with self.log_path.open("ab") as log:  # the child keeps its own
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "examples" / f"{self.name}.py"), *EXAMPLES[self.name]],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self, how: signal.Signals = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(how)
        return self.process.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def create_topics(stack: StreamSlice) -> None:
    admin = stack.connection.admin()
    await admin.start()
    try:
        names = ("INPUT", "OUTPUT", "DEAD_LETTER")
        topics = [stack.env[f"STREAM_LSTM_{name}_TOPIC"] for name in names]
        await admin.create_topics([NewTopic(topic, 3, 1) for topic in topics])
    finally:
        await admin.close()


async def publish_live(stack: StreamSlice, messages: list[tuple[bytes, bytes]]) -> None:
    """The events over about 10 s: a stream flowing while instances join and leave (a rebalance
    with records in flight is where a consumer loop deadlocks or drops events)."""
    for at in range(0, len(messages), 3):
        await stack.publish(messages[at : at + 3])
        await asyncio.sleep(0.2)


async def group_settles(stack: StreamSlice, members: int, timeout_s: float = 60.0) -> None:
    """Wait until the examples' consumer group is stable with this many members."""
    admin = stack.connection.admin()
    await admin.start()
    deadline = time.monotonic() + timeout_s
    try:
        state, joined = "unknown", []
        while not (state == "Stable" and len(joined) == members):
            assert time.monotonic() < deadline, f"the group is {state} with {len(joined)} members"
            await asyncio.sleep(0.2)
            try:
                (response,) = await admin.describe_consumer_groups([stack.name])
            except KafkaError:  # no coordinator yet for a group that has not joined
                continue
            _, _, state, _, _, joined, *_ = response.groups[0]
    finally:
        await admin.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
async def test_an_example_loop_serves_predictions_equal_to_nn_lstm_offline(
    name: str, apache_kafka: ApacheKafka, redis_server: RedisServer, tmp_path: Path
) -> None:
    model_path = save_model(tmp_path / "model.pt", 21)
    stack = StreamSlice(apache_kafka, redis_server, model_path, tmp_path)
    await create_topics(stack)
    messages, history = random_stream(random.Random(5), [f"{name}-{k}" for k in range(20)], 8)
    bad = (b"broken", b"{not json")
    # Three instances of the aiokafka loop (the rebalance where its first version deadlocked
    # needed a third joining a live stream); two of the others, whose client calls its
    # rebalance callbacks between batches (confluent-kafka) or has Faust drive them.
    instances = [Example(name, stack, k) for k in range(3 if name == "aiokafka_loop" else 2)]
    try:
        for joined, example in enumerate(instances, start=1):
            example.start()  # instances join while events flow: rebalances, each going on
            if joined == 1:  # from what the others committed
                await stack.publish([bad])
                stream = asyncio.ensure_future(publish_live(stack, messages))
            await group_settles(stack, joined)
        first, *others = instances
        assert first.stop() == 0, first.log()  # and one leaves
        await group_settles(stack, len(others))
        await stream
        predictions = await stack.predictions(len(messages))
        (letter,) = await stack.dead_letters(1)
        assert letter["reason"] == "not_json"
        for example in others:
            assert example.stop() == 0, example.log()
    finally:
        for example in instances:
            if example.process is not None and example.process.poll() is None:
                example.stop(signal.SIGKILL)
    model = stack.model
    finals = check_against_offline(model, history, predictions)
    async with MemoryStore(redis_server.url, stack.name, model.version) as store:
        for entity_id, (h_n, c_n) in finals.items():
            stored = await store.get(entity_id)
            assert stored is not None
            ltm, stm = (torch.from_numpy(state[0]) for state in stored.memories.states)
            torch.testing.assert_close(stm, h_n, atol=1e-4, rtol=0)
            torch.testing.assert_close(ltm, c_n, atol=1e-4, rtol=0)
            since_reset = 0
            for _, reset in history[entity_id]:
                since_reset = 1 if reset else since_reset + 1
            assert int(stored.memories.step[0]) == since_reset
