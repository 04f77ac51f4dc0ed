"""The web server of a worker process: the memory API needs the token when one is set, it
listens on loopback unless told otherwise (and warns when told so without a token), /health and
/metrics stay open, and Faust's own pages are not served."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_lstm.model import StreamModel
from tests.stack import StreamSlice, event, save_model, settled_memory
from workers.app import StreamWorker
from workers.dev.redis_server import RedisServer
from workers.dev.stack import WorkerProcess
from workers.dev.tansu import TansuBroker
from workers.settings import DEMO_MODEL, Settings

TOKEN = "api-token-5b0d6c2e9f1a4b7c"


@pytest.fixture(scope="module")
def stack(
    tansu_broker: TansuBroker, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StreamSlice]:
    tmp = tmp_path_factory.mktemp("api")
    stack = StreamSlice(tansu_broker, redis_server, save_model(tmp / "model.pt", seed=3), tmp)
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def worker(stack: StreamSlice) -> WorkerProcess:
    return stack.start_worker(api_token=TOKEN)


def call(worker: WorkerProcess, method: str, path: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(worker.web_url + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


async def test_the_memory_api_needs_the_token_and_a_refused_reset_changes_nothing(
    stack: StreamSlice, worker: WorkerProcess
) -> None:
    await stack.publish([event("a", [0.5, 0.1, -0.2, 0.3]), event("a", [0.1, 0.2, 0.3, 0.4])])
    before = settled_memory(worker, "a", 2)  # the harness sends the token
    path = "/entities/a/memory"
    for token in (None, "", "wrong", TOKEN[:-1], TOKEN + "x", TOKEN.upper()):
        assert call(worker, "GET", path, token) == 401, token
        assert call(worker, "DELETE", path, token) == 401, token
    assert worker.memory("a") == (200, before), "a refused reset changed nothing"
    assert call(worker, "GET", path, TOKEN) == 200
    assert call(worker, "DELETE", path, TOKEN) == 200
    assert worker.memory("a")[1]["step"] == 0


def test_health_and_metrics_stay_open_and_faust_pages_are_gone(worker: WorkerProcess) -> None:
    assert call(worker, "GET", "/health", None) == 200
    assert call(worker, "GET", "/metrics", None) == 200
    for page in ("/router/", "/table/", "/graph/", "/stats/", "/performance/"):
        assert call(worker, "GET", page, None) == 404, page


def test_the_web_server_listens_on_loopback_only(worker: WorkerProcess) -> None:
    listening = listeners(worker.web_port)
    assert listening == {"127.0.0.1"}, listening


def test_beyond_loopback_without_a_token_it_warns_at_start(stack: StreamSlice) -> None:
    open_worker = stack.start_worker(web_bind="0.0.0.0")
    try:
        assert listeners(open_worker.web_port) == {"0.0.0.0"}
        assert "without STREAM_LSTM_API_TOKEN" in open_worker.log_tail()
    finally:
        open_worker.stop()


def listeners(port: int) -> set[str]:
    """The IPv4 addresses a TCP port is listened on, from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_the_memory_api_has_redis_connections_of_its_own(tmp_path: Path) -> None:
    """A flood of API requests waits on the API's own connection pool, never on the one the
    stream loads and commits with."""
    settings = Settings.load(redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path)
    worker = StreamWorker(settings, StreamModel.load(DEMO_MODEL, device="cpu"))
    assert worker.api_store is not worker.store
    api, stream = worker.api_store._backend.redis, worker.store._backend.redis
    assert api.connection_pool is not stream.connection_pool
