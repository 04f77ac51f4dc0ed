"""Wire models accept well-formed events and say why they refuse the rest."""

from __future__ import annotations

from typing import Annotated

import msgspec
import pytest
from pydantic import BaseModel, Field, ValidationError, field_serializer

from stream_lstm.schema import Event, MemorySnapshot, Prediction, Source, fast_struct


def test_a_minimal_event_gets_defaults() -> None:
    event = Event.model_validate_json('{"entity_id": "tv/1", "features": [1, 2.5]}')
    assert event == Event(entity_id="tv/1", features=[1.0, 2.5])
    assert (event.event_id, event.ts, event.reset) == (None, None, False)


def test_a_full_event() -> None:
    raw = '{"entity_id":"🦊 {x}","features":[0.5],"event_id":"e1","ts":1.5,"reset":true}'
    event = Event.model_validate_json(raw, context={"input_size": 1})
    assert (event.entity_id, event.event_id, event.ts, event.reset) == ("🦊 {x}", "e1", 1.5, True)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"entity_id": "a", "features": [NaN]}', "features.0"),
        ('{"entity_id": "a", "features": [1e999]}', "features.0"),
        ('{"entity_id": "a", "features": [-Infinity]}', "features.0"),
        ('{"entity_id": "a", "features": [1e300]}', "features.0"),
        ('{"entity_id": "a", "features": [0, -3.5e38]}', "features.1"),
        ('{"entity_id": "a", "features": ["1.0"]}', "features.0"),
        ('{"entity_id": "a", "features": []}', "features"),
        ('{"entity_id": "a"}', "features"),
        ('{"entity_id": "", "features": [1]}', "entity_id"),
        ('{"features": [1]}', "entity_id"),
        ('{"entity_id": 7, "features": [1]}', "entity_id"),
        ('{"entity_id": "' + "x" * 257 + '", "features": [1]}', "entity_id"),
        ('{"entity_id": "a", "features": [1], "reset": "yes"}', "reset"),
        ('{"entity_id": "a", "features": [1], "rest": true}', "rest"),
        ('{"entity_id": "a", "features": [1], "ts": NaN}', "ts"),
    ],
)
def test_bad_events_are_refused_naming_the_field(raw: str, field: str) -> None:
    with pytest.raises(ValidationError) as error:
        Event.model_validate_json(raw)
    assert field in {".".join(map(str, e["loc"])) for e in error.value.errors()}


def test_feature_count_is_checked_against_the_model() -> None:
    raw = '{"entity_id": "a", "features": [1, 2]}'
    assert Event.model_validate_json(raw, context={"input_size": 2}).features == [1.0, 2.0]
    with pytest.raises(ValidationError, match="2 features, the model takes 3"):
        Event.model_validate_json(raw, context={"input_size": 3})


def test_prediction_round_trips_as_json() -> None:
    prediction = Prediction(
        entity_id="a",
        event_id=None,
        step=3,
        output=[0.25, 0.75],
        label="wolf",
        model_version="abc",
        source=Source(topic="events", partition=2, offset=41),
    )
    assert Prediction.model_validate_json(prediction.model_dump_json()) == prediction


def test_memory_snapshot_round_trips_as_json() -> None:
    snapshot = MemorySnapshot(
        entity_id="a",
        ltm=[[0.5, -1.0]],
        stm=[[0.25, 0.0]],
        step=0,
        model_version="v",
        updated_at=1.5,
    )
    assert MemorySnapshot.model_validate_json(snapshot.model_dump_json()) == snapshot


def test_the_hot_path_struct_is_the_schema_and_refuses_constraints_it_cannot_keep() -> None:
    """fast_struct keeps a model's fields, order and bounds; a constraint msgspec cannot express
    stops it, rather than a decoder that accepts what the schema refuses."""
    decode = msgspec.json.Decoder(fast_struct(Event, {"features": 2})).decode
    assert decode(b'{"entity_id": "a", "features": [1, 2]}').features == [1.0, 2.0]
    for refused in (
        b'{"entity_id": "a", "features": [1]}',
        b'{"entity_id": "a", "features": [1, 1e39]}',
    ):
        with pytest.raises(msgspec.ValidationError):
            decode(refused)
    assert fast_struct(Prediction).__struct_fields__ == tuple(Prediction.model_fields)

    class Coded(BaseModel):
        code: Annotated[str, Field(pattern=r"^[a-z]+$")]

    class Aliased(BaseModel):
        code: str = Field(alias="c")

    class Mapped(BaseModel):
        codes: dict[str, int]

    class ValidatedAs(BaseModel):
        code: str = Field(validation_alias="c")

    class Serialized(BaseModel):
        code: str

        @field_serializer("code")
        def upper(self, code: str) -> str:
            return code.upper()

    for refused_model in (Coded, Aliased, Mapped, ValidatedAs, Serialized):
        with pytest.raises(TypeError, match="no msgspec form"):
            fast_struct(refused_model)
    with pytest.raises(TypeError, match=r"the validator of \{'features'\}"):
        fast_struct(Event)  # the feature count is checked by a validator: lengths must fix it
