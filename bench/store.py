"""Memory store throughput: one round trip per batch against one round trip per entity.

    python bench/store.py [--layers 1] [--hidden 128] [--seconds 0.5]

A default run takes about half a minute.

Starts its own server (`workers.dev.redis_server.RedisServer`). For each batch size E, E entities
are loaded and committed:

- batched: ``MemoryStore.load_many`` (one MGET, decoded into arrays) and ``commit_many`` (one
  fenced Lua script call, every update applying);
- fast commit: ``commit_many(updates, loaded=...)`` as the worker calls it, after a load that
  read the partition fence: WATCH on the fence, a re-read, and one MULTI/MSET/EXEC;
- per key: one GET and then one SET per entity, each awaited before the next, on the same
  encoded values (no decoding and no fence, which flatters the per-key side);
- cached load: ``load_many`` on a store with a memory cache that committed these entities, as
  the worker's loads are once its entities recur: the MGET reads only the partition fence and
  the reset counter.

Figures are entities per second; "x" is batched over per key. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import machine, write_section
from state import MemoryStore, codec
from state.keys import KeyLayout
from stream_lstm.memories import Memories
from workers.dev.redis_server import RedisServer

SIZES = (1, 256, 1024, 4096)
NAMESPACE, MODEL_VERSION = "bench", "v1"
FAST_OFFSETS = 1 << 40


def updates(size: int, layers: int, hidden: int) -> Memories:
    """Memories of ``size`` entities with an LSTM's two states (LTM, STM), fenced on
    partition 0."""
    rng = np.random.default_rng(0)
    return Memories(
        entity_ids=[f"user-{i:08d}" for i in range(size)],
        states=(
            rng.standard_normal((size, layers, hidden), dtype=np.float32),  # LTM
            rng.standard_normal((size, layers, hidden), dtype=np.float32),  # STM
        ),
        step=np.ones(size, dtype=np.int64),
        fence_partition=np.zeros(size, dtype=np.int64),
        fence_offset=np.zeros(size, dtype=np.int64),
    )


async def rate(size: int, operation: Callable[[int], Awaitable[None]], min_s: float) -> float:
    """Entities per second of ``operation(round)``, repeated for at least ``min_s``."""
    await operation(0)  # warm up: connections, script cache
    rounds, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_s or rounds < 3:
        rounds += 1
        await operation(rounds)
    return size * rounds / elapsed


async def measure(url: str, size: int, layers: int, hidden: int, min_s: float) -> list[float]:
    """[batched load, per-key load, batched commit, per-key commit, fast commit, cached load],
    entities/s."""
    batch = updates(size, layers, hidden)
    ids, shape = batch.entity_ids, batch.shape
    keys = KeyLayout(NAMESPACE, MODEL_VERSION).memories(ids)
    values = codec.encode_many(batch, time.time())
    async with MemoryStore(url, NAMESPACE, MODEL_VERSION) as store, Redis.from_url(url) as client:
        await client.flushdb()

        async def commit_batched(round_: int) -> None:
            batch.fence_offset[:] = round_ + 1  # newer each round, so every update applies
            result = await store.commit_many(batch)
            assert result.applied.all(), "a benchmark commit was stale"

        async def load_batched(round_: int) -> None:
            loaded = await store.load_many(ids, shape)
            assert loaded.memories.found.all(), "a benchmark entity was missing"

        async def commit_per_key(round_: int) -> None:
            for key, value in zip(keys, values, strict=True):
                await client.set(key, value)

        async def load_per_key(round_: int) -> None:
            for key in keys:
                await client.get(key)

        commit = await rate(size, commit_batched, min_s)
        load = await rate(size, load_batched, min_s)
        loaded = await store.load_many(ids, shape, partitions={0})  # the script's fence

        async def commit_fast(round_: int) -> None:
            batch.fence_offset[:] = FAST_OFFSETS + round_  # past every fence the script left
            result = await store.commit_many(batch, loaded=loaded)
            assert result.applied.all(), "a benchmark commit was stale"

        fast = await rate(size, commit_fast, min_s)
        commit_one = await rate(size, commit_per_key, min_s)
        load_one = await rate(size, load_per_key, min_s)
    async with MemoryStore(url, NAMESPACE, MODEL_VERSION, cache_entities=size) as cached:
        batch.fence_offset[:] = 2 * FAST_OFFSETS
        await cached.commit_many(batch)

        async def load_cached(round_: int) -> None:
            loaded = await cached.load_many(ids, shape, partitions={0})
            assert loaded.memories.found.all(), "a benchmark entity was missing"

        load_cache = await rate(size, load_cached, min_s)
    return [load, load_one, commit, commit_one, fast, load_cache]


async def server_version(url: str) -> str:
    async with Redis.from_url(url) as client:
        info = await client.info("server")
    name = "valkey" if "valkey_version" in info else "redis"
    return f"{name} {info.get(f'{name}_version', info['redis_version'])}"


async def memory_usage(url: str, layers: int, hidden: int) -> int:
    """Bytes Redis holds for one entity (MEMORY USAGE of its key)."""
    async with MemoryStore(url, NAMESPACE, MODEL_VERSION) as store, Redis.from_url(url) as client:
        one = updates(1, layers, hidden)
        await store.commit_many(one)
        usage = await client.memory_usage(
            KeyLayout(NAMESPACE, MODEL_VERSION).memory(one.entity_ids[0])
        )
    assert usage is not None, "the entity was just committed"
    return usage


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=0.5, help="minimum time per figure")
    args = parser.parse_args()

    header = (
        "| entities | load batched/s | load per key/s | x "
        "| commit batched/s | commit per key/s | x "
        "| load+commit batched/s | load+commit per key/s | x "
        "| fast commit/s | x script | load+fast commit/s | x per key "
        "| cached load/s | x batched |"
    )
    rows = [header, "|---:" * 16 + "|"]
    print(f"{'entities':>8} {'load b/s':>10} {'per key':>9} {'x':>6} {'commit b/s':>11} "
          f"{'per key':>9} {'x':>6} {'both b/s':>10} {'per key':>9} {'x':>6}")  # fmt: skip
    with RedisServer() as server:
        server_name = asyncio.run(server_version(server.url))
        usage = asyncio.run(memory_usage(server.url, args.layers, args.hidden))
        for size in SIZES:
            load, load_one, commit, commit_one, fast, load_cache = asyncio.run(
                measure(server.url, size, args.layers, args.hidden, args.seconds)
            )
            both, both_one = 1 / (1 / load + 1 / commit), 1 / (1 / load_one + 1 / commit_one)
            figures = [
                (load, load_one, load / load_one),
                (commit, commit_one, commit / commit_one),
                (both, both_one, both / both_one),
            ]
            both_fast = 1 / (1 / load + 1 / fast)
            print(
                f"{size:>8}" + "".join(f" {b:>10,.0f} {o:>9,.0f} {x:>5.1f}x" for b, o, x in figures)
            )
            print(f"{'':>8} fast commit {fast:,.0f}/s ({fast / commit:.1f}x the script)")
            print(f"{'':>8} cached load {load_cache:,.0f}/s ({load_cache / load:.1f}x batched)")
            rows.append(
                f"| {size} |"
                + "".join(f" {b:,.0f} | {o:,.0f} | {x:.1f}x |" for b, o, x in figures)
                + f" {fast:,.0f} | {fast / commit:.1f}x | {both_fast:,.0f} |"
                + f" {both_fast / both_one:.1f}x | {load_cache:,.0f} | {load_cache / load:.1f}x |"
            )

    body = (
        f"`python bench/store.py` ({machine()}; redis-py {version('redis')}, "
        f"hiredis {version('hiredis')}, {server_name} on loopback, no persistence).\n"
        f"Memories {args.layers} x {args.hidden} float32 (LTM and STM), "
        f"{codec.HEADER_SIZE + 2 * args.layers * args.hidden * 4} bytes a value, "
        f"{usage} bytes per entity in Redis (MEMORY USAGE). Batched: one MGET per load, one "
        "fenced Lua script call per commit, arrays decoded and encoded with numpy. Per key: one "
        "awaited GET, then one awaited SET, per entity (no decoding, no fence). At one entity the "
        "batched calls lose: numpy's fixed cost per call (~50 us) and the script outweigh the "
        "single round trip both sides pay. Fast commit: as the worker commits after its load "
        "(partition fence below the batch), one WATCH, a re-read and one MULTI/MSET/EXEC. "
        "Cached load: every entity in the worker's memory cache; the MGET reads one partition "
        "fence and the reset counter.\n\n" + "\n".join(rows)
    )
    write_section("Memory store", body)
    print(f"\n{usage} bytes per entity in Redis; written to bench/RESULTS.md")


if __name__ == "__main__":
    main()
