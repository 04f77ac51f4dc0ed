"""Where a worker's CPU goes per event: a sampling profile of one end-to-end throughput run.

    python bench/cpu_profile.py [--broker tansu|apache] [--events 400000] [--entities 20000]

A default run takes about 1 minute (Apache Kafka: 20 s more to start).

The throughput phase of bench/e2e.py (the target model: input 32, hidden 128, softmax over 8
labels; JSON events pre-filled on a topic of 8 partitions, then one worker process, max_batch
1024, 1 torch thread), with py-spy sampling the worker's Python stacks from the moment it is
ready (``--nonblocking``: the worker is not paused to be read, so the profile costs it little).
Each sample is put in the first stage its stack passes through (the order of ``STAGES``), and
the worker's CPU per event is split by the stages' shares of the samples. Results:
bench/RESULTS.md, section "Worker profile" (Tansu) or "Worker profile (Apache Kafka <version>)".
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.brokers import add_broker_argument, bench_broker, served
from bench.e2e import (
    PARTITIONS,
    TARGET_US_PER_EVENT,
    Services,
    Throughput,
    build_model,
    throughput,
    verdict,
)
from bench.results import machine
from workers.dev.redis_server import RedisServer
from workers.dev.stack import WorkerProcess

SAMPLES_PER_S = 250
STAGES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (stage, re.compile(pattern))
    for stage, pattern in (
        ("the LSTM step (torch's nn.LSTM)", r"LSTM\.forward \(.*torch/"),
        (
            "the rest of the step (tensors, readout, finite check)",
            r"stream_lstm/(engine|model)\.py|_finite \(",
        ),
        (
            "event checks (JSON decode, validation)",
            r"^check \(.*workers/batch\.py|_check_packed \(",
        ),
        ("prediction encoding", r"_predictions \(.*workers/batch\.py"),
        ("produce (partitioning, record batches)", r"KafkaEmitter|aiokafka/producer/"),
        ("consume (fetch, record parsing)", r"aiokafka/consumer/|BatchConsumer\._consume \("),
        ("Redis commit (encode, fenced write)", r"commit_many \("),
        ("Redis load (read, decode)", r"load_many \("),
        (
            "memory bookkeeping (cache, rows, overlay)",
            r"stream_lstm/memories\.py|state/cache\.py|workers/batch\.py",
        ),
    )
)
OTHER = "the event loop, sockets and the rest"
OURS = re.compile(r"(stream_lstm|state|workers)/\w+\.py")


def stage_of(frames: list[str]) -> str:
    """The first stage (in ``STAGES``' order) that a sampled stack passes through."""
    for stage, pattern in STAGES:
        if any(pattern.search(frame) for frame in frames):
            return stage
    return OTHER


def read_samples(path: Path) -> tuple[Counter[str], Counter[str]]:
    """Samples per stage, and per innermost function of ours (py-spy's raw format: a stack of
    ``function (file:line)`` frames joined by ``;``, a space, a count)."""
    stages: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        stages[stage_of(frames)] += int(count)
        ours = [frame for frame in frames if OURS.search(frame)]
        functions[ours[-1] if ours else "(outside our packages)"] += int(count)
    return stages, functions


def sampled(
    out: Path,
) -> tuple[list[subprocess.Popen[bytes]], Callable[[WorkerProcess], None]]:
    """A ``watch`` for ``throughput`` that starts py-spy on the worker; the py-spys started."""
    spy = _py_spy()
    started: list[subprocess.Popen[bytes]] = []

    def watch(worker: WorkerProcess) -> None:
        assert worker.process is not None
        command = [spy, "record", "--pid", str(worker.process.pid), "--rate"]
        command += [str(SAMPLES_PER_S), "--format", "raw", "--output", str(out), "--nonblocking"]
        started.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

    return started, watch


def report(
    args: argparse.Namespace,
    label: str,
    run: Throughput,
    stages: Counter[str],
    functions: Counter[str],
) -> str:
    total = sum(stages.values())
    us_per_event = run.cpu_s["worker"] / run.events * 1e6
    rows = [
        f"| {stage} | {stages[stage] / total:.1%} | {stages[stage] / total * us_per_event:.1f} |"
        for stage in [name for name, _ in STAGES] + [OTHER]
    ]
    lstm = stages[STAGES[0][0]] / total * us_per_event
    target = (
        f"Target: the worker's CPU per event at most {TARGET_US_PER_EVENT:.0f} us: "
        f"{us_per_event:.1f} us, {verdict(us_per_event <= TARGET_US_PER_EVENT)} "
        f"({us_per_event / TARGET_US_PER_EVENT:.1f}x). "
        f"The LSTM step alone, torch's fused kernel and no code of ours, takes {lstm:.1f} us of "
        f"it: {max(0.0, TARGET_US_PER_EVENT - lstm):.1f} us would be left for every other stage."
    )
    top = [
        f"| `{function}` | {count / total:.1%} |" for function, count in functions.most_common(12)
    ]
    return "\n".join(
        [
            f"{args.command} ({machine()}; py-spy {_py_spy_version()}, {label}; load average "
            f"{args.load:.1f} at the start).",
            "",
            f"{run.events:,} events over {args.entities:,} entities pre-filled, then one worker: "
            f"{run.rate:,.0f} events/s, worker CPU {run.cpu_s['worker']:.1f} s "
            f"(**{us_per_event:.1f} us/event**; broker {run.cpu_s['broker']:.1f} s, Redis "
            f"{run.cpu_s['redis']:.1f} s, bench client {run.cpu_s['bench client']:.1f} s; host "
            f"CPU steal {run.steal:.0%}). {total:,} samples of the worker's stacks at "
            f"{SAMPLES_PER_S}/s; each goes to the first stage its stack passes through.",
            "",
            target,
            "",
            "| stage | share of samples | us/event |",
            "|---|---:|---:|",
            *rows,
            "",
            "The functions of ours the samples were innermost in (the rest of their time is in "
            "what they call outside our packages):",
            "",
            "| function | share |",
            "|---|---:|",
            *top,
        ]
    )


def _py_spy() -> str:
    """py-spy on the PATH, else beside this Python (a virtual environment not activated)."""
    return shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def _py_spy_version() -> str:
    return subprocess.run([_py_spy(), "--version"], capture_output=True, text=True).stdout.split()[
        -1
    ]


async def run(args: argparse.Namespace, services: Services, out: Path) -> Throughput:
    names = [f"profile-{topic}" for topic in ("events", "predictions", "dead-letters")]
    await services.broker.connection.create_topics(names, PARTITIONS)
    await served(services.broker.connection, names, PARTITIONS)
    started, watch = sampled(out)
    try:
        return await throughput(services, "profile", args.events, args.entities, 120.0, watch)
    finally:
        for spy in started:  # py-spy writes its file once the worker it samples has exited
            _, errors = spy.communicate(timeout=60)
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy failed: {errors.decode(errors='replace').strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_broker_argument(parser)
    parser.add_argument("--events", type=int, default=400_000, help="pre-filled, then processed")
    parser.add_argument("--entities", type=int, default=20_000)
    args = parser.parse_args()
    args.load = os.getloadavg()[0]
    torch.set_num_threads(1)  # as the worker runs
    gc.freeze()

    kind = bench_broker(args.broker)
    args.command = kind.command("cpu_profile.py")
    with tempfile.TemporaryDirectory(prefix="stream-lstm-profile-") as tmp:
        workdir = Path(tmp)
        build_model(workdir / "model.pt")
        with kind.running(workdir) as broker, RedisServer() as redis:
            services = Services(broker, redis, workdir / "model.pt", workdir, 1024)
            result = asyncio.run(run(args, services, workdir / "samples.txt"))
        stages, functions = read_samples(workdir / "samples.txt")
    body = report(args, kind.label, result, stages, functions)
    print("\n" + body)
    kind.write("Worker profile", body)
    print(f"written to bench/RESULTS.md, section {kind.title('Worker profile')!r}")


if __name__ == "__main__":
    main()
