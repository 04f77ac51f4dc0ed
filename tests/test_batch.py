"""A micro-batch's pure steps: dead letters with reasons, replays dropped, fences per entity."""

from __future__ import annotations

import base64
import json
import math

import msgspec
import numpy as np
import orjson
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn

from state.codec import decode_many
from stream_lstm.engine import StepResult
from stream_lstm.memories import Memories
from stream_lstm.model import StreamModel
from stream_lstm.schema import Event, Prediction
from workers.batch import (
    DEAD_ERROR_MAX,
    DEAD_KEY_MAX,
    DEAD_LETTER_MAX_BYTES,
    DEAD_PAYLOAD_MAX,
    Checked,
    DeadLetter,
    EmitFrom,
    Record,
    _fast_decoder,
    _finite,
    apply,
    check,
)

TOPIC = "events"


def record(
    value: bytes | None, key: bytes | None = b"a", offset: int = 0, partition: int = 0
) -> Record:
    return Record(TOPIC, partition, offset, key, value)


def event(entity: str = "a", features: list[float] | None = None, **extra: object) -> bytes:
    return orjson.dumps({"entity_id": entity, "features": features or [0.5, -1.0], **extra})


@pytest.fixture
def model() -> StreamModel:
    torch.manual_seed(0)
    return StreamModel.from_torch(nn.LSTM(2, 3), nn.Linear(3, 2), labels=["dog", "wolf"])


def empty_memory(checked: Checked, model: StreamModel) -> Memories:
    ids = checked.ids
    return decode_many(ids, [None] * len(ids), model.shape)


@pytest.mark.parametrize(
    ("value", "key", "reason", "error"),
    [
        (b"{not json", b"a", "not_json", "not valid JSON"),
        (b"[1, 2]", b"a", "not_object", "JSON object"),
        (b'"text"', b"a", "not_object", "JSON object"),
        (b"", b"a", "not_json", "not valid JSON"),
        (None, b"a", "not_json", "not valid JSON"),
        (event(features=[1.0]), b"a", "invalid_event", "1 features, the model takes 2"),
        (b'{"entity_id": "a", "features": [NaN, 1]}', b"a", "invalid_event", "features.0"),
        (b'{"entity_id": "a", "features": [1e999, 1]}', b"a", "invalid_event", "features.0"),
        (b'{"entity_id": "a", "features": [1, 1e300]}', b"a", "invalid_event", "features.1"),
        (b'{"features": [1, 2]}', None, "invalid_event", "entity_id: Field required"),
        (event(entity=""), b"", "invalid_event", "entity_id"),
        (event(entity="b"), b"a", "key_mismatch", "differs from entity_id"),
        (event(), None, "key_mismatch", "no key"),
        (event(), b"\xff\xfe", "key_mismatch", "not UTF-8"),
        (event(extra="x" * 200), b"a", "oversized", "at most 128"),
    ],
)
def test_each_bad_record_is_a_dead_letter_with_its_reason(
    value: bytes | None, key: bytes | None, reason: str, error: str
) -> None:
    checked = check([record(value, key)], input_size=2, max_event_bytes=128)
    assert checked.entity_ids == []
    (dead,) = checked.dead
    assert dead.reason == reason
    assert error in dead.error


def test_dead_letters_carry_the_original_bytes_and_source() -> None:
    raw = b"\xff\x00 not text"
    (dead,) = check([record(raw, b"k", offset=7, partition=3)], 2, 1024).dead
    letter = orjson.loads(dead.encode())
    assert letter["reason"] == "not_json"
    assert letter["payload_encoding"] == "base64"
    assert base64.b64decode(letter["payload"]) == raw
    assert (letter["key"], letter["key_encoding"]) == ("k", "utf-8")
    assert letter["source"] == {"topic": TOPIC, "partition": 3, "offset": 7}
    assert letter["payload_truncated"] is False


def test_a_huge_payload_is_truncated_in_its_dead_letter_but_sized() -> None:
    raw = b"x" * (DEAD_PAYLOAD_MAX + 10)
    (dead,) = check([record(raw)], 2, 1024).dead
    letter = orjson.loads(dead.encode())
    assert letter["payload_bytes"] == DEAD_PAYLOAD_MAX + 10
    assert letter["payload_truncated"] is True
    assert len(letter["payload"]) == DEAD_PAYLOAD_MAX


