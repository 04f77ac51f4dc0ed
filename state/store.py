"""The memory store: each entity's LTM/STM in Redis, loaded and committed a batch at a time.

Fences make commits safe under Kafka's at-least-once delivery. Every stored memory carries the
(partition, offset) of the last event applied to it, and a commit writes an entity only when
its fence is newer than the stored one:

- nothing is stored yet, or
- the partition differs (the entity's key was re-partitioned, e.g. after the topic grew; the
  new partition's offsets are not comparable with the old ones, so the latest writer wins), or
- the offset is greater than the stored offset.

So a worker that lost its partition cannot overwrite what the new owner wrote, a replayed batch
applies nothing twice, and a retried commit is harmless. Each batch is one Lua script call:
atomic per entity and one round trip.

On one server a batch usually skips the script (``MemoryStore._commit_fast``): every commit
also raises its partitions' fence keys, so when those prove that no commit reached the batch's
offsets, the script would write every update, and a WATCHed MULTI/MSET writes the same for a
tenth of Redis's CPU.

On a Redis Cluster (``redis+cluster://host:port[,host:port...]``, ``rediss+cluster://`` for
TLS) a script and an MGET may only touch keys of one hash slot, and each entity's key is its
own slot (keys.py). So a batch is split by slot: a load is redis-py's ``mget_nonatomic`` (one
MGET per slot), a commit one fence script call per slot, and each is one pipeline per node:
one round trip to each node that holds some of the batch, all nodes at once. Fences are per
entity, so their guarantees hold slot by slot; what a cluster cannot give is a whole batch
applied or refused as one (see ``MemoryStore.commit_many``).

Redis calls retry connection errors with exponential backoff and jitter (redis-py's on one
server, the store's own on a cluster, with a fresh slot map each time); each call, retries
included, is bounded by ``retry_s`` and then raises StoreUnavailableError. A commit that
raises may or may not have been written; it is never reported as applied, and committing the
same updates again is safe. A refusal is not retried: a wrong user or password, or a TLS
certificate that is not trusted (redis-py reports both as connection errors) raises
StoreRefusedError at once. Errors and logs name the URL without its passwords.

With a ``durability`` (durability.py) a commit also waits until Redis has replicated or fsynced
it, and raises StoreUnavailableError when that does not happen in time (``_make_durable``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import hiredis
import numpy as np
import numpy.typing as npt
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
    WatchError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from state import codec, scripts
from state.cache import MemoryCache
from state.codec import MemoryBatch, MemoryUpdates, StoredMemory
from state.durability import TIMEOUT_MAX_S, Durability
from state.keys import KeyLayout
from stream_lstm.exceptions import (
    ConfigError,
    StoreError,
    StoreFullError,
    StoreRefusedError,
    StoreUnavailableError,
)

__all__ = ["CommitResult", "MemoryStore"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_BACKOFF_BASE_S = 0.01
_BACKOFF_CAP_S = 1.0
_CONNECT_TIMEOUT_S = 5.0
"""A connect slower than this counts as a failed attempt (then retried)."""
_REPLY_TIMEOUT_S = 5.0
"""A reply slower than this counts as a failed attempt, and the command is sent again: harmless,
since loads only read and a repeated fenced commit applies nothing twice (it reports stale).
``retry_s`` bounds the whole call. (Also redis-py's own default, stated here so it is ours.)"""
_SCAN_COUNT = 1000

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""URL schemes naming a Redis Cluster, and the plain scheme of each node. redis-py has no cluster
scheme of its own: ``redis+cluster://[user:password@]host:port[,host:port...][?option=value]``
lists seed nodes (any one that answers is enough to discover the rest); options are redis-py's
URL options, as for ``redis://``. No database number: a cluster has only database 0."""
_CLUSTER_RETRIES = 0
"""redis-py's own retries of a cluster call. None: it still follows MOVED and ASK within a call,
but a lost node is retried by ``MemoryStore._call``, with backoff and a fresh slot map, and
only for what that node has not answered (redis-py would resend a pipeline's unanswered calls,
but after closing every connection of the client, those of calls still in flight included)."""
_CLUSTER_SOCKET_TIMEOUT_S = 5.0
"""A cluster node that stops answering counts as lost after this, so redis-py refreshes the
slot map (a replica may have taken over) instead of waiting out ``retry_s`` on it."""


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


STALE, APPLIED, MOVED = 0, 1, 2


@dataclass(slots=True, eq=False)
class _SlotCommit:
    """A cluster commit in progress, kept across retries: the codes of the slots answered."""

    keys: list[str]
    values: list[bytes]
    codes: list[int]  # (E,)
    pending: list[list[int]]  # the rows of each slot whose script call has not answered


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
        self._code = codec.CODES[dtype]
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
        self._keys = KeyLayout(namespace, model_version)
        self._url = without_password(redis_url)
        self._user = _user(redis_url)
        self._secrets = _passwords(redis_url)
        self._ttl_ms = 0 if ttl_s is None else max(1, round(ttl_s * 1000))
        self._retry_s = retry_s
        self._redis = client if client is not None else _connect(redis_url, retry_s)
        self._cluster = self._redis if isinstance(self._redis, RedisCluster) else None
        self._durability = durability if durability is not None and durability.waits else None
        self._durability_timeout_s = durability_timeout_s
        self._run_id: str | None = None  # of the server that took the last durable commit
        if self._durability is not None and self._cluster is not None:
            raise ConfigError(
                f"durability {self._durability} needs one Redis server, not a cluster: WAIT and "
                "WAITAOF cover the writes of one connection to one node"
            )
        self._cache = (
            MemoryCache(
                cache_entities,
                ttl_s=ttl_s,
                rounding=None if self._code == codec.FLOAT32 else codec.DTYPES[self._code],
            )
            if cache_entities and self._cluster is None
            else None
        )
        self._commit = self._redis.register_script(scripts.COMMIT)
        self._reset = self._redis.register_script(scripts.RESET)
        logger.debug("memory store %s at %s", self._keys.memory_prefix, self._url)

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
        await self._redis.aclose()

    async def load_many(
        self,
        entity_ids: Sequence[str],
        layers: int,
        hidden: int,
        *,
        partitions: Collection[int] = (),
    ) -> MemoryBatch:
        """The stored memories of these entities, in one MGET; zeros where nothing is stored.

        ``partitions``: the input partitions of the batch about to be committed; on one server
        their fences come back in ``partition_fences``, in the same MGET, so that
        ``commit_many(updates, loaded=...)`` can take the fast commit.

        On a cluster, one MGET per slot, pipelined: one round trip per node.
        Raises StoreError naming the entity when a value does not decode or has another shape.
        """
        if not entity_ids:
            return codec.decode_many(entity_ids, [], layers, hidden, self._code)
        cluster = self._cluster
        if cluster is not None:
            keys = self._keys.memories(entity_ids)
            values = await self._call(
                f"load_many of {len(keys)} entities", lambda: cluster.mget_nonatomic(keys)
            )
            return codec.decode_many(entity_ids, values, layers, hidden, self._code)
        cache = self._cache
        if cache is None:
            return await self._load_one_server(entity_ids, layers, hidden, partitions)
        slots = cache.find(entity_ids, layers, hidden)  # (E,) -1: not cached
        missed = np.flatnonzero(slots < 0).tolist()
        if len(missed) == len(entity_ids):
            return await self._load_one_server(entity_ids, layers, hidden, partitions)
        generation = cache.generation
        memories = await self._load_one_server(
            [entity_ids[i] for i in missed], layers, hidden, partitions
        )
        if cache.generation != generation:  # a reset came since: the cache was cleared
            return await self._load_one_server(entity_ids, layers, hidden, partitions)
        batch = dataclasses.replace(
            cache.take(entity_ids, slots),
            other_fences={missed[row]: f for row, f in memories.other_fences.items()},
            partition_fences=memories.partition_fences,
            outside_writes=memories.outside_writes,
        )
        if missed:
            batch.ltm[missed], batch.stm[missed] = memories.ltm, memories.stm
            batch.step[missed], batch.found[missed] = memories.step, memories.found
            batch.fence_partition[missed] = memories.fence_partition
            batch.fence_offset[missed] = memories.fence_offset
        return batch

    async def _load_one_server(
        self,
        entity_ids: Sequence[str],
        layers: int,
        hidden: int,
        partitions: Collection[int],
    ) -> MemoryBatch:
        """One MGET of the memories, the partitions' fences and the outside-writes counter; a
        counter that moved clears the cache."""
        keys = self._keys.memories(entity_ids)
        fenced = sorted(partitions)
        fence_keys = [self._keys.fence(partition) for partition in fenced]
        values = cast(
            "list[bytes | None]",
            await self._call(
                f"load_many of {len(keys)} entities",
                lambda: self._redis.mget(keys + fence_keys + [self._keys.outside_writes]),
            ),
        )
        memories = codec.decode_many(entity_ids, values[: len(keys)], layers, hidden, self._code)
        stored = values[len(keys) : len(keys) + len(fence_keys)]
        fences = {p: None if f is None else int(f) for p, f in zip(fenced, stored, strict=True)}
        if self._cache is not None:
            self._cache.check_outside_writes(values[-1])
        return dataclasses.replace(memories, partition_fences=fences, outside_writes=values[-1])

    async def commit_many(
        self, updates: MemoryUpdates, *, loaded: MemoryBatch | None = None
    ) -> CommitResult:
        """Write each update whose fences cover the stored ones and pass one, in one script call.

        On a cluster, one script call per slot, pipelined: one round trip per node. Repeats of
        an entity share its slot, so they stay in one call, in order.

        ``loaded``: what ``load_many`` returned for these entities in this batch, asked with
        the updates' partitions (a load refuses a foreign value); each entity appears once. On
        one server without a TTL the batch may then skip the script for one MSET when the
        partition fences and the outside-writes counter prove the script would write every
        update (``_commit_fast``); that path does not read the stored values again. Pass it
        only when the updates were computed from what that load returned (or from updates
        still being committed in order before them, all written since).

        Raises StoreError when a stored value is foreign: then nothing in the batch is written,
        on a cluster nothing in that value's slot (the other slots' updates are committed,
        which is safe: committing the batch again applies nothing twice). Raises
        StoreUnavailableError when Redis does not answer within the retry budget.
        """
        if not updates.entity_ids:
            return CommitResult(updates.entity_ids, np.zeros(0, dtype=np.int64))
        keys = self._keys.memories(updates.entity_ids)
        values = codec.encode_many(updates, time.time(), self._code)
        what = f"commit_many of {len(keys)} entities"
        cluster, cache = self._cluster, self._cache
        sent = time.monotonic()  # before Redis sets any TTL: cached entries age no slower
        generation = cache.generation if cache is not None else 0
        if self._durability is not None and self._run_id is None:
            self._run_id = await self._call("run id", self._server_run_id)
        try:
            if cluster is None:
                answer = await self._call(
                    what, lambda: self._commit_one_server(keys, values, updates, loaded)
                )
            else:
                slots: dict[int, list[int]] = {}
                for row, key in enumerate(keys):
                    slots.setdefault(cluster.keyslot(key), []).append(row)
                commit = _SlotCommit(keys, values, [0] * len(keys), list(slots.values()))
                answer = await self._call(what, lambda: self._commit_slots(commit))
            await self._make_durable(what)
        except BaseException:
            if cache is not None:
                cache.evict(updates.entity_ids)  # written or not: read them back
            raise
        codes = np.asarray(answer, dtype=np.int64)
        if cache is not None:
            cache.put(updates, codes == APPLIED, sent, generation)
        if (codes < 0).any():
            foreign = [updates.entity_ids[i] for i in np.flatnonzero(codes < 0).tolist()]
            written = "their hash slots" if self._cluster is not None else "this batch"
            raise StoreError(
                f"entities {foreign[:5]!r} hold values that are not stream-lstm memories of "
                f"format {codec.FORMAT_VERSION}; nothing in {written} was written"
            )
        return CommitResult(updates.entity_ids, codes)

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
        durability = self._durability
        if durability is None:
            return

        async def wait() -> tuple[str, list[Any]]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.incr(self._keys.durable)
                for command in durability.commands(self._durability_timeout_s):
                    pipe.execute_command(*command)
                pipe.info("server")
                _, *replies, info = await pipe.execute()
            return str(info["run_id"]), replies

        run_id, replies = await self._call(f"{what}: {durability}", wait)
        if run_id != self._run_id:
            self._run_id = run_id
            raise StoreUnavailableError(
                f"{what}: Redis at {self._url} restarted or failed over since the commit was "
                "written (another run id): it may not have it; not counted as committed"
            )
        missing = durability.shortfall(replies)
        if missing is not None:
            raise StoreUnavailableError(
                f"{what}: Redis at {self._url} did not make it durable ({durability}) within "
                f"{self._durability_timeout_s:g} s: {missing}; not counted as committed"
            )

    async def _commit_one_server(
        self,
        keys: list[str],
        values: list[bytes],
        updates: MemoryUpdates,
        loaded: MemoryBatch | None,
    ) -> list[int]:
        """The fast commit where it writes exactly what the script would, else the script.

        What the load read decides whether to try: a partition fence already reached, an
        entity with fences on several partitions, means the script at once, in one round trip.
        """
        bounds = _offset_bounds(updates)
        fence_keys = [self._keys.fence(partition) for partition in bounds]
        counter = self._keys.outside_writes
        if (
            loaded is not None
            and not self._ttl_ms
            and not updates.spans_partitions()
            and _no_commit_reached([loaded.partition_fences.get(p) for p in bounds], bounds)
        ):
            absent = {loaded.entity_ids[i] for i in np.flatnonzero(~loaded.found).tolist()}
            new = [row for row, e in enumerate(updates.entity_ids) if e in absent]
            written = await self._commit_fast(keys, values, fence_keys, bounds, loaded, new)
            if written is not None:
                codes = [APPLIED] * len(keys)
                if not written:  # another writer created some new entity: the script decides
                    answer: list[int] = await self._commit(
                        keys=[*(keys[row] for row in new), counter],
                        args=[self._ttl_ms, len(new), 0, *(values[row] for row in new)],
                    )
                    for row, code in zip(new, answer, strict=True):
                        codes[row] = code
                return codes
        highest = [str(high) for _, high in bounds.values()]
        script: list[int] = await self._commit(
            keys=[*keys, *fence_keys, counter],
            args=[self._ttl_ms, len(keys), len(fence_keys), *values, *highest],
        )
        return script

    async def _commit_fast(
        self,
        keys: list[str],
        values: list[bytes],
        fence_keys: list[str],
        bounds: dict[int, tuple[int, int]],
        loaded: MemoryBatch,
        new: list[int],
    ) -> bool | None:
        """MSET the batch when the script would write every update: True when all of it was
        written, False when the ``new`` rows were not (the rest was), None when nothing was.

        The script costs Redis ~8 us per entity (each value goes through Lua), a plain MSET
        ~0.3. It writes an update whose fences cover the stored ones and pass one. Every commit
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
        counter = self._keys.outside_writes
        async with self._redis.pipeline(transaction=True) as pipe:
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

    async def _commit_slots(self, commit: _SlotCommit) -> list[int]:
        """The fenced script once per slot, one pipeline per node; codes in the batch's order.

        redis-py sends each node its calls in one write and reads the replies back: one round
        trip per node, all nodes at once; it follows MOVED/ASK redirections call by call. A
        node that lost the script (a restart, a failover) answers NOSCRIPT: the script is
        loaded on every primary and those calls are sent again. When a node fails, its calls
        stay pending in ``commit`` and the error goes up to ``_call``, whose retry sends only
        them: an update a healthy node applied is never sent twice (it would come back stale).
        """
        cluster = self._cluster
        assert cluster is not None, "only a cluster store commits by slot"
        await cluster.initialize()  # the slot map, to group the calls by node
        for _ in range(2):  # a second pass only for calls a node answered NOSCRIPT
            by_node: dict[str, list[list[int]]] = {}
            for rows in commit.pending:
                node = cluster.get_node_from_key(commit.keys[rows[0]])
                by_node.setdefault(node.name if node else "", []).append(rows)
            sends = list(by_node.values())
            replies = await asyncio.gather(
                *(self._send_slots(cluster, commit, send) for send in sends),
                return_exceptions=True,
            )
            commit.pending, failure, unloaded = [], None, False
            for send, reply in zip(sends, replies, strict=True):
                if isinstance(reply, BaseException):  # the node: none of its calls answered
                    commit.pending += send
                    failure = failure or reply
                    continue
                for rows, answer in zip(send, reply, strict=True):
                    if isinstance(answer, BaseException):  # this call did not run
                        commit.pending.append(rows)
                        if isinstance(answer, NoScriptError):
                            unloaded = True
                        else:
                            failure = failure or answer
                    else:
                        for row, code in zip(rows, answer, strict=True):
                            commit.codes[row] = code
            if failure is not None:
                raise failure
            if not unloaded:
                return commit.codes
            self._commit.sha = await cluster.script_load(self._commit.script)
        raise StoreError("the commit script is still not loaded after SCRIPT LOAD")

    async def _send_slots(
        self, cluster: RedisCluster, commit: _SlotCommit, send: list[list[int]]
    ) -> list[Any]:
        """One pipeline: a script call per slot (its rows), replies or errors in order."""
        pipe = cluster.pipeline()
        for rows in send:
            pipe.execute_command(
                "EVALSHA",
                self._commit.sha,
                len(rows),
                *[commit.keys[row] for row in rows],
                self._ttl_ms,
                len(rows),
                0,  # no partition fences on a cluster
                *[commit.values[row] for row in rows],
            )
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def get(self, entity_id: str) -> StoredMemory | None:
        """One entity's stored memory, or None."""
        key = self._keys.memory(entity_id)
        value = await self._call(f"get of {entity_id!r}", lambda: self._redis.get(key))
        if value is None:
            return None
        try:
            return codec.decode(cast("bytes", value))
        except StoreError as error:
            raise StoreError(f"entity {entity_id!r}: {error}") from None

    async def reset(self, entity_id: str) -> bool:
        """Zero an entity's memories and step, keeping its fences; False if nothing is stored.

        The fences stay so that a replay of events from before the reset still applies
        nothing. Events after the reset build on the zeros. The reset counts itself among the
        fences, so a batch that read the memory before the reset and commits after it finds
        its commit moved, and applies its events again on the zeros: the reset holds. On one
        server it also counts itself as an outside write, so every worker's cache lets go.
        """
        keys = [self._keys.memory(entity_id)]
        if self._cluster is None:
            keys.append(self._keys.outside_writes)
        updated_at = codec.UPDATED_AT.pack(time.time())
        code: int = await self._call(
            f"reset of {entity_id!r}",
            lambda: self._reset(keys=keys, args=[self._ttl_ms, updated_at]),
        )
        if code < 0:
            raise StoreError(f"entity {entity_id!r}: stored value is not a stream-lstm memory")
        return code == 1

    async def eviction_policy(self) -> str | None:
        """Redis's ``maxmemory-policy``, or None when it cannot be read (a managed Redis may
        refuse CONFIG)."""
        if self._cluster is not None:
            return None
        try:
            reply = await self._call(
                "config get", lambda: self._redis.config_get("maxmemory-policy")
            )
        except StoreError:
            return None
        policy = reply.get("maxmemory-policy")
        return policy.decode() if isinstance(policy, bytes) else policy

    async def _server_run_id(self) -> str:
        """The run id of the server process answering: another after a restart or failover."""
        info = await self._redis.info("server")
        return str(info["run_id"])

    async def info(self) -> dict[str, Any] | None:
        """Redis's INFO (its default sections), or None when it cannot be read (a managed Redis
        may refuse it) or the store is on a cluster."""
        if self._cluster is not None:
            return None
        try:
            info: dict[str, Any] = await self._call("info", self._redis.info)
        except StoreError:
            return None
        return info

    async def claim_topic(self, identity: str) -> str | None:
        """Record ``identity`` as the input topic whose offsets the fences count, unless one is
        recorded already: return that one (None: this call recorded it).

        A read once one is recorded, so it works on a Redis at maxmemory; the write is one
        atomic command, so of two workers starting on two topics only one records its own.
        """
        key = self._keys.topic
        recorded: Any = await self._call("claim_topic", lambda: self._redis.get(key))
        if recorded is None:
            recorded = await self._call(
                "claim_topic", lambda: self._redis.set(key, identity, nx=True, get=True)
            )
        return None if recorded is None else cast("bytes", recorded).decode()

    def forget_cached(self) -> None:
        """Drop every cached memory: another process may write them from now on."""
        if self._cache is not None:
            self._cache.clear()

    async def count(self) -> int:
        """Entities stored under this namespace and model version.

        SCANs the whole keyspace (O(all keys), non-blocking; on a cluster every primary): for
        tests and operators, not for the hot path. Exact on a quiet keyspace; SCAN may count a
        key twice while Redis resizes its table (or a cluster moves a slot).
        """
        pattern, cursor, total = self._keys.memory_pattern, 0, 0
        cluster = self._cluster
        if cluster is not None:
            return await self._call("count", lambda: _count_cluster(cluster, pattern))
        while True:
            scan = functools.partial(self._redis.scan, cursor, match=pattern, count=_SCAN_COUNT)
            cursor, keys = await self._call("count", scan)
            total += len(keys)
            if cursor == 0:
                return total

    async def ping(self, timeout_s: float = 2.0) -> None:
        """Return when Redis answers within ``timeout_s``, else raise StoreUnavailableError;
        StoreRefusedError when it refuses our credentials or we do not trust its certificate.

        For health checks and start-up, which must answer quickly rather than wait out
        ``retry_s``. On a cluster every primary must answer.
        """
        cluster = self._cluster
        if cluster is not None:
            await self._call(
                "ping",
                lambda: cluster.execute_command("PING", target_nodes=RedisCluster.PRIMARIES),
                budget_s=timeout_s,
            )
        else:
            await self._call("ping", self._redis.ping, budget_s=timeout_s)

    async def _call(
        self, what: str, operation: Callable[[], Awaitable[T]], budget_s: float | None = None
    ) -> T:
        """Run one Redis call within the retry budget; map failures to StoreError.

        A single server's client retries lost connections itself. A cluster client tries once
        (following MOVED and ASK redirections; it raises RedisClusterException when no node
        answers at all), so on a cluster the call is retried here, with the same backoff.
        Neither retries a refusal (``_refused``): it raises StoreRefusedError at once.
        """
        budget_s = self._retry_s if budget_s is None else budget_s
        failures: list[BaseException] = []
        try:
            async with asyncio.timeout(budget_s) as scope:
                if self._cluster is None:
                    return await operation()
                deadline = cast("float", scope.when())
                return await _retry_transient(self._cluster, operation, failures, deadline)
        except (TimeoutError, RedisError, RedisClusterException) as error:
            cause = failures[-1] if failures and isinstance(error, TimeoutError) else error
            # One server: the timeout cancelled redis-py's backoff after the error it retries.
            cause = next((e for e in _chain(cause) if isinstance(e, RedisError)), cause)
            refused = _refused(cause)
            if refused is not None:
                why = _why_refused(refused, self._user)
                raise StoreRefusedError(
                    _scrubbed(f"{what}: Redis at {self._url} refused us: {why}", self._secrets)
                ) from error
            if any(isinstance(e, OutOfMemoryError) for e in _chain(cause)):
                raise StoreFullError(
                    _scrubbed(
                        f"{what}: Redis at {self._url} is full (maxmemory) and refuses writes "
                        "until memory is freed",
                        self._secrets,
                    )
                ) from error
            if not isinstance(error, (TimeoutError, RedisConnectionError, RedisTimeoutError)):
                raise StoreError(
                    _scrubbed(f"{what}: Redis at {self._url} failed: {error}", self._secrets)
                ) from error
            shown = _scrubbed(f"{type(cause).__name__}: {cause}".removesuffix(": "), self._secrets)
            # The caller decides what to tell: the worker logs its retries, the CLI one line.
            logger.debug("%s: Redis at %s unavailable: %s", what, self._url, shown)
            raise StoreUnavailableError(
                f"{what}: Redis at {self._url} did not answer within {budget_s:g} s "
                f"of retries ({shown})"
            ) from error


def _no_commit_reached(fences: Sequence[int | None], bounds: dict[int, tuple[int, int]]) -> bool:
    """Whether the fences of ``bounds``' partitions (in its order) prove that no commit reached
    the batch's lowest offset in any of them (None: no commit yet, so no proof: the script sets
    it)."""
    return all(
        fence is not None and fence < low
        for fence, (low, _) in zip(fences, bounds.values(), strict=True)
    )


def _offset_bounds(updates: MemoryUpdates) -> dict[int, tuple[int, int]]:
    """Each partition of the updates' fences: (lowest, highest) offset, partitions ascending."""
    bounds: dict[int, tuple[int, int]] = {}
    for partition in np.unique(updates.fence_partition).tolist():
        offsets = updates.fence_offset[updates.fence_partition == partition]
        bounds[partition] = (int(offsets.min()), int(offsets.max()))
    return bounds


_CLIENT_CERTIFICATE_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "TLSV1_ALERT_UNKNOWN_CA",
}
"""TLS alerts of a server that refused our client certificate (or our lack of one)."""
_NAME_MISMATCHES = {62, 64}
"""OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH."""


