"""Cost as work grows: one worker against 10k to 10M distinct entities, uniform and Zipf.

    python bench/entities.py [--broker apache|tansu] [--sizes 10000,100000,...] [--dtype float16]
                             [--distributions uniform,zipf] [--events 200000] [--warmup 20000]
                             [--rate R] [--latency-seconds 10] [--quick]

A default run takes about 10-12 minutes on 2 cores: about 2 minutes to write 10M memories into
Redis (~90k a second), and 30-40 s for each of the 10 points. ``--quick`` (sizes 1,000 and
10,000, few events): about a minute, written neither to RESULTS.md nor to the plot. Redis
holds every memory in this machine's memory: 10M entities take ~7.6 GB in float16, ~14 GB in
float32 (a size that would leave less than 2 GB free is refused before it is written).

Starts a broker (``--broker``: Apache Kafka by default; Tansu's fetches cost more with every
record batch it stores, and one input topic takes every event of the run, so a long run on
Tansu would measure Tansu) and a Redis-protocol server, sends 100,000 events through the broker
and back (a fresh JVM is slow at first, and the first point is every other's baseline), builds
the end-to-end model (input 32, hidden 128, 1 layer, softmax over 8 labels), then for each size
N of ``--sizes``, ascending:

1. Writes the memories of the entities new at this size (ids ``entity-00000000`` up to N)
   straight into Redis, as the worker's store would have written them (its codec, its keys, the
   worker's app id and model version; ``--dtype``), in pipelined MSETs: each at step 1,000 with
   its fence just before the first offset of its partition, so the worker applies every later
   event to it.
2. For each distribution of ``--distributions`` (uniform over the N ids, or Zipf with s = 1
   over ranks 1..N, ranks shuffled over the ids): appends ``--warmup`` + ``--events`` events to
   the one input topic (the Redis records it), starts a fresh worker (the same app id for every
   point: the memories are its own; max_batch 1024, 1 torch thread, other settings default)
   and times its predictions of the last ``--events`` by their record timestamps (events/s),
   with the worker's and Redis's CPU over the same stretch (us/event) and the memory cache's
   share of the loads (/metrics). Then, on the same worker, events of the same distribution
   offered at ``--rate`` (default half the first point's events/s) for ``--latency-seconds``:
   p50 and p99 from handing an event to the producer to reading its prediction, and the cache's
   share again (live traffic mixes partitions in a batch; a backlog is read one partition at a
   time, so an entity's last batch is often still finishing). Once the worker
   has stopped: Redis ``used_memory`` per entity (less what the empty server used), and a check
   that a few entities' stored steps are 1,000 plus every event they got (their memory was
   loaded, not started from zero).

Results: bench/RESULTS.md, section "Entities (Apache Kafka <version>)" (or "Entities" on Tansu),
and bench/entities.png: events/s and p99 against entities, a line per distribution.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from aiokafka import AIOKafkaConsumer
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.brokers import BenchBroker, add_broker_argument, bench_broker, served
from bench.e2e import (
    FIRST_PREDICTION_S,
    HIDDEN,
    INPUT,
    LABELS,
    PARTITIONS,
    PUBLISH_EVERY_S,
    Latency,
    Message,
    Services,
    app_id,
    build_model,
    cpu_times,
    keyed_events,
    offer,
    prefill,
    reader,
    start_worker,
    steal_since,
    verdict,
    worker_metrics,
)
from bench.results import cpu_seconds, machine, write_section
from bench.store import server_version
from state import MemoryStore, codec
from state.keys import KeyLayout
from stream_lstm.memories import Memories, Shape
from stream_lstm.model import StreamModel
from workers.consumer import KafkaEmitter, partition_for_key
from workers.dev.redis_server import RedisServer
from workers.dev.stack import WorkerProcess
from workers.settings import Settings

I64 = npt.NDArray[np.int64]

NAME = "entities"
"""The workers' name for ``bench.e2e.start_worker``: input topic ``entities-events``, app id
``bench-entities``, for the whole run."""
INPUT_TOPIC = f"{NAME}-events"
DISTRIBUTIONS = ("uniform", "zipf")
PLOT = Path(__file__).with_name("entities.png")
TARGET_SHARE = 0.8
"""Events/s at the largest size, at least this share of the smallest size's."""
FLAT_BYTES = 0.10
"""Redis bytes per entity at every point within this share of their median."""

