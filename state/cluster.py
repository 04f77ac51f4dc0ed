"""The memory store on a Redis Cluster: each batch split by hash slot.

A script and an MGET may only touch keys of one hash slot, and each entity's key is its own slot
(keys.py). So a load is redis-py's ``mget_nonatomic`` (one MGET per slot) and a commit one fence
script call per slot, each one pipeline per node: one round trip to each node that holds some
of the batch, all nodes at once. Fences are per entity, so their guarantees hold slot by slot;
what a cluster cannot give is a whole batch applied or refused as one (see
``MemoryStore.commit_many``). No fast commit (its partition fences and counter would be keys of
other slots), no cache, no durable commits (WAIT covers one connection's writes, and a batch
goes through one connection per node).

A lost node is retried here (``attempt``), with backoff and a fresh slot map each time, and
only for what that node has not answered.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
from redis.asyncio.cluster import RedisCluster
from redis.cluster import PRIMARY
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from state import codec
from state.backend import SCAN_COUNT, Backend, Loaded
from state.connection import BACKOFF_BASE_S, BACKOFF_CAP_S, refusal
from stream_lstm.exceptions import StoreError
from stream_lstm.memories import I64, Memories, Shape

__all__ = ["Cluster"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class _SlotCommit:
    """A cluster commit in progress, kept across retries: the codes of the slots answered."""

    keys: list[str]
    values: list[bytes]
    codes: list[int]  # (E,)
    pending: list[list[int]]  # the rows of each slot whose script call has not answered


class Cluster(Backend[RedisCluster]):
    """Memories on a Redis Cluster, a batch's entities grouped by slot and node."""

    written = "their hash slots"

    async def attempt(
        self, operation: Callable[[], Awaitable[T]], failures: list[BaseException], deadline: float
    ) -> T:
        """Run ``operation`` until it succeeds or fails for good, backing off with full jitter;
        transient failures are appended to ``failures``.

        The caller's timeout cancels it at ``deadline`` (event loop time); it also stops
        retrying by itself then (TimeoutError), because a cancellation that lands inside
        redis-py's own socket timeouts can come out as a redis TimeoutError, which would
        otherwise be retried forever. After a failure the client is closed, so the next try
        reads the slot map afresh (a replica may have taken over), as redis-py's own retries do.
        """
        loop = asyncio.get_running_loop()
        delay = BACKOFF_BASE_S
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
            await self.redis.aclose()
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(BACKOFF_CAP_S, 2 * delay)

    async def load(
        self, entity_ids: Sequence[str], shape: Shape, partitions: Collection[int]
    ) -> Loaded:
        keys = self.keys.memories(entity_ids)
        values = await self.call(
            f"load_many of {len(keys)} entities", lambda: self.redis.mget_nonatomic(keys)
        )
        return Loaded(codec.decode_many(entity_ids, values, shape, self.code))

    async def commit(
        self,
        updates: Memories,
        keys: list[str],
        values: list[bytes],
        loaded: Loaded | None,
    ) -> I64:
        slots: dict[int, list[int]] = {}
        for row, key in enumerate(keys):
            slots.setdefault(self.redis.keyslot(key), []).append(row)
        commit = _SlotCommit(keys, values, [0] * len(keys), list(slots.values()))
        answer = await self.call(
            f"commit_many of {len(keys)} entities", lambda: self._commit_slots(commit)
        )
        return np.asarray(answer, dtype=np.int64)

    async def _commit_slots(self, commit: _SlotCommit) -> list[int]:
        """The fenced script once per slot, one pipeline per node; codes in the batch's order.

        redis-py sends each node its calls in one write and reads the replies back: one round
        trip per node, all nodes at once; it follows MOVED/ASK redirections call by call. A
        node that lost the script (a restart, a failover) answers NOSCRIPT: the script is
        loaded on every primary and those calls are sent again. When a node fails, its calls
        stay pending in ``commit`` and the error goes up to ``attempt``, whose retry sends only
        them: an update a healthy node applied is never sent twice (it would come back stale).
        """
        cluster = self.redis
        await cluster.initialize()  # the slot map, to group the calls by node
        for _ in range(2):  # a second pass only for calls a node answered NOSCRIPT
            by_node: dict[str, list[list[int]]] = {}
            for rows in commit.pending:
                node = cluster.get_node_from_key(commit.keys[rows[0]])
                by_node.setdefault(node.name if node else "", []).append(rows)
            sends = list(by_node.values())
            replies = await asyncio.gather(
                *(self._send_slots(commit, send) for send in sends), return_exceptions=True
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
            self.commit_script.sha = await cluster.script_load(self.commit_script.script)
        raise StoreError("the commit script is still not loaded after SCRIPT LOAD")

    async def _send_slots(self, commit: _SlotCommit, send: list[list[int]]) -> list[Any]:
        """One pipeline: a script call per slot (its rows), replies or errors in order."""
        pipe = self.redis.pipeline()
        for rows in send:
            pipe.execute_command(
                "EVALSHA",
                self.commit_script.sha,
                len(rows),
                *[commit.keys[row] for row in rows],
                self.ttl_ms,
                len(rows),
                0,  # no partition fences on a cluster
                *[commit.values[row] for row in rows],
            )
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    def reset_keys(self, entity_id: str) -> list[str]:
        return [self.keys.memory(entity_id)]  # no outside-writes counter: no cache to tell

    async def count(self) -> int:
        async def scan() -> int:
            total = 0
            async for _ in self.redis.scan_iter(match=self.keys.memory_pattern, count=SCAN_COUNT):
                total += 1
            return total

        return await self.call("count", scan)

    async def scan(self, pattern: str) -> AsyncGenerator[list[bytes], None]:
        """Each primary's keys in turn, by its own cursor. A retried SCAN call goes to the node
        of the same name under a fresh slot map; a node gone from the cluster (failed over to
        its replica) fails the scan, since its replica's cursors are not its own."""
        await self.call("scan", self.redis.initialize)
        for name in [node.name for node in self.redis.get_primaries()]:
            cursor = 0
            while True:
                cursor, keys = await self.call(
                    f"scan of {pattern!r} on {name}",
                    functools.partial(self._scan_node, name, cursor, pattern),
                )
                yield keys
                if cursor == 0:
                    break

    async def _scan_node(self, name: str, cursor: int, pattern: str) -> tuple[int, list[bytes]]:
        await self.redis.initialize()  # after a failed call the client was closed
        node = self.redis.get_node(node_name=name)
        if node is None or node.server_type != PRIMARY:
            raise StoreError(
                f"Redis Cluster node {name} stopped being a primary during a SCAN; "
                "run the command again"
            )
        reply: Any = await self.redis.scan(
            cursor, match=pattern, count=SCAN_COUNT, target_nodes=node
        )
        cursors, keys = reply  # the cursor of each node asked, and the keys
        return int(cursors[name]), keys

    async def read(self, keys: list[str]) -> list[bytes | None]:
        values = await self.call(
            f"read of {len(keys)} keys", lambda: self.redis.mget_nonatomic(keys)
        )
        return cast("list[bytes | None]", values)

    async def write(self, keys: list[str], values: list[bytes], *, replace: bool) -> list[bool]:
        async def write() -> list[Any]:
            pipe = self.redis.pipeline()  # one round trip per node; each key is its own slot
            for key, value in zip(keys, values, strict=True):
                pipe.set(key, value, nx=not replace, px=self.ttl_ms or None)
            replies: list[Any] = await pipe.execute()
            return replies

        replies = await self.call(f"write of {len(keys)} memories", write)
        return [bool(reply) for reply in replies]

    async def unlink(self, keys: Sequence[bytes], outside_writes: Collection[str] = ()) -> int:
        async def unlink() -> int:
            pipe = self.redis.pipeline()  # keys of many slots: one UNLINK each, per node
            for key in keys:
                pipe.execute_command("UNLINK", key)
            replies: list[Any] = await pipe.execute()
            return sum(int(reply) for reply in replies)

        return await self.call(f"unlink of {len(keys)} keys", unlink) if keys else 0

    async def ping(self, timeout_s: float) -> None:
        await self.call(
            "ping",
            lambda: self.redis.execute_command("PING", target_nodes=RedisCluster.PRIMARIES),
            budget_s=timeout_s,
        )


def _transient(error: BaseException) -> bool:
    """Whether a cluster call may succeed if tried again: a node lost or the slot map moving."""
    if refusal(error) is not None:
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
