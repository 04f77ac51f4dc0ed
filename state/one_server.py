"""The memory store on one Redis server: a batch in one MGET, committed by one fenced script
call or, when the fences prove the script would write it all, by one MSET.

On one server a batch usually skips the script (``_commit_fast``): every commit also raises its
partitions' fence keys, so when those prove that no commit reached the batch's offsets, the
script would write every update, and a WATCHed MULTI/MSET writes the same for a tenth of Redis's
CPU. Only here: the memory cache (cache.py), which the outside-writes counter keeps right, and
durable commits (durability.py), which wait on the one connection's server.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar, cast

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import WatchError

from state import codec
from state.backend import APPLIED, SCAN_COUNT, Backend, Loaded
from state.cache import MemoryCache
from state.durability import Durability
from state.keys import KeyLayout
from stream_lstm.exceptions import StoreError, StoreUnavailableError
from stream_lstm.memories import I64, Memories, Shape

__all__ = ["OneServer"]

T = TypeVar("T")


class OneServer(Backend[Redis]):
    """Memories on one Redis server, optionally cached, optionally committed durably."""

    written = "this batch"

    def __init__(
        self,
        redis: Redis,
        keys: KeyLayout,
        *,
        cache: MemoryCache | None,
        durability: Durability | None,
        durability_timeout_s: float,
        **common: Any,
    ) -> None:
        super().__init__(redis, keys, **common)
        self.cache = cache
        self.durability = durability
        self.durability_timeout_s = durability_timeout_s
        self.run_id: str | None = None  # of the server that took the last durable commit

    async def attempt(
        self, operation: Callable[[], Awaitable[T]], failures: list[BaseException], deadline: float
    ) -> T:
        return await operation()  # redis-py retries lost connections itself

    async def load(
        self, entity_ids: Sequence[str], shape: Shape, partitions: Collection[int]
    ) -> Loaded:
        cache = self.cache
        if cache is None:
            return await self._load(entity_ids, shape, partitions)
        slots = cache.find(entity_ids, shape)  # (E,) -1: not cached
        missed = np.flatnonzero(slots < 0)
        if len(missed) == len(entity_ids):
            return await self._load(entity_ids, shape, partitions)
        # Taken before the read: a commit answered meanwhile may give the slots to other
        # entities. What it wrote for these is the caller's (a batch in flight, overlaid).
        memories = cache.take(entity_ids, slots)
        generation = cache.generation
        read = await self._load([entity_ids[i] for i in missed.tolist()], shape, partitions)
        if cache.generation != generation:  # a reset came since: the cache was cleared
            return await self._load(entity_ids, shape, partitions)
        memories.put(missed, read.memories)
        cached = len(entity_ids) - len(missed)
        return dataclasses.replace(read, memories=memories, cached=cached)

    async def _load(
        self, entity_ids: Sequence[str], shape: Shape, partitions: Collection[int]
    ) -> Loaded:
        """One MGET of the memories, the partitions' fences and the outside-writes counter; a
        counter that moved clears the cache."""
        keys = self.keys.memories(entity_ids)
        fenced = sorted(partitions)
        fence_keys = [self.keys.fence(partition) for partition in fenced]
        values = cast(
            "list[bytes | None]",
            await self.call(
                f"load_many of {len(keys)} entities",
                lambda: self.redis.mget(keys + fence_keys + [self.keys.outside_writes]),
            ),
        )
        memories = codec.decode_many(entity_ids, values[: len(keys)], shape, self.code)
        stored = values[len(keys) : len(keys) + len(fence_keys)]
        fences = {p: None if f is None else int(f) for p, f in zip(fenced, stored, strict=True)}
        if self.cache is not None:
            self.cache.check_outside_writes(values[-1])
        return Loaded(memories, fences, values[-1])

    async def commit(
        self,
        updates: Memories,
        keys: list[str],
        values: list[bytes],
        loaded: Loaded | None,
    ) -> I64:
        what = f"commit_many of {len(keys)} entities"
        cache = self.cache
        sent = time.monotonic()  # before Redis sets any TTL: cached entries age no slower
        generation = cache.generation if cache is not None else 0
        if self.durability is not None and self.run_id is None:
            self.run_id = await self.call("run id", self._server_run_id)
        try:
            answer = await self.call(what, lambda: self._commit(keys, values, updates, loaded))
            await self._make_durable(what)
        except BaseException:
            if cache is not None:
                cache.evict(updates.entity_ids)  # written or not: read them back
            raise
        codes = np.asarray(answer, dtype=np.int64)
        if cache is not None:
            cache.put(updates, codes == APPLIED, sent, generation)
        return codes

    async def _commit(
        self,
        keys: list[str],
        values: list[bytes],
        updates: Memories,
        loaded: Loaded | None,
    ) -> list[int]:
        """The fast commit where it writes exactly what the script would, else the script.

        What the load read decides whether to try: a partition fence already reached, an
        entity with fences on several partitions, means the script at once, in one round trip.
        """
        bounds = _offset_bounds(updates)
        fence_keys = [self.keys.fence(partition) for partition in bounds]
        counter = self.keys.outside_writes
        if (
            loaded is not None
            and not self.ttl_ms
            and not updates.spans_partitions()
            and _no_commit_reached([loaded.partition_fences.get(p) for p in bounds], bounds)
        ):
            start = loaded.memories
            absent = {start.entity_ids[i] for i in np.flatnonzero(~start.found).tolist()}
            new = [row for row, e in enumerate(updates.entity_ids) if e in absent]
            written = await self._commit_fast(keys, values, fence_keys, bounds, loaded, new)
            if written is not None:
                codes = [APPLIED] * len(keys)
                if not written:  # another writer created some new entity: the script decides
                    answer: list[int] = await self.commit_script(
                        keys=[*(keys[row] for row in new), counter],
                        args=[self.ttl_ms, len(new), 0, *(values[row] for row in new)],
                    )
                    for row, code in zip(new, answer, strict=True):
                        codes[row] = code
                return codes
        highest = [str(high) for _, high in bounds.values()]
        script: list[int] = await self.commit_script(
            keys=[*keys, *fence_keys, counter],
            args=[self.ttl_ms, len(keys), len(fence_keys), *values, *highest],
        )
        return script

    async def _commit_fast(
        self,
        keys: list[str],
        values: list[bytes],
        fence_keys: list[str],
        bounds: dict[int, tuple[int, int]],
        loaded: Loaded,
        new: list[int],
    ) -> bool | None:
        """MSET the batch when the script would write every update: True when all of it was
        written, False when the ``new`` rows were not (the rest was), None when nothing was.

        The script costs Redis far more per entity than a plain MSET: each value goes through
        Lua. It writes an update whose fences cover the stored ones and pass one. Every commit
        raises its partitions' fences to its highest offsets, atomically with its writes, so
        when each partition's stored fence is below the batch's lowest offset there, no stored
        memory has a fence as new as the batch's on its partitions. Fences on other partitions
        come only from an outside write, one that no partition's owner sees coming: a reset,
        or a write that gives a memory a fence on another partition. Each counts itself in the
        outside-writes counter, so a counter as the load read it means the stored fences are
        still those the updates started from (or the batches still in flight that they started
        from wrote, which the caller vouches for). WATCH on the fences and the counter makes
        that hold until the write. Except ``new`` entities, which the load did not find (another
        partition's owner may have created one since): they go in one MSETNX in the same
        transaction, which writes them only if none exists (WATCH on each would cost Redis more
        than the MSET itself).
        """
        counter = self.keys.outside_writes
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(*fence_keys, counter)
            *fences, outside = await pipe.mget([*fence_keys, counter])
            if outside != loaded.outside_writes or not _no_commit_reached(
                [None if f is None else int(f) for f in fences], bounds
            ):
                return None
            fresh = set(new)
            known = (
                pair for row, pair in enumerate(zip(keys, values, strict=True)) if row not in fresh
            )
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.mset(
                {
                    **dict(known),
                    **{
                        key: high
                        for key, (_, high) in zip(fence_keys, bounds.values(), strict=True)
                    },
                }
            )
            if new:
                pipe.msetnx({keys[row]: values[row] for row in new})
            try:
                replies = await pipe.execute()
            except WatchError:
                return None
        return not new or bool(replies[-1])

    async def _make_durable(self, what: str) -> None:
        """Return once Redis has made every write it acknowledged so far as durable as
        ``durability`` asks; StoreUnavailableError when it has not within the timeout.

        WAIT and WAITAOF wait for the calling connection's own last write, but the pool may
        hand any connection, and a retried commit whose updates are already written (stale)
        writes nothing. So the wait writes first, on its own connection (one pipeline): the
        durability marker. Replicas and the AOF take writes in order, so once the marker is
        durable, so is every write acknowledged before it, whoever made it, by this server
        process: one that restarted (from older data) or failed over behind the same address
        since the last commit may never have had this one, so its run id, read in the same
        pipeline, must still be the one read before the write.
        """
        durability = self.durability
        if durability is None:
            return

        async def wait() -> tuple[str, list[Any]]:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.incr(self.keys.durable)
                for command in durability.commands(self.durability_timeout_s):
                    pipe.execute_command(*command)
                pipe.info("server")
                _, *replies, info = await pipe.execute()
            return str(info["run_id"]), replies

        run_id, replies = await self.call(f"{what}: {durability}", wait)
        if run_id != self.run_id:
            self.run_id = run_id
            raise StoreUnavailableError(
                f"{what}: Redis at {self.url} restarted or failed over since the commit was "
                "written (another run id): it may not have it; not counted as committed"
            )
        missing = durability.shortfall(replies)
        if missing is not None:
            raise StoreUnavailableError(
                f"{what}: Redis at {self.url} did not make it durable ({durability}) within "
                f"{self.durability_timeout_s:g} s: {missing}; not counted as committed"
            )

    async def _server_run_id(self) -> str:
        """The run id of the server process answering: another after a restart or failover."""
        info = await self.redis.info("server")
        return str(info["run_id"])

    def reset_keys(self, entity_id: str) -> list[str]:
        return [self.keys.memory(entity_id), self.keys.outside_writes]

    async def eviction_policy(self) -> str | None:
        try:
            reply = await self.call("config get", lambda: self.redis.config_get("maxmemory-policy"))
        except StoreError:
            return None
        policy = reply.get("maxmemory-policy")
        return policy.decode() if isinstance(policy, bytes) else policy

    async def info(self) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = await self.call("info", self.redis.info)
        except StoreError:
            return None
        return info

    def forget_cached(self) -> None:
        if self.cache is not None:
            self.cache.clear()

    async def count(self) -> int:
        pattern, cursor, total = self.keys.memory_pattern, 0, 0
        while True:
            scan = functools.partial(self.redis.scan, cursor, match=pattern, count=SCAN_COUNT)
            cursor, keys = await self.call("count", scan)
            total += len(keys)
            if cursor == 0:
                return total

    async def scan(self, pattern: str) -> AsyncGenerator[list[bytes], None]:
        cursor = 0
        while True:
            scan = functools.partial(self.redis.scan, cursor, match=pattern, count=SCAN_COUNT)
            cursor, keys = await self.call(f"scan of {pattern!r}", scan)
            yield cast("list[bytes]", keys)
            if cursor == 0:
                return

    async def read(self, keys: list[str]) -> list[bytes | None]:
        values = await self.call(f"read of {len(keys)} keys", lambda: self.redis.mget(keys))
        return cast("list[bytes | None]", values)

    async def write(self, keys: list[str], values: list[bytes], *, replace: bool) -> list[bool]:
        async def write() -> list[Any]:
            async with self.redis.pipeline(transaction=True) as pipe:
                for key, value in zip(keys, values, strict=True):
                    pipe.set(key, value, nx=not replace, px=self.ttl_ms or None)
                pipe.incr(self.keys.outside_writes)
                replies: list[Any] = await pipe.execute()
            return replies

        replies = await self.call(f"write of {len(keys)} memories", write)
        return [bool(reply) for reply in replies[:-1]]

    async def unlink(self, keys: Sequence[bytes], outside_writes: Collection[str] = ()) -> int:
        async def unlink() -> int:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.unlink(*keys)
                for counter in outside_writes:
                    pipe.incr(counter)
                replies: list[Any] = await pipe.execute()
            return int(replies[0])

        return await self.call(f"unlink of {len(keys)} keys", unlink) if keys else 0

    async def ping(self, timeout_s: float) -> None:
        await self.call("ping", self.redis.ping, budget_s=timeout_s)


def _no_commit_reached(fences: Sequence[int | None], bounds: dict[int, tuple[int, int]]) -> bool:
    """Whether the fences of ``bounds``' partitions (in its order) prove that no commit reached
    the batch's lowest offset in any of them (None: no commit yet, so no proof: the script sets
    it)."""
    return all(
        fence is not None and fence < low
        for fence, (low, _) in zip(fences, bounds.values(), strict=True)
    )


def _offset_bounds(updates: Memories) -> dict[int, tuple[int, int]]:
    """Each partition of the updates' fences: (lowest, highest) offset, partitions ascending."""
    bounds: dict[int, tuple[int, int]] = {}
    for partition in np.unique(updates.fence_partition).tolist():
        offsets = updates.fence_offset[updates.fence_partition == partition]
        bounds[partition] = (int(offsets.min()), int(offsets.max()))
    return bounds