PREWRITTEN_STEP = 1000
"""The step every pre-written memory carries: a stored step of 1,000 plus the events an entity
got proves the worker loaded its memory (one started from zero would count the events alone)."""
BEFORE_FIRST_OFFSET = -1
"""The fence offset of a pre-written memory, on its own partition: every event (offset >= 0) is
newer. A fence on another partition would make each commit give it a second fence."""
CHUNK = 10_000
"""Memories per MSET while pre-writing."""
PROGRESS_S = 5.0
HEADROOM_BYTES = 2 << 30
"""Memory that must stay free after Redis has taken the largest size: a machine that runs out
kills a process, perhaps not one of ours."""
MAX_SECONDS = 300.0
"""How long a throughput phase may run after its first prediction."""
WARM_UP_TOPIC = f"{NAME}-broker-warm-up"
WARM_UP_EVENTS = 100_000
"""Events through the broker before the first point: a fresh JVM runs its produce and fetch
paths interpreted at first, and the first point's rate is every other point's baseline."""


def entity_id(index: int) -> str:
    return f"entity-{index:08d}"


class Popularity:
    """Which of N entities each event goes to: uniform, or Zipf with s = 1 over ranks 1..N (rank
    r has weight 1/r), ranks shuffled over the ids; seeded."""

    def __init__(self, distribution: str, entities: int, seed: int) -> None:
        self.entities = entities
        self.rng = np.random.default_rng([seed, entities, DISTRIBUTIONS.index(distribution)])
        self.cdf: npt.NDArray[np.float64] | None = None
        self.id_of_rank: I64 | None = None
        if distribution == "zipf":
            cdf = np.cumsum(1.0 / np.arange(1, entities + 1))
            self.cdf = cdf / cdf[-1]  # the last is exactly 1.0: every draw below it finds a rank
            self.id_of_rank = self.rng.permutation(entities)

    def draw(self, count: int) -> I64:
        """(count,) entity indices."""
        if self.cdf is None or self.id_of_rank is None:
            drawn: I64 = self.rng.integers(0, self.entities, count)
            return drawn
        ranks = np.searchsorted(self.cdf, self.rng.random(count), side="right")
        return self.id_of_rank[ranks]


def events_of(prefix: str, drawn: I64, seed: int) -> list[Message]:
    """One event per drawn entity, in the worker's JSON format (``bench.e2e.keyed_events``)."""
    return keyed_events(prefix, [entity_id(i) for i in drawn.tolist()], seed)


# --- memories written straight into Redis ----------------------------------------------------


async def prewrite(
    client: Redis, layout: KeyLayout, shape: Shape, dtype: str, start: int, stop: int
) -> float:
    """Write the memories of entities ``start`` to ``stop - 1`` as the worker's store encodes
    them, ``CHUNK`` per MSET, one MSET in flight while the next is encoded; entities/s."""
    code = codec.CODES[dtype]
    rng = np.random.default_rng(start)
    states = tuple(  # tanh: an LSTM state's range; the same rows in every chunk
        np.tanh(rng.standard_normal((CHUNK, shape.layers, shape.hidden))).astype(np.float32)
        for _ in range(shape.states)
    )
    partitions = range(PARTITIONS)
    began = time.perf_counter()
    progress_at = began + PROGRESS_S
    sending: asyncio.Future[bool] | None = None
    for first in range(start, stop, CHUNK):
        ids = [entity_id(i) for i in range(first, min(stop, first + CHUNK))]
        n = len(ids)
        memories = Memories(
            ids,
            tuple(state[:n] for state in states),
            np.full(n, PREWRITTEN_STEP, np.int64),
            np.fromiter((partition_for_key(e.encode(), partitions) for e in ids), np.int64, n),
            np.full(n, BEFORE_FIRST_OFFSET, np.int64),
        )
        values = codec.encode_many(memories, time.time(), code)
        if sending is not None:
            await sending
        keys = layout.memories(ids)
        sending = asyncio.ensure_future(client.mset(dict(zip(keys, values, strict=True))))
        await asyncio.sleep(0)  # let it go out while the next chunk is encoded
        if time.perf_counter() > progress_at:
            done = first + n - start
            print(
                f"  {done:,} of {stop - start:,} memories written "
                f"({done / (time.perf_counter() - began):,.0f}/s)",
                file=sys.stderr,
                flush=True,
            )
            progress_at += PROGRESS_S
    if sending is not None:
        await sending
    return (stop - start) / (time.perf_counter() - began)


