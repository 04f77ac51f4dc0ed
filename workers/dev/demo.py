"""``stream-lstm demo``: the lecture's TV channels through a real stack on this machine.

Each channel (a nature show or a pet show) is an entity and its frames are events. A frame of a
dog looks like a frame of a wolf; the channel's long-term memory of the other animals it showed
tells them apart. The demo streams every frame twice: once as the channel itself (memory kept)
and once under a twin id with ``reset`` on every event (no memory), and reports the accuracy of
both on the ambiguous frames, the throughput and the latency, all measured in this run.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from workers.dev import tvshows
from workers.dev.stack import Stack

NO_MEMORY = "no-memory/"
"""Prefix of the twin channels whose every frame carries ``reset``."""


@dataclass(frozen=True)
class Sent:
    frame: tvshows.Frame
    memory: bool
    at: float


@dataclass(frozen=True)
class Summary:
    events: int
    seconds: float
    latencies_ms: list[float]
    correct: dict[tuple[bool, bool], int]  # (memory, ambiguous) -> correct predictions
    total: dict[tuple[bool, bool], int]
    dead_letters: float
    showcase: str  # a nature channel whose stored memory the summary shows

    def accuracy(self, memory: bool, ambiguous: bool) -> float:
        return self.correct[memory, ambiguous] / max(1, self.total[memory, ambiguous])


def run(stack: Stack, channels: int, frames: int, rate: float, seed: int) -> Summary:
    """Stream the workload through the stack's worker and measure what comes back."""
    workload = tvshows.workload(channels, frames, seed)
    return asyncio.run(_stream(stack, workload, rate))


async def _stream(stack: Stack, workload: Sequence[tvshows.Frame], rate: float) -> Summary:
    env = stack.worker.env
    connection = stack.broker.connection
    sent: dict[str, Sent] = {}
    consumer = connection.consumer(
        env.get("STREAM_LSTM_OUTPUT_TOPIC", "stream-lstm-predictions"),
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,  # aiokafka's 500 ms default would be most of the measured latency
    )
    producer = connection.producer(linger_ms=5)
    await consumer.start()
    await producer.start()
    try:
        started = time.monotonic()
        publishing = asyncio.create_task(
            _publish(
                producer,
                env.get("STREAM_LSTM_INPUT_TOPIC", "stream-lstm-events"),
                workload,
                rate,
                sent,
            )
        )
        results = await _collect(consumer, 2 * len(workload), sent)
        await publishing
        seconds = time.monotonic() - started
    finally:
        await producer.stop()
        await consumer.stop()
    correct = {(m, a): 0 for m in (True, False) for a in (True, False)}
    total = dict(correct)
    latencies = []
    for event_id, (label, received_at) in results.items():
        item = sent[event_id]
        key = (item.memory, item.frame.ambiguous)
        total[key] += 1
        correct[key] += label == item.frame.animal
        latencies.append((received_at - item.at) * 1000)
    return Summary(
        events=len(results),
        seconds=seconds,
        latencies_ms=latencies,
        correct=correct,
        total=total,
        dead_letters=stack.worker.metric("stream_lstm_dead_letters_total"),
        showcase=next(f.channel for f in workload if f.kind == "nature"),
    )


async def _publish(
    producer: AIOKafkaProducer,
    topic: str,
    workload: Sequence[tvshows.Frame],
    rate: float,
    sent: dict[str, Sent],
) -> None:
    """Send each frame as the channel and as its no-memory twin, at ``rate`` events/s."""
    started = time.monotonic()
    pending = []
    for n, frame in enumerate(workload):
        for memory in (True, False):
            entity = frame.channel if memory else NO_MEMORY + frame.channel
            event_id = f"{entity}#{frame.index}"
            value = orjson.dumps(
                {
                    "entity_id": entity,
                    "features": frame.features,
                    "event_id": event_id,
                    "reset": not memory,
                }
            )
            sent[event_id] = Sent(frame, memory, time.monotonic())
            pending.append(await producer.send(topic, value, key=entity.encode()))
        if rate and n % 50 == 0:
            ahead = started + 2 * n / rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
    await asyncio.gather(*pending)


async def _collect(
    consumer: AIOKafkaConsumer, expected: int, sent: dict[str, Sent]
) -> dict[str, tuple[str | None, float]]:
    """Every prediction of the run (by event id), with its label and arrival time."""
    results: dict[str, tuple[str | None, float]] = {}
    with click.progressbar(length=expected, label="predictions", file=sys.stderr) as bar:
        while len(results) < expected:
            batches = await consumer.getmany(timeout_ms=30_000)
            if not batches:
                raise TimeoutError(f"no prediction for 30 s; {len(results)} of {expected} arrived")
            now = time.monotonic()
            for records in batches.values():
                for record in records:
                    prediction = orjson.loads(record.value)
                    if prediction["event_id"] in sent and prediction["event_id"] not in results:
                        results[prediction["event_id"]] = (prediction["label"], now)
                        bar.update(1)
    return results


def report(summary: Summary, snapshot: dict[str, Any], rate: float) -> str:
    """The demo's closing summary, every figure from the run."""
    lat = sorted(summary.latencies_ms)
    pct = {p: lat[min(len(lat) - 1, int(len(lat) * p / 100))] for p in (50, 95, 99)}
    ltm = snapshot["ltm"][0]
    lines = [
        "",
        "Accuracy on ambiguous frames (a dog or a wolf?):",
        f"  with memory (the channel's LTM/STM)   {summary.accuracy(True, True):6.1%}"
        f"   ({summary.total[True, True]} frames)",
        f"  memory reset at every event           {summary.accuracy(False, True):6.1%}",
        "Accuracy on all frames:",
        f"  with memory                           {_all(summary, True):6.1%}",
        f"  memory reset at every event           {_all(summary, False):6.1%}",
        "",
        f"Throughput: {summary.events} events in {summary.seconds:.1f}s = "
        f"{summary.events / summary.seconds:,.0f} events/s"
        + (f" (offered {rate:,.0f}/s)" if rate else " (offered as fast as possible)"),
        f"Latency, event published to prediction received: p50 {pct[50]:.1f} ms, "
        f"p95 {pct[95]:.1f} ms, p99 {pct[99]:.1f} ms",
        f"Dead letters: {summary.dead_letters:.0f}",
        "",
        f"Stored memory of channel {snapshot['entity_id']!r} after {snapshot['step']} frames "
        f"(model {snapshot['model_version']}):",
        f"  LTM (cell state c), first 6 of {len(ltm)}: " + " ".join(f"{v:+.3f}" for v in ltm[:6]),
        "  STM (hidden state h), first 6: " + " ".join(f"{v:+.3f}" for v in snapshot["stm"][0][:6]),
        f"  mean |LTM| {statistics.fmean(abs(v) for v in ltm):.3f}",
    ]
    return "\n".join(lines)


def _all(summary: Summary, memory: bool) -> float:
    correct = summary.correct[memory, True] + summary.correct[memory, False]
    return correct / max(1, summary.total[memory, True] + summary.total[memory, False])


def default_workdir() -> Path:
    return Path.cwd() / ".stream-lstm"
