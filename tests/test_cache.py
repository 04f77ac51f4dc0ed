"""The worker's memory cache: what it holds is what Redis holds, and every other writer is seen.

The cache alone first (slots, eviction, TTL, generations), then through the store against a real
Redis (a load served from the cache equals one from Redis; resets, newer writers and revokes),
then the worker's revoke callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch
from aiokafka import TopicPartition
from redis.asyncio import Redis
from torch import nn

from state import MemoryStore
from state.cache import MemoryCache
from state.keys import KeyLayout
from stream_lstm.exceptions import ConfigError
from stream_lstm.memories import Memories, Shape
from stream_lstm.model import StreamModel
from tests.test_store import make_updates
from workers.batch import BatchProcessor
from workers.connection import KafkaConnection
from workers.consumer import BatchConsumer, KafkaEmitter, _WaitForBatch
from workers.dev.redis_server import RedisClusterServer, RedisServer
from workers.metrics import Metrics
from workers.settings import Settings

SHAPE = Shape(2, 2, 4)
"""The shape of ``make_updates``'s memories."""


def cached_offsets(cache: MemoryCache, entity_ids: list[str]) -> list[int | None]:
    """Each entity's cached fence offset, None where the cache would not serve it."""
    slots = cache.find(entity_ids, SHAPE)
    if (slots < 0).all():
        return [None] * len(entity_ids)
    taken = cache.take(entity_ids, slots)
    assert taken.found.tolist() == (slots >= 0).tolist()  # a row not cached has no fence
    found = taken.found
    return [int(o) if hit else None for o, hit in zip(taken.fence_offset, found, strict=True)]


def put(cache: MemoryCache, updates: Memories, written: float | None = None) -> None:
    applied = np.ones(len(updates.entity_ids), dtype=np.bool_)
    cache.put(updates, applied, time.monotonic() if written is None else written, cache.generation)


# --- the cache alone ----------------------------------------------------------------------


def test_the_cache_holds_what_was_put_and_nothing_else() -> None:
    cache = MemoryCache(10)
    put(cache, make_updates(["a", "b"], [3, 4]))
    put(cache, make_updates(["b"], 7))  # in place: b keeps its slot
    assert cached_offsets(cache, ["a", "b", "c"]) == [3, 7, None]
    taken = cache.take(["b"], cache.find(["b"], SHAPE))
    ltm, stm = taken.states
    assert (ltm == 7).all()
    assert (stm == -7).all()
    assert taken.step.tolist() == [7]
    assert len(cache) == 2


def test_a_full_cache_evicts_the_entity_cached_longest_ago() -> None:
    cache = MemoryCache(2)
    put(cache, make_updates(["a"], 1))
    put(cache, make_updates(["b"], 2))
    put(cache, make_updates(["c"], 3))
    assert cached_offsets(cache, ["a", "b", "c"]) == [None, 2, 3]
    assert len(cache) == 2


def test_a_stale_or_repeated_update_is_evicted_not_cached() -> None:
    cache = MemoryCache(10)
    put(cache, make_updates(["a", "b", "c"], 1))
    updates = make_updates(["a", "b", "c", "c"], [5, 5, 5, 6])
    cache.put(updates, np.array([True, False, True, True]), time.monotonic(), cache.generation)
    assert cached_offsets(cache, ["a", "b", "c"]) == [5, None, None]


def test_a_commit_sent_before_a_clear_is_not_cached() -> None:
    cache = MemoryCache(10)
    sent_at = cache.generation
    cache.clear()  # a reset seen by a load while the commit was on its way
    cache.put(make_updates(["a"], 1), np.ones(1, dtype=np.bool_), time.monotonic(), sent_at)
    assert cached_offsets(cache, ["a"]) == [None]


def test_an_entry_older_than_the_ttl_is_not_served() -> None:
    cache = MemoryCache(10, ttl_s=60)
    put(cache, make_updates(["old"], 1), written=time.monotonic() - 61)
    put(cache, make_updates(["new"], 2))
    assert cached_offsets(cache, ["old", "new"]) == [None, 2]


def test_another_shape_is_never_served() -> None:
    cache = MemoryCache(10)
    put(cache, make_updates(["a"], 1))
    assert cache.find(["a"], Shape(2, 1, 4)).tolist() == [-1]
    assert cache.find(["a"], Shape(1, 2, 4)).tolist() == [-1]  # another number of states
    assert cache.find(["a"], Shape(3, 2, 4)).tolist() == [-1]


def test_float16_storage_caches_the_rounded_memories() -> None:
    cache = MemoryCache(10, rounding=np.dtype(np.float16))
    updates = make_updates(["a"], 1)
    updates.states[0][:] = 0.1
    put(cache, updates)
    taken = cache.take(["a"], cache.find(["a"], SHAPE))
    assert (taken.states[0] == np.float32(np.float16(0.1))).all()


