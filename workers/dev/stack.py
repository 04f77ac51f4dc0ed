"""A whole stream-lstm stack on this machine: embedded broker, Redis server and a worker process.

For the demo, for ``stream-lstm dev`` and for tests that cross processes. Every part listens on
a free loopback port chosen at run time and is stopped by PID by the code that started it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from stream_lstm.exceptions import StreamLSTMError
from workers.dev.apache_kafka import ApacheKafka
from workers.dev.redis_server import RedisServer
from workers.dev.services import Broker, free_port, stop_process
from workers.dev.tansu import TansuBroker

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0


class WorkerStartError(StreamLSTMError):
    """A worker process exited or did not become ready; the message holds its log's tail."""


@dataclass
class WorkerProcess:
    """``python -m workers.cli worker`` as a child process, configured by environment variables."""

    env: Mapping[str, str]
    log_path: Path
    web_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def start(self) -> Self:
        env = {**os.environ, **self.env, "STREAM_LSTM_WEB_PORT": str(self.web_port)}
        # Faust's data directory beside the log: the default temporary one outlives a SIGKILL.
        env.setdefault("STREAM_LSTM_DATA_DIR", str(self.log_path.with_suffix(".faust-data")))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "worker"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Return once /health says ready; raise WorkerStartError if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise WorkerStartError(f"the worker exited at start:\n{self.log_tail()}")
            try:
                if self.http("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise WorkerStartError(
            f"the worker was not ready within {timeout_s:.0f}s:\n{self.log_tail()}"
        )

    def http(self, method: str, path: str) -> tuple[int, Any]:
        """One request to the worker's web server: (status, parsed JSON or text); with the
        worker's API token when it has one."""
        token = self.env.get("STREAM_LSTM_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.web_url + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    def memory(self, entity_id: str) -> tuple[int, Any]:
        """GET the entity's stored memory."""
        return self.http("GET", f"/entities/{urllib.parse.quote(entity_id, safe='')}/memory")

    def metric(self, name: str) -> float:
        """One unlabelled sample of the worker's /metrics."""
        status, text = self.http("GET", "/metrics")
        if status != 200:
            raise WorkerStartError(f"/metrics answered {status}: {text}")
        for line in str(text).splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int | None:
        """Signal the worker and wait; kill it when it outlives ``timeout_s``. Its exit status."""
        if self.process is None:
            return None
        return stop_process(self.process, "worker", timeout_s, sig)

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


@dataclass
class Stack:
    """Broker, Redis and one worker on loopback; a context manager that stops what it started."""

    workdir: Path
    settings: Mapping[str, str] = field(default_factory=dict)
    """Extra worker settings, by field name (``max_batch``...)."""
    kafka: Literal["tansu", "apache"] = "tansu"
    """The broker: Tansu (embedded, starts in milliseconds) or Apache Kafka (Java and Maven)."""
    broker: Broker = field(init=False)
    redis: RedisServer = field(init=False)
    worker: WorkerProcess = field(init=False)

    def __enter__(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.broker = (
                ApacheKafka(workdir=self.workdir / "kafka", heap_mb=512).start()
                if self.kafka == "apache"
                else TansuBroker(log_path=self.workdir / "broker.log").start()
            )
            self.redis = RedisServer(data_dir=self.workdir / "redis")
            self.redis.start()
            env = {
                "STREAM_LSTM_BROKER": self.broker.url,
                "STREAM_LSTM_REDIS_URL": self.redis.url,
                "STREAM_LSTM_SESSION_TIMEOUT_S": "2",
                **{f"STREAM_LSTM_{k.upper()}": v for k, v in self.settings.items()},
            }
            self.worker = WorkerProcess(env, self.workdir / "worker.log").start()
            self.worker.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker, then Redis, then the broker: whichever of them started."""
        for part in ("worker", "redis", "broker"):
            if hasattr(self, part):
                getattr(self, part).stop()