async def used_memory(client: Redis) -> int:
    info = await client.info("memory")
    return int(info["used_memory"])


def available_memory() -> int:
    """MemAvailable of this machine (Linux /proc/meminfo), in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def check_room(per_entity: float, more: int, dtype: str) -> None:
    """Refuse to go on when ``more`` entities at ``per_entity`` bytes would leave less than
    ``HEADROOM_BYTES`` of this machine's memory free."""
    needed, available = per_entity * more, available_memory()
    if needed > available - HEADROOM_BYTES:
        raise SystemExit(
            f"{more:,} more entities at ~{per_entity:,.0f} bytes each in Redis need "
            f"{needed / 1e9:.1f} GB; this machine has {available / 1e9:.1f} GB available and "
            f"{HEADROOM_BYTES / 1e9:.1f} GB must stay free. Use smaller --sizes"
            + (" or --dtype float16 (about half)" if dtype == "float32" else "")
        )


# --- one point: a distribution at a size -----------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """What a fresh worker made of the measured part of a pre-filled stretch."""

    rate: float  # measured events/s, by the predictions' record timestamps
    events: int  # predictions received
    offered: int
    worker_us: float | None  # worker CPU per event read after the warm-up; None: none was
    redis_us: float | None
    cache_share: float | None  # memory loads the worker's cache served, measured part
    steal: float  # share of the host's CPU the hypervisor took, measured part

    @property
    def complete(self) -> bool:
        return self.events >= self.offered


@dataclass(frozen=True)
class Point:
    distribution: str
    entities: int
    throughput: Throughput
    latency: Latency | None  # None when the throughput phase did not finish
    paced_cache_share: float | None  # the memory cache's share of the loads, latency phase
    bytes_per_entity: float
    checked: str  # the steps check, in words


async def throughput(
    consumer: AIOKafkaConsumer,
    worker: WorkerProcess,
    redis: RedisServer,
    warmup: int,
    events: int,
    max_s: float,
) -> Throughput:
    """Time the predictions of the last ``events`` of ``warmup + events`` pre-filled ones by
    their record timestamps (set when the worker produced them); the CPU of the worker and of
    Redis and the worker's /metrics from the read that passed the ``warmup``-th prediction to
    the last, per prediction read in between."""
    assert worker.process is not None, "start_worker started it"
    assert redis.pid is not None, "main started it"
    pids = {"worker": worker.process.pid, "redis": redis.pid}
    total = warmup + events
    stamps: list[int] = []
    cpu_before: dict[str, float] = {}
    sampled_at = 0  # predictions read when cpu_before was taken
    metrics_before: dict[str, float] = {}
    host_before = cpu_times()
    deadline = time.monotonic() + FIRST_PREDICTION_S
    progress_at = time.monotonic() + PROGRESS_S
    while len(stamps) < total and time.monotonic() < deadline:
        if worker.process.poll() is not None:
            raise RuntimeError(f"the worker exited:\n{worker.log_tail()}")
        batches = await consumer.getmany(timeout_ms=500)
        if not stamps and batches:
            deadline = time.monotonic() + max_s
        for records in batches.values():
            stamps += [record.timestamp for record in records]
        if not cpu_before and len(stamps) >= warmup:
            cpu_before = {process: cpu_seconds(pid) for process, pid in pids.items()}
            sampled_at = len(stamps)
            metrics_before = worker_metrics(worker)
            host_before = cpu_times()
        if time.monotonic() > progress_at:
            print(f"  {len(stamps):,} of {total:,} predictions", flush=True)
            progress_at += PROGRESS_S
    if not cpu_before or len(stamps) < 2:
        raise RuntimeError(
            f"{len(stamps):,} of {total:,} predictions, not past the warm-up:\n{worker.log_tail()}"
        )
    cpu = {process: cpu_seconds(pid) - cpu_before[process] for process, pid in pids.items()}
    steal = steal_since(host_before)
    metrics = worker_metrics(worker)
    ordered = np.sort(np.asarray(stamps, dtype=np.int64))
    start = max(1, warmup)  # the measured stretch starts where the warm-up's predictions end
    measured = len(ordered) - start
    seconds = max(1, int(ordered[-1] - ordered[start - 1])) / 1000
    sampled = len(stamps) - sampled_at  # fewer than measured when the reader fell behind
    per_event = {process: s / sampled * 1e6 if sampled else None for process, s in cpu.items()}
    return Throughput(
        rate=measured / seconds,
        events=len(stamps),
        offered=total,
        worker_us=per_event["worker"],
        redis_us=per_event["redis"],
        cache_share=cache_share(metrics_before, metrics),
        steal=steal,
    )


