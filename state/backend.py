"""What the memory store's two backends share, and what each provides its own way.

``MemoryStore`` (store.py) checks its settings and hands every call to one backend: one Redis
server (one_server.py: a batch in one MGET, the fast MSET commit, the memory cache, durable
commits) or a Redis Cluster (cluster.py: a batch split by hash slot, a lost node retried). Both
store the same values (codec.py) under the same keys (keys.py) and apply the same Lua scripts
(lua/), so a commit's guarantees are the same on both, slot by slot on a cluster.

Every Redis round trip goes through ``Backend.call``: bounded by the retry budget, its failure
mapped to one StoreError subclass a caller can act on, the URL's passwords kept out of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from state import codec, scripts
from state.codec import StoredMemory
from state.connection import error_chain, refusal, scrubbed, why_refused
from state.keys import KeyLayout
from stream_lstm.exceptions import (
    StoreError,
    StoreFullError,
    StoreRefusedError,
    StoreUnavailableError,
)
from stream_lstm.memories import I64, Memories, Shape

__all__ = ["Backend", "HandOver", "Loaded"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Client = TypeVar("Client", Redis, RedisCluster)

SCAN_COUNT = 1000
STALE, APPLIED, MOVED = 0, 1, 2
"""The commit script's code for each update (``CommitResult``); -1: a value not ours."""


@dataclass(frozen=True, slots=True, eq=False)
class Loaded:
    """What a load read: the memories, and what a commit of the batch may need to know of
    how they were read (``MemoryStore.commit_many``)."""

    memories: Memories
    partition_fences: Mapping[int, int | None] = field(default_factory=dict)
    """The fences of the partitions the load was asked for (None: no commit yet); one server
    only."""
    outside_writes: bytes | None = None
    """The namespace's count of writes no partition owner sees coming, as the load read it."""
    cached: int = 0
    """How many of the memories came from the worker's memory cache, not from Redis."""


