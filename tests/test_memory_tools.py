"""Erase and gc of memories, on a real server and a 3-primary Redis Cluster: one entity erased
under every version and nothing else, other versions collected and nothing else.
"""

from __future__ import annotations

import uuid

import pytest

from state import MemoryStore
from state.connection import connect
from state.keys import KeyLayout, NamespaceKeys
from stream_lstm.memories import Shape
from tests.test_store import make_updates
from workers.dev.redis_server import RedisClusterServer, RedisServer

SHAPE = Shape(2, 2, 4)
TOPIC = '{"topic": "events", "topic_id": "6c1b4cbb-0f5f-4a35-9ad5-6f4bbd1a2a9c"}'


def namespace() -> str:
    return f"tools-{uuid.uuid4().hex[:12]}"


def urls(redis_server: RedisServer, redis_cluster: RedisClusterServer) -> dict[str, str]:
    return {"server": redis_server.url, "cluster": redis_cluster.url}


@pytest.fixture(params=["server", "cluster"])
def url(
    request: pytest.FixtureRequest, redis_server: RedisServer, redis_cluster: RedisClusterServer
) -> str:
    """A real server, then the cluster."""
    return urls(redis_server, redis_cluster)[request.param]


async def every_key(url: str, ns: str) -> set[bytes]:
    """The keys of a namespace and of those whose names it begins (never expiring ones of
    other tests)."""
    async with connect(url, 5.0) as client:
        return {key async for key in client.scan_iter(match=f"{ns}*")}


# --- erase -----------------------------------------------------------------------------------

LONG = "y*" * 200  # longer than a SCAN pattern holds of an id
NEIGHBOURS = ["a", "a*", "ab", "a*b", "a?", "[a]", "%", "%25", "%7B", "{", "{}", "a\\", "*"]
NEIGHBOURS += [LONG, f"{LONG}b", LONG[:-1]]


@pytest.mark.parametrize("erased", ["a*", "%", "{", "[a]", "*", LONG], ids=lambda e: e[:5])
async def test_erase_removes_one_entity_under_every_version_and_nothing_else(
    url: str, erased: str
) -> None:
    ns = namespace()
    for version in ("v1", "v2"):
        async with MemoryStore(url, ns, version) as store:
            await store.commit_many(make_updates(NEIGHBOURS, 3))
    async with MemoryStore(url, f"{ns}x", "v1") as elsewhere:  # its name begins with ns
        await elsewhere.commit_many(make_updates([erased], 3))
    before = await every_key(url, ns)
    async with MemoryStore(url, ns, "v3") as store:  # a store of any version erases them all
        assert await store.erase(erased) == ["v1", "v2"]
        assert await store.erase(erased) == []
    gone = {KeyLayout(ns, v).memory(erased).encode() for v in ("v1", "v2")}
    assert gone <= before
    counters = {KeyLayout(ns, v).outside_writes.encode() for v in ("v1", "v2")}
    assert await every_key(url, ns) == before - gone | (counters if "cluster" not in url else set())


async def test_an_erased_memory_is_not_written_back_from_a_cache(
    redis_server: RedisServer,
) -> None:
    ns = namespace()
    async with (
        MemoryStore(redis_server.url, ns, "v1", cache_entities=100) as worker,
        MemoryStore(redis_server.url, ns, "v2") as cli,
    ):
        await worker.load_many(["a", "b"], SHAPE)  # the worker has read the counter
        await worker.commit_many(make_updates(["a", "b"], 5))  # and cached both
        assert await cli.erase("a") == ["v1"]
        loaded = await worker.load_many(["a", "b"], SHAPE, partitions=[0])
        assert loaded.memories.found.tolist() == [False, True]
        assert (loaded.memories.states[0][0] == 0).all()  # a starts again from zeros
        assert loaded.memories.step.tolist() == [0, 5]


async def test_a_batch_loaded_before_an_erase_can_write_the_entity_back(
    redis_server: RedisServer,
) -> None:
    """Why the docs say to erase once an entity's events have stopped: a batch in flight
    carries the memory it loaded, and with nothing stored its commit applies."""
    ns = namespace()
    async with (
        MemoryStore(redis_server.url, ns, "v1", cache_entities=100) as worker,
        MemoryStore(redis_server.url, ns, "v1") as cli,
    ):
        await worker.commit_many(make_updates(["a"], 5))
        loaded = await worker.load_many(["a"], SHAPE, partitions=[0])
        assert await cli.erase("a") == ["v1"]
        await worker.commit_many(make_updates(["a"], 6), loaded=loaded)
        assert await cli.get("a") is not None


# --- gc --------------------------------------------------------------------------------------


async def test_gc_counts_in_a_dry_run_then_removes_other_versions_only(url: str) -> None:
    ns = namespace()
    for version, n in (("v1", 3), ("v2", 4), ("v3", 1500)):
        async with MemoryStore(url, ns, version) as store:
            await store.commit_many(make_updates([f"e{i}" for i in range(n)], 5))
            await store.reset("e0")  # on one server, an outside-writes counter too
            await store.claim_topic(TOPIC)
    async with MemoryStore(url, f"{ns}x", "v1") as elsewhere:
        await elsewhere.commit_many(make_updates(["e0"], 5))
    async with connect(url, 5.0) as client:  # keys in the namespace that are not ours
        await client.set(f"{ns}:mem:v1:{{%7}}", b"x")
        await client.set(f"{ns}:notes", b"x")
    before = await every_key(url, ns)
    extra = 3 if url.startswith("redis://") else 1  # the topic; a partition fence, a counter
    async with MemoryStore(url, ns, "v2") as store:
        counted: list[int] = []
        dry = await store.gc(
            dry_run=True, progress=lambda sweep: counted.append(sum(sweep.removed.values()))
        )
        assert dry.removed == {"v1": 3 + extra, "v3": 1500 + extra}
        assert dry.kept == {"v2": 4 + extra}
        assert counted[-1] == 1503 + 2 * extra
        assert await every_key(url, ns) == before
        sweep = await store.gc(["v1"])
    assert sweep.removed == {"v3": 1500 + extra}
    assert sweep.kept == {"v1": 3 + extra, "v2": 4 + extra}
    names = NamespaceKeys(ns)
    assert await every_key(url, ns) == {key for key in before if names.version_of(key) != "v3"}