def cache_share(before: dict[str, float], after: dict[str, float]) -> float | None:
    """The share of the memories loaded between two reads of the worker's /metrics that its
    memory cache served; None when none was loaded."""
    loads = {}
    for source in ("cache", "redis"):
        key = f'stream_lstm_memory_loads_total{{source="{source}"}}'
        loads[source] = after.get(key, 0.0) - before.get(key, 0.0)
    total = sum(loads.values())
    return loads["cache"] / total if total else None


@dataclass
class Run:
    """What every point of a run shares."""

    args: argparse.Namespace
    services: Services
    layout: KeyLayout  # the worker's memory keys
    shape: Shape
    client: Redis  # for pre-writing and INFO
    tally: I64  # (largest size,) events sent to each entity over the whole run
    baseline: int  # Redis used_memory before any memory was written
    rate: float | None = None  # offered in the latency phases, once known


async def point(run: Run, distribution: str, entities: int) -> Point:
    """Pre-fill a stretch of events, time a fresh worker through it, then time events offered
    at a steady rate on the same worker; check a few stored steps once it stopped."""
    args, services = run.args, run.services
    connection = services.broker.connection
    name = f"{distribution}-{entities}"
    output = f"{NAME}-{name}-predictions"  # a topic per point: each phase reads only its own
    popularity = Popularity(distribution, entities, seed=1)
    drawn = popularity.draw(args.warmup + args.events)
    np.add.at(run.tally, drawn, 1)
    print(f"{name}: appending {len(drawn):,} events", flush=True)
    await prefill(connection, INPUT_TOPIC, events_of("t", drawn, seed=2))
    touched = [drawn]

    def make(prefix: str, count: int, seed: int) -> list[Message]:
        more = popularity.draw(count)
        np.add.at(run.tally, more, 1)
        touched.append(more)
        return events_of(prefix, more, seed)

    consumer = reader(connection, output, fetch_wait_ms=100)
    await consumer.start()
    try:
        worker = start_worker(services, NAME, output_topic=output, memory_dtype=args.dtype)
    except BaseException:
        await consumer.stop()
        raise
    latency: Latency | None = None
    paced_cache: float | None = None
    try:
        try:
            measured = await throughput(
                consumer, worker, services.redis, args.warmup, args.events, args.max_seconds
            )
        finally:
            await consumer.stop()
        if run.rate is None:
            run.rate = measured.rate / 2
        print(
            f"  {measured.rate:,.0f} events/s; latency at {run.rate:,.0f}/s for "
            f"{args.latency_seconds:.0f}s",
            flush=True,
        )
        if measured.complete:
            emitter = KafkaEmitter(connection)
            await emitter.start()
            before = worker_metrics(worker)
            try:
                latency = await offer(
                    services,
                    emitter,
                    (INPUT_TOPIC, output),
                    run.rate,
                    args.latency_seconds,
                    make,
                    PUBLISH_EVERY_S[0],
                )
            finally:
                await emitter.stop()
            paced_cache = cache_share(before, worker_metrics(worker))
    finally:
        worker.stop()
    per_entity = (await used_memory(run.client) - run.baseline) / entities
    if latency is not None and len(latency.latencies_ms) == latency.sent:
        checked = await check_steps(run, np.concatenate(touched), seed=entities)
    else:
        checked = "not checked: some events were not predicted"
    return Point(distribution, entities, measured, latency, paced_cache, per_entity, checked)


async def check_steps(run: Run, drawn: I64, seed: int) -> str:
    """That the stored step of a few entities of this point (its most frequent and three drawn
    at random) is the pre-written one plus every event sent to them in the run: their memory
    was loaded from what was written, not started from zero. Raises RuntimeError if not."""
    unique, counts = np.unique(drawn, return_counts=True)
    picked = np.random.default_rng(seed).choice(unique, size=min(3, len(unique)), replace=False)
    probes = [int(unique[counts.argmax()]), *picked.tolist()]
    wrong = []
    async with MemoryStore(
        run.services.redis.url, run.layout.namespace, run.layout.model_version, dtype=run.args.dtype
    ) as store:
        for index in probes:
            stored = await store.get(entity_id(index))
            step = None if stored is None else int(stored.memories.step[0])
            expected = PREWRITTEN_STEP + int(run.tally[index])
            if step != expected:
                wrong.append(f"{entity_id(index)}: step {step}, expected {expected}")
    if wrong:
        raise RuntimeError(
            "stored steps are not the pre-written step plus the events sent: " + "; ".join(wrong)
        )
    return f"ok ({len(probes)} entities, up to {int(run.tally[probes[0]]):,} events)"


