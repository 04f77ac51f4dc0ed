"""Soak: a steady load for minutes; the worker's memory (RSS) must stay flat and its lag bounded.

    python bench/soak.py [--broker tansu|apache] [--minutes 3] [--rate 2000] [--entities 20000]

A default run takes ``--minutes`` (3) and about 10 s more to start (Apache Kafka: 20 s).

Starts a broker (``--broker``: the embedded Tansu, or Apache Kafka), a Redis-protocol server and
one worker with the bundled TV-show model, offers ``--rate`` events/s over ``--entities``
channels, and every 10 s samples the worker's RSS (/proc), its true lag (events sent minus
events the worker has processed, from /metrics), the CPU share of the worker and of the broker
(/proc), and the latency from handing each event to the producer to reading its prediction (p50
and p99 of the predictions read in the interval: each event's id is its number, and a reader of
the output topic notes when its prediction comes). The producer sends what is due every 50 ms,
one batch a partition (the worker's own emitter): Tansu's fetches cost more with every record
batch a partition holds, and tiny batches saturated it within minutes (a run where the broker is
near a full core measures the broker, not the worker); Apache Kafka gets the same batches, so
the two runs compare. Prints the samples and writes the figures to bench/RESULTS.md, section
"Soak" (Tansu) or "Soak (Apache Kafka <version>)". Not part of the test suite: it takes minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.brokers import add_broker_argument, bench_broker
from bench.e2e import reader
from bench.results import cpu_seconds, machine
from workers.consumer import KafkaEmitter
from workers.dev import tvshows
from workers.dev.stack import Stack, WorkerProcess

SAMPLE_S = 10.0
SEND_EVERY_S = 0.05
CYCLE_FRAMES = 50
"""Frames of each channel made up front, encoded; a longer run sends them again in turn (the
memories go on: a soak needs load, not new features), so a long run's workload fits in memory."""


