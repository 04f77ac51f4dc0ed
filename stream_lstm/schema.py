"""The wire format: what users publish, what they receive, and what the memory API returns.

Validation is strict (no "1" for 1.0, no "yes" for true) and unknown fields are refused, so a
typo such as ``"rest": true`` is a dead letter with a reason rather than a silently ignored flag.
Pass ``context={"input_size": I}`` to check the feature count against the model.

The hot path reads and writes the same formats with msgspec (decoding and checking in C), through
structs derived here from the models (``fast_struct``), so each format is defined once.

Events and predictions also come in a binary format, for high-rate producers (``Format``,
the worker's ``STREAM_LSTM_EVENT_FORMAT`` and ``STREAM_LSTM_PREDICTION_FORMAT``): a msgpack map
with the same fields, its list of floats (an event's ``features``, a prediction's ``output``)
packed into one bin of little-endian float32, 4 bytes a value. An event of 32 features::

    {"entity_id": "user-7", "features": <bin 128: 32 x float32 LE>, "reset": false}

``event_id``, ``ts`` and ``reset`` are optional, as in JSON; unknown fields are refused, and so
are features that are not finite. In Python: ``msgspec.msgpack.encode({"entity_id": "user-7",
"features": np.asarray(x, "<f4").tobytes()})``; ``stream-lstm publish`` writes it from JSONL.
"""

from __future__ import annotations

import functools
import operator
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import msgspec
import numpy as np
from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo

Format = Literal["json", "msgpack"]
"""How events and predictions are encoded: JSON, or msgpack with the lists of floats packed
(the events' features, the predictions' output: ``PACKED``)."""

