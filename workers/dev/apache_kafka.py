"""Apache Kafka on this machine (KRaft, one broker or a cluster), for tests, benchmarks and dev.

The broker our users run, beside the embedded Tansu of ``workers.dev.tansu``: it enforces message
sizes, frees what retention drops and finds an offset through its index, so sizes and latency
measured on it mean something. Needs Java 17+ and Maven (no Docker):

- ``kafka_jars()`` resolves the pinned ``org.apache.kafka:kafka_2.13`` and its dependencies from
  Maven Central once, into a cache outside the repository (``~/.cache/stream-lstm``, or
  ``STREAM_LSTM_KAFKA_CACHE``), with ``mvn dependency:copy-dependencies`` on a POM written here.
- ``ApacheKafka(brokers=1 or 3)`` formats KRaft storage for each node (``StorageTool``), starts
  ``kafka.Kafka`` per node on free loopback ports with a small heap, waits until every broker
  has registered, and stops them by PID. Each node is broker and controller, so a cluster of
  three keeps its quorum with one node down.

Every node has a PLAINTEXT client listener (also the inter-broker one). ``KafkaTls`` adds an
SSL listener that requires a client certificate (mTLS) and a SASL_SSL one (SCRAM-SHA-256,
SCRAM-SHA-512 and PLAIN), for the users given: their SCRAM credentials are written when the
storage is formatted (KIP-900), PLAIN's into the listener's JAAS line.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar

from stream_lstm.exceptions import BrokerError
from workers.connection import KafkaConnection
from workers.dev.services import free_port, kafka_answers, stop_process

__all__ = ["KAFKA_VERSION", "ApacheKafka", "KafkaTls", "apache_kafka_missing", "kafka_jars"]

logger = logging.getLogger(__name__)

KAFKA_VERSION = "4.4.0"
"""The Apache Kafka the tests, benchmarks, ``stream-lstm dev --kafka apache`` and
docker-compose.yml run (a test holds the compose file to it)."""

_HOST = "127.0.0.1"
_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>stream-lstm</groupId><artifactId>kafka-broker</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
</project>
"""
_LOG4J2 = """status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
"""
_JVM_OPTIONS = [
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-Djava.awt.headless=true",
]  # what kafka-server-start.sh runs the broker with
_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")

_FETCH_TIMEOUT_S = 900
_FORMAT_TIMEOUT_S = 120

T = TypeVar("T")


def apache_kafka_missing() -> str | None:
    """Why Apache Kafka cannot run here, or None when Java and Maven (or the cached jars) are."""
    if shutil.which("java") is None:
        return (
            "Apache Kafka needs Java 17+ on PATH (Debian: apt-get install openjdk-17-jre-headless)"
        )
    if not _complete(_cache_dir()) and shutil.which("mvn") is None:
        return (
            f"Apache Kafka {KAFKA_VERSION}'s jars are not cached in {_cache_dir()} and Maven, "
            "which fetches them from Maven Central, is not on PATH (Debian: apt-get install maven)"
        )
    return None


def kafka_jars(version: str = KAFKA_VERSION) -> Path:
    """The folder of the Kafka broker's jars, resolved from Maven Central on the first call."""
    cache = _cache_dir(version)
    libs = cache / "libs"
    if _complete(cache):
        return libs
    missing = apache_kafka_missing()
    if missing is not None:
        raise BrokerError(missing)
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be fetching them right now
        if not _complete(cache):
            _fetch(version, cache, libs)
    return libs


def _fetch(version: str, cache: Path, libs: Path) -> None:
    logger.info("fetching Apache Kafka %s's jars from Maven Central into %s", version, libs)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        (Path(tmp) / "pom.xml").write_text(_POM.format(version=version))
        result = subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={Path(tmp) / 'libs'}",
            ],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
            timeout=_FETCH_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise BrokerError(
                f"mvn could not fetch org.apache.kafka:kafka_2.13:{version}:\n"
                f"{(result.stdout + result.stderr)[-2000:]}"
            )
        shutil.rmtree(libs, ignore_errors=True)  # what an interrupted fetch left
        (Path(tmp) / "libs").rename(libs)
    (cache / "complete").touch()