def rss_mb(worker: WorkerProcess) -> float:
    assert worker.process is not None
    for line in Path(f"/proc/{worker.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def resident_mb(worker: WorkerProcess) -> tuple[float, float]:
    """The worker's resident memory in malloc's main heap (``[heap]``, grown with brk) and in
    anonymous mappings (Python's object arenas, large or other threads' malloc blocks), in MB
    (/proc/<pid>/smaps): where an RSS that grows grows."""
    assert worker.process is not None
    heap = anonymous = 0
    name = ""
    for line in Path(f"/proc/{worker.process.pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header: address perms offset dev inode [name]
            name = fields[5] if len(fields) > 5 else ""
        elif fields[0] == "Rss:":
            if name == "[heap]":
                heap += int(fields[1])
            elif not name:
                anonymous += int(fields[1])
    return heap / 1024, anonymous / 1024


@dataclass(frozen=True)
class Sample:
    elapsed_s: float
    rss_mb: float
    heap_mb: float  # of rss_mb: malloc's main heap
    anonymous_mb: float  # of rss_mb: anonymous mappings
    lag: float  # events sent minus events processed
    sent: int
    worker_cpu: float  # share of one core over the last interval
    broker_cpu: float
    p50_ms: float  # latency of the predictions read in the interval
    p99_ms: float


class Latencies:
    """Event-to-prediction latency: each event carries its number as its id; a reader of the
    output topic notes when each prediction comes back."""

    def __init__(self) -> None:
        self.sent_at: dict[str, float] = {}
        self.interval: list[float] = []  # seconds, since the last ``take``

    async def read(self, stack: Stack) -> None:
        consumer = reader(stack.broker.connection, "stream-lstm-predictions", fetch_wait_ms=10)
        await consumer.start()
        try:
            while True:
                for records in (await consumer.getmany(timeout_ms=100)).values():
                    now = time.monotonic()
                    for record in records:
                        at = self.sent_at.pop(orjson.loads(record.value)["event_id"], None)
                        if at is not None:
                            self.interval.append(now - at)
        finally:
            await consumer.stop()

    def take(self) -> tuple[float, float]:
        """p50 and p99 (ms) of the interval's latencies; NaN when none was read."""
        found, self.interval = self.interval, []
        if len(found) < 2:
            return float("nan"), float("nan")
        cuts = statistics.quantiles(found, n=100)
        return cuts[49] * 1000, cuts[98] * 1000


async def offer(stack: Stack, seconds: float, rate: float, entities: int) -> list[Sample]:
    """Send a steady stream, sampling the worker and the broker as it goes."""
    frames_each = min(CYCLE_FRAMES, max(1, int(seconds * rate / entities) + 1))
    messages = [
        (f.channel.encode(), orjson.dumps({"entity_id": f.channel, "features": f.features})[1:])
        for f in tvshows.workload(entities, frames_each, seed=5)
    ]
    emitter = KafkaEmitter(stack.broker.connection)
    await emitter.start()
    latencies = Latencies()
    reading = asyncio.ensure_future(latencies.read(stack))
    assert stack.worker.process is not None
    pids = (stack.worker.process.pid, stack.broker.pid)
    samples: list[Sample] = []
    pending: list[asyncio.Future[object]] = []
    try:
        started = time.monotonic()
        next_sample, sent = started + SAMPLE_S, 0
        cpu_before = [cpu_seconds(pid) for pid in pids]
        while (now := time.monotonic()) - started < seconds:
            due = int((now - started) * rate)
            batch = []
            for n in range(sent, due):
                key, body = messages[n % len(messages)]
                latencies.sent_at[str(n)] = now
                batch.append((key, b'{"event_id":"%d",%s' % (n, body)))
            pending = [f for f in pending if not f.done()]
            pending += await emitter.send("stream-lstm-events", batch)
            sent = due
            if now >= next_sample:
                cpu = [cpu_seconds(pid) for pid in pids]
                worker_cpu, broker_cpu = (
                    (a - b) / SAMPLE_S for a, b in zip(cpu, cpu_before, strict=True)
                )
                cpu_before = cpu
                behind = sent - stack.worker.metric("stream_lstm_events_total")
                p50, p99 = latencies.take()
                sample = Sample(
                    now - started,
                    rss_mb(stack.worker),
                    *resident_mb(stack.worker),
                    behind,
                    sent,
                    worker_cpu,
                    broker_cpu,
                    p50,
                    p99,
                )
                print(
                    f"  {sample.elapsed_s:5.0f}s  RSS {sample.rss_mb:6.1f} MB (heap "
                    f"{sample.heap_mb:.1f}, anonymous {sample.anonymous_mb:.1f})"
                    f"  lag {behind:7.0f}"
                    f"  CPU worker {worker_cpu:4.0%} broker {broker_cpu:4.0%}"
                    f"  latency p50 {p50:6.1f} ms p99 {p99:6.1f} ms",
                    flush=True,
                )
                samples.append(sample)
                next_sample += SAMPLE_S
            await asyncio.sleep(SEND_EVERY_S)
        await asyncio.gather(*pending)
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await emitter.stop()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_broker_argument(parser)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--entities", type=int, default=20_000)
    args = parser.parse_args()
    kind = bench_broker(args.broker)
    with (
        tempfile.TemporaryDirectory(prefix="stream-lstm-soak-") as tmp,
        Stack(Path(tmp), kafka=args.broker) as stack,
    ):
        samples = asyncio.run(offer(stack, args.minutes * 60, args.rate, args.entities))
    first, last = samples[0], samples[-1]
    peak_rss = max(s.rss_mb for s in samples)
    body = (
        f"{kind.command('soak.py', f'--minutes {args.minutes:g} --rate {args.rate:g}')} "
        f"({machine()}; {kind.details}).\n\n"
        f"The bundled TV-show model, {args.entities:,} channels, {args.rate:,.0f} events/s offered "
        f"for {args.minutes:g} minutes ({last.sent:,} events), sent every 50 ms. Worker RSS "
        f"{first.rss_mb:.1f} MB at {first.elapsed_s:.0f}s and {last.rss_mb:.1f} MB at "
        f"{last.elapsed_s:.0f}s (max {peak_rss:.1f} MB): malloc's main heap "
        f"{first.heap_mb:.1f} -> {last.heap_mb:.1f} MB, anonymous mappings (Python's object "
        f"arenas, large blocks) {first.anonymous_mb:.1f} -> {last.anonymous_mb:.1f} MB; lag "
        "(events sent, not yet processed) "
        f"at most {max(s.lag for s in samples):,.0f} over the run, {last.lag:,.0f} at the end. "
        f"Latency from handing an event to the producer to reading its prediction, per "
        f"interval: p99 {_spread([s.p99_ms for s in samples])} (p50 "
        f"{_spread([s.p50_ms for s in samples])}). "
        "CPU is the share of one core over each interval; a broker near 100% means the run "
        + (
            "measured Tansu (its fetches cost more with every record batch it holds).\n\n"
            if kind.slow_fetches
            else "measured the broker, not the worker.\n\n"
        )
        + "| s | RSS MB | heap MB | anonymous MB | lag | worker CPU | broker CPU | p50 ms "
        + "| p99 ms |\n"
        + "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(
            f"| {s.elapsed_s:.0f} | {s.rss_mb:.1f} | {s.heap_mb:.1f} | {s.anonymous_mb:.1f} "
            f"| {s.lag:,.0f} | {s.worker_cpu:.0%} "
            f"| {s.broker_cpu:.0%} | {s.p50_ms:.1f} | {s.p99_ms:.1f} |"
            for s in samples
        )
    )
    print("\n" + body)
    kind.write("Soak", body)
    print(f"written to bench/RESULTS.md, section {kind.title('Soak')!r}")


def _spread(values: list[float]) -> str:
    """Median, and the range, of per-interval figures (those measured)."""
    found = sorted(v for v in values if v == v)
    if not found:
        return "not measured"
    return f"median {statistics.median(found):.1f} ms, {found[0]:.1f} to {found[-1]:.1f} ms"


if __name__ == "__main__":
    main()
