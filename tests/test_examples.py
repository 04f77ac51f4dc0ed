"""The examples in examples/ run as a user runs them, against Apache Kafka and Redis: every
prediction equals nn.LSTM offline, every memory in Redis holds each event once, a malformed
event is a dead letter, and SIGTERM stops them cleanly, mid-stream too: started again, they go
on from where they stopped.

On Apache Kafka only: what they add to the worker's tests is how each client library is used
against the real broker (the processing itself runs on both brokers in the worker's tests), and
on Tansu a consumer started again got its partitions back only after ~20 s (a test each)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from aiokafka.admin import NewTopic

from state import MemoryStore
from tests.stack import StreamSlice, check_against_offline, random_stream, save_model
from workers.dev.apache_kafka import ApacheKafka
from workers.dev.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["aiokafka_loop", "confluent_loop"]


class Example:
    """An example's process, configured by environment variables as its docstring says."""

    def __init__(self, name: str, stack: StreamSlice) -> None:
        self.name, self.stack = name, stack
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
        }

    def start(self) -> None:
        with (self.stack.tmp / f"{self.name}.log").open("ab") as log:  # the child keeps its own
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "examples" / f"{self.name}.py")],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self, how: signal.Signals = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(how)
        return self.process.wait(timeout=30)

    def log(self) -> str:
        return (self.stack.tmp / f"{self.name}.log").read_text()


async def create_topics(stack: StreamSlice) -> None:
    admin = stack.connection.admin()
    await admin.start()
    try:
        names = ("INPUT", "OUTPUT", "DEAD_LETTER")
        topics = [stack.env[f"STREAM_LSTM_{name}_TOPIC"] for name in names]
        await admin.create_topics([NewTopic(topic, 3, 1) for topic in topics])
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
    messages, history = random_stream(random.Random(5), [f"{name}-{k}" for k in range(12)], 8)
    bad = (b"broken", b"{not json")
    example = Example(name, stack)
    example.start()
    try:
        half = len(messages) // 2
        await stack.publish([*messages[:half], bad])
        await stack.predictions(half)  # the first half is in: stop it mid-stream ...
        assert example.stop() == 0, example.log()
        example.start()  # ... and start it again: it goes on from the committed offsets
        await stack.publish(messages[half:])
        predictions = await stack.predictions(len(messages))
        (letter,) = await stack.dead_letters(1)
        assert letter["reason"] == "not_json"
        assert example.stop() == 0, example.log()
    finally:
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