ENTITY_ID_MAX = 256
EntityId = Annotated[str, Field(min_length=1, max_length=ENTITY_ID_MAX)]
FLOAT32_MAX = float(np.finfo(np.float32).max)
Feature = Annotated[FiniteFloat, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
"""The model computes in float32: a larger number would become infinity and poison a memory."""


class _Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Event(_Wire):
    """One event of one entity, published to the input topic keyed by ``entity_id``."""

    entity_id: EntityId
    features: list[Feature] = Field(min_length=1)
    event_id: str | None = None
    ts: FiniteFloat | None = None
    reset: bool = False

    @field_validator("features")
    @classmethod
    def _fits_model(cls, features: list[float], info: ValidationInfo) -> list[float]:
        size = (info.context or {}).get("input_size")
        if size is not None and len(features) != size:
            raise ValueError(f"{len(features)} features, the model takes {size}")
        return features


class Source(_Wire):
    """Where an event was read: the fence of the memory it produced."""

    topic: str
    partition: int
    offset: int


class Prediction(_Wire):
    """The model's output for one event, published keyed by ``entity_id``."""

    entity_id: EntityId
    event_id: str | None
    step: int = Field(
        ge=1, description="events applied since the entity's last reset, this one included"
    )
    output: list[float]
    label: str | None
    model_version: str
    source: Source


class MemorySnapshot(_Wire):
    """An entity's stored memories, as the memory API shows them."""

    entity_id: EntityId
    ltm: list[list[float]] = Field(description="long-term memory (cell state), layers x hidden")
    stm: list[list[float]] = Field(description="short-term memory (hidden state), layers x hidden")
    step: int = Field(ge=0)
    model_version: str
    updated_at: float = Field(description="unix seconds of the last write")


def fast_struct(
    model: type[BaseModel],
    lengths: Mapping[str, int] | None = None,
    packed: Collection[str] = (),
) -> type[msgspec.Struct]:
    """``model`` as a msgspec Struct: the same fields in the same order, its constraints as
    ``msgspec.Meta``, nested models as structs, unknown fields refused. ``lengths`` fixes the
    length of list fields (the model's feature count, which the schema checks by context).

    What it cannot carry over raises TypeError, so a decoder may refuse more than the model,
    never less: a constraint with no msgspec form, a validator (except on a field ``lengths``
    fixes: the feature count's), an alias, a default factory, a generic other than a list or a
    union. ``packed`` names lists of floats held as bytes instead, little-endian float32 (the
    binary formats, ``PACKED``), of 4 bytes an item: their items' own constraints (finite,
    within float32) are the caller's to check on the array.
    """
    if not lengths and not packed:
        return _nested_struct(model)
    return _struct(model, lengths or {}, packed)


PACKED = np.dtype("<f4")
"""How a packed list of floats is held in bytes: little-endian float32."""


def _struct(
    model: type[BaseModel], lengths: Mapping[str, int], packed: Collection[str] = ()
) -> type[msgspec.Struct]:
    unknown = set(packed) - set(model.model_fields)
    if unknown:
        raise TypeError(f"{model.__name__}: no field {sorted(unknown)} to pack")
    decorators = model.__pydantic_decorators__
    unseen_decorators = (
        decorators.model_validators,
        decorators.validators,
        decorators.root_validators,
        decorators.field_serializers,
        decorators.model_serializers,
        decorators.computed_fields,
    )
    if any(unseen_decorators):
        raise TypeError(f"{model.__name__}: no msgspec form for its validators or serializers")
    for validator in decorators.field_validators.values():
        unseen = set(validator.info.fields) - set(lengths)
        if unseen:
            raise TypeError(f"{model.__name__}: no msgspec form for the validator of {unseen}")
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for name, field in model.model_fields.items():
        aliases = {field.alias, field.validation_alias, field.serialization_alias} - {None, name}
        if aliases or field.default_factory is not None:
            raise TypeError(f"{model.__name__}.{name}: no msgspec form for its alias or factory")
        metadata = list(field.metadata)
        if name in lengths:
            metadata += [
                annotated_types.MinLen(lengths[name]),
                annotated_types.MaxLen(lengths[name]),
            ]
        if name in packed:
            if get_origin(field.annotation) is not list:
                raise TypeError(f"{model.__name__}.{name}: only a list of floats is packed")
            if metadata and name not in lengths:
                raise TypeError(f"{model.__name__}.{name}: packed, its length needs lengths")
            size = PACKED.itemsize * lengths[name] if name in lengths else None
            kind: Any = Annotated[bytes, msgspec.Meta(min_length=size, max_length=size)]
        else:
            kind = _fast_type(field.annotation, metadata)
        fields.append((name, kind) if field.is_required() else (name, kind, field.default))
    return msgspec.defstruct(model.__name__, fields, forbid_unknown_fields=True, gc=False)


@functools.cache
def _nested_struct(model: type[BaseModel]) -> type[msgspec.Struct]:
    """One struct per model, so ``fast_struct(Source)`` is the type a Prediction holds."""
    return _struct(model, {})


def _fast_type(annotation: Any, metadata: Sequence[Any] = ()) -> Any:
    if get_origin(annotation) is Annotated:
        inner, *more = get_args(annotation)
        return _fast_type(inner, [*more, *metadata])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        annotation = _nested_struct(annotation)
    elif get_origin(annotation) is list:
        (item,) = get_args(annotation)
        annotation = list[_fast_type(item)]  # type: ignore[misc]
    elif get_origin(annotation) in (Union, UnionType):  # X | None
        annotation = functools.reduce(operator.or_, map(_fast_type, get_args(annotation)))
    elif get_args(annotation):
        raise TypeError(f"no msgspec form for {annotation!r}")
    meta = _fast_meta(metadata)
    return Annotated[annotation, msgspec.Meta(**meta)] if meta else annotation


def _fast_meta(metadata: Sequence[Any]) -> dict[str, Any]:
    """The tightest bounds of pydantic's constraints, as ``msgspec.Meta`` arguments."""
    tightest: dict[str, tuple[Callable[..., float], list[float]]] = {
        "ge": (max, []),
        "gt": (max, []),
        "le": (min, []),
        "lt": (min, []),
        "min_length": (max, []),
        "max_length": (min, []),
    }
    for item in metadata:
        if isinstance(item, FieldInfo):
            for name, value in _fast_meta(item.metadata).items():
                tightest[name][1].append(value)
        elif isinstance(item, AllowInfNan) and not item.allow_inf_nan:
            tightest["ge"][1].append(-sys.float_info.max)  # keeps 1e999 (infinity) out
            tightest["le"][1].append(sys.float_info.max)
        elif isinstance(item, (annotated_types.Ge, annotated_types.Gt)):
            name = "ge" if isinstance(item, annotated_types.Ge) else "gt"
            tightest[name][1].append(getattr(item, name))
        elif isinstance(item, (annotated_types.Le, annotated_types.Lt)):
            name = "le" if isinstance(item, annotated_types.Le) else "lt"
            tightest[name][1].append(getattr(item, name))
        elif isinstance(item, annotated_types.MinLen):
            tightest["min_length"][1].append(item.min_length)
        elif isinstance(item, annotated_types.MaxLen):
            tightest["max_length"][1].append(item.max_length)
        else:
            raise TypeError(f"no msgspec form for the constraint {item!r}")
    return {name: pick(values) for name, (pick, values) in tightest.items() if values}
