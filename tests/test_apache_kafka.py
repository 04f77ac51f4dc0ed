"""The Apache Kafka launcher: jars cached outside the repository, brokers on free ports, stopped
by PID, and a skip that says how to enable the tier where Java or Maven is missing."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from tests.conftest import require_apache_kafka
from tests.stack import partitions
from workers.dev.apache_kafka import KAFKA_VERSION, ApacheKafka, apache_kafka_missing, kafka_jars

REPOSITORY = Path(__file__).resolve().parents[1]


def test_jars_are_cached_outside_the_repository_and_resolved_once() -> None:
    require_apache_kafka()
    libs = kafka_jars()
    assert not libs.resolve().is_relative_to(REPOSITORY)
    assert (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file()
    assert (libs / f"kafka-clients-{KAFKA_VERSION}.jar").is_file()
    before = (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").stat().st_mtime_ns
    assert kafka_jars() == libs
    assert (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").stat().st_mtime_ns == before


def test_without_java_the_reason_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    reason = apache_kafka_missing()
    assert reason is not None
    assert "Java 17" in reason


def test_without_maven_or_cached_jars_the_reason_names_maven(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    java = shutil.which("java")
    if java is None:
        pytest.skip("no java here: the Java reason applies first")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "java").symlink_to(java)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # java, no mvn
    monkeypatch.setenv("STREAM_LSTM_KAFKA_CACHE", str(tmp_path / "cache"))  # nothing cached
    reason = apache_kafka_missing()
    assert reason is not None
    assert "Maven" in reason
    assert str(tmp_path / "cache") in reason


async def test_a_broker_serves_on_its_ports_creates_replicated_topics_and_stops_by_pid(
    apache_kafka: ApacheKafka,
) -> None:
    host, port = apache_kafka.bootstrap.split(":")
    assert host == "127.0.0.1"
    assert apache_kafka.url == f"kafka://127.0.0.1:{port}"
    topic = f"launcher-{uuid.uuid4().hex[:8]}"
    assert await apache_kafka.connection.create_topics([topic], partitions=3) == [topic]
    assert len(await partitions(apache_kafka.connection, topic)) == 3


def test_stop_ends_every_node_process(tmp_path: Path) -> None:
    require_apache_kafka()
    kafka = ApacheKafka(workdir=tmp_path).start()
    pid = kafka.pid
    os.kill(pid, 0)  # alive
    kafka.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert kafka.pids == []