# --- report ----------------------------------------------------------------------------------


def verdicts(points: Sequence[Point]) -> tuple[bool, bool, str]:
    """(throughput target met, bytes flat, the verdict line) over every point."""
    shares = []
    for distribution in dict.fromkeys(p.distribution for p in points):
        mine = [p for p in points if p.distribution == distribution]  # sizes ascending
        first, last = mine[0], mine[-1]
        share = last.throughput.rate / first.throughput.rate
        text = (
            f"{distribution} {last.throughput.rate:,.0f}/s at {last.entities:,}, {share:.0%} of "
            f"{first.throughput.rate:,.0f}/s at {first.entities:,}"
        )
        shares.append((share >= TARGET_SHARE, text))
    sizes = [p.bytes_per_entity for p in points]
    median = float(np.median(sizes))
    spread = max(abs(s / median - 1) for s in sizes)
    rate_ok, flat_ok = all(ok for ok, _ in shares), spread <= FLAT_BYTES
    line = (
        f"Target: events/s at the largest size >= {TARGET_SHARE:.0%} of the smallest "
        f"(each distribution): {'; '.join(text for _, text in shares)}: {verdict(rate_ok)}. "
        f"Redis bytes per entity flat within ±{FLAT_BYTES:.0%}: {min(sizes):,.0f} to "
        f"{max(sizes):,.0f} B, at most {spread:.1%} from their median of {median:,.0f} B: "
        f"{verdict(flat_ok)}."
    )
    return rate_ok, flat_ok, line