# --- through the store, on a real Redis -----------------------------------------------------


def namespace() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def two_stores(
    server: RedisServer, dtype: str = "float32"
) -> AsyncIterator[tuple[MemoryStore, MemoryStore]]:
    """A store with a cache (the worker's) and one without (another process), on a fresh
    namespace of the same server."""
    ns = namespace()
    async with (
        MemoryStore(server.url, ns, "v1", dtype=dtype, cache_entities=100) as cached,
        MemoryStore(server.url, ns, "v1", dtype=dtype) as plain,
    ):
        yield cached, plain


@pytest.mark.parametrize("dtype", ["float32", "float16"])
async def test_a_load_from_the_cache_equals_a_load_from_redis(
    redis_server: RedisServer, dtype: str
) -> None:
    ids = [f"e{i}" for i in range(50)]
    rng = np.random.default_rng(0)
    updates = Memories(
        ids,
        (
            rng.normal(size=(50, 2, 4)).astype(np.float32),
            rng.normal(size=(50, 2, 4)).astype(np.float32),
        ),
        np.arange(50, dtype=np.int64),
        np.zeros(50, dtype=np.int64),
        np.arange(50, dtype=np.int64),
    )
    wanted = ["new-0", *ids[::2], "new-1"]
    async with two_stores(redis_server, dtype) as (cached, plain):
        await cached.commit_many(updates)
        got = (await cached.load_many(wanted, SHAPE)).memories
        expected = (await plain.load_many(wanted, SHAPE)).memories
    for name, mine, theirs in zip(("ltm", "stm"), got.states, expected.states, strict=True):
        assert mine.tobytes() == theirs.tobytes(), name
    for name in ("step", "fence_partition", "fence_offset", "found"):
        assert getattr(got, name).tobytes() == getattr(expected, name).tobytes(), name


async def test_cached_memories_are_not_read_back(redis_server: RedisServer) -> None:
    ns = namespace()
    async with MemoryStore(redis_server.url, ns, "v1", cache_entities=100) as store:
        await store.commit_many(make_updates(["a", "b"], 5))
        async with Redis.from_url(redis_server.url) as client:
            await client.delete(KeyLayout(ns, "v1").memory("a"))  # what only the cache holds
        loaded = await store.load_many(["a", "b", "c"], SHAPE, partitions=[0])
    assert loaded.memories.found.tolist() == [True, True, False]
    assert loaded.memories.fence_offset.tolist()[:2] == [5, 5]
    assert loaded.partition_fences == {0: 5}  # the fast commit still gets its fences