def names_another_host(error: ssl.SSLCertVerificationError) -> bool:
    """Whether a server's certificate was refused for naming another host or IP address (not
    for an issuer we do not trust): the hostname check's doing, not the CA's."""
    return error.verify_code in _NAME_MISMATCHES


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it was raised from or while handling, nearest first (a few: redis-py's
    chains are short; never a long or cyclic one)."""
    seen: BaseException | None = error
    for _ in range(5):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def _refused(error: BaseException) -> BaseException | None:
    """The refusal behind ``error`` when Redis refused us for good, else None.

    redis-py raises AuthenticationError, a ConnectionError, for a wrong user or password
    (WRONGPASS) and for none given (NOAUTH); a TLS failure is a ConnectionError raised while
    handling the ssl error (its ``__context__``); a cluster client raises RedisClusterException
    from either (its ``__cause__``). Any of them would be retried as if Redis were down. A user
    without a permission the store needs gets NoPermissionError (NOPERM), never retried.
    """
    for seen in _chain(error):
        if isinstance(seen, (AuthenticationError, NoPermissionError, ssl.SSLCertVerificationError)):
            return seen
        if isinstance(seen, ssl.SSLError) and seen.reason in _CLIENT_CERTIFICATE_ALERTS:
            return seen
    return None


def _why_refused(refusal: BaseException, user: str) -> str:
    """What was refused, in words, for ``_refused``'s answer."""
    if isinstance(refusal, AuthenticationError):
        return f"authentication failed for user {user!r} ({refusal})"
    if isinstance(refusal, NoPermissionError):
        return f"permission denied to user {user!r} ({refusal})"
    if isinstance(refusal, ssl.SSLCertVerificationError):
        if names_another_host(refusal):
            return f"hostname mismatch: {refusal.verify_message}"
        return f"certificate not trusted: {refusal.verify_message}"
    return f"client certificate refused ({refusal})"


