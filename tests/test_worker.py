"""The worker end to end: real worker processes, a real Kafka-protocol broker, a real Redis."""

from __future__ import annotations

import base64
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import torch

from tests.stack import (
    INPUT,
    StreamSlice,
    check_against_offline,
    event,
    random_stream,
    save_model,
    settled_memory,
)
from workers.dev.redis_server import RedisServer
from workers.dev.services import Broker
from workers.dev.stack import WorkerProcess

AWKWARD_IDS = [
    "tv/1",
    "channel: nature",
    "{braces}",
    "%7B",
    "ключ",
    "🦊 fox",
    "a b\tc",
    "x" * 256,
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("model") / "model.pt", seed=11)


@pytest.fixture(scope="module")
def stack(
    kafka_broker: Broker,
    redis_server: RedisServer,
    model_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[StreamSlice]:
    """One stack (topics, group, namespace) shared by the tests of one running worker."""
    stack = StreamSlice(kafka_broker, redis_server, model_path, tmp_path_factory.mktemp("stack"))
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def worker(stack: StreamSlice) -> WorkerProcess:
    return stack.start_worker()


async def test_golden_end_to_end(stack: StreamSlice, worker: WorkerProcess) -> None:
    rng = random.Random(1)
    entity_ids = [f"golden-{k}" for k in range(120)] + AWKWARD_IDS
    messages, history = random_stream(rng, entity_ids, per_entity=20)
    assert len(messages) > 2000

    await stack.publish(messages)
    predictions = await stack.predictions(len(messages), entities=history)

    assert len(predictions) == len(messages), "each event predicted once"
    finals = check_against_offline(stack.model, history, predictions)
    for entity_id in [entity_ids[0], *entity_ids[-len(AWKWARD_IDS) :]]:
        step = next(p["step"] for p in reversed(predictions) if p["entity_id"] == entity_id)
        snapshot = settled_memory(worker, entity_id, step)
        h_n, c_n = finals[entity_id]
        assert snapshot["entity_id"] == entity_id
        torch.testing.assert_close(torch.tensor(snapshot["ltm"]), c_n, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(snapshot["stm"]), h_n, atol=1e-4, rtol=0)


async def test_many_events_of_one_entity_in_one_batch_apply_in_order(
    stack: StreamSlice, worker: WorkerProcess
) -> None:
    rng = random.Random(2)
    history = {"burst": [([rng.uniform(-1, 1) for _ in range(INPUT)], False) for _ in range(300)]}
    batches_before = worker.metric("stream_lstm_batches_total")

    await stack.publish([event("burst", x) for x, _ in history["burst"]])
    predictions = await stack.predictions(300, entities=history)

    batches = worker.metric("stream_lstm_batches_total") - batches_before
    assert batches < 300, "some batch held several events of the one entity"
    check_against_offline(stack.model, history, predictions)


BAD_INPUTS: list[tuple[str, bytes | None, bytes]] = [
    ("not_json", b"bad-1", b"{oops"),
    ("not_object", b"bad-2", b"[1, 2, 3]"),
    ("invalid_event", b"bad-3", orjson.dumps({"entity_id": "bad-3", "features": [1.0]})),
    ("invalid_event", b"bad-4", b'{"entity_id": "bad-4", "features": [NaN, 1, 2, 3]}'),
    ("invalid_event", b"bad-5", b'{"entity_id": "bad-5", "features": [1e999, 1, 2, 3]}'),
    ("invalid_event", b"", orjson.dumps({"entity_id": "", "features": [1, 2, 3, 4]})),
    ("invalid_event", b"bad-7", orjson.dumps({"features": [1, 2, 3, 4]})),
    ("key_mismatch", b"other", orjson.dumps({"entity_id": "bad-8", "features": [1, 2, 3, 4]})),
    ("key_mismatch", None, orjson.dumps({"entity_id": "bad-9", "features": [1, 2, 3, 4]})),
    ("oversized", b"bad-10", orjson.dumps({"entity_id": "bad-10", "features": [0.5] * 20_000})),
    ("not_json", b"bad-11", b"\xff\xfe\x00binary"),
]


async def test_bad_input_goes_to_dead_letters_and_good_events_around_it_are_exact(
    stack: StreamSlice, worker: WorkerProcess
) -> None:
    rng = random.Random(3)
    history: dict[str, list[tuple[list[float], bool]]] = {"around-a": [], "around-b": []}
    messages: list[tuple[bytes | None, bytes]] = []
    for reason_key_value in BAD_INPUTS:
        for entity_id in history:
            features = [rng.uniform(-1, 1) for _ in range(INPUT)]
            history[entity_id].append((features, False))
            messages.append(event(entity_id, features))
        messages.append(reason_key_value[1:])  # type: ignore[arg-type]

    await stack.publish(messages)
    letters = await stack.dead_letters(len(BAD_INPUTS))
    predictions = await stack.predictions(2 * len(BAD_INPUTS), entities=history)

    assert len(letters) == len(BAD_INPUTS)
    by_payload = {}
    for letter in letters:
        raw = (
            base64.b64decode(letter["payload"])
            if letter["payload_encoding"] == "base64"
            else letter["payload"].encode()
        )
        by_payload[raw] = letter
    for reason, key, value in BAD_INPUTS:
        letter = by_payload[value]
        assert letter["reason"] == reason, (value[:60], letter["error"])
        assert letter["error"]
        assert letter["key"] == (key.decode() if key is not None else None)
        assert letter["source"]["topic"] == stack.env["STREAM_LSTM_INPUT_TOPIC"]
    check_against_offline(stack.model, history, predictions)


async def test_memory_api_reset_and_missing(stack: StreamSlice, worker: WorkerProcess) -> None:
    await stack.publish([event("api-1", [0.1, 0.2, 0.3, 0.4])])
    await stack.predictions(1, entities={"api-1"})
    settled_memory(worker, "api-1", 1)

    assert worker.http("DELETE", "/entities/api-1/memory")[0] == 200
    status, snapshot = worker.memory("api-1")
    assert status == 200
    assert snapshot["step"] == 0
    assert snapshot["ltm"] == [[0.0] * 8, [0.0] * 8]

    status, body = worker.memory("never seen")
    assert status == 404
    assert "never seen" in body["error"]
    assert worker.http("DELETE", "/entities/never%20seen/memory")[0] == 404


async def test_an_entity_seen_again_starts_from_the_cached_memory(
    stack: StreamSlice, worker: WorkerProcess
) -> None:
    cache, redis = (f'stream_lstm_memory_loads_total{{source="{s}"}}' for s in ("cache", "redis"))
    before = worker.metric(cache), worker.metric(redis)
    await stack.publish([event("cached-1", [0.1, 0.2, 0.3, 0.4])])
    await stack.predictions(1, entities={"cached-1"})
    settled_memory(worker, "cached-1", 1)  # committed: the cache holds it from now on
    await stack.publish([event("cached-1", [0.5, 0.6, 0.7, 0.8])])
    await stack.predictions(2, entities={"cached-1"})
    settled_memory(worker, "cached-1", 2)
    assert worker.metric(cache) - before[0] == 1
    assert worker.metric(redis) - before[1] == 1


async def test_an_api_reset_reaches_the_worker_that_cached_the_memory(
    stack: StreamSlice, worker: WorkerProcess
) -> None:
    await stack.publish([event("cached-2", [0.1, 0.2, 0.3, 0.4])])
    await stack.predictions(1, entities={"cached-2"})
    settled_memory(worker, "cached-2", 1)  # committed, so cached
    assert worker.http("DELETE", "/entities/cached-2/memory")[0] == 200
    await stack.publish([event("cached-2", [0.5, 0.6, 0.7, 0.8])])
    second = (await stack.predictions(2, entities={"cached-2"}))[-1]
    assert second["step"] == 1  # started from the reset's zeros, not the cached memory
    assert settled_memory(worker, "cached-2", 1)["step"] == 1


def test_health_reports_each_dependency(worker: WorkerProcess) -> None:
    status, body = worker.http("GET", "/health")
    assert status == 200
    checks = {
        "model": True,
        "group": True,
        "redis": True,
        "redis_writes": True,
        "progress": True,
        "broker": True,
    }
    assert body == {"ready": True, "checks": checks}


def test_metrics_show_counts_histograms_and_lag(worker: WorkerProcess) -> None:
    status, text = worker.http("GET", "/metrics")
    assert status == 200
    assert worker.metric("stream_lstm_events_total") > 2000
    assert worker.metric("stream_lstm_batches_total") > 0
    assert worker.metric("stream_lstm_dead_letters_total") >= len(BAD_INPUTS)
    for sample in (
        "stream_lstm_batch_size_bucket{",
        "stream_lstm_step_seconds_bucket{",
        'stream_lstm_stage_seconds_bucket{le="+Inf",stage="commit"}',
        'stream_lstm_consumer_lag{partition="',
    ):
        assert sample in text, sample

    samples = dict(line.rsplit(" ", 1) for line in str(text).splitlines() if line[:1] != "#")
    age = "stream_lstm_event_age_seconds"
    batches = float(samples["stream_lstm_batches_total"])
    assert float(samples[f'{age}_count{{at="fetched"}}']) == batches
    assert float(samples[f'{age}_count{{at="emitted"}}']) == batches
    # a batch's predictions are acknowledged after it was fetched: its events are older by then
    assert float(samples[f'{age}_sum{{at="emitted"}}']) > float(
        samples[f'{age}_sum{{at="fetched"}}']
    )


@pytest.mark.slow
async def test_graceful_restart_continues_every_memory(
    kafka_broker: Broker, redis_server: RedisServer, model_path: Path, tmp_path: Path
) -> None:
    stack = StreamSlice(kafka_broker, redis_server, model_path, tmp_path)
    try:
        rng = random.Random(4)
        messages, history = random_stream(rng, [f"restart-{k}" for k in range(40)], per_entity=10)
        half = len(messages) // 2

        first = stack.start_worker()
        await stack.publish(messages[:half])
        await stack.predictions(half)
        assert first.stop(signal.SIGTERM, timeout_s=10) == 0
        assert "stream-lstm stopping after" in first.log_tail()

        await stack.publish(messages[half:])
        stack.start_worker()
        predictions = await stack.predictions(len(messages))
        check_against_offline(stack.model, history, predictions)
    finally:
        stack.stop_all()


@pytest.mark.parametrize("kafka_broker", ["tansu_broker"], ids=["tansu"], indirect=True)
async def test_cli_publishes_tails_and_queries_memory(
    stack: StreamSlice, worker: WorkerProcess, tmp_path: Path
) -> None:
    """On Tansu only (each command is a process: ~28 s a broker): tests/test_formats.py runs
    publish and tail against Apache Kafka, with the binary format."""
    entities = {"cli-1", "cli/2"}
    lines = [event(e, [0.1 * k, 0.2, -0.3, 0.4])[1] for k in range(3) for e in sorted(entities)]
    events_file = tmp_path / "events.jsonl"
    events_file.write_bytes(b"\n".join(lines) + b"\n")

    published = stack.cli("publish", str(events_file))
    assert published.returncode == 0, published.stderr
    assert "published 6 events" in published.stderr
    predictions = await stack.predictions(6, entities=entities)

    tailed = stack.cli("tail", "--from-beginning", "--idle-timeout-s", "2")
    assert tailed.returncode == 0, tailed.stderr
    ours = [p for p in map(orjson.loads, tailed.stdout.splitlines()) if p["entity_id"] in entities]
    assert sorted(ours, key=str) == sorted(predictions, key=str)

    settled_memory(worker, "cli/2", 3)
    got = stack.cli("memory", "get", "cli/2")
    assert got.returncode == 0, got.stderr
    assert orjson.loads(got.stdout) == worker.memory("cli/2")[1]
    assert orjson.loads(got.stdout)["step"] == 3

    assert stack.cli("memory", "reset", "cli/2").returncode == 0
    assert orjson.loads(stack.cli("memory", "get", "cli/2").stdout)["step"] == 0
    missing = stack.cli("memory", "get", "nobody")
    assert missing.returncode == 1
    assert "no memory stored for 'nobody'" in missing.stderr


@pytest.mark.slow
async def test_three_workers_in_one_group_give_golden_output(
    kafka_broker: Broker, redis_server: RedisServer, model_path: Path, tmp_path: Path
) -> None:
    stack = StreamSlice(kafka_broker, redis_server, model_path, tmp_path)
    try:
        rng = random.Random(8)
        messages, history = random_stream(rng, [f"trio-{k}" for k in range(60)], per_entity=12)
        workers = [stack.start_worker() for _ in range(3)]
        await stack.publish(messages)
        predictions = await stack.predictions(len(messages), entities=history)
        check_against_offline(stack.model, history, predictions)
        sources = {p["source"]["partition"] for p in predictions}
        assert len(sources) == 4, "the stream spread over every partition"
        batches = [w.metric("stream_lstm_batches_total") for w in workers]
        assert sum(b > 0 for b in batches) >= 2, f"the group shared the work: {batches}"
    finally:
        stack.stop_all()
