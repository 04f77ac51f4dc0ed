"""The wire format: what users publish, what they receive, and what the memory API returns.

Validation is strict (no "1" for 1.0, no "yes" for true) and unknown fields are refused, so a
typo such as ``"rest": true`` is a dead letter with a reason rather than a silently ignored flag.
Pass ``context={"input_size": I}`` to check the feature count against the model.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationInfo, field_validator

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
