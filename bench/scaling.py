"""Workers scale with partitions: 1, 2 and 4 worker processes in one group on one input topic.

    python bench/scaling.py [--broker tansu|apache] [--events 100000] [--entities 20000]
                            [--workers 1 2 4] [--device cpu|cuda]

A default run takes about 2 minutes (``--broker apache``: 10-20 s more, to start Kafka).

``--device cuda``, on a machine with a CUDA GPU: every worker steps on that one GPU (memories
still come from Redis), N = 1, 2, 4 and 8 by default; its figures go to their own section,
"Scaling out on a GPU", with the GPU named. Without a GPU it stops before starting anything.

Starts a broker (``--broker``: the embedded Tansu, or Apache Kafka) and a Redis-protocol server.
For each count, a fresh topic of 16 partitions is pre-filled, the workers are started in one
consumer group (they split the partitions), and events/s are taken from the first to the last
prediction. Every process shares this machine's cores with the broker and Redis, so the figures
show what the machine allows, not what more machines would: see the CPU columns.
Results: bench/RESULTS.md, section "Scaling out" (Tansu) or "Scaling out (Apache Kafka
<version>)".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.brokers import add_broker_argument, bench_broker, served
from bench.e2e import Services, build_model, events, prefill, reader, start_worker
from bench.results import cpu_seconds, machine
from workers.dev.redis_server import RedisServer

PARTITIONS = 16
FIRST_PREDICTION_S = 90.0


async def measure(
    services: Services, workers: int, count: int, entities: int, device: str
) -> dict[str, float]:
    """Events/s of ``workers`` processes sharing one pre-filled topic, and CPU per process."""
    name = f"scale{workers}"
    connection = services.broker.connection
    topics = [f"{name}-events", f"{name}-predictions", f"{name}-dead-letters"]
    await connection.create_topics(topics, PARTITIONS)
    await served(connection, topics, PARTITIONS)
    await prefill(connection, topics[0], events(name, count, entities, seed=workers))
    consumer = reader(connection, topics[1], fetch_wait_ms=100)
    await consumer.start()
    started = [start_worker(services, name, k, wait=False, device=device) for k in range(workers)]
    try:
        for worker in started:  # all start together, so they join the group at once
            worker.wait_ready()
        pids = {f"worker {k}": w.process.pid for k, w in enumerate(started) if w.process}
        pids |= {"broker": services.broker.pid, "redis": services.redis.pid or 0}
        cpu_before = {label: cpu_seconds(pid) for label, pid in pids.items()}
        received, first_ts, last_ts = 0, None, 0
        deadline = time.monotonic() + FIRST_PREDICTION_S
        while received < count and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                received += len(records)
                stamps = [r.timestamp for r in records]
                first_ts = min(first_ts or stamps[0], *stamps)
                last_ts = max(last_ts, *stamps)
        cpu = {label: cpu_seconds(pid) - cpu_before[label] for label, pid in pids.items()}
    finally:
        for worker in started:
            worker.stop()
        await consumer.stop()
    if first_ts is None or received < count:
        raise RuntimeError(f"{received} of {count} predictions with {workers} workers")
    seconds = (last_ts - first_ts) / 1000
    worker_cpu = sum(v for k, v in cpu.items() if k.startswith("worker"))
    return {
        "rate": received / seconds,
        "seconds": seconds,
        "worker_cpu": worker_cpu,
        "broker_cpu": cpu["broker"],
        "redis_cpu": cpu["redis"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_broker_argument(parser)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--entities", type=int, default=20_000)
    parser.add_argument("--workers", type=int, nargs="+", help="default 1 2 4 (cuda: 1 2 4 8)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where every worker steps"
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "scaling.py: --device cuda needs a CUDA GPU; torch sees none here\n")
    workers_counts = args.workers or ([1, 2, 4, 8] if args.device == "cuda" else [1, 2, 4])
    gpu = f", all on one {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    load = os.getloadavg()[0]
    kind = bench_broker(args.broker)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="stream-lstm-scaling-") as tmp:
        workdir = Path(tmp)
        build_model(workdir / "model.pt")
        with kind.running(workdir) as broker, RedisServer() as redis:
            services = Services(broker, redis, workdir / "model.pt", workdir, 1024)
            for workers in workers_counts:
                print(f"{workers} worker(s): {args.events:,} events", flush=True)
                figures = asyncio.run(
                    measure(services, workers, args.events, args.entities, args.device)
                )
                print(f"  {figures['rate']:,.0f} events/s", flush=True)
                rows.append((workers, figures))
    base = rows[0][1]["rate"]
    table = [
        "| workers | events/s | per worker | vs 1 worker | worker CPU s | broker CPU s "
        "| redis CPU s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {n} | {f['rate']:,.0f} | {f['rate'] / n:,.0f} | {f['rate'] / base:.2f}x "
            f"| {f['worker_cpu']:.1f} | {f['broker_cpu']:.1f} | {f['redis_cpu']:.1f} |"
            for n, f in rows
        ),
    ]
    body = (
        f"{kind.command('scaling.py', '--device cuda' if gpu else '')} ({machine()}; "
        f"{kind.details}; load average "
        f"{load:.1f} at the start).\n\n"
        f"{args.events:,} events over {args.entities:,} entities pre-filled on a topic of "
        f"{PARTITIONS} partitions, then N workers in one group{gpu}; events/s from the first "
        "to the last prediction; model input 32, hidden 128, softmax over 8 labels. All "
        f"processes, the broker and Redis included, share this machine's {os.cpu_count()} "
        f"cores, so the figures show what one {os.cpu_count()}-core machine allows, not what "
        "more machines would; the CPU columns show where the "
        "cores went, counted from the moment every worker is ready (the first may have begun a "
        "little earlier).\n\n" + "\n".join(table)
    )
    print("\n" + body)
    section = "Scaling out on a GPU" if gpu else "Scaling out"
    kind.write(section, body)
    print(f"written to bench/RESULTS.md, section {kind.title(section)!r}")


if __name__ == "__main__":
    main()