def share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def table(points: Sequence[Point]) -> str:
    smallest: dict[str, float] = {}
    for p in points:
        smallest.setdefault(p.distribution, p.throughput.rate)
    rows = [
        "| distribution | entities | events/s | % of smallest | worker us/event "
        "| Redis us/event | Redis B/entity | cache share, backlog / paced | p50 ms | p99 ms "
        "| steal | stored steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in points:
        t, lat = p.throughput, p.latency
        cache = f"{share(t.cache_share)} / {share(p.paced_cache_share)}"
        p50, p99 = (
            ("n/a", "n/a")
            if lat is None
            else (f"{lat.percentile(50):.1f}", f"{lat.percentile(99):.1f}")
        )
        partial = "" if t.complete else f" (partial: {t.events:,} of {t.offered:,})"
        rows.append(
            f"| {p.distribution} | {p.entities:,} | {t.rate:,.0f}{partial} "
            f"| {t.rate / smallest[p.distribution]:.0%} | {us(t.worker_us)} | {us(t.redis_us)} "
            f"| {p.bytes_per_entity:,.0f} | {cache} | {p50} | {p99} | {t.steal:.0%} "
            f"| {p.checked} |"
        )
    return "\n".join(rows)


def report(
    args: argparse.Namespace, kind: BenchBroker, points: Sequence[Point], rate: float
) -> str:
    """The RESULTS.md section: every figure from this run, the target judged."""
    cache = Settings.model_fields["memory_cache_entities"].default
    _, _, line = verdicts(points)
    lines = [
        f"{kind.command('entities.py')} ({machine()}; aiokafka {version('aiokafka')}, redis-py "
        f"{version('redis')}, {kind.details}, {args.redis_server}; all on this machine, on "
        f"loopback; load average {args.load:.1f} at the start: other processes share the "
        "cores).",
        "",
        f"Model: input {INPUT}, hidden {HIDDEN}, 1 layer, softmax over {len(LABELS)} labels. One "
        f"worker process (max_batch {args.max_batch}, 1 torch thread, memory cache "
        f"{cache:,} entities, other settings default), one input topic of {PARTITIONS} "
        f"partitions for the run, memories stored as {args.dtype} (`--dtype`; "
        "STREAM_LSTM_MEMORY_DTYPE). Before each size its new entities' memories were written "
        "straight into Redis, as the worker's store encodes them, fenced before their "
        f"partition's first offset, at step {PREWRITTEN_STEP:,}. Each point: "
        f"{args.warmup:,} + {args.events:,} events appended, uniform over the entities or Zipf "
        "(s = 1, ranks shuffled over the ids), then a fresh worker; events/s over the last "
        f"{args.events:,} predictions by record timestamps, CPU per event (worker, Redis) and "
        "the memory cache's share of the loads over the same stretch (backlog); then on the "
        f"same worker events of the same distribution offered at {rate:,.0f}/s for "
        f"{args.latency_seconds:.0f} s (sent every {PUBLISH_EVERY_S[0] * 1000:.0f} ms), latency "
        "from handing an event to the producer to reading its prediction, and the cache's share "
        "of the loads (paced). Redis bytes per entity: `used_memory` less the empty server's, "
        "over the entities. Stored steps: a "
        f"few entities' stored step is {PREWRITTEN_STEP:,} plus every event they got (their "
        "memory was loaded). Steal: host CPU the hypervisor took during the measured stretch.",
        "",
        line,
        "",
        table(points),
    ]
    return "\n".join(lines)


def plot(points: Sequence[Point], rate: float, path: Path) -> None:
    """Events/s and p99 at ``rate`` against entities (log x), a line per distribution, with the
    target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('the plot needs matplotlib: pip install "stream-lstm[dev]"') from None
    figure, (rates, tails) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for distribution in dict.fromkeys(p.distribution for p in points):
        mine = [p for p in points if p.distribution == distribution]
        sizes = [p.entities for p in mine]
        (line,) = rates.plot(sizes, [p.throughput.rate for p in mine], "o-", label=distribution)
        rates.axhline(
            TARGET_SHARE * mine[0].throughput.rate,
            color=line.get_color(),
            linestyle=":",
            label=f"{TARGET_SHARE:.0%} of {distribution} at {sizes[0]:,}",
        )
        measured = [p for p in mine if p.latency is not None]
        tails.plot(
            [p.entities for p in measured],
            [p.latency.percentile(99) for p in measured if p.latency is not None],
            "o-",
            label=distribution,
        )
    titles = ("events/s, one worker", f"latency p99 (ms) at {rate:,.0f} events/s")
    for axes, title in zip((rates, tails), titles, strict=True):
        axes.set_xscale("log")
        axes.yaxis.set_major_formatter("{x:,.0f}")
        axes.set_xlabel("distinct entities")
        axes.set_title(title)
        axes.set_ylim(bottom=0)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- the run ---------------------------------------------------------------------------------


async def warm_up(services: Services) -> None:
    """Send ``WARM_UP_EVENTS`` events through the broker and read them back (no worker)."""
    print(f"warming the broker up: {WARM_UP_EVENTS:,} events through it", flush=True)
    connection = services.broker.connection
    drawn = np.arange(WARM_UP_EVENTS, dtype=np.int64)
    await prefill(connection, WARM_UP_TOPIC, events_of("warm", drawn, seed=0))
    consumer = reader(connection, WARM_UP_TOPIC, fetch_wait_ms=100)
    await consumer.start()
    try:
        read, deadline = 0, time.monotonic() + FIRST_PREDICTION_S
        while read < WARM_UP_EVENTS and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            read += sum(len(records) for records in batches.values())
    finally:
        await consumer.stop()


async def run_points(args: argparse.Namespace, services: Services) -> tuple[list[Point], float]:
    """Every point, sizes ascending; and the rate the latency phases were offered."""
    model = StreamModel.load(services.model_path)
    outputs = [
        f"{NAME}-{distribution}-{size}-predictions"
        for size in args.sizes
        for distribution in args.distributions
    ]
    topics = [INPUT_TOPIC, f"{NAME}-dead-letters", WARM_UP_TOPIC, *outputs]
    await services.broker.connection.create_topics(topics, PARTITIONS)
    await served(services.broker.connection, topics, PARTITIONS)
    await warm_up(services)
    client = Redis.from_url(services.redis.url)
    try:
        run = Run(
            args,
            services,
            KeyLayout(app_id(NAME), model.version),
            model.shape,
            client,
            np.zeros(max(args.sizes), np.int64),
            await used_memory(client),
            args.rate,
        )
        points, written = [], 0
        for size in args.sizes:
            if written:
                per_entity = (await used_memory(client) - run.baseline) / written
                check_room(per_entity, size - written, args.dtype)
            print(f"writing the memories of entities {written:,} to {size - 1:,}", flush=True)
            speed = await prewrite(client, run.layout, run.shape, args.dtype, written, size)
            written = size
            per_entity = (await used_memory(client) - run.baseline) / size
            print(f"  {speed:,.0f} memories/s; Redis {per_entity:,.0f} B/entity", flush=True)
            if size == args.sizes[0]:
                check_room(per_entity, max(args.sizes) - size, args.dtype)
            for distribution in args.distributions:
                found = await point(run, distribution, size)
                points.append(found)
                print(summary(found), flush=True)
    finally:
        await client.aclose()
    assert run.rate is not None, "the first point sets it"
    return points, run.rate


def summary(p: Point) -> str:
    t, lat = p.throughput, p.latency
    tail = (
        "" if lat is None else f", p50 {lat.percentile(50):.1f} ms, p99 {lat.percentile(99):.1f} ms"
    )
    cache = f", cache {share(t.cache_share)} / {share(p.paced_cache_share)}"
    return (
        f"{p.distribution} {p.entities:,}: {t.rate:,.0f} events/s, worker {us(t.worker_us)} "
        f"us/event, Redis {us(t.redis_us)} us/event, {p.bytes_per_entity:,.0f} B/entity{cache}"
        f"{tail}, steal {t.steal:.0%}; steps: {p.checked}"
    )


def sizes(text: str) -> list[int]:
    found = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    if not found or any(n < 1 for n in found) or found != sorted(set(found)):
        raise argparse.ArgumentTypeError("sizes must be positive and ascending: 10000,100000")
    return found


def distributions(text: str) -> list[str]:
    found = [part.strip() for part in text.split(",") if part.strip()]
    if not found or any(d not in DISTRIBUTIONS for d in found) or len(set(found)) < len(found):
        raise argparse.ArgumentTypeError(f"distributions: some of {', '.join(DISTRIBUTIONS)}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_broker_argument(parser, default="apache")
    parser.add_argument(
        "--sizes",
        type=sizes,
        default=sizes("10000,100000,1000000,5000000,10000000"),
        help="distinct entities at each point, ascending",
    )
    parser.add_argument("--distributions", type=distributions, default=list(DISTRIBUTIONS))
    parser.add_argument("--events", type=int, default=200_000, help="measured events per point")
    parser.add_argument("--warmup", type=int, default=20_000, help="events before them")
    parser.add_argument(
        "--rate", type=float, help="events/s offered for latency; default half the first point's"
    )
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument(
        "--dtype",
        choices=list(codec.CODES),
        default="float16",
        help=(
            "how memories are stored (STREAM_LSTM_MEMORY_DTYPE): float16 (default) keeps 10M "
            "entities at ~7.6 GB of Redis; float32, ~14 GB"
        ),
    )
    parser.add_argument("--max-batch", type=int, default=1024, help="the worker's max_batch")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=MAX_SECONDS,
        help="a throughput phase's bound after its first prediction",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="sizes 1,000 and 10,000, few events (about a minute); not written",
    )
    args = parser.parse_args()
    if args.quick:  # smaller defaults; flags given still win
        parser.set_defaults(
            sizes=[1000, 10_000], events=5_000, warmup=1_000, latency_seconds=3.0, max_seconds=60.0
        )
        args = parser.parse_args()
    args.load = os.getloadavg()[0]  # the run's context, reported with its figures
    torch.set_num_threads(1)  # as the worker runs
    gc.freeze()

    kind = bench_broker(args.broker)
    with tempfile.TemporaryDirectory(prefix="stream-lstm-entities-") as tmp:
        workdir = Path(tmp)
        build_model(workdir / "model.pt")
        with kind.running(workdir) as broker, RedisServer() as redis:
            services = Services(broker, redis, workdir / "model.pt", workdir, args.max_batch)
            args.redis_server = asyncio.run(server_version(redis.url))
            points, rate = asyncio.run(run_points(args, services))
    body = report(args, kind, points, rate)
    print("\n" + body)
    if not args.quick:
        after = bench_broker("apache").title("End to end")  # after every end-to-end section
        write_section(kind.title("Entities"), body, after=after)
        plot(points, rate, PLOT)
        print(f"written to bench/RESULTS.md, section {kind.title('Entities')!r}, and {PLOT}")


if __name__ == "__main__":
    main()
