"""What the local services started for demos, benchmarks and tests share: a free port, a probe
that a Kafka broker answers, how a process we started is stopped, and the `Broker` protocol both
broker launchers implement."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from typing import Any, Protocol

from workers.connection import KafkaConnection

__all__ = ["Broker", "dead_port", "free_port", "kafka_answers", "stop_process"]

logger = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_API_VERSIONS = 18  # Kafka protocol API key


def free_port() -> int:
    """Ask the kernel for a port nobody listens on (racy, hence the retries in `start`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def dead_port() -> Iterator[int]:
    """A port nobody listens on, and nobody else takes while the block runs: bound, never
    listening, so a connection to it is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        yield sock.getsockname()[1]


def stop_process(
    process: subprocess.Popen[Any],
    what: str,
    timeout_s: float,
    sig: int | None = signal.SIGTERM,
) -> int | None:
    """Signal a process we started (``sig``; None: it was signalled already) and wait for it;
    SIGKILL it when it outlives ``timeout_s``. Its exit status, None when it had to be killed."""
    if sig is not None and process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("%s (pid %d) did not stop within %gs: killed", what, process.pid, timeout_s)
        process.kill()
        process.wait()
        return None


def kafka_answers(host: str, port: int, timeout: float) -> bool:
    """Send one ApiVersions request; True once the broker answers it without error.

    Written against a raw socket, not aiokafka, so `start` works both inside and outside a
    running event loop (a sync fixture, an async test, a CLI command).
    """
    client_id = b"stream-lstm-probe"
    # Request header v1: api_key, api_version, correlation_id, client_id; ApiVersions v0 body.
    body = struct.pack(">hhih", _API_VERSIONS, 0, 1, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            head = _recv_exactly(sock, 4)
            (size,) = struct.unpack(">i", head)
            payload = _recv_exactly(sock, size)
            correlation_id, error_code = struct.unpack(">ih", payload[:6])
    except (OSError, struct.error):
        return False
    return bool(correlation_id == 1 and error_code == 0)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        chunks += chunk
    return bytes(chunks)


class Broker(Protocol):
    """A broker a stack, test or benchmark started: Tansu (`workers.dev.tansu.TansuBroker`) or
    Apache Kafka (`workers.dev.apache_kafka.ApacheKafka`)."""

    @property
    def bootstrap(self) -> str:
        """``host:port[,host:port...]``, what aiokafka's clients take."""
        ...

    @property
    def url(self) -> str:
        """``kafka://host:port[;host:port...]``, what ``STREAM_LSTM_BROKER`` takes."""
        ...

    @property
    def connection(self) -> KafkaConnection:
        """How clients connect to its PLAINTEXT listener."""
        ...

    @property
    def pid(self) -> int: ...

    def stop(self) -> None: ...
