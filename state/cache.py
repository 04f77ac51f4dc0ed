"""The memories a worker committed last, kept in its own memory so that it need not read them
back from Redis for the next event of the same entity.

A memory in the cache is what the worker wrote, with its fence: every event of the entity up
to that fence, applied in order. It stays what Redis holds as long as nothing else writes the
key, and every other writer is seen:

- another worker taking the partition: the worker clears the cache whenever partitions are
  revoked, after its batches have committed;
- a stale worker still writing: its commits are refused by the fences, and a refused or failed
  commit evicts its entities (a newer fence is stored, or maybe is);
- a reset from the CLI or the memory API, or a write of an entity whose events come on several
  partitions (another partition's owner may write it too): each counts itself in the
  namespace's outside-writes counter, read with every load, and a changed counter clears the
  cache; an entity with fences on several partitions is not cached at all;
- a TTL: an entry is not used once the key may have expired.

Entries sit in preallocated arrays, one slot an entity; slots are reused in the order they were
filled (first in, first out), so the cache never grows past ``capacity`` entities.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from stream_lstm.memories import I64, NO_FENCE, Memories, Shape

__all__ = ["MemoryCache"]


class MemoryCache:
    """Up to ``capacity`` entities' memories of one shape, as last committed by this process.

    ``ttl_s``: the store's TTL; an entry older than this is not used. ``rounding``: a dtype the
    store rounds memories to (float16), so that an entry holds exactly what a load would read.
    """

    def __init__(
        self, capacity: int, *, ttl_s: float | None = None, rounding: np.dtype | None = None
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.rounding = rounding
        self._outside_writes: bytes | None = None  # the counter last read (None: none yet)
        self.generation = 0
        """How many times the cache was cleared: a commit sent before a clear, and answered
        after it, may have been overtaken by what the clear was for, so it is not kept."""
        self._slots: dict[str, int] = {}
        self._owners: list[str | None] = [None] * capacity
        self._next = 0  # the slot filled next, evicting its owner
        self._entries = Memories.zeros([], Shape(1, 0, 0))  # row: slot; allocated by shape
        self._written: npt.NDArray[np.float64] = np.empty(0, dtype=np.float64)

    def __len__(self) -> int:
        return len(self._slots)

    def check_outside_writes(self, counter: bytes | None) -> None:
        """Clear the cache when the namespace's outside-writes counter moved since it was last
        read."""
        if counter != self._outside_writes:
            self.clear()
            self._outside_writes = counter

    def find(self, entity_ids: Sequence[str], shape: Shape) -> I64:
        """Each entity's slot, or -1 where it is not cached (or its entry is too old to use)."""
        if self._entries.shape != shape or not self._slots:
            return np.full(len(entity_ids), -1, dtype=np.int64)
        slots = self._lookup(entity_ids)  # (E,)
        if self.ttl_s is not None:
            hit = np.flatnonzero(slots >= 0)
            expired = time.monotonic() - self._written[slots[hit]] >= self.ttl_s
            slots[hit[expired]] = -1
        return slots

    def take(self, entity_ids: Sequence[str], slots: I64) -> Memories:
        """The entries at ``slots`` (from ``find``) for these entities; where a slot is -1 the
        row is not found (no fence), its states whatever, for the caller to fill."""
        taken = self._entries.take(slots, entity_ids)
        missed = slots < 0
        taken.fence_partition[missed] = NO_FENCE
        taken.fence_offset[missed] = NO_FENCE
        return taken

    def put(
        self,
        updates: Memories,
        applied: npt.NDArray[np.bool_],
        written: float,
        generation: int,
    ) -> None:
        """Keep the applied updates of a commit sent at ``written`` (``time.monotonic()``) when
        the cache was at ``generation``; evict the others: a newer fence is stored for them.

        An entity that appears more than once is evicted too: which of its updates Redis kept
        is the fences' business, not the cache's. So is one with more fences (format 2 or 4): the
        cache holds one fence an entity.
        """
        if generation != self.generation:
            return
        e = len(updates)
        if self._entries.shape != updates.shape:
            self._allocate(updates.shape)
        ids = updates.entity_ids
        keep = applied.copy()  # (E,)
        if len(set(ids)) != e:
            counts = collections.Counter(ids)
            keep &= np.fromiter((counts[i] == 1 for i in ids), np.bool_, e)
        keep[list(updates.other_fences)] = False
        keep[np.flatnonzero(keep)[: -self.capacity]] = False  # more than fit: the last ones
        self.evict([ids[r] for r in np.flatnonzero(~keep).tolist()])
        rows = np.flatnonzero(keep)
        kept = updates if len(rows) == e else updates.take(rows)  # as it usually is: no copies
        slots = self._lookup(kept.entity_ids)
        for at in np.flatnonzero(slots < 0).tolist():  # new entities take the oldest slots
            slots[at] = self._slot(kept.entity_ids[at])
        if self.rounding is not None:  # as the codec stores them: saturated, then rounded
            top = float(np.finfo(self.rounding).max)
            rounded = tuple(
                np.clip(state, -top, top).astype(self.rounding).astype(np.float32)
                for state in kept.states
            )
            kept = dataclasses.replace(kept, states=rounded)
        self._entries.put(slots, kept)
        self._written[slots] = written

    def evict(self, entity_ids: Sequence[str]) -> None:
        """Forget these entities: the next load reads them from Redis."""
        for entity_id in entity_ids:
            slot = self._slots.pop(entity_id, None)
            if slot is not None:
                self._owners[slot] = None

    def clear(self) -> None:
        """Forget every entity."""
        self.generation += 1
        self._slots.clear()
        self._owners = [None] * self.capacity

    def _lookup(self, entity_ids: Sequence[str]) -> I64:
        """Each entity's slot, -1 where it has none."""
        found = map(self._slots.get, entity_ids, itertools.repeat(-1))
        return np.fromiter(found, np.int64, len(entity_ids))

    def _slot(self, entity_id: str) -> int:
        """A slot for a new entity, evicting the entity that took it longest ago."""
        slot = self._next
        self._next = (slot + 1) % self.capacity
        owner = self._owners[slot]
        if owner is not None:
            del self._slots[owner]
        self._owners[slot] = entity_id
        self._slots[entity_id] = slot
        return slot

    def _allocate(self, shape: Shape) -> None:
        """Arrays for memories of this shape (a model of another shape starts afresh)."""
        self.clear()
        self._entries = Memories.zeros([""] * self.capacity, shape)
        self._written = np.zeros(self.capacity, dtype=np.float64)