def _cache_dir(version: str = KAFKA_VERSION) -> Path:
    root = os.environ.get("STREAM_LSTM_KAFKA_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "stream-lstm"
    return base / f"kafka-{version}"


def _complete(cache: Path) -> bool:
    return (cache / "complete").exists() and (cache / "libs").is_dir()


@dataclass(frozen=True)
class KafkaTls:
    """The broker's TLS identity and who may connect on its secured listeners.

    PEM files: ``ca_file`` signs the broker's certificate and the clients' (mTLS);
    ``keystore_file`` holds the broker's PKCS#8 private key (unencrypted) and its certificate
    chain, for the name clients connect to (127.0.0.1). ``users``: name -> password, for SCRAM
    and PLAIN on the SASL_SSL listener.
    """

    ca_file: Path
    keystore_file: Path
    users: Mapping[str, str] = field(default_factory=dict)


@dataclass
class _Node:
    node_id: int
    port: int  # PLAINTEXT, clients and brokers
    controller_port: int
    ssl_port: int | None
    sasl_ssl_port: int | None
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None


class ApacheKafka:
    """One Apache Kafka broker, or a cluster of ``brokers``, on loopback; started and stopped by
    its owner (``with ApacheKafka() as kafka: kafka.bootstrap``).

    Each node runs with a ``heap_mb`` heap; logs (warnings and up) and data live in
    ``workdir`` (a temporary directory, removed at ``stop``, when None). Topics are created
    with a replication factor of min(3, brokers) and ``min.insync.replicas`` of
    min(2, brokers) unless asked otherwise; a client's session timeout may be as low as 0.5 s.
    """

    def __init__(
        self,
        brokers: int = 1,
        *,
        workdir: Path | None = None,
        heap_mb: int = 256,
        tls: KafkaTls | None = None,
        start_timeout_s: float = 90.0,
        version: str = KAFKA_VERSION,
    ) -> None:
        if brokers < 1:
            raise BrokerError(f"a Kafka cluster needs at least one broker, not {brokers}")
        self.brokers = brokers
        self.heap_mb = heap_mb
        self.tls = tls
        self.version = version
        self._workdir = workdir
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._start_timeout_s = start_timeout_s
        self._nodes: list[_Node] = []

    @property
    def bootstrap(self) -> str:
        """``host:port,...`` of the PLAINTEXT listeners, what aiokafka's clients take."""
        return self._listener("port")

    @property
    def url(self) -> str:
        """``kafka://host:port;...``, what ``STREAM_LSTM_BROKER`` takes."""
        return "kafka://" + self.bootstrap.replace(",", ";")

    @property
    def connection(self) -> KafkaConnection:
        """How clients connect to the PLAINTEXT listeners."""
        return KafkaConnection(self.bootstrap)

    @property
    def ssl_bootstrap(self) -> str:
        """The mTLS listeners (protocol SSL, a client certificate required)."""
        return self._listener("ssl_port")

    @property
    def sasl_ssl_bootstrap(self) -> str:
        """The SASL_SSL listeners (SCRAM-SHA-256, SCRAM-SHA-512, PLAIN)."""
        return self._listener("sasl_ssl_port")

    @property
    def pid(self) -> int:
        """The first node's process id (the only one of a single broker)."""
        return self.pids[0]

    @property
    def pids(self) -> list[int]:
        """Each running node's process id, by node."""
        return [n.process.pid for n in self._nodes if n.process is not None]

    def _listener(self, attribute: str) -> str:
        if not self._nodes:
            raise BrokerError("Apache Kafka is not running; call start() first")
        ports = [getattr(node, attribute) for node in self._nodes]
        if None in ports:
            raise BrokerError("this Kafka has no such listener: pass tls=KafkaTls(...)")
        return ",".join(f"{_HOST}:{port}" for port in ports)

    def start(self) -> Self:
        """Format every node's storage, start them, and return once every broker is registered."""
        if self._nodes:
            raise BrokerError("Apache Kafka is already running")
        libs = kafka_jars(self.version)
        if self._workdir is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="stream-lstm-kafka-")
            workdir = Path(self._scratch.name)
        else:
            workdir = self._workdir
        secured = self.tls is not None
        self._nodes = [
            _Node(
                node_id=n,
                port=free_port(),
                controller_port=free_port(),
                ssl_port=free_port() if secured else None,
                sasl_ssl_port=free_port() if secured else None,
                directory=workdir / f"node-{n}",
            )
            for n in range(1, self.brokers + 1)
        ]
        cluster_id = _cluster_id()
        try:
            for node in self._nodes:
                self._format(libs, node, cluster_id)
            for node in self._nodes:
                self._launch(libs, node)
            self._wait_registered()
        except BaseException:
            self.stop()
            raise
        logger.info(
            "Apache Kafka %s: %d broker(s) at %s", self.version, self.brokers, self.bootstrap
        )
        return self

    def _format(self, libs: Path, node: _Node, cluster_id: str) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        (node.directory / "server.properties").write_text(self._properties(node))
        (node.directory / "log4j2.properties").write_text(_LOG4J2)
        scram = [
            arg
            for name, password in (self.tls.users if self.tls else {}).items()
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512")
            for arg in ("--add-scram", f"{mechanism}=[name={name},password={password}]")
        ]
        result = subprocess.run(
            [
                *self._java(libs, node, heap_mb=64),
                "kafka.tools.StorageTool",
                "format",
                "--cluster-id",
                cluster_id,
                "--config",
                str(node.directory / "server.properties"),
                *scram,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=_FORMAT_TIMEOUT_S,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr)[-3000:]
            raise BrokerError(f"formatting Kafka node {node.node_id} failed:\n{output}")

    def _properties(self, node: _Node) -> str:
        voters = ",".join(f"{n.node_id}@{_HOST}:{n.controller_port}" for n in self._nodes)
        listeners = {"PLAINTEXT": node.port, "CONTROLLER": node.controller_port}
        if node.ssl_port is not None and node.sasl_ssl_port is not None:
            listeners |= {"SSL": node.ssl_port, "SASL_SSL": node.sasl_ssl_port}
        replicas = min(3, self.brokers)
        properties = {
            "process.roles": "broker,controller",
            "node.id": node.node_id,
            "controller.quorum.voters": voters,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listeners": ",".join(f"{name}://{_HOST}:{port}" for name, port in listeners.items()),
            "advertised.listeners": ",".join(
                f"{name}://{_HOST}:{port}"
                for name, port in listeners.items()
                if name != "CONTROLLER"
            ),
            "listener.security.protocol.map": ",".join(
                f"{name}:{'PLAINTEXT' if name == 'CONTROLLER' else name}" for name in listeners
            ),
            "log.dirs": node.directory / "data",
            "num.partitions": 4,  # what Tansu gives a topic a client creates by using it
            "default.replication.factor": replicas,
            "min.insync.replicas": min(2, self.brokers),
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": 8,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min(2, self.brokers),
            "group.initial.rebalance.delay.ms": 0,
            "group.min.session.timeout.ms": 500,
            "num.network.threads": 2,
            "num.io.threads": 4,
        }
        if self.tls is not None:
            jaas_users = " ".join(f'user_{u}="{p}"' for u, p in self.tls.users.items())
            properties |= {
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": self.tls.keystore_file,
                "ssl.truststore.type": "PEM",
                "ssl.truststore.location": self.tls.ca_file,
                "listener.name.ssl.ssl.client.auth": "required",
                "sasl.enabled.mechanisms": ",".join(_MECHANISMS),
                "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": _SCRAM_JAAS,
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": _SCRAM_JAAS,
                "listener.name.sasl_ssl.plain.sasl.jaas.config": (
                    f"{_PLAIN_LOGIN} required {jaas_users};"
                ),
            }
        return "".join(f"{key}={value}\n" for key, value in properties.items())

    def _java(self, libs: Path, node: _Node, heap_mb: int) -> list[str]:
        return [
            "java",
            f"-Xms{heap_mb}m",
            f"-Xmx{heap_mb}m",
            *_JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={node.directory / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
        ]

    def _launch(self, libs: Path, node: _Node) -> None:
        node.log = (node.directory / "broker.log").open("ab")
        node.process = subprocess.Popen(
            [
                *self._java(libs, node, self.heap_mb),
                "kafka.Kafka",
                str(node.directory / "server.properties"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=node.log,
            stderr=subprocess.STDOUT,
        )

    def _wait_registered(self) -> None:
        """Wait until every node answers and the cluster lists every broker."""
        deadline = time.monotonic() + self._start_timeout_s
        for node in self._nodes:
            while not kafka_answers(_HOST, node.port, timeout=1.0):
                self._check_alive(node, deadline)
                time.sleep(0.1)
        while _run(_broker_count(self.bootstrap)) < self.brokers:
            for node in self._nodes:
                self._check_alive(node, deadline)
            time.sleep(0.2)

    def _check_alive(self, node: _Node, deadline: float) -> None:
        assert node.process is not None, "launched"
        if node.process.poll() is not None:
            raise BrokerError(
                f"Kafka node {node.node_id} exited ({node.process.returncode}):\n"
                f"{self.log_tail(node.node_id)}"
            )
        if time.monotonic() > deadline:
            raise BrokerError(
                f"Kafka was not up within {self._start_timeout_s:.0f}s:\n"
                f"{self.log_tail(node.node_id)}"
            )

    def log_tail(self, node_id: int = 1, chars: int = 3000) -> str:
        """The end of a node's log (warnings and errors)."""
        path = self._nodes[node_id - 1].directory / "broker.log" if self._nodes else None
        return path.read_text(errors="replace")[-chars:] if path and path.exists() else ""

    def kill(self, node_id: int, sig: int = signal.SIGKILL) -> None:
        """Signal one node (SIGKILL by default: a crash) and wait until it has exited."""
        node = self._node(node_id)
        if node.process is not None:
            node.process.send_signal(sig)
            node.process.wait()
            node.process = None
        if node.log is not None:
            node.log.close()
            node.log = None

    def restart(self, node_id: int) -> None:
        """Start a node killed before on its ports and data; return once it answers again."""
        node = self._node(node_id)
        if node.process is not None:
            raise BrokerError(f"Kafka node {node_id} is running")
        self._launch(kafka_jars(self.version), node)
        deadline = time.monotonic() + self._start_timeout_s
        while not kafka_answers(_HOST, node.port, timeout=1.0):
            self._check_alive(node, deadline)
            time.sleep(0.1)

    def _node(self, node_id: int) -> _Node:
        if not 1 <= node_id <= len(self._nodes):
            raise BrokerError(f"no Kafka node {node_id}: nodes are 1 to {len(self._nodes)}")
        return self._nodes[node_id - 1]

    def stop(self) -> None:
        """Stop every node by PID (SIGTERM, SIGKILL after 20 s) and remove a temporary workdir."""
        for node in self._nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self._nodes:
            if node.process is not None:  # signalled above: the nodes stop side by side
                stop_process(node.process, f"Kafka node {node.node_id}", 20, sig=None)
                node.process = None
            if node.log is not None:
                node.log.close()
                node.log = None
        self._nodes = []
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_SCRAM_JAAS = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
_PLAIN_LOGIN = "org.apache.kafka.common.security.plain.PlainLoginModule"


async def _broker_count(bootstrap: str) -> int:
    admin = KafkaConnection(bootstrap).admin(request_timeout_ms=5000)
    try:
        await admin.start()
        cluster: dict[str, Any] = await admin.describe_cluster()
    except Exception as e:  # not up yet: the caller tries again until its deadline
        logger.debug("Kafka not registered yet: %r", e)
        return 0
    finally:
        await admin.close()
    return len(cluster["brokers"])


def _cluster_id() -> str:
    """A random Kafka cluster id: URL-safe base64 of 16 bytes, never starting with "-" (the
    storage tool would take it for an option), as Kafka's own ``Uuid.randomUuid`` ensures."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end from sync code, inside a running event loop or not."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
