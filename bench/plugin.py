"""Your own loop or Faust app next to the worker: what the plugin costs per event.

    python bench/plugin.py [--broker tansu|apache] [--events 50000] [--entities 20000] [--quick]

A default run takes about 3 minutes on 2 cores (``--quick``: about a minute, not written).

For each contestant, on fresh topics of 8 partitions: pre-fill ``--events`` events over
``--entities`` entities (the target model of bench/e2e.py: input 32, hidden 128, 8 labels),
start it as a user would, and time its predictions from the first to the last by their record
timestamps; its process's CPU per event from its first predictions on. The contestants: the worker
(``stream-lstm worker``), ``examples/aiokafka_loop.py``, ``examples/confluent_loop.py`` and
``examples/faust_app.py`` (``workers.faust_agent``), all with the same store (cache on). Ratios
are against the worker in the same run. Results: bench/RESULTS.md, section "Plugin".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.brokers import BenchBroker, add_broker_argument, bench_broker, served
from bench.e2e import (
    FIRST_PREDICTION_S,
    PARTITIONS,
    Services,
    build_model,
    events,
    prefill,
    reader,
    start_worker,
)
from bench.results import cpu_seconds, machine
from workers.dev.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {"aiokafka loop": "aiokafka_loop", "confluent-kafka loop": "confluent_loop"}
EXAMPLES["Faust agent"] = "faust_app"


@dataclass(frozen=True)
class Run:
    """What one contestant made of a pre-filled topic."""

    name: str
    events: int
    seconds: float  # first to last prediction
    cpu_us: float  # its process's CPU per event after its first predictions

    @property
    def rate(self) -> float:
        return (self.events - 1) / self.seconds if self.seconds > 0 else 0.0


def start_example(services: Services, name: str, example: str) -> subprocess.Popen[bytes]:
    """An example's process on ``<name>-*`` topics, configured as its docstring says."""
    env = {
        **os.environ,
        "KAFKA": services.broker.connection.bootstrap_servers,
        "REDIS": services.redis.url,
        "MODEL": str(services.model_path),
        "GROUP": f"bench-{name}",
        "EVENTS": f"{name}-events",
        "PREDICTIONS": f"{name}-predictions",
        "DEAD_LETTERS": f"{name}-dead-letters",
        "DATADIR": str(services.workdir / f"{name}-faust"),
    }
    args = ["worker", "--without-web", "-l", "info"] if example == "faust_app" else []
    with (services.workdir / f"{name}.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / f"{example}.py"), *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def measure(
    services: Services, name: str, count: int, entities: int, start: Callable[[], int]
) -> Run:
    """Pre-fill ``<name>-events``, call ``start`` (it returns the contestant's pid), and time
    its predictions first to last; the caller stops it."""
    connection = services.broker.connection
    print(f"{name}: pre-filling {count:,} events over {entities:,} entities", flush=True)
    await prefill(connection, f"{name}-events", events("p", count, entities, seed=3))
    consumer = reader(connection, f"{name}-predictions", fetch_wait_ms=100)
    await consumer.start()
    try:
        pid = start()
        received, first_ts, last_ts, cpu_from, counted_from = 0, None, 0, 0.0, 0
        deadline = time.monotonic() + FIRST_PREDICTION_S
        while received < count and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                if first_ts is None:  # from here on: its start-up (imports, joining) is over
                    cpu_from, counted_from = cpu_seconds(pid), len(records)
                received += len(records)
                stamps = [r.timestamp for r in records]
                first_ts = min(first_ts or stamps[0], *stamps)
                last_ts = max(last_ts, *stamps)
                deadline = max(deadline, time.monotonic() + 10)
        cpu_us = 1e6 * (cpu_seconds(pid) - cpu_from) / max(1, received - counted_from)
    finally:
        await consumer.stop()
    if received < count:
        raise RuntimeError(f"{name}: {received:,} of {count:,} predictions (log in workdir)")
    assert first_ts is not None
    run = Run(name, received, (last_ts - first_ts) / 1000, cpu_us)
    print(f"  {run.rate:,.0f} events/s, {run.cpu_us:.1f} us of CPU an event", flush=True)
    return run