def payload_of(letter: dict[str, object]) -> bytes:
    """The bytes a dead letter kept of its payload."""
    payload = str(letter["payload"])
    if letter["payload_encoding"] == "base64":
        return base64.b64decode(payload)
    return payload.encode()


@pytest.mark.parametrize(
    "raw",
    [
        b"\x01" * 300_000,  # control characters: JSON escapes each as \u0001, six-fold
        ("\x02" * 50_000 + "\u00e9" * 100_000 + '"\\' * 50_000).encode(),  # escapes, 2-byte UTF-8
        bytes(range(256)) * 2_000,  # not UTF-8: base64
    ],
    ids=["control", "mixed-utf8", "binary"],
)
@pytest.mark.parametrize("max_event_bytes", [1024, 10_000_000], ids=["oversized", "accepted"])
def test_a_dead_letter_fits_a_kafka_message_whatever_the_payload(
    raw: bytes, max_event_bytes: int
) -> None:
    """A letter over the broker's message limit (1 MB on Apache Kafka) is refused, and the
    stream would stall on it: cut after encoding, whatever escaping makes of the payload."""
    key = b"\x03" * 600_000  # a key is bytes too, of any size the producer allowed
    (dead,) = check([record(raw, key=key)], 2, max_event_bytes).dead
    encoded = dead.encode()
    assert len(encoded) <= DEAD_LETTER_MAX_BYTES
    assert dead.key == key[:DEAD_KEY_MAX], "the letter's Kafka key counts toward the limit too"
    letter = orjson.loads(encoded)
    assert letter["payload_truncated"] is True
    assert letter["payload_bytes"] == len(raw)
    kept = payload_of(letter)
    assert 0 < len(kept) < len(raw)
    assert raw.startswith(kept), "the payload is cut, never altered"
    assert letter["key_truncated"] is True
    assert key.startswith(str(letter["key"]).encode())
    assert len(str(letter["error"])) <= DEAD_ERROR_MAX


def test_a_small_letter_is_whole() -> None:
    raw = "\x01 caf\u00e9".encode()
    (dead,) = check([record(raw, key=b"k")], 2, 1024).dead
    letter = orjson.loads(dead.encode())
    assert payload_of(letter) == raw
    assert letter["payload_truncated"] is False
    assert letter["key_truncated"] is False


def test_good_events_around_bad_ones_go_on_in_order() -> None:
    records = [record(event(), offset=0), record(b"junk", offset=1), record(event(), offset=2)]
    checked = check(records, 2, 1024)
    assert [r.offset for r in checked.records] == [0, 2]
    assert [d.record.offset for d in checked.dead] == [1]


def test_apply_predicts_each_event_and_fences_each_entity(model: StreamModel) -> None:
    records = [
        record(event("a", [1, 0], event_id="e0"), b"a", offset=10),
        record(event("b", [0, 1]), b"b", offset=11),
        record(event("a", [1, 1]), b"a", offset=12),
    ]
    checked = check(records, 2, 1024)
    applied = apply(model, checked, empty_memory(checked, model))

    predictions = [Prediction.model_validate_json(value) for _, value in applied.predictions]
    for _, value in applied.predictions:  # the documented wire format, field for field
        assert list(orjson.loads(value)) == list(Prediction.model_fields)
        assert list(orjson.loads(value)["source"]) == ["topic", "partition", "offset"]
    assert [key for key, _ in applied.predictions] == [b"a", b"b", b"a"]
    assert [(p.entity_id, p.step, p.source.offset) for p in predictions] == [
        ("a", 1, 10),
        ("b", 1, 11),
        ("a", 2, 12),
    ]
    assert predictions[0].event_id == "e0"
    assert all(p.model_version == model.version for p in predictions)
    assert all(p.label == ["dog", "wolf"][int(np.argmax(p.output))] for p in predictions)
    assert list(applied.updates.entity_ids) == ["a", "b"]
    assert applied.updates.fence_offset.tolist() == [12, 11]
    assert applied.updates.step.tolist() == [2, 1]
    assert applied.replayed == 0


