"""Soak: a steady load for minutes; the worker's memory (RSS) must stay flat and its lag bounded.

    python bench/soak.py [--minutes 3] [--rate 2000] [--entities 20000]

Starts the embedded stack with the bundled TV-show model, offers ``--rate`` events/s over
``--entities`` channels, and every 10 s samples the worker's RSS (/proc) and its consumer lag
(/metrics, the sum over partitions). Prints the samples and writes the figures to
bench/RESULTS.md, section "Soak". Not part of the test suite: it takes minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import machine, write_section
from stream_lstm import tvshows
from workers.stack import Stack, WorkerProcess

SAMPLE_S = 10.0


def rss_mb(worker: WorkerProcess) -> float:
    assert worker.process is not None
    for line in Path(f"/proc/{worker.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def lag(worker: WorkerProcess) -> float:
    _, text = worker.http("GET", "/metrics")
    return sum(
        float(line.split()[-1])
        for line in str(text).splitlines()
        if line.startswith("stream_lstm_consumer_lag{")
    )


async def offer(
    stack: Stack, seconds: float, rate: float, entities: int
) -> list[tuple[float, float, float, float]]:
    """Send a steady stream, sampling (elapsed s, RSS MB, lag, events so far) as it goes."""
    frames = tvshows.workload(entities, max(1, int(seconds * rate / entities) + 1), seed=5)
    producer = AIOKafkaProducer(bootstrap_servers=stack.broker.bootstrap, linger_ms=5)
    await producer.start()
    samples = []
    try:
        started = time.monotonic()
        next_sample, sent = started + SAMPLE_S, 0
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
                sample = (now - started, rss_mb(stack.worker), lag(stack.worker), float(sent))
                elapsed, rss, behind, _ = sample
                print(f"  {elapsed:5.0f}s  RSS {rss:6.1f} MB  lag {behind:7.0f}", flush=True)
                samples.append(sample)
                next_sample += SAMPLE_S
            await asyncio.sleep(0.005)
    finally:
        await producer.stop()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--entities", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stream-lstm-soak-") as tmp, Stack(Path(tmp)) as stack:
        samples = asyncio.run(offer(stack, args.minutes * 60, args.rate, args.entities))
    first, last = samples[0], samples[-1]
    peak_rss = max(s[1] for s in samples)
    body = (
        f"`python bench/soak.py --minutes {args.minutes:g} --rate {args.rate:g}` ({machine()}).\n\n"
        f"The bundled TV-show model, {args.entities:,} channels, {args.rate:,.0f} events/s offered "
        f"for {args.minutes:g} minutes ({last[3]:,.0f} events). Worker RSS {first[1]:.1f} MB at "
        f"{first[0]:.0f}s and {last[1]:.1f} MB at {last[0]:.0f}s (max {peak_rss:.1f} MB); "
        f"consumer lag at most {max(s[2] for s in samples):,.0f} events over the run, "
        f"{last[2]:,.0f} at the end.\n\n"
        "| s | RSS MB | lag |\n|---:|---:|---:|\n"
        + "\n".join(f"| {s[0]:.0f} | {s[1]:.1f} | {s[2]:,.0f} |" for s in samples)
    )
    print("\n" + body)
    write_section("Soak", body)


if __name__ == "__main__":
    main()
