"""The binary formats (msgpack, floats packed as float32): the same events and predictions as
JSON, bad input a dead letter with its reason, and a worker on them end to end."""

from __future__ import annotations

import base64
import random
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import orjson
import pytest
import torch
from fakeredis import FakeAsyncRedis, FakeServer
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field
from torch import nn

from state import MemoryStore
from stream_lstm.exceptions import UsageError
from stream_lstm.memories import Memories
from stream_lstm.model import StreamModel
from stream_lstm.schema import Event, fast_struct
from tests.stack import StreamSlice, check_against_offline, random_stream, save_model
from workers.batch import Record, apply, check
from workers.cli import _packed, _unpacked
from workers.dev.apache_kafka import ApacheKafka
from workers.dev.redis_server import RedisServer
from workers.dev.stack import WorkerProcess
from workers.plugin import Processor

TOPIC = "events"


def packed(entity_id: str, features: list[float], **extra: Any) -> bytes:
    value = {"entity_id": entity_id, "features": np.asarray(features, "<f4").tobytes(), **extra}
    return msgspec.msgpack.encode(value)


def record(value: bytes, key: bytes | None = b"a", offset: int = 0) -> Record:
    return Record(TOPIC, 0, offset, key, value)


floats32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
events = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c/3", "é"]),
        st.lists(floats32, min_size=3, max_size=3),
        st.booleans(),
        st.none() | st.text(max_size=5),
    ),
    max_size=20,
)


@settings(max_examples=60, deadline=None)
@given(events)
def test_a_binary_event_is_checked_as_its_json_twin(
    batch: list[tuple[str, list[float], bool, str | None]],
) -> None:
    as_json, as_msgpack = [], []
    for n, (entity, features, reset, event_id) in enumerate(batch):
        fields = {"reset": reset, "event_id": event_id}
        value = orjson.dumps({"entity_id": entity, "features": features, **fields})
        as_json.append(record(value, entity.encode(), n))
        as_msgpack.append(record(packed(entity, features, **fields), entity.encode(), n))
    want, got = check(as_json, 3, 4096), check(as_msgpack, 3, 4096, "msgpack")
    assert (got.entity_ids, got.ids, got.event_ids) == (want.entity_ids, want.ids, want.event_ids)
    assert got.rows.tolist() == want.rows.tolist()
    assert got.features.tobytes() == want.features.tobytes()  # bit for bit
    assert got.reset.tolist() == want.reset.tolist()
    assert got.dead == want.dead == []


@pytest.mark.parametrize(
    ("value", "key", "reason", "error"),
    [
        (b"\xc1", b"a", "not_msgpack", "not valid msgpack"),
        (b"", b"a", "not_msgpack", "not valid msgpack"),
        (packed("a", [1.0, 2.0, 3.0]) + b"\x00", b"a", "not_msgpack", "not valid msgpack"),
        (msgspec.msgpack.encode([1, 2]), b"a", "not_object", "must be a msgpack map"),
        (b'{"entity_id": "a", "features": [1, 2, 3]}', b"a", "not_msgpack", "looks like JSON"),
        (b"[1, 2]", b"a", "not_msgpack", "looks like JSON"),
        (packed("a", [1.0, 2.0]), b"a", "invalid_event", "features"),
        (
            msgspec.msgpack.encode({"entity_id": "a", "features": [1.0, 2.0, 3.0]}),
            b"a",
            "invalid_event",
            "Expected `bytes`",
        ),
        (packed("a", [1.0, float("nan"), 3.0]), b"a", "invalid_event", "features.1: not a"),
        (packed("a", [float("inf"), 2.0, 3.0]), b"a", "invalid_event", "features.0: not a"),
        (packed("a", [1.0, 2.0, 3.0], rest=True), b"a", "invalid_event", "unknown field `rest`"),
        (packed("", [1.0, 2.0, 3.0]), b"", "invalid_event", "entity_id"),
        (packed("b", [1.0, 2.0, 3.0]), b"a", "key_mismatch", "differs from entity_id"),
        (packed("a", [1.0, 2.0, 3.0], event_id="x" * 200), b"a", "oversized", "at most 128"),
    ],
)
def test_each_bad_binary_record_is_a_dead_letter_with_its_reason(
    value: bytes, key: bytes, reason: str, error: str
) -> None:
    good = record(packed("a", [0.5, 0.5, 0.5]), b"a", 9)
    checked = check([record(value, key), good], 3, 128, "msgpack")
    (dead,) = checked.dead
    assert dead.reason == reason
    assert error in dead.error
    assert [r.offset for r in checked.records] == [9]  # the good one goes on
    letter = orjson.loads(dead.encode())  # the payload is kept, base64 when it is binary
    assert letter["payload_bytes"] == len(value)


def test_a_binary_prediction_is_its_json_twin() -> None:
    torch.manual_seed(3)
    model = StreamModel.from_torch(nn.LSTM(3, 4), nn.Linear(4, 2), labels=["x", "y"])
    records = [record(packed(e, [0.1 * n, 0.2, -0.3]), e.encode(), n) for n, e in enumerate("aba")]
    checked = check(records, 3, 4096, "msgpack")
    zeros = Memories.zeros(checked.ids, model.shape)
    as_json = apply(model, checked, zeros).predictions
    as_msgpack = apply(model, checked, zeros, "msgpack").predictions
    assert [k for k, _ in as_json] == [k for k, _ in as_msgpack]
    for (_, text), (_, binary) in zip(as_json, as_msgpack, strict=True):
        want, got = orjson.loads(text), msgspec.msgpack.decode(binary)
        assert np.frombuffer(got.pop("output"), "<f4").tolist() == want.pop("output")
        assert got == want
        assert orjson.loads(_unpacked(binary)) == orjson.loads(text)  # as tail prints it


