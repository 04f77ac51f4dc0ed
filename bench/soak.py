"""Soak: a steady load for minutes; the worker's memory (RSS) must stay flat and its lag bounded.

    python bench/soak.py [--broker tansu|apache] [--minutes 3] [--rate 2000] [--entities 20000]

A default run takes ``--minutes`` (3) and about 10 s more to start (Apache Kafka: 20 s).

Starts a broker (``--broker``: the embedded Tansu, or Apache Kafka), a Redis-protocol server and
one worker with the bundled TV-show model, offers ``--rate`` events/s over ``--entities``
channels, and every 10 s samples the worker's RSS (/proc), its true lag (events sent minus
events the worker has processed, from /metrics) and the CPU share of the worker and of the
broker (/proc). The producer sends every 50 ms (linger 50 ms): Tansu's fetches cost more with
every record batch a partition holds, and tiny batches saturated it within minutes (a run
where the broker is near a full core measures the broker, not the worker); Apache Kafka gets
the same batches, so the two runs compare. Prints the samples and writes the figures to
bench/RESULTS.md, section "Soak" (Tansu) or "Soak (Apache Kafka <version>)". Not part of the
test suite: it takes minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.brokers import add_broker_argument, bench_broker
from bench.results import cpu_seconds, machine
from workers.dev import tvshows
from workers.dev.stack import Stack, WorkerProcess

SAMPLE_S = 10.0


def rss_mb(worker: WorkerProcess) -> float:
    assert worker.process is not None
    for line in Path(f"/proc/{worker.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@dataclass(frozen=True)
class Sample:
    elapsed_s: float
    rss_mb: float
    lag: float  # events sent minus events processed
    sent: int
    worker_cpu: float  # share of one core over the last interval
    broker_cpu: float


async def offer(stack: Stack, seconds: float, rate: float, entities: int) -> list[Sample]:
    """Send a steady stream, sampling the worker and the broker as it goes."""
    frames = tvshows.workload(entities, max(1, int(seconds * rate / entities) + 1), seed=5)
    producer = stack.broker.connection.producer(linger_ms=50)
    await producer.start()
    assert stack.worker.process is not None
    pids = (stack.worker.process.pid, stack.broker.pid)
    samples = []
    try:
        started = time.monotonic()
        next_sample, sent = started + SAMPLE_S, 0
        cpu_before = [cpu_seconds(pid) for pid in pids]
        while (now := time.monotonic()) - started < seconds:
            due = int((now - started) * rate)
            pending = []
            for frame in frames[sent:due]:
                value = {"entity_id": frame.channel, "features": frame.features}
                pending.append(
                    await producer.send(
                        "stream-lstm-events", orjson.dumps(value), key=frame.channel.encode()
                    )
                )
            sent = due
            await asyncio.gather(*pending)
            if now >= next_sample:
                cpu = [cpu_seconds(pid) for pid in pids]
                worker_cpu, broker_cpu = (
                    (a - b) / SAMPLE_S for a, b in zip(cpu, cpu_before, strict=True)
                )
                cpu_before = cpu
                behind = sent - stack.worker.metric("stream_lstm_events_total")
                sample = Sample(
                    now - started, rss_mb(stack.worker), behind, sent, worker_cpu, broker_cpu
                )
                print(
                    f"  {sample.elapsed_s:5.0f}s  RSS {sample.rss_mb:6.1f} MB  lag {behind:7.0f}"
                    f"  CPU worker {worker_cpu:4.0%} broker {broker_cpu:4.0%}",
                    flush=True,
                )
                samples.append(sample)
                next_sample += SAMPLE_S
            await asyncio.sleep(0.05)
    finally:
        await producer.stop()
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
        f"{last.elapsed_s:.0f}s (max {peak_rss:.1f} MB); lag (events sent, not yet processed) "
        f"at most {max(s.lag for s in samples):,.0f} over the run, {last.lag:,.0f} at the end. "
        "CPU is the share of one core over each interval; a broker near 100% means the run "
        + (
            "measured Tansu (its fetches cost more with every record batch it holds).\n\n"
            if kind.slow_fetches
            else "measured the broker, not the worker.\n\n"
        )
        + "| s | RSS MB | lag | worker CPU | broker CPU |\n|---:|---:|---:|---:|---:|\n"
        + "\n".join(
            f"| {s.elapsed_s:.0f} | {s.rss_mb:.1f} | {s.lag:,.0f} | {s.worker_cpu:.0%} "
            f"| {s.broker_cpu:.0%} |"
            for s in samples
        )
    )
    print("\n" + body)
    kind.write("Soak", body)
    print(f"written to bench/RESULTS.md, section {kind.title('Soak')!r}")


if __name__ == "__main__":
    main()
