"""The memory store: each entity's memories in Redis, loaded and committed a batch at a time.

Fences make commits safe under Kafka's at-least-once delivery. Every stored memory carries the
(partition, offset) of the last event applied to it on each partition it came from, and a commit
writes an entity only when its fences cover the stored ones and pass one (``CommitResult``). So
a worker that lost its partition cannot overwrite what the new owner wrote, a replayed batch
applies nothing twice, and a retried commit is harmless. Each batch is one Lua script call
(lua/commit.lua): atomic per entity and one round trip.

``MemoryStore`` checks its settings and hands each call to one of two backends (backend.py):
one server (one_server.py: the fast MSET commit, the memory cache, durable commits) or a Redis
Cluster (cluster.py, ``redis+cluster://host:port[,host:port...]``, ``rediss+cluster://`` for
TLS: a batch split by hash slot). Connecting, and keeping passwords out of messages:
connection.py.

Redis calls retry connection errors with exponential backoff and jitter (redis-py's on one
server, the cluster backend's own on a cluster, with a fresh slot map each time); each call,
retries included, is bounded by ``retry_s`` and then raises StoreUnavailableError. A commit
that raises may or may not have been written; it is never reported as applied, and committing
the same updates again is safe. A refusal is not retried: a wrong user or password, or a TLS
certificate that is not trusted (redis-py reports both as connection errors) raises
StoreRefusedError at once. Errors and logs name the URL without its passwords.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from state import codec
from state.backend import APPLIED, MOVED, STALE, Backend, HandOver, Loaded
from state.cache import MemoryCache
from state.cluster import Cluster
from state.codec import StoredMemory
from state.connection import connect, passwords, user_of, without_password
from state.durability import TIMEOUT_MAX_S, Durability
from state.keys import KeyLayout, NamespaceKeys
from state.one_server import OneServer
from stream_lstm.exceptions import ConfigError, StoreError
from stream_lstm.memories import Memories, Shape

__all__ = [
    "APPLIED",
    "MOVED",
    "STALE",
    "CommitResult",
    "HandOver",
    "Loaded",
    "MemoryStore",
    "Sweep",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, eq=False)
class CommitResult:
    """What a commit did with each update: written, stale, or moved.

    - stale: every event of the update is already in the stored memory (its fences are as new
      or newer on every partition): nothing to write, nothing lost.
    - moved: the stored memory has events the update lacks (an entity keyed on several
      partitions was advanced from another one, or it was reset since the update was
      computed) and the update has events it lacks: nothing written; apply the update's new
      events again on what is stored.
    """

    entity_ids: Sequence[str]
    codes: npt.NDArray[np.int64]  # (E,) 1 applied, 0 stale, 2 moved

    @property
    def applied(self) -> npt.NDArray[np.bool_]:
        """(E,) which updates this commit wrote."""
        applied: npt.NDArray[np.bool_] = self.codes == APPLIED
        return applied

    @property
    def applied_ids(self) -> list[str]:
        """Entities whose memory this commit wrote."""
        return self._ids(APPLIED)

    @property
    def stale_ids(self) -> list[str]:
        """Entities whose stored memory already had every event of the update."""
        return self._ids(STALE)

    @property
    def moved_ids(self) -> list[str]:
        """Entities whose stored memory moved on without the update's events: apply them
        again on it."""
        return self._ids(MOVED)

    def _ids(self, code: int) -> list[str]:
        return [self.entity_ids[i] for i in np.flatnonzero(self.codes == code).tolist()]


@dataclass(frozen=True, slots=True)
class Sweep:
    """What ``MemoryStore.gc`` removed (or, in a dry run, would remove) and kept: keys per
    model version of the namespace."""

    removed: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)


class MemoryStore:
    """Entity memories of one namespace and model version, in one Redis.

    Use as ``async with MemoryStore(...) as store`` or close with ``aclose()``.

    - ``ttl_s``: when set, every write (an applied commit or a reset) sets the entity's key to
      expire after this many seconds, so entities idle for longer are forgotten and start again
      from zeros with no fence. A stale commit writes nothing and leaves the TTL as it is.
    - ``retry_s``: how long one call may keep retrying a lost connection before it raises
      StoreUnavailableError.
    - ``dtype``: how commits store the memories. ``"float32"`` is bit-exact; ``"float16"``
      halves them (~600 bytes per entity instead of ~1150 at hidden 128) at the cost of
      rounding them at every write (bench/footprint.py measures the drift). Loads read values
      of either dtype, so a store can switch modes without a migration.
    - ``client``: a ready client to use instead of connecting to ``redis_url`` (the tests pass
      fakeredis); the store closes it. A ``RedisCluster`` client makes it a cluster store.
    - ``cache_entities``: keep up to this many entities' memories as this store committed
      them, and load them from there instead of Redis (cache.py says why that stays right).
      For the one process that owns their partitions: it must call ``forget_cached`` when
      partitions are revoked. One server only: a cluster store ignores it.
    - ``durability``: what Redis must have done with a commit before ``commit_many`` returns
      (replicated, fsynced: durability.py); None, Redis's acknowledgement. Each wait (the AOF,
      the replicas) lasts at most ``durability_timeout_s`` (up to 4 s); when it falls short
      the commit raises StoreUnavailableError. One server only: WAIT covers the writes of one
      connection, and a cluster commit writes through one connection per node.

    ``redis_url`` names one server (``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster
    (``redis+cluster://host:port[,host:port...]``, ``rediss+cluster://``); the API is the same.

    Raises ConfigError for an invalid namespace, model version, ttl_s, retry_s, dtype,
    cache_entities, durability_timeout_s or cluster URL, and for a durability on a cluster.
    """

    def __init__(
        self,
        redis_url: str,
        namespace: str,
        model_version: str,
        ttl_s: float | None = None,
        *,
        retry_s: float = 30.0,
        dtype: str = "float32",
        client: Redis | RedisCluster | None = None,
        cache_entities: int = 0,
        durability: Durability | None = None,
        durability_timeout_s: float = 1.0,
    ) -> None:
        if dtype not in codec.CODES:
            raise ConfigError(f"dtype must be one of {', '.join(codec.CODES)}, got {dtype!r}")
        code = codec.CODES[dtype]
        if ttl_s is not None and not ttl_s > 0:
            raise ConfigError(f"ttl_s must be positive or None, got {ttl_s}")
        if not retry_s > 0:
            raise ConfigError(f"retry_s must be positive, got {retry_s}")
        if cache_entities < 0:
            raise ConfigError(f"cache_entities must be 0 (no cache) or more, got {cache_entities}")
        if not 0 < durability_timeout_s <= TIMEOUT_MAX_S:
            raise ConfigError(
                f"durability_timeout_s must be above 0 and at most {TIMEOUT_MAX_S:g}, "
                f"got {durability_timeout_s}"
            )
        keys = KeyLayout(namespace, model_version)
        redis = client if client is not None else connect(redis_url, retry_s)
        common: dict[str, Any] = {
            "url": without_password(redis_url),
            "user": user_of(redis_url),
            "secrets": passwords(redis_url),
            "ttl_ms": 0 if ttl_s is None else max(1, round(ttl_s * 1000)),
            "retry_s": retry_s,
            "code": code,
        }
        waits = durability if durability is not None and durability.waits else None
        self._backend: Backend[Any]
        if isinstance(redis, RedisCluster):
            if waits is not None:
                raise ConfigError(
                    f"durability {waits} needs one Redis server, not a cluster: WAIT and "
                    "WAITAOF cover the writes of one connection to one node"
                )
            self._backend = Cluster(redis, keys, **common)
        else:
            cache = (
                MemoryCache(
                    cache_entities,
                    ttl_s=ttl_s,
                    rounding=None if code == codec.FLOAT32 else codec.DTYPES[code],
                )
                if cache_entities
                else None
            )
            self._backend = OneServer(
                redis,
                keys,
                cache=cache,
                durability=waits,
                durability_timeout_s=durability_timeout_s,
                **common,
            )
        logger.debug("memory store %s at %s", keys.memory_prefix, common["url"])

    @property
    def model_version(self) -> str:
        """The model version whose memories this store holds."""
        return self._backend.keys.model_version

    @property
    def namespace(self) -> str:
        """The namespace (a worker's app id) whose memories this store holds."""
        return self._backend.keys.namespace

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections."""
        await self._backend.aclose()

    async def load_many(
        self, entity_ids: Sequence[str], shape: Shape, *, partitions: Collection[int] = ()
    ) -> Loaded:
        """The stored memories of these entities (``shape``: the model's, ``StreamModel.shape``),
        in one MGET; zeros and no fence where nothing is stored.

        ``partitions``: the input partitions of the batch about to be committed; on one server
        their fences come back in ``partition_fences``, in the same MGET, so that
        ``commit_many(updates, loaded=...)`` can take the fast commit.

        On a cluster, one MGET per slot, pipelined: one round trip per node.
        Raises StoreError naming the entity when a value does not decode or has another shape.
        """
        if not entity_ids:
            return Loaded(Memories.zeros(entity_ids, shape))
        return await self._backend.load(entity_ids, shape, partitions)

    async def commit_many(self, updates: Memories, *, loaded: Loaded | None = None) -> CommitResult:
        """Write each update (a memory with the fences of the last events applied to it) whose
        fences cover the stored ones and pass one, in one script call.

        On a cluster, one script call per slot, pipelined: one round trip per node. Repeats of
        an entity share its slot, so they stay in one call, in order.

        ``loaded``: what ``load_many`` returned for these entities in this batch, asked with
        the updates' partitions (a load refuses a foreign value); each entity appears once. On
        one server without a TTL the batch may then skip the script for one MSET when the
        partition fences and the outside-writes counter prove the script would write every
        update (one_server.py); that path does not read the stored values again. Pass it
        only when the updates were computed from what that load returned (or from updates
        still being committed in order before them, all written since).

        Raises StoreError when a stored value is foreign: then nothing in the batch is written,
        on a cluster nothing in that value's slot (the other slots' updates are committed,
        which is safe: committing the batch again applies nothing twice). Raises
        StoreUnavailableError when Redis does not answer within the retry budget (or, with a
        ``durability``, does not make the commit durable in time).
        """
        if not updates.entity_ids:
            return CommitResult(updates.entity_ids, np.zeros(0, dtype=np.int64))
        keys = self._backend.keys.memories(updates.entity_ids)
        values = codec.encode_many(updates, time.time(), self._backend.code)
        codes = await self._backend.commit(updates, keys, values, loaded)
        if (codes < 0).any():
            foreign = [updates.entity_ids[i] for i in np.flatnonzero(codes < 0).tolist()]
            raise StoreError(
                f"entities {foreign[:5]!r} hold values that are not stream-lstm memories; "
                f"nothing in {self._backend.written} was written"
            )
        return CommitResult(updates.entity_ids, codes)

    async def get(self, entity_id: str) -> StoredMemory | None:
        """One entity's stored memory, or None."""
        return await self._backend.get(entity_id)

    async def reset(self, entity_id: str) -> bool:
        """Zero an entity's memories and step, keeping its fences; False if nothing is stored.

        The fences stay so that a replay of events from before the reset still applies
        nothing. Events after the reset build on the zeros. The reset counts itself among the
        fences, so a batch that read the memory before the reset and commits after it finds
        its commit moved, and applies its events again on the zeros: the reset holds. On one
        server it also counts itself as an outside write, so every worker's cache lets go.
        """
        return await self._backend.reset(entity_id)

    async def eviction_policy(self) -> str | None:
        """Redis's ``maxmemory-policy``, or None when it cannot be read (a managed Redis may
        refuse CONFIG, a cluster store does not ask)."""
        return await self._backend.eviction_policy()

    async def info(self) -> dict[str, Any] | None:
        """Redis's INFO (its default sections), or None when it cannot be read (a managed Redis
        may refuse it) or the store is on a cluster."""
        return await self._backend.info()

    async def recorded_topic(self) -> str | None:
        """The input topic recorded as the one the fences count (``claim_topic``), or None."""
        return await self._backend.recorded_topic()

    async def claim_topic(self, identity: str) -> str | None:
        """Record ``identity`` as the input topic whose offsets the fences count, unless one is
        recorded already: return that one (None: this call recorded it).

        A read once one is recorded, so it works on a Redis at maxmemory; the write is one
        atomic command, so of two workers starting on two topics only one records its own.
        """
        return await self._backend.claim_topic(identity)

    async def taken_over(self, app_id: str | None = None) -> HandOver | None:
        """Whether another deployment took this app id's stream over, or one of its workers
        is claiming it (``claim_take_over``; another app id's with ``app_id``): then no worker
        of that app id may emit again. None: nothing recorded."""
        namespace = self._backend.keys.namespace if app_id is None else app_id
        return await self._backend.taken_over(KeyLayout(namespace, self.model_version))

    async def claim_take_over(self, old_app_id: str, token: str, ttl_s: float) -> HandOver:
        """Claim the right to record this store's app id (its namespace) as the deployment that
        takes ``old_app_id``'s stream over, for ``ttl_s`` (a claimant that dies lets go): written
        only when nothing is recorded, atomically. Returns what is recorded: the claim with
        ``token`` when it is this caller's."""
        claim = HandOver(self._backend.keys.namespace, claim=token)
        ttl_ms = max(1, round(ttl_s * 1000))
        recorded = await self._backend.take_over(self._old(old_app_id), "claim", claim, ttl_ms)
        assert recorded is not None, "a claim leaves a record"
        return recorded

    async def record_take_over(
        self, old_app_id: str, claim: HandOver, offsets: Mapping[int, int]
    ) -> HandOver | None:
        """Record the take-over with the offsets its new deployment emits from, in place of
        ``claim``, if that claim is still what is recorded; returns what is recorded then."""
        record = HandOver(claim.by, dict(offsets)).encode()
        return await self._backend.take_over(self._old(old_app_id), "record", claim, record)

    async def release_take_over(self, old_app_id: str, claim: HandOver) -> None:
        """Delete ``claim`` if it is still what is recorded."""
        await self._backend.take_over(self._old(old_app_id), "release", claim, 0)

    def _old(self, app_id: str) -> KeyLayout:
        return KeyLayout(app_id, self.model_version)

    def forget_cached(self) -> None:
        """Drop every cached memory: another process may write them from now on."""
        self._backend.forget_cached()

    async def count(self) -> int:
        """Entities stored under this namespace and model version.

        SCANs the whole keyspace (O(all keys), non-blocking; on a cluster every primary): for
        tests and operators, not for the hot path. Exact on a quiet keyspace; SCAN may count a
        key twice while Redis resizes its table (or a cluster moves a slot).
        """
        return await self._backend.count()

    async def ping(self, timeout_s: float = 2.0) -> None:
        """Return when Redis answers within ``timeout_s``, else raise StoreUnavailableError;
        StoreRefusedError when it refuses our credentials or we do not trust its certificate.

        For health checks and start-up, which must answer quickly rather than wait out
        ``retry_s``. On a cluster every primary must answer.
        """
        await self._backend.ping(timeout_s)

    async def export_chunks(
        self, shape: Shape, chunk: int = 1000
    ) -> AsyncIterator[tuple[list[str], list[bytes]]]:
        """Every memory stored under this namespace and model version, as Redis holds it (the
        codec's bytes: states, step, fences, updated_at), about ``chunk`` entities at a time.

        SCAN, then one MGET a chunk, so memory stays bounded whatever the keyspace. Each value
        is checked to decode to ``shape``, the model's: StoreError naming the entity, so that
        nothing exported is refused on import. Not a snapshot: each memory is as its MGET read
        it; a key that expired or was deleted since SCAN found it is left out, and a key SCAN
        returned twice (while Redis resized its table) comes twice.
        """
        layout = self._backend.keys
        entity_ids: list[str] = []
        async for keys in self._backend.scan(layout.memory_pattern):
            entity_ids += [e for e in map(layout.entity_id, keys) if e is not None]
            while len(entity_ids) >= chunk:
                read = await self._read_stored(entity_ids[:chunk], shape)
                del entity_ids[:chunk]
                if read[0]:
                    yield read
        if entity_ids:
            read = await self._read_stored(entity_ids, shape)
            if read[0]:
                yield read

    async def _read_stored(
        self, entity_ids: list[str], shape: Shape
    ) -> tuple[list[str], list[bytes]]:
        """What is stored of these entities, checked: those found and their values."""
        values = await self._backend.read(self._backend.keys.memories(entity_ids))
        codec.decode_many(entity_ids, values, shape, self._backend.code)
        found = [(e, v) for e, v in zip(entity_ids, values, strict=True) if v is not None]
        return [e for e, _ in found], [v for _, v in found]

    async def import_chunk(
        self,
        entity_ids: Sequence[str],
        values: Sequence[bytes],
        shape: Shape,
        *,
        replace: bool = False,
    ) -> npt.NDArray[np.bool_]:
        """Store these values (as ``export_chunks`` read them) as the entities' memories, with
        the store's TTL: an entity that already has a memory keeps it unless ``replace``.
        Returns (E,) which were written.

        Each value is checked to decode to ``shape`` first: StoreError naming the entity, and
        nothing written. On one server the writes count as one outside write, in the same
        transaction, so every worker's memory cache lets go of the entities they replace.
        """
        if not entity_ids:
            return np.zeros(0, dtype=np.bool_)
        codec.decode_many(entity_ids, values, shape, self._backend.code)
        keys = self._backend.keys.memories(entity_ids)
        written = await self._backend.write(keys, list(values), replace=replace)
        return np.asarray(written, dtype=np.bool_)

    async def erase(self, entity_id: str) -> list[str]:
        """Delete the entity's memory under every model version of this namespace (not only
        this store's version): the versions it had one under, sorted; [] when none.

        The keys are found by one SCAN over a pattern (O(all keys)) and checked one by one. On
        one server the deletion counts as an outside write of each of those versions, in the
        same transaction, so no worker's memory cache writes a memory back; on a cluster there
        is no cache. A batch a worker had already loaded the entity for may still commit it
        afterwards: erase once the entity's events have stopped.
        """
        namespace = NamespaceKeys(self.namespace)
        found: dict[bytes, str] = {}
        async for keys in self._backend.scan(namespace.entity_pattern(entity_id)):
            for key in keys:
                version = namespace.version_of_memory(key, entity_id)
                if version is not None:
                    found[key] = version
        versions = sorted(set(found.values()))
        counters = [namespace.layout(version).outside_writes for version in versions]
        await self._backend.unlink(list(found), counters)
        return versions

    async def has_memories(self, model_version: str | None = None) -> bool:
        """Whether any memory is stored under this namespace and ``model_version`` (this
        store's when None): a SCAN that stops at the first one (O(all keys) when none is)."""
        layout = KeyLayout(self.namespace, model_version or self.model_version)
        scan = self._backend.scan(layout.memory_pattern)
        async with contextlib.aclosing(scan):
            async for keys in scan:
                if any(layout.entity_id(key) is not None for key in keys):
                    return True
        return False

    async def gc(
        self,
        keep: Collection[str] = (),
        *,
        dry_run: bool = False,
        chunk: int = 1000,
        progress: Callable[[Sweep], None] | None = None,
    ) -> Sweep:
        """Remove every key of this namespace under any model version but this store's and
        ``keep``: memories, partition fences, outside-writes counters, durability markers and
        recorded topics (keys.py). ``dry_run``: count them, delete nothing.

        One SCAN of the namespace's keys (O(all keys), never another namespace's, nor a key of
        it stream-lstm does not write), deleting them with UNLINK about ``chunk`` at a time (on
        a cluster one UNLINK per key, a pipeline per node). ``progress`` is called with the
        counts so far after each chunk. For versions no worker runs any more: one still running
        a removed version loses its memories (those it has cached it may write back). Raises
        ConfigError for a version in ``keep`` that is no valid model version.
        """
        namespace = NamespaceKeys(self.namespace)
        for name in keep:
            namespace.layout(name)  # ConfigError for a name no version has
        kept = {self.model_version, *keep}
        sweep = Sweep()
        doomed: list[bytes] = []

        async def remove() -> None:
            if not dry_run:
                await self._backend.unlink(doomed)
            doomed.clear()
            if progress is not None:
                progress(sweep)

        async for keys in self._backend.scan(namespace.pattern):
            for key in keys:
                version = namespace.version_of(key)
                if version is None:
                    continue
                tally = sweep.kept if version in kept else sweep.removed
                tally[version] = tally.get(version, 0) + 1
                if version not in kept:
                    doomed.append(key)
            if len(doomed) >= chunk:
                await remove()
        await remove()
        return sweep