class _RetryUnlessRefused(Retry):
    """redis-py's retry of connection errors, except a refusal (``_refused``): that one is
    raised at once, so a wrong password fails in one round trip instead of after ``retry_s``."""

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[[Exception], Any] | Callable[[Exception, int], Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        def retryable(error: Exception) -> bool:
            return _refused(error) is None and (is_retryable is None or is_retryable(error))

        return await super().call_with_retry(do, fail, retryable, with_failure_count)


def _transient(error: BaseException) -> bool:
    """Whether a cluster call may succeed if tried again: a node lost or the slot map moving."""
    if _refused(error) is not None:
        return False
    if isinstance(
        error,
        (
            RedisConnectionError,
            RedisTimeoutError,
            ClusterDownError,
            TryAgainError,
            SlotNotCoveredError,
        ),
    ):
        return True
    # "cannot be connected": no seed node answered the slot map query. Not a seed that answered
    # but is no cluster node, nor a programming error (keys of several slots in one call).
    return isinstance(error, RedisClusterException) and isinstance(
        error.__cause__, (RedisConnectionError, RedisTimeoutError)
    )


async def _retry_transient(
    cluster: RedisCluster,
    operation: Callable[[], Awaitable[T]],
    failures: list[BaseException],
    deadline: float,
) -> T:
    """Run ``operation`` until it succeeds or fails for good, backing off with full jitter;
    transient failures are appended to ``failures``.

    The caller's timeout cancels it at ``deadline`` (event loop time); it also stops retrying
    by itself then (TimeoutError), because a cancellation that lands inside redis-py's own
    socket timeouts can come out as a redis TimeoutError, which would otherwise be retried
    forever. After a failure the client is closed, so the next try reads the slot map afresh
    (a replica may have taken over), as redis-py's own retries do.
    """
    loop = asyncio.get_running_loop()
    delay = _BACKOFF_BASE_S
    while True:
        try:
            return await operation()
        except (RedisError, RedisClusterException) as error:
            if not _transient(error):
                raise
            failures.append(error)
            if loop.time() >= deadline:
                raise TimeoutError from error
            logger.debug("Redis Cluster call failed, retrying: %r", error)
        await cluster.aclose()
        await asyncio.sleep(random.uniform(0, delay))
        delay = min(_BACKOFF_CAP_S, 2 * delay)


async def _count_cluster(cluster: RedisCluster, pattern: str) -> int:
    """Keys matching ``pattern`` on every primary (one SCAN cursor per node)."""
    total = 0
    async for _ in cluster.scan_iter(match=pattern, count=_SCAN_COUNT):
        total += 1
    return total


def _connect(redis_url: str, retry_s: float) -> Redis | RedisCluster:
    """A client that retries lost connections forever, with backoff; ``_call`` bounds it."""
    if redis_url.partition("://")[0] in CLUSTER_SCHEMES:
        return _connect_cluster(redis_url, retry_s)
    try:
        client = Redis.from_url(
            redis_url,
            retry=_RetryUnlessRefused(
                ExponentialWithJitterBackoff(cap=_BACKOFF_CAP_S, base=_BACKOFF_BASE_S), -1
            ),
            socket_connect_timeout=min(retry_s, _CONNECT_TIMEOUT_S),
            socket_timeout=min(retry_s, _REPLY_TIMEOUT_S),
        )
    except ValueError as error:  # its message may quote a piece of the URL
        message = f"{without_password(redis_url)}: {error}"
        raise ConfigError(_scrubbed(message, _passwords(redis_url))) from None
    pool = client.connection_pool
    pool.connection_class = _packed_by_hiredis(pool.connection_class)
    return client


def _packed_by_hiredis(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection_class`` (plain, TLS or Unix socket) packing commands with hiredis, in C.

    redis-py's asyncio connections pack every argument in Python; its synchronous ones use
    hiredis when it is installed. For a batch's MGET and commit (thousands of keys and 1 KB
    values) the Python packer cost ~10% of a worker's CPU.
    """
    serializer = HiredisRespSerializer()

    def pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
        command = args[0].encode() if isinstance(args[0], str) else args[0]
        if b" " not in command:  # not a two-word command such as SCRIPT LOAD
            try:  # str, bytes and ints, as the store sends, straight to hiredis
                return [hiredis.pack_command(args)]
            except TypeError:
                pass
        packed: list[bytes] = serializer.pack(*args)  # splits the command, converts buffers
        return packed

    return type(
        f"Hiredis{connection_class.__name__}", (connection_class,), {"pack_command": pack_command}
    )


def _connect_cluster(redis_url: str, retry_s: float) -> RedisCluster:
    """A cluster client seeded with every node the URL lists; it connects on first use.

    The first seed goes through redis-py's URL parser (credentials, TLS, query options), the
    others join it as startup nodes; redis-py asks them in turn for the slot map until one
    answers.
    """
    parts = urlsplit(redis_url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    seeds = [host.strip() for host in hosts.split(",") if host.strip()]
    if not seeds:
        raise ConfigError(
            f"{without_password(redis_url)}: a cluster URL names at least one node, "
            f"{parts.scheme}://host:port[,host:port...]"
        )
    first = urlunsplit(
        (
            CLUSTER_SCHEMES[parts.scheme],
            f"{credentials}@{seeds[0]}" if credentials else seeds[0],
            parts.path,
            parts.query,
            "",
        )
    )
    try:
        others = [ClusterNode(*_host_port(seed)) for seed in seeds[1:]]
        return RedisCluster.from_url(
            first,
            startup_nodes=others or None,
            retry=Retry(
                ExponentialWithJitterBackoff(cap=_BACKOFF_CAP_S, base=_BACKOFF_BASE_S),
                _CLUSTER_RETRIES,
            ),
            socket_connect_timeout=min(retry_s, _CONNECT_TIMEOUT_S),
            socket_timeout=min(retry_s, _CLUSTER_SOCKET_TIMEOUT_S),
        )
    except (ValueError, RedisClusterException) as error:
        message = f"{without_password(redis_url)}: {error}"
        raise ConfigError(_scrubbed(message, _passwords(redis_url))) from None


def _host_port(seed: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``; the port defaults to 6379) as a pair."""
    parts = urlsplit(f"//{seed}")
    if not parts.hostname:
        raise ValueError(f"{seed!r} is not host:port")
    return parts.hostname, parts.port or 6379


_MASK = "***"


def _split_url(url: str) -> tuple[str, str, str, list[tuple[str, str, str]]]:
    """``scheme://``, the userinfo (up to the last ``@``, so that a password with an unescaped
    ``/``, ``@``, ``?``, ``#`` or ``&`` stays whole), the rest up to the query, and the query's
    ``(name, "=", value)`` options, all as written. No URL is invalid here: no error to leak
    it."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, rest = rest.rpartition("@")
    location, _, query = rest.partition("?")
    options = [option.partition("=") for option in query.split("&")] if query else []
    return scheme + sep, userinfo + at, location, options


def _is_password(name: str) -> bool:
    """A query option holding a secret: ``password``, and ``ssl_password`` (a key's)."""
    return "password" in unquote(name).lower()


def without_password(url: str) -> str:
    """The URL as it may appear in logs and errors: the password of the userinfo and of any
    ``password=`` option masked."""
    scheme, userinfo, location, options = _split_url(url)
    if "?" in userinfo:  # an "@" in the query, or a password with "?": where would it end?
        return f"{scheme}{_MASK}"
    user, colon, _ = userinfo.removesuffix("@").partition(":")
    if colon:
        userinfo = f"{user}:{_MASK}@"
    if not options:
        return scheme + userinfo + location
    query = "&".join(
        name + eq + (_MASK if eq and _is_password(name) else value) for name, eq, value in options
    )
    return f"{scheme}{userinfo}{location}?{query}"


_SHORTEST = 4
"""A piece of a password shorter than this is not masked on its own in library messages: it
would mask common words and give the piece away."""


def _passwords(url: str) -> list[str]:
    """Every password the URL holds, as written and unescaped, and what a URL parser that
    ends the host at an unescaped ``/`` would take for one: what no message may show."""
    _, userinfo, _, options = _split_url(url)
    password = userinfo.removesuffix("@").partition(":")[2]
    head = password.partition("/")[0]
    found = [password, head] if len(head) >= _SHORTEST else [password]
    found += [value for name, _, value in options if _is_password(name)]
    return [form for secret in found if secret for form in {secret, unquote(secret)}]


def _scrubbed(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret masked: for messages that quote what a library said."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, _MASK)
    return text


def _user(url: str) -> str:
    """The user a URL authenticates as: its userinfo's or ``username=`` option's, else the
    default user."""
    _, userinfo, _, options = _split_url(url)
    user = userinfo.removesuffix("@").partition(":")[0]
    user = user or next((v for k, _, v in options if unquote(k) == "username"), "")
    return unquote(user) or "default"