async def test_a_commit_answered_during_a_load_cannot_hand_it_another_entitys_memory(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline prepares a batch while an earlier one commits: a commit that fills the
    cache's slots while the load reads the rest from Redis must not change what it loads."""
    async with MemoryStore(redis_server.url, "race", "v1", cache_entities=2) as store:
        await store.commit_many(make_updates(["a", "b"], [10, 20]))  # both cached
        backend = store._backend
        read = backend._load

        async def meanwhile(*args: object) -> object:
            answer = await read(*args)
            await store.commit_many(make_updates(["c", "d"], [30, 40]))  # takes a's and b's slots
            return answer

        monkeypatch.setattr(backend, "_load", meanwhile)
        loaded = (await store.load_many(["a", "new"], SHAPE, partitions=[0])).memories
    assert loaded.fence_offset.tolist() == [10, -1]
    assert loaded.states[0][0].flat[0] == 10


async def test_a_reset_from_another_process_clears_the_cache(redis_server: RedisServer) -> None:
    async with two_stores(redis_server) as (worker, cli):
        await worker.commit_many(make_updates(["a", "b"], 5))
        assert await cli.reset("a")
        loaded = (await worker.load_many(["a", "b"], SHAPE)).memories
    assert loaded.step.tolist() == [0, 5]  # a's reset is seen, b is as committed
    ltm = loaded.states[0]
    assert (ltm[0] == 0).all()
    assert (ltm[1] == 5).all()
    assert loaded.fence_offset.tolist() == [5, 5]  # the reset keeps the fence


async def test_only_a_real_reset_counts_so_unknown_ids_cannot_flush_every_cache(
    redis_server: RedisServer,
) -> None:
    """Resetting ids nobody has stored (anyone with the API can send millions) must not bump
    the counter: each bump makes every worker drop its whole cache on its next batch."""
    ns = namespace()
    counter = KeyLayout(ns, "v1").outside_writes
    async with (
        MemoryStore(redis_server.url, ns, "v1", cache_entities=100) as worker,
        MemoryStore(redis_server.url, ns, "v1") as cli,
    ):
        await worker.commit_many(make_updates(["a"], 5))
        async with Redis.from_url(redis_server.url) as client:
            for unknown in ("nobody", "no-one", "ghost"):
                assert await cli.reset(unknown) is False
            assert await client.get(counter) is None
            assert await cli.reset("a")
            assert await client.get(counter) == b"1"
        await worker.commit_many(make_updates(["b"], 6))
        assert await cli.reset("nobody") is False
        loaded = (await worker.load_many(["a", "b"], SHAPE)).memories
    assert loaded.step.tolist() == [0, 6]  # a's real reset seen; the cache kept b


async def test_a_newer_write_elsewhere_evicts_on_the_stale_commit(
    redis_server: RedisServer,
) -> None:
    async with two_stores(redis_server) as (stale, owner):
        await stale.commit_many(make_updates(["a"], 10))
        await owner.commit_many(make_updates(["a"], 20))
        assert (await stale.commit_many(make_updates(["a"], 15))).stale_ids == ["a"]
        loaded = (await stale.load_many(["a"], SHAPE)).memories
    assert loaded.fence_offset.tolist() == [20]


async def test_forgetting_the_cache_reads_what_a_new_owner_wrote(
    redis_server: RedisServer,
) -> None:
    async with two_stores(redis_server) as (before, after):
        await before.commit_many(make_updates(["a"], 10))
        await after.commit_many(make_updates(["a"], 20))  # the partition moved, and moved back
        loaded = (await before.load_many(["a"], SHAPE)).memories
        assert loaded.fence_offset.tolist() == [10]  # the hazard
        before.forget_cached()
        loaded = (await before.load_many(["a"], SHAPE)).memories
        assert loaded.fence_offset.tolist() == [20]


async def test_a_memory_expired_in_redis_is_not_served_from_the_cache(
    redis_server: RedisServer,
) -> None:
    async with MemoryStore(
        redis_server.url, namespace(), "v1", ttl_s=0.3, cache_entities=100
    ) as store:
        await store.commit_many(make_updates(["a"], 5))
        assert (await store.load_many(["a"], SHAPE)).memories.found.tolist() == [True]
        await asyncio.sleep(0.4)
        assert (await store.load_many(["a"], SHAPE)).memories.found.tolist() == [False]


async def test_a_cluster_store_reads_every_memory_from_redis(
    redis_cluster: RedisClusterServer,
) -> None:
    ns = namespace()
    async with MemoryStore(redis_cluster.url, ns, "v1", cache_entities=100) as store:
        await store.commit_many(make_updates(["a"], 5))
        assert await store.reset("a")
        assert (await store.load_many(["a"], SHAPE)).memories.step.tolist() == [0]


def test_a_negative_cache_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="cache_entities must be 0"):
        MemoryStore("redis://localhost", "ns", "v1", cache_entities=-1)


# --- the worker ----------------------------------------------------------------------------


async def test_a_revoke_drops_the_cache_once_its_batches_finished(
    redis_server: RedisServer,
) -> None:
    torch.manual_seed(0)
    model = StreamModel.from_torch(nn.LSTM(2, 4, num_layers=2), nn.Linear(4, 2))
    settings = Settings.load(redis_url=redis_server.url, app_id=namespace())
    async with settings.memory_store(model.version) as store:
        emitter = KafkaEmitter(
            KafkaConnection("localhost:1")
        )  # never started: a revoke sends nothing
        processor = BatchProcessor(
            model,
            store,
            emitter,
            output_topic="out",
            dead_letter_topic="dead",
            max_event_bytes=65_536,
        )
        failures: list[BaseException] = []
        consumer = BatchConsumer(settings, processor, emitter, Metrics(), failed=failures.append)
        hidden, layers = model.hidden_size, model.num_layers
        await store.commit_many(make_updates(["a"], 3, layers=layers, hidden=hidden))
        async with Redis.from_url(redis_server.url) as client:
            await client.delete(KeyLayout(settings.app_id, model.version).memory("a"))
        assert (await store.load_many(["a"], model.shape)).memories.found.tolist() == [True]
        await _WaitForBatch(consumer).on_partitions_revoked([TopicPartition("in", 0)])
        assert (await store.load_many(["a"], model.shape)).memories.found.tolist() == [False]
        assert failures == []


def test_updates_beyond_the_capacity_are_evicted_not_left_stale() -> None:
    cache = MemoryCache(2)
    put(cache, make_updates(["a"], 1))
    put(cache, make_updates(["a", "b", "c"], 5))
    assert cached_offsets(cache, ["a", "b", "c"]) == [None, 5, 5]