async def contest(args: argparse.Namespace, services: Services) -> list[Run]:
    names = ["worker", *(f"plugin{k}" for k in range(len(EXAMPLES)))]
    topics = [f"{n}-{t}" for n in names for t in ("events", "predictions", "dead-letters")]
    await services.broker.connection.create_topics(topics, PARTITIONS)
    await served(services.broker.connection, topics, PARTITIONS)
    worker = None

    def start_the_worker() -> int:
        nonlocal worker
        worker = start_worker(services, "worker")
        assert worker.process is not None
        return worker.process.pid

    try:
        runs = [await measure(services, "worker", args.events, args.entities, start_the_worker)]
    finally:
        if worker is not None:
            worker.stop()
    for (title, example), name in zip(EXAMPLES.items(), names[1:], strict=True):
        process = None

        def start(name: str = name, example: str = example) -> int:
            nonlocal process
            process = start_example(services, name, example)
            return process.pid

        try:
            run = await measure(services, name, args.events, args.entities, start)
            runs.append(Run(title, run.events, run.seconds, run.cpu_us))
        finally:
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
    return runs


def report(args: argparse.Namespace, kind: BenchBroker, runs: list[Run]) -> str:
    worker = runs[0]
    rows = "\n".join(
        f"| {run.name} | {run.rate:,.0f} | {run.rate / worker.rate:.2f}x | {run.cpu_us:.1f} | "
        f"{run.cpu_us / worker.cpu_us:.2f}x |"
        for run in runs
    )
    flags = f"--events {args.events} --entities {args.entities}"
    return f"""{kind.command("plugin.py", flags)} ({machine()}; {kind.details}).

Each contestant on a topic of 8 partitions pre-filled with {args.events:,} events over
{args.entities:,} entities, started as a user starts it; events/s from its first prediction to
its last by record timestamps, and its own process's CPU per event from its first predictions
on (its start-up not counted, nor the broker's and Redis's CPU). The same model and store
settings (memory cache on) for all.

| contestant | events/s | vs worker | CPU us an event | vs worker |
|---|---|---|---|---|
{rows}

The worker pipelines (it prepares the next batch while the broker and Redis take the last one)
and sends each batch as one producer batch per partition; the examples process one batch at a
time and send message by message, as a first loop of one's own would (librdkafka batches and
sends in its own threads, which is why the confluent-kafka loop keeps up). The Faust agent's
cost is Faust's per-message machinery: a py-spy profile of it puts a fifth of its CPU in the
step itself and the rest in Faust's fetcher thread, conductor, stream buffers and per-message
sends (it runs with `-l info`: at Faust's default level its terminal spinner also turned every
library's debug logging on, another 13%).
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_broker_argument(parser)
    parser.add_argument("--events", type=int, default=50_000, help="pre-filled per contestant")
    parser.add_argument("--entities", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="5,000 events; not written")
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(events=5_000, entities=1_000)
        args = parser.parse_args()
    torch.set_num_threads(1)
    kind = bench_broker(args.broker)
    with tempfile.TemporaryDirectory(prefix="stream-lstm-plugin-") as tmp:
        workdir = Path(tmp)
        build_model(workdir / "model.pt")
        with kind.running(workdir) as broker, RedisServer() as redis:
            services = Services(broker, redis, workdir / "model.pt", workdir, 1024)
            runs = asyncio.run(contest(args, services))
    body = report(args, kind, runs)
    print("\n" + body)
    if not args.quick:
        kind.write("Plugin", body)
        print(f"written to bench/RESULTS.md, section {kind.title('Plugin')!r}")


if __name__ == "__main__":
    main()
