"""Memories: the recurrent states of a batch of entities, the one type every layer passes around.

A model declares its states (``StreamModel.states``: an LSTM has two, the long-term memory and
the short-term memory), each ``layers x hidden`` per entity. ``Memories`` holds them for E
entities as arrays on the host, with what the stream needs besides: events applied since each
entity's last reset (``step``) and its *fences*, the (partition, offset) of the last event
applied. The store loads and commits it, its cache and codec hold it, and the engine steps torch
views of its states. ``take`` and ``put`` move rows between two of them, ``overlay`` by entity.

An entity whose events came on several input partitions has a fence on each: the row's main
fence is its last event's, the others are in ``other_fences`` (rare, so a dict of rows), where
partition ``RESETS`` counts the entity's resets out of the stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt

__all__ = ["NO_FENCE", "RESETS", "Fences", "Memories", "Shape"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
Rows = npt.NDArray[np.int64] | Sequence[int]

NO_FENCE = -1
"""Fence partition and offset of an entity that has no stored memory."""
RESETS = -2
"""The partition under which an entity's other fences count its resets."""

Fences: TypeAlias = Mapping[int, int]
"""An entity's other fences: partition -> offset of the last event applied from it."""


class Shape(NamedTuple):
    """One entity's memories: ``states`` arrays of ``layers x hidden`` (``StreamModel.shape``)."""

    states: int
    layers: int
    hidden: int


@dataclass(frozen=True, slots=True, eq=False)
class Memories:
    """The memories of E entities: the model's states, steps and fences, row e for entity e.

    Raises ValueError when the columns disagree on E or on the states' shape, the states are not
    float32 (a silent cast would break the store's bit-exact round trip) or the other columns
    not int64.
    """

    entity_ids: Sequence[str]
    states: tuple[F32, ...]  # each (E, L, H) float32, in the model's order
    step: I64  # (E,) events applied since the last reset
    fence_partition: I64  # (E,) NO_FENCE where nothing is stored
    fence_offset: I64  # (E,) NO_FENCE where nothing is stored
    other_fences: dict[int, Fences] = field(default_factory=dict)
    """Row -> the entity's fences besides the main one; only rows that have some."""

    def __post_init__(self) -> None:
        e = len(self.entity_ids)
        if not self.states:
            raise ValueError("memories need at least one state")
        first = self.states[0].shape
        for state in self.states:
            if state.ndim != 3 or state.shape[0] != e or state.shape != first:
                shapes = [s.shape for s in self.states]
                raise ValueError(f"states {shapes} must all be ({e}, L, H)")
            if state.dtype != np.float32:
                raise ValueError(f"states must be float32, got {state.dtype}")
        for name in ("step", "fence_partition", "fence_offset"):
            column = getattr(self, name)
            if column.shape != (e,) or column.dtype != np.int64:
                raise ValueError(
                    f"{name} is {column.dtype} of shape {column.shape}, expected int64 ({e},)"
                )
        if any(not 0 <= row < e for row in self.other_fences):
            raise ValueError(f"other_fences has rows outside 0..{e - 1}")

    @classmethod
    def zeros(cls, entity_ids: Sequence[str], shape: Shape) -> Memories:
        """Memories of entities that have seen nothing: zero states, no fences."""
        e = len(entity_ids)
        return cls(
            entity_ids,
            tuple(
                np.zeros((e, shape.layers, shape.hidden), np.float32) for _ in range(shape.states)
            ),
            np.zeros(e, np.int64),
            np.full(e, NO_FENCE, np.int64),
            np.full(e, NO_FENCE, np.int64),
        )

    def __len__(self) -> int:
        return len(self.entity_ids)

    @property
    def shape(self) -> Shape:
        _, layers, hidden = self.states[0].shape
        return Shape(len(self.states), layers, hidden)

    @property
    def found(self) -> npt.NDArray[np.bool_]:
        """(E,) which entities have a memory: every memory stored by a worker, or overlaid from
        a batch in flight, has the fence of its last event."""
        found: npt.NDArray[np.bool_] = self.fence_partition != NO_FENCE
        return found

    def take(self, rows: Rows, entity_ids: Sequence[str] | None = None) -> Memories:
        """A copy of these rows, in this order; ``entity_ids``: theirs, when the caller knows
        them better (the cache, whose rows are slots)."""
        at = np.asarray(rows, dtype=np.int64)
        other = {}
        if self.other_fences:
            other = {
                new: self.other_fences[old]
                for new, old in enumerate(at.tolist())
                if old in self.other_fences
            }
        return Memories(
            [self.entity_ids[i] for i in at.tolist()] if entity_ids is None else entity_ids,
            tuple(state[at] for state in self.states),
            self.step[at],
            self.fence_partition[at],
            self.fence_offset[at],
            other,
        )

    def put(self, rows: Rows, source: Memories) -> None:
        """Write every row of ``source`` over these rows (one per source row, in order), its
        entity ids aside: the caller puts an entity's memory in that entity's row."""
        at = np.asarray(rows, dtype=np.int64)
        if len(at) != len(source) or source.shape != self.shape:
            raise ValueError(
                f"{len(source)} memories of {source.shape} put in {len(at)} rows of {self.shape}"
            )
        for mine, theirs in zip(self.states, source.states, strict=True):
            mine[at] = theirs
        self.step[at] = source.step
        self.fence_partition[at] = source.fence_partition
        self.fence_offset[at] = source.fence_offset
        if self.other_fences:
            for row in at.tolist():
                self.other_fences.pop(row, None)
        for src, fences in source.other_fences.items():
            self.other_fences[int(at[src])] = fences

    def overlay(self, newer: Memories) -> None:
        """Put ``newer``'s memory of each entity it shares with these over this one."""
        index = {entity_id: row for row, entity_id in enumerate(newer.entity_ids)}
        pairs = [(n, index[e]) for n, e in enumerate(self.entity_ids) if e in index]
        if pairs:
            at, src = zip(*pairs, strict=True)
            self.put(at, newer.take(src))

    def spans_partitions(self) -> bool:
        """Whether some entity has fences on more than one input partition (the resets count
        aside): a write of it may change what another partition's owner started from."""
        return any(any(p != RESETS for p in fences) for fences in self.other_fences.values())