def test_publish_packs_an_event_and_leaves_anything_else_as_is() -> None:
    line = orjson.dumps({"entity_id": "a", "features": [0.1, 2.0, -3.5], "reset": True})
    event = msgspec.msgpack.decode(_packed(line))
    assert np.frombuffer(event.pop("features"), "<f4").tolist() == pytest.approx([0.1, 2, -3.5])
    assert event == {"entity_id": "a", "reset": True}
    refused = [  # what the JSON schema refuses is not packed into something the worker takes
        b"{not json",
        b"[1, 2]",
        b'{"entity_id": "a"}',
        b'{"entity_id": "a", "features": ["x"]}',
        b'{"entity_id": "a", "features": [true, false]}',
        b'{"entity_id": "a", "features": ["1.5", "2"]}',
        b'{"entity_id": "a", "features": [3.4028235e38, 2.0]}',
        b'{"entity_id": "a", "features": [null, 2.0]}',
    ]
    for other in refused:
        assert _packed(other) == other


@pytest.mark.parametrize(
    "value",
    [
        msgspec.msgpack.encode({"output": b"", "x": b"\x00"}),
        msgspec.msgpack.encode({1: 2, "output": b""}),
        msgspec.msgpack.encode([1, 2]),
        b"\x91" * 200_000 + b"\xc0",
        b"\xc1",
        b"not\na prediction",
    ],
)
def test_tail_prints_any_value_as_one_line_of_json(value: bytes) -> None:
    printed = _unpacked(value)
    assert b"\n" not in printed
    assert orjson.loads(printed) == {"not_a_prediction": base64.b64encode(value).decode()}


def test_an_unknown_format_is_refused_not_read_as_json() -> None:
    with pytest.raises(ValueError, match="event format 'MsgPack'"):
        check([record(packed("a", [1.0, 2.0, 3.0]))], 3, 4096, "MsgPack")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="no field"):
        fast_struct(Event, packed={"feature"})

    class Bounded(BaseModel):
        xs: list[float] = Field(min_length=1)

    with pytest.raises(TypeError, match="needs lengths"):
        fast_struct(Bounded, packed={"xs"})  # its min_length would be lost


@pytest.mark.slow
async def test_a_worker_on_binary_events_and_predictions_equals_nn_lstm_offline(
    apache_kafka: ApacheKafka, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Published by ``stream-lstm publish`` and read by ``stream-lstm tail``, as a user would,
    the worker started with STREAM_LSTM_EVENT_FORMAT and STREAM_LSTM_PREDICTION_FORMAT msgpack."""
    stack = StreamSlice(apache_kafka, redis_server, save_model(tmp_path / "model.pt", 8), tmp_path)
    messages, history = random_stream(random.Random(2), [f"bin-{k}" for k in range(6)], 6)
    events_file = tmp_path / "events.jsonl"
    events_file.write_bytes(b"\n".join([value for _, value in messages]) + b"\n{broken\n")
    worker: WorkerProcess = stack.start_worker(event_format="msgpack", prediction_format="msgpack")
    try:
        published = stack.cli("publish", str(events_file), "--event-format", "msgpack")
        assert published.returncode == 0, published.stderr
        (letter,) = await stack.dead_letters(1)
        assert letter["reason"] == "not_msgpack"  # the line that was not an event, sent as is
        assert "looks like JSON" in letter["error"]
        tailed = stack.cli(
            "tail", "--from-beginning", "--idle-timeout-s", "3", "--prediction-format", "msgpack"
        )
        assert tailed.returncode == 0, tailed.stderr
    finally:
        worker.stop()
    predictions = [orjson.loads(line) for line in tailed.stdout.splitlines()]
    assert len(predictions) == len(messages)
    check_against_offline(stack.model, history, predictions)


async def test_the_processing_api_takes_and_makes_the_binary_format() -> None:
    torch.manual_seed(4)
    model = StreamModel.from_torch(nn.LSTM(3, 4), nn.Linear(4, 2))
    client = FakeAsyncRedis(server=FakeServer())
    async with MemoryStore("redis://fake", "api", model.version, client=client) as store:
        processor = Processor(
            model, store, input_topic=TOPIC, event_format="msgpack", prediction_format="msgpack"
        )
        processor.assign([(TOPIC, 0)])
        processed = await processor.process(
            [record(packed("a", [0.1, 0.2, 0.3]), b"a", 0), record(b"{}", b"a", 1)]
        )
        (prediction,) = (msgspec.msgpack.decode(value) for _, value in processed.predictions)
        assert (prediction["entity_id"], prediction["step"]) == ("a", 1)
        assert len(np.frombuffer(prediction["output"], "<f4")) == 2
        (letter,) = (orjson.loads(value) for _, value in processed.dead_letters)
        assert letter["reason"] == "not_msgpack"
        with pytest.raises(UsageError, match="event_format 'MsgPack'"):
            Processor(model, store, input_topic=TOPIC, event_format="MsgPack")  # type: ignore[arg-type]