def test_a_take_over_sends_the_predictions_of_events_from_its_offsets_only(
    model: StreamModel,
) -> None:
    records = [record(event("a"), partition=p, offset=o) for p in (0, 1, 2) for o in (4, 5, 6)]
    checked = check(records, 2, 1024)

    def sent(emit_from: EmitFrom) -> list[tuple[int, int]]:
        applied = apply(model, checked, empty_memory(checked, model), emit_from=emit_from)
        sources = [orjson.loads(v)["source"] for _, v in applied.predictions]
        assert applied.updates.step.tolist() == [9]  # every event applied all the same
        return [(s["partition"], s["offset"]) for s in sources]

    assert sent(EmitFrom()) == []  # warming
    assert sent(EmitFrom({0: 5, 1: 0})) == [(0, 5), (0, 6), (1, 4), (1, 5), (1, 6)]
    everything = [(r.partition, r.offset) for r in records]
    assert sent(EmitFrom({0: 5, 1: 0}, others=True)) == everything[1:]
    shadowed = apply(model, checked, empty_memory(checked, model), emit_from=EmitFrom({1: 5}))
    assert shadowed.shadowed == []  # none without a shadow
    shadowed = apply(
        model, checked, empty_memory(checked, model), emit_from=EmitFrom({1: 5}), shadow=True
    )
    held = [
        (orjson.loads(v)["source"]["partition"], orjson.loads(v)["source"]["offset"])
        for _, v in shadowed.shadowed
    ]
    assert held == [r for r in everything if r not in ((1, 5), (1, 6))]
    letter = DeadLetter(record(b"{", partition=0, offset=4), "not_json", "")
    assert not EmitFrom({0: 5}).sends(letter.record)
    assert EmitFrom({0: 4}).sends(letter.record)


def test_apply_drops_events_whose_fence_is_stored(model: StreamModel) -> None:
    records = [record(event("a"), offset=o) for o in (5, 6, 7)]
    checked = check(records, 2, 1024)
    memory = empty_memory(checked, model)
    memory.fence_partition[0], memory.fence_offset[0] = 0, 6
    memory.step[0] = 6

    applied = apply(model, checked, memory)

    assert applied.replayed == 2
    assert [orjson.loads(v)["source"]["offset"] for _, v in applied.predictions] == [7]
    assert [orjson.loads(v)["step"] for _, v in applied.predictions] == [7]
    assert applied.updates.fence_offset.tolist() == [7]


def test_a_batch_overlaid_with_the_one_in_flight_equals_one_after_its_commit(
    model: StreamModel,
) -> None:
    first = check([record(event("a", [1, 0]), offset=1), record(event("b"), b"b", offset=2)], 2, 99)
    second = check(
        [record(event("a", [0, 1]), offset=3), record(event("c"), b"c", offset=4)], 2, 99
    )
    in_flight = apply(model, first, empty_memory(first, model)).updates
    committed = empty_memory(second, model)  # as Redis holds it once the first batch committed
    committed.states[0][0], committed.states[1][0] = in_flight.states[0][0], in_flight.states[1][0]
    committed.step[0], committed.fence_partition[0], committed.fence_offset[0] = 1, 0, 1
    assert committed.found.tolist() == [True, False]

    not_yet = empty_memory(second, model)  # as Redis holds it while the first is in flight
    not_yet.overlay(in_flight)

    after, overlaid = apply(model, second, committed), apply(model, second, not_yet)
    assert overlaid.predictions == after.predictions
    assert [orjson.loads(v)["step"] for _, v in overlaid.predictions] == [2, 1]
    for state, want in zip(overlaid.updates.states, after.updates.states, strict=True):
        np.testing.assert_array_equal(state, want)
    for field in ("step", "fence_offset"):
        np.testing.assert_array_equal(
            getattr(overlaid.updates, field), getattr(after.updates, field)
        )


def test_a_batch_starts_from_every_batch_in_flight_newest_last(model: StreamModel) -> None:
    batches = [
        [record(event("a", [1, 0]), offset=1), record(event("b"), b"b", offset=2)],
        [record(event("a", [0, 1]), offset=3), record(event("c"), b"c", offset=4)],
        [
            record(event("a", [1, 1]), offset=5),
            record(event("b", [0, 1]), b"b", offset=6),
            record(event("c", [1, 0]), b"c", offset=7),
        ],
    ]
    in_flight: list[Memories] = []  # none of them committed yet: Redis holds nothing
    for records in batches:
        checked = check(records, 2, 99)
        memory = empty_memory(checked, model)
        for updates in in_flight:
            memory.overlay(updates)
        applied = apply(model, checked, memory)
        in_flight.append(applied.updates)

    whole = check([r for records in batches for r in records], 2, 99)  # one batch, in order
    expected = apply(model, whole, empty_memory(whole, model)).predictions[-3:]
    assert [orjson.loads(v)["step"] for _, v in applied.predictions] == [3, 2, 2]
    for (_, got), (_, want) in zip(applied.predictions, expected, strict=True):
        np.testing.assert_allclose(
            orjson.loads(got)["output"], orjson.loads(want)["output"], rtol=0, atol=1e-6
        )