@dataclass(frozen=True, slots=True)
class HandOver:
    """An app id's take-over record: the deployment that took its stream over and the input
    offsets (per partition) from which it emits; or, for a moment, one worker's claim."""

    by: str
    """The app id of the deployment that took over (or is taking over)."""
    offsets: Mapping[int, int] | None = None
    """Per input partition, the first offset whose predictions are the new deployment's:
    where the old deployment's committed offsets stopped. None: a claim."""
    claim: str | None = None
    """A claim's token: the one worker that may record the offsets (or release it)."""

    def encode(self) -> bytes:
        record: dict[str, Any] = {"by": self.by}
        if self.claim is not None:
            record["claim"] = self.claim
        if self.offsets is not None:
            record["offsets"] = {str(p): o for p, o in sorted(self.offsets.items())}
        return json.dumps(record, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes) -> HandOver:
        """Raises StoreError when the value is not a take-over record."""
        try:
            record = json.loads(value)
            offsets = record.get("offsets")
            claim = record.get("claim")
            return cls(
                str(record["by"]),
                None if offsets is None else {int(p): int(o) for p, o in offsets.items()},
                None if claim is None else str(claim),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise StoreError(f"the take-over record is not stream-lstm's: {error}") from None


class Backend(ABC, Generic[Client]):
    """One way of keeping the memories of one namespace and model version in Redis."""

    written: str
    """What a refused commit left unwritten, in words: the batch, or the refused slots."""

    def __init__(
        self,
        redis: Client,
        keys: KeyLayout,
        *,
        url: str,
        user: str,
        secrets: Sequence[str],
        ttl_ms: int,
        retry_s: float,
        code: int,
    ) -> None:
        self.redis: Client = redis
        self.keys = keys
        self.url = url  # without its password
        self.user = user
        self.secrets = secrets
        self.ttl_ms = ttl_ms  # 0: no TTL
        self.retry_s = retry_s
        self.code = code  # the dtype commits store memories in (codec.CODES)
        self.commit_script = redis.register_script(scripts.COMMIT)
        self.reset_script = redis.register_script(scripts.RESET)
        self.take_over_script = redis.register_script(scripts.TAKE_OVER)

    @abstractmethod
    async def load(
        self, entity_ids: Sequence[str], shape: Shape, partitions: Collection[int]
    ) -> Loaded:
        """The stored memories of these (one or more) entities; see ``MemoryStore.load_many``."""

    @abstractmethod
    async def commit(
        self,
        updates: Memories,
        keys: list[str],
        values: list[bytes],
        loaded: Loaded | None,
    ) -> I64:
        """The fenced write of one or more updates, already encoded (``values``, under
        ``keys``): a code per update (``CommitResult``)."""

    @abstractmethod
    def reset_keys(self, entity_id: str) -> list[str]:
        """The reset script's KEYS for this entity."""

    @abstractmethod
    async def count(self) -> int:
        """Entities stored under this namespace and model version (SCAN)."""

    @abstractmethod
    def scan(self, pattern: str) -> AsyncGenerator[list[bytes], None]:
        """The keys matching ``pattern`` (on a cluster, those of every primary), a SCAN reply
        at a time, each SCAN call within the retry budget. A key present throughout comes at
        least once; one may come twice (while Redis resizes its table)."""

    @abstractmethod
    async def read(self, keys: list[str]) -> list[bytes | None]:
        """The values of these keys (None: no such key), in order."""

    @abstractmethod
    async def write(self, keys: list[str], values: list[bytes], *, replace: bool) -> list[bool]:
        """Set each key to its value, with the store's TTL; a key that exists is kept unless
        ``replace``. Which keys were written, in order. On one server the writes and a count of
        them as an outside write go in one transaction, so that every worker's cache lets go
        of what they replace."""

    @abstractmethod
    async def unlink(self, keys: Sequence[bytes], outside_writes: Collection[str] = ()) -> int:
        """Delete these keys; how many existed. On one server, in one transaction with an
        increment of each of the ``outside_writes`` counters (a cluster has no cache to tell)."""

    @abstractmethod
    async def ping(self, timeout_s: float) -> None:
        """Return when Redis answers within ``timeout_s``."""

    @abstractmethod
    async def attempt(
        self, operation: Callable[[], Awaitable[T]], failures: list[BaseException], deadline: float
    ) -> T:
        """Run one Redis operation, retrying what this backend retries itself, until
        ``deadline`` (event loop time); transient failures go in ``failures``."""

    async def eviction_policy(self) -> str | None:
        """Redis's ``maxmemory-policy``, or None when it cannot be read."""
        return None

    async def info(self) -> dict[str, Any] | None:
        """Redis's INFO, or None when it cannot be read."""
        return None

    def forget_cached(self) -> None:
        """Drop every cached memory (a backend without a cache has nothing to drop)."""

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def get(self, entity_id: str) -> StoredMemory | None:
        key = self.keys.memory(entity_id)
        value = await self.call(f"get of {entity_id!r}", lambda: self.redis.get(key))
        if value is None:
            return None
        try:
            return codec.decode(cast("bytes", value), entity_id)
        except StoreError as error:
            raise StoreError(f"entity {entity_id!r}: {error}") from None

    async def reset(self, entity_id: str) -> bool:
        keys = self.reset_keys(entity_id)
        updated_at = codec.UPDATED_AT.pack(time.time())
        code: int = await self.call(
            f"reset of {entity_id!r}",
            lambda: self.reset_script(keys=keys, args=[self.ttl_ms, updated_at]),
        )
        if code < 0:
            raise StoreError(f"entity {entity_id!r}: stored value is not a stream-lstm memory")
        return code == 1

    async def recorded_topic(self) -> str | None:
        recorded: Any = await self.call("recorded_topic", lambda: self.redis.get(self.keys.topic))
        return None if recorded is None else cast("bytes", recorded).decode()

    async def claim_topic(self, identity: str) -> str | None:
        key = self.keys.topic
        recorded: Any = await self.call("claim_topic", lambda: self.redis.get(key))
        if recorded is None:
            recorded = await self.call(
                "claim_topic", lambda: self.redis.set(key, identity, nx=True, get=True)
            )
        return None if recorded is None else cast("bytes", recorded).decode()

    async def taken_over(self, keys: KeyLayout) -> HandOver | None:
        key = keys.taken_over
        value: Any = await self.call("read the take-over record", lambda: self.redis.get(key))
        return None if value is None else HandOver.decode(cast("bytes", value))

    async def take_over(
        self, old: KeyLayout, action: str, claim: HandOver, argument: bytes | int
    ) -> HandOver | None:
        key = old.taken_over
        value: Any = await self.call(
            f"{action} the take-over",
            lambda: self.take_over_script(keys=[key], args=[action, claim.encode(), argument]),
        )
        return None if value is None else HandOver.decode(cast("bytes", value))

    async def call(
        self, what: str, operation: Callable[[], Awaitable[T]], budget_s: float | None = None
    ) -> T:
        """Run one Redis call within the retry budget; map failures to StoreError.

        A single server's client retries lost connections itself. A cluster client tries once
        (following MOVED and ASK redirections; it raises RedisClusterException when no node
        answers at all), so on a cluster the call is retried by ``attempt``, with the same
        backoff. Neither retries a refusal (``refusal``): it raises StoreRefusedError at once.
        """
        budget_s = self.retry_s if budget_s is None else budget_s
        failures: list[BaseException] = []
        try:
            async with asyncio.timeout(budget_s) as scope:
                return await self.attempt(operation, failures, cast("float", scope.when()))
        except (TimeoutError, RedisError, RedisClusterException) as error:
            cause = failures[-1] if failures and isinstance(error, TimeoutError) else error
            # One server: the timeout cancelled redis-py's backoff after the error it retries.
            cause = next((e for e in error_chain(cause) if isinstance(e, RedisError)), cause)
            refused = refusal(cause)
            if refused is not None:
                why = why_refused(refused, self.user)
                raise StoreRefusedError(
                    scrubbed(f"{what}: Redis at {self.url} refused us: {why}", self.secrets)
                ) from error
            if any(isinstance(e, OutOfMemoryError) for e in error_chain(cause)):
                raise StoreFullError(
                    scrubbed(
                        f"{what}: Redis at {self.url} is full (maxmemory) and refuses writes "
                        "until memory is freed",
                        self.secrets,
                    )
                ) from error
            if not isinstance(error, (TimeoutError, RedisConnectionError, RedisTimeoutError)):
                raise StoreError(
                    scrubbed(f"{what}: Redis at {self.url} failed: {error}", self.secrets)
                ) from error
            shown = scrubbed(f"{type(cause).__name__}: {cause}".removesuffix(": "), self.secrets)
            # The caller decides what to tell: the worker logs its retries, the CLI one line.
            logger.debug("%s: Redis at %s unavailable: %s", what, self.url, shown)
            raise StoreUnavailableError(
                f"{what}: Redis at {self.url} did not answer within {budget_s:g} s "
                f"of retries ({shown})"
            ) from error