def test_a_fully_replayed_entity_is_not_committed(model: StreamModel) -> None:
    checked = check([record(event("a"), offset=3)], 2, 1024)
    memory = empty_memory(checked, model)
    memory.fence_partition[0], memory.fence_offset[0] = 0, 3
    applied = apply(model, checked, memory)
    assert applied.predictions == []
    assert list(applied.updates.entity_ids) == []


def test_an_event_from_another_partition_is_not_a_replay(model: StreamModel) -> None:
    checked = check([record(event("a"), offset=3, partition=1)], 2, 1024)
    memory = empty_memory(checked, model)
    memory.fence_partition[0], memory.fence_offset[0] = 0, 9
    assert apply(model, checked, memory).replayed == 0


ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
)


def fast_event(value: bytes, input_size: int) -> tuple[object, ...] | None:
    """The fast decoder's fields, or None when it refuses the value."""
    try:
        event = _fast_decoder(input_size)(value)
    except msgspec.MsgspecError:
        return None
    return event.entity_id, event.features, event.event_id, event.reset


def assert_fast_path_agrees(value: bytes) -> None:
    """The fast path refuses what the schema refuses, and what it accepts reads the same."""
    fast = fast_event(value, 3)
    try:
        event = Event.model_validate_json(value, context={"input_size": 3})
    except ValidationError:
        assert fast is None, f"fast path accepted what the schema refuses: {value!r}"
        return
    assert fast in (None, (event.entity_id, event.features, event.event_id, event.reset))


@settings(max_examples=300, deadline=None)
@given(
    entity_id=st.one_of(st.text(min_size=1, max_size=300), ANYTHING),
    features=st.one_of(
        st.lists(
            st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers()),
            min_size=3,
            max_size=3,
        ),
        st.lists(ANYTHING, min_size=0, max_size=4),
        ANYTHING,
    ),
    extra=st.dictionaries(
        st.sampled_from(["event_id", "ts", "reset", "rest", "features"]), ANYTHING, max_size=3
    ),
)
def test_the_fast_path_accepts_only_what_the_schema_accepts(
    entity_id: object, features: object, extra: dict[str, object]
) -> None:
    assert_fast_path_agrees(
        json.dumps({"entity_id": entity_id, "features": features, **extra}).encode()
    )


@pytest.mark.parametrize(
    "value",
    [
        b'{"entity_id":"a","features":[1e999,0,0]}',
        b'{"entity_id":"a","features":[3.5e38,0,0]}',
        b'{"entity_id":"a","features":[1180591620717411303424,0,0]}',
        b'{"entity_id":"a","features":[true,0,0]}',
        b'{"entity_id":"a","features":[1,2,3],"ts":1e999}',
        b'{"entity_id":"a","features":[1,2,3],"entity_id":"b"}',
        b'{"entity_id":"\\ud800","features":[1,2,3]}',
        b'{"entity_id":"a","features":[1,2,3]} trailing',
        b' {"entity_id":"a","features":[1,2,3]}\n',
        b'{"entity_id":"a","features":[1,2,3],"reset":1}',
        b'{"entity_id":"","features":[1,2,3]}',
        b'\xef\xbb\xbf{"entity_id":"a","features":[1,2,3]}',
    ],
)
def test_the_fast_path_agrees_with_the_schema_on_edge_cases(value: bytes) -> None:
    assert_fast_path_agrees(value)


def test_the_fast_path_takes_plain_events() -> None:
    value = orjson.dumps({"entity_id": "a", "features": [1, 2.5, -3.0], "ts": 5, "reset": True})
    assert fast_event(value, 3) == ("a", [1, 2.5, -3.0], None, True)


def test_an_overflowing_step_is_a_dead_letter_and_its_entity_keeps_its_last_finite_memory(
    model: StreamModel,
) -> None:
    """A head whose arithmetic overflows for some memories (here: weights near float32's limit
    and a saturated STM) gives inf, and softmax NaN: such an event must never be stored nor
    emitted (as null); its entity goes on as if it had not been there."""
    assert model.head is not None
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[1e38, 1e38, 1e38], [0.0, 0.0, 0.0]]))
        model.head.bias.copy_(torch.tensor([2.5e38, 0.0]))  # finite while |sum of h| < 0.9
    huge = [-3e38, 3e38]  # saturates every gate: h = tanh(1) = 0.76 in each unit
    records = [
        record(event("a", [0.5, -1.0]), b"a", offset=0),
        record(event("a", huge), b"a", offset=1),
        record(event("b", [0.2, 0.1]), b"b", offset=2),
        record(event("a", [0.3, 0.4]), b"a", offset=3),
    ]
    checked = check(records, 2, 1024)
    applied = apply(model, checked, empty_memory(checked, model))
    (dead,) = applied.dead
    assert (dead.reason, dead.record.offset) == ("non_finite", 1)
    predictions = [orjson.loads(value) for _, value in applied.predictions]
    assert [(p["entity_id"], p["step"]) for p in predictions] == [("a", 1), ("b", 1), ("a", 2)]
    assert all(math.isfinite(x) for p in predictions for x in p["output"])

    # The same as if the overflowing event had never been there.
    without = [r for r in records if r.offset != 1]
    clean = check(without, 2, 1024)
    expected = apply(model, clean, empty_memory(clean, model))
    assert applied.predictions == expected.predictions
    a = applied.updates.entity_ids.index("a")
    b = expected.updates.entity_ids.index("a")
    for got, want in zip(applied.updates.states, expected.updates.states, strict=True):
        np.testing.assert_allclose(got[a], want[b], atol=1e-6)  # the LTM, then the STM
    assert applied.updates.step[a] == 2
    assert applied.updates.fence_offset[a] == 3


def test_a_batch_without_overflow_has_no_such_dead_letters(model: StreamModel) -> None:
    checked = check([record(event("a"), b"a")], 2, 1024)
    assert apply(model, checked, empty_memory(checked, model)).dead == []


def test_memories_of_huge_finite_values_are_stepped_not_dead_lettered(model: StreamModel) -> None:
    """The finite check sums each tensor first (cheap); finite values so large that their sum
    overflows must still count as finite: an entity's LTM may legitimately hold them."""
    records = [record(event(e, [0.1, 0.2]), e.encode(), offset=n) for n, e in enumerate("ab")]
    checked = check(records, 2, 1024)
    memory = empty_memory(checked, model)
    ltm, _ = memory.states
    ltm[:] = 3e38  # each finite; any two of them sum to inf in float32
    applied = apply(model, checked, memory)
    assert applied.dead == []
    assert [orjson.loads(v)["step"] for _, v in applied.predictions] == [1, 1]
    assert np.isfinite(applied.updates.states[0]).all()
    assert float(torch.from_numpy(applied.updates.states[0]).sum()) == math.inf  # overflowed

    huge = torch.full((2, 1, 4), 3e38)
    result = StepResult(
        torch.zeros(2, 3), torch.ones(2, dtype=torch.int64), (huge, huge), torch.ones(2)
    )
    assert _finite(result)
    for bad in (math.inf, -math.inf, math.nan):
        poisoned = huge.clone()
        poisoned[1, 0, 2] = bad
        assert not _finite(StepResult(result.output, result.step, (huge, poisoned), result.steps))


def test_a_reset_recovers_an_entity_whose_stored_memory_is_not_finite(
    model: StreamModel,
) -> None:
    """A reset starts from zeros by masking, not multiplying: inf * 0 would be NaN."""
    checked = check([record(event("a", [0.1, 0.2], reset=True), b"a")], 2, 1024)
    memory = empty_memory(checked, model)
    ltm, stm = memory.states
    ltm[:] = np.inf
    stm[:] = np.nan
    applied = apply(model, checked, memory)
    assert applied.dead == []
    (prediction,) = [orjson.loads(value) for _, value in applied.predictions]
    assert prediction["step"] == 1
    assert all(math.isfinite(x) for x in prediction["output"])
    assert np.isfinite(applied.updates.states[0]).all()
